//! The card-blocking service on servers (features `postgres` and `nats`): the PostgreSQL store
//! in a schema of the run's own and NATS JetStream on a stream of the run's own, with the
//! workers in this process or in `--processes N` worker processes (`cards worker`).
//!
//! The same requests as the embedded job ([`BLOCK_REQUESTS`], then [`BLOCK_ALL_REQUEST`]) go to
//! NATS, `m1`'s first acknowledgement is lost in whichever process gets it, and the outcome is
//! read back at the source: committed transactions per key (the `transactions` table), the
//! datom history (which card each run blocked), the dead letters and the messages on the
//! stream. [`ServersReport::checks`] says whether every request was applied once and every card
//! blocked once.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use effects_core::executor::{Executor, Mutant};
use effects_core::handler::message_key;
use effects_core::nats::async_nats::jetstream::consumer::{
    AckPolicy, DeliverPolicy, PullConsumer, pull,
};
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::store::Store;
use effects_core::transport::{OutgoingMessage, Transport};
use effects_core::worker::{LoadEntity, LoadWith, Worker, WorkerConfig, WorkerReport};
use effects_core::{Handler, LookupRef, Message, Op};
use serde_json::json;
use tokio::sync::watch;

use crate::job::{
    BLOCK_ALL_REQUEST, BLOCK_REQUESTS, BlockRequest, DELIVERED_TWICE, Delivered, JobError,
    LosesFirstAck, PATIENCE, Request, SEED_KEY, VISIBILITY, cards, customer, load_customer_cards,
    recorder, seed_effects, until,
};
use crate::{BlockAllHandler, BlockHandler, Card, CardsBlockedNotify, StatusChanged};

/// What a worker process prints once its workers run.
pub const READY: &str = "ready";
/// What the job writes to a worker process's stdin to stop it.
pub const STOP: &str = "stop";
/// The line a worker process prints its counts on.
pub const REPORT_PREFIX: &str = "report ";

/// How to run the job on the servers.
#[derive(Clone, Debug)]
pub struct ServersOptions {
    /// `postgres://...`.
    pub store_url: String,
    /// `nats://...`.
    pub nats_url: String,
    /// The schema and the stream of this run.
    pub namespace: String,
    /// Worker processes; 0 runs the workers in the job's process.
    pub processes: usize,
    /// The program to start as a worker process (`PROGRAM worker`): this binary.
    pub program: Option<PathBuf>,
    /// A deliberately broken executor, in this process or in every worker process. Testing
    /// only.
    pub mutant: Option<Mutant>,
}

/// A name no other run uses: `cards_<pid>_<milliseconds>_<n>` (n counts within the process).
pub fn fresh_namespace() -> String {
    // Two runs of one process in the same millisecond (tests started together) still differ.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("cards_{}_{millis}_{n}", std::process::id())
}

/// Checks a namespace given on the command line: lower-case letters, digits and `_`, starting
/// with a letter, at most 48 characters (a schema, stream and subject token as it is).
pub fn check_namespace(name: &str) -> Result<(), String> {
    let ok = name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--namespace `{name}`: use lower-case letters, digits and `_`, starting with a \
             letter, at most 48 characters"
        ))
    }
}

/// The store and the transport of a run.
pub async fn connect(
    store_url: &str,
    nats_url: &str,
    namespace: &str,
) -> Result<(PostgresStore, NatsTransport), JobError> {
    check_namespace(namespace)?;
    let store = PostgresStore::connect(PostgresOptions {
        pool_size: 8,
        ..PostgresOptions::new(store_url).with_schema(namespace)
    })
    .await?;
    let mut config = NatsConfig::new(nats_url).with_stream(namespace, namespace);
    config.connection_name = Some(format!("cards {namespace}"));
    let nats = NatsTransport::connect(config)
        .await
        .map_err(|e| format!("cannot use NATS at {nats_url}: {e}"))?;
    Ok((store, nats))
}

type ServersExecutor =
    Executor<PostgresStore, LosesFirstAck<NatsTransport>, effects_core::executor::NoHttp>;

/// The `block` and `block_all` workers of one process, until `stopped`.
async fn run_workers(
    executor: Arc<ServersExecutor>,
    seen: &Arc<Mutex<Vec<Delivered>>>,
    stopped: watch::Receiver<bool>,
) -> [(&'static str, WorkerReport); 2] {
    let config = WorkerConfig {
        // One delivery at a time per worker, so that the processes share the requests.
        concurrency: 1,
        max_in_flight: 1,
        fetch_wait: Duration::from_millis(100),
        visibility: VISIBILITY,
        ..WorkerConfig::default()
    };
    let block = Worker::new(Arc::clone(&executor), BlockHandler)
        .with_config(config.clone())
        .load_with(LoadEntity::new(|r: BlockRequest| {
            LookupRef::new("card/id", r.card_id)
        }))
        .on_processed(recorder(seen, BlockHandler::DESCRIPTOR.name));
    let block_all = Worker::new(Arc::clone(&executor), BlockAllHandler)
        .with_config(WorkerConfig {
            // The `block` worker runs the relay; one per process is enough.
            relay: None,
            ..config
        })
        .load_with(LoadWith::new(load_customer_cards::<PostgresStore>))
        .on_processed(recorder(seen, BlockAllHandler::DESCRIPTOR.name));
    let (block_report, block_all_report) = tokio::join!(
        block.run(until(stopped.clone())),
        block_all.run(until(stopped)),
    );
    [
        (BlockHandler::DESCRIPTOR.name, block_report),
        (BlockAllHandler::DESCRIPTOR.name, block_all_report),
    ]
}

fn executor(
    store: &PostgresStore,
    nats: &NatsTransport,
    mutant: Option<Mutant>,
) -> Arc<ServersExecutor> {
    let mut builder = Executor::builder(
        store.clone(),
        LosesFirstAck::new(nats.clone(), DELIVERED_TWICE),
    );
    if let Some(mutant) = mutant {
        builder = builder.mutant(mutant);
    }
    Arc::new(builder.build())
}

fn counts_json(reports: &[(&'static str, WorkerReport); 2]) -> serde_json::Value {
    let one = |r: &WorkerReport| {
        json!([
            r.deliveries,
            r.applied,
            r.duplicates,
            r.dead_lettered,
            r.retried,
            r.transport_errors
        ])
    };
    json!({"block": one(&reports[0].1), "block_all": one(&reports[1].1)})
}

fn counts_from(value: &serde_json::Value, worker: &str) -> Option<WorkerReport> {
    let n: Vec<u64> = value
        .get(worker)?
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    let [
        deliveries,
        applied,
        duplicates,
        dead_lettered,
        retried,
        transport_errors,
    ] = n[..]
    else {
        return None;
    };
    Some(WorkerReport {
        deliveries,
        applied,
        duplicates,
        dead_lettered,
        retried,
        transport_errors,
        ..WorkerReport::default()
    })
}

/// A worker process (`cards worker`): both workers on a running job's store and stream; says
/// [`READY`], runs until [`STOP`] (or the end of stdin), then prints its counts.
pub async fn work(
    store_url: &str,
    nats_url: &str,
    namespace: &str,
    mutant: Option<Mutant>,
) -> Result<String, JobError> {
    let (store, nats) = connect(store_url, nats_url, namespace).await?;
    let (stop, stopped) = watch::channel(false);
    let seen: Arc<Mutex<Vec<Delivered>>> = Arc::default();
    let workers = run_workers(executor(&store, &nats, mutant), &seen, stopped);
    let told = async {
        println!("{READY}");
        let read = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.trim() == STOP {
                    break;
                }
                line.clear();
            }
        });
        let _ = read.await;
        stop.send_replace(true);
    };
    let (reports, ()) = tokio::join!(workers, told);
    Ok(format!("{REPORT_PREFIX}{}", counts_json(&reports)))
}

/// Everything the run did, read back from the servers.
#[derive(Debug)]
pub struct ServersReport {
    /// Where the state and the messages were.
    pub location: String,
    /// Worker processes (0: in the job's process).
    pub processes: usize,
    /// Each worker's counts: (where, worker, counts).
    pub workers: Vec<(String, &'static str, WorkerReport)>,
    /// Committed transactions per key (the `transactions` table).
    pub runs_per_key: BTreeMap<String, u64>,
    /// Per card, the runs that asserted it blocked (from the datom history).
    pub blocked_by: BTreeMap<String, Vec<String>>,
    /// The cards now.
    pub cards: Vec<Card>,
    /// The dead letters: (message id, reason).
    pub dead_letters: Vec<(String, String)>,
    /// Messages on the stream, by topic.
    pub published: BTreeMap<&'static str, u64>,
    /// From the first request published to the last acknowledged.
    pub elapsed: Duration,
}

/// One check of the outcome: (what, whether it holds, the figures).
pub type Check = (&'static str, bool, String);

impl ServersReport {
    /// The keys that must have been applied once each.
    pub fn expected_keys() -> Vec<String> {
        let mut keys = vec![SEED_KEY.to_owned()];
        for r in BLOCK_REQUESTS.iter().filter(|r| r.message_id != "m3") {
            keys.push(message_key(
                BlockHandler::DESCRIPTOR.name,
                BlockHandler::DESCRIPTOR.topic.unwrap_or_default(),
                r.message_id,
            ));
        }
        keys.push(message_key(
            BlockAllHandler::DESCRIPTOR.name,
            BlockAllHandler::DESCRIPTOR.topic.unwrap_or_default(),
            BLOCK_ALL_REQUEST.message_id,
        ));
        keys
    }

    /// Duplicates absorbed by all workers.
    pub fn duplicates(&self) -> u64 {
        self.workers.iter().map(|(_, _, r)| r.duplicates).sum()
    }

    /// Every check, in order.
    pub fn checks(&self) -> Vec<Check> {
        let expected = Self::expected_keys();
        let wrong: Vec<String> = expected
            .iter()
            .map(|k| (k, self.runs_per_key.get(k).copied().unwrap_or(0)))
            .filter(|(_, n)| *n != 1)
            .map(|(k, n)| format!("{k} applied {n} times"))
            .chain(
                self.runs_per_key
                    .iter()
                    .filter(|(k, _)| !expected.contains(k))
                    .map(|(k, n)| format!("{k} applied {n} times, unexpected")),
            )
            .collect();
        let once = ["c1", "c2", "c4"];
        let blocked_wrong: Vec<String> = cards()
            .iter()
            .map(|c| {
                let by = self.blocked_by.get(&c.id).map_or(0, Vec::len);
                (c.id.clone(), by, usize::from(once.contains(&c.id.as_str())))
            })
            .filter(|(_, by, want)| by != want)
            .map(|(id, by, want)| format!("{id} blocked by {by} runs, not {want}"))
            .collect();
        let all_blocked = self.cards.len() == 4 && self.cards.iter().all(|c| !c.can_block());
        let dead_ok = self.dead_letters.len() == 1 && self.dead_letters[0].0 == "m3";
        let status = self.published.get(StatusChanged::TOPIC).copied();
        let notify = self.published.get(CardsBlockedNotify::TOPIC).copied();
        vec![
            (
                "every request applied once",
                wrong.is_empty(),
                if wrong.is_empty() {
                    format!(
                        "{} keys with one transaction each, the seed included",
                        expected.len()
                    )
                } else {
                    wrong.join(", ")
                },
            ),
            (
                "every card blocked once",
                blocked_wrong.is_empty() && all_blocked,
                if blocked_wrong.is_empty() {
                    format!(
                        "c1, c2, c4 blocked by one run each, c3 blocked since the seed; {} of 4 \
                         blocked now",
                        self.cards.iter().filter(|c| !c.can_block()).count()
                    )
                } else {
                    blocked_wrong.join(", ")
                },
            ),
            (
                "the malformed request dead-lettered",
                dead_ok,
                format!("{:?}", self.dead_letters),
            ),
            (
                "the redelivered request was a duplicate",
                self.duplicates() >= 1,
                format!("duplicates absorbed: {}", self.duplicates()),
            ),
            (
                "one message per blocked card and one notification",
                status == Some(3) && notify == Some(1),
                format!(
                    "{} on {}, {} on {}",
                    status.unwrap_or(0),
                    StatusChanged::TOPIC,
                    notify.unwrap_or(0),
                    CardsBlockedNotify::TOPIC
                ),
            ),
        ]
    }
}

async fn publish(nats: &NatsTransport, topic: &str, request: &Request) -> Result<(), JobError> {
    nats.publish(OutgoingMessage {
        id: request.message_id.to_owned(),
        topic: topic.to_owned(),
        partition_key: None,
        headers: BTreeMap::new(),
        payload: request.payload.as_bytes().to_vec(),
    })
    .await?;
    Ok(())
}

/// How many messages the subjects matching `filter` hold.
async fn count(nats: &NatsTransport, filter: String) -> Result<u64, JobError> {
    let js = nats.jetstream();
    let stream = nats.config().stream.as_str();
    let reader: PullConsumer = js
        .create_consumer_on_stream(
            pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                filter_subject: filter,
                inactive_threshold: Duration::from_secs(30),
                ..pull::Config::default()
            },
            stream,
        )
        .await?;
    let pending = reader.cached_info().num_pending;
    let name = reader.cached_info().name.clone();
    // A reader left behind expires by itself.
    let _ = js.delete_consumer_from_stream(&name, stream).await;
    Ok(pending)
}

fn topic_filter(nats: &NatsTransport, topic: &str) -> String {
    let unkeyed = nats.subject_for(topic, None);
    format!("{}.>", unkeyed.strip_suffix(".u").unwrap_or(&unkeyed))
}

/// Messages of `topic` the group `consumer` has not acknowledged (all of them while no worker
/// of the group has fetched yet).
async fn unacknowledged(
    nats: &NatsTransport,
    consumer: &str,
    topic: &str,
) -> Result<u64, JobError> {
    let js = nats.jetstream();
    let stream = nats.config().stream.as_str();
    let mut left = 0;
    for name in nats.consumer_names(consumer, topic) {
        match js
            .get_consumer_from_stream::<pull::Config, _, _>(&name, stream)
            .await
        {
            Ok(lane) => {
                let info = lane.cached_info();
                left += info.num_pending + info.num_ack_pending as u64;
            }
            Err(_) => return count(nats, topic_filter(nats, topic)).await,
        }
    }
    Ok(left)
}

/// Waits (at most [`PATIENCE`]) until the group acknowledged every message of the topic and
/// every run's messages were published.
async fn drained(
    nats: &NatsTransport,
    store: &PostgresStore,
    consumer: &str,
    topic: &str,
) -> Result<(), JobError> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = unacknowledged(nats, consumer, topic).await?;
        let backlog = store.backlog().await?;
        if left == 0 && backlog.open_runs == 0 && backlog.pending_rows == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "`{consumer}` still has {left} unacknowledged message(s) on `{topic}` and the \
                 store {} open run(s) after {}s",
                backlog.open_runs,
                PATIENCE.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker process of the job.
struct Running {
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Stopped already unless the job failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a pipe-reading thread read (nothing if it is gone).
fn joined(reader: Option<std::thread::JoinHandle<String>>) -> String {
    reader.and_then(|r| r.join().ok()).unwrap_or_default()
}

fn start_processes(options: &ServersOptions) -> Result<Vec<Running>, JobError> {
    let program = options
        .program
        .clone()
        .ok_or("worker processes need the program to start")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut running = Vec::new();
    for n in 1..=options.processes {
        // The URLs go in the environment, where a password is not shown on a command line.
        let mut command = Command::new(&program);
        command.arg("worker");
        if let Some(mutant) = options.mutant {
            command.arg("--mutant").arg(mutant.name());
        }
        let mut child = command
            .env(crate::STORE_ENV, &options.store_url)
            .env(crate::TRANSPORT_ENV, &options.nats_url)
            .env(crate::NAMESPACE_ENV, &options.namespace)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start worker process {n}: {e}"))?;
        let ready = ready_tx.clone();
        let out = child.stdout.take();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(out) = out {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if line == READY {
                        let _ = ready.send(());
                    }
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            text
        });
        let err = child.stderr.take();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut err) = err {
                let _ = err.read_to_string(&mut text);
            }
            text
        });
        running.push(Running {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        });
    }
    drop(ready_tx);
    let ready_by = Instant::now() + Duration::from_secs(20);
    for _ in 0..options.processes {
        let left = ready_by.saturating_duration_since(Instant::now());
        if ready_rx.recv_timeout(left).is_err() {
            let said: Vec<String> = running
                .drain(..)
                .map(|mut r| {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    joined(r.stderr.take()).trim().to_owned()
                })
                .filter(|s| !s.is_empty())
                .collect();
            return Err(format!(
                "the worker processes were not all ready within 20 s: {}",
                said.join("; ")
            )
            .into());
        }
    }
    Ok(running)
}

fn stop_processes(
    mut running: Vec<Running>,
) -> Result<Vec<(String, &'static str, WorkerReport)>, JobError> {
    for r in &mut running {
        if let Some(mut stdin) = r.child.stdin.take() {
            let _ = writeln!(stdin, "{STOP}");
        }
    }
    let mut out = Vec::new();
    for (i, mut r) in running.into_iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = r.child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = (joined(r.stdout.take()), joined(r.stderr.take()));
        let report = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(REPORT_PREFIX))
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        let label = format!("process {}", i + 1);
        match (status, report) {
            (Some(s), Some(value)) if s.success() => {
                for worker in [
                    BlockHandler::DESCRIPTOR.name,
                    BlockAllHandler::DESCRIPTOR.name,
                ] {
                    let counts = counts_from(&value, worker)
                        .ok_or_else(|| format!("{label}: unreadable report {value}"))?;
                    out.push((label.clone(), worker, counts));
                }
            }
            (status, _) => {
                return Err(format!(
                    "worker {label} ended with {status:?} and said: {}",
                    stderr.trim()
                )
                .into());
            }
        }
    }
    Ok(out)
}

/// Runs the job on the servers and reports what happened.
pub async fn run(options: ServersOptions) -> Result<ServersReport, JobError> {
    let (store, nats) = connect(&options.store_url, &options.nats_url, &options.namespace).await?;
    let location = format!(
        "PostgreSQL and NATS: store in {}, messages on NATS stream {}",
        store.location(),
        nats.config().stream
    );
    let customer_ref = LookupRef::new("customer/id", customer().id);
    if store.entity(&customer_ref, None).await?.is_some() {
        return Err(format!(
            "schema {} holds the customer already: the job seeds a fresh store; give a new \
             --namespace, or none",
            options.namespace
        )
        .into());
    }
    let executor = executor(&store, &nats, options.mutant);
    executor
        .run(SEED_KEY, seed_effects(&customer(), &cards())?)
        .await?;

    let seen: Arc<Mutex<Vec<Delivered>>> = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let (block_topic, block_all_topic) = (
        BlockHandler::DESCRIPTOR.topic.unwrap_or_default(),
        BlockAllHandler::DESCRIPTOR.topic.unwrap_or_default(),
    );
    let (block, block_all) = (
        BlockHandler::DESCRIPTOR.name,
        BlockAllHandler::DESCRIPTOR.name,
    );
    let running = if options.processes > 0 {
        let options = options.clone();
        Some(tokio::task::spawn_blocking(move || start_processes(&options)).await??)
    } else {
        None
    };
    let started = Instant::now();
    let upstream = async {
        let result = async {
            for request in &BLOCK_REQUESTS {
                publish(&nats, block_topic, request).await?;
            }
            drained(&nats, &store, block, block_topic).await?;
            publish(&nats, block_all_topic, &BLOCK_ALL_REQUEST).await?;
            drained(&nats, &store, block_all, block_all_topic).await
        }
        .await;
        stop.send_replace(true);
        result
    };
    let workers = if running.is_none() {
        let (reports, upstream) =
            tokio::join!(run_workers(Arc::clone(&executor), &seen, stopped), upstream);
        upstream?;
        reports
            .into_iter()
            .map(|(name, r)| ("this process".to_owned(), name, r))
            .collect()
    } else {
        let result = upstream.await;
        let running = running.unwrap_or_default();
        let stopped = tokio::task::spawn_blocking(move || stop_processes(running)).await?;
        result?;
        stopped?
    };
    let elapsed = started.elapsed();

    let mut blocked_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in store.history(None).await? {
        let blocked = d.attribute == "card/status" && d.op == Op::Assert && d.value == "blocked";
        if blocked && d.run_key != SEED_KEY {
            let card = d.entity.value.as_str().unwrap_or_default().to_owned();
            blocked_by.entry(card).or_default().push(d.run_key);
        }
    }
    let mut now = Vec::new();
    for card in cards() {
        let card_ref = LookupRef::new("card/id", card.id.as_str());
        if let Some(entity) = store.entity(&card_ref, None).await? {
            now.push(entity.decode::<Card>()?);
        }
    }
    let mut dead_letters = Vec::new();
    for consumer in [block, block_all] {
        for d in nats.dead_letters(consumer).await? {
            dead_letters.push((d.message_id, d.reason));
        }
    }
    let mut published = BTreeMap::new();
    for topic in [StatusChanged::TOPIC, CardsBlockedNotify::TOPIC] {
        published.insert(topic, count(&nats, topic_filter(&nats, topic)).await?);
    }
    Ok(ServersReport {
        location,
        processes: options.processes,
        workers,
        runs_per_key: runs_per_key(&options.store_url, &options.namespace).await?,
        blocked_by,
        cards: now,
        dead_letters,
        published,
        elapsed,
    })
}

/// Committed transactions per key, counted with a query of the job's own.
async fn runs_per_key(url: &str, namespace: &str) -> Result<BTreeMap<String, u64>, JobError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .query("SELECT set_config('search_path', $1, false)", &[&namespace])
        .await?;
    let rows = client
        .query(
            "SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key",
            &[],
        )
        .await?;
    drop(client);
    driver.abort();
    Ok(rows
        .iter()
        .map(|r| {
            let n: i64 = r.get(1);
            (r.get::<_, String>(0), u64::try_from(n).unwrap_or(0))
        })
        .collect())
}

/// Drops a run's schema and deletes its stream: for tests that clean up after themselves.
pub async fn remove(store_url: &str, nats_url: &str, namespace: &str) -> Result<(), JobError> {
    check_namespace(namespace)?;
    let (client, connection) = tokio_postgres::connect(store_url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    // Checked above to be a plain lower-case name: an identifier, which cannot be a parameter.
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{namespace}\" CASCADE"))
        .await?;
    drop(client);
    driver.abort();
    let nats = effects_core::nats::async_nats::connect(nats_url).await?;
    let js = effects_core::nats::async_nats::jetstream::new(nats);
    // Gone already is fine.
    let _ = js.delete_stream(namespace).await;
    Ok(())
}

impl std::fmt::Display for ServersReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Cards on {}", self.location)?;
        if self.processes == 0 {
            writeln!(f, "Workers `block` and `block_all` in this process")?;
        } else {
            writeln!(
                f,
                "Workers `block` and `block_all` in {} worker processes",
                self.processes
            )?;
        }
        writeln!(f, "\nRuns applied (committed transactions per key)")?;
        for (key, n) in &self.runs_per_key {
            writeln!(f, "  {key}  {n}")?;
        }
        writeln!(f, "\nCards now, and the runs that blocked them")?;
        for card in &self.cards {
            let by = self
                .blocked_by
                .get(&card.id)
                .map_or_else(|| "-".to_owned(), |runs| runs.join(", "));
            writeln!(
                f,
                "  {}  {}  {by}",
                card.id,
                format!("{:?}", card.status).to_lowercase()
            )?;
        }
        writeln!(f, "\nDead-lettered (acknowledged, never retried)")?;
        for (id, reason) in &self.dead_letters {
            writeln!(f, "  {id}: {reason}")?;
        }
        writeln!(f, "\nWorkers (shut down gracefully)")?;
        writeln!(
            f,
            "  where  worker  deliveries  applied  duplicates  dead-lettered  retried  transport errors"
        )?;
        for (place, worker, r) in &self.workers {
            writeln!(
                f,
                "  {place}  {worker}  {}  {}  {}  {}  {}  {}",
                r.deliveries,
                r.applied,
                r.duplicates,
                r.dead_lettered,
                r.retried,
                r.transport_errors
            )?;
        }
        writeln!(f, "\nMessages on the stream, by topic")?;
        for (topic, n) in &self.published {
            writeln!(f, "  {topic}  {n}")?;
        }
        writeln!(
            f,
            "\nHandled in {:.2} s\n\nChecks",
            self.elapsed.as_secs_f64()
        )?;
        for (name, passed, detail) in self.checks() {
            let mark = if passed { "ok    " } else { "FAILED" };
            writeln!(f, "  {mark} {name}: {detail}")?;
        }
        Ok(())
    }
}
