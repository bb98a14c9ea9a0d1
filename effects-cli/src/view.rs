//! What `--json` prints: one serde view per thing shown. Times are milliseconds since the UNIX
//! epoch by the store's clock (`*_at` fields); payloads and bodies are JSON when they are JSON.

use std::collections::BTreeMap;

use effects_core::store::{
    BlockedInputEntry, DeadLetterEntry, EntityHistory, OutboxEntry, RecordedOutcome, RetryRecord,
    RunRecord, RunSummary,
};
use serde::Serialize;
use serde_json::Value;

/// A payload as JSON when it parses, as a string otherwise.
pub(crate) fn payload_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[derive(Serialize)]
pub(crate) struct RunView {
    key: String,
    status: &'static str,
    tx: i64,
    effects_sha256: String,
    after_requests: Option<String>,
    outbox_rows: u32,
    created_at: i64,
    updated_at: i64,
    completed_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dispatched: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_lettered: Option<u32>,
}

impl RunView {
    pub(crate) fn of(run: &RunRecord) -> RunView {
        RunView {
            key: run.key.clone(),
            status: run.status.as_str(),
            tx: run.tx.0,
            effects_sha256: run.effects_sha256.clone(),
            after_requests: run.after_requests.clone(),
            outbox_rows: run.outbox_count,
            created_at: run.created_at,
            updated_at: run.updated_at,
            completed_at: run.completed_at,
            dispatched: None,
            pending: None,
            dead_lettered: None,
        }
    }

    pub(crate) fn summary(summary: &RunSummary) -> RunView {
        RunView {
            dispatched: Some(summary.dispatched),
            pending: Some(summary.pending),
            dead_lettered: Some(summary.dead_lettered),
            ..RunView::of(&summary.run)
        }
    }
}

#[derive(Serialize)]
pub(crate) struct DatomView {
    tx: i64,
    run_key: String,
    entity: String,
    attribute: String,
    op: &'static str,
    value: Value,
}

impl DatomView {
    pub(crate) fn of(d: &effects_core::store::HistoryDatom) -> DatomView {
        DatomView {
            tx: d.tx.0,
            run_key: d.run_key.clone(),
            entity: d.entity.to_string(),
            attribute: d.attribute.clone(),
            op: op_name(d.op),
            value: d.value.clone(),
        }
    }
}

pub(crate) fn op_name(op: effects_core::Op) -> &'static str {
    match op {
        effects_core::Op::Assert => "assert",
        effects_core::Op::Retract => "retract",
    }
}

#[derive(Serialize)]
pub(crate) struct RecordedView {
    #[serde(flatten)]
    outcome: Value,
    recorded_at: i64,
}

impl RecordedView {
    fn of(r: &RecordedOutcome) -> RecordedView {
        RecordedView {
            outcome: serde_json::to_value(&r.outcome).unwrap_or(Value::Null),
            recorded_at: r.recorded_at,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct OutboxView {
    id: String,
    run_key: String,
    seq: u32,
    kind: &'static str,
    destination: String,
    partition_key: Option<String>,
    headers: BTreeMap<String, String>,
    payload: Value,
    tx: i64,
    ready: bool,
    attempts: u32,
    created_at: i64,
    next_attempt_at: i64,
    last_error: Option<String>,
    dispatched_at: Option<i64>,
    dead_lettered: Option<String>,
    lease_owner: Option<String>,
    lease_until: Option<i64>,
    recorded: Option<RecordedView>,
    retries: Vec<RetryRecord>,
}

impl OutboxView {
    pub(crate) fn of(e: &OutboxEntry) -> OutboxView {
        let row = &e.row;
        OutboxView {
            id: row.id.clone(),
            run_key: row.run_key.clone(),
            seq: row.seq,
            kind: row.kind.as_str(),
            destination: row.destination.clone(),
            partition_key: row.partition_key.clone(),
            headers: row.headers.clone(),
            payload: payload_value(row.payload.as_bytes()),
            tx: row.tx.0,
            ready: e.ready,
            attempts: row.attempts,
            created_at: e.created_at,
            next_attempt_at: row.next_attempt_at,
            last_error: row.last_error.clone(),
            dispatched_at: row.dispatched_at,
            dead_lettered: row.dead_lettered.clone(),
            lease_owner: row.lease.as_ref().map(|l| l.owner.clone()),
            lease_until: row.lease_until,
            recorded: e.recorded.as_ref().map(RecordedView::of),
            retries: e.retries.clone(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct RunDetailView {
    pub(crate) run: RunView,
    pub(crate) datoms: Vec<DatomView>,
    pub(crate) requests: Vec<OutboxView>,
    pub(crate) messages: Vec<OutboxView>,
}

#[derive(Serialize)]
pub(crate) struct DeadLetterView {
    id: String,
    kind: &'static str,
    reason: String,
    run_key: Option<String>,
    consumer: Option<String>,
    destination: String,
    message_id: Option<String>,
    attempts: u32,
    dead_lettered_at: Option<i64>,
    payload: Value,
}

impl DeadLetterView {
    pub(crate) fn of(d: &DeadLetterEntry) -> DeadLetterView {
        match d {
            DeadLetterEntry::Outbox(e) => DeadLetterView {
                id: d.id().to_string(),
                kind: d.kind().as_str(),
                reason: d.reason().to_owned(),
                run_key: Some(e.row.run_key.clone()),
                consumer: None,
                destination: e.row.destination.clone(),
                message_id: None,
                attempts: e.row.attempts,
                dead_lettered_at: e.recorded.as_ref().map(|r| r.recorded_at),
                payload: payload_value(e.row.payload.as_bytes()),
            },
            DeadLetterEntry::Input(i) => DeadLetterView {
                id: d.id().to_string(),
                kind: d.kind().as_str(),
                reason: i.reason.clone(),
                run_key: None,
                consumer: Some(i.consumer.clone()),
                destination: i.topic.clone(),
                message_id: Some(i.message_id.clone()),
                attempts: i.deliveries,
                dead_lettered_at: Some(i.dead_lettered_at),
                payload: payload_value(&i.payload),
            },
        }
    }
}

#[derive(Serialize)]
pub(crate) struct BlockedInputView {
    consumer: String,
    topic: String,
    partition_key: Option<String>,
    message_id: String,
    failing_since_at: i64,
    failing_for_ms: i64,
    attempts: u32,
    reason: String,
    owner: String,
    reported_at: i64,
}

impl BlockedInputView {
    /// The entry, with how long it has been failing at `now` (the store's clock).
    pub(crate) fn of(b: &BlockedInputEntry, now: i64) -> BlockedInputView {
        BlockedInputView {
            consumer: b.consumer.clone(),
            topic: b.topic.clone(),
            partition_key: b.partition_key.clone(),
            message_id: b.message_id.clone(),
            failing_since_at: b.since,
            failing_for_ms: now.saturating_sub(b.since).max(0),
            attempts: b.attempts,
            reason: b.reason.clone(),
            owner: b.owner.clone(),
            reported_at: b.reported_at,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct HistoryView {
    entity: String,
    as_of: Option<i64>,
    exists: bool,
    tx: Option<i64>,
    attributes: BTreeMap<String, Value>,
    history: Vec<DatomView>,
}

impl HistoryView {
    pub(crate) fn of(entity: String, as_of: Option<i64>, h: &EntityHistory) -> HistoryView {
        HistoryView {
            entity,
            as_of,
            exists: h.entity.is_some(),
            tx: h.entity.as_ref().map(|e| e.tx.0),
            attributes: h
                .entity
                .as_ref()
                .map(|e| e.attributes.clone())
                .unwrap_or_default(),
            history: h.datoms.iter().map(DatomView::of).collect(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct PruneView {
    pub(crate) dry_run: bool,
    pub(crate) outbox_rows: u64,
    pub(crate) runs: u64,
    pub(crate) log_messages: u64,
}

#[derive(Serialize)]
pub(crate) struct RetryView {
    pub(crate) id: String,
    pub(crate) outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) record: Option<RetryRecord>,
}
