//! The executor: runs [`Effects`] idempotently, in a fixed order, surviving crashes and
//! duplicate deliveries.
//!
//! [`Executor::run`] does, in this order:
//!
//! 1. **Validate** — key, limits on every field and on the whole run ([`Limits`]), datom
//!    conflicts, compare-and-set expectations that cannot all hold, requests to endpoints the
//!    HTTP client does not know or that carry credentials. Invalid effects are an error
//!    ([`RunError::Invalid`]) and nothing is written.
//! 2. **Commit** — ONE store transaction claims the key, checks that what the effects were
//!    computed from still holds ([`RunOptions::reads`], compare-and-set datoms; otherwise
//!    [`RunError::Conflict`] and nothing is written), applies the datoms, writes every request
//!    and message as an outbox row `key#n`, and commits: that is the run's `tx`. The key is bound
//!    to the SHA-256 of [`Effects::canonical_json`]; the same key with other effects is
//!    [`RunError::KeyReuse`] and nothing is applied. If the store fails, nothing was written,
//!    nothing is dispatched and the error is returned.
//! 3. **Requests**, in order, through the [`HttpClient`] with `Idempotency-Key: key#n`. A response
//!    is recorded in the store before the request counts as done. A permanent refusal (4xx other
//!    than 429) or failure is recorded and dead-lettered, never retried; a request that exhausted
//!    the client's retries is retried later (backoff through `next attempt at`), and the run's
//!    later requests and its messages wait for it.
//! 4. **After-requests** — an optional registered pure function of the recorded responses that
//!    returns more messages; they are persisted to the outbox before anything is sent.
//! 5. **Messages**, in order, through the [`Transport`] with message id `key#n` and headers
//!    [`HEADER_KEY`](crate::transport::HEADER_KEY) and [`HEADER_TX`](crate::transport::HEADER_TX);
//!    a row is marked dispatched only after the broker acknowledged it. With the embedded log in
//!    the store's database the messages are written inside the commit of step 2 (or of step 4),
//!    atomically with the datoms.
//!
//! Running a key that was applied before is the **duplicate path**: nothing is applied again and
//! only the original run's rows that are still pending (and not leased by someone working on
//! them) are dispatched, from what was stored — never recomputed. Two tasks running one key at
//! once: the store lets exactly one commit; the other sees the committed run and reports
//! [`RunOutcome::Duplicate`].
//!
//! Work that is interrupted (a crash, a broker that is down, a request that keeps failing) stays
//! in the outbox; the [`Relay`](crate::relay::Relay) picks it up once its process is found dead
//! (see liveness in [`store`](crate::store)) or its lease expires.
//!
//! # Commit, then dispatch
//!
//! [`Executor::run_batch`] is two halves that a caller can also use apart:
//! [`Executor::commit_batch`] commits many runs in one store transaction (steps 1–2 for each)
//! and hands back each run as [`Committed`] (or the reason it was refused);
//! [`Executor::dispatch`] then does steps 3–5 for them. Between the two, a run's requests and
//! messages belong to its outbox, leased to this executor: the worker acknowledges its input
//! there (see [`crate::worker`]), and if the process dies before dispatching, a relay sends them.
//!
//! # Fenced sends
//!
//! A claim leases rows for [`ExecutorConfig::lease`] by the store's clock; the executor notes
//! on its own monotonic clock the instant it *asked* for the claim, so it never believes it
//! holds a row longer than the store does, whatever the wall clocks say. Rows still to be
//! worked on are renewed once a third of the lease has passed (before each request, each wave
//! of messages, and every third of the lease while a request is in flight). Right before a
//! request is sent or a message published, the row's hold is checked: with less than a tenth
//! of the lease left (at most 1 s) — the process was paused, a batch took longer than its
//! lease — the row is renewed first, and if the store says another claimant has it since, it
//! is not sent. A request whose lease is lost while it is in flight is abandoned (no further
//! attempt of the client's retries is made).
//!
//! What the fence cannot close: a pause that begins after the check and before the bytes
//! leave — the check and the write are microseconds apart, plus the HTTP client's connection
//! set-up for a request. A row sent in that window may be sent again by its next claimant under
//! the same id (`Idempotency-Key: key#n`, `Nats-Msg-Id: key#n`), which receivers deduplicate.

mod dispatch;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{Instrument, field, info_span};

pub use self::validate::{Limits, ValidationError, effects_sha256};

use self::dispatch::Holds;

use crate::effects::Effects;
use crate::http::{HttpClient, HttpError, HttpResponse};
use crate::message::MessageEffect;
use crate::request::RequestEffect;
use crate::store::{
    ClaimOptions, Commit, Conflict, InputAck, NewRun, OutboxKind, OutboxRow, ReadVersion,
    RecordedRequest, RunRecord, RunStatus, Store, StoreError, Tx, now_millis,
};
use crate::transport::Transport;

/// A pure function of a run's recorded requests that returns more messages to send (step 4).
/// It must be deterministic: after a crash it is called again with the same recorded requests
/// and its result must be the same.
pub type AfterRequestsFn = Arc<dyn Fn(&[RecordedRequest]) -> Vec<MessageEffect> + Send + Sync>;

/// Where a fault-injection hook is called. Testing only.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Inside the commit transaction, after every write, before `COMMIT`.
    BeforeCommit,
    /// Right after the commit returned.
    AfterCommit,
    /// After an HTTP response arrived, before it is recorded.
    AfterHttpBeforeRecord,
    /// After the broker acknowledged a message, before the row is marked dispatched.
    AfterPublishBeforeMark,
    /// After a relay round claimed rows, before it sends any (at: the first row's id).
    AfterClaim,
    /// A row passed its fence: it is sent next (at: its id).
    Fenced,
}

/// A deliberately broken behaviour, so that a reliability test can show that its check fails
/// when the guarantee it checks is gone. Testing only: never set one in a service.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mutant {
    /// Runs commit without read validation: no reads, no compare-and-set expectations.
    SkipReadValidation,
    /// Every run gets a key of its own, so no run is ever a duplicate.
    SkipDuplicateCheck,
    /// Claimed rows are never renewed: a claimant working longer than its lease loses it.
    NoLeaseRenewal,
    /// A message row is marked dispatched before it is published (the fault point
    /// `AfterPublishBeforeMark` then sits between the mark and the publish): a crash there
    /// loses the message.
    MarkBeforePublish,
    /// Leases are counted from when dispatching starts rather than from when the claim was
    /// asked for, and rows are sent without checking, right before, that their lease still
    /// holds: a holder paused past its lease sends what another claimant sends too.
    NoFence,
    /// The worker starts every delivery at once, whatever its partition key: one key's
    /// deliveries can be decided and committed out of order.
    NoKeyOrder,
    /// The worker never extends the deliveries it holds: one held longer than its visibility
    /// is handed to another consumer while it is still being worked on.
    NoHeartbeat,
    /// Validation lets through values a store cannot hold (a NUL in a key, a topic or a name;
    /// keys and names past their ceilings): they reach the store's transaction, which one store
    /// refuses and the other writes.
    NoValueRules,
    /// The worker retries every store error, even one no retry can fix (the store refused the
    /// run's values): such an input holds its partition key for ever.
    RetryDataErrors,
    /// The relay never reaps dead owners: a dead process's rows wait for their leases and its
    /// stalled runs for the idle time.
    NoReaping,
}

impl Mutant {
    /// Every mutant.
    pub const ALL: &'static [Mutant] = &[
        Mutant::SkipReadValidation,
        Mutant::SkipDuplicateCheck,
        Mutant::NoLeaseRenewal,
        Mutant::MarkBeforePublish,
        Mutant::NoFence,
        Mutant::NoKeyOrder,
        Mutant::NoHeartbeat,
        Mutant::NoValueRules,
        Mutant::RetryDataErrors,
        Mutant::NoReaping,
    ];

    /// Its name on a command line: `skip-read-validation`, ...
    pub const fn name(self) -> &'static str {
        match self {
            Mutant::SkipReadValidation => "skip-read-validation",
            Mutant::SkipDuplicateCheck => "skip-duplicate-check",
            Mutant::NoLeaseRenewal => "no-lease-renewal",
            Mutant::MarkBeforePublish => "mark-before-publish",
            Mutant::NoFence => "no-fence",
            Mutant::NoKeyOrder => "no-key-order",
            Mutant::NoHeartbeat => "no-heartbeat",
            Mutant::NoValueRules => "no-value-rules",
            Mutant::RetryDataErrors => "retry-data-errors",
            Mutant::NoReaping => "no-reaping",
        }
    }

    /// The mutant with this [`Mutant::name`].
    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL.iter().copied().find(|m| m.name() == name)
    }
}

/// A fault-injection hook: called with the point and the key or row id. Testing only.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(FaultPoint, &str) + Send + Sync>;

/// An [`HttpClient`] for executors that send no requests: every request fails with
/// [`HttpError::UnknownEndpoint`]. Runs with requests are refused at validation
/// ([`ValidationError::NoHttpClient`]) when the executor has it.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHttp;

impl HttpClient for NoHttp {
    fn send(
        &self,
        _idempotency_key: &str,
        request: &RequestEffect,
    ) -> impl Future<Output = Result<HttpResponse, HttpError>> + Send {
        let endpoint = request.endpoint.clone();
        async move { Err(HttpError::UnknownEndpoint { endpoint }) }
    }

    fn knows(&self, _endpoint: &str) -> bool {
        false
    }

    fn is_secret_header(&self, _endpoint: &str, _name: &str) -> bool {
        false
    }
}

/// When an outbox row that failed is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failed attempt. Default 1 s.
    pub initial: Duration,
    /// The longest delay. Default 5 min.
    pub max: Duration,
    /// Attempts after which a row is dead-lettered with the last error as its reason; `None`
    /// retries forever. Default 20: with the default delays, about an hour of trying.
    ///
    /// A request given up on is recorded as failed, like one the server rejected: the run's
    /// later requests are then sent, its after-requests hook sees the failure (and may add
    /// messages that say so), and the messages the run held back for its requests are
    /// published. Nothing stays pending forever; an operator can send a dead-lettered row
    /// again.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_attempts: Some(20),
        }
    }
}

impl Backoff {
    /// The delay after `attempts` failed attempts: doubling from `initial`, plus up to a
    /// quarter of random jitter, never more than `max`.
    pub fn delay(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        let base = self.initial.saturating_mul(1u32 << doublings).min(self.max);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let quarter = base / 4;
        let jitter = if quarter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = u64::try_from(quarter.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(random % nanos.max(1))
        };
        (base + jitter).min(self.max)
    }
}

/// Executor settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// Size limits.
    pub limits: Limits,
    /// How long a claimant owns the outbox rows it claimed. It must exceed the longest time one
    /// request can take with the client's retries, or a relay may send it again meanwhile
    /// (harmless thanks to the idempotency key, but wasteful). Default 60 s.
    pub lease: Duration,
    /// Retries of rows whose dispatch failed.
    pub retry: Backoff,
    /// The name leases are taken under, unique among live processes. The default is unique per
    /// process; that is enough: the store registers the owner as alive by something that dies
    /// with the process ([`Executor::recover`]), and relays free a dead owner's rows within
    /// seconds. A stable name (a pod name) also lets a restarted process reclaim its leases at
    /// once, itself.
    pub owner: String,
    /// Publish messages inside the store's transactions when the transport lives in the
    /// store's database. Default `true`.
    pub publish_inline: bool,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            limits: Limits::default(),
            lease: Duration::from_secs(60),
            retry: Backoff::default(),
            owner: format!("pid{}-{:x}", std::process::id(), now_millis()),
            publish_inline: true,
        }
    }
}

/// Extra inputs of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// The registered after-requests hook to call once the run's requests are resolved.
    pub after_requests: Option<String>,
    /// What the effects were computed from: the entities read, each with the version read. The
    /// run commits only if none changed since; otherwise it fails with [`RunError::Conflict`]
    /// and nothing is written. The worker fills this from what its loaders read; a caller that
    /// loads state itself passes it here.
    pub reads: Vec<ReadVersion>,
    /// The input message the run answers. When the executor's transport is a log in the
    /// store's own database (the embedded default), the message is acknowledged in the run's
    /// commit transaction — the run and its input's acknowledgement are one atomic step, and
    /// [`Committed::acknowledged`] says so; elsewhere it is ignored and the caller acknowledges
    /// the message itself. The worker sets it.
    pub input: Option<InputAck>,
}

impl RunOptions {
    /// Options calling the after-requests hook registered as `name`.
    pub fn after_requests(name: impl Into<String>) -> RunOptions {
        RunOptions {
            after_requests: Some(name.into()),
            ..RunOptions::default()
        }
    }

    /// Options validating that the entities read are unchanged at commit.
    ///
    /// ```
    /// use effects_core::executor::{Executor, RunError, RunOptions};
    /// use effects_core::store::{Conflict, ReadVersion, SqliteStore, Store};
    /// use effects_core::{DatomEffect, Effects, LookupRef};
    /// use serde_json::json;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let store = SqliteStore::in_memory()?;
    /// let executor = Executor::builder(store.clone(), store.log()).build();
    /// let account = LookupRef::new("account/id", "a1");
    /// let balance = |b: i64| Effects::from(DatomEffect::assert(account.clone(), [("account/balance", json!(b))]));
    /// executor.run("open:a1", balance(1_000)).await?;
    ///
    /// // Read, decide, and meanwhile someone else writes.
    /// let read = store.entity(&account, None).await?.expect("the account exists");
    /// executor.run("deposit:1", balance(1_500)).await?;
    ///
    /// let stale = executor
    ///     .run_with("withdraw:1", balance(900), RunOptions::reading([ReadVersion::of(&read)]))
    ///     .await;
    /// let Err(RunError::Conflict { conflict, .. }) = stale else { panic!("expected a conflict") };
    /// assert!(matches!(*conflict, Conflict::Read { .. }));
    /// assert_eq!(conflict.to_string(), format!("entity [account/id \"a1\"] was read at tx {} but is at tx {} now", read.tx, read.tx.0 + 1));
    /// let now = store.entity(&account, None).await?.expect("the account exists");
    /// assert_eq!(now.get("account/balance"), Some(&json!(1_500)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn reading(reads: impl IntoIterator<Item = ReadVersion>) -> RunOptions {
        RunOptions {
            reads: reads.into_iter().collect(),
            ..RunOptions::default()
        }
    }
}

/// What a run (or the dispatching part of it) got done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Requests whose successful response was recorded.
    pub requests_sent: usize,
    /// Messages acknowledged by the broker or published into the colocated log.
    pub messages_dispatched: usize,
    /// Rows dead-lettered (rejected requests, permanent failures).
    pub dead_lettered: usize,
    /// Rows still pending: retrying later, or being worked on by someone else.
    pub pending: usize,
}

impl Progress {
    fn add(&mut self, other: Progress) {
        self.requests_sent += other.requests_sent;
        self.messages_dispatched += other.messages_dispatched;
        self.dead_lettered += other.dead_lettered;
        self.pending += other.pending;
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The effects were applied in `tx`.
    Applied {
        /// The run's transaction.
        tx: Tx,
        /// What was dispatched.
        progress: Progress,
    },
    /// The key had been applied before: nothing was applied again; the original run's pending
    /// rows were dispatched.
    Duplicate {
        /// The original run's transaction.
        original_tx: Tx,
        /// What this call dispatched of the original run.
        progress: Progress,
    },
}

impl RunOutcome {
    /// The transaction that applied the key (this run's or the original's).
    pub fn tx(&self) -> Tx {
        match self {
            RunOutcome::Applied { tx, .. } => *tx,
            RunOutcome::Duplicate { original_tx, .. } => *original_tx,
        }
    }

    /// What was dispatched.
    pub fn progress(&self) -> Progress {
        match self {
            RunOutcome::Applied { progress, .. } | RunOutcome::Duplicate { progress, .. } => {
                *progress
            }
        }
    }

    /// Whether the key had been applied before.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, RunOutcome::Duplicate { .. })
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The effects are invalid: nothing was written.
    #[error("run `{}` refused: {source}", shown_key(key))]
    Invalid {
        /// The idempotency key.
        key: String,
        /// What is wrong.
        #[source]
        source: ValidationError,
    },
    /// The key was applied before with different effects: nothing was applied.
    #[error(
        "idempotency key `{key}` was already used for different effects (applied in tx \
         {original_tx}): nothing was applied; use a new key for new effects"
    )]
    KeyReuse {
        /// The key.
        key: String,
        /// The original run's transaction.
        original_tx: Tx,
        /// The SHA-256 the key is bound to.
        original_sha256: String,
        /// The SHA-256 of the refused effects.
        sha256: String,
    },
    /// Something the effects were computed from changed after it was read (or a
    /// compare-and-set datom found another value): nothing was written. The key is still free:
    /// compute the effects again from fresh state and run them under the same key. The worker
    /// does this by itself.
    #[error("run `{}` refused: {conflict}; nothing was written", shown_key(key))]
    Conflict {
        /// The idempotency key.
        key: String,
        /// What changed.
        conflict: Box<Conflict>,
    },
    /// The store failed before the run committed: nothing was written and nothing dispatched.
    #[error("run `{key}` was not applied: {source}")]
    Store {
        /// The key.
        key: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The run is applied, but the store failed while dispatching; the rest is pending and is
    /// finished by running the key again or by the relay.
    #[error("run `{key}` is applied (tx {tx}) but dispatching stopped: {source}")]
    Incomplete {
        /// The key.
        key: String,
        /// The run's transaction.
        tx: Tx,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

/// What [`Executor::dispatch_due`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows claimed (including those published inline).
    pub claimed: usize,
    /// Runs whose after-requests step was finished.
    pub finished_runs: usize,
    /// What was dispatched.
    pub progress: Progress,
}

/// Runs effects. Build one with [`Executor::builder`]; share it with `Arc`.
///
/// ```
/// use effects_core::executor::{Executor, RunOutcome};
/// use effects_core::store::{SqliteStore, Store};
/// use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
/// use serde_json::json;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = SqliteStore::in_memory()?;
/// let executor = Executor::builder(store.clone(), store.log()).build();
///
/// let card = LookupRef::new("card/id", "c1");
/// let effects = Effects::from(DatomEffect::assert(card.clone(), [("card/status", json!("blocked"))]))
///     .merge(MessageEffect::new("card-status-changed", json!({"card_id": "c1"})).with_key("c1"));
///
/// let first = executor.run("block:m1", effects.clone()).await?;
/// assert!(matches!(first, RunOutcome::Applied { .. }));
/// let again = executor.run("block:m1", effects).await?;
/// assert_eq!(again, RunOutcome::Duplicate { original_tx: first.tx(), progress: Default::default() });
///
/// let now = store.entity(&card, None).await?.expect("the card exists");
/// assert_eq!(now.get("card/status"), Some(&json!("blocked")));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Executor<S, T, C = NoHttp> {
    store: S,
    transport: T,
    http: C,
    has_http: bool,
    config: ExecutorConfig,
    hooks: BTreeMap<String, AfterRequestsFn>,
    inline: bool,
    fault: Option<FaultHook>,
    mutant: Option<Mutant>,
    recovered: tokio::sync::OnceCell<()>,
    /// Woken when dispatching left rows behind that are due now (a keyed message whose
    /// partition had an earlier message pending when its run committed): the relay looks at
    /// once instead of at its next interval.
    pub(crate) due: tokio::sync::Notify,
}

impl<S, T, C> fmt::Debug for Executor<S, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("config", &self.config)
            .field("hooks", &self.hooks.keys().collect::<Vec<_>>())
            .field("inline", &self.inline)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Executor`].
pub struct ExecutorBuilder<S, T, C = NoHttp> {
    store: S,
    transport: T,
    http: C,
    has_http: bool,
    config: ExecutorConfig,
    hooks: BTreeMap<String, AfterRequestsFn>,
    fault: Option<FaultHook>,
    mutant: Option<Mutant>,
}

impl<S, T, C> fmt::Debug for ExecutorBuilder<S, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: Store, T: Transport> Executor<S, T, NoHttp> {
    /// Starts building an executor over a store and a transport, with no HTTP client.
    pub fn builder(store: S, transport: T) -> ExecutorBuilder<S, T, NoHttp> {
        ExecutorBuilder {
            store,
            transport,
            http: NoHttp,
            has_http: false,
            config: ExecutorConfig::default(),
            hooks: BTreeMap::new(),
            fault: None,
            mutant: None,
        }
    }
}

impl<S: Store, T: Transport, C: HttpClient> ExecutorBuilder<S, T, C> {
    /// The HTTP client for requests.
    pub fn http<C2: HttpClient>(self, http: C2) -> ExecutorBuilder<S, T, C2> {
        ExecutorBuilder {
            store: self.store,
            transport: self.transport,
            http,
            has_http: true,
            config: self.config,
            hooks: self.hooks,
            fault: self.fault,
            mutant: self.mutant,
        }
    }

    /// Replaces the whole configuration.
    #[must_use]
    pub fn config(mut self, config: ExecutorConfig) -> Self {
        self.config = config;
        self
    }

    /// Size limits.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// The lease on claimed rows.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// Retries of failed rows.
    #[must_use]
    pub fn retry(mut self, retry: Backoff) -> Self {
        self.config.retry = retry;
        self
    }

    /// The lease owner's name (see [`ExecutorConfig::owner`]).
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.config.owner = owner.into();
        self
    }

    /// Whether to publish inside the store's transactions when the transport is colocated.
    #[must_use]
    pub fn publish_inline(mut self, inline: bool) -> Self {
        self.config.publish_inline = inline;
        self
    }

    /// Registers an after-requests hook under `name`; runs refer to it with
    /// [`RunOptions::after_requests`]. The relay finds it by name when it finishes an
    /// interrupted run, so register the same hooks in every process.
    #[must_use]
    pub fn after_requests(
        mut self,
        name: impl Into<String>,
        hook: impl Fn(&[RecordedRequest]) -> Vec<MessageEffect> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.insert(name.into(), Arc::new(hook));
        self
    }

    #[doc(hidden)]
    #[must_use]
    pub fn mutant(mut self, mutant: Mutant) -> Self {
        self.mutant = Some(mutant);
        self
    }

    #[doc(hidden)]
    #[must_use]
    pub fn fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
        self
    }

    /// The executor.
    pub fn build(self) -> Executor<S, T, C> {
        let inline = self.config.publish_inline
            && matches!(
                (self.store.colocation(), self.transport.colocation()),
                (Some(a), Some(b)) if a == b
            );
        Executor {
            store: self.store,
            transport: self.transport,
            http: self.http,
            has_http: self.has_http,
            config: self.config,
            hooks: self.hooks,
            inline,
            fault: self.fault,
            mutant: self.mutant,
            recovered: tokio::sync::OnceCell::new(),
            due: tokio::sync::Notify::new(),
        }
    }
}

/// One run of a batch: key and effects (and options).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchItem {
    /// The idempotency key.
    pub key: String,
    /// The effects.
    pub effects: Effects,
    /// Options.
    pub options: RunOptions,
}

impl BatchItem {
    /// A batch item without options.
    pub fn new(key: impl Into<String>, effects: Effects) -> BatchItem {
        BatchItem {
            key: key.into(),
            effects,
            options: RunOptions::default(),
        }
    }
}

impl<S: Store, T: Transport, C: HttpClient> Executor<S, T, C> {
    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The configuration.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Whether messages are published inside the store's transactions.
    pub fn publishes_inline(&self) -> bool {
        self.inline
    }

    /// The deliberately broken behaviour this executor (and the workers on it) has. Testing
    /// only.
    #[doc(hidden)]
    pub fn mutant(&self) -> Option<Mutant> {
        self.mutant
    }

    /// Whether this executor runs with `mutant` (the relay reads it).
    pub(crate) fn is_mutant(&self, mutant: Mutant) -> bool {
        self.mutant == Some(mutant)
    }

    fn fault(&self, point: FaultPoint, at: &str) {
        if let Some(hook) = &self.fault {
            hook(point, at);
        }
    }

    fn claim_options(&self) -> ClaimOptions {
        ClaimOptions {
            owner: self.config.owner.clone(),
            lease: self.config.lease,
            publish_inline: self.inline,
            before_commit: None,
        }
    }

    /// Runs `effects` under the idempotency key `key` (see the [module docs](self)).
    pub async fn run(
        &self,
        key: impl Into<String>,
        effects: Effects,
    ) -> Result<RunOutcome, RunError> {
        self.run_with(key, effects, RunOptions::default()).await
    }

    /// [`Executor::run`] with options (an after-requests hook).
    pub async fn run_with(
        &self,
        key: impl Into<String>,
        effects: Effects,
        options: RunOptions,
    ) -> Result<RunOutcome, RunError> {
        let key = key.into();
        let item = BatchItem {
            key: key.clone(),
            effects,
            options,
        };
        let committed = match self.commit_batch(std::slice::from_ref(&item)).await {
            Ok(mut results) => results.pop().unwrap_or_else(|| {
                Err(RunError::Store {
                    key: key.clone(),
                    source: StoreError::Corrupt {
                        what: "commit".to_owned(),
                        reason: "the store returned no result for the run".to_owned(),
                    },
                })
            }),
            Err(source) => {
                let result = Err(RunError::Store { key, source });
                crate::metrics::run_finished(outcome_label(&result));
                return result;
            }
        };
        match committed {
            Ok(committed) => self
                .dispatch(vec![committed])
                .await
                .pop()
                .unwrap_or_else(|| {
                    Err(RunError::Store {
                        key,
                        source: StoreError::Corrupt {
                            what: "dispatch".to_owned(),
                            reason: "no result for the run".to_owned(),
                        },
                    })
                }),
            Err(e) => Err(e),
        }
    }

    /// Runs many keys in ONE store transaction: one commit instead of one per run. Each item
    /// gets its own `tx` and outcome; an invalid item or a reused key fails alone. A store
    /// error fails the whole batch and nothing of it is written. This is
    /// [`Executor::commit_batch`] followed by [`Executor::dispatch`] of what committed.
    pub async fn run_batch(
        &self,
        items: Vec<BatchItem>,
    ) -> Result<Vec<Result<RunOutcome, RunError>>, StoreError> {
        let committed = self.commit_batch(&items).await?;
        let mut results: Vec<Option<Result<RunOutcome, RunError>>> =
            Vec::with_capacity(committed.len());
        let mut to_dispatch = Vec::new();
        let mut slots = Vec::new();
        for (i, c) in committed.into_iter().enumerate() {
            match c {
                Ok(c) => {
                    results.push(None);
                    slots.push(i);
                    to_dispatch.push(c);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        for (i, result) in slots.into_iter().zip(self.dispatch(to_dispatch).await) {
            results[i] = Some(result);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(missing("batch", "a batch item got no result"))))
            .collect())
    }

    /// The first half of [`Executor::run_batch`]: validates the items and commits them in ONE
    /// store transaction, without dispatching anything. Each item comes back as
    /// [`Committed`] (applied now, or a duplicate of a run applied before) or as the reason it
    /// was not (invalid, conflict, key reuse; nothing of it written). A store error fails the
    /// whole batch and nothing of it is written.
    ///
    /// Once committed, a run's requests and messages belong to its outbox: its rows are leased
    /// to this executor and [`Executor::dispatch`] sends them; if this process dies first, a
    /// relay sends them once the lease (or the process's liveness) is gone. The worker
    /// acknowledges its input at this point.
    pub async fn commit_batch(
        &self,
        items: &[BatchItem],
    ) -> Result<Vec<Result<Committed, RunError>>, StoreError> {
        let span = info_span!("effects.commit_batch", runs = items.len());
        async {
            let mut results: Vec<Option<Result<Committed, RunError>>> =
                (0..items.len()).map(|_| None).collect();
            let mut prepared: Vec<(usize, NewRun)> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let _validate = info_span!("effects.validate", key = %item.key).entered();
                match self.prepare(
                    &item.key,
                    &item.effects,
                    &item.options.reads,
                    item.options.after_requests.as_deref(),
                ) {
                    Ok(mut run) => {
                        // Acknowledged in the commit only when the input's log is in the
                        // store's database.
                        run.ack = item.options.input.clone().filter(|_| self.inline);
                        prepared.push((i, run));
                    }
                    Err(source) => {
                        tracing::warn!(key = %item.key, error = %source, "effects refused");
                        results[i] = Some(Err(RunError::Invalid {
                            key: item.key.clone(),
                            source,
                        }));
                    }
                }
            }
            if !prepared.is_empty() {
                let summaries: Vec<(usize, RunSummary)> = prepared
                    .iter()
                    .map(|(i, r)| (*i, RunSummary::of(r)))
                    .collect();
                let runs: Vec<NewRun> = prepared.into_iter().map(|(_, r)| r).collect();
                let first = runs.first().map(|r| r.key.clone()).unwrap_or_default();
                let asked = Instant::now();
                let commits = self.commit(runs, &first).await?;
                if commits.len() != summaries.len() {
                    return Err(StoreError::Corrupt {
                        what: "commit".to_owned(),
                        reason: format!(
                            "the store returned {} results for {} runs",
                            commits.len(),
                            summaries.len()
                        ),
                    });
                }
                for ((i, run), commit) in summaries.into_iter().zip(commits) {
                    results[i] = Some(self.committed(run, commit, asked));
                }
            }
            let results: Vec<Result<Committed, RunError>> = results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(missing("batch", "a batch item got no result"))))
                .collect();
            for result in &results {
                if let Err(e) = result {
                    crate::metrics::run_finished(error_label(e));
                }
            }
            Ok(results)
        }
        .instrument(span)
        .await
    }

    /// What one run's commit means for its caller.
    fn committed(
        &self,
        run: RunSummary,
        commit: Commit,
        asked: Instant,
    ) -> Result<Committed, RunError> {
        match commit {
            Commit::Applied {
                tx,
                status,
                claimed,
                published_inline,
            } => {
                self.fault(FaultPoint::AfterCommit, &run.key);
                Ok(Committed {
                    key: run.key.clone(),
                    tx,
                    acknowledged: run.acknowledges,
                    work: Work::Applied {
                        run,
                        status,
                        claimed,
                        published_inline,
                        asked,
                    },
                })
            }
            Commit::Conflict(conflict) => {
                tracing::info!(key = %run.key, %conflict, "read validation refused the run: nothing written");
                Err(RunError::Conflict {
                    key: run.key,
                    conflict: Box::new(conflict),
                })
            }
            Commit::Existing(record) => {
                if record.effects_sha256 != run.effects_sha256 {
                    tracing::warn!(key = %run.key, original_tx = record.tx.0, "idempotency key reused");
                    return Err(RunError::KeyReuse {
                        key: run.key,
                        original_tx: record.tx,
                        original_sha256: record.effects_sha256,
                        sha256: run.effects_sha256,
                    });
                }
                Ok(Committed {
                    key: run.key,
                    tx: record.tx,
                    acknowledged: run.acknowledges,
                    work: Work::Resume { record },
                })
            }
        }
    }

    /// The second half of [`Executor::run_batch`]: sends what committed runs have to send —
    /// each run's requests in order, then its after-requests step, then its messages; the
    /// messages of runs without requests published together in waves and marked dispatched
    /// together; runs with requests driven concurrently (each one's requests in order). A
    /// duplicate's original run has its pending rows claimed and sent. Outcomes in the order
    /// given; a store error while dispatching makes a run [`RunError::Incomplete`] (its rows
    /// stay pending for the relay).
    pub async fn dispatch(&self, committed: Vec<Committed>) -> Vec<Result<RunOutcome, RunError>> {
        let span = info_span!("effects.dispatch", runs = committed.len());
        async {
            let holds = Holds::new(self.config.lease, self.mutant);
            let mut results: Vec<Option<Result<RunOutcome, RunError>>> =
                (0..committed.len()).map(|_| None).collect();
            // Runs with only messages to send: published in waves across the runs.
            let mut together: Vec<(usize, String, Tx, usize, usize)> = Vec::new();
            let mut rows = Vec::new();
            let mut one_by_one = Vec::new();
            let mut left_behind = false;
            for (i, c) in committed.into_iter().enumerate() {
                match c.work {
                    Work::Applied {
                        run,
                        status,
                        claimed,
                        published_inline,
                        asked,
                    } if status != RunStatus::RequestsPending => {
                        holds.claimed(asked, &claimed);
                        left_behind |= claimed.len() + published_inline < run.outbox_len;
                        together.push((i, run.key, c.tx, published_inline, run.outbox_len));
                        rows.extend(claimed);
                    }
                    work => one_by_one.push((i, c.key, c.tx, work)),
                }
            }
            let holds = &holds;
            let jobs: Vec<_> = one_by_one
                .into_iter()
                .map(|(i, key, tx, work)| async move {
                    let span = info_span!("effects.run", key = %key, tx = tx.0);
                    (
                        i,
                        self.dispatch_one(key, tx, work, holds)
                            .instrument(span)
                            .await,
                    )
                })
                .collect();
            for (i, result) in self.drive_many(jobs).await {
                results[i] = Some(result);
            }
            let mut sent = self.send_messages_by_run(rows, holds).await;
            // A run whose commit could not claim all of its messages (an earlier message of
            // their partition was pending then) has them due now that those were sent: the
            // relay takes them at once.
            if left_behind {
                self.due.notify_one();
            }
            for (i, key, tx, published_inline, outbox_len) in together {
                results[i] = Some(match &mut sent {
                    Ok(by_run) => {
                        let mut progress = Progress {
                            messages_dispatched: published_inline,
                            ..Progress::default()
                        };
                        progress.add(by_run.remove(&key).unwrap_or_default());
                        progress.pending = outbox_len
                            .saturating_sub(progress.messages_dispatched)
                            .saturating_sub(progress.dead_lettered);
                        Ok(RunOutcome::Applied { tx, progress })
                    }
                    Err(e) => Err(RunError::Incomplete {
                        key,
                        tx,
                        source: StoreError::Database {
                            operation: "dispatching a batch's messages",
                            source: e.to_string().into(),
                        },
                    }),
                });
            }
            let results: Vec<Result<RunOutcome, RunError>> = results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(missing("dispatch", "a run got no result"))))
                .collect();
            for result in &results {
                crate::metrics::run_finished(outcome_label(result));
            }
            // Rows still pending (held back behind an earlier message of their partition, or
            // to be retried): the relay looks now rather than at its next interval.
            if results
                .iter()
                .any(|r| r.as_ref().is_ok_and(|o| o.progress().pending > 0))
            {
                self.due.notify_one();
            }
            results
        }
        .instrument(span)
        .await
    }

    /// Dispatches one committed run on its own: an applied run with requests, or a duplicate.
    async fn dispatch_one(
        &self,
        key: String,
        tx: Tx,
        work: Work,
        holds: &Holds,
    ) -> Result<RunOutcome, RunError> {
        let incomplete = |source| RunError::Incomplete {
            key: key.clone(),
            tx,
            source,
        };
        match work {
            Work::Applied {
                run,
                status,
                claimed,
                published_inline,
                asked,
            } => {
                holds.claimed(asked, &claimed);
                let total = run.outbox_len;
                let record = RunRecord {
                    key: key.clone(),
                    effects_sha256: run.effects_sha256.clone(),
                    tx,
                    status,
                    after_requests: run.after_requests.clone(),
                    outbox_count: u32::try_from(total).unwrap_or(u32::MAX),
                    created_at: 0,
                    updated_at: 0,
                    completed_at: None,
                };
                let mut progress = Progress {
                    messages_dispatched: published_inline,
                    ..Progress::default()
                };
                let (more, total) = self
                    .drive(&record, claimed, total, holds)
                    .await
                    .map_err(incomplete)?;
                progress.add(more);
                progress.pending = total
                    .saturating_sub(progress.requests_sent)
                    .saturating_sub(progress.messages_dispatched)
                    .saturating_sub(progress.dead_lettered);
                tracing::debug!(?progress, "run applied");
                Ok(RunOutcome::Applied { tx, progress })
            }
            Work::Resume { record } => {
                let progress = self.resume_record(&record).await.map_err(incomplete)?;
                tracing::debug!(?progress, "duplicate absorbed");
                Ok(RunOutcome::Duplicate {
                    original_tx: tx,
                    progress,
                })
            }
        }
    }

    /// The duplicate path on its own: dispatches what is pending of the run with this key, if
    /// there is one. The worker uses it when a redelivered message's run already exists, before
    /// loading inputs that may have changed since.
    pub async fn resume(&self, key: &str) -> Result<Option<RunOutcome>, RunError> {
        let span = info_span!("effects.resume", key = %key, tx = field::Empty);
        async {
            let record = self
                .store
                .run(key)
                .await
                .map_err(|source| RunError::Store {
                    key: key.to_owned(),
                    source,
                })?;
            let Some(record) = record else {
                return Ok(None);
            };
            tracing::Span::current().record("tx", record.tx.0);
            let progress =
                self.resume_record(&record)
                    .await
                    .map_err(|source| RunError::Incomplete {
                        key: key.to_owned(),
                        tx: record.tx,
                        source,
                    })?;
            Ok(Some(RunOutcome::Duplicate {
                original_tx: record.tx,
                progress,
            }))
        }
        .instrument(span)
        .await
    }

    /// The runs with these keys, if they were committed (without dispatching anything), in
    /// the same order. A key no run can have (one with a control character, which validation
    /// refuses) is not looked up: a store may not be able to compare it (PostgreSQL refuses a
    /// NUL in text), and a message whose key it is must reach validation and be refused there.
    pub async fn find_many(&self, keys: Vec<String>) -> Result<Vec<Option<Committed>>, StoreError> {
        let asked: Vec<String> = keys
            .iter()
            .filter(|k| validate::storable_key(k))
            .cloned()
            .collect();
        let mut found = self.store.runs_by_key(asked).await?.into_iter();
        let mut out = Vec::with_capacity(keys.len());
        for key in &keys {
            let record = if validate::storable_key(key) {
                found.next().ok_or_else(|| StoreError::Corrupt {
                    what: "runs by key".to_owned(),
                    reason: "the store returned fewer results than keys".to_owned(),
                })?
            } else {
                None
            };
            out.push(record.map(|record| Committed {
                key: record.key.clone(),
                tx: record.tx,
                acknowledged: false,
                work: Work::Resume { record },
            }));
        }
        Ok(out)
    }

    /// The run with this key, if one was committed (without dispatching anything). A key no run
    /// can have is not looked up (see [`Executor::find_many`]).
    pub async fn find(&self, key: &str) -> Result<Option<Committed>, StoreError> {
        if !validate::storable_key(key) {
            return Ok(None);
        }
        Ok(self.store.run(key).await?.map(|record| Committed {
            key: record.key.clone(),
            tx: record.tx,
            acknowledged: false,
            work: Work::Resume { record },
        }))
    }

    /// Registers this executor's owner with the store as alive for as long as the store handle
    /// lives ([`Store::register_owner`]: other processes' relays then free its rows within
    /// seconds of its death), then releases every lease held under the owner name by a previous
    /// process with the same name, so what it was doing when it died becomes claimable at once
    /// instead of when the leases expire. It happens once per executor, before its first claim:
    /// every method that takes leases calls it, so calling it yourself is only useful to know
    /// how many leases were reclaimed (0 if it already happened). Owner names must therefore be
    /// unique among live processes.
    pub async fn recover(&self) -> Result<u64, StoreError> {
        let mut released = 0;
        self.recovered
            .get_or_try_init(|| async {
                self.store.register_owner(&self.config.owner).await?;
                released = self.store.release(Vec::new(), &self.config.owner).await?;
                if released > 0 {
                    tracing::info!(owner = %self.config.owner, released, "reclaimed the leases of a previous process");
                }
                Ok::<(), StoreError>(())
            })
            .await?;
        Ok(released)
    }

    /// One round of the relay: claims up to `limit` due rows of any run and dispatches them,
    /// then finishes runs stalled between their requests and their after-requests step.
    pub async fn dispatch_due(&self, limit: usize) -> Result<RelayReport, StoreError> {
        self.recover().await?;
        let mut report = RelayReport::default();
        let holds = Holds::new(self.config.lease, self.mutant);
        let asked = Instant::now();
        let claimed = self
            .store
            .claim_due(limit, self.claim_options())
            .instrument(info_span!("effects.claim_due"))
            .await?;
        if let Some(first) = claimed.rows.first() {
            self.fault(FaultPoint::AfterClaim, &first.id);
        }
        holds.claimed(asked, &claimed.rows);
        report.claimed = claimed.rows.len() + claimed.published_inline;
        report.progress.messages_dispatched += claimed.published_inline;

        let (requests, messages): (Vec<OutboxRow>, Vec<OutboxRow>) = claimed
            .rows
            .into_iter()
            .partition(|r| r.kind == OutboxKind::Request);
        // Requests run by run (their order within a run matters), runs at once; messages keep
        // the claimed order, which follows the per-partition order across runs.
        let mut by_run: BTreeMap<String, Vec<OutboxRow>> = BTreeMap::new();
        for row in requests {
            by_run.entry(row.run_key.clone()).or_default().push(row);
        }
        let holds = &holds;
        let jobs: Vec<_> = by_run
            .into_iter()
            .map(|(key, rows)| async move {
                let span = info_span!("effects.run", key = %key, tx = field::Empty);
                let Some(record) = self.store.run(&key).await? else {
                    return Ok((Progress::default(), None));
                };
                span.record("tx", record.tx.0);
                self.send_requests_then_finish(&record, rows, holds)
                    .instrument(span)
                    .await
            })
            .collect();
        let mut later_messages = Vec::new();
        for result in self.drive_many(jobs).await {
            let (progress, finished) = result?;
            report.progress.add(progress);
            if let Some(rows) = finished {
                report.finished_runs += 1;
                later_messages.extend(rows);
            }
        }
        report
            .progress
            .add(self.send_messages(messages, holds).await?);
        report
            .progress
            .add(self.send_messages(later_messages, holds).await?);

        for record in self.store.stalled_runs(self.config.lease, limit).await? {
            let span = info_span!("effects.run", key = %record.key, tx = record.tx.0);
            let (progress, finished) = self
                .send_requests_then_finish(&record, Vec::new(), holds)
                .instrument(span.clone())
                .await?;
            report.progress.add(progress);
            if let Some(rows) = finished {
                report.finished_runs += 1;
                report
                    .progress
                    .add(self.send_messages(rows, holds).instrument(span).await?);
            }
        }
        Ok(report)
    }

    // -----------------------------------------------------------------------------------------

    fn prepare(
        &self,
        key: &str,
        effects: &Effects,
        reads: &[ReadVersion],
        after_requests: Option<&str>,
    ) -> Result<NewRun, ValidationError> {
        let rules = validate::Rules {
            values: self.mutant != Some(Mutant::NoValueRules),
            ..validate::Rules::new(&self.config.limits)
        };
        let mut run = validate::prepare(
            key,
            effects,
            reads,
            after_requests,
            |name| self.hooks.contains_key(name),
            self.has_http.then_some(&self.http),
            &rules,
        )?;
        match self.mutant {
            None => {}
            Some(Mutant::SkipReadValidation) => {
                run.reads.clear();
                for datom in &mut run.datoms {
                    datom.expected.clear();
                }
            }
            Some(
                Mutant::NoLeaseRenewal
                | Mutant::MarkBeforePublish
                | Mutant::NoFence
                | Mutant::NoKeyOrder
                | Mutant::NoHeartbeat
                | Mutant::NoValueRules
                | Mutant::RetryDataErrors
                | Mutant::NoReaping,
            ) => {}
            Some(Mutant::SkipDuplicateCheck) => {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                run.key = format!("{key}~{}-{n}", std::process::id());
            }
        }
        Ok(run)
    }

    async fn commit(&self, runs: Vec<NewRun>, first_key: &str) -> Result<Vec<Commit>, StoreError> {
        self.recover().await?;
        let mut options = self.claim_options();
        if let Some(hook) = &self.fault {
            let hook = Arc::clone(hook);
            let key = first_key.to_owned();
            options.before_commit = Some(Arc::new(move || hook(FaultPoint::BeforeCommit, &key)));
        }
        self.store
            .commit_runs(runs, options)
            .instrument(info_span!("effects.commit", key = %first_key))
            .await
            .inspect_err(|source| {
                tracing::error!(error = %source, "commit failed: nothing applied");
            })
    }
}

/// The error for a result the store (or a step) failed to give back for a run: a bug, reported
/// instead of a panic.
fn missing(what: &str, reason: &str) -> RunError {
    RunError::Store {
        key: String::new(),
        source: StoreError::Corrupt {
            what: what.to_owned(),
            reason: reason.to_owned(),
        },
    }
}

/// A key as shown in an error: control characters escaped, at most 80 characters.
fn shown_key(key: &str) -> String {
    const MAX: usize = 80;
    let escaped: String = key.escape_debug().collect();
    match escaped.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
        None => escaped,
    }
}

/// What the steps after the commit need to know about a run.
#[derive(Debug)]
struct RunSummary {
    key: String,
    /// Whether the store acknowledges the run's input in its commit.
    acknowledges: bool,
    effects_sha256: String,
    after_requests: Option<String>,
    outbox_len: usize,
}

impl RunSummary {
    fn of(run: &NewRun) -> RunSummary {
        RunSummary {
            key: run.key.clone(),
            acknowledges: run.ack.is_some(),
            effects_sha256: run.effects_sha256.clone(),
            after_requests: run.after_requests.clone(),
            outbox_len: run.outbox.len(),
        }
    }
}

/// A run that [`Executor::commit_batch`] committed (or found committed before, under the same
/// effects), whose requests and messages [`Executor::dispatch`] has yet to send.
#[derive(Debug)]
pub struct Committed {
    key: String,
    tx: Tx,
    work: Work,
    acknowledged: bool,
}

#[derive(Debug)]
enum Work {
    /// Applied by this commit: the rows it claimed, under a lease asked for at `asked`.
    Applied {
        run: RunSummary,
        status: RunStatus,
        claimed: Vec<OutboxRow>,
        published_inline: usize,
        asked: Instant,
    },
    /// Applied before: a duplicate; the original run's pending rows are claimed and sent.
    Resume { record: RunRecord },
}

impl Committed {
    /// The idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The transaction that applied the key (this commit's, or the original run's).
    pub fn tx(&self) -> Tx {
        self.tx
    }

    /// Whether the key had been applied before (nothing was applied again).
    pub fn is_duplicate(&self) -> bool {
        matches!(self.work, Work::Resume { .. })
    }

    /// Whether the run's input ([`RunOptions::input`]) was acknowledged in the commit
    /// transaction itself (a log in the store's database): the caller must not acknowledge it
    /// again.
    pub fn acknowledged(&self) -> bool {
        self.acknowledged
    }
}

/// The `outcome` label of `effects_runs_total` for a run's result.
fn outcome_label(result: &Result<RunOutcome, RunError>) -> &'static str {
    match result {
        Ok(RunOutcome::Applied { .. }) => "applied",
        Ok(RunOutcome::Duplicate { .. }) => "duplicate",
        Err(e) => error_label(e),
    }
}

fn error_label(error: &RunError) -> &'static str {
    match error {
        RunError::Conflict { .. } => "conflict",
        RunError::KeyReuse { .. } => "key_reuse",
        RunError::Invalid { .. } => "invalid",
        RunError::Store { .. } => "store_error",
        RunError::Incomplete { .. } => "incomplete",
    }
}

/// Counts a request's outcome in the metrics.
fn record_request_metrics(
    endpoint: &str,
    elapsed: Duration,
    result: &Result<HttpResponse, HttpError>,
) {
    let (outcome, attempts) = match result {
        Ok(response) => ("success", Some(response.attempts)),
        Err(HttpError::Rejected { response, .. }) => ("rejected", Some(response.attempts)),
        Err(HttpError::Exhausted { attempts, .. }) => ("exhausted", Some(*attempts)),
        Err(HttpError::UnknownEndpoint { .. } | HttpError::InvalidRequest { .. }) => {
            ("failed", None)
        }
    };
    crate::metrics::request_sent(endpoint, elapsed, outcome, attempts);
}
