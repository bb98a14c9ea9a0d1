//! The worker: consumes a topic and runs a [`Handler`] on every message, through the
//! [`Executor`].
//!
//! # The pipeline
//!
//! A delivery goes through stages, each in a file of its own; what is per delivery and what is
//! per batch is in the names:
//!
//! ```text
//!  fetch ──► order ──► decide ──────────► commit ─────────────► settle
//!  (fetch.rs) (order.rs) (decide.rs)      (commit.rs)            (settle.rs)
//!  many at     one key's   load the input, group commit: the     acknowledge (at commit, by
//!  once, up    deliveries  call the        decided runs of a     default), dead-letter, or
//!  to max_in_  one after   handler:        short window in ONE   re-run / retry; then the
//!  flight      the other   `concurrency`   store transaction     outbox rows go to dispatch
//!                          at once         (a `Batch`)           (requests, messages)
//!       ▲                                                               │
//!       └──────────── heartbeats (heartbeat.rs): deliveries in work ────┘
//!                     are kept leased while the process lives
//! ```
//!
//! 1. **Fetch** ([`WorkerConfig::max_in_flight`] deliveries at most in the worker at once).
//! 2. **Order.** Deliveries with a partition key wait behind the one before them of the same
//!    key: one key's deliveries are decided and committed one after the other, in the order
//!    the transport handed them out; deliveries of different keys (or without a key) go on
//!    side by side.
//! 3. **Decide** ([`WorkerConfig::concurrency`] at once). The idempotency key is
//!    [`message_key`]`(handler, topic, message id)`, or, for a handler that declares a business
//!    key (`#[effect_handler(key = transfer.id)]`), [`business_key`]`(handler, key)`. A message
//!    with an empty id is dead-lettered when its key comes from the id (all such messages would
//!    share one run). A redelivery (or a retry) whose run exists already is the **duplicate
//!    path**: the original run's pending rows are dispatched and the message is acknowledged —
//!    the handler is not called again. Otherwise the input is produced by the worker's [`Inputs`] (by default
//!    [`Handler::decode`] of the payload, [`Decode`]; or loaded from the store through a
//!    [`Tracked`] handle that records each entity read with its version: [`LoadEntity`],
//!    [`LoadWith`]), and the pure handler is called (a panic is caught).
//! 4. **Commit** — group commit ([`WorkerConfig::group_commit`]): the runs decided while the
//!    previous commit was in progress, or within [`GroupCommit::max_wait`] of the first, commit
//!    together in ONE store transaction ([`Executor::commit_batch`]), up to
//!    [`GroupCommit::max_runs`]. Each run keeps its own key, `tx` and outcome: a run whose
//!    reads changed is refused alone and re-run (see [Concurrency](#concurrency)), a duplicate
//!    is a duplicate, invalid effects are a dead letter. When the whole transaction fails, its
//!    runs are committed again one by one, so one bad run cannot hold the others back.
//! 5. **Settle.** With [`Acknowledge::AtCommit`] (the default) the input is acknowledged as
//!    soon as its run is committed — on the embedded default, inside the commit transaction: from then on its requests and messages belong to the
//!    outbox, which sends them (this process right away; a relay if it dies first). With
//!    [`Acknowledge::AfterEffects`] the acknowledgement waits until the run's requests and
//!    messages were dispatched, as a handler that needs the input held until then wants.
//!    Acknowledgements of a commit go out together ([`Transport::ack_many`]).
//!
//! What cannot succeed by retrying — an undecodable payload, a missing entity, a handler panic,
//! effects the executor refuses — is dead-lettered with its reason and acknowledged: never
//! retried forever, never crashing the worker. What may succeed later (a store error) is
//! **retried in the worker**, after [`WorkerConfig::retry`]'s delay, holding the delivery (and
//! the later deliveries of its key, which wait behind it) and keeping it leased with
//! heartbeats; past [`WorkerConfig::max_deliveries`] attempts it is dead-lettered with the last
//! error as its reason.
//!
//! # Order
//!
//! - **Inputs of one partition key** are committed in the order the transport handed them out
//!   (which is publish order), in both acknowledgement modes: the next one is decided only once
//!   the one before it is settled (committed, dead-lettered). A retried delivery keeps its
//!   place: the ones behind it wait. Across processes the transport keeps the order: it hands
//!   one key's messages to one holder at a time.
//! - **Outputs** (the messages runs publish) keep the order of their runs per topic and
//!   partition key: the outbox publishes a keyed message only when no earlier one of its
//!   partition is pending, whichever process sends it. With [`Acknowledge::AtCommit`] the
//!   next input of a key may be handled before the outputs of the previous one are published;
//!   their order is still the order of the inputs. With [`Acknowledge::AfterEffects`] an
//!   input is acknowledged only after its outputs were published (or dead-lettered), so a
//!   consumer of the outputs never sees the input acknowledged before them.
//!
//! # Heartbeats and crashes
//!
//! A delivery still in the worker after a third of [`WorkerConfig::visibility`] is extended
//! ([`Transport::extend`]) every third of it, so a slow handler, a slow store or a long retry is
//! not redelivered to another process while this one lives. If the process dies, whatever it
//! held comes back after the visibility; runs it committed before dying are duplicates then, and
//! their outbox rows are taken over by the relays of the other processes (see
//! [`crate::relay`]).
//!
//! [`Worker::run`] stops fetching when its shutdown future resolves, gives back (in order) what
//! it fetched but did not start, lets the work in flight finish (commits, acknowledgements,
//! dispatching) and returns. [`Worker::on_processed`] registers a function told what happened to
//! each delivery (for logs, metrics, or a program that reports what it did).
//!
//! # Concurrency
//!
//! Deliveries run concurrently, and several workers (or processes) may share a store, so the
//! state a handler's input was loaded from can change between the load and the commit. Writing
//! effects computed from that stale state would lose the other update. The worker prevents it:
//! whatever its loaders read through the [`Tracked`] store is validated in the commit
//! transaction, and a run whose reads changed is refused with nothing written
//! ([`WorkerReport::conflicts`]). The worker then loads the input again, calls the handler again
//! on the fresh state and runs the new effects under the same key ([`WorkerReport::reruns`]),
//! after a short backoff, up to [`WorkerConfig::reruns`] times; past that the message is
//! dead-lettered with the conflict as its reason. Runs of one group commit see each other's
//! writes in order: a run reading what an earlier run of its batch changed is refused and
//! re-run like any other.
//!
//! This is safe because a handler has no side effects of its own: calling it again only
//! computes a new value, and the refused run wrote nothing — not even its key, so the new run
//! is not mistaken for a reuse of the key, while a redelivery after an applied run is still a
//! duplicate.
//!
//! What is guaranteed: no run applies effects computed from an entity that changed after it was
//! read through the tracked store (no lost update), and each key is applied at most once.
//! What is not: reads the worker cannot see — through the untracked store, another database, a
//! clock, a payload that embeds state — are not validated; give such handlers compare-and-set
//! datoms ([`DatomEffect::expecting`](crate::DatomEffect::expecting),
//! `#[datom(expect = "..")]`), which hold on any path. Versions are per entity: a change to any
//! attribute of an entity read refuses the run, which costs a re-run but never a wrong result.
//!
//! # Example: the cards service
//!
//! A message on `cards-to-block` carries `{"card_id": "c1"}`; the `block` handler takes a `Card`,
//! which the worker loads from the store:
//!
//! ```no_run
//! use std::sync::Arc;
//! use effects_core::executor::Executor;
//! use effects_core::store::SqliteStore;
//! use effects_core::worker::{LoadEntity, Worker, WorkerConfig};
//! use effects_core::LookupRef;
//! # use effects_core::{Effects, Handler, HandlerDescriptor};
//! # #[derive(serde::Deserialize)] struct Card { id: String }
//! # struct BlockHandler;
//! # impl Handler for BlockHandler {
//! #     type Input = Card; type Output = Effects;
//! #     const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
//! #         name: "block", topic: Some("cards-to-block"), key: None, input: "Card", schemas: &[] };
//! #     fn handle(&self, _: Card) -> Effects { Effects::new() }
//! # }
//!
//! #[derive(serde::Deserialize)]
//! struct BlockRequest {
//!     card_id: String,
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open("cards.db")?;
//! let executor = Arc::new(Executor::builder(store.clone(), store.log()).build());
//! let worker = Worker::new(Arc::clone(&executor), BlockHandler)
//!     .with_config(WorkerConfig { concurrency: 4, ..WorkerConfig::default() })
//!     .load_with(LoadEntity::new(|r: BlockRequest| LookupRef::new("card/id", r.card_id)));
//!
//! // Stop when told to (a signal handler, an admin endpoint, ...).
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! let report = worker.run(async { let _ = stopped.await; }).await;
//! println!("{report:?}");
//! # Ok(()) }
//! ```

mod commit;
mod decide;
mod fetch;
mod heartbeat;
mod hot;
mod inputs;
mod order;
mod pipeline;
mod settle;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::executor::{Backoff, Executor};
use crate::handler::{Handler, message_key};
use crate::http::HttpClient;
use crate::relay::RelayConfig;
use crate::store::{Store, Tx};
use crate::transport::{Delivery, Transport};

pub use self::inputs::{Decode, Inputs, LoadEntity, LoadError, LoadWith};

#[cfg(doc)]
use crate::handler::business_key;
#[cfg(doc)]
use crate::store::Tracked;

/// When a delivery is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Acknowledge {
    /// With its run's commit (default): its requests and messages belong to the outbox from
    /// then on, and the partition moves on at the speed of commits. When the transport is a log
    /// in the store's own database (the embedded default), inside the commit transaction: a
    /// committed run's input can then never be delivered again. Elsewhere, right after it.
    #[default]
    AtCommit,
    /// Right after its run's commit, always through the transport, even when the log is in the
    /// store's database (a transport that watches acknowledgements sees every one).
    AfterCommit,
    /// Once its run's requests and messages were dispatched (or dead-lettered, or left to the
    /// relay after a failure): the input is held until its outputs are out.
    AfterEffects,
}

/// Group commit: runs decided close together commit in one store transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCommit {
    /// Runs in one transaction at most. Default 128.
    pub max_runs: usize,
    /// How long the first decided run of a batch may wait for others while more are being
    /// decided. A batch commits at once when nothing else is being decided, and whenever the
    /// previous commit finishes; this bounds the wait in between. Default 2 ms.
    pub max_wait: Duration,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            max_runs: 128,
            max_wait: Duration::from_millis(2),
        }
    }
}

/// Worker settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The consumer (group) name. Default: the handler's name.
    pub consumer: Option<String>,
    /// The topic. Default: the handler's `topic`; a worker with neither consumes nothing.
    pub topic: Option<String>,
    /// Deliveries being decided (their input loaded, the handler called) at once. Default 8.
    pub concurrency: usize,
    /// Deliveries held by the worker at once: fetched and waiting for their key's turn, being
    /// decided, committed, retried or acknowledged. Default 256.
    pub max_in_flight: usize,
    /// Group commit; `None` commits every run alone. Default on, [`GroupCommit::default`].
    pub group_commit: Option<GroupCommit>,
    /// When inputs are acknowledged. Default [`Acknowledge::AtCommit`].
    pub acknowledge: Acknowledge,
    /// How long one fetch waits for messages. Default 1 s.
    pub fetch_wait: Duration,
    /// How long a fetched message stays invisible to other workers without a heartbeat; the
    /// worker extends it every third of it while the delivery is in work, so it is how long a
    /// dead process's deliveries wait before they are delivered again. Default 10 s.
    pub visibility: Duration,
    /// Delays before a failed delivery is tried again in the worker (by attempt). Default:
    /// 500 ms doubling to 60 s.
    pub retry: Backoff,
    /// Attempts (deliveries by the broker plus retries in the worker) after which a message
    /// that keeps failing for reasons that may pass (a store that is down, a lock timeout) is
    /// dead-lettered with the last error; `None` retries forever. Default 50: with the default
    /// [`WorkerConfig::retry`] delays, about 45 minutes of trying — long enough to ride out a
    /// database restart or fail-over without dead-lettering what was in flight, short enough
    /// that a message the store keeps refusing for a reason it does not report as permanent
    /// does not hold its partition key for ever. What a user loses past it: nothing — the
    /// message is kept as a dead letter with the reason, and `effects dead-letters retry` sends
    /// it again — but its key's later messages run before it. Errors no retry can fix (invalid
    /// input, a store refusing the run's values) are dead-lettered at once, whatever this says.
    pub max_deliveries: Option<u32>,
    /// How long a delivery may keep failing (retried, or told "not yet") before the worker
    /// reports it as blocking its partition key: in the metric `effects_worker_blocked_inputs`,
    /// in the log, and to the store ([`Store::report_blocked`]), where `effects inputs blocked`
    /// lists which key, since when and why. Default 30 s.
    pub blocked_after: Duration,
    /// A loader's "not yet" ([`LoadError::NotYet`]): the delay before each new attempt, and in
    /// `max_attempts` how many attempts may say "not yet" before the message is dead-lettered
    /// with the reason. Default: 100 ms doubling to 10 s, 20 attempts (about two and a half
    /// minutes of waiting).
    pub not_yet: Backoff,
    /// Re-runs after a conflict (something the handler's input was loaded from changed before
    /// the commit): the delay before each, and in `max_attempts` how many re-runs at most before
    /// the message is dead-lettered with the conflict as its reason. Default: 2 ms doubling to
    /// 250 ms, at most 32 re-runs.
    pub reruns: Backoff,
    /// Run a [`Relay`](crate::relay::Relay) beside the worker with this configuration.
    /// Default: on, with [`RelayConfig::default`].
    pub relay: Option<RelayConfig>,
    /// The after-requests hook (registered on the executor) every run of this worker uses.
    pub after_requests: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            consumer: None,
            topic: None,
            concurrency: 8,
            max_in_flight: 256,
            group_commit: Some(GroupCommit::default()),
            acknowledge: Acknowledge::AtCommit,
            fetch_wait: Duration::from_secs(1),
            visibility: Duration::from_secs(10),
            retry: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(60),
                max_attempts: None,
            },
            max_deliveries: Some(50),
            blocked_after: Duration::from_secs(30),
            not_yet: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(10),
                max_attempts: Some(20),
            },
            reruns: Backoff {
                initial: Duration::from_millis(2),
                max: Duration::from_millis(250),
                max_attempts: Some(32),
            },
            relay: Some(RelayConfig::default()),
            after_requests: None,
        }
    }
}

/// What happened to one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Processed {
    /// The handler's effects were applied in `tx`; acknowledged.
    Applied {
        /// The run's transaction.
        tx: Tx,
    },
    /// The message had been processed before; the original run's pending rows were dispatched;
    /// acknowledged.
    Duplicate {
        /// The original run's transaction.
        tx: Tx,
    },
    /// It can never be processed: dead-lettered with the reason and acknowledged.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// It failed for now and was given back to the transport, to be delivered again after the
    /// delay ([`Worker::process`], or a worker stopping while the delivery waited for a retry).
    Retry {
        /// Why.
        error: String,
        /// When it comes back.
        delay: Duration,
    },
}

impl Processed {
    /// The `outcome` label of `effects_worker_deliveries_total`.
    fn label(&self) -> &'static str {
        match self {
            Processed::Applied { .. } => "applied",
            Processed::Duplicate { .. } => "duplicate",
            Processed::DeadLettered { .. } => "dead_lettered",
            Processed::Retry { .. } => "retried",
        }
    }
}

/// Counts of what a worker did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Deliveries received.
    pub deliveries: u64,
    /// Runs applied.
    pub applied: u64,
    /// Duplicates absorbed.
    pub duplicates: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Runs refused at commit because something their input was loaded from had changed.
    pub conflicts: u64,
    /// Handler calls made again on fresh inputs after a conflict.
    pub reruns: u64,
    /// Failed attempts tried again (in the worker, or given back to the transport).
    pub retried: u64,
    /// Store transactions that committed runs (group commits; a run committed alone counts
    /// one).
    pub commits: u64,
    /// Deliveries given back unstarted when the worker stopped.
    pub given_back: u64,
    /// Acknowledgements, give-backs or heartbeats the transport failed to take; those messages
    /// come back.
    pub transport_errors: u64,
    /// Fetches that failed.
    pub fetch_errors: u64,
}

#[derive(Default)]
struct Counters {
    deliveries: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    conflicts: AtomicU64,
    reruns: AtomicU64,
    retried: AtomicU64,
    commits: AtomicU64,
    given_back: AtomicU64,
    transport_errors: AtomicU64,
    fetch_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn report(&self) -> WorkerReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerReport {
            deliveries: get(&self.deliveries),
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            dead_lettered: get(&self.dead_lettered),
            conflicts: get(&self.conflicts),
            reruns: get(&self.reruns),
            retried: get(&self.retried),
            commits: get(&self.commits),
            given_back: get(&self.given_back),
            transport_errors: get(&self.transport_errors),
            fetch_errors: get(&self.fetch_errors),
        }
    }
}

/// A function told what happened to each delivery: see [`Worker::on_processed`].
pub type OnProcessed = Arc<dyn Fn(&Delivery, &Processed) + Send + Sync>;

/// What every stage shares: the executor, the handler, the inputs, the settings, the counts.
struct Inner<S, T, C, H, I> {
    executor: Arc<Executor<S, T, C>>,
    handler: Arc<H>,
    inputs: Arc<I>,
    config: WorkerConfig,
    counters: Counters,
    on_processed: Option<OnProcessed>,
}

/// Consumes a topic and runs a handler on each message. See the [module docs](self).
pub struct Worker<S, T, C, H, I = Decode> {
    inner: Arc<Inner<S, T, C, H, I>>,
}

impl<S, T, C, H, I> std::fmt::Debug for Worker<S, T, C, H, I>
where
    H: Handler,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("handler", &H::DESCRIPTOR.name)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl<S, T, C, H> Worker<S, T, C, H, Decode>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
{
    /// A worker running `handler`, decoding inputs with [`Handler::decode`].
    pub fn new(executor: Arc<Executor<S, T, C>>, handler: H) -> Self {
        Worker {
            inner: Arc::new(Inner {
                executor,
                handler: Arc::new(handler),
                inputs: Arc::new(Decode),
                config: WorkerConfig::default(),
                counters: Counters::default(),
                on_processed: None,
            }),
        }
    }
}

impl<S, T, C, H, I> Worker<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    /// Replaces the configuration.
    #[must_use]
    pub fn with_config(self, config: WorkerConfig) -> Self {
        self.rebuild(
            Arc::clone(&self.inner.inputs),
            config,
            self.inner.on_processed.clone(),
        )
    }

    /// Uses `inputs` to produce the handler's input (see [`LoadEntity`], [`LoadWith`]).
    pub fn load_with<I2: Inputs<H, S>>(self, inputs: I2) -> Worker<S, T, C, H, I2> {
        let config = self.inner.config.clone();
        self.rebuild(Arc::new(inputs), config, self.inner.on_processed.clone())
    }

    /// Calls `f` with every delivery and what happened to it, once the outcome is settled with
    /// the transport (acknowledged, dead-lettered or given back). Keep it quick: it runs on the
    /// task that settles the delivery.
    ///
    /// ```
    /// # use std::sync::{Arc, Mutex};
    /// # use effects_core::worker::{Processed, Worker};
    /// # use effects_core::transport::Delivery;
    /// # fn demo<S, T, C, H, I>(worker: Worker<S, T, C, H, I>) -> Worker<S, T, C, H, I>
    /// # where S: effects_core::Store + Clone, T: effects_core::Transport,
    /// #       C: effects_core::http::HttpClient + 'static, H: effects_core::Handler,
    /// #       I: effects_core::worker::Inputs<H, S> {
    /// let seen: Arc<Mutex<Vec<(String, Processed)>>> = Arc::default();
    /// let log = Arc::clone(&seen);
    /// worker.on_processed(move |delivery: &Delivery, processed: &Processed| {
    ///     if let Ok(mut log) = log.lock() {
    ///         log.push((delivery.message_id.clone(), processed.clone()));
    ///     }
    /// })
    /// # }
    /// ```
    #[must_use]
    pub fn on_processed(self, f: impl Fn(&Delivery, &Processed) + Send + Sync + 'static) -> Self {
        let config = self.inner.config.clone();
        self.rebuild(Arc::clone(&self.inner.inputs), config, Some(Arc::new(f)))
    }

    /// A new, not yet shared worker with the same executor and handler and these parts.
    fn rebuild<I2: Inputs<H, S>>(
        &self,
        inputs: Arc<I2>,
        config: WorkerConfig,
        on_processed: Option<OnProcessed>,
    ) -> Worker<S, T, C, H, I2> {
        Worker {
            inner: Arc::new(Inner {
                executor: Arc::clone(&self.inner.executor),
                handler: Arc::clone(&self.inner.handler),
                inputs,
                config,
                counters: Counters::default(),
                on_processed,
            }),
        }
    }

    /// The idempotency key of the run for a message of `topic` (for a handler without a
    /// business key): [`message_key`]`(handler, topic, message id)`.
    pub fn key_for(topic: &str, message_id: &str) -> String {
        message_key(H::DESCRIPTOR.name, topic, message_id)
    }

    /// The consumer name.
    pub fn consumer(&self) -> String {
        self.inner
            .config
            .consumer
            .clone()
            .unwrap_or_else(|| H::DESCRIPTOR.name.to_owned())
    }

    /// The topic, if any.
    pub fn topic(&self) -> Option<String> {
        self.inner
            .config
            .topic
            .clone()
            .or_else(|| H::DESCRIPTOR.topic.map(str::to_owned))
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.inner.handler
    }

    /// What the worker has done so far.
    pub fn report(&self) -> WorkerReport {
        self.inner.counters.report()
    }

    /// Processes one delivery completely, on its own: decides it, commits its run alone
    /// (re-running it after a conflict), acknowledges it or dead-letters it, and dispatches the
    /// run's requests and messages. A failure that may pass (a store error) gives the delivery
    /// back to the transport with the retry delay ([`Processed::Retry`]).
    pub async fn process(&self, delivery: Delivery) -> Processed {
        settle::process_alone(&self.inner, delivery).await
    }

    /// Consumes until `shutdown` resolves; then stops fetching, gives back what was fetched but
    /// not started, lets the work in flight finish, and returns the counts.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> WorkerReport {
        let Some(topic) = self.topic() else {
            tracing::error!(
                handler = H::DESCRIPTOR.name,
                "the worker has no topic: set WorkerConfig::topic"
            );
            return self.report();
        };
        pipeline::run(&self.inner, self.consumer(), topic, shutdown).await;
        self.report()
    }
}
