//! The main job of the `cards` binary (and of the tests of the `effects` CLI, which run it to
//! make a real store file): the card-blocking service end to end on one SQLite file,
//! with no servers.
//!
//! 1. Open the embedded store and the log transport in one database file.
//! 2. Seed one customer and her cards: a run of datoms like any other, with its own `tx`.
//! 3. Start two workers — `block` on `card-block-requested` and `block_all` on
//!    `customer-cards-block-requested` — that load their inputs from the store.
//! 4. Publish requests to the log as an upstream service would, including one whose first
//!    acknowledgement is lost (so it is delivered twice), one malformed payload and one card that
//!    is already blocked; wait until the workers acknowledged them all; shut the workers down.
//! 5. Read back what happened: the outcome of every delivery, the dead letters, the datom history
//!    and the messages the runs published.

use std::error::Error;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    BlockAllHandler, BlockAllInput, BlockHandler, Card, CardStatus, CardsBlockedNotify, Customer,
    StatusChanged,
};
use effects_core::executor::Executor;
use effects_core::store::{Colocation, HistoryDatom, SqliteStore, Store, Tracked, Tx};
use effects_core::transport::{
    DeadLetter, Delivery, FetchRequest, LoggedMessage, OutgoingMessage, SqliteLog, Transport,
    TransportError,
};
use effects_core::worker::{
    Acknowledge, LoadEntity, LoadError, LoadWith, Processed, Worker, WorkerConfig, WorkerReport,
};
use effects_core::{DatomEffect, Effects, Handler, LookupRef, Message};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

/// The errors of the job: the store's, the log's, or a worker that did not finish in time.
pub type JobError = Box<dyn Error + Send + Sync>;

/// The idempotency key of the seed run.
pub const SEED_KEY: &str = "seed:cards-demo";

/// The message whose first acknowledgement is lost: it is delivered twice.
pub const DELIVERED_TWICE: &str = "m1";

/// How long a delivery stays leased to a worker: the lost acknowledgement's message comes back
/// after this.
pub const VISIBILITY: Duration = Duration::from_millis(500);

/// How long the job waits for the workers to acknowledge what it published.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The payload on `card-block-requested`: which card to block. The worker loads the card.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRequest {
    /// The card.
    pub card_id: String,
}

/// The payload on `customer-cards-block-requested`: whose cards to block. The worker loads the
/// customer and every card she holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockAllRequest {
    /// The customer.
    pub customer_id: String,
}

/// Which handler a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `block`, one card.
    Block,
    /// `block_all`, every card of a customer.
    BlockAll,
}

/// A request the job publishes, as an upstream service would.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// The broker message id; the run's idempotency key is `handler:id`.
    pub message_id: &'static str,
    /// The handler that consumes it.
    pub target: Target,
    /// The payload, as published (not necessarily valid JSON).
    pub payload: &'static str,
    /// What it shows.
    pub purpose: &'static str,
}

/// The requests for `block`, in the order they are published.
pub const BLOCK_REQUESTS: [Request; 4] = [
    Request {
        message_id: DELIVERED_TWICE,
        target: Target::Block,
        payload: r#"{"card_id": "c1"}"#,
        purpose: "blocks c1; its first acknowledgement is lost, so it is delivered twice",
    },
    Request {
        message_id: "m2",
        target: Target::Block,
        payload: r#"{"card_id": "c3"}"#,
        purpose: "c3 is blocked already: the handler returns Empty",
    },
    Request {
        message_id: "m3",
        target: Target::Block,
        payload: r#"{"card_id": c2}"#,
        purpose: "malformed JSON: dead-lettered, the worker goes on",
    },
    Request {
        message_id: "m4",
        target: Target::Block,
        payload: r#"{"card_id": "c2"}"#,
        purpose: "blocks c2",
    },
];

/// The request for `block_all`, published once the `block` requests are done.
pub const BLOCK_ALL_REQUEST: Request = Request {
    message_id: "n1",
    target: Target::BlockAll,
    payload: r#"{"customer_id": "u1"}"#,
    purpose: "blocks every card of u1 still active (c4) and notifies her",
};

/// The seeded customer.
pub fn customer() -> Customer {
    Customer {
        id: "u1".into(),
        name: "Ana".into(),
    }
}

/// The seeded cards: three active, one blocked already.
pub fn cards() -> Vec<Card> {
    [
        ("c1", CardStatus::Active),
        ("c2", CardStatus::Active),
        ("c3", CardStatus::Blocked),
        ("c4", CardStatus::Active),
    ]
    .into_iter()
    .map(|(id, status)| Card {
        id: id.into(),
        customer_id: "u1".into(),
        status,
    })
    .collect()
}

/// The seed as effects: the customer (with the ids of her cards, so that the `block_all` worker
/// can load them) and each card, as datoms.
pub fn seed_effects(customer: &Customer, cards: &[Card]) -> Result<Effects, JobError> {
    let card_ids: Vec<&str> = cards.iter().map(|c| c.id.as_str()).collect();
    let mut effects = Effects::from(DatomEffect::assert(
        LookupRef::new("customer/id", customer.id.as_str()),
        [
            ("customer/name", json!(customer.name)),
            ("customer/cards", json!(card_ids)),
        ],
    ));
    for card in cards {
        effects = effects.merge(DatomEffect::assert(
            LookupRef::new("card/id", card.id.as_str()),
            [
                ("card/customer_id", json!(card.customer_id)),
                ("card/status", serde_json::to_value(card.status)?),
            ],
        ));
    }
    Ok(effects)
}

/// Loads the input of `block_all`: the customer and every card she holds, as they are now.
pub async fn load_customer_cards<S: Store>(
    request: BlockAllRequest,
    store: Tracked<S>,
) -> Result<BlockAllInput, LoadError> {
    let customer_ref = LookupRef::new("customer/id", request.customer_id);
    let entity = store
        .entity(&customer_ref, None)
        .await?
        .ok_or_else(|| LoadError::NotFound {
            what: format!("customer {customer_ref}"),
        })?;
    let customer: Customer = entity.decode().map_err(|e| LoadError::Invalid {
        reason: format!("{customer_ref} is not a customer: {e}"),
    })?;
    let card_ids: Vec<String> = match entity.get("customer/cards") {
        None => Vec::new(),
        Some(ids) => serde_json::from_value(ids.clone()).map_err(|e| LoadError::Invalid {
            reason: format!("customer/cards of {customer_ref} is not a list of card ids: {e}"),
        })?,
    };
    let mut cards = Vec::with_capacity(card_ids.len());
    for id in card_ids {
        let card_ref = LookupRef::new("card/id", id);
        let card = store
            .entity(&card_ref, None)
            .await?
            .ok_or_else(|| LoadError::NotFound {
                what: format!("card {card_ref} of {customer_ref}"),
            })?;
        cards.push(card.decode().map_err(|e| LoadError::Invalid {
            reason: format!("{card_ref} is not a card: {e}"),
        })?);
    }
    Ok(BlockAllInput { customer, cards })
}

/// The embedded log with one fault: the first acknowledgement of one message is lost, as when
/// the connection to a broker drops right after the run committed. The message stays leased,
/// comes back once its visibility timeout has passed, and the worker must not apply it again.
/// Everything else goes to the real log, and the log still lives in the store's database, so
/// runs publish their messages in the transaction that applies their datoms.
///
/// The fault is keyed on the broker's delivery count, so with several worker processes it is
/// injected once, in whichever process the first delivery reaches.
#[derive(Clone, Debug)]
pub struct LosesFirstAck<T = SqliteLog> {
    log: T,
    message_id: &'static str,
}

impl<T: Transport> LosesFirstAck<T> {
    /// `transport`, losing the first acknowledgement of `message_id`.
    pub fn new(transport: T, message_id: &'static str) -> Self {
        LosesFirstAck {
            log: transport,
            message_id,
        }
    }
}

impl<T: Transport> Transport for LosesFirstAck<T> {
    fn colocation(&self) -> Option<Colocation> {
        self.log.colocation()
    }

    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.publish(message)
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        self.log.fetch(request)
    }

    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        let lost = delivery.message_id == self.message_id && delivery.deliveries == 1;
        // Not polled when the acknowledgement is lost: nothing reaches the log.
        let ack = self.log.ack(delivery);
        async move {
            if lost {
                Err(TransportError::Unavailable {
                    reason: "the acknowledgement was lost on the way (injected fault)".into(),
                })
            } else {
                ack.await
            }
        }
    }

    fn nack(
        &self,
        delivery: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.nack(delivery, delay)
    }

    fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.dead_letter(delivery, reason)
    }

    fn extend(
        &self,
        delivery: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.extend(delivery, visibility)
    }
}

/// What happened to one delivery, as the worker reported it.
#[derive(Clone, Debug)]
pub struct Delivered {
    /// The handler that ran (or would have run).
    pub handler: &'static str,
    /// The broker message id.
    pub message_id: String,
    /// The run's idempotency key, `handler:message-id`.
    pub key: String,
    /// Which delivery of the message this was (1 for the first).
    pub delivery: u32,
    /// The outcome.
    pub processed: Processed,
}

/// A run applied in the store, with what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedRun {
    /// The idempotency key.
    pub key: String,
    /// Its transaction.
    pub tx: Tx,
    /// Entries it added to the datom history.
    pub datoms: usize,
    /// Messages it published.
    pub messages: usize,
}

/// Everything the job did, read back from the workers, the store and the log.
#[derive(Debug)]
pub struct Report {
    /// The database file.
    pub database: PathBuf,
    /// The seed run.
    pub seed: AppliedRun,
    /// Every delivery, in the order the workers finished them.
    pub deliveries: Vec<Delivered>,
    /// The runs the workers applied, in `tx` order.
    pub runs: Vec<AppliedRun>,
    /// Each worker's counts, after it stopped.
    pub workers: Vec<(&'static str, WorkerReport)>,
    /// The dead letters of both workers, from the log.
    pub dead_letters: Vec<DeadLetter>,
    /// The whole datom history, from the store.
    pub history: Vec<HistoryDatom>,
    /// The messages the runs published, from the log, in log order.
    pub published: Vec<LoggedMessage>,
    /// The cards as they are now, with the last transaction that changed each.
    pub cards: Vec<(Card, Tx)>,
}

impl Report {
    /// The deliveries found to be duplicates, with the original run's `tx`.
    pub fn duplicates(&self) -> impl Iterator<Item = (&Delivered, Tx)> {
        self.deliveries.iter().filter_map(|d| match d.processed {
            Processed::Duplicate { tx } => Some((d, tx)),
            _ => None,
        })
    }
}

/// A database path that does not exist yet, in the system's temporary directory.
pub fn fresh_database_path() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!("effects-cards-{}-{nanos}.db", std::process::id()))
}

/// Runs the whole job on a new database at `database` (which must not exist yet) and reports
/// what happened.
pub async fn run(database: &Path) -> Result<Report, JobError> {
    if database.exists() {
        return Err(format!(
            "{} already exists: the job seeds a fresh database; give a new path, or none",
            database.display()
        )
        .into());
    }
    let store = SqliteStore::open(database)?;
    let log = store.log();
    let transport = LosesFirstAck {
        log: log.clone(),
        message_id: DELIVERED_TWICE,
    };
    let executor = Arc::new(Executor::builder(store.clone(), transport).build());
    if !executor.publishes_inline() {
        return Err("the log does not share the store's database".into());
    }

    // Seeding is a run like any other: datoms with their tx.
    let customer = customer();
    let cards = cards();
    let seed_tx = executor
        .run(SEED_KEY, seed_effects(&customer, &cards)?)
        .await?
        .tx();

    let seen: Arc<Mutex<Vec<Delivered>>> = Arc::default();
    let config = WorkerConfig {
        // One delivery at a time, from fetch to acknowledgement, so that the printout is the
        // same on every run.
        concurrency: 1,
        max_in_flight: 1,
        // Through the transport, so that the lost acknowledgement of m1 can happen: by default
        // a log in the store's database is acknowledged inside the run's commit, and a
        // committed run's input is then never delivered again.
        acknowledge: Acknowledge::AfterCommit,
        fetch_wait: Duration::from_millis(100),
        visibility: VISIBILITY,
        ..WorkerConfig::default()
    };
    let block = Worker::new(Arc::clone(&executor), BlockHandler)
        .with_config(config.clone())
        .load_with(LoadEntity::new(|r: BlockRequest| {
            LookupRef::new("card/id", r.card_id)
        }))
        .on_processed(recorder(&seen, BlockHandler::DESCRIPTOR.name));
    let block_all = Worker::new(Arc::clone(&executor), BlockAllHandler)
        .with_config(WorkerConfig {
            // The `block` worker runs the relay; one per process is enough.
            relay: None,
            ..config
        })
        .load_with(LoadWith::new(load_customer_cards))
        .on_processed(recorder(&seen, BlockAllHandler::DESCRIPTOR.name));
    let block_topic = block.topic().ok_or("`block` consumes no topic")?;
    let block_all_topic = block_all.topic().ok_or("`block_all` consumes no topic")?;

    // The workers run until the requests are all acknowledged, then shut down gracefully.
    let (stop, stopped) = watch::channel(false);
    let upstream = async {
        let result = async {
            for request in BLOCK_REQUESTS {
                publish(&log, &block_topic, request).await?;
            }
            drained(&log, &block.consumer(), &block_topic).await?;
            publish(&log, &block_all_topic, BLOCK_ALL_REQUEST).await?;
            drained(&log, &block_all.consumer(), &block_all_topic).await
        }
        .await;
        // Stop the workers whatever happened.
        stop.send_replace(true);
        result
    };
    let (block_report, block_all_report, upstream) = tokio::join!(
        block.run(until(stopped.clone())),
        block_all.run(until(stopped)),
        upstream,
    );
    upstream?;

    let deliveries = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
    let history = store.history(None).await?;
    let written = |key: &str, tx: Tx| {
        history
            .iter()
            .filter(|d| d.tx == tx && d.run_key == key)
            .count()
    };
    let seed = AppliedRun {
        key: SEED_KEY.to_owned(),
        tx: seed_tx,
        datoms: written(SEED_KEY, seed_tx),
        messages: store.outbox(SEED_KEY).await?.len(),
    };
    let mut runs = Vec::new();
    for delivered in &deliveries {
        if let Processed::Applied { tx } = delivered.processed {
            runs.push(AppliedRun {
                key: delivered.key.clone(),
                tx,
                datoms: written(&delivered.key, tx),
                messages: store.outbox(&delivered.key).await?.len(),
            });
        }
    }
    runs.sort_by_key(|r| r.tx);

    let mut dead_letters = log.dead_letters(&block.consumer()).await?;
    dead_letters.extend(log.dead_letters(&block_all.consumer()).await?);
    let mut published = log.messages(StatusChanged::TOPIC).await?;
    published.extend(log.messages(CardsBlockedNotify::TOPIC).await?);
    published.sort_by_key(|m| m.sequence);

    let mut now = Vec::with_capacity(cards.len());
    for card in &cards {
        let card_ref = LookupRef::new("card/id", card.id.as_str());
        let entity = store
            .entity(&card_ref, None)
            .await?
            .ok_or_else(|| format!("{card_ref} disappeared from the store"))?;
        now.push((entity.decode::<Card>()?, entity.tx));
    }

    Ok(Report {
        database: database.to_owned(),
        seed,
        deliveries,
        runs,
        workers: vec![
            (BlockHandler::DESCRIPTOR.name, block_report),
            (BlockAllHandler::DESCRIPTOR.name, block_all_report),
        ],
        dead_letters,
        history,
        published,
        cards: now,
    })
}

/// Records every delivery of one handler's worker.
pub fn recorder(
    seen: &Arc<Mutex<Vec<Delivered>>>,
    handler: &'static str,
) -> impl Fn(&Delivery, &Processed) + Send + Sync + 'static {
    let seen = Arc::clone(seen);
    move |delivery: &Delivery, processed: &Processed| {
        let delivered = Delivered {
            handler,
            message_id: delivery.message_id.clone(),
            key: effects_core::handler::message_key(handler, &delivery.topic, &delivery.message_id),
            delivery: delivery.deliveries,
            processed: processed.clone(),
        };
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(delivered);
    }
}

/// Publishes a request to the log, as an upstream service would.
async fn publish(log: &SqliteLog, topic: &str, request: Request) -> Result<(), JobError> {
    log.publish(OutgoingMessage {
        id: request.message_id.to_owned(),
        topic: topic.to_owned(),
        partition_key: None,
        headers: Default::default(),
        payload: request.payload.as_bytes().to_vec(),
    })
    .await?;
    Ok(())
}

/// Waits until `consumer` has acknowledged every message of `topic` (dead letters included).
async fn drained(log: &SqliteLog, consumer: &str, topic: &str) -> Result<(), JobError> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = log.unacknowledged(consumer, topic).await?;
        if left == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "`{consumer}` still has {left} unacknowledged message(s) on `{topic}` after {}s",
                PATIENCE.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves once the job says stop.
pub async fn until(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone: stop as well.
    let _ = stopped.wait_for(|stop| *stop).await;
}
