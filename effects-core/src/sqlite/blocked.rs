//! Blocked inputs on SQLite: owns the `blocked_inputs` table — writing the workers' reports
//! ([`Store::report_blocked`](crate::store::Store::report_blocked)), forgetting a reaped owner's
//! reports (called from the reaper's transaction in `liveness.rs`), and listing them for
//! operators ([`Inspect::blocked_inputs`](crate::store::Inspect::blocked_inputs)).
//!
//! Times are the store's clock (`clock.rs`): a report's `since` is the store's time when it is
//! written, less how long the worker had seen the input failing.

use rusqlite::{Connection, Transaction, params};

use super::db::Ctx;
use crate::store::{BlockedInputEntry, BlockedRow, Millis, StoreError, nul_escaped};

/// Replaces the rows of (`owner`, `consumer`, `topic`) with `rows`, in the caller's write
/// transaction, at the store's time `now`.
pub(crate) fn report_tx(
    tx: &Transaction<'_>,
    owner: &str,
    consumer: &str,
    topic: &str,
    rows: &[BlockedRow],
    now: Millis,
) -> Result<(), StoreError> {
    const OP: &str = "reporting blocked inputs";
    let (owner, consumer, topic) = (
        nul_escaped(owner),
        nul_escaped(consumer),
        nul_escaped(topic),
    );
    tx.prepare_cached(
        "DELETE FROM blocked_inputs WHERE owner = ?1 AND consumer = ?2 AND topic = ?3",
    )
    .ctx(OP)?
    .execute(params![owner, consumer, topic])
    .ctx(OP)?;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO blocked_inputs (owner, consumer, topic, position, partition_key, \
             message_id, since_ms, attempts, reason, reported_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .ctx(OP)?;
    for row in rows {
        insert
            .execute(params![
                owner,
                consumer,
                topic,
                row.position,
                row.partition_key,
                row.message_id,
                now.saturating_sub(row.failing_for),
                row.attempts,
                row.reason,
                now,
            ])
            .ctx(OP)?;
    }
    Ok(())
}

/// Deletes the reports of `owner`, in the reaper's write transaction.
pub(crate) fn forget_owner_tx(tx: &Transaction<'_>, owner: &str) -> Result<u64, StoreError> {
    const OP: &str = "reaping dead owners";
    let n = tx
        .prepare_cached("DELETE FROM blocked_inputs WHERE owner = ?1")
        .ctx(OP)?
        .execute([nul_escaped(owner)])
        .ctx(OP)?;
    Ok(n as u64)
}

/// The reported inputs, longest failing first, at most `limit`.
pub(crate) fn list(conn: &Connection, limit: i64) -> Result<Vec<BlockedInputEntry>, StoreError> {
    const OP: &str = "reading blocked inputs";
    type Raw = (
        String,
        String,
        Option<String>,
        String,
        i64,
        i64,
        String,
        String,
        i64,
    );
    let raw: Vec<Raw> = conn
        .prepare_cached(
            "SELECT consumer, topic, partition_key, message_id, since_ms, attempts, reason, \
             owner, reported_at_ms FROM blocked_inputs \
             ORDER BY since_ms, consumer, topic, owner, position LIMIT ?1",
        )
        .ctx(OP)?
        .query_map([limit], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            ))
        })
        .ctx(OP)?
        .collect::<rusqlite::Result<_>>()
        .ctx(OP)?;
    raw.into_iter()
        .map(
            |(consumer, topic, partition_key, message_id, since, attempts, reason, owner, at)| {
                let attempts = u32::try_from(attempts).map_err(|_| StoreError::Corrupt {
                    what: format!("blocked input `{message_id}` of consumer `{consumer}`"),
                    reason: format!("`attempts` is {attempts}"),
                })?;
                Ok(BlockedInputEntry {
                    consumer,
                    topic,
                    partition_key,
                    message_id,
                    since,
                    attempts,
                    reason,
                    owner,
                    reported_at: at,
                })
            },
        )
        .collect()
}
