//! Shared helpers of the executor, worker and reliability tests: real SQLite files under the
//! target's tmp dir, raw SQL to inspect them, a real HTTP server (wiremock) on loopback, and a
//! hand-written handler for the cards domain.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use effects_core::http::{HttpConfig, ReqwestClient, RetryPolicy};
use effects_core::{Effects, Handler, HandlerDescriptor};

/// A fresh directory for one test's database files.
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "effects-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

/// One integer from a raw SQL query on the database file.
pub fn sql_i64(path: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open the database file");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn.query_row(sql, [], |r| r.get(0)).expect("query")
}

/// Raw SQL statements on the database file (fault injection by triggers, ...).
pub fn sql_exec(path: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(path).expect("open the database file");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn.execute_batch(sql).expect("execute");
}

/// A reqwest client with one endpoint, `notify`, at `base`, and fast retries.
pub fn http_client(base: &str, attempts: u32) -> ReqwestClient {
    let config = HttpConfig::new()
        .with_endpoint("notify", base)
        .expect("endpoint")
        .with_attempt_timeout(Duration::from_secs(5))
        .with_retry(RetryPolicy {
            max_attempts: attempts,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            jitter: false,
        })
        .expect("retry policy");
    ReqwestClient::new(config).expect("client")
}

/// The `block` handler of the cards domain, written by hand (the macro is not needed to test
/// the worker). Counts its calls.
#[derive(Debug, Default)]
pub struct BlockHandler {
    pub calls: AtomicUsize,
}

impl Handler for BlockHandler {
    type Input = cards::Card;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "block",
        topic: Some("cards-to-block"),
        key: None,
        input: "Card",
        schemas: &[],
    };

    fn handle(&self, card: cards::Card) -> Effects {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !card.can_block() {
            return Effects::new();
        }
        let blocked = card.block();
        cards::BlockCard::builder()
            .blocked_card(cards::BlockedCard::from(&blocked))
            .status_changed(cards::StatusChanged::from(&blocked))
            .build()
            .into()
    }
}

/// A card as effects: the datom that creates it.
pub fn card_datoms(id: &str, customer: &str, status: &str) -> Effects {
    use effects_core::{DatomEffect, LookupRef};
    use serde_json::json;
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id),
        [
            ("card/customer_id", json!(customer)),
            ("card/status", json!(status)),
        ],
    ))
}

/// Waits (bounded) until `check` holds, polling every 10 ms; panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A private directory for one test, removed when the test passes and kept (its path printed)
/// when it fails, for inspection.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// A fresh directory under the target's tmp dir.
    pub fn new(name: &str) -> PrivateDir {
        PrivateDir {
            path: temp_dir(name),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
