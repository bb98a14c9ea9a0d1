//! A worker process on PostgreSQL and NATS for the server fault tests
//! (tests/tests/server_faults.rs), killed with SIGKILL or stopped through stdin.
//!
//! ```text
//! effects-server-child --store URL --schema NAME --nats URL --stream NAME --events DIR
//!     --workload book|transfer|relay [--lose-acks PERCENT] [--visibility-ms N]
//!     [--concurrency N] [--mutant NAME] [--duplicate-window-ms N]
//!     [--lease-ms N] [--batch N] [--delay-before-ms N] [--delay-after-ms N]
//!     [--die-at-publish N] [--pause-at POINT --pause-ms N] [--worker-relay false]
//! ```
//!
//! `relay` runs only a relay (no worker): it dispatches what runs left pending, each publish
//! slowed by the given delays before and after it reaches NATS, and with `--die-at-publish N`
//! the process exits at the `N`th message published and not yet marked dispatched. With
//! `--pause-at POINT` (a fault point's name: `after_commit`, `after_claim`, ...) it prints
//! `PAUSE <at>` the first time the executor reaches that point and waits `--pause-ms` there
//! before going on, so that the parent can stop it (SIGSTOP) exactly there. `--worker-relay
//! false` runs a worker without the relay beside it.
//!
//! It counts at the source in `DIR/<pid>-<n>.events` (handler calls, publish attempts, fetched
//! deliveries, redeliveries, lost acknowledgements: [`effects_tests::harness::tally`]), loses
//! the first acknowledgement of `PERCENT` % of the input messages (chosen by id, the same in
//! every process, so they come back after the ack wait), prints `ready` once its worker runs,
//! and stops when stdin closes or says `STOP`.

use std::future::Future;
use std::io::BufRead as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use effects_core::executor::{Executor, FaultPoint, Mutant};
use effects_core::nats::{NatsConfig, NatsTransport, Reconnect};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::relay::{Relay, RelayConfig};
use effects_core::store::Tracked;
use effects_core::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};
use effects_core::worker::{LoadError, LoadWith, Worker, WorkerConfig};
use effects_core::{DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect};
use effects_tests::harness::book::{BookHandler, Requests};
use effects_tests::harness::child::say;
use effects_tests::harness::redeliver::{CountingTransport, Redeliveries};
use effects_tests::harness::tally::{HANDLER, Tally};
use serde::{Deserialize, Serialize};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The topic of the transfer workload's inputs.
pub const TRANSFERS: &str = "transfer-requests";

/// A transfer asked for: the input message's payload.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct TransferRequest {
    id: String,
    from: String,
    to: String,
    amount: i64,
}

#[derive(Clone, Debug, Deserialize)]
struct Account {
    id: String,
    balance: i64,
}

/// A transfer with both accounts as loaded.
#[derive(Clone, Debug, Deserialize)]
struct Transfer {
    id: String,
    from: Account,
    to: Account,
    amount: i64,
}

fn account(id: &str) -> LookupRef {
    LookupRef::new("account/id", id)
}

/// Books a transfer if the payer can afford it, with absolute balances computed from what was
/// loaded; records it either way (`booked` or `refused`). Keyed by the transfer's id. Counts its
/// calls by transfer id.
#[derive(Debug)]
struct TransferHandler {
    tally: Tally,
}

impl Handler for TransferHandler {
    type Input = Transfer;
    type Output = Effects;
    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "transfer",
        topic: Some(TRANSFERS),
        key: Some("transfer.id"),
        input: "Transfer",
        schemas: &[],
    };

    fn handle(&self, t: Transfer) -> Effects {
        self.tally.record(HANDLER, &t.id);
        let record = |status: &str| {
            DatomEffect::assert(
                LookupRef::new("transfer/id", t.id.as_str()),
                [("transfer/status", json!(status))],
            )
        };
        if t.from.balance < t.amount || t.from.id == t.to.id {
            return Effects::from(record("refused"));
        }
        Effects::from(DatomEffect::assert(
            account(&t.from.id),
            [("account/balance", json!(t.from.balance - t.amount))],
        ))
        .merge(DatomEffect::assert(
            account(&t.to.id),
            [("account/balance", json!(t.to.balance + t.amount))],
        ))
        .merge(record("booked"))
        .merge(MessageEffect::new("transfer-booked", json!({"id": t.id})).with_key(t.from.id))
    }

    fn key(&self, input: &Transfer) -> Option<String> {
        Some(input.id.clone())
    }
}

async fn load_transfer(
    r: TransferRequest,
    store: Tracked<PostgresStore>,
) -> Result<Transfer, LoadError> {
    let load =
        |id: String| {
            let store = store.clone();
            async move {
                let entity = store.entity(&account(&id), None).await?.ok_or_else(|| {
                    LoadError::NotFound {
                        what: format!("account {id}"),
                    }
                })?;
                entity.decode::<Account>().map_err(|e| LoadError::Invalid {
                    reason: format!("account {id}: {e}"),
                })
            }
        };
    let from = load(r.from).await?;
    let to = load(r.to).await?;
    Ok(Transfer {
        id: r.id,
        from,
        to,
        amount: r.amount,
    })
}

/// A transport whose publishes take `before` to reach the inner transport and `after` to
/// return once it acknowledged: a slow relay, so that a pause lands in the middle of its work.
#[derive(Clone, Debug)]
struct Slow<T> {
    inner: T,
    before: Duration,
    after: Duration,
}

impl<T: Transport + Clone> Transport for Slow<T> {
    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let (inner, before, after) = (self.inner.clone(), self.before, self.after);
        async move {
            if !before.is_zero() {
                tokio::time::sleep(before).await;
            }
            let published = inner.publish(message).await;
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            published
        }
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        self.inner.fetch(request)
    }

    fn ack(&self, d: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.ack(d)
    }

    fn nack(
        &self,
        d: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.nack(d, delay)
    }

    fn dead_letter(
        &self,
        d: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.dead_letter(d, reason)
    }

    fn ack_many(
        &self,
        deliveries: &[Delivery],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        self.inner.ack_many(deliveries)
    }

    fn extend(
        &self,
        d: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.extend(d, visibility)
    }
}

#[derive(Debug)]
struct Args {
    store: String,
    schema: String,
    nats: String,
    stream: String,
    events: std::path::PathBuf,
    transfer: bool,
    lose_acks: u64,
    visibility: Duration,
    concurrency: usize,
    mutant: Option<Mutant>,
    relay: bool,
    duplicate_window: Option<Duration>,
    lease: Option<Duration>,
    batch: usize,
    delay_before: Duration,
    delay_after: Duration,
    die_at_publish: Option<u64>,
    pause_at: Option<FaultPoint>,
    pause: Duration,
    worker_relay: bool,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        store: String::new(),
        schema: String::new(),
        nats: String::new(),
        stream: String::new(),
        events: std::path::PathBuf::new(),
        transfer: false,
        lose_acks: 0,
        visibility: Duration::from_secs(2),
        concurrency: 4,
        mutant: None,
        relay: false,
        duplicate_window: None,
        lease: None,
        batch: 100,
        delay_before: Duration::ZERO,
        delay_after: Duration::ZERO,
        die_at_publish: None,
        pause_at: None,
        pause: Duration::from_millis(500),
        worker_relay: true,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} `{value}`: {e}"))
        };
        match flag.as_str() {
            "--store" => a.store = value.clone(),
            "--schema" => a.schema = value.clone(),
            "--nats" => a.nats = value.clone(),
            "--stream" => a.stream = value.clone(),
            "--events" => a.events = value.into(),
            "--workload" => {
                a.transfer = value == "transfer";
                a.relay = value == "relay";
            }
            "--duplicate-window-ms" => {
                a.duplicate_window = Some(Duration::from_millis(number()?));
            }
            "--lease-ms" => a.lease = Some(Duration::from_millis(number()?)),
            "--batch" => a.batch = usize::try_from(number()?).unwrap_or(1),
            "--delay-before-ms" => a.delay_before = Duration::from_millis(number()?),
            "--delay-after-ms" => a.delay_after = Duration::from_millis(number()?),
            "--die-at-publish" => a.die_at_publish = Some(number()?),
            "--pause-at" => {
                a.pause_at = Some(
                    effects_tests::harness::child::fault_point(value)
                        .ok_or_else(|| format!("unknown fault point {value}"))?,
                );
            }
            "--pause-ms" => a.pause = Duration::from_millis(number()?),
            "--worker-relay" => {
                a.worker_relay = value
                    .parse()
                    .map_err(|e| format!("{flag} `{value}`: {e}"))?;
            }
            "--lose-acks" => a.lose_acks = number()?,
            "--visibility-ms" => a.visibility = Duration::from_millis(number()?),
            "--concurrency" => a.concurrency = usize::try_from(number()?).unwrap_or(1),
            "--mutant" => {
                a.mutant = Some(
                    Mutant::from_name(value).ok_or_else(|| format!("unknown mutant {value}"))?,
                );
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.store.is_empty() || a.nats.is_empty() || a.stream.is_empty() {
        return Err("--store, --nats and --stream are required".to_owned());
    }
    Ok(a)
}

/// The NATS settings every process of a test uses (the test too).
pub fn nats_config(url: &str, stream: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url).with_stream(stream, stream.to_ascii_lowercase());
    config.connect_timeout = Duration::from_secs(3);
    config.request_timeout = Duration::from_secs(2);
    config.reconnect = Reconnect {
        max_attempts: None,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(250),
    };
    config
}

async fn run(a: Args) -> Result<(), BoxError> {
    let mut options = PostgresOptions::new(&a.store);
    if !a.schema.is_empty() {
        options = options.with_schema(&a.schema);
    }
    let store = PostgresStore::connect(PostgresOptions {
        pool_size: a.concurrency + 4,
        connect_timeout: Duration::from_secs(2),
        pool_timeout: Duration::from_secs(5),
        statement_timeout: Some(Duration::from_secs(10)),
        ..options
    })
    .await?;
    let mut config = nats_config(&a.nats, &a.stream);
    if let Some(window) = a.duplicate_window {
        config.duplicate_window = window;
    }
    let nats = NatsTransport::connect(config).await?;
    let tally = Tally::in_dir(&a.events)?;
    let plan = Arc::new(Redeliveries::new(
        a.lose_acks,
        0,
        0,
        Duration::ZERO,
        std::path::PathBuf::new(),
        tally.clone(),
    ));
    let transport = Slow {
        inner: CountingTransport::new(nats, plan),
        before: a.delay_before,
        after: a.delay_after,
    };
    let mut builder = Executor::builder(store.clone(), transport);
    if let Some(m) = a.mutant {
        builder = builder.mutant(m);
    }
    if let Some(lease) = a.lease {
        builder = builder.lease(lease);
    }
    if a.die_at_publish.is_some() || a.pause_at.is_some() {
        let (die, pause_at, pause) = (a.die_at_publish, a.pause_at, a.pause);
        let hits = Arc::new(AtomicU64::new(0));
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        builder = builder.fault_hook(Arc::new(move |point: FaultPoint, at: &str| {
            if let Some(n) = die {
                if point == FaultPoint::AfterPublishBeforeMark
                    && hits.fetch_add(1, Ordering::SeqCst) + 1 == n
                {
                    say(&format!("FAULT {at}"));
                    std::process::exit(3);
                }
            }
            if pause_at == Some(point) && !paused.swap(true, Ordering::SeqCst) {
                say(&format!("PAUSE {at}"));
                // The parent stops the process meanwhile; then it goes on.
                std::thread::sleep(pause);
            }
        }));
    }
    let executor = Arc::new(builder.build());
    let config = WorkerConfig {
        concurrency: a.concurrency.max(1),
        fetch_wait: Duration::from_millis(50),
        visibility: a.visibility,
        relay: a.worker_relay.then(|| RelayConfig {
            interval: Duration::from_millis(100),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    };

    // Stop when stdin closes or says STOP (the parent's signal, or the parent is gone).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "STOP" => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = stop_tx.send(true);
    });
    let stopped = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    say("ready");
    if a.relay {
        let totals = Relay::new(executor)
            .with_config(RelayConfig {
                interval: Duration::from_millis(50),
                batch: a.batch.max(1),
                retention: None,
                ..RelayConfig::default()
            })
            .run(stopped)
            .await;
        say(&format!(
            "report relay rounds={} dispatched={}",
            totals.rounds, totals.dispatched.progress.messages_dispatched
        ));
        return Ok(());
    }
    let report = if a.transfer {
        Worker::new(executor, TransferHandler { tally })
            .with_config(config)
            .load_with(LoadWith::new(load_transfer))
            .run(stopped)
            .await
    } else {
        Worker::new(
            executor,
            BookHandler {
                tally,
                requests: Requests::None,
            },
        )
        .with_config(config)
        .run(stopped)
        .await
    };
    say(&format!(
        "report applied={} duplicates={} conflicts={} retried={} dead_lettered={}",
        report.applied, report.duplicates, report.conflicts, report.retried, report.dead_lettered
    ));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server child failed: {e}");
            ExitCode::from(1)
        }
    }
}
