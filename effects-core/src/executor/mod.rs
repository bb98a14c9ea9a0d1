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

mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tracing::{Instrument, field, info_span};

pub use self::validate::{Limits, ValidationError, effects_sha256};

use crate::effects::Effects;
use crate::http::{HttpClient, HttpError, HttpResponse};
use crate::message::MessageEffect;
use crate::request::RequestEffect;
use crate::store::{
    ClaimOptions, Commit, Conflict, Finish, Lease, NewRun, OutboxKind, OutboxRow, ReadVersion,
    RecordedRequest, RequestOutcome, RunRecord, RunStatus, Store, StoreError, Tx, now_millis,
};
use crate::transport::{OutgoingMessage, Transport, message_headers as publish_headers};

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
        Mutant::NoReaping,
    ];

    /// Its name on a command line: `skip-read-validation`, ...
    pub const fn name(self) -> &'static str {
        match self {
            Mutant::SkipReadValidation => "skip-read-validation",
            Mutant::SkipDuplicateCheck => "skip-duplicate-check",
            Mutant::NoLeaseRenewal => "no-lease-renewal",
            Mutant::MarkBeforePublish => "mark-before-publish",
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

    /// Keeps the leases on claimed rows that are still to be worked on: once a third of the
    /// lease has passed since `renewed`, renews them all (grouped by claim) and returns the ids
    /// no longer held — another claimant took them after the lease expired, and this one must
    /// not touch them.
    async fn keep_leases(
        &self,
        rows: &[OutboxRow],
        renewed: &mut Instant,
    ) -> Result<HashSet<String>, StoreError> {
        let mut lost = HashSet::new();
        if renewed.elapsed() < self.config.lease / 3
            || rows.is_empty()
            || self.mutant == Some(Mutant::NoLeaseRenewal)
        {
            return Ok(lost);
        }
        let mut by_lease: BTreeMap<(String, i64), Vec<String>> = BTreeMap::new();
        for row in rows {
            match &row.lease {
                Some(l) => by_lease
                    .entry((l.owner.clone(), l.token))
                    .or_default()
                    .push(row.id.clone()),
                None => {
                    lost.insert(row.id.clone());
                }
            }
        }
        *renewed = Instant::now();
        for ((owner, token), ids) in by_lease {
            let lease = Lease { owner, token };
            let held: HashSet<String> = self
                .store
                .renew(ids.clone(), &lease, self.config.lease)
                .await?
                .into_iter()
                .collect();
            lost.extend(ids.into_iter().filter(|id| !held.contains(id)));
        }
        if !lost.is_empty() {
            tracing::warn!(
                lost = lost.len(),
                "leases lost while working: another claimant has those rows"
            );
        }
        Ok(lost)
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
        let span = info_span!("effects.run", key = %key, tx = field::Empty);
        let result = async {
            let run = {
                let _validate = info_span!("effects.validate", key = %key).entered();
                self.prepare(
                    &key,
                    &effects,
                    &options.reads,
                    options.after_requests.as_deref(),
                )
                .map_err(|source| {
                    tracing::warn!(error = %source, "effects refused");
                    RunError::Invalid {
                        key: key.clone(),
                        source,
                    }
                })?
            };
            let summary = RunSummary::of(&run);
            let mut commits = self.commit(vec![run], &key).await?;
            let commit = commits.pop().ok_or_else(|| RunError::Store {
                key: key.clone(),
                source: StoreError::Corrupt {
                    what: "commit".to_owned(),
                    reason: "the store returned no result for the run".to_owned(),
                },
            })?;
            self.after_commit(&summary, commit).await
        }
        .instrument(span)
        .await;
        crate::metrics::run_finished(&result);
        result
    }

    /// Runs many keys in ONE store transaction: one commit instead of one per run. Each item
    /// gets its own `tx` and outcome; an invalid item or a reused key fails alone. A store
    /// error fails the whole batch and nothing of it is written.
    pub async fn run_batch(
        &self,
        items: Vec<BatchItem>,
    ) -> Result<Vec<Result<RunOutcome, RunError>>, StoreError> {
        let span = info_span!("effects.run_batch", runs = items.len());
        async {
            let mut results: Vec<Option<Result<RunOutcome, RunError>>> =
                (0..items.len()).map(|_| None).collect();
            let mut prepared: Vec<(usize, NewRun)> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match self.prepare(
                    &item.key,
                    &item.effects,
                    &item.options.reads,
                    item.options.after_requests.as_deref(),
                ) {
                    Ok(run) => prepared.push((i, run)),
                    Err(source) => {
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
                let commits = match self.commit(runs, &first).await {
                    Ok(c) => c,
                    Err(RunError::Store { source, .. }) => return Err(source),
                    Err(other) => {
                        return Err(StoreError::Corrupt {
                            what: "batch commit".to_owned(),
                            reason: other.to_string(),
                        });
                    }
                };
                // Runs with only messages to send (no requests) send them together: published
                // in waves across the runs and marked in one store call. The others go one by
                // one.
                let mut together: Vec<(usize, &RunSummary, Tx, usize)> = Vec::new();
                let mut rows = Vec::new();
                for ((i, run), commit) in summaries.iter().zip(commits) {
                    match commit {
                        Commit::Applied {
                            tx,
                            status,
                            claimed,
                            published_inline,
                        } if status != RunStatus::RequestsPending => {
                            self.fault(FaultPoint::AfterCommit, &run.key);
                            together.push((*i, run, tx, published_inline));
                            rows.extend(claimed);
                        }
                        commit => {
                            let span = info_span!("effects.run", key = %run.key, tx = field::Empty);
                            results[*i] =
                                Some(self.after_commit(run, commit).instrument(span).await);
                        }
                    }
                }
                let mut sent = self.send_messages_by_run(rows).await;
                for (i, run, tx, published_inline) in together {
                    results[i] = Some(match &mut sent {
                        Ok(by_run) => {
                            let mut progress = Progress {
                                messages_dispatched: published_inline,
                                ..Progress::default()
                            };
                            progress.add(by_run.remove(&run.key).unwrap_or_default());
                            progress.pending = run
                                .outbox_len
                                .saturating_sub(progress.messages_dispatched)
                                .saturating_sub(progress.dead_lettered);
                            Ok(RunOutcome::Applied { tx, progress })
                        }
                        Err(e) => Err(RunError::Incomplete {
                            key: run.key.clone(),
                            tx,
                            source: StoreError::Database {
                                operation: "dispatching a batch's messages",
                                source: e.to_string().into(),
                            },
                        }),
                    });
                }
            }
            results
                .iter()
                .flatten()
                .for_each(crate::metrics::run_finished);
            Ok(results
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| {
                        Err(RunError::Store {
                            key: String::new(),
                            source: StoreError::Corrupt {
                                what: "batch".to_owned(),
                                reason: "a batch item got no result".to_owned(),
                            },
                        })
                    })
                })
                .collect())
        }
        .instrument(span)
        .await
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
            let progress = self.resume_record(&record).await?;
            Ok(Some(RunOutcome::Duplicate {
                original_tx: record.tx,
                progress,
            }))
        }
        .instrument(span)
        .await
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
        let claimed = self
            .store
            .claim_due(limit, self.claim_options())
            .instrument(info_span!("effects.claim_due"))
            .await?;
        report.claimed = claimed.rows.len() + claimed.published_inline;
        report.progress.messages_dispatched += claimed.published_inline;

        let (requests, messages): (Vec<OutboxRow>, Vec<OutboxRow>) = claimed
            .rows
            .into_iter()
            .partition(|r| r.kind == OutboxKind::Request);
        // Requests run by run (their order within a run matters); messages keep the claimed
        // order, which follows the per-partition order across runs.
        let mut by_run: BTreeMap<String, Vec<OutboxRow>> = BTreeMap::new();
        for row in requests {
            by_run.entry(row.run_key.clone()).or_default().push(row);
        }
        let mut later_messages = Vec::new();
        for (key, rows) in by_run {
            let span = info_span!("effects.run", key = %key, tx = field::Empty);
            let record = self.store.run(&key).await?;
            let Some(record) = record else {
                continue;
            };
            span.record("tx", record.tx.0);
            let (progress, finished) = self
                .send_requests_then_finish(&record, rows)
                .instrument(span)
                .await?;
            report.progress.add(progress);
            if let Some(rows) = finished {
                report.finished_runs += 1;
                later_messages.extend(rows);
            }
        }
        report.progress.add(self.send_messages(messages).await?);
        report
            .progress
            .add(self.send_messages(later_messages).await?);

        for record in self.store.stalled_runs(self.config.lease, limit).await? {
            let span = info_span!("effects.run", key = %record.key, tx = record.tx.0);
            let (progress, finished) = self
                .send_requests_then_finish(&record, Vec::new())
                .instrument(span.clone())
                .await?;
            report.progress.add(progress);
            if let Some(rows) = finished {
                report.finished_runs += 1;
                report
                    .progress
                    .add(self.send_messages(rows).instrument(span).await?);
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
        let mut run = validate::prepare(
            key,
            effects,
            reads,
            after_requests,
            |name| self.hooks.contains_key(name),
            self.has_http.then_some(&self.http),
            &self.config.limits,
        )?;
        match self.mutant {
            None => {}
            Some(Mutant::SkipReadValidation) => {
                run.reads.clear();
                for datom in &mut run.datoms {
                    datom.expected.clear();
                }
            }
            Some(Mutant::NoLeaseRenewal | Mutant::MarkBeforePublish | Mutant::NoReaping) => {}
            Some(Mutant::SkipDuplicateCheck) => {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                run.key = format!("{key}~{}-{n}", std::process::id());
            }
        }
        Ok(run)
    }

    async fn commit(&self, runs: Vec<NewRun>, first_key: &str) -> Result<Vec<Commit>, RunError> {
        self.recover().await.map_err(|source| RunError::Store {
            key: first_key.to_owned(),
            source,
        })?;
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
            .map_err(|source| {
                tracing::error!(error = %source, "commit failed: nothing applied");
                RunError::Store {
                    key: first_key.to_owned(),
                    source,
                }
            })
    }

    async fn after_commit(&self, run: &RunSummary, commit: Commit) -> Result<RunOutcome, RunError> {
        let key = &run.key;
        match commit {
            Commit::Applied {
                tx,
                status,
                claimed,
                published_inline,
            } => {
                tracing::Span::current().record("tx", tx.0);
                self.fault(FaultPoint::AfterCommit, key);
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
                let (more, total) =
                    self.drive(&record, claimed, total)
                        .await
                        .map_err(|source| RunError::Incomplete {
                            key: key.clone(),
                            tx,
                            source,
                        })?;
                progress.add(more);
                progress.pending = total
                    .saturating_sub(progress.requests_sent)
                    .saturating_sub(progress.messages_dispatched)
                    .saturating_sub(progress.dead_lettered);
                tracing::debug!(?progress, "run applied");
                Ok(RunOutcome::Applied { tx, progress })
            }
            Commit::Conflict(conflict) => {
                tracing::info!(%conflict, "read validation refused the run: nothing written");
                Err(RunError::Conflict {
                    key: key.clone(),
                    conflict: Box::new(conflict),
                })
            }
            Commit::Existing(record) => {
                tracing::Span::current().record("tx", record.tx.0);
                if record.effects_sha256 != run.effects_sha256 {
                    tracing::warn!(original_tx = record.tx.0, "idempotency key reused");
                    return Err(RunError::KeyReuse {
                        key: key.clone(),
                        original_tx: record.tx,
                        original_sha256: record.effects_sha256,
                        sha256: run.effects_sha256.clone(),
                    });
                }
                let progress = self.resume_record(&record).await?;
                tracing::debug!(?progress, "duplicate absorbed");
                Ok(RunOutcome::Duplicate {
                    original_tx: record.tx,
                    progress,
                })
            }
        }
    }

    async fn resume_record(&self, record: &RunRecord) -> Result<Progress, RunError> {
        let incomplete = |source| RunError::Incomplete {
            key: record.key.clone(),
            tx: record.tx,
            source,
        };
        if record.status == RunStatus::Done {
            return Ok(Progress::default());
        }
        self.recover().await.map_err(incomplete)?;
        let claimed = self
            .store
            .claim_run(&record.key, self.claim_options())
            .instrument(info_span!("effects.claim"))
            .await
            .map_err(incomplete)?;
        let mut progress = Progress {
            messages_dispatched: claimed.published_inline,
            ..Progress::default()
        };
        let (more, _) = self
            .drive(record, claimed.rows, record.outbox_count as usize)
            .await
            .map_err(incomplete)?;
        progress.add(more);
        let rows = self.store.outbox(&record.key).await.map_err(incomplete)?;
        progress.pending = rows.iter().filter(|r| r.is_pending()).count();
        Ok(progress)
    }

    /// Dispatches claimed rows of one run: requests in order, then the after-requests step,
    /// then messages. Returns the progress and the run's row count (after-requests included).
    async fn drive(
        &self,
        record: &RunRecord,
        claimed: Vec<OutboxRow>,
        total: usize,
    ) -> Result<(Progress, usize), StoreError> {
        let mut progress = Progress::default();
        let mut total = total;
        if claimed.is_empty() && record.status != RunStatus::RequestsPending {
            return Ok((progress, total));
        }
        let (requests, mut messages): (Vec<OutboxRow>, Vec<OutboxRow>) = claimed
            .into_iter()
            .partition(|r| r.kind == OutboxKind::Request);
        if record.status == RunStatus::RequestsPending {
            let (sent, finished) = self.send_requests_then_finish(record, requests).await?;
            progress.add(sent);
            if let Some(rows) = finished {
                let count = self.store.run(&record.key).await?.map(|r| r.outbox_count);
                if let Some(count) = count {
                    total = total.max(count as usize);
                }
                messages.extend(rows);
            }
        }
        progress.add(self.send_messages(messages).await?);
        Ok((progress, total))
    }

    /// Sends a run's claimed requests in order, and when they are all resolved, runs the
    /// after-requests step. Returns the finish step's claimed message rows, if it finished.
    async fn send_requests_then_finish(
        &self,
        record: &RunRecord,
        requests: Vec<OutboxRow>,
    ) -> Result<(Progress, Option<Vec<OutboxRow>>), StoreError> {
        let mut progress = Progress::default();
        let span = info_span!("effects.requests", key = %record.key, tx = record.tx.0);
        let mut renewed = Instant::now();
        for (i, row) in requests.iter().enumerate() {
            let lost = self.keep_leases(&requests[i..], &mut renewed).await?;
            let stop = if lost.contains(&row.id) {
                // Someone else owns this request now; the run's later requests wait for it.
                progress.pending += 1;
                true
            } else {
                self.send_request(row, &mut progress)
                    .instrument(span.clone())
                    .await?
            };
            if stop {
                let rest: Vec<String> = requests[i + 1..]
                    .iter()
                    .filter(|r| !lost.contains(&r.id))
                    .map(|r| r.id.clone())
                    .collect();
                if !rest.is_empty() {
                    self.store.release(rest, &self.config.owner).await?;
                }
                return Ok((progress, None));
            }
        }
        let finished = self
            .finish(record)
            .instrument(info_span!("effects.after_requests", key = %record.key, tx = record.tx.0))
            .await?;
        let rows = finished.map(|(rows, published_inline)| {
            progress.messages_dispatched += published_inline;
            rows
        });
        Ok((progress, rows))
    }

    /// Sends one request and records its outcome. Returns whether the run must stop here
    /// (the request is to be retried later).
    async fn send_request(
        &self,
        row: &OutboxRow,
        progress: &mut Progress,
    ) -> Result<bool, StoreError> {
        let lease = claimed_lease(row)?;
        let request = match row.request() {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("unreadable request: {e}");
                if self
                    .store
                    .record_request(&row.id, RequestOutcome::Failed { reason }, &lease)
                    .await?
                {
                    progress.dead_lettered += 1;
                } else {
                    progress.pending += 1;
                }
                return Ok(false);
            }
        };
        let started = Instant::now();
        let mut result = self
            .http
            .send(&row.id, &request)
            .instrument(info_span!("effects.http", id = %row.id, endpoint = %row.destination))
            .await;
        crate::metrics::request_sent(&row.destination, started.elapsed(), &result);
        self.fault(FaultPoint::AfterHttpBeforeRecord, &row.id);
        crate::http::redact_result(&mut result, |name| {
            self.http.is_secret_header(&request.endpoint, name)
        });
        let outcome = match result {
            Ok(response) => RequestOutcome::Response { response },
            Err(HttpError::Rejected { response, .. }) => {
                tracing::warn!(id = %row.id, status = response.status, "request rejected: dead-lettered");
                RequestOutcome::Rejected { response }
            }
            Err(e @ HttpError::Exhausted { .. }) => {
                let error = e.to_string();
                if self
                    .config
                    .retry
                    .max_attempts
                    .is_some_and(|max| row.attempts >= max)
                {
                    tracing::error!(id = %row.id, %error, "request failed too often: dead-lettered");
                    RequestOutcome::Failed {
                        reason: format!("gave up after {} attempts: {error}", row.attempts),
                    }
                } else {
                    let delay = self.config.retry.delay(row.attempts);
                    tracing::warn!(id = %row.id, %error, ?delay, "request failed: retrying later");
                    if !self
                        .store
                        .retry_later(&row.id, &lease, &error, delay)
                        .await?
                    {
                        tracing::warn!(id = %row.id, "lease lost: another claimant has the request");
                    }
                    progress.pending += 1;
                    return Ok(true);
                }
            }
            Err(other) => {
                tracing::warn!(id = %row.id, error = %other, "request cannot succeed: dead-lettered");
                RequestOutcome::Failed {
                    reason: other.to_string(),
                }
            }
        };
        let success = outcome.is_success();
        if !self.store.record_request(&row.id, outcome, &lease).await? {
            // Another claimant took the row after this lease expired: its record stands, not
            // this one; the run goes on with whoever holds it now.
            tracing::warn!(id = %row.id, "lease lost: the outcome is not recorded");
            progress.pending += 1;
            return Ok(true);
        }
        if success {
            progress.requests_sent += 1;
        } else {
            progress.dead_lettered += 1;
            crate::metrics::dead_lettered(crate::store::DeadLetterKind::Request);
        }
        Ok(false)
    }

    /// The after-requests step: when every request of the run is resolved, computes the extra
    /// messages from the recorded responses and persists them with the run's messages made
    /// ready, in one transaction. `None` if the run is not ready or was finished by someone else.
    async fn finish(
        &self,
        record: &RunRecord,
    ) -> Result<Option<(Vec<OutboxRow>, usize)>, StoreError> {
        let mut after = Vec::new();
        if let Some(name) = &record.after_requests {
            let Some(hook) = self.hooks.get(name) else {
                tracing::error!(hook = %name, "after-requests hook not registered here: the run waits for a process that has it");
                return Ok(None);
            };
            let recorded = self.store.recorded_requests(&record.key).await?;
            let messages = match std::panic::catch_unwind(AssertUnwindSafe(|| {
                hook(recorded.as_slice())
            })) {
                Ok(m) => m,
                Err(_) => {
                    tracing::error!(hook = %name, "after-requests hook panicked: the run waits");
                    return Ok(None);
                }
            };
            // The run's own rows end at `outbox_count`; a run record from a fresh commit may
            // predate requests, so read the stored count.
            let count = match self.store.run(&record.key).await? {
                Some(r) => r.outbox_count,
                None => return Ok(None),
            };
            for (i, m) in messages.iter().enumerate() {
                let seq = count.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
                match validate::message_row(seq, i, m, &self.config.limits) {
                    Ok(row) => after.push(row),
                    Err(e) => {
                        tracing::error!(hook = %name, error = %e, "after-requests hook returned an invalid message: the run waits");
                        return Ok(None);
                    }
                }
            }
        }
        match self
            .store
            .finish_requests(&record.key, after, self.claim_options())
            .await?
        {
            Finish::Finished {
                claimed,
                published_inline,
                ..
            } => Ok(Some((claimed, published_inline))),
            Finish::NotReady | Finish::AlreadyFinished => Ok(None),
        }
    }

    /// Publishes claimed message rows in order, marking each dispatched after the broker's
    /// acknowledgement. A row that fails is retried later, and the rows after it with the same
    /// topic and partition key are released (they must not overtake it); other partitions go on.
    async fn send_messages(&self, rows: Vec<OutboxRow>) -> Result<Progress, StoreError> {
        let mut progress = Progress::default();
        for (_, p) in self.send_messages_by_run(rows).await? {
            progress.add(p);
        }
        Ok(progress)
    }

    /// Publishes claimed message rows and marks them dispatched; what happened to them, by run
    /// key.
    async fn send_messages_by_run(
        &self,
        rows: Vec<OutboxRow>,
    ) -> Result<HashMap<String, Progress>, StoreError> {
        let mut progress: HashMap<String, Progress> = HashMap::new();
        if rows.is_empty() {
            return Ok(progress);
        }
        let span = info_span!("effects.messages", count = rows.len());
        async {
            let mut blocked: HashSet<(String, String)> = HashSet::new();
            let mut held_back: Vec<&OutboxRow> = Vec::new();
            let mut renewed = Instant::now();
            // Published rows are marked together, every `MARK_BATCH` and at the end: one
            // transaction for the messages of a batch of runs instead of one per message.
            let mut to_mark: Vec<(&OutboxRow, Lease)> = Vec::new();
            let mark_first = self.mutant == Some(Mutant::MarkBeforePublish);
            let mut next = 0;
            while next < rows.len() {
                let lost = self.keep_leases(&rows[next..], &mut renewed).await?;
                // A wave: the next rows, at most one per topic and partition key (a keyed
                // message waits for the one before it), published at once.
                let mut wave: Vec<(&OutboxRow, Lease)> = Vec::new();
                let mut in_wave: HashSet<(String, String)> = HashSet::new();
                while next < rows.len() && wave.len() < PUBLISH_WAVE {
                    let row = &rows[next];
                    let partition = row
                        .partition_key
                        .as_ref()
                        .map(|pk| (row.destination.clone(), pk.clone()));
                    if partition.as_ref().is_some_and(|p| in_wave.contains(p)) {
                        break;
                    }
                    next += 1;
                    if partition.as_ref().is_some_and(|p| blocked.contains(p)) {
                        held_back.push(row);
                        continue;
                    }
                    if lost.contains(&row.id) {
                        of(&mut progress, row).pending += 1;
                        blocked.extend(partition);
                        continue;
                    }
                    in_wave.extend(partition);
                    wave.push((row, claimed_lease(row)?));
                }
                if mark_first {
                    for (row, lease) in &wave {
                        if self.store.mark_dispatched(&row.id, lease).await? {
                            of(&mut progress, row).messages_dispatched += 1;
                            self.fault(FaultPoint::AfterPublishBeforeMark, &row.id);
                        }
                    }
                }
                let published = join_all(wave.iter().map(|(row, _)| {
                    let message = OutgoingMessage {
                        id: row.id.clone(),
                        topic: row.destination.clone(),
                        partition_key: row.partition_key.clone(),
                        headers: publish_headers(&row.headers, &row.run_key, row.tx),
                        payload: row.payload.clone().into_bytes(),
                    };
                    self.transport
                        .publish(message)
                        .instrument(info_span!("effects.publish", id = %row.id, key = %row.run_key, tx = row.tx.0))
                }))
                .await;
                for ((row, lease), published) in wave.into_iter().zip(published) {
                    let partition = row
                        .partition_key
                        .as_ref()
                        .map(|pk| (row.destination.clone(), pk.clone()));
                    match published {
                        Ok(()) if mark_first => {}
                        Ok(()) => {
                            self.fault(FaultPoint::AfterPublishBeforeMark, &row.id);
                            to_mark.push((row, lease));
                            if to_mark.len() >= MARK_BATCH {
                                self.mark_published(&mut to_mark, &mut progress).await?;
                            }
                        }
                        Err(e) => {
                            let error = e.to_string();
                            if self
                                .config
                                .retry
                                .max_attempts
                                .is_some_and(|max| row.attempts >= max)
                            {
                                tracing::error!(id = %row.id, %error, "message failed too often: dead-lettered");
                                let reason = format!("gave up after {} attempts: {error}", row.attempts);
                                if self.store.dead_letter(&row.id, &reason, Some(&lease)).await? {
                                    of(&mut progress, row).dead_lettered += 1;
                                    crate::metrics::dead_lettered(crate::store::DeadLetterKind::Message);
                                } else {
                                    of(&mut progress, row).pending += 1;
                                }
                                continue;
                            }
                            let delay = self.config.retry.delay(row.attempts);
                            tracing::warn!(id = %row.id, %error, ?delay, "publish failed: retrying later");
                            self.store
                                .retry_later(&row.id, &lease, &error, delay)
                                .await?;
                            of(&mut progress, row).pending += 1;
                            if let Some(p) = partition {
                                blocked.insert(p);
                            }
                        }
                    }
                }
            }
            self.mark_published(&mut to_mark, &mut progress).await?;
            if !held_back.is_empty() {
                for row in &held_back {
                    of(&mut progress, row).pending += 1;
                }
                let ids = held_back.iter().map(|r| r.id.clone()).collect();
                self.store.release(ids, &self.config.owner).await?;
            }
            Ok(progress)
        }
        .instrument(span)
        .await
    }

    /// Marks the published rows of `to_mark` dispatched (emptying it). A row whose lease was
    /// lost meanwhile stays pending: its new claimant publishes it again under the same id.
    async fn mark_published(
        &self,
        to_mark: &mut Vec<(&OutboxRow, Lease)>,
        progress: &mut HashMap<String, Progress>,
    ) -> Result<(), StoreError> {
        if to_mark.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(to_mark);
        let marked = self
            .store
            .mark_dispatched_many(
                rows.iter()
                    .map(|(row, lease)| (row.id.clone(), lease.clone()))
                    .collect(),
            )
            .await?;
        for ((row, _), marked) in rows.iter().zip(marked) {
            if marked {
                of(progress, row).messages_dispatched += 1;
            } else {
                tracing::warn!(id = %row.id, "lease lost: published, but another claimant marks the row");
                of(progress, row).pending += 1;
            }
        }
        Ok(())
    }
}

/// The progress of `row`'s run.
fn of<'p>(progress: &'p mut HashMap<String, Progress>, row: &OutboxRow) -> &'p mut Progress {
    progress.entry(row.run_key.clone()).or_default()
}

/// How many published messages are marked dispatched in one store call.
const MARK_BATCH: usize = 128;

/// How many messages (of distinct partitions) are published at once.
const PUBLISH_WAVE: usize = 64;

/// The lease under which a row was handed to this claimant.
fn claimed_lease(row: &OutboxRow) -> Result<Lease, StoreError> {
    row.lease.clone().ok_or_else(|| StoreError::Corrupt {
        what: format!("outbox row `{}`", row.id),
        reason: "a claimed row came back without its lease".to_owned(),
    })
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
struct RunSummary {
    key: String,
    effects_sha256: String,
    after_requests: Option<String>,
    outbox_len: usize,
}

impl RunSummary {
    fn of(run: &NewRun) -> RunSummary {
        RunSummary {
            key: run.key.clone(),
            effects_sha256: run.effects_sha256.clone(),
            after_requests: run.after_requests.clone(),
            outbox_len: run.outbox.len(),
        }
    }
}
