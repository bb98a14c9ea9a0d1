//! The worker path measured end to end, against a hand-written consumer and against the worker
//! of an older build, in one run. Sections (arguments after `--`; several may be given):
//!
//! - **`servers`** (the default): NATS JetStream → one consumer process → PostgreSQL → NATS, 1
//!   datom (2 attributes) + 1 output message per run, 32 partitions, 1 000 customers, concurrency
//!   8. Four consumers, each on a fresh stream and schema:
//!   (a) the worker of another build (`--before <binary>`, see below; left out without it),
//!   (b) a hand-written consumer (no effects-core on its path, see [Hand-written consumer]),
//!   (b') the same numbering its transactions with a PostgreSQL sequence instead of the counter
//!   row (what the counter row costs a consumer that commits one run at a time),
//!   (c) the current [`Worker`] (`WorkerConfig::default()` apart from concurrency 8, a fetch
//!   wait of 100 ms and a visibility of 30 s).
//!   For each: **throughput** on a backlog (`N` inputs published at once, from the first publish
//!   to the last output read back), **latency** p50/p99 at half that throughput (inputs
//!   published at a steady rate for a few seconds, each carrying its publish time, measured to its
//!   output's arrival here), and the **CPU** each component spent during the backlog phase, per
//!   message: the consumer process, PostgreSQL (the postmaster listening on the URL's port, its
//!   children and the children it reaped, from `/proc/<pid>/stat` utime + stime + cutime +
//!   cstime), `nats-server` (the process listening on the URL's port) and this process.
//!   Printed: throughput, (c)/(a), (c)/(b) and (c)/(b'), latencies, CPU µs per message per
//!   component and the messages/s one core of each would carry at that cost.
//! - **`processes`**: the current worker in 1, 2 and 4 processes sharing one consumer group.
//! - **`http`**: as `servers` for (a) and (c), each run also sending one `POST` to an endpoint on
//!   loopback (a wiremock server in this process answering after 5 ms); every request is counted
//!   at the endpoint and each `Idempotency-Key` must arrive exactly once.
//! - **`hot`**: every input updates one entity under one partition key (a handler that loads the
//!   entity's counter through the tracked store and writes it plus one), for (a) and (c):
//!   throughput, and re-runs per applied run (`WorkerReport::reruns / applied`); the counter
//!   must end at the number of inputs (no lost update).
//! - **`embedded`**: the embedded default: the SQLite log → worker → SQLite store in the same
//!   file (`synchronous = FULL`), a backlog, against `Executor::run_batch` (100 per batch) with
//!   the same effects in this process; then the hot key on the embedded store, (a) and (c).
//! - **`all`**: every section.
//!
//! Add `quick` for a smoke run (small backlogs, short paced phases). `E2E_PACED_RATE=<msgs/s>`
//! paces every consumer's latency phase at that one rate instead of half its own throughput.
//!
//! Every output is checked to arrive exactly once, counted where it arrives (read back from NATS
//! by this process, or from the embedded log), and the outputs of one partition key in publish
//! order (reported as "order violations"). Every wait is bounded.
//!
//! # The worker of another build: `--before <binary>`
//!
//! The consumer processes are this binary started again with `EFFECTS_E2E_ROLE=worker` (or
//! `hand`, `embedded`) and `E2E_STREAM`, `E2E_PREFIX`, `E2E_SCHEMA`; a worker prints `ready`
//! (`ready protocol=2` from this file) and serves until its stdin closes, then prints its
//! `WorkerReport` (Debug) on stderr. `--before` starts another end_to_end binary instead for
//! (a), with the same environment. The binary of a commit before this bench existed (protocol 1,
//! such as `5c2fe32`) serves the `servers` and `processes` sections; the `http`, `hot` and
//! `embedded` sections need a binary that knows their handlers (protocol 2: it answers
//! `E2E_PROBE=1` with `protocol 2`), which is this bench file built against the older library
//! (a section leaves (a) out, saying why, when the binary cannot serve it). Build both beside
//! the working tree, with a target directory of their own, never touching the repository's
//! worktrees:
//!
//! ```sh
//! rm -rf /tmp/e2e-before && mkdir -p /tmp/e2e-before
//! git archive 5c2fe32 | tar -x -C /tmp/e2e-before
//! build() {
//!   (cd /tmp/e2e-before && CARGO_TARGET_DIR=/work/target-bench-before \
//!     cargo bench -p effects-core --features postgres,nats --bench end_to_end --no-run) &&
//!   cp "$(ls -t /work/target-bench-before/release/deps/end_to_end-* | grep -v '\.d$' | head -1)" "$1"
//! }
//! build /tmp/e2e-before/end_to_end-5c2fe32      # protocol 1: the commit's own bench
//! git show HEAD:effects-core/benches/end_to_end.rs > /tmp/e2e-before/effects-core/benches/end_to_end.rs
//! build /tmp/e2e-before/end_to_end-5c2fe32-p2   # protocol 2: this file, the old library
//! cargo bench -p effects-core --features postgres,nats --bench end_to_end -- \
//!   all --before /tmp/e2e-before/end_to_end-5c2fe32-p2
//! ```
//!
//! The hand-written consumer creates its NATS consumers before it reports ready; a worker
//! creates its partition consumers at its first fetch (33 creations, sent together), inside
//! the measured backlog phase.
//!
//! # Hand-written consumer
//!
//! What an experienced engineer would write with async-nats and tokio-postgres, in this binary
//! (role `hand`), nothing of effects-core on its path: one durable pull consumer per partition
//! (`<prefix>.msg.cards-seen.p<i>`, explicit acks, `max_ack_pending` 64) and one task per
//! partition reading it as a stream of pull batches (up to 64 messages each) and handling its
//! messages one after another, in order, so the messages of one key stay in publish order; 8
//! PostgreSQL connections shared by the 32 tasks (at most 8 messages in work at once, like the
//! worker's concurrency 8). Per message: one transaction with prepared statements that takes a
//! `tx` from the counter row (`UPDATE sequences .. RETURNING`), claims the key (`INSERT ..
//! effect_runs .. ON CONFLICT DO NOTHING`; a key already there is a redelivery: its outbox row is
//! published again if it was not marked, and the input acknowledged), writes the transaction
//! row, upserts the entity, writes two history rows and two attribute rows and the outbox row —
//! the executor's writes for this run — and commits; then publishes the output with
//! `Nats-Msg-Id: <key>#0` and waits for the stream's acknowledgement; then a second transaction
//! marks the outbox row dispatched and the run done; then acknowledges the input (a plain ack:
//! a lost ack redelivers the input, which the key claim absorbs). The schema is the store's,
//! migrated by this process. With `E2E_HAND_TX=sequence` (b') the `tx` comes from
//! `nextval('hand_tx')` instead of the counter row, which no longer serialises the commits.
//! `E2E_HAND_MUTANT=twice` in the bench's environment breaks it on purpose (every output
//! published a second time under another id), which the exactly-once check must catch:
//! `E2E_HAND_MUTANT=twice cargo bench ... --bench end_to_end -- quick` panics with
//! "arrived 2 times".
//!
//! Run: `cargo bench -p effects-core --features postgres,nats --bench end_to_end` (add
//! `-- quick` for a smoke run, section names to choose). Needs PostgreSQL on 127.0.0.1:5432 (user
//! postgres, trust; or `EFFECTS_POSTGRES_URL`) and NATS with JetStream on 127.0.0.1:4222 (or
//! `EFFECTS_NATS_URL`); the CPU figures need both on this machine (they read `/proc`).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull::MessagesErrorKind;

use effects_core::executor::{BatchItem, Executor};
use effects_core::handler::{Handler, HandlerDescriptor};
use effects_core::http::{HttpClient, HttpConfig, ReqwestClient};
use effects_core::nats::async_nats;
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::store::{SqliteStore, Store, Tracked};
use effects_core::transport::{OutgoingMessage, Transport};
use effects_core::worker::{LoadError, LoadWith, Processed, Worker, WorkerConfig, WorkerReport};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

const INPUT: &str = "cards-seen";
const OUTPUT: &str = "card-seen";
const PARTITIONS: u16 = 32;
const CUSTOMERS: usize = 1_000;
const CONCURRENCY: usize = 8;
const ROLE: &str = "EFFECTS_E2E_ROLE";
/// What a worker of this file understands beyond the first protocol (`E2E_HANDLER`, `E2E_STORE`,
/// the `hand` and `embedded` roles, `E2E_PROBE`).
const PROTOCOL: u32 = 2;
const HOT: &str = "hot";
/// The delay of the HTTP endpoint.
const HTTP_DELAY: Duration = Duration::from_millis(5);

fn postgres_url() -> String {
    std::env::var("EFFECTS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn nats_url() -> String {
    std::env::var("EFFECTS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set for this worker process"))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn nats_config(stream: &str, prefix: &str) -> NatsConfig {
    let mut config = NatsConfig::new(nats_url()).with_stream(stream, prefix);
    config.partitions = PARTITIONS;
    config
}

// ---------------------------------------------------------------------------------------------
// The handler the workers run.

/// An input: a card seen at a terminal. `count` is filled by the hot-key loader.
#[derive(Deserialize)]
struct Seen {
    id: String,
    customer_id: String,
    sent_at_us: u64,
    #[serde(default)]
    count: i64,
}

/// What the handler does besides recording the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Records the card and tells the customer's topic.
    Seen,
    /// The same, and one `POST /seen` to the endpoint `sink`.
    Http,
    /// Writes the counter of the one entity `card/id = hot` plus one (loaded through the
    /// tracked store) and tells the customer's topic.
    Hot,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Seen => "seen",
            Mode::Http => "http",
            Mode::Hot => "hot",
        }
    }

    fn from_env() -> Mode {
        match std::env::var("E2E_HANDLER").as_deref() {
            Ok("http") => Mode::Http,
            Ok("hot") => Mode::Hot,
            Ok("seen") | Err(_) => Mode::Seen,
            Ok(other) => panic!("unknown E2E_HANDLER {other:?}"),
        }
    }
}

/// The effects of one input, the same for the worker's handler and for `run_batch`.
fn seen_effects(mode: Mode, seen: &Seen) -> Effects {
    let datom = match mode {
        Mode::Hot => DatomEffect::assert(
            LookupRef::new("card/id", HOT),
            [
                ("card/seen_count", json!(seen.count + 1)),
                ("card/last_seen_us", json!(seen.sent_at_us)),
            ],
        ),
        Mode::Seen | Mode::Http => DatomEffect::assert(
            LookupRef::new("card/id", seen.id.clone()),
            [
                ("card/customer_id", json!(seen.customer_id)),
                ("card/last_seen_us", json!(seen.sent_at_us)),
            ],
        ),
    };
    let mut effects = Effects::from(datom).merge(
        MessageEffect::new(
            OUTPUT,
            json!({"card_id": seen.id, "sent_at_us": seen.sent_at_us}),
        )
        .with_key(seen.customer_id.clone()),
    );
    if mode == Mode::Http {
        effects = effects.merge(
            RequestEffect::new(Method::Post, "sink", "/seen")
                .with_body(json!({"card_id": seen.id})),
        );
    }
    effects
}

struct SeenHandler {
    mode: Mode,
}

impl Handler for SeenHandler {
    type Input = Seen;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "seen",
        topic: Some(INPUT),
        key: None,
        input: "Seen",
        schemas: &[],
    };

    fn handle(&self, seen: Seen) -> Effects {
        seen_effects(self.mode, &seen)
    }
}

/// The hot-key loader: the input, with the counter of `card/id = hot` as read now.
async fn load_hot<S: Store>(mut seen: Seen, store: Tracked<S>) -> Result<Seen, LoadError> {
    let lookup = LookupRef::new("card/id", HOT);
    let entity = store
        .entity(&lookup, None)
        .await?
        .ok_or_else(|| LoadError::NotFound {
            what: lookup.to_string(),
        })?;
    seen.count = entity
        .get("card/seen_count")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| LoadError::Invalid {
            reason: "card/seen_count is not an integer".into(),
        })?;
    Ok(seen)
}

/// The counter the hot-key runs end with.
async fn hot_count<S: Store>(store: &S) -> i64 {
    store
        .entity(&LookupRef::new("card/id", HOT), None)
        .await
        .expect("read the hot entity")
        .and_then(|e| e.get("card/seen_count").and_then(serde_json::Value::as_i64))
        .unwrap_or(-1)
}

/// What workers of this file share: the configuration the current defaults are measured with.
fn worker_config() -> WorkerConfig {
    let concurrency = std::env::var("E2E_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CONCURRENCY);
    let mut config = WorkerConfig {
        concurrency,
        fetch_wait: Duration::from_millis(100),
        visibility: Duration::from_secs(30),
        ..WorkerConfig::default()
    };
    // The group-commit settings, for choosing their defaults (`E2E_MAX_RUNS`, `E2E_MAX_WAIT_US`,
    // `E2E_IN_FLIGHT`; `E2E_MAX_RUNS=0` commits every run alone).
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(runs) = number("E2E_MAX_RUNS") {
        config.group_commit = (runs > 0).then(|| effects_core::worker::GroupCommit {
            max_runs: usize::try_from(runs).unwrap_or(usize::MAX),
            ..config.group_commit.unwrap_or_default()
        });
    }
    if let (Some(wait), Some(group)) = (number("E2E_MAX_WAIT_US"), config.group_commit.as_mut()) {
        group.max_wait = Duration::from_micros(wait);
    }
    if let Some(n) = number("E2E_IN_FLIGHT") {
        config.max_in_flight = usize::try_from(n).unwrap_or(usize::MAX);
    }
    config
}

/// Runs a worker until `stop`, counting applied runs in `applied`.
async fn drive<S, T, C, H, I>(
    worker: Worker<S, T, C, H, I>,
    applied: Arc<AtomicU64>,
    stop: impl std::future::Future<Output = ()>,
) -> WorkerReport
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: effects_core::worker::Inputs<H, S>,
{
    worker
        .on_processed(move |_, processed: &Processed| {
            if matches!(processed, Processed::Applied { .. }) {
                applied.fetch_add(1, Ordering::Relaxed);
            }
        })
        .run(stop)
        .await
}

/// A worker of `mode` on `store` and `transport`, until `stop`.
async fn serve<S: Store + Clone, T: Transport>(
    store: S,
    transport: T,
    mode: Mode,
    applied: Arc<AtomicU64>,
    stop: impl std::future::Future<Output = ()>,
) -> WorkerReport {
    let builder = Executor::builder(store, transport);
    let config = worker_config();
    match mode {
        Mode::Seen => {
            let worker = Worker::new(Arc::new(builder.build()), SeenHandler { mode });
            drive(worker.with_config(config), applied, stop).await
        }
        Mode::Http => {
            let url = env("E2E_HTTP_URL");
            let http = ReqwestClient::new(
                HttpConfig::new()
                    .with_endpoint("sink", &url)
                    .expect("the endpoint"),
            )
            .expect("the HTTP client");
            let worker = Worker::new(Arc::new(builder.http(http).build()), SeenHandler { mode });
            drive(worker.with_config(config), applied, stop).await
        }
        Mode::Hot => {
            let executor = Arc::new(builder.build());
            executor
                .run(
                    "hot-seed",
                    Effects::from(DatomEffect::assert(
                        LookupRef::new("card/id", HOT),
                        [("card/seen_count", json!(0))],
                    )),
                )
                .await
                .expect("seed the hot entity");
            let worker = Worker::new(executor, SeenHandler { mode })
                .with_config(config)
                .load_with(LoadWith::new(load_hot::<S>));
            drive(worker, applied, stop).await
        }
    }
}

/// A worker process on the servers: serves until its stdin closes.
fn worker_process() {
    if std::env::var("E2E_PROBE").is_ok() {
        println!("protocol {PROTOCOL}");
        return;
    }
    let stream = env("E2E_STREAM");
    let prefix = env("E2E_PREFIX");
    let schema = env("E2E_SCHEMA");
    let mode = Mode::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(async move {
        let store = PostgresStore::connect(PostgresOptions {
            pool_size: 10,
            ..PostgresOptions::new(postgres_url()).with_schema(&schema)
        })
        .await
        .expect("connect to PostgreSQL");
        let nats = NatsTransport::connect(nats_config(&stream, &prefix))
            .await
            .expect("connect to NATS");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = ready_rx.await;
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
            })
            .await;
        };
        let applied = Arc::new(AtomicU64::new(0));
        // Ready once the worker is built (and the hot entity seeded): `serve` is polled, and
        // announces readiness from the stop future's first poll.
        let announce = async move {
            println!("ready protocol={PROTOCOL}");
            std::io::stdout().flush().expect("stdout");
            let _ = ready_tx.send(());
        };
        let report = serve(store.clone(), nats, mode, applied, async move {
            announce.await;
            stop.await;
        })
        .await;
        eprintln!("worker {}: {report:?}", std::process::id());
        if mode == Mode::Hot {
            eprintln!("hot count: {}", hot_count(&store).await);
        }
    });
}

/// An embedded run in a process of its own: a fresh SQLite file with `E2E_BACKLOG` inputs in
/// its log, one worker until every input was applied; prints one `result` line.
fn embedded_process() {
    let dir = PathBuf::from(env("E2E_SQLITE_DIR"));
    let backlog: usize = env("E2E_BACKLOG").parse().expect("E2E_BACKLOG");
    let mode = Mode::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let scratch = dir.clone();
    runtime.block_on(async move {
        std::fs::create_dir_all(&dir).expect("the scratch directory");
        let store = SqliteStore::open(dir.join("worker.db")).expect("open the store");
        let log = store.log();
        for i in 0..backlog {
            log.publish(input(mode, i, 0))
                .await
                .expect("publish an input");
        }
        let applied = Arc::new(AtomicU64::new(0));
        let watched = Arc::clone(&applied);
        let started = Instant::now();
        let stop = async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            while watched.load(Ordering::Relaxed) < backlog as u64 {
                assert!(
                    Instant::now() < deadline,
                    "the embedded worker did not apply {backlog} inputs in 600 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let report = serve(store.clone(), store.log(), mode, applied, stop).await;
        let seconds = started.elapsed().as_secs_f64();
        // Counted where the outputs are: the log.
        let outputs = store.log().messages(OUTPUT).await.expect("read the log");
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in &outputs {
            let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            *seen
                .entry(body["card_id"].as_str().expect("card_id").to_owned())
                .or_default() += 1;
        }
        let once = seen.len() == backlog && seen.values().all(|&n| n == 1);
        let hot = if mode == Mode::Hot {
            hot_count(&store).await
        } else {
            -1
        };
        println!(
            "result seconds={seconds} applied={} reruns={} conflicts={} dead={} outputs={} \
             once={once} hot={hot} commits={}",
            report.applied,
            report.reruns,
            report.conflicts,
            report.dead_lettered,
            outputs.len(),
            report.commits
        );
    });
    let _ = std::fs::remove_dir_all(&scratch);
}

// ---------------------------------------------------------------------------------------------
// The hand-written consumer.

fn fatal(what: &str, e: impl std::fmt::Debug) -> ! {
    eprintln!("hand-written consumer: {what}: {e:?}");
    std::process::exit(2)
}

struct Statements {
    counter: tokio_postgres::Statement,
    claim: tokio_postgres::Statement,
    transaction: tokio_postgres::Statement,
    entity: tokio_postgres::Statement,
    history: tokio_postgres::Statement,
    attribute: tokio_postgres::Statement,
    outbox: tokio_postgres::Statement,
    pending: tokio_postgres::Statement,
    dispatched: tokio_postgres::Statement,
    done: tokio_postgres::Statement,
}

struct Conn {
    client: tokio_postgres::Client,
    st: Statements,
}

async fn hand_connection(schema: &str) -> Conn {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| fatal("connect to PostgreSQL", e));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(&format!(
            "SET search_path TO \"{schema}\"; \
             CREATE SEQUENCE IF NOT EXISTS hand_tx START WITH 1000000000"
        ))
        .await
        .unwrap_or_else(|e| fatal("search_path", e));
    let prepare = |sql: &'static str| {
        let client = &client;
        async move { client.prepare(sql).await.unwrap_or_else(|e| fatal(sql, e)) }
    };
    let sequence = std::env::var("E2E_HAND_TX").is_ok_and(|v| v == "sequence");
    let st = Statements {
        counter: if sequence {
            prepare("SELECT nextval('hand_tx')").await
        } else {
            prepare("UPDATE sequences SET value = value + 1 WHERE name = 'tx' RETURNING value")
                .await
        },
        claim: prepare(
            "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, \
             created_at_ms, updated_at_ms) VALUES ($1, 'x', $2, 'messages_pending', 1, $3, $3) \
             ON CONFLICT (key) DO NOTHING",
        )
        .await,
        transaction: prepare(
            "INSERT INTO transactions (tx, run_key, committed_at_ms) VALUES ($1, $2, $3)",
        )
        .await,
        entity: prepare(
            "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
             VALUES ('card/id', $1, $2, $2) ON CONFLICT (identity, identity_value) \
             DO UPDATE SET updated_tx = excluded.updated_tx RETURNING id",
        )
        .await,
        history: prepare(
            "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
             VALUES ($1, $2, $3, $4, true)",
        )
        .await,
        attribute: prepare(
            "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (entity_id, attribute) \
             DO UPDATE SET value = excluded.value, tx = excluded.tx",
        )
        .await,
        outbox: prepare(
            "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
             payload, tx, ready_seq, next_attempt_at_ms, created_at_ms) \
             VALUES ($1, $2, 0, 'message', $3, $4, '{}', $5, $6, $6, $7, $7)",
        )
        .await,
        pending: prepare(
            "SELECT id, partition_key, payload, tx FROM outbox \
             WHERE run_key = $1 AND dispatched_at_ms IS NULL",
        )
        .await,
        dispatched: prepare("UPDATE outbox SET dispatched_at_ms = $2 WHERE id = $1").await,
        done: prepare(
            "UPDATE effect_runs SET status = 'done', completed_at_ms = $2, updated_at_ms = $2 \
             WHERE key = $1",
        )
        .await,
    };
    Conn { client, st }
}

/// A fixed set of connections handed out one at a time.
struct Pool {
    give: tokio::sync::mpsc::Sender<Conn>,
    take: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Conn>>,
}

impl Pool {
    async fn take(&self) -> Conn {
        let mut take = self.take.lock().await;
        take.recv().await.unwrap_or_else(|| fatal("pool", "closed"))
    }

    fn give(&self, conn: Conn) {
        if self.give.try_send(conn).is_err() {
            fatal("pool", "full");
        }
    }
}

/// The partition of a key: FNV-1a (64 bit) modulo the partition count, as the transport
/// documents it.
fn partition_of(key: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash % u64::from(PARTITIONS)
}

fn now_ms() -> i64 {
    (now_us() / 1000) as i64
}

/// Publishes one output and waits for the stream's acknowledgement.
async fn hand_publish(
    js: &async_nats::jetstream::Context,
    prefix: &str,
    id: &str,
    key: &str,
    tx: i64,
    partition_key: &str,
    payload: String,
) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("effects-partition-key", partition_key);
    headers.insert("effects-key", key);
    headers.insert("effects-tx", tx.to_string().as_str());
    let subject = format!("{prefix}.msg.{OUTPUT}.p{}", partition_of(partition_key));
    js.publish_with_headers(subject, headers, payload.into())
        .await
        .unwrap_or_else(|e| fatal("publish", e))
        .await
        .unwrap_or_else(|e| fatal("publish acknowledgement", e));
}

async fn hand_message(
    conn: &mut Conn,
    js: &async_nats::jetstream::Context,
    prefix: &str,
    message: &async_nats::jetstream::Message,
) {
    let msg_id = message
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .find(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case("Nats-Msg-Id"))
        .and_then(|(_, values)| values.last())
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| fatal("input", "no Nats-Msg-Id"));
    let seen: Seen =
        serde_json::from_slice(&message.payload).unwrap_or_else(|e| fatal("decode", e));
    let key = format!("hand:{INPUT}:{msg_id}");
    let out_id = format!("{key}#0");
    let now = now_ms();
    let st = &conn.st;
    let tx = conn
        .client
        .transaction()
        .await
        .unwrap_or_else(|e| fatal("begin", e));
    let txid: i64 = tx
        .query_one(&st.counter, &[])
        .await
        .unwrap_or_else(|e| fatal("tx", e))
        .get(0);
    let claimed = tx
        .execute(&st.claim, &[&key, &txid, &now])
        .await
        .unwrap_or_else(|e| fatal("claim", e));
    if claimed == 0 {
        // A redelivery: publish what was not marked, then acknowledge.
        tx.rollback().await.unwrap_or_else(|e| fatal("rollback", e));
        let rows = conn
            .client
            .query(&st.pending, &[&key])
            .await
            .unwrap_or_else(|e| fatal("pending", e));
        for row in rows {
            let (id, pk, payload, tx): (String, String, String, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            hand_publish(js, prefix, &id, &key, tx, &pk, payload).await;
            conn.client
                .execute(&st.dispatched, &[&id, &now])
                .await
                .unwrap_or_else(|e| fatal("mark", e));
        }
    } else {
        let identity = serde_json::to_string(&seen.id).expect("json");
        let customer = serde_json::to_string(&seen.customer_id).expect("json");
        let last_seen = seen.sent_at_us.to_string();
        let payload = json!({"card_id": seen.id, "sent_at_us": seen.sent_at_us}).to_string();
        tx.execute(&st.transaction, &[&txid, &key, &now])
            .await
            .unwrap_or_else(|e| fatal("transaction", e));
        let entity_id: i64 = tx
            .query_one(&st.entity, &[&identity, &txid])
            .await
            .unwrap_or_else(|e| fatal("entity", e))
            .get(0);
        for (attribute, value) in [
            ("card/customer_id", &customer),
            ("card/last_seen_us", &last_seen),
        ] {
            tx.execute(&st.history, &[&txid, &entity_id, &attribute, value])
                .await
                .unwrap_or_else(|e| fatal("history", e));
            tx.execute(&st.attribute, &[&entity_id, &attribute, value, &txid])
                .await
                .unwrap_or_else(|e| fatal("attribute", e));
        }
        tx.execute(
            &st.outbox,
            &[
                &out_id,
                &key,
                &OUTPUT,
                &seen.customer_id,
                &payload,
                &txid,
                &now,
            ],
        )
        .await
        .unwrap_or_else(|e| fatal("outbox", e));
        tx.commit().await.unwrap_or_else(|e| fatal("commit", e));
        if std::env::var("E2E_HAND_MUTANT").is_ok_and(|m| m == "twice") {
            // A deliberately broken consumer, to see the bench's exactly-once check fail: the
            // output published a second time under another id.
            let copy = format!("{out_id}-copy");
            hand_publish(
                js,
                prefix,
                &copy,
                &key,
                txid,
                &seen.customer_id,
                payload.clone(),
            )
            .await;
        }
        hand_publish(js, prefix, &out_id, &key, txid, &seen.customer_id, payload).await;
        let tx = conn
            .client
            .transaction()
            .await
            .unwrap_or_else(|e| fatal("begin", e));
        tx.execute(&st.dispatched, &[&out_id, &now])
            .await
            .unwrap_or_else(|e| fatal("mark", e));
        tx.execute(&st.done, &[&key, &now])
            .await
            .unwrap_or_else(|e| fatal("done", e));
        tx.commit().await.unwrap_or_else(|e| fatal("commit", e));
    }
    message.ack().await.unwrap_or_else(|e| fatal("ack", e));
}

/// The hand-written consumer's process: serves until its stdin closes.
fn hand_process() {
    let stream = env("E2E_STREAM");
    let prefix = env("E2E_PREFIX");
    let schema = env("E2E_SCHEMA");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(async move {
        let client = async_nats::connect(nats_url())
            .await
            .unwrap_or_else(|e| fatal("connect to NATS", e));
        let js = async_nats::jetstream::new(client);
        let (give, take) = tokio::sync::mpsc::channel(CONCURRENCY);
        for _ in 0..CONCURRENCY {
            give.try_send(hand_connection(&schema).await)
                .unwrap_or_else(|_| fatal("pool", "full"));
        }
        let pool = Arc::new(Pool {
            give,
            take: tokio::sync::Mutex::new(take),
        });
        let handled = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for p in 0..PARTITIONS {
            use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
            let consumer = js
                .create_consumer_on_stream(
                    pull::Config {
                        durable_name: Some(format!("hand_p{p}")),
                        deliver_policy: DeliverPolicy::All,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(30),
                        filter_subject: format!("{prefix}.msg.{INPUT}.p{p}"),
                        max_ack_pending: 64,
                        ..pull::Config::default()
                    },
                    stream.as_str(),
                )
                .await
                .unwrap_or_else(|e| fatal("create a consumer", e));
            let (js, pool, prefix, handled) = (
                js.clone(),
                Arc::clone(&pool),
                prefix.clone(),
                Arc::clone(&handled),
            );
            tasks.spawn(async move {
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(64)
                    .messages()
                    .await
                    .unwrap_or_else(|e| fatal("pull", e));
                while let Some(message) = messages.next().await {
                    let message = message.unwrap_or_else(|e| fatal("pull", e));
                    let mut conn = pool.take().await;
                    hand_message(&mut conn, &js, &prefix, &message).await;
                    pool.give(conn);
                    handled.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        println!("ready protocol={PROTOCOL}");
        std::io::stdout().flush().expect("stdout");
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        })
        .await;
        tasks.abort_all();
        eprintln!(
            "hand-written consumer {}: handled {}",
            std::process::id(),
            handled.load(Ordering::Relaxed)
        );
    });
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc.

/// Clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (ppid, utime + stime, cutime + cstime) of a process, in clock ticks.
fn proc_stat(pid: u32) -> Option<(u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((u32::try_from(n(1)?).ok()?, n(11)? + n(12)?, n(13)? + n(14)?))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The process listening on TCP `port` (from /proc/net/tcp{,6} and the processes' sockets).
fn listener(port: u16) -> Option<u32> {
    let hex = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[1].ends_with(&hex) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    all_pids().into_iter().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            })
        })
    })
}

fn url_port(url: &str, default: u16) -> u16 {
    let after = url.split("://").nth(1).unwrap_or(url);
    let host = after.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    host.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default)
}

/// CPU ticks so far of a server: the process, its live children and the children it reaped.
fn tree_ticks(root: u32) -> u64 {
    let Some((_, own, reaped)) = proc_stat(root) else {
        return 0;
    };
    own + reaped
        + all_pids()
            .into_iter()
            .filter_map(proc_stat)
            .filter(|(ppid, _, _)| *ppid == root)
            .map(|(_, t, _)| t)
            .sum::<u64>()
}

#[derive(Clone, Copy, Default)]
struct CpuSample {
    consumer: u64,
    postgres: Option<u64>,
    nats: Option<u64>,
    bench: u64,
}

struct Servers {
    postgres: Option<u32>,
    nats: Option<u32>,
}

impl Servers {
    fn find() -> Servers {
        Servers {
            postgres: listener(url_port(&postgres_url(), 5432)),
            nats: listener(url_port(&nats_url(), 4222)),
        }
    }

    fn sample(&self, consumers: &[u32]) -> CpuSample {
        CpuSample {
            consumer: consumers
                .iter()
                .filter_map(|&p| proc_stat(p))
                .map(|(_, t, _)| t)
                .sum(),
            postgres: self.postgres.map(tree_ticks),
            nats: self.nats.and_then(proc_stat).map(|(_, t, _)| t),
            bench: proc_stat(std::process::id()).map_or(0, |(_, t, _)| t),
        }
    }
}

/// CPU µs per message of each component between two samples.
struct CpuCost {
    consumer: f64,
    postgres: Option<f64>,
    nats: Option<f64>,
    bench: f64,
}

impl CpuCost {
    fn between(a: CpuSample, b: CpuSample, messages: usize) -> CpuCost {
        let per = |ticks: u64| ticks as f64 / clock_ticks() * 1e6 / messages as f64;
        CpuCost {
            consumer: per(b.consumer.saturating_sub(a.consumer)),
            postgres: a
                .postgres
                .zip(b.postgres)
                .map(|(x, y)| per(y.saturating_sub(x))),
            nats: a.nats.zip(b.nats).map(|(x, y)| per(y.saturating_sub(x))),
            bench: per(b.bench.saturating_sub(a.bench)),
        }
    }

    fn total(&self) -> f64 {
        self.consumer + self.postgres.unwrap_or(0.0) + self.nats.unwrap_or(0.0) + self.bench
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "not found".to_owned(), |v| format!("{v:.0}"))
}

// ---------------------------------------------------------------------------------------------
// Consumer processes.

/// Which consumer a run measures.
#[derive(Clone, Debug)]
enum Consumer {
    /// (a): the worker of another build.
    Before(PathBuf),
    /// (b): the hand-written consumer.
    Hand,
    /// (b'): the hand-written consumer numbering transactions with a PostgreSQL sequence
    /// instead of the counter row.
    HandSequence,
    /// (c): the current worker.
    Current,
}

impl Consumer {
    fn label(&self) -> &'static str {
        match self {
            Consumer::Before(_) => "(a) worker, before",
            Consumer::Hand => "(b) hand-written",
            Consumer::HandSequence => "(b') hand-written, tx from a sequence",
            Consumer::Current => "(c) worker, current",
        }
    }
}

/// A consumer process, its stderr collected on a thread.
struct Proc {
    child: Child,
    stderr: std::thread::JoinHandle<String>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with its stderr if it exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new))
                .join()
                .unwrap_or_default();
            panic!("a consumer process exited during the run ({status}):\n{stderr}");
        }
    }

    /// Closes its stdin and waits (at most 60 s) for it to exit: its stderr.
    fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            match self.child.try_wait().expect("wait for a consumer process") {
                Some(status) => break status,
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    panic!("a consumer process did not stop within 60 s of its stdin closing");
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let stderr = self.stderr.join().unwrap_or_default();
        assert!(
            status.success(),
            "a consumer process failed ({status}):\n{stderr}"
        );
        stderr
    }
}

/// Starts a consumer process (`role`, with `envs`) and waits for its `ready` line: the
/// protocol it speaks (1 for a plain `ready`).
fn spawn(program: &Path, role: &str, envs: &[(&str, String)]) -> (Proc, u32) {
    let mut command = Command::new(program);
    command
        .env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let mut err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_default();
    let protocol = match line.trim() {
        "ready" => 1,
        l if l.starts_with("ready protocol=") => l["ready protocol=".len()..].parse().unwrap_or(1),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} (role {role}) did not start: {}",
                program.display(),
                stderr.join().unwrap_or_default()
            );
        }
    };
    (Proc { child, stderr }, protocol)
}

/// The protocol of a worker binary: 2 for one built from this file, 1 for an older bench.
fn probe(program: &Path) -> u32 {
    let out = Command::new(program)
        .env(ROLE, "worker")
        .env("E2E_PROBE", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("protocol ")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
}

/// `applied`, `reruns` and `conflicts` of the `WorkerReport`s and the hot counter in a worker's
/// stderr.
#[derive(Clone, Copy, Debug, Default)]
struct Report {
    applied: u64,
    reruns: u64,
    conflicts: u64,
    hot: Option<i64>,
}

fn field(text: &str, name: &str) -> Option<u64> {
    let at = text.find(&format!("{name}: "))? + name.len() + 2;
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

fn parse_report(stderr: &str) -> Report {
    let mut report = Report::default();
    for line in stderr.lines() {
        if line.contains("WorkerReport") {
            report.applied += field(line, "applied").unwrap_or(0);
            report.reruns += field(line, "reruns").unwrap_or(0);
            report.conflicts += field(line, "conflicts").unwrap_or(0);
        }
        if let Some(n) = line.strip_prefix("hot count: ") {
            report.hot = n.trim().parse().ok();
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------
// The pipeline on the servers.

fn input(mode: Mode, i: usize, sent_at_us: u64) -> OutgoingMessage {
    let customer = match mode {
        Mode::Hot => HOT.to_owned(),
        Mode::Seen | Mode::Http => format!("u{}", i % CUSTOMERS),
    };
    OutgoingMessage {
        id: format!("in-{i}"),
        topic: INPUT.to_owned(),
        partition_key: Some(customer.clone()),
        headers: BTreeMap::new(),
        payload: json!({"id": format!("c{i}"), "customer_id": customer, "sent_at_us": sent_at_us})
            .to_string()
            .into_bytes(),
    }
}

/// The outputs read back: per card, how often it arrived and its latency in µs; per partition
/// key, the last input number seen and how often one arrived after a later one.
struct Outputs {
    mode: Mode,
    cards: HashMap<String, (usize, u64)>,
    last_of_key: HashMap<String, usize>,
    order_violations: usize,
}

impl Outputs {
    fn new(mode: Mode) -> Outputs {
        Outputs {
            mode,
            cards: HashMap::new(),
            last_of_key: HashMap::new(),
            order_violations: 0,
        }
    }

    fn key_of(&self, i: usize) -> String {
        match self.mode {
            Mode::Hot => HOT.to_owned(),
            Mode::Seen | Mode::Http => format!("u{}", i % CUSTOMERS),
        }
    }
}

/// The outputs as the stream stores them: an ephemeral consumer of every output subject, no
/// acks, in stream order (so in the order each partition's outputs were stored).
type OutputStream = async_nats::jetstream::consumer::pull::Stream;

async fn output_reader(nats: &NatsTransport, stream: &str, prefix: &str) -> OutputStream {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
    nats.jetstream()
        .create_consumer_on_stream(
            pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                filter_subject: format!("{prefix}.msg.{OUTPUT}.>"),
                inactive_threshold: Duration::from_secs(120),
                ..pull::Config::default()
            },
            stream,
        )
        .await
        .expect("create the output reader")
        .stream()
        .max_messages_per_batch(256)
        .expires(Duration::from_secs(2))
        .heartbeat(Duration::from_millis(500))
        .messages()
        .await
        .expect("read outputs")
}

/// Reads outputs until `until` distinct cards arrived in `out` (or `limit` passed): the time
/// the last one arrived.
async fn read_outputs(
    reader: &mut OutputStream,
    procs: &mut [Proc],
    out: &mut Outputs,
    until: usize,
    limit: Duration,
) -> Instant {
    let deadline = Instant::now() + limit;
    let mut last = Instant::now();
    while out.cards.len() < until && Instant::now() < deadline {
        for proc in procs.iter_mut() {
            proc.check_alive();
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        let message = match tokio::time::timeout(wait, reader.next()).await {
            Err(_) => continue,
            Ok(None) => panic!("the output reader ended"),
            // A heartbeat the reader missed (this process busy publishing, say) is reported
            // once; the stream goes on pulling.
            Ok(Some(Err(e))) if e.kind() == MessagesErrorKind::MissingHeartbeat => continue,
            Ok(Some(message)) => message.expect("read an output"),
        };
        let arrived = now_us();
        let body: serde_json::Value = serde_json::from_slice(&message.payload).expect("json");
        let card = body["card_id"].as_str().expect("card_id").to_owned();
        let sent = body["sent_at_us"].as_u64().expect("sent_at_us");
        let i: usize = card[1..].parse().expect("card number");
        let key = out.key_of(i);
        match out.last_of_key.get(&key) {
            Some(&before) if before > i => out.order_violations += 1,
            _ => {
                out.last_of_key.insert(key, i);
            }
        }
        let entry = out
            .cards
            .entry(card)
            .or_insert((0, arrived.saturating_sub(sent)));
        entry.0 += 1;
        last = Instant::now();
    }
    last
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// What one pipeline run is asked to do.
struct Plan {
    consumer: Consumer,
    mode: Mode,
    processes: usize,
    backlog: usize,
    /// The paced phase, if any.
    paced_for: Option<Duration>,
}

/// What one pipeline run measured.
struct Measured {
    throughput: f64,
    paced: usize,
    rate: f64,
    p50: f64,
    p99: f64,
    cpu: CpuCost,
    report: Report,
    order_violations: usize,
    /// HTTP requests received (each `Idempotency-Key` checked to arrive once).
    requests: Option<usize>,
}

fn drop_schema_sql(schema: &str) -> String {
    format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")
}

/// Drops a run's schema (at most 30 s; a schema left behind is only clutter).
async fn drop_schema(schema: &str) {
    let drop = async {
        if let Ok((client, connection)) =
            tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await
        {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let _ = client.batch_execute(&drop_schema_sql(schema)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), drop)
        .await
        .is_err()
    {
        eprintln!("schema {schema} was not dropped within 30 s: drop it by hand");
    }
}

async fn pipeline(plan: &Plan, run: usize) -> Measured {
    let pid = std::process::id();
    let stream = format!("E2E_{pid}_{run}");
    let prefix = format!("e2e{pid}r{run}");
    let schema = format!("e2e_{pid}_{run}");
    let (program, role) = match &plan.consumer {
        Consumer::Before(path) => (path.clone(), "worker"),
        Consumer::Hand | Consumer::HandSequence => {
            (std::env::current_exe().expect("current_exe"), "hand")
        }
        Consumer::Current => (std::env::current_exe().expect("current_exe"), "worker"),
    };
    // Migrate here for the current library's consumers, so several processes do not queue on
    // the migration lock; another build's worker migrates its own schema.
    let migrate = !matches!(plan.consumer, Consumer::Before(_));
    if migrate {
        drop(
            PostgresStore::connect(PostgresOptions::new(postgres_url()).with_schema(&schema))
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "this benchmark needs PostgreSQL at {} (user postgres, trust auth): {e}",
                        postgres_url()
                    )
                }),
        );
    }
    let nats = NatsTransport::connect(nats_config(&stream, &prefix))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "this benchmark needs NATS with JetStream at {}: {e}; start one with \
                 `nats-server -js -p 4222 -sd <dir>`",
                nats_url()
            )
        });
    let sink = if plan.mode == Mode::Http {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(wiremock::ResponseTemplate::new(200).set_delay(HTTP_DELAY))
            .mount(&server)
            .await;
        Some(server)
    } else {
        None
    };
    let mut envs = vec![
        ("E2E_STREAM", stream.clone()),
        ("E2E_PREFIX", prefix.clone()),
        ("E2E_SCHEMA", schema.clone()),
        ("E2E_HANDLER", plan.mode.name().to_owned()),
        ("E2E_CONCURRENCY", CONCURRENCY.to_string()),
    ];
    if let Some(sink) = &sink {
        envs.push(("E2E_HTTP_URL", sink.uri()));
    }
    if matches!(plan.consumer, Consumer::HandSequence) {
        envs.push(("E2E_HAND_TX", "sequence".to_owned()));
    }
    let mut procs: Vec<Proc> = (0..plan.processes)
        .map(|_| {
            let (proc, protocol) = spawn(&program, role, &envs);
            assert!(
                plan.mode == Mode::Seen || protocol >= 2,
                "{} speaks protocol {protocol}: it cannot run the {} handler",
                program.display(),
                plan.mode.name()
            );
            proc
        })
        .collect();
    let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
    let mut reader = output_reader(&nats, &stream, &prefix).await;
    let servers = Servers::find();

    // Throughput: a backlog.
    let mut out = Outputs::new(plan.mode);
    let before = servers.sample(&pids);
    let started = Instant::now();
    let sent = now_us();
    // Inputs of distinct keys are published together; the hot key's one after another, so its
    // publish order is the order its outputs are checked against.
    let together = if plan.mode == Mode::Hot { 1 } else { 64 };
    for chunk in (0..plan.backlog).collect::<Vec<_>>().chunks(together) {
        let publishes = chunk
            .iter()
            .map(|&i| nats.publish(input(plan.mode, i, sent)));
        for result in futures_util::future::join_all(publishes).await {
            result.expect("publish an input");
        }
    }
    let last = read_outputs(
        &mut reader,
        &mut procs,
        &mut out,
        plan.backlog,
        Duration::from_secs(600),
    )
    .await;
    let after = servers.sample(&pids);
    assert_eq!(
        out.cards.len(),
        plan.backlog,
        "{}: every input's output arrived within 600 s",
        plan.consumer.label()
    );
    let throughput = plan.backlog as f64 / (last - started).as_secs_f64();
    let cpu = CpuCost::between(before, after, plan.backlog);

    // Latency: a steady rate of half the throughput, or of `E2E_PACED_RATE` messages/s (the
    // same rate for every consumer, to compare their latencies at one load).
    let (mut paced, mut rate, mut latencies) = (0, 0.0, Vec::new());
    if let Some(paced_for) = plan.paced_for {
        rate = std::env::var("E2E_PACED_RATE")
            .ok()
            .and_then(|r| r.parse::<f64>().ok())
            .filter(|r| *r > 0.0)
            .unwrap_or(throughput / 2.0);
        paced = ((rate * paced_for.as_secs_f64()) as usize).max(20);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut paced_out = Outputs::new(plan.mode);
        paced_out.last_of_key = std::mem::take(&mut out.last_of_key);
        let publisher = {
            let (nats, mode, from) = (nats.clone(), plan.mode, plan.backlog);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for i in from..from + paced {
                    tick.tick().await;
                    nats.publish(input(mode, i, now_us()))
                        .await
                        .expect("publish an input");
                }
            })
        };
        read_outputs(
            &mut reader,
            &mut procs,
            &mut paced_out,
            paced,
            paced_for + Duration::from_secs(120),
        )
        .await;
        publisher.await.expect("publisher");
        assert_eq!(
            paced_out.cards.len(),
            paced,
            "{}: every paced input's output arrived",
            plan.consumer.label()
        );
        for (card, (count, latency)) in &paced_out.cards {
            assert!(
                !out.cards.contains_key(card),
                "{card} arrived in both phases"
            );
            assert_eq!(*count, 1, "{card} arrived {count} times");
            latencies.push(*latency);
        }
        out.order_violations += paced_out.order_violations;
        out.last_of_key = paced_out.last_of_key;
    }
    // Anything late or twice shows up here.
    read_outputs(
        &mut reader,
        &mut procs,
        &mut out,
        usize::MAX,
        Duration::from_millis(500),
    )
    .await;
    for (card, (count, _)) in &out.cards {
        assert_eq!(
            *count,
            1,
            "{}: {card} arrived {count} times",
            plan.consumer.label()
        );
    }
    assert_eq!(
        out.cards.len() + latencies.len(),
        plan.backlog + paced,
        "{}: an output of an input never published arrived",
        plan.consumer.label()
    );
    latencies.sort_unstable();

    let requests = match &sink {
        Some(server) => {
            let received = server.received_requests().await.unwrap_or_default();
            let mut keys: HashMap<String, usize> = HashMap::new();
            for r in &received {
                let key = r
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("(none)")
                    .to_owned();
                *keys.entry(key).or_default() += 1;
            }
            if let Some((key, n)) = keys.iter().find(|(_, n)| **n != 1) {
                panic!(
                    "{}: Idempotency-Key {key} arrived {n} times",
                    plan.consumer.label()
                );
            }
            assert_eq!(
                received.len(),
                plan.backlog + paced,
                "{}: one request per run at the endpoint",
                plan.consumer.label()
            );
            Some(received.len())
        }
        None => None,
    };

    let mut report = Report::default();
    for proc in procs {
        let r = parse_report(&proc.stop());
        report.applied += r.applied;
        report.reruns += r.reruns;
        report.conflicts += r.conflicts;
        report.hot = report.hot.or(r.hot);
    }
    if plan.mode == Mode::Hot {
        assert_eq!(
            report.hot,
            Some((plan.backlog + paced) as i64),
            "{}: a lost update: the hot counter must end at the number of inputs",
            plan.consumer.label()
        );
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        nats.jetstream().delete_stream(&stream),
    )
    .await;
    drop_schema(&schema).await;
    Measured {
        throughput,
        paced,
        rate,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        cpu,
        report,
        order_violations: out.order_violations,
        requests,
    }
}

// ---------------------------------------------------------------------------------------------
// Sections.

struct Options {
    quick: bool,
    before: Option<PathBuf>,
    before_protocol: u32,
}

impl Options {
    /// The consumers a section compares: (a) when given and able to, then the others.
    fn consumers(&self, hand: bool, needs_protocol: u32) -> Vec<Consumer> {
        let mut out = Vec::new();
        match &self.before {
            Some(path) if self.before_protocol >= needs_protocol => {
                out.push(Consumer::Before(path.clone()));
            }
            Some(path) => println!(
                "(a) left out: {} speaks protocol {}, this section needs {needs_protocol} (see \
                 the bench's docs for how to build it)",
                path.display(),
                self.before_protocol
            ),
            None => println!("(a) left out: no `--before <binary>` given"),
        }
        if hand {
            out.push(Consumer::Hand);
            out.push(Consumer::HandSequence);
        }
        out.push(Consumer::Current);
        out
    }
}

fn ratio(results: &[(Consumer, Measured)], of: &str, to: &str) -> String {
    let find = |l: &str| results.iter().find(|(c, _)| c.label().starts_with(l));
    match (find(of), find(to)) {
        (Some((_, a)), Some((_, b))) => format!("{:.2}x", a.throughput / b.throughput),
        _ => "-".to_owned(),
    }
}

fn servers_section(rt: &tokio::runtime::Runtime, o: &Options, run: &mut usize) {
    let (backlog, paced_for) = if o.quick {
        (300, Duration::from_secs(2))
    } else {
        (3_000, Duration::from_secs(6))
    };
    println!(
        "\n## servers: NATS -> 1 consumer process (concurrency {CONCURRENCY}) -> PostgreSQL -> \
         NATS; 1 datom + 1 message per run, {PARTITIONS} partitions, {CUSTOMERS} customers; \
         load average at start {}",
        load_average()
    );
    let mut results = Vec::new();
    for consumer in o.consumers(true, 1) {
        *run += 1;
        let m = rt.block_on(pipeline(
            &Plan {
                consumer: consumer.clone(),
                mode: Mode::Seen,
                processes: 1,
                backlog,
                paced_for: Some(paced_for),
            },
            *run,
        ));
        results.push((consumer, m));
    }
    println!(
        "\n| consumer | backlog | throughput msgs/s | paced messages | paced rate msgs/s | latency p50 ms | latency p99 ms | order violations |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, m) in &results {
        println!(
            "| {} | {backlog} | {:.0} | {} | {:.0} | {:.1} | {:.1} | {} |",
            c.label(),
            m.throughput,
            m.paced,
            m.rate,
            m.p50,
            m.p99,
            m.order_violations
        );
    }
    println!(
        "\n(c)/(a) throughput: {}; (c)/(b) throughput: {}; (c)/(b') throughput: {}",
        ratio(&results, "(c)", "(a)"),
        ratio(&results, "(c)", "(b)"),
        ratio(&results, "(c)", "(b')")
    );
    println!(
        "\nCPU per message during the backlog phase, µs (clock ticks of {:.0} Hz, so ±{:.0} µs \
         per message at this backlog):",
        clock_ticks(),
        1e6 / clock_ticks() / backlog as f64
    );
    println!(
        "| consumer | consumer process | PostgreSQL (all its processes) | nats-server | bench process (publisher, reader) | total | messages/s per core of the consumer | of PostgreSQL | of nats-server |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let per_core = |us: Option<f64>| match us {
        Some(us) if us > 0.0 => format!("{:.0}", 1e6 / us),
        _ => "-".to_owned(),
    };
    for (c, m) in &results {
        println!(
            "| {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            c.label(),
            m.cpu.consumer,
            opt(m.cpu.postgres),
            opt(m.cpu.nats),
            m.cpu.bench,
            m.cpu.total(),
            per_core(Some(m.cpu.consumer)),
            per_core(m.cpu.postgres),
            per_core(m.cpu.nats),
        );
    }
    println!("\nload average at end: {}", load_average());
}

fn processes_section(rt: &tokio::runtime::Runtime, o: &Options, run: &mut usize) {
    let (backlog, paced_for) = if o.quick {
        (300, Duration::from_secs(2))
    } else {
        (3_000, Duration::from_secs(6))
    };
    println!(
        "\n## processes: NATS -> current worker processes (concurrency {CONCURRENCY} each, one \
         group) -> PostgreSQL -> NATS; load average at start {}",
        load_average()
    );
    println!(
        "\n| worker processes | backlog messages | throughput msgs/s | vs 1 process | paced messages | paced rate msgs/s | latency p50 ms | latency p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut base = None;
    for processes in [1, 2, 4] {
        *run += 1;
        let m = rt.block_on(pipeline(
            &Plan {
                consumer: Consumer::Current,
                mode: Mode::Seen,
                processes,
                backlog,
                paced_for: Some(paced_for),
            },
            *run,
        ));
        let base = *base.get_or_insert(m.throughput);
        println!(
            "| {processes} | {backlog} | {:.0} | {:.2}x | {} | {:.0} | {:.1} | {:.1} |",
            m.throughput,
            m.throughput / base,
            m.paced,
            m.rate,
            m.p50,
            m.p99
        );
    }
    println!("\nload average at end: {}", load_average());
}

fn http_section(rt: &tokio::runtime::Runtime, o: &Options, run: &mut usize) {
    let (backlog, paced_for) = if o.quick {
        (300, Duration::from_secs(2))
    } else {
        (3_000, Duration::from_secs(6))
    };
    println!(
        "\n## http: as servers, each run also one POST to a loopback endpoint answering in {} ms; \
         load average at start {}",
        HTTP_DELAY.as_millis(),
        load_average()
    );
    let mut results = Vec::new();
    for consumer in o.consumers(false, 2) {
        *run += 1;
        let m = rt.block_on(pipeline(
            &Plan {
                consumer: consumer.clone(),
                mode: Mode::Http,
                processes: 1,
                backlog,
                paced_for: Some(paced_for),
            },
            *run,
        ));
        results.push((consumer, m));
    }
    println!(
        "\n| consumer | backlog | throughput msgs/s | paced rate msgs/s | latency p50 ms | latency p99 ms | requests at the endpoint (each key once) | order violations |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, m) in &results {
        println!(
            "| {} | {backlog} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} |",
            c.label(),
            m.throughput,
            m.rate,
            m.p50,
            m.p99,
            m.requests.unwrap_or(0),
            m.order_violations
        );
    }
    println!(
        "\n(c)/(a) throughput: {}\n\nload average at end: {}",
        ratio(&results, "(c)", "(a)"),
        load_average()
    );
}

fn rerun_ratio(r: &Report) -> String {
    if r.applied == 0 {
        "-".to_owned()
    } else {
        format!("{:.2}", r.reruns as f64 / r.applied as f64)
    }
}

fn hot_section(rt: &tokio::runtime::Runtime, o: &Options, run: &mut usize) {
    let backlog = if o.quick { 200 } else { 1_000 };
    println!(
        "\n## hot: every input updates card/id = hot (one partition key, the counter loaded \
         through the tracked store), NATS -> 1 worker process -> PostgreSQL -> NATS; load \
         average at start {}",
        load_average()
    );
    let mut results = Vec::new();
    for consumer in o.consumers(false, 2) {
        *run += 1;
        let m = rt.block_on(pipeline(
            &Plan {
                consumer: consumer.clone(),
                mode: Mode::Hot,
                processes: 1,
                backlog,
                paced_for: None,
            },
            *run,
        ));
        results.push((consumer, m));
    }
    println!(
        "\n| consumer | inputs | throughput msgs/s | applied | re-runs | conflicts | re-runs per applied run | order violations |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, m) in &results {
        println!(
            "| {} | {backlog} | {:.0} | {} | {} | {} | {} | {} |",
            c.label(),
            m.throughput,
            m.report.applied,
            m.report.reruns,
            m.report.conflicts,
            rerun_ratio(&m.report),
            m.order_violations
        );
    }
    println!(
        "\n(c)/(a) throughput: {}\n\nload average at end: {}",
        ratio(&results, "(c)", "(a)"),
        load_average()
    );
}

/// One embedded worker run in a process of its own: (runs/s, report).
fn embedded_worker(program: &Path, mode: Mode, backlog: usize, name: &str) -> (f64, Report) {
    let dir = std::env::temp_dir().join(format!("effects-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut child = Command::new(program)
        .env(ROLE, "embedded")
        .env("E2E_SQLITE_DIR", &dir)
        .env("E2E_BACKLOG", backlog.to_string())
        .env("E2E_HANDLER", mode.name())
        .env("E2E_CONCURRENCY", CONCURRENCY.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let deadline = Instant::now() + Duration::from_secs(900);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the embedded run `{name}` did not finish in 900 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find(|l| l.starts_with("result ")) else {
        panic!(
            "the embedded run `{name}` failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let get = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_owned()
    };
    let num = |k: &str| get(k).parse::<u64>().unwrap_or(0);
    assert_eq!(
        num("applied"),
        backlog as u64,
        "`{name}`: every input applied ({line})"
    );
    assert_eq!(num("dead"), 0, "`{name}`: nothing dead-lettered ({line})");
    assert_eq!(
        get("once"),
        "true",
        "`{name}`: every output in the log exactly once ({line})"
    );
    let hot: i64 = get("hot").parse().unwrap_or(-1);
    if mode == Mode::Hot {
        assert_eq!(
            hot, backlog as i64,
            "`{name}`: a lost update: the hot counter must end at the number of inputs"
        );
    }
    let seconds: f64 = get("seconds").parse().expect("seconds");
    (
        backlog as f64 / seconds,
        Report {
            applied: num("applied"),
            reruns: num("reruns"),
            conflicts: num("conflicts"),
            hot: Some(hot),
        },
    )
}

/// `run_batch` with 100 runs per commit on a fresh file: runs/s.
async fn embedded_batch(backlog: usize, name: &str) -> f64 {
    let dir = std::env::temp_dir().join(format!("effects-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the scratch directory");
    let store = SqliteStore::open(dir.join("batch.db")).expect("open the store");
    let executor = Executor::builder(store.clone(), store.log()).build();
    let started = Instant::now();
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(100) {
        let items = chunk
            .iter()
            .map(|&i| {
                let seen = Seen {
                    id: format!("c{i}"),
                    customer_id: format!("u{}", i % CUSTOMERS),
                    sent_at_us: 0,
                    count: 0,
                };
                BatchItem::new(format!("batch:{i}"), seen_effects(Mode::Seen, &seen))
            })
            .collect();
        let results = executor.run_batch(items).await.expect("a batch");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(o) if !o.is_duplicate())),
            "every batched run applied"
        );
    }
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    drop(executor);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn embedded_section(rt: &tokio::runtime::Runtime, o: &Options) {
    let (backlog, rounds, hot_backlog) = if o.quick {
        (500, 1, 200)
    } else {
        (3_000, 3, 1_000)
    };
    let me = std::env::current_exe().expect("current_exe");
    println!(
        "\n## embedded: SQLite log -> 1 worker process (concurrency {CONCURRENCY}) -> SQLite \
         store in the same file (synchronous = FULL) against Executor::run_batch (100 per \
         commit) with the same effects in this process; {rounds} rounds of {backlog} inputs, \
         alternating; load average at start {}",
        load_average()
    );
    let (mut worker_t, mut batch_t) = (0.0, 0.0);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let (w, b) = if round % 2 == 0 {
            let (w, _) = embedded_worker(&me, Mode::Seen, backlog, &format!("w{round}"));
            (
                w,
                rt.block_on(embedded_batch(backlog, &format!("b{round}"))),
            )
        } else {
            let b = rt.block_on(embedded_batch(backlog, &format!("b{round}")));
            (
                embedded_worker(&me, Mode::Seen, backlog, &format!("w{round}")).0,
                b,
            )
        };
        worker_t += backlog as f64 / w;
        batch_t += backlog as f64 / b;
        ratios.push(w / b);
    }
    let n = (rounds * backlog) as f64;
    ratios.sort_by(f64::total_cmp);
    println!(
        "\n| inputs | worker msgs/s | run_batch (100 per commit) runs/s | worker / run_batch (total) | per round, median [min–max] |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {:.0} | {:.0} | {:.2}x | {:.2}x [{:.2}–{:.2}] |",
        rounds * backlog,
        n / worker_t,
        n / batch_t,
        batch_t / worker_t,
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );

    println!(
        "\nembedded hot key: every input updates card/id = hot (one partition key, loaded \
         through the tracked store); {hot_backlog} inputs"
    );
    let mut consumers = Vec::new();
    match &o.before {
        Some(path) if o.before_protocol >= 2 => {
            consumers.push(("(a) worker, before", path.clone()));
        }
        Some(_) => println!("(a) left out: the --before binary speaks protocol 1"),
        None => println!("(a) left out: no `--before <binary>` given"),
    }
    consumers.push(("(c) worker, current", me));
    println!(
        "\n| consumer | throughput msgs/s | applied | re-runs | conflicts | re-runs per applied run |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rates = Vec::new();
    for (label, program) in consumers {
        let (rate, r) = embedded_worker(&program, Mode::Hot, hot_backlog, "hot");
        println!(
            "| {label} | {rate:.0} | {} | {} | {} | {} |",
            r.applied,
            r.reruns,
            r.conflicts,
            rerun_ratio(&r)
        );
        rates.push(rate);
    }
    if rates.len() == 2 {
        println!("\n(c)/(a) throughput: {:.2}x", rates[1] / rates[0]);
    }
    println!("\nload average at end: {}", load_average());
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("worker") => return worker_process(),
        Ok("hand") => return hand_process(),
        Ok("embedded") => return embedded_process(),
        Ok(other) => panic!("unknown {ROLE} {other:?}"),
        Err(_) => {}
    }
    let mut args = std::env::args().skip(1);
    let mut sections = Vec::new();
    let mut quick = false;
    let mut before = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "quick" => quick = true,
            "--before" => {
                let path = PathBuf::from(args.next().expect("--before needs a path"));
                assert!(
                    path.is_file(),
                    "--before {}: no such file (build it as the bench's docs say)",
                    path.display()
                );
                before = Some(path);
            }
            "servers" | "processes" | "http" | "hot" | "embedded" => sections.push(arg),
            "all" => sections
                .extend(["servers", "http", "hot", "embedded", "processes"].map(str::to_owned)),
            // cargo bench passes `--bench`.
            "--bench" => {}
            other => panic!(
                "unknown argument {other:?}: sections are servers, processes, http, hot, \
                 embedded, all; options quick, --before <binary>"
            ),
        }
    }
    if sections.is_empty() {
        sections.push("servers".to_owned());
    }
    let before_protocol = before.as_deref().map_or(0, probe);
    let options = Options {
        quick,
        before,
        before_protocol,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    println!(
        "end to end, {}; load average {}; --before: {}",
        if quick { "quick" } else { "full" },
        load_average(),
        options.before.as_ref().map_or_else(
            || "none".to_owned(),
            |p| format!("{} (protocol {before_protocol})", p.display())
        )
    );
    let mut run = 0;
    for section in &sections {
        match section.as_str() {
            "servers" => servers_section(&runtime, &options, &mut run),
            "processes" => processes_section(&runtime, &options, &mut run),
            "http" => http_section(&runtime, &options, &mut run),
            "hot" => hot_section(&runtime, &options, &mut run),
            "embedded" => embedded_section(&runtime, &options),
            _ => unreachable!(),
        }
    }
}
