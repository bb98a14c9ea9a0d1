//! Figures counted at the source, read from the real database files and a real HTTP server:
//! transactions per run key (the `transactions` table gets one row per committed run and never
//! deduplicates), distinct message ids per input in the log, HTTP attempts and idempotency keys
//! per path; and a comparison of counts with what is expected that lists every difference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;

/// Opens a database file for counting.
pub fn open(db: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// One integer from a query.
pub fn sql_i64(db: &Path, sql: &str) -> rusqlite::Result<i64> {
    open(db)?.query_row(sql, [], |r| r.get(0))
}

/// Committed transactions per run key. A run of the `SkipDuplicateCheck` mutant is stored
/// under `<key>~<suffix>`; it is counted under `<key>`, the key it was run with.
pub fn transactions_per_key(db: &Path) -> rusqlite::Result<BTreeMap<String, usize>> {
    let conn = open(db)?;
    let mut stmt = conn.prepare("SELECT run_key FROM transactions")?;
    let keys = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for key in keys {
        let key = key?;
        let key = key.split('~').next().unwrap_or(&key).to_owned();
        *out.entry(key).or_default() += 1;
    }
    Ok(out)
}

/// The distinct message ids of `topic` in the log, grouped by the `id` field of their JSON
/// payload (the transfer they are about). The log keeps one row per message id, so a message
/// published twice under its id counts once here — doubling shows as a second id.
pub fn message_ids_by_transfer(
    db: &Path,
    topic: &str,
) -> rusqlite::Result<BTreeMap<String, BTreeSet<String>>> {
    let conn = open(db)?;
    let mut stmt = conn.prepare("SELECT message_id, payload FROM log_messages WHERE topic = ?1")?;
    let rows = stmt.query_map([topic], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let (id, payload) = row?;
        let transfer = serde_json::from_slice::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
            .unwrap_or_else(|| format!("<unreadable payload of {id}>"));
        out.entry(transfer).or_default().insert(id);
    }
    Ok(out)
}

/// Messages of `topic` the consumer has not acknowledged.
pub fn unacknowledged(db: &Path, consumer: &str, topic: &str) -> rusqlite::Result<i64> {
    open(db)?.query_row(
        "SELECT COUNT(*) FROM log_messages m LEFT JOIN log_deliveries d \
         ON d.consumer = ?1 AND d.topic = m.topic AND d.seq = m.seq \
         WHERE m.topic = ?2 AND d.acked_at_ms IS NULL AND m.seq > COALESCE(\
         (SELECT acked_through FROM log_consumers WHERE consumer = ?1 AND topic = ?2), 0)",
        rusqlite::params![consumer, topic],
        |r| r.get(0),
    )
}

/// Outbox rows neither dispatched nor dead-lettered, and dead-lettered ones.
pub fn outbox_left(db: &Path) -> rusqlite::Result<(i64, i64)> {
    let pending = sql_i64(
        db,
        "SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL",
    )?;
    let dead = sql_i64(
        db,
        "SELECT COUNT(*) FROM outbox WHERE dead_lettered_reason IS NOT NULL",
    )?;
    Ok((pending, dead))
}

/// Outbox rows of one run neither dispatched nor dead-lettered.
pub fn pending_rows_of_run(db: &Path, key: &str) -> rusqlite::Result<i64> {
    open(db)?.query_row(
        "SELECT COUNT(*) FROM outbox WHERE run_key = ?1 AND dispatched_at_ms IS NULL \
         AND dead_lettered_reason IS NULL",
        [key],
        |r| r.get(0),
    )
}

/// HTTP attempts at one path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathAttempts {
    /// Requests received.
    pub attempts: usize,
    /// The distinct `Idempotency-Key` headers they carried.
    pub keys: BTreeSet<String>,
}

/// HTTP attempts by path, as the server received them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpAttempts {
    /// By path.
    pub by_path: BTreeMap<String, PathAttempts>,
}

impl HttpAttempts {
    /// Records one request.
    pub fn record(&mut self, request: &wiremock::Request) {
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
            .to_owned();
        let entry = self
            .by_path
            .entry(request.url.path().to_owned())
            .or_default();
        entry.attempts += 1;
        entry.keys.insert(key);
    }

    /// From the requests a wiremock server recorded.
    pub fn of(requests: &[wiremock::Request]) -> HttpAttempts {
        let mut out = HttpAttempts::default();
        for r in requests {
            out.record(r);
        }
        out
    }

    /// Attempts by path.
    pub fn attempts(&self) -> BTreeMap<String, usize> {
        self.by_path
            .iter()
            .map(|(p, a)| (p.clone(), a.attempts))
            .collect()
    }

    /// Distinct idempotency keys by path.
    pub fn keys(&self) -> BTreeMap<String, usize> {
        self.by_path
            .iter()
            .map(|(p, a)| (p.clone(), a.keys.len()))
            .collect()
    }

    /// Requests received, all paths together.
    pub fn total(&self) -> usize {
        self.by_path.values().map(|a| a.attempts).sum()
    }
}

/// A wiremock responder that counts what it receives (the server's own recording can be off,
/// so a long soak does not keep every request) and answers 200, except that the first attempt
/// at every path whose number is a multiple of `fail_first_every` gets a 503 (retried by the
/// client with the same key).
#[derive(Clone, Debug, Default)]
pub struct CountingResponder {
    /// What was received.
    pub attempts: Arc<Mutex<HttpAttempts>>,
    /// See above; 0: never fail.
    pub fail_first_every: u64,
}

impl wiremock::Respond for CountingResponder {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        attempts.record(request);
        let path = request.url.path();
        let first = attempts.by_path.get(path).is_some_and(|a| a.attempts == 1);
        let chosen = self.fail_first_every > 0
            && super::book::number(path).is_some_and(|n| n % self.fail_first_every == 0);
        if first && chosen {
            wiremock::ResponseTemplate::new(503)
        } else {
            wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true}))
        }
    }
}

/// Compares counts by id with what is expected for each of `ids` (ids not listed are expected
/// 0). Returns one line per difference: `what for id: counted N, expected M`.
pub fn differences<'a>(
    what: &str,
    ids: impl IntoIterator<Item = &'a str>,
    counted: &BTreeMap<String, usize>,
    expected: impl Fn(&str) -> usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut listed = BTreeSet::new();
    for id in ids {
        listed.insert(id.to_owned());
        let n = counted.get(id).copied().unwrap_or(0);
        let e = expected(id);
        if n != e {
            out.push(format!("{what} for {id}: counted {n}, expected {e}"));
        }
    }
    for (id, n) in counted {
        if !listed.contains(id) && *n != 0 {
            out.push(format!("{what} for {id}: counted {n}, expected 0"));
        }
    }
    out
}

/// The number of ids in `counts` whose count is 0 (missing) and above 1 (doubled), among `ids`.
pub fn lost_and_doubled<'a>(
    ids: impl IntoIterator<Item = &'a str>,
    counts: &BTreeMap<String, usize>,
) -> (usize, usize) {
    let (mut lost, mut doubled) = (0, 0);
    for id in ids {
        match counts.get(id).copied().unwrap_or(0) {
            0 => lost += 1,
            1 => {}
            _ => doubled += 1,
        }
    }
    (lost, doubled)
}
