//! Helpers of the credential tests: bounded tests, what a wiremock server received, fresh
//! database directories, a raw search of files for a secret, row counts of every table, and a
//! tracing subscriber that writes down every span and event at every level.

#![allow(dead_code, unreachable_pub)]

use std::fmt::{self, Write as _};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};

/// No test may run longer than this.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

/// What a wiremock server received.
pub async fn received(server: &wiremock::MockServer) -> Vec<wiremock::Request> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
}

/// `Ok` when every request the server received carries `name: value`; counted at the server.
pub fn every_attempt_carries(
    requests: &[wiremock::Request],
    name: &str,
    value: &str,
) -> Result<(), String> {
    if requests.is_empty() {
        return Err("the server received nothing".to_owned());
    }
    for (i, r) in requests.iter().enumerate() {
        let got = r.headers.get(name).and_then(|v| v.to_str().ok());
        if got != Some(value) {
            return Err(format!("attempt {} carried {name}: {got:?}", i + 1));
        }
    }
    Ok(())
}

/// A fresh directory for one test's files.
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "effects-core-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// Every file directly in `dir` (the database, its `-wal` and `-shm`) whose raw bytes contain
/// `needle`, with the number of bytes searched.
pub fn files_containing(dir: &Path, needle: &[u8]) -> (Vec<PathBuf>, usize) {
    assert!(!needle.is_empty(), "searching for nothing");
    let mut found = Vec::new();
    let mut searched = 0;
    for entry in std::fs::read_dir(dir).expect("read the test directory") {
        let path = entry.expect("directory entry").path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read a database file");
        searched += bytes.len();
        if bytes.windows(needle.len()).any(|w| w == needle) {
            found.push(path);
        }
    }
    (found, searched)
}

/// The number of rows of every table of the SQLite file, by table name.
pub fn row_counts(path: &Path) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(path).expect("open the database file");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .expect("list tables")
        .query_map([], |row| row.get(0))
        .expect("list tables")
        .collect::<Result<_, _>>()
        .expect("table names");
    tables.retain(|t| !t.starts_with("sqlite_"));
    assert!(!tables.is_empty(), "the database has no tables");
    tables
        .into_iter()
        .map(|table| {
            // A table name from sqlite_master, quoted; not user input.
            let sql = format!("SELECT count(*) FROM \"{}\"", table.replace('"', "\"\""));
            let count = conn.query_row(&sql, [], |row| row.get(0)).expect("count");
            (table, count)
        })
        .collect()
}

/// `Ok` when nothing changed between two [`row_counts`], otherwise which tables changed.
pub fn unchanged(before: &[(String, i64)], after: &[(String, i64)]) -> Result<(), String> {
    if before == after {
        return Ok(());
    }
    let changed: Vec<String> = after
        .iter()
        .filter(|row| !before.contains(row))
        .map(|(table, count)| format!("{table} now has {count} rows"))
        .collect();
    Err(changed.join(", "))
}

/// A subscriber that writes down every span (name and fields, and fields recorded later) and
/// every event (level, target and fields), at every level, as text.
#[derive(Clone, Default)]
pub struct Capture {
    text: Arc<Mutex<String>>,
    next_id: Arc<AtomicU64>,
}

impl Capture {
    /// Makes a capture the process's global subscriber, once, and returns it: every span and
    /// event of every thread is written down from then on. A scoped subscriber
    /// (`set_default`) is not enough when other threads hit a call site first: its interest is
    /// then cached from their (empty) subscriber.
    pub fn install_global() -> Capture {
        static GLOBAL: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let capture = Capture::default();
                tracing::subscriber::set_global_default(capture.clone())
                    .expect("no other global subscriber in this test binary");
                capture
            })
            .clone()
    }

    /// Forgets what was written down.
    pub fn clear(&self) {
        self.text.lock().expect("capture lock").clear();
    }

    /// Everything written down so far.
    pub fn text(&self) -> String {
        self.text.lock().expect("capture lock").clone()
    }

    fn write(&self, line: String) {
        let mut text = self.text.lock().expect("capture lock");
        text.push_str(&line);
        text.push('\n');
    }
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let _ = write!(self.0, " {}={value} ({value:?})", field.name());
    }
}

impl Subscriber for Capture {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::always()
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut line = format!(
            "span {} {}",
            span.metadata().target(),
            span.metadata().name()
        );
        span.record(&mut Fields(&mut line));
        self.write(line);
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut line = format!("record {}", span.into_u64());
        values.record(&mut Fields(&mut line));
        self.write(line);
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut line = format!("event {} {}", meta.level(), meta.target());
        event.record(&mut Fields(&mut line));
        self.write(line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
