//! Blocked inputs on PostgreSQL: owns the `blocked_inputs` table — writing the workers' reports
//! ([`Store::report_blocked`](crate::store::Store::report_blocked)), forgetting reaped owners'
//! reports (called from the reaper's transaction in `liveness.rs`), and listing them for
//! operators ([`Inspect::blocked_inputs`](crate::store::Inspect::blocked_inputs)).
//!
//! Times are the server's clock (`effects_now_ms()`). Reports of one (owner, consumer, topic)
//! take turns on a transaction-scoped advisory lock of their own (the class
//! [`BLOCKED_LOCK_CLASS`]), so that two reports in flight at once leave one or the other, never
//! a mix. `text` cannot hold NUL: every text is written with NUL as `\u{0}`.

use deadpool_postgres::Transaction;

use super::db::{BLOCKED_LOCK_CLASS, execute, query, query_one};
use super::store::{get, to_u32};
use crate::store::{BlockedInputEntry, BlockedRow, Millis, StoreError, nul_escaped};

/// Replaces the rows of (`owner`, `consumer`, `topic`) with `rows`, in the caller's write
/// transaction.
pub(crate) async fn report_tx(
    tx: &Transaction<'_>,
    owner: &str,
    consumer: &str,
    topic: &str,
    rows: &[BlockedRow],
) -> Result<(), StoreError> {
    const OP: &str = "reporting blocked inputs";
    let (owner, consumer, topic) = (
        nul_escaped(owner),
        nul_escaped(consumer),
        nul_escaped(topic),
    );
    let (owner, consumer, topic) = (owner.as_ref(), consumer.as_ref(), topic.as_ref());
    // The turn of this (owner, consumer, topic), and the time, in one round trip.
    let row = query_one(
        tx,
        OP,
        "SELECT effects_now_ms() FROM (SELECT pg_advisory_xact_lock($1, \
         hashtext($2::text || chr(31) || $3::text || chr(31) || $4::text))) AS turn",
        &[&BLOCKED_LOCK_CLASS, &owner, &consumer, &topic],
    )
    .await?;
    let now: Millis = get(&row, 0, &|| "the clock".to_owned())?;
    execute(
        tx,
        OP,
        "DELETE FROM blocked_inputs WHERE owner = $1 AND consumer = $2 AND topic = $3",
        &[&owner, &consumer, &topic],
    )
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let positions: Vec<i32> = rows.iter().map(|r| r.position).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.partition_key.as_deref()).collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
    let since: Vec<Millis> = rows
        .iter()
        .map(|r| now.saturating_sub(r.failing_for))
        .collect();
    let attempts: Vec<i64> = rows.iter().map(|r| r.attempts).collect();
    let reasons: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
    execute(
        tx,
        OP,
        "INSERT INTO blocked_inputs (owner, consumer, topic, position, partition_key, \
         message_id, since_ms, attempts, reason, reported_at_ms) \
         SELECT $1::text, $2::text, $3::text, b.position, b.partition_key, b.message_id, \
         b.since_ms, b.attempts, b.reason, $4::bigint \
         FROM unnest($5::integer[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], \
         $10::text[]) AS b(position, partition_key, message_id, since_ms, attempts, reason)",
        &[
            &owner, &consumer, &topic, &now, &positions, &keys, &ids, &since, &attempts, &reasons,
        ],
    )
    .await?;
    Ok(())
}

/// Deletes the reports of `owners`, in the reaper's write transaction.
pub(crate) async fn forget_owners_tx(
    tx: &Transaction<'_>,
    owners: &[String],
) -> Result<u64, StoreError> {
    let owners: Vec<String> = owners.iter().map(|o| nul_escaped(o).into_owned()).collect();
    execute(
        tx,
        "reaping dead owners",
        "DELETE FROM blocked_inputs WHERE owner = ANY($1)",
        &[&owners],
    )
    .await
}

/// The reported inputs, longest failing first, at most `limit`.
pub(crate) async fn list(
    tx: &Transaction<'_>,
    limit: i64,
) -> Result<Vec<BlockedInputEntry>, StoreError> {
    let rows = query(
        tx,
        "reading blocked inputs",
        "SELECT consumer, topic, partition_key, message_id, since_ms, attempts, reason, owner, \
         reported_at_ms FROM blocked_inputs \
         ORDER BY since_ms, consumer, topic, owner, position LIMIT $1",
        &[&limit],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let what = || "a blocked input".to_owned();
            let message_id: String = get(row, 3, &what)?;
            let attempts: i64 = get(row, 5, &what)?;
            Ok(BlockedInputEntry {
                consumer: get(row, 0, &what)?,
                topic: get(row, 1, &what)?,
                partition_key: get(row, 2, &what)?,
                since: get(row, 4, &what)?,
                attempts: to_u32(
                    attempts,
                    &format!("blocked input `{message_id}`"),
                    "attempts",
                )?,
                reason: get(row, 6, &what)?,
                owner: get(row, 7, &what)?,
                reported_at: get(row, 8, &what)?,
                message_id,
            })
        })
        .collect()
}
