//! The worker: consumes a topic and runs a [`Handler`] on every message, through the
//! [`Executor`].
//!
//! For each delivery, in a task of its own (at most [`WorkerConfig::concurrency`] at once):
//!
//! 1. The idempotency key is [`message_key`]`(handler, topic, message id)`, or, for a handler
//!    that declares a business key (`#[effect_handler(key = transfer.id)]`),
//!    [`business_key`]`(handler, key)`. If a run with that key exists, this is a redelivery
//!    (or the same input re-sent): the original run's pending rows are dispatched (duplicate
//!    path) and the message is acknowledged — the handler is not called again, so inputs that
//!    changed since cannot turn a redelivery into a different run.
//! 2. **Decode / load** the handler's input with the worker's [`Inputs`]: by default
//!    [`Handler::decode`] of the payload ([`Decode`]); or decode a small reference and load what
//!    the handler needs from the store ([`LoadEntity`], [`LoadWith`]) through a [`Tracked`]
//!    handle that records each entity read with its version.
//! 3. **Handle**: call the pure handler. A panic is caught.
//! 4. **Run** the effects with [`Executor::run_with`], passing the reads: the commit is refused
//!    if any of them changed since ([`RunError::Conflict`]), and the worker goes back to step 2
//!    (see [Concurrency](#concurrency)).
//! 5. **Acknowledge** — only after the run succeeded (or was a duplicate).
//!
//! What cannot succeed by retrying — an undecodable payload, a missing entity, a handler panic,
//! effects the executor refuses — is dead-lettered with its reason and acknowledged: never
//! retried forever, never crashing the worker. What may succeed later (a store error) is given
//! back with a backoff delay and redelivered.
//!
//! [`Worker::run`] stops fetching when its shutdown future resolves, gives back what it fetched
//! but did not start, and returns once the work in flight has finished. [`Worker::on_processed`]
//! registers a function told what happened to each delivery (for logs, metrics, or a program
//! that reports what it did).
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
//! dead-lettered with the conflict as its reason.
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

use std::any::type_name;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, field, info_span};

use crate::datom::LookupRef;
use crate::effects::Effects;
use crate::executor::{Backoff, Executor, RunError, RunOptions, RunOutcome};
use crate::handler::{DecodeError, Handler, business_key, message_key};
use crate::http::HttpClient;
use crate::relay::{Relay, RelayConfig};
use crate::store::{Store, StoreError, Tracked, Tx};
use crate::transport::{Delivery, FetchRequest, Transport};

/// Why a handler's input could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The payload is not a valid input (or reference): dead-lettered.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// What the payload refers to does not exist: dead-lettered.
    #[error("{what} was not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// What was loaded cannot be turned into the input: dead-lettered.
    #[error("cannot build the input: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
    /// The store failed: the message is given back and retried.
    #[error("the store failed while loading the input: {0}")]
    Store(#[from] StoreError),
}

impl LoadError {
    /// Whether retrying cannot help (the message is dead-lettered).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, LoadError::Store(_))
    }
}

/// How a worker turns a delivery into the handler's input: the "load inputs" hook.
///
/// The store comes as a [`Tracked`] handle: every entity read through it is recorded with the
/// version read, and the run commits only if none of them changed since (otherwise the worker
/// loads again and calls the handler again: see the [module docs](self#concurrency)).
pub trait Inputs<H: Handler, S: Store>: Send + Sync + 'static {
    /// The input for `delivery`.
    fn input(
        &self,
        handler: &H,
        delivery: &Delivery,
        store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send;
}

/// The default [`Inputs`]: the payload is the input, decoded with [`Handler::decode`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Decode;

impl<H: Handler, S: Store> Inputs<H, S> for Decode {
    fn input(
        &self,
        handler: &H,
        delivery: &Delivery,
        _store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let decoded = handler.decode(&delivery.payload).map_err(LoadError::from);
        async move { decoded }
    }
}

/// The name of `R` for errors: without its module path (`BlockRequest`, not
/// `cards::BlockRequest`), like the input names of handler descriptors; a generic type keeps its
/// full name.
fn reference_name<R>() -> &'static str {
    let full = type_name::<R>();
    if full.contains('<') {
        full
    } else {
        full.rsplit("::").next().unwrap_or(full)
    }
}

fn decode_reference<H: Handler, R: DeserializeOwned>(payload: &[u8]) -> Result<R, LoadError> {
    serde_json::from_slice(payload).map_err(|e| {
        LoadError::Decode(DecodeError {
            handler: H::DESCRIPTOR.name,
            input: reference_name::<R>(),
            reason: e.to_string(),
        })
    })
}

/// [`Inputs`] that decodes a reference `R` from the payload, turns it into a lookup ref and loads
/// that entity (as it is now); the input is the entity decoded with
/// [`Entity::decode`](crate::store::Entity::decode) — attribute names without their namespace,
/// the identity included. A missing entity is [`LoadError::NotFound`].
pub struct LoadEntity<R, F> {
    lookup: F,
    _reference: PhantomData<fn() -> R>,
}

impl<R, F> std::fmt::Debug for LoadEntity<R, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadEntity")
            .field("reference", &type_name::<R>())
            .finish_non_exhaustive()
    }
}

impl<R, F> LoadEntity<R, F>
where
    R: DeserializeOwned + Send + 'static,
    F: Fn(R) -> LookupRef + Send + Sync + 'static,
{
    /// Loads the entity `lookup(reference)` names.
    pub fn new(lookup: F) -> Self {
        LoadEntity {
            lookup,
            _reference: PhantomData,
        }
    }
}

impl<H, S, R, F> Inputs<H, S> for LoadEntity<R, F>
where
    H: Handler,
    S: Store + Clone,
    R: DeserializeOwned + Send + 'static,
    F: Fn(R) -> LookupRef + Send + Sync + 'static,
{
    fn input(
        &self,
        _handler: &H,
        delivery: &Delivery,
        store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let lookup = decode_reference::<H, R>(&delivery.payload).map(&self.lookup);
        async move {
            let lookup = lookup?;
            let entity = store
                .entity(&lookup, None)
                .await?
                .ok_or_else(|| LoadError::NotFound {
                    what: format!("entity {lookup}"),
                })?;
            entity.decode::<H::Input>().map_err(|e| LoadError::Invalid {
                reason: format!("entity {lookup} is not a `{}`: {e}", H::DESCRIPTOR.input),
            })
        }
    }
}

/// [`Inputs`] from a function: decodes a reference `R` from the payload and calls
/// `load(reference, store)` to produce the input. The store is a [`Tracked`] handle (a clone
/// sharing the attempt's record of reads): what `load` reads through it is validated at commit.
pub struct LoadWith<R, F> {
    load: F,
    _reference: PhantomData<fn() -> R>,
}

impl<R, F> std::fmt::Debug for LoadWith<R, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadWith")
            .field("reference", &type_name::<R>())
            .finish_non_exhaustive()
    }
}

impl<R, F> LoadWith<R, F> {
    /// Loads with `load`.
    pub fn new(load: F) -> Self {
        LoadWith {
            load,
            _reference: PhantomData,
        }
    }
}

impl<H, S, R, F, Fut> Inputs<H, S> for LoadWith<R, F>
where
    H: Handler,
    S: Store + Clone,
    R: DeserializeOwned + Send + 'static,
    F: Fn(R, Tracked<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<H::Input, LoadError>> + Send,
{
    fn input(
        &self,
        _handler: &H,
        delivery: &Delivery,
        store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let started = decode_reference::<H, R>(&delivery.payload)
            .map(|reference| (self.load)(reference, store.clone()));
        async move { started?.await }
    }
}

/// Worker settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The consumer (group) name. Default: the handler's name.
    pub consumer: Option<String>,
    /// The topic. Default: the handler's `topic`; a worker with neither consumes nothing.
    pub topic: Option<String>,
    /// Deliveries processed at once. Default 8.
    pub concurrency: usize,
    /// How long one fetch waits for messages. Default 1 s.
    pub fetch_wait: Duration,
    /// How long a fetched message stays invisible to other workers; longer than processing
    /// one message can take. Default 60 s.
    pub visibility: Duration,
    /// Delays before a failed delivery is redelivered (by delivery count). Default: 500 ms
    /// doubling to 60 s.
    pub retry: Backoff,
    /// Deliveries after which a message that keeps failing is dead-lettered; `None` (default)
    /// retries forever.
    pub max_deliveries: Option<u32>,
    /// Re-runs after a conflict (something the handler's input was loaded from changed before
    /// the commit): the delay before each, and in `max_attempts` how many re-runs at most before
    /// the message is dead-lettered with the conflict as its reason. Default: 2 ms doubling to
    /// 250 ms, at most 32 re-runs.
    pub reruns: Backoff,
    /// Run a [`Relay`] beside the worker with this configuration. Default: on, with
    /// [`RelayConfig::default`].
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
            fetch_wait: Duration::from_secs(1),
            visibility: Duration::from_secs(60),
            retry: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(60),
                max_attempts: None,
            },
            max_deliveries: None,
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
    /// It failed for now: given back, redelivered after the delay.
    Retry {
        /// Why.
        error: String,
        /// When it comes back.
        delay: Duration,
    },
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
    /// Deliveries given back to be retried.
    pub retried: u64,
    /// Acknowledgements (or give-backs) the transport failed to take; those messages come back.
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
    transport_errors: AtomicU64,
    fetch_errors: AtomicU64,
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
            transport_errors: get(&self.transport_errors),
            fetch_errors: get(&self.fetch_errors),
        }
    }
}

/// A function told what happened to each delivery: see [`Worker::on_processed`].
pub type OnProcessed = Arc<dyn Fn(&Delivery, &Processed) + Send + Sync>;

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
    /// the transport (acknowledged, dead-lettered or given back), from the task that processed
    /// it. Keep it quick: it runs inside the worker's concurrency limit.
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

    /// Processes one delivery completely (steps 1–5 of the [module docs](self)), including the
    /// acknowledgement, dead-lettering or give-back.
    pub async fn process(&self, delivery: Delivery) -> Processed {
        Inner::process(&self.inner, delivery).await
    }

    /// Consumes until `shutdown` resolves; then stops fetching, gives back what was fetched but
    /// not started, waits for the deliveries in flight to finish, and returns the counts.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> WorkerReport {
        let Some(topic) = self.topic() else {
            tracing::error!(
                handler = H::DESCRIPTOR.name,
                "the worker has no topic: set WorkerConfig::topic"
            );
            return self.report();
        };
        let consumer = self.consumer();
        let config = &self.inner.config;
        let span = info_span!("effects.worker", handler = H::DESCRIPTOR.name, %consumer, %topic);
        async {
            let relay_stop = Arc::new(tokio::sync::Notify::new());
            let relay_task = config.relay.map(|relay_config| {
                let relay = Relay::new(Arc::clone(&self.inner.executor)).with_config(relay_config);
                let stop = Arc::clone(&relay_stop);
                tokio::spawn(
                    async move { relay.run(async move { stop.notified().await }).await }
                        .in_current_span(),
                )
            });

            let concurrency = config.concurrency.max(1);
            let permits = Arc::new(Semaphore::new(concurrency));
            let mut tasks: JoinSet<()> = JoinSet::new();
            tokio::pin!(shutdown);
            let mut stopping = false;
            let mut fetch: Option<Pin<Box<dyn Future<Output = _> + Send + '_>>> = None;
            let mut fetch_failures: u32 = 0;
            loop {
                while let Some(done) = tasks.try_join_next() {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "a delivery task failed");
                    }
                }
                if fetch.is_none() && !stopping {
                    let free = permits.available_permits();
                    if free == 0 {
                        // Wait for a slot (or for shutdown).
                        tokio::select! {
                            () = &mut shutdown => stopping = true,
                            _ = tasks.join_next() => {}
                        }
                        continue;
                    }
                    let request = FetchRequest {
                        consumer: consumer.clone(),
                        topic: topic.clone(),
                        max: free,
                        visibility: config.visibility,
                        wait: config.fetch_wait,
                    };
                    fetch = Some(Box::pin(self.inner.executor.transport().fetch(request)));
                }
                let Some(pending) = fetch.as_mut() else {
                    break;
                };
                // A fetch in progress is never dropped: it may already hold leases.
                let fetched = tokio::select! {
                    () = &mut shutdown, if !stopping => { stopping = true; continue; }
                    fetched = pending => fetched,
                };
                fetch = None;
                let deliveries = match fetched {
                    Ok(d) => {
                        fetch_failures = 0;
                        d
                    }
                    Err(e) => {
                        self.inner
                            .counters
                            .fetch_errors
                            .fetch_add(1, Ordering::Relaxed);
                        fetch_failures = fetch_failures.saturating_add(1);
                        let delay = config.retry.delay(fetch_failures);
                        tracing::error!(error = %e, ?delay, "fetch failed");
                        if !stopping {
                            tokio::select! {
                                () = &mut shutdown => stopping = true,
                                () = tokio::time::sleep(delay) => {}
                            }
                        }
                        continue;
                    }
                };
                for delivery in deliveries {
                    if stopping {
                        // Fetched but not started: give it back at once.
                        if let Err(e) = self
                            .inner
                            .executor
                            .transport()
                            .nack(&delivery, Duration::ZERO)
                            .await
                        {
                            self.inner
                                .counters
                                .transport_errors
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "could not give back a delivery");
                        }
                        continue;
                    }
                    let permit = match Arc::clone(&permits).acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    };
                    let inner = Arc::clone(&self.inner);
                    tasks.spawn(
                        async move {
                            let _permit = permit;
                            Inner::process(&inner, delivery).await;
                        }
                        .in_current_span(),
                    );
                }
                if stopping {
                    break;
                }
            }
            // Finish the work in flight.
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a delivery task failed");
                }
            }
            relay_stop.notify_one();
            if let Some(task) = relay_task {
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "the relay task failed");
                }
            }
            tracing::info!(report = ?self.report(), "worker stopped");
            self.report()
        }
        .instrument(span)
        .await
    }
}

impl<S, T, C, H, I> Inner<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    async fn process(self: &Arc<Self>, delivery: Delivery) -> Processed {
        let span = info_span!(
            "effects.delivery",
            key = field::Empty,
            message_id = %delivery.message_id,
            deliveries = delivery.deliveries,
            tx = field::Empty,
        );
        self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
        let processed = self.decide(&delivery).instrument(span.clone()).await;
        if let Processed::Applied { tx } | Processed::Duplicate { tx } = &processed {
            span.record("tx", tx.0);
        }
        self.settle(&delivery, &processed).instrument(span).await;
        if let Some(on_processed) = &self.on_processed {
            on_processed(&delivery, &processed);
        }
        processed
    }

    /// The duplicate path for `key`, if a run with it exists.
    async fn resumed(&self, key: &str, delivery: &Delivery) -> Option<Processed> {
        tracing::Span::current().record("key", key);
        match self.executor.resume(key).await {
            Ok(Some(outcome)) => Some(Processed::Duplicate { tx: outcome.tx() }),
            Ok(None) => None,
            Err(e) => Some(self.retry(delivery, &e.to_string())),
        }
    }

    /// Steps 1–4: everything but the acknowledgement.
    async fn decide(&self, delivery: &Delivery) -> Processed {
        let executor = &self.executor;
        if let Some(max) = self.config.max_deliveries {
            if delivery.deliveries > max {
                return Processed::DeadLettered {
                    reason: format!("gave up after {} deliveries", delivery.deliveries - 1),
                };
            }
        }
        let name = H::DESCRIPTOR.name;
        // 1. A redelivery of a message whose run exists: the duplicate path. A handler keyed by
        //    its input's business key knows its key only once the input is loaded.
        let mut key = None;
        if H::DESCRIPTOR.key.is_none() {
            let k = message_key(name, &delivery.topic, &delivery.message_id);
            if let Some(done) = self.resumed(&k, delivery).await {
                return done;
            }
            key = Some(k);
        }
        let mut reruns: u32 = 0;
        loop {
            // 2. Decode / load, recording what is read.
            let tracked = Tracked::new(executor.store().clone());
            let input = match self
                .inputs
                .input(&self.handler, delivery, &tracked)
                .instrument(info_span!("effects.load"))
                .await
            {
                Ok(input) => input,
                Err(e) if e.is_permanent() => {
                    return Processed::DeadLettered {
                        reason: e.to_string(),
                    };
                }
                Err(e) => return self.retry(delivery, &e.to_string()),
            };
            let key = match &key {
                Some(k) => k.clone(),
                None => {
                    let Some(business) = self.handler.key(&input) else {
                        return Processed::DeadLettered {
                            reason: format!(
                                "handler `{name}` declares a business key but gave none for this input"
                            ),
                        };
                    };
                    let k = business_key(name, &business);
                    if let Some(done) = self.resumed(&k, delivery).await {
                        return done;
                    }
                    key = Some(k.clone());
                    k
                }
            };
            // 3. Handle.
            let effects = {
                let _handle = info_span!("effects.handle", handler = name).entered();
                match std::panic::catch_unwind(AssertUnwindSafe(|| -> Effects {
                    self.handler.handle(input).into()
                })) {
                    Ok(effects) => effects,
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a non-string panic".to_owned());
                        return Processed::DeadLettered {
                            reason: format!("handler `{name}` panicked: {what}"),
                        };
                    }
                }
            };
            // 4. Run, valid only if what was read still holds.
            let options = RunOptions {
                after_requests: self.config.after_requests.clone(),
                reads: tracked.reads(),
            };
            return match executor.run_with(key.clone(), effects, options).await {
                Ok(RunOutcome::Applied { tx, .. }) | Err(RunError::Incomplete { tx, .. }) => {
                    Processed::Applied { tx }
                }
                Ok(RunOutcome::Duplicate { original_tx, .. }) => {
                    Processed::Duplicate { tx: original_tx }
                }
                Err(RunError::Conflict { conflict, .. }) => {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::conflict(name);
                    if self
                        .config
                        .reruns
                        .max_attempts
                        .is_some_and(|max| reruns >= max)
                    {
                        Processed::DeadLettered {
                            reason: format!(
                                "gave up after {reruns} re-runs, each refused because its input had changed: {conflict}"
                            ),
                        }
                    } else {
                        // A handler is pure: calling it again on fresh inputs has no effect of
                        // its own, and nothing of the refused run was written.
                        reruns += 1;
                        self.counters.reruns.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::rerun(name);
                        let delay = self.config.reruns.delay(reruns);
                        tracing::debug!(%conflict, reruns, ?delay, "conflict: running the handler again on fresh inputs");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
                Err(RunError::KeyReuse { original_tx, .. }) => {
                    // Another delivery of this message was applied between step 1 and now, from
                    // inputs that have changed since: the original run stands.
                    tracing::warn!(%original_tx, "a concurrent delivery applied this message first");
                    match executor.resume(&key).await {
                        Ok(_) => Processed::Duplicate { tx: original_tx },
                        Err(e) => self.retry(delivery, &e.to_string()),
                    }
                }
                Err(e @ RunError::Invalid { .. }) => Processed::DeadLettered {
                    reason: e.to_string(),
                },
                Err(e @ RunError::Store { .. }) => self.retry(delivery, &e.to_string()),
            };
        }
    }

    fn retry(&self, delivery: &Delivery, error: &str) -> Processed {
        Processed::Retry {
            error: error.to_owned(),
            delay: self.config.retry.delay(delivery.deliveries),
        }
    }

    /// Step 5: acknowledge, dead-letter or give back.
    async fn settle(&self, delivery: &Delivery, processed: &Processed) {
        crate::metrics::delivery_settled(H::DESCRIPTOR.name, processed);
        let transport = self.executor.transport();
        let result = match processed {
            Processed::Applied { .. } => {
                self.counters.applied.fetch_add(1, Ordering::Relaxed);
                transport.ack(delivery).await
            }
            Processed::Duplicate { .. } => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                transport.ack(delivery).await
            }
            Processed::DeadLettered { reason } => {
                self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "dead-lettered");
                transport.dead_letter(delivery, reason).await
            }
            Processed::Retry { error, delay } => {
                self.counters.retried.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, ?delay, "will be retried");
                transport.nack(delivery, *delay).await
            }
        };
        if let Err(e) = result {
            self.counters
                .transport_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "the transport did not take the outcome: the message comes back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reference_name;

    #[test]
    fn reference_names_drop_the_module_path_unless_generic() {
        struct BlockRequest;
        assert_eq!(reference_name::<BlockRequest>(), "BlockRequest");
        assert_eq!(reference_name::<String>(), "String");
        assert_eq!(reference_name::<u64>(), "u64");
        assert!(reference_name::<Vec<BlockRequest>>().starts_with("alloc::vec::Vec<"));
    }
}
