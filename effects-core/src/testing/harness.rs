//! A test harness: a handler run through the real executor and worker, on a temporary SQLite
//! store with its log, HTTP endpoints on a wiremock server the harness starts.
//!
//! ```
//! use effects_core::testing::harness::Harness;
//! use effects_core::{effect_handler, effects, Datom, Message};
//! use serde::{Deserialize, Serialize};
//! use serde_json::json;
//!
//! #[derive(Deserialize, Serialize)]
//! pub struct Card { pub id: String }
//!
//! #[derive(Datom)]
//! #[datom(entity = "card")]
//! pub struct BlockedCard { #[datom(id)] pub id: String, pub status: String }
//!
//! #[derive(Serialize, Message)]
//! #[message(topic = "card-status-changed")]
//! pub struct StatusChanged { #[message(key)] pub card_id: String }
//!
//! effects! { pub BlockCard { datoms: [one BlockedCard], messages: [one StatusChanged] } }
//!
//! #[effect_handler(topic = "card-block-requested")]
//! pub fn block(card: &Card) -> effects![BlockCard] {
//!     BlockCard::builder()
//!         .blocked_card(BlockedCard { id: card.id.clone(), status: "blocked".into() })
//!         .status_changed(StatusChanged { card_id: card.id.clone() })
//!         .build()
//!         .into()
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let h = Harness::new().await;
//! let worker = h.worker(BlockHandler);
//!
//! // Delivered twice: applied once, then a duplicate of the same tx.
//! let (first, again) = h.deliver_twice(&worker, &Card { id: "c1".into() }).await;
//! assert!(first.is_applied() && again.is_duplicate());
//! assert_eq!(first.tx(), again.tx());
//! assert_eq!(h.handler_calls("block"), 1);
//!
//! let card = h.entity("card/id", "c1").await.expect("the card was written");
//! assert_eq!(card.get("card/status"), Some(&json!("blocked")));
//! let published = h.published("card-status-changed").await;
//! assert_eq!(published.len(), 1);
//! assert_eq!(published[0].payload, json!({"card_id": "c1"}));
//! # });
//! ```
//!
//! A crash at a boundary: the next run stops there as a process killed at that point would
//! (nothing after it happens, and nothing is acknowledged); [`Harness::restart`] then starts a
//! new executor on the same store, as the restarted process, and [`Harness::redeliver`] processes
//! what the broker hands out again.
//!
//! ```
//! # use effects_core::testing::harness::{Boundary, Harness};
//! # use effects_core::{effect_handler, effects, Datom, Message};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Deserialize, Serialize)] pub struct Card { pub id: String }
//! # #[derive(Datom)] #[datom(entity = "card")]
//! # pub struct BlockedCard { #[datom(id)] pub id: String, pub status: String }
//! # #[derive(Serialize, Message)] #[message(topic = "card-status-changed")]
//! # pub struct StatusChanged { #[message(key)] pub card_id: String }
//! # effects! { pub BlockCard { datoms: [one BlockedCard], messages: [one StatusChanged] } }
//! # #[effect_handler(topic = "card-block-requested")]
//! # pub fn block(card: &Card) -> effects![BlockCard] {
//! #     BlockCard::builder().blocked_card(BlockedCard { id: card.id.clone(), status: "blocked".into() })
//! #         .status_changed(StatusChanged { card_id: card.id.clone() }).build().into()
//! # }
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut h = Harness::new().await;
//! h.crash_at(Boundary::AfterCommit);
//! let crashed = h.deliver(&h.worker(BlockHandler), &Card { id: "c1".into() }).await;
//! assert!(crashed.is_crashed());
//!
//! h.restart();
//! let again = h.redeliver(&h.worker(BlockHandler)).await;
//! assert!(again[0].is_duplicate(), "the run committed before the crash: {again:?}");
//! assert_eq!(h.handler_calls("block"), 1);
//! assert_eq!(h.published("card-status-changed").await.len(), 1);
//! # });
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::datom::LookupRef;
use crate::effects::Effects;
use crate::executor::{AfterRequestsFn, Executor, FaultPoint, Mutant, RelayReport};
use crate::handler::{DecodeError, Handler};
use crate::http::{HttpConfig, ReqwestClient, RetryPolicy};
use crate::store::{DeadLetterEntry, Entity, Inspect, RunDetail, SqliteStore, Store, Tx};
use crate::transport::{
    Delivery, FetchRequest, HEADER_KEY, HEADER_TX, OutgoingMessage, SqliteLog, Transport,
};
use crate::worker::{Decode, Inputs, Processed, Worker, WorkerConfig};

/// The executor a harness runs.
pub type HarnessExecutor = Executor<SqliteStore, SqliteLog, ReqwestClient>;

/// A worker built by [`Harness::worker`].
pub type HarnessWorker<H, I = Decode> =
    Worker<SqliteStore, SqliteLog, ReqwestClient, Counted<H>, I>;

/// How long a fetched message stays invisible: after a crash, it comes back this soon.
const VISIBILITY: Duration = Duration::from_millis(300);

/// How long the harness waits for anything (a fetch, the relay to settle) before it gives up.
const PATIENCE: Duration = Duration::from_secs(10);

/// A point of the executor where [`Harness::crash_at`] stops a run as a crash would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Boundary {
    /// Inside the commit transaction, before `COMMIT`: nothing of the run is written.
    BeforeCommit,
    /// Right after the commit: the run is applied, nothing is dispatched or acknowledged.
    AfterCommit,
    /// After an HTTP response arrived, before it is recorded: the request was sent.
    AfterHttpBeforeRecord,
    /// After the broker took a message, before its row is marked dispatched (with a transport
    /// outside the store; the harness's log is inside it, so messages are written with the
    /// commit and this point is not reached).
    AfterPublishBeforeMark,
}

impl Boundary {
    fn point(self) -> FaultPoint {
        match self {
            Boundary::BeforeCommit => FaultPoint::BeforeCommit,
            Boundary::AfterCommit => FaultPoint::AfterCommit,
            Boundary::AfterHttpBeforeRecord => FaultPoint::AfterHttpBeforeRecord,
            Boundary::AfterPublishBeforeMark => FaultPoint::AfterPublishBeforeMark,
        }
    }
}

/// What happened to one delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// The worker processed it (applied, duplicate, dead-lettered or given back).
    Processed(Processed),
    /// The process "crashed" at this boundary while working on it: nothing after the boundary
    /// happened, and the message was not acknowledged.
    Crashed(Boundary),
}

impl Delivered {
    /// Whether its effects were applied.
    pub fn is_applied(&self) -> bool {
        matches!(self, Delivered::Processed(Processed::Applied { .. }))
    }

    /// Whether it was a duplicate of an applied run.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Delivered::Processed(Processed::Duplicate { .. }))
    }

    /// Whether it was dead-lettered.
    pub fn is_dead_lettered(&self) -> bool {
        matches!(self, Delivered::Processed(Processed::DeadLettered { .. }))
    }

    /// Whether the simulated crash hit it.
    pub fn is_crashed(&self) -> bool {
        matches!(self, Delivered::Crashed(_))
    }

    /// The run's transaction (applied or duplicate).
    pub fn tx(&self) -> Option<Tx> {
        match self {
            Delivered::Processed(Processed::Applied { tx } | Processed::Duplicate { tx }) => {
                Some(*tx)
            }
            _ => None,
        }
    }
}

/// A message the runs published, as a consumer of the log reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The message id, `key#n`.
    pub id: String,
    /// The partition key.
    pub key: Option<String>,
    /// The idempotency key of the run that published it.
    pub run_key: Option<String>,
    /// The run's transaction.
    pub tx: Option<Tx>,
    /// The payload, as JSON (a string if it is not JSON).
    pub payload: Value,
}

/// A handler whose calls are counted, so that a test can assert how often it ran (counted at
/// the source, not from what the store deduplicated). [`Harness::worker`] wraps handlers in it.
pub struct Counted<H> {
    handler: H,
    calls: Arc<AtomicU64>,
}

impl<H> fmt::Debug for Counted<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counted")
            .field("calls", &self.calls.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<H: Handler> Handler for Counted<H> {
    type Input = H::Input;
    type Output = H::Output;
    const DESCRIPTOR: &'static crate::handler::HandlerDescriptor = H::DESCRIPTOR;

    fn handle(&self, input: Self::Input) -> Self::Output {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.handler.handle(input)
    }

    fn key(&self, input: &Self::Input) -> Option<String> {
        self.handler.key(input)
    }

    fn decode(&self, payload: &[u8]) -> Result<Self::Input, DecodeError> {
        self.handler.decode(payload)
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "effects-harness-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("the harness cannot create {}: {e}", dir.display());
        }
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds a [`Harness`]: HTTP endpoints and after-requests hooks.
#[derive(Default)]
pub struct HarnessBuilder {
    endpoints: Vec<String>,
    hooks: Vec<(String, AfterRequestsFn)>,
    http_attempts: Option<u32>,
    keep: bool,
    mutant: Option<Mutant>,
}

impl fmt::Debug for HarnessBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HarnessBuilder")
            .field("endpoints", &self.endpoints)
            .field(
                "hooks",
                &self.hooks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl HarnessBuilder {
    /// An HTTP endpoint name; its base URL is the harness's wiremock server.
    #[must_use]
    pub fn endpoint(mut self, name: impl Into<String>) -> Self {
        self.endpoints.push(name.into());
        self
    }

    /// An after-requests hook, registered on every executor the harness builds.
    #[must_use]
    pub fn after_requests(
        mut self,
        name: impl Into<String>,
        hook: impl Fn(&[crate::store::RecordedRequest]) -> Vec<crate::MessageEffect>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.hooks.push((name.into(), Arc::new(hook)));
        self
    }

    /// Attempts the HTTP client makes per send before the request is retried later. Default 2.
    #[must_use]
    pub fn http_attempts(mut self, attempts: u32) -> Self {
        self.http_attempts = Some(attempts);
        self
    }

    /// Keeps the database file when the harness is dropped (to look at it with the `effects`
    /// CLI, say): [`Harness::path`] tells where it is.
    #[must_use]
    pub fn keep_database(mut self) -> Self {
        self.keep = true;
        self
    }

    /// Runs every executor with a deliberately broken behaviour, so that a test can show that
    /// its check fails without the guarantee it checks. Testing only.
    #[doc(hidden)]
    #[must_use]
    pub fn mutant(mut self, mutant: Mutant) -> Self {
        self.mutant = Some(mutant);
        self
    }

    /// Starts the wiremock server and opens the store. Panics with the reason if either fails.
    pub async fn build(self) -> Harness {
        let dir = TempDir::new();
        let path = dir.0.join("effects.db");
        let store = match SqliteStore::open(&path) {
            Ok(s) => s,
            Err(e) => panic!("the harness cannot open its store: {e}"),
        };
        let server = wiremock::MockServer::start().await;
        let policy = RetryPolicy {
            max_attempts: self.http_attempts.unwrap_or(2).max(1),
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            jitter: false,
        };
        let mut config = match HttpConfig::new().with_retry(policy) {
            Ok(c) => c,
            Err(e) => panic!("the harness's retry policy is refused: {e}"),
        };
        for name in &self.endpoints {
            config = match config.with_endpoint(name, &server.uri()) {
                Ok(c) => c,
                Err(e) => panic!("endpoint `{name}` is refused: {e}"),
            };
        }
        let http = match ReqwestClient::new(config) {
            Ok(c) => c,
            Err(e) => panic!("the harness's HTTP client does not build: {e}"),
        };
        let crash: Arc<Mutex<Crash>> = Arc::default();
        let owner = format!("harness-{}", std::process::id());
        let mut h = Harness {
            executor: Arc::new(build_executor(
                &store,
                http.clone(),
                &self.hooks,
                &owner,
                &crash,
                self.mutant,
            )),
            store,
            http,
            hooks: self.hooks,
            mutant: self.mutant,
            owner,
            crash,
            server,
            calls: Arc::default(),
            next_message: AtomicU64::new(1),
            path,
            dir: Some(dir),
        };
        if self.keep {
            if let Some(dir) = h.dir.take() {
                std::mem::forget(dir);
            }
        }
        h
    }
}

#[derive(Default)]
struct Crash {
    armed: Option<Boundary>,
    fired: Option<Boundary>,
}

fn build_executor(
    store: &SqliteStore,
    http: ReqwestClient,
    hooks: &[(String, AfterRequestsFn)],
    owner: &str,
    crash: &Arc<Mutex<Crash>>,
    mutant: Option<Mutant>,
) -> HarnessExecutor {
    let crash = Arc::clone(crash);
    let mut builder = Executor::builder(store.clone(), store.log())
        .http(http)
        .owner(owner)
        .lease(Duration::from_secs(5))
        .fault_hook(Arc::new(move |point, at| {
            let mut crash = crash.lock().unwrap_or_else(PoisonError::into_inner);
            if crash.armed.is_some_and(|b| b.point() == point) {
                crash.fired = crash.armed.take();
                drop(crash);
                panic!("simulated crash at {point:?} ({at})");
            }
        }));
    for (name, hook) in hooks {
        let hook = Arc::clone(hook);
        builder = builder.after_requests(name.clone(), move |recorded| hook(recorded));
    }
    if let Some(mutant) = mutant {
        builder = builder.mutant(mutant);
    }
    builder.build()
}

/// A real executor on a temporary SQLite store and log, with HTTP endpoints on a wiremock
/// server. See the [module documentation](self).
pub struct Harness {
    executor: Arc<HarnessExecutor>,
    store: SqliteStore,
    http: ReqwestClient,
    hooks: Vec<(String, AfterRequestsFn)>,
    mutant: Option<Mutant>,
    owner: String,
    crash: Arc<Mutex<Crash>>,
    server: wiremock::MockServer,
    calls: Arc<Mutex<HashMap<&'static str, Arc<AtomicU64>>>>,
    next_message: AtomicU64,
    path: PathBuf,
    dir: Option<TempDir>,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("path", &self.path)
            .field("server", &self.server.uri())
            .finish_non_exhaustive()
    }
}

/// Polls a future, turning a panic into `Err`: a simulated crash ends the work in progress
/// without ending the test.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

impl Harness {
    /// A harness without HTTP endpoints or hooks.
    pub async fn new() -> Harness {
        Harness::builder().build().await
    }

    /// Starts building one.
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder::default()
    }

    /// The store.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// The log in the store's database.
    pub fn log(&self) -> SqliteLog {
        self.store.log()
    }

    /// The executor (rebuilt by [`Harness::restart`]).
    pub fn executor(&self) -> &Arc<HarnessExecutor> {
        &self.executor
    }

    /// The wiremock server the HTTP endpoints point at: mount mocks on it, read what it
    /// received.
    pub fn server(&self) -> &wiremock::MockServer {
        &self.server
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A worker running `handler` on the handler's topic, with a short visibility timeout and
    /// no relay of its own (see [`Harness::settle`]); chain `.load_with(..)` for loaded inputs.
    pub fn worker<H: Handler>(&self, handler: H) -> HarnessWorker<H> {
        let calls = Arc::clone(
            self.calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(H::DESCRIPTOR.name)
                .or_default(),
        );
        Worker::new(Arc::clone(&self.executor), Counted { handler, calls }).with_config(
            WorkerConfig {
                concurrency: 1,
                max_in_flight: 1,
                // Through the transport, as with a broker: a crash between the commit and the
                // acknowledgement leaves the input to be delivered again, which is what the
                // harness's crash boundaries are for. (A worker on the embedded log
                // acknowledges inside the commit by default, where that cannot happen.)
                acknowledge: crate::worker::Acknowledge::AfterCommit,
                fetch_wait: Duration::from_millis(50),
                visibility: VISIBILITY,
                relay: None,
                retry: crate::executor::Backoff {
                    initial: Duration::from_millis(10),
                    max: Duration::from_millis(50),
                    max_attempts: None,
                },
                ..WorkerConfig::default()
            },
        )
    }

    /// How many times the handler named `name` was called through the harness's workers.
    pub fn handler_calls(&self, name: &str) -> u64 {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Runs seed effects (test data) under `key`; returns their transaction.
    pub async fn seed(&self, key: &str, effects: impl Into<Effects>) -> Tx {
        match self.executor.run(key, effects.into()).await {
            Ok(outcome) => outcome.tx(),
            Err(e) => panic!("seeding `{key}` failed: {e}"),
        }
    }

    /// Delivers `input` (serialized as JSON) to the worker's topic under a fresh message id and
    /// processes it.
    pub async fn deliver<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
        &self,
        worker: &HarnessWorker<H, I>,
        input: &impl Serialize,
    ) -> Delivered {
        let id = format!("m{}", self.next_message.fetch_add(1, Ordering::Relaxed));
        self.deliver_message(worker, &id, &json_bytes(input)).await
    }

    /// Publishes `payload` to the worker's topic with `message_id` and processes it. A payload
    /// need not be valid: the worker dead-letters what it cannot decode.
    pub async fn deliver_message<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
        &self,
        worker: &HarnessWorker<H, I>,
        message_id: &str,
        payload: &[u8],
    ) -> Delivered {
        let topic = topic_of(worker);
        let published = self
            .log()
            .publish(OutgoingMessage {
                id: message_id.to_owned(),
                topic: topic.clone(),
                partition_key: None,
                headers: BTreeMap::new(),
                payload: payload.to_vec(),
            })
            .await;
        if let Err(e) = published {
            panic!("publishing to `{topic}` failed: {e}");
        }
        let mut delivered = self.fetch_and_process(worker, 1).await;
        match delivered.pop() {
            Some(d) => d,
            None => panic!("message `{message_id}` on `{topic}` was not delivered"),
        }
    }

    /// Delivers `input` once and then once more, as a broker redelivering a message whose
    /// acknowledgement it did not see: the second delivery carries the same message id.
    pub async fn deliver_twice<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
        &self,
        worker: &HarnessWorker<H, I>,
        input: &impl Serialize,
    ) -> (Delivered, Delivered) {
        let id = format!("m{}", self.next_message.fetch_add(1, Ordering::Relaxed));
        let payload = json_bytes(input);
        let first = self.deliver_message(worker, &id, &payload).await;
        let topic = topic_of(worker);
        let logged = match self.log().messages(&topic).await {
            Ok(m) => m,
            Err(e) => panic!("reading `{topic}` failed: {e}"),
        };
        let Some(message) = logged.into_iter().find(|m| m.message_id == id) else {
            panic!("message `{id}` is not in `{topic}`");
        };
        let again = Delivery {
            consumer: worker.consumer(),
            topic,
            sequence: message.sequence,
            message_id: message.message_id,
            partition_key: message.partition_key,
            headers: message.headers,
            payload: message.payload,
            deliveries: 2,
        };
        let second = self.process(worker, again).await;
        (first, second)
    }

    /// Processes what the log hands the worker's consumer now, waiting up to the visibility
    /// timeout for messages a crash left unacknowledged.
    pub async fn redeliver<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
        &self,
        worker: &HarnessWorker<H, I>,
    ) -> Vec<Delivered> {
        self.fetch_and_process(worker, usize::MAX).await
    }

    async fn fetch_and_process<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
        &self,
        worker: &HarnessWorker<H, I>,
        max: usize,
    ) -> Vec<Delivered> {
        let request = FetchRequest {
            consumer: worker.consumer(),
            topic: topic_of(worker),
            max: max.min(64),
            visibility: VISIBILITY,
            wait: PATIENCE.min(VISIBILITY * 3),
        };
        let fetched = match self.log().fetch(request).await {
            Ok(d) => d,
            Err(e) => panic!("fetching from the log failed: {e}"),
        };
        let mut out = Vec::with_capacity(fetched.len());
        for delivery in fetched {
            out.push(self.process(worker, delivery).await);
        }
        out
    }

    async fn process<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
        &self,
        worker: &HarnessWorker<H, I>,
        delivery: Delivery,
    ) -> Delivered {
        let result = CatchUnwind(Box::pin(worker.process(delivery))).await;
        let fired = self
            .crash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fired
            .take();
        match (result, fired) {
            (_, Some(boundary)) => Delivered::Crashed(boundary),
            (Ok(processed), None) => Delivered::Processed(processed),
            (Err(()), None) => panic!("the worker panicked outside a simulated crash"),
        }
    }

    /// The next time the executor reaches `boundary`, the work in progress stops there as if
    /// the process were killed: nothing after it happens and nothing is acknowledged.
    pub fn crash_at(&self, boundary: Boundary) {
        self.crash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .armed = Some(boundary);
    }

    /// A new executor on the same store, as the restarted process (same owner name: it takes
    /// back the leases the crashed one held). Build workers again with [`Harness::worker`].
    pub fn restart(&mut self) {
        self.crash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .armed = None;
        self.executor = Arc::new(build_executor(
            &self.store,
            self.http.clone(),
            &self.hooks,
            &self.owner,
            &self.crash,
            self.mutant,
        ));
    }

    /// Runs relay rounds until no outbox row is pending, or gives up after 10 s (rows waiting
    /// for a retry delay count as pending). Returns what the rounds did.
    pub async fn settle(&self) -> RelayReport {
        let mut total = RelayReport::default();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let report = match CatchUnwind(Box::pin(self.executor.dispatch_due(100))).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => panic!("a relay round failed: {e}"),
                Err(()) => {
                    // A simulated crash inside the relay: what it held waits for a restart.
                    return total;
                }
            };
            total.claimed += report.claimed;
            total.finished_runs += report.finished_runs;
            total.progress.requests_sent += report.progress.requests_sent;
            total.progress.messages_dispatched += report.progress.messages_dispatched;
            total.progress.dead_lettered += report.progress.dead_lettered;
            let pending = match self.store.backlog().await {
                Ok(b) => b.pending_rows,
                Err(e) => panic!("reading the backlog failed: {e}"),
            };
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                total.progress.pending = usize::try_from(pending).unwrap_or(usize::MAX);
                return total;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The entity `attribute = value` as it is now.
    pub async fn entity(&self, attribute: &str, value: impl Into<Value>) -> Option<Entity> {
        let lookup = LookupRef::new(attribute, value);
        match self.store.entity(&lookup, None).await {
            Ok(e) => e,
            Err(e) => panic!("reading {lookup} failed: {e}"),
        }
    }

    /// The run with this key: its datoms, requests with recorded outcomes, messages.
    pub async fn run(&self, key: &str) -> Option<RunDetail> {
        match self.store.run_detail(key).await {
            Ok(r) => r,
            Err(e) => panic!("reading run `{key}` failed: {e}"),
        }
    }

    /// Every dead letter: outbox rows and inputs.
    pub async fn dead_letters(&self) -> Vec<DeadLetterEntry> {
        match self.store.dead_letters(usize::MAX).await {
            Ok(d) => d,
            Err(e) => panic!("reading dead letters failed: {e}"),
        }
    }

    /// Every message of `topic` in the log, in order, as a consumer reads it.
    pub async fn published(&self, topic: &str) -> Vec<Published> {
        let messages = match self.log().messages(topic).await {
            Ok(m) => m,
            Err(e) => panic!("reading `{topic}` failed: {e}"),
        };
        messages
            .into_iter()
            .map(|m| Published {
                run_key: m.headers.get(HEADER_KEY).cloned(),
                tx: m
                    .headers
                    .get(HEADER_TX)
                    .and_then(|t| t.parse().ok())
                    .map(Tx),
                payload: serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&m.payload).into_owned())
                }),
                id: m.message_id,
                key: m.partition_key,
            })
            .collect()
    }
}

fn json_bytes(input: &impl Serialize) -> Vec<u8> {
    match serde_json::to_vec(input) {
        Ok(b) => b,
        Err(e) => panic!("the input does not serialize to JSON: {e}"),
    }
}

fn topic_of<H: Handler, I: Inputs<Counted<H>, SqliteStore>>(
    worker: &HarnessWorker<H, I>,
) -> String {
    match worker.topic() {
        Some(t) => t,
        None => panic!(
            "handler `{}` consumes no topic: declare `#[effect_handler(topic = \"..\")]`",
            H::DESCRIPTOR.name
        ),
    }
}
