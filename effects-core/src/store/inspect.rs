//! [`Inspect`]: operator reads and actions on a store, and the types they return.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{
    Entity, HistoryDatom, Millis, OutboxKind, OutboxRow, PruneOlderThan, PruneReport,
    RequestOutcome, RunRecord, StoreError, Tx,
};
use crate::datom::LookupRef;

/// Which runs to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Not done: requests or messages still to send ([`RunStatus::RequestsPending`](super::RunStatus::RequestsPending),
    /// [`RunStatus::MessagesPending`](super::RunStatus::MessagesPending)).
    Pending,
    /// With at least one dead-lettered outbox row, whatever its status.
    DeadLettered,
    /// [`RunStatus::Done`](super::RunStatus::Done).
    Done,
}

impl RunState {
    /// `pending`, `dead-lettered` or `done`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::DeadLettered => "dead-lettered",
            RunState::Done => "done",
        }
    }
}

impl FromStr for RunState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(RunState::Pending),
            "dead-lettered" => Ok(RunState::DeadLettered),
            "done" => Ok(RunState::Done),
            other => Err(format!(
                "unknown run state `{other}`: expected pending, dead-lettered or done"
            )),
        }
    }
}

/// A query for [`Inspect::runs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunQuery {
    /// Only runs in this state; `None`: every run.
    pub state: Option<RunState>,
    /// Only runs applied at or after this time (the store's clock).
    pub since: Option<Millis>,
    /// At most this many, newest first.
    pub limit: usize,
}

impl Default for RunQuery {
    fn default() -> Self {
        RunQuery {
            state: None,
            since: None,
            limit: 100,
        }
    }
}

/// A run with the counts of its outbox rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    /// The run.
    pub run: RunRecord,
    /// Outbox rows dispatched (messages acknowledged, requests answered).
    pub dispatched: u32,
    /// Outbox rows still pending.
    pub pending: u32,
    /// Outbox rows dead-lettered.
    pub dead_lettered: u32,
}

/// A request's outcome as recorded, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedOutcome {
    /// The outcome.
    pub outcome: RequestOutcome,
    /// When it was recorded.
    pub recorded_at: Millis,
}

/// An outbox row as an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The row.
    pub row: OutboxRow,
    /// Whether its turn has come: `false` for a message that waits for its run's requests.
    pub ready: bool,
    /// When it was written.
    pub created_at: Millis,
    /// For a request: its recorded outcome, if it has one.
    pub recorded: Option<RecordedOutcome>,
    /// Operators' retries of this row, oldest first.
    pub retries: Vec<RetryRecord>,
}

/// A run with everything it wrote and sent: [`Inspect::run_detail`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDetail {
    /// The run.
    pub run: RunRecord,
    /// The datoms its transaction wrote to the history, in order.
    pub datoms: Vec<HistoryDatom>,
    /// Its outbox rows (requests, then messages), in `seq` order; pruned rows are gone.
    pub outbox: Vec<OutboxEntry>,
}

/// A message a worker's consumer dead-lettered, as kept by the store's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputDeadLetter {
    /// The consumer (group) that gave up on it.
    pub consumer: String,
    /// The topic.
    pub topic: String,
    /// Its position in the topic.
    pub sequence: u64,
    /// Its message id.
    pub message_id: String,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Why.
    pub reason: String,
    /// How many times it had been delivered.
    pub deliveries: u32,
    /// When it was dead-lettered.
    pub dead_lettered_at: Millis,
}

/// A dead letter: an outbox row (request or message) or an input message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadLetterEntry {
    /// A request or message of a run that will not be dispatched.
    Outbox(Box<OutboxEntry>),
    /// An input message a consumer gave up on.
    Input(InputDeadLetter),
}

impl DeadLetterEntry {
    /// Its id, for [`Inspect::retry_dead_letter`].
    pub fn id(&self) -> DeadLetterId {
        match self {
            DeadLetterEntry::Outbox(e) => DeadLetterId::Outbox(e.row.id.clone()),
            DeadLetterEntry::Input(d) => DeadLetterId::Input {
                consumer: d.consumer.clone(),
                sequence: d.sequence,
            },
        }
    }

    /// What it is.
    pub fn kind(&self) -> DeadLetterKind {
        match self {
            DeadLetterEntry::Outbox(e) => match e.row.kind {
                OutboxKind::Request => DeadLetterKind::Request,
                OutboxKind::Message => DeadLetterKind::Message,
            },
            DeadLetterEntry::Input(_) => DeadLetterKind::Input,
        }
    }

    /// Why it was dead-lettered.
    pub fn reason(&self) -> &str {
        match self {
            DeadLetterEntry::Outbox(e) => e.row.dead_lettered.as_deref().unwrap_or_default(),
            DeadLetterEntry::Input(d) => &d.reason,
        }
    }
}

/// What a dead letter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// An outbox request.
    Request,
    /// An outbox message.
    Message,
    /// An input message of a consumer.
    Input,
}

impl DeadLetterKind {
    /// `request`, `message` or `input`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Request => "request",
            DeadLetterKind::Message => "message",
            DeadLetterKind::Input => "input",
        }
    }

    /// Parses [`DeadLetterKind::as_str`].
    pub fn parse(s: &str) -> Option<DeadLetterKind> {
        match s {
            "request" => Some(DeadLetterKind::Request),
            "message" => Some(DeadLetterKind::Message),
            "input" => Some(DeadLetterKind::Input),
            _ => None,
        }
    }
}

/// Names a dead letter.
///
/// Written as the outbox row's id (`key#n`) for an outbox row, and as `input:SEQUENCE:CONSUMER`
/// for an input message. An outbox id that itself starts with `input:` and a number is written
/// `outbox:` followed by the id.
///
/// ```
/// use effects_core::store::DeadLetterId;
///
/// let row: DeadLetterId = "block:cards:m1#0".parse().unwrap();
/// assert_eq!(row, DeadLetterId::Outbox("block:cards:m1#0".into()));
/// let input: DeadLetterId = "input:3:block".parse().unwrap();
/// assert_eq!(input, DeadLetterId::Input { consumer: "block".into(), sequence: 3 });
/// assert_eq!(input.to_string(), "input:3:block");
/// let odd = DeadLetterId::Outbox("input:3:x#0".into());
/// assert_eq!(odd.to_string().parse::<DeadLetterId>().unwrap(), odd);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterId {
    /// An outbox row, by id.
    Outbox(String),
    /// An input message, by consumer and position.
    Input {
        /// The consumer.
        consumer: String,
        /// The message's position.
        sequence: u64,
    },
}

impl DeadLetterId {
    fn parse_input(s: &str) -> Option<(u64, &str)> {
        let rest = s.strip_prefix("input:")?;
        let (sequence, consumer) = rest.split_once(':')?;
        if sequence.is_empty() || !sequence.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((sequence.parse().ok()?, consumer))
    }
}

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterId::Outbox(id) if id.starts_with("outbox:") => write!(f, "outbox:{id}"),
            DeadLetterId::Outbox(id) if DeadLetterId::parse_input(id).is_some() => {
                write!(f, "outbox:{id}")
            }
            DeadLetterId::Outbox(id) => f.write_str(id),
            DeadLetterId::Input { consumer, sequence } => write!(f, "input:{sequence}:{consumer}"),
        }
    }
}

impl FromStr for DeadLetterId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(
                "a dead letter id is not empty: `key#n` or `input:SEQUENCE:CONSUMER`".into(),
            );
        }
        if let Some(id) = s.strip_prefix("outbox:") {
            return Ok(DeadLetterId::Outbox(id.to_owned()));
        }
        if let Some((sequence, consumer)) = DeadLetterId::parse_input(s) {
            if consumer.is_empty() {
                return Err(format!(
                    "`{s}` names no consumer: `input:SEQUENCE:CONSUMER`"
                ));
            }
            return Ok(DeadLetterId::Input {
                consumer: consumer.to_owned(),
                sequence,
            });
        }
        if s.starts_with("input:") {
            return Err(format!(
                "`{s}` is not `input:SEQUENCE:CONSUMER`; for an outbox row whose id starts with \
                 `input:`, write `outbox:{s}`"
            ));
        }
        Ok(DeadLetterId::Outbox(s.to_owned()))
    }
}

/// Who retries, and why: recorded with the retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRequest {
    /// Who asks (a person's or a tool's name).
    pub operator: String,
    /// Why.
    pub reason: String,
}

/// A recorded retry of a dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRecord {
    /// Its number, increasing.
    pub id: i64,
    /// What was retried.
    pub kind: DeadLetterKind,
    /// The dead letter's id, as [`DeadLetterId`] writes it.
    pub target: String,
    /// The run, for an outbox row.
    pub run_key: Option<String>,
    /// Why it had been dead-lettered.
    pub dead_letter_reason: String,
    /// Attempts (outbox) or deliveries (input) before the retry.
    pub attempts: u32,
    /// For a request: the outcome recorded before the retry, set aside by it.
    pub previous_outcome: Option<RequestOutcome>,
    /// Who asked.
    pub operator: String,
    /// Why.
    pub reason: String,
    /// When (the store's clock).
    pub retried_at: Millis,
}

/// What [`Inspect::retry_dead_letter`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// It will be sent again; this is the record.
    Retried(RetryRecord),
    /// No dead letter has this id.
    NotFound,
    /// It exists but is not dead-lettered (pending, dispatched, or retried already).
    NotDeadLettered,
    /// Retrying it would contradict what was done since: nothing changed.
    Refused {
        /// Why.
        reason: String,
    },
}

/// An entity as of a transaction, with its history up to it: [`Inspect::entity_history`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityHistory {
    /// The entity as of the transaction (`None`: it did not exist yet).
    pub entity: Option<Entity>,
    /// Every effective change of its attributes at or before that transaction, oldest first.
    pub datoms: Vec<HistoryDatom>,
}

/// How far a consumer of the store's log is behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerLag {
    /// The consumer (group).
    pub consumer: String,
    /// The topic.
    pub topic: String,
    /// Messages it has not acknowledged.
    pub unacknowledged: u64,
    /// When the oldest of them was published.
    pub oldest_published_at: Option<Millis>,
}

/// An input a worker reported as blocked ([`Store::report_blocked`](super::Store::report_blocked)):
/// its processing has been failing for longer than the worker's
/// `WorkerConfig::blocked_after`, and the later inputs of its partition key wait behind it.
/// [`Inspect::blocked_inputs`] lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedInputEntry {
    /// The consumer (group) whose worker holds it.
    pub consumer: String,
    /// The topic.
    pub topic: String,
    /// The partition key it holds up (`None`: a message without one, which holds up nothing
    /// but itself).
    pub partition_key: Option<String>,
    /// The message's id.
    pub message_id: String,
    /// Since when it has been failing (the store's clock when the worker last reported, less
    /// how long the worker had seen it failing).
    pub since: Millis,
    /// Attempts made (deliveries by the broker and retries in the worker), as last reported.
    pub attempts: u32,
    /// The last failure, as last reported (a NUL character is written `\u{0}`).
    pub reason: String,
    /// The owner (an executor's owner name: which process) that reported it.
    pub owner: String,
    /// When that owner last reported it (the store's clock). A worker reports on every
    /// heartbeat (a third of its `WorkerConfig::visibility`), so an old time means a worker
    /// that stopped without saying its inputs are no longer blocked, in a process still alive
    /// (a dead one's reports are removed when it is reaped).
    pub reported_at: Millis,
}

/// What a store has left to do, for gauges and health checks: [`Inspect::backlog`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BacklogReport {
    /// The store's clock when measured.
    pub now: Millis,
    /// Outbox rows neither dispatched nor dead-lettered.
    pub pending_rows: u64,
    /// When the oldest of them was written.
    pub oldest_pending_at: Option<Millis>,
    /// Dead-lettered outbox rows.
    pub dead_lettered_rows: u64,
    /// Dead-lettered input messages.
    pub dead_lettered_inputs: u64,
    /// Runs not done.
    pub open_runs: u64,
    /// Inputs the workers reported as blocked ([`Inspect::blocked_inputs`]).
    pub blocked_inputs: u64,
    /// Since when the longest failing of them has been failing.
    pub oldest_blocked_since: Option<Millis>,
    /// The consumers of the store's own log (empty for a store without one).
    pub consumers: Vec<ConsumerLag>,
}

/// What an operator reads and does that the executor never needs: runs by status and time, a
/// run with everything it wrote and sent, the outbox rows still pending, the dead letters, an
/// entity's history, what pruning would remove, and retrying a dead letter.
///
/// [`Inspect`] is a trait of its own, beside [`Store`](super::Store), so that the executor's
/// seam stays as small as its algorithm needs. Every store implements both; the `effects` CLI
/// is written against `Store + Inspect` and works on any of them. Its types carry no SQL: times
/// are [`Millis`] of the store's clock, values are JSON.
///
/// # Retrying a dead letter
///
/// A retry sends a dead letter again **under the same key**, and records who asked, when and
/// why ([`RetryRecord`]); the dead letter as it was (its reason, its attempts, the outcome it had
/// recorded) is kept in that record. What "again" means depends on what was dead-lettered:
///
/// - **A request** (an outbox row rejected with a 4xx, or failed for good): its recorded outcome
///   is set aside, the row is pending again with its attempts reset, and the relay sends it once
///   more with the same `Idempotency-Key: key#n` and records the new outcome. Its run goes back
///   to [`RunStatus::RequestsPending`](super::RunStatus::RequestsPending) until it is recorded, then completes again.
///   **Refused** when the run has an after-requests hook that already ran
///   ([`RetryOutcome::Refused`]): the hook decided from the recorded outcome and its messages are
///   out; a second outcome would contradict them. Run new effects under a new key instead.
///   A server that stores the outcome of an idempotency key answers a retry with the same
///   rejection.
/// - **A message** (an outbox row whose publishing failed too often): the row is pending again
///   with its attempts reset, and the relay publishes it with the same message id `key#n`;
///   consumers that deduplicate by id see it once. Its run is open again until it is published.
/// - **An input** (a message a worker's consumer dead-lettered: undecodable, a missing entity,
///   a handler panic, too many conflicts): it is delivered again **to that consumer only**, with
///   its message id, so the worker derives the same idempotency key; if a run with that key
///   exists by then, the delivery is a duplicate and nothing is applied twice. Other consumers of
///   the topic do not see it again. The dead letter is removed from the list (its content stays
///   in the retry record); if the worker fails again, it is dead-lettered again.
///
/// A retry changes nothing for a row that is not dead-lettered (any more):
/// [`RetryOutcome::NotDeadLettered`]. Retrying is one store transaction.
///
/// # Contract
///
/// Every method is one read snapshot or one write transaction. Limits cap how many items come
/// back; lists are ordered as documented, so a limit keeps the first ones.
pub trait Inspect: Send + Sync + 'static {
    /// The store's clock: the time every [`Millis`] it returns is measured against.
    fn clock(&self) -> impl Future<Output = Result<Millis, StoreError>> + Send;

    /// Runs matching `query`, newest (highest `tx`) first, at most `query.limit`.
    fn runs(
        &self,
        query: RunQuery,
    ) -> impl Future<Output = Result<Vec<RunSummary>, StoreError>> + Send;

    /// The run with this key: its record, the datoms its transaction wrote (from the history),
    /// and its outbox rows with their recorded outcomes and retries. `None` if there is no such
    /// run (never applied, or pruned).
    fn run_detail(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<RunDetail>, StoreError>> + Send;

    /// Outbox rows neither dispatched nor dead-lettered, oldest first, at most `limit`.
    fn pending(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send;

    /// Dead letters, oldest first by the order they were written: outbox rows (requests and
    /// messages), then input messages, at most `limit` in all.
    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, StoreError>> + Send;

    /// An entity as of `as_of` (now with `None`) and the history of its attributes up to it.
    /// `None` if the store never held it.
    fn entity_history(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<EntityHistory>, StoreError>> + Send;

    /// What [`Store::prune`](super::Store::prune) with these ages would remove now, removing
    /// nothing.
    fn prune_preview(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send;

    /// What is left to do: pending and dead-lettered rows, open runs, blocked inputs,
    /// consumers' lag.
    fn backlog(&self) -> impl Future<Output = Result<BacklogReport, StoreError>> + Send;

    /// Retries a dead letter (see [Retrying a dead letter](Inspect#retrying-a-dead-letter)) and
    /// records who asked and why, in one transaction.
    fn retry_dead_letter(
        &self,
        id: &DeadLetterId,
        request: &RetryRequest,
    ) -> impl Future<Output = Result<RetryOutcome, StoreError>> + Send;

    /// The inputs workers reported as blocked
    /// ([`Store::report_blocked`](super::Store::report_blocked)), longest failing first (by
    /// [`BlockedInputEntry::since`]), at most `limit`.
    fn blocked_inputs(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<BlockedInputEntry>, StoreError>> + Send;

    /// Every recorded retry, oldest first, at most `limit`.
    fn retries(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RetryRecord>, StoreError>> + Send;
}
