//! Faults on the servers (features `postgres` and `nats`): worker processes
//! (`effects-server-child`) on a private PostgreSQL server and a private `nats-server`, each on
//! a free loopback port, sharing one NATS consumer group.
//!
//! - **Duplicate storm across four processes**: 20 % of the inputs lose their first
//!   acknowledgement, so the server delivers them again once the ack wait expires, to any
//!   process. Committed transactions equal the messages, none lost.
//! - **Worker processes SIGKILLed and restarted** under a transfer workload: every transfer
//!   applied once, none lost, and the balances explained by the booked transfers (no lost
//!   update).
//! - **NATS restarted mid-run** (SIGKILL, twice, down 2.5 s) under two worker processes whose inputs are
//!   partly redelivered: every run's message is on the stream once, under its own key; what
//!   was published again (a publish whose acknowledgement did not come) is absorbed by the
//!   stream and counted.
//! - **A relay paused past its lease** (SIGSTOP) while a second relay takes over, then resumed:
//!   every message on the stream once, none lost; the batch the paused relays held is
//!   published again by the second relay and again by the resumed ones, absorbed by the stream
//!   and counted, and their marks of rows they no longer hold are refused.
//! - **A relay kept down longer than the stream's duplicate window**: a relay dies after
//!   publishing a message and before marking it, and the next one comes only after the window;
//!   the copy is stored again and reaches the consumers, whose idempotency keys absorb it.
//!
//! Counted at the source: committed transactions per key (the `transactions` table, one row
//! per commit, never deduplicated), and in per-process event files that survive SIGKILL,
//! handler calls, publish attempts, fetched deliveries and redeliveries (the broker's delivery
//! count) and lost acknowledgements. Each check is run once more against a deliberately broken
//! executor (`Mutant`) and must fail there.
//!
//! `cargo test -p effects-tests --features postgres,nats --test server_faults -- --nocapture`
//! prints a `FIGURE` line per run. `EFFECTS_SERVER_FAULTS_MESSAGES=100000` runs every test that
//! is not a mutant with that many messages (inputs, transfers or runs) instead of its CI size,
//! the larger runs of RELIABILITY.md (build with `--release`, run one test at a time); the
//! bounds on waiting grow with the size.

#![cfg(all(feature = "postgres", feature = "nats"))]

mod backends;
mod nats_support;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::postgres::{Postgres, PrivateServer, client};
use effects_core::executor::{BatchItem, Executor, Mutant};
use effects_core::handler::business_key;
use effects_core::handler::message_key;
use effects_core::nats::async_nats::jetstream::consumer::pull;
use effects_core::nats::{NatsConfig, NatsTransport, Reconnect};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::store::Store;
use effects_core::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use effects_tests::harness::book::{self, BOOKED, HANDLER_NAME, INPUTS, run_key};
use effects_tests::harness::process::ChildProcess;
use effects_tests::harness::tally::{ACK_LOST, Events, FETCH, HANDLER, PUBLISH, REDELIVERY};
use nats_support::PrivateNats;
use serde_json::json;

const CHILD: &str = env!("CARGO_BIN_EXE_effects-server-child");

/// The topic of the transfer workload's inputs (the child's `TRANSFERS`).
const TRANSFERS: &str = "transfer-requests";

/// The NATS settings of the test and of every child (the child's `nats_config`).
fn nats_config(url: &str, stream: &str) -> NatsConfig {
    nats_config_with_window(url, stream, None)
}

fn nats_config_with_window(url: &str, stream: &str, window: Option<Duration>) -> NatsConfig {
    let mut config = NatsConfig::new(url).with_stream(stream, stream.to_ascii_lowercase());
    config.connect_timeout = Duration::from_secs(3);
    config.request_timeout = Duration::from_secs(2);
    config.reconnect = Reconnect {
        max_attempts: None,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(250),
    };
    if let Some(window) = window {
        config.duplicate_window = window;
    }
    config
}

/// The size of a test that is not a mutant: `ci`, or `EFFECTS_SERVER_FAULTS_MESSAGES` for the
/// larger runs.
fn size(ci: u64) -> u64 {
    std::env::var("EFFECTS_SERVER_FAULTS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

/// Whether this is one of the larger runs (more than a CI size of work).
fn large(messages: u64) -> bool {
    messages > 5_000
}

/// A bound on waiting for `messages` runs: `base` seconds, and one more per hundred messages.
fn bound(base: u64, messages: u64) -> Duration {
    Duration::from_secs(base + messages / 100)
}

/// A private PostgreSQL server with a database, a private NATS server, and a directory for the
/// children's event files.
struct Servers {
    pg: PrivateServer,
    db: Postgres,
    nats: PrivateNats,
    stream: String,
    schema: String,
    events: PathBuf,
    _dir: support::PrivateDir,
}

impl Servers {
    async fn start(name: &str) -> Servers {
        let pg = PrivateServer::start(name);
        let db = Postgres::create_on(pg.port, name).await;
        let dir = support::PrivateDir::new(name);
        let nats = PrivateNats::start(dir.path());
        let clean: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
        Servers {
            pg,
            db,
            nats,
            stream: format!("F{clean}"),
            schema: "faults".to_owned(),
            events: dir.join("events"),
            _dir: dir,
        }
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect(PostgresOptions {
            pool_size: 4,
            ..PostgresOptions::new(self.db.url()).with_schema(&self.schema)
        })
        .await
        .expect("the store")
    }

    async fn transport(&self) -> NatsTransport {
        nats_support::connect_or_explain(nats_config(&self.nats.url(), &self.stream)).await
    }

    fn child(&self, n: usize, workload: &str, extra: &[String]) -> ChildProcess {
        let mut args: Vec<String> = [
            "--store",
            &self.db.url(),
            "--schema",
            &self.schema,
            "--nats",
            &self.nats.url(),
            "--stream",
            &self.stream,
            "--events",
            self.events.to_str().expect("a UTF-8 path"),
            "--workload",
            workload,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend_from_slice(extra);
        let mut child = ChildProcess::spawn(&format!("worker {n}"), Path::new(CHILD), &args)
            .expect("start a worker process");
        child
            .wait_for("ready", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        child
    }

    /// A fresh connection in the test's schema.
    async fn raw(&self) -> tokio_postgres::Client {
        let raw = client(self.pg.port, self.db.name()).await.expect("connect");
        raw.query(
            "SELECT set_config('search_path', $1, false)",
            &[&self.schema],
        )
        .await
        .expect("search path");
        raw
    }

    /// Committed transactions, counted (every commit, whatever its key).
    async fn transaction_count(&self) -> u64 {
        let n: i64 = self
            .raw()
            .await
            .query_one("SELECT COUNT(*) FROM transactions", &[])
            .await
            .expect("count transactions")
            .get(0);
        u64::try_from(n).unwrap_or(0)
    }

    /// Committed transactions per run key, on a fresh connection.
    async fn transactions(&self) -> BTreeMap<String, usize> {
        self.raw()
            .await
            .query(
                "SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key",
                &[],
            )
            .await
            .expect("count transactions")
            .iter()
            .map(|r| {
                let n: i64 = r.get(1);
                (r.get(0), usize::try_from(n).unwrap_or(0))
            })
            .collect()
    }
}

/// Messages of `topic` the group has not acknowledged, from the server's consumer info (every
/// message while the group's consumers do not exist yet).
async fn unacknowledged(nats: &NatsTransport, group: &str, topic: &str, published: u64) -> u64 {
    let js = nats.jetstream();
    let mut left = 0;
    for name in nats.consumer_names(group, topic) {
        match js
            .get_consumer_from_stream::<pull::Config, _, _>(&name, nats.config().stream.as_str())
            .await
        {
            Ok(c) => {
                let info = c.cached_info();
                left += info.num_pending + info.num_ack_pending as u64;
            }
            Err(_) => return published,
        }
    }
    left
}

/// Waits (bounded) until the group acknowledged everything and every run finished.
async fn wait_until_done(
    nats: &NatsTransport,
    store: &PostgresStore,
    group: &str,
    topic: &str,
    published: u64,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let left = unacknowledged(nats, group, topic, published).await;
        let backlog = store.backlog().await.ok();
        let finished = backlog.is_some_and(|b| b.open_runs == 0 && b.pending_rows == 0);
        if left == 0 && finished {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not done within {limit:?}: {left} unacknowledged, backlog {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stop_all(children: Vec<ChildProcess>) -> Vec<String> {
    let mut reports = Vec::new();
    for mut child in children {
        let _ = child.say("STOP");
        if let Ok(line) = child.wait_for("report", Duration::from_secs(30)) {
            reports.push(line);
        }
        let _ = child.stop(Duration::from_secs(10));
    }
    reports
}

// ---------------------------------------------------------------------------------------------
// The duplicate storm.

const LOSE_PERCENT: u64 = 20;

struct Storm {
    messages: u64,
    transactions: BTreeMap<String, usize>,
    events: Events,
    reports: Vec<String>,
    elapsed: Duration,
}

/// Lost (no transaction), doubled (more than one) and unexpected keys; empty when the storm
/// applied every message exactly once.
fn storm_differences(s: &Storm) -> Vec<String> {
    let mut wrong = Vec::new();
    for i in 0..s.messages {
        let n = s.transactions.get(&run_key(i)).copied().unwrap_or(0);
        if n != 1 {
            wrong.push(format!("{} applied {n} times", run_key(i)));
        }
    }
    let expected: std::collections::BTreeSet<String> = (0..s.messages).map(run_key).collect();
    let extra: Vec<(&String, &usize)> = s
        .transactions
        .iter()
        .filter(|(k, _)| !expected.contains(*k))
        .collect();
    if !extra.is_empty() {
        wrong.push(format!(
            "{} keys committed that no message has, e.g. {:?}",
            extra.len(),
            &extra[..extra.len().min(5)]
        ));
    }
    wrong
}

async fn storm(name: &str, messages: u64, mutant: Option<Mutant>) -> Storm {
    let servers = Servers::start(name).await;
    let store = servers.store().await;
    let nats = servers.transport().await;
    let mut extra = vec![
        "--lose-acks".to_owned(),
        LOSE_PERCENT.to_string(),
        "--visibility-ms".to_owned(),
        "1000".to_owned(),
        "--concurrency".to_owned(),
        "8".to_owned(),
    ];
    if let Some(m) = mutant {
        extra.extend(["--mutant".to_owned(), m.name().to_owned()]);
    }
    let children: Vec<ChildProcess> = (1..=4).map(|n| servers.child(n, "book", &extra)).collect();
    // The four join the group and share its partitions (each process announces itself and
    // takes its share on the transport's hold ticks) before the inputs arrive: a backlog
    // published first would be drained by the first process before the others are counted.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let started = Instant::now();
    book::seed(&nats, 0..messages, false)
        .await
        .expect("publish the inputs");
    let limit = Duration::from_secs(120 + messages / 200);
    wait_until_done(&nats, &store, HANDLER_NAME, INPUTS, messages, limit).await;
    let elapsed = started.elapsed();
    let reports = stop_all(children);
    let storm = Storm {
        messages,
        transactions: servers.transactions().await,
        events: Events::read_dir(&servers.events).expect("read the events"),
        reports,
        elapsed,
    };
    let redelivered = storm.events.counts(REDELIVERY).len();
    let doubled = storm.transactions.values().filter(|n| **n > 1).count();
    let lost = (0..messages)
        .filter(|i| !storm.transactions.contains_key(&run_key(*i)))
        .count();
    println!(
        "FIGURE server_storm mutant={:?} processes=4 messages={messages} \
         acks_lost={} deliveries={} redelivered_messages={redelivered} ({:.1} %) \
         handler_calls={} transactions={} doubled={doubled} lost={lost} publish_attempts={} \
         elapsed_ms={} reports={:?}",
        mutant.map(Mutant::name),
        storm.events.total(ACK_LOST),
        storm.events.total(FETCH),
        100.0 * redelivered as f64 / messages as f64,
        storm.events.total(HANDLER),
        storm.transactions.values().sum::<usize>(),
        storm.events.total(PUBLISH),
        storm.elapsed.as_millis(),
        storm.reports,
    );
    drop(store);
    storm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_across_four_worker_processes() {
    let messages = size(600);
    let s = storm("storm", messages, None).await;
    assert_eq!(storm_differences(&s), Vec::<String>::new());
    // A fifth of the messages lost their first acknowledgement, and each of those came back
    // from the server (the delivery count above 1) once the ack wait expired.
    let chosen = messages * LOSE_PERCENT / 100;
    assert_eq!(s.events.total(ACK_LOST) as u64, chosen, "{:?}", s.reports);
    let redelivered = s.events.counts(REDELIVERY);
    for (id, _) in s.events.counts(ACK_LOST) {
        assert!(redelivered.contains_key(&id), "{id} was never redelivered");
    }
    assert!(redelivered.len() as u64 >= chosen);
    // Every run's message was handed to NATS, through the counting wrapper.
    let published = s.events.counts(PUBLISH);
    for i in 0..messages {
        let id = format!("{}#0", run_key(i));
        assert!(published.contains_key(&id), "{id} never published");
    }
    // Four processes took a share.
    assert_eq!(s.reports.len(), 4, "{:?}", s.reports);
    assert!(
        s.reports.iter().all(|r| !r.contains("applied=0 ")),
        "{:?}",
        s.reports
    );
}

/// Without the duplicate check every redelivery is applied again under a key of its own: the
/// storm's check must see more transactions than messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_duplicate_check_fails_the_storm() {
    let s = storm("storm-mutant", 200, Some(Mutant::SkipDuplicateCheck)).await;
    let wrong = storm_differences(&s);
    assert!(!wrong.is_empty(), "the mutant applied nothing twice");
    assert!(s.transactions.values().sum::<usize>() > 200);
}

// ---------------------------------------------------------------------------------------------
// Worker processes killed and restarted under transfers.

const ACCOUNTS: usize = 6;
const START: i64 = 1_000;

/// A small deterministic generator (the seed is printed with the figures).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

struct Kills {
    transfers: usize,
    accounts: usize,
    transactions: BTreeMap<String, usize>,
    balances: Vec<i64>,
    expected: Vec<i64>,
    unrecorded: Vec<String>,
    kills_landed: usize,
}

fn kills_differences(k: &Kills) -> Vec<String> {
    let mut wrong: Vec<String> = Vec::new();
    for i in 0..k.transfers {
        let key = business_key("transfer", &format!("t{i}"));
        let n = k.transactions.get(&key).copied().unwrap_or(0);
        if n != 1 {
            wrong.push(format!("{key} applied {n} times"));
        }
    }
    if k.transactions.len() != k.transfers + 1 {
        wrong.push(format!(
            "{} keys committed for {} transfers and the seed",
            k.transactions.len(),
            k.transfers
        ));
    }
    if !k.unrecorded.is_empty() {
        wrong.push(format!("not recorded: {:?}", k.unrecorded));
    }
    if k.balances != k.expected {
        wrong.push(format!(
            "balances {:?}, the booked transfers explain {:?}",
            k.balances, k.expected
        ));
    }
    wrong
}

async fn kills(name: &str, transfers: usize, kills: usize, mutant: Option<Mutant>) -> Kills {
    let servers = Servers::start(name).await;
    let store = servers.store().await;
    let nats = servers.transport().await;
    // The larger runs spread the transfers over more accounts, so that they are not all
    // conflicts; six still race hard in the CI size.
    let accounts = if large(transfers as u64) {
        ACCOUNTS * 5
    } else {
        ACCOUNTS
    };
    let names: Vec<String> = (0..accounts).map(|i| format!("a{i}")).collect();
    let seed: Effects = names
        .iter()
        .map(|n| {
            DatomEffect::assert(
                LookupRef::new("account/id", n.as_str()),
                [("account/balance", json!(START))],
            )
        })
        .collect();
    Arc::new(Executor::builder(store.clone(), nats.clone()).build())
        .run("seed", seed)
        .await
        .expect("seed");
    let seed_value = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_secs());
    let mut rng = Lcg(seed_value);
    let mut requests = Vec::new();
    for i in 0..transfers {
        let from = rng.next(accounts as u64) as usize;
        let to = (from + 1 + rng.next(accounts as u64 - 1) as usize) % accounts;
        let amount = 1 + rng.next(150) as i64;
        nats.publish(OutgoingMessage {
            id: format!("m{i}"),
            topic: TRANSFERS.to_owned(),
            partition_key: None,
            headers: BTreeMap::new(),
            payload: json!({"id": format!("t{i}"), "from": names[from], "to": names[to], "amount": amount})
                .to_string()
                .into_bytes(),
        })
        .await
        .expect("publish a transfer");
        requests.push((from, to, amount));
    }

    let mut extra = vec![
        "--visibility-ms".to_owned(),
        "1500".to_owned(),
        "--concurrency".to_owned(),
        "4".to_owned(),
    ];
    if let Some(m) = mutant {
        extra.extend(["--mutant".to_owned(), m.name().to_owned()]);
    }
    let mut children: Vec<ChildProcess> = (1..=3)
        .map(|n| servers.child(n, "transfer", &extra))
        .collect();
    // SIGKILL a random process every 0.3–0.9 s (every 1–4 s in the larger runs, until the
    // work is done) and start a new one in its place.
    let mut kills_landed = 0;
    let spread = large(transfers as u64);
    for k in 0..kills {
        let pause = if spread {
            1_000 + rng.next(3_000)
        } else {
            300 + rng.next(600)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if spread && unacknowledged(&nats, "transfer", TRANSFERS, transfers as u64).await == 0 {
            break;
        }
        let at = rng.next(children.len() as u64) as usize;
        let victim = children.swap_remove(at);
        if tokio::task::block_in_place(|| victim.kill_9()).expect("SIGKILL") {
            kills_landed += 1;
        }
        let child = tokio::task::block_in_place(|| servers.child(10 + k, "transfer", &extra));
        children.push(child);
    }
    wait_until_done(
        &nats,
        &store,
        "transfer",
        TRANSFERS,
        transfers as u64,
        bound(120, transfers as u64),
    )
    .await;
    let reports = tokio::task::block_in_place(|| stop_all(children));

    let mut expected = vec![START; accounts];
    let mut unrecorded = Vec::new();
    let mut booked = 0;
    for (i, (from, to, amount)) in requests.iter().enumerate() {
        let record = store
            .entity(&LookupRef::new("transfer/id", format!("t{i}")), None)
            .await
            .expect("read a transfer");
        match record
            .as_ref()
            .and_then(|r| r.get("transfer/status"))
            .and_then(|s| s.as_str())
        {
            Some("booked") => {
                expected[*from] -= amount;
                expected[*to] += amount;
                booked += 1;
            }
            Some("refused") => {}
            _ => unrecorded.push(format!("t{i}")),
        }
    }
    let mut balances = Vec::new();
    for n in &names {
        balances.push(
            store
                .entity(&LookupRef::new("account/id", n.as_str()), None)
                .await
                .expect("read an account")
                .and_then(|e| e.get("account/balance").and_then(serde_json::Value::as_i64))
                .expect("a balance"),
        );
    }
    let events = Events::read_dir(&servers.events).expect("read the events");
    let k = Kills {
        transfers,
        accounts,
        transactions: servers.transactions().await,
        balances,
        expected,
        unrecorded,
        kills_landed,
    };
    println!(
        "FIGURE server_kills seed={seed_value} mutant={:?} transfers={transfers} \
         accounts={accounts} processes=3 kills_landed={kills_landed} booked={booked} \
         handler_calls={} redelivered_messages={} transactions={} doubled={} lost={} \
         balances={:?} explained={:?} reports={reports:?}",
        mutant.map(Mutant::name),
        events.total(HANDLER),
        events.counts(REDELIVERY).len(),
        k.transactions.values().sum::<usize>(),
        k.transactions.values().filter(|n| **n > 1).count(),
        k.unrecorded.len(),
        k.balances,
        k.expected,
    );
    drop(store);
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_killed_and_restarted_lose_and_double_nothing() {
    let transfers = size(300);
    // Five kills in the CI size; one per thousand transfers in the larger runs.
    let k = kills(
        "kills",
        transfers as usize,
        (transfers as usize / 1_000).max(5),
        None,
    )
    .await;
    assert!(
        k.kills_landed >= 3,
        "the kills hit running processes: {}",
        k.kills_landed
    );
    assert_eq!(kills_differences(&k), Vec::<String>::new());
    assert_eq!(k.balances.iter().sum::<i64>(), START * k.accounts as i64);
    assert!(k.balances.iter().all(|b| *b >= 0), "{:?}", k.balances);
}

/// Without read validation, processes racing on six accounts overwrite each other's balances:
/// the booked transfers no longer explain them, and the check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_read_validation_fails_the_kill_test() {
    let k = kills("kills-mutant", 300, 2, Some(Mutant::SkipReadValidation)).await;
    assert_ne!(k.balances, k.expected, "the mutant lost no update");
    assert!(!kills_differences(&k).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Shared by the NATS restart, the relay pause and the duplicate window.

/// A transport whose publishes all fail: runs committed through it leave their messages
/// pending in the outbox, for relays to dispatch.
#[derive(Clone)]
struct Refusing(NatsTransport);

impl Transport for Refusing {
    fn publish(
        &self,
        _: OutgoingMessage,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send {
        std::future::ready(Err(TransportError::Unavailable {
            reason: "refused on purpose: the relays dispatch".to_owned(),
        }))
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl std::future::Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        self.0.fetch(request)
    }

    fn ack(
        &self,
        d: &Delivery,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send {
        self.0.ack(d)
    }

    fn nack(
        &self,
        d: &Delivery,
        delay: Duration,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send {
        self.0.nack(d, delay)
    }

    fn dead_letter(
        &self,
        d: &Delivery,
        reason: &str,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send {
        self.0.dead_letter(d, reason)
    }
}

/// Commits `count` runs, each with one message on [`BOOKED`] (`{"id": "t<i>"}`, id
/// `<run key>#0`), leaving the messages pending.
async fn commit_pending(
    servers: &Servers,
    store: &PostgresStore,
    nats: &NatsTransport,
    count: u64,
) {
    let executor = Executor::builder(store.clone(), Refusing(nats.clone()))
        .lease(Duration::from_millis(200))
        .owner("committer")
        .build();
    // A hundred runs per commit (the larger runs commit 100 000); the publishes fail on
    // purpose, the commits stand.
    let mut i = 0;
    while i < count {
        let items = (i..count.min(i + 100))
            .map(|i| {
                BatchItem::new(
                    run_key(i),
                    Effects::from(MessageEffect::new(
                        BOOKED,
                        json!({"id": book::transfer_id(i)}),
                    )),
                )
            })
            .collect();
        let results = executor.run_batch(items).await.expect("commit a batch");
        for r in results {
            if let Err(e) = r {
                assert!(
                    matches!(e, effects_core::RunError::Incomplete { .. }),
                    "a run failed otherwise than at its refused publish: {e}"
                );
            }
        }
        i += 100;
    }
    let backlog = store.backlog().await.expect("backlog");
    assert_eq!(backlog.pending_rows, count, "{backlog:?}");
    assert_eq!(servers.transaction_count().await, count);
}

/// Every message of `topic` on the stream, `(id, stream sequence)`, oldest first: read straight
/// off the stream by a reader of its own that acknowledges nothing, so each stored copy counts
/// once, whatever any consumer group took, acknowledged or left. `reader` names it in errors;
/// `expected` sizes the bound.
async fn read_back(
    nats: &NatsTransport,
    reader: &str,
    topic: &str,
    expected: usize,
) -> Vec<(String, u64)> {
    use effects_core::nats::async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
    use futures_util::StreamExt;
    let every_partition = nats.subject_for(topic, None);
    let every_partition = every_partition
        .strip_suffix(".u")
        .map(|prefix| format!("{prefix}.>"))
        .unwrap_or_else(|| panic!("an unpartitioned subject ends in `.u`: {every_partition}"));
    let stream = nats.config().stream.clone();
    let consumer = nats
        .jetstream()
        .create_consumer_on_stream(
            pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                filter_subject: every_partition,
                inactive_threshold: Duration::from_secs(60),
                ..pull::Config::default()
            },
            stream.as_str(),
        )
        .await
        .unwrap_or_else(|e| panic!("{reader}: a reader of the stream: {e}"));
    // What the filter matches on the stream as the reader is created, read in full.
    let stored = usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX);
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1024)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap_or_else(|e| panic!("{reader}: reading the stream: {e}"));
    let deadline = Instant::now() + bound(60, expected as u64);
    let mut out = Vec::with_capacity(stored);
    while out.len() < stored {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, messages.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{reader}: {} of the {stored} messages read when the bound ran out",
                    out.len()
                )
            })
            .unwrap_or_else(|| panic!("{reader}: the stream ended after {} messages", out.len()))
            .unwrap_or_else(|e| panic!("{reader}: reading the stream: {e}"));
        let sequence = next
            .info()
            .unwrap_or_else(|e| panic!("{reader}: a message without its stream sequence: {e}"))
            .stream_sequence;
        let id = next
            .headers
            .as_ref()
            .and_then(|h| {
                h.iter()
                    .find(|(name, _)| {
                        let name: &str = name.as_ref();
                        name.eq_ignore_ascii_case("Nats-Msg-Id")
                    })
                    .and_then(|(_, values)| values.last())
                    .map(|v| v.as_str().to_owned())
            })
            .unwrap_or_else(|| format!("(no id, sequence {sequence})"));
        out.push((id, sequence));
    }
    out
}

/// What is wrong with the messages on the stream: a run whose message is missing, there more
/// than once, or under another key than its own. Empty when each is there once.
fn stream_differences(on_stream: &[(String, u64)], runs: u64) -> Vec<String> {
    let mut by_id: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, _) in on_stream {
        *by_id.entry(id.as_str()).or_default() += 1;
    }
    let mut wrong = Vec::new();
    let expected: std::collections::BTreeSet<String> =
        (0..runs).map(|i| format!("{}#0", run_key(i))).collect();
    for id in &expected {
        match by_id.get(id.as_str()) {
            Some(1) => {}
            Some(n) => wrong.push(format!("{id} on the stream {n} times")),
            None => wrong.push(format!("{id} missing")),
        }
    }
    for (id, n) in &by_id {
        if !expected.contains(*id) {
            wrong.push(format!("{id} ({n}x): a message under a key no run has"));
        }
    }
    wrong
}

fn sigstop(child: &ChildProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(signal)
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {}", child.id());
}

fn events_now(servers: &Servers) -> Events {
    Events::read_dir(&servers.events).unwrap_or_default()
}

/// Publish attempts per id beyond the first: copies sent again, which the stream absorbed if
/// the id is there once.
fn published_again(events: &Events) -> usize {
    events
        .counts(PUBLISH)
        .values()
        .map(|n| n.saturating_sub(1))
        .sum()
}

// ---------------------------------------------------------------------------------------------
// NATS restarted mid-run.

struct Restarts {
    messages: u64,
    on_stream: Vec<(String, u64)>,
    events: Events,
    restarts: usize,
}

async fn nats_restarts(name: &str, messages: u64, mutant: Option<Mutant>) -> Restarts {
    let mut servers = Servers::start(name).await;
    let store = servers.store().await;
    let nats = servers.transport().await;
    book::seed(&nats, 0..messages, false)
        .await
        .expect("publish the inputs");
    let mut extra = vec![
        "--lose-acks".to_owned(),
        "10".to_owned(),
        "--visibility-ms".to_owned(),
        "1000".to_owned(),
        "--concurrency".to_owned(),
        "4".to_owned(),
    ];
    if let Some(m) = mutant {
        extra.extend(["--mutant".to_owned(), m.name().to_owned()]);
    }
    let children: Vec<ChildProcess> = (1..=2).map(|n| servers.child(n, "book", &extra)).collect();
    // SIGKILL the server at a third and at two thirds of the runs, each time down 2.5 s:
    // longer than a publish waits for its acknowledgement (2 s), so publishes fail and are
    // sent again.
    let mut restarts = 0;
    for at in [messages / 3, 2 * messages / 3] {
        let deadline = Instant::now() + bound(60, messages);
        while servers.transaction_count().await < at && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::block_in_place(|| servers.nats.kill());
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        tokio::task::block_in_place(|| servers.nats.restart());
        restarts += 1;
    }
    wait_until_done(
        &nats,
        &store,
        HANDLER_NAME,
        INPUTS,
        messages,
        bound(120, messages),
    )
    .await;
    let reports = tokio::task::block_in_place(|| stop_all(children));
    let on_stream = read_back(&nats, "check", BOOKED, messages as usize).await;
    let events = events_now(&servers);
    let r = Restarts {
        messages,
        on_stream,
        events,
        restarts,
    };
    println!(
        "FIGURE server_nats_restarts mutant={:?} processes=2 messages={messages} \
         restarts={restarts} redelivered_inputs={} handler_calls={} publish_attempts={} \
         published_ids={} published_again={} on_stream={} wrong={} reports={reports:?}",
        mutant.map(Mutant::name),
        r.events.counts(REDELIVERY).len(),
        r.events.total(HANDLER),
        r.events.total(PUBLISH),
        r.events.counts(PUBLISH).len(),
        published_again(&r.events),
        r.on_stream.len(),
        stream_differences(&r.on_stream, messages).len(),
    );
    drop(store);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_run_dispatches_each_run_once_under_its_key() {
    let r = nats_restarts("natsrestart", size(400), None).await;
    assert_eq!(r.restarts, 2);
    assert_eq!(
        stream_differences(&r.on_stream, r.messages),
        Vec::<String>::new()
    );
    // Every publish attempt is counted; each id reached the stream once however often it was
    // sent.
    assert!(r.events.total(PUBLISH) >= r.messages as usize);
    assert_eq!(r.events.counts(PUBLISH).len(), r.messages as usize);
}

/// Without the duplicate check, an input redelivered after the restart runs again under a key
/// of its own, and its message goes out a second time under that key: the check sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_duplicate_check_dispatches_under_two_keys() {
    let r = nats_restarts("natsrestart-mutant", 300, Some(Mutant::SkipDuplicateCheck)).await;
    let wrong = stream_differences(&r.on_stream, r.messages);
    assert!(
        wrong.iter().any(|w| w.contains("a key no run has")),
        "no run was dispatched under a second key: {wrong:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A relay paused past its lease.

struct Pause {
    runs: u64,
    /// What the stream holds once the second relay has dispatched everything, before the paused
    /// relays resume.
    on_stream: Vec<(String, u64)>,
    events: Events,
    /// What the stream holds after the paused relays resumed and finished the batch they held.
    after_resume: Vec<(String, u64)>,
    events_after_resume: Events,
    /// Rows each relay reported as dispatched (marked by it): the second relay's, then the
    /// resumed ones'.
    dispatched: Vec<u64>,
}

/// `dispatched=N` of a relay's report line.
fn dispatched(report: &str) -> u64 {
    report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dispatched="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dispatched count in {report:?}"))
}

async fn relay_pause(name: &str, runs: u64, mutant: Option<Mutant>) -> Pause {
    let servers = Servers::start(name).await;
    let store = servers.store().await;
    let nats = servers.transport().await;
    commit_pending(&servers, &store, &nats, runs).await;
    let mut common = vec!["--lease-ms".to_owned(), "1000".to_owned()];
    if let Some(m) = mutant {
        common.extend(["--mutant".to_owned(), m.name().to_owned()]);
    }
    // Three slow relays: 400 ms before a message reaches NATS, 100 ms after.
    let mut slow = common.clone();
    slow.extend(
        [
            "--batch",
            "5",
            "--delay-before-ms",
            "400",
            "--delay-after-ms",
            "100",
        ]
        .map(str::to_owned),
    );
    let paused: Vec<ChildProcess> = (1..=3).map(|n| servers.child(n, "relay", &slow)).collect();
    // Pause them all in the middle of their work, past their leases. A relay publishes a
    // batch's messages together (they reach NATS at once, 400 ms after it claimed, and marked
    // them under the mutant); 250 ms after the first of them arrive, it is waiting out the 400
    // ms of its next batch, whose rows it holds and has not published.
    let deadline = Instant::now() + Duration::from_secs(30);
    while events_now(&servers).total(PUBLISH) < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    for child in &paused {
        sigstop(child, "-STOP");
    }
    let before_pause = events_now(&servers).total(PUBLISH);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    // A second relay takes over what their leases no longer hold.
    let second = servers.child(9, "relay", &common);
    let deadline = Instant::now() + bound(60, runs);
    loop {
        let backlog = store.backlog().await.expect("backlog");
        if backlog.pending_rows == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not dispatched: {backlog:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut reports = tokio::task::block_in_place(|| stop_all(vec![second]));
    let on_stream = read_back(&nats, "check", BOOKED, runs as usize).await;
    let events = events_now(&servers);
    // Now the paused relays wake up, past their leases, holding a batch that the second relay
    // has dispatched since: they publish it again (the stream absorbs the copies) and their
    // marks are refused.
    for child in &paused {
        sigstop(child, "-CONT");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempts = events.total(PUBLISH);
    loop {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let now = events_now(&servers).total(PUBLISH);
        if now == attempts || Instant::now() > deadline {
            break;
        }
        attempts = now;
    }
    reports.extend(tokio::task::block_in_place(|| stop_all(paused)));
    let after_resume = read_back(&nats, "check-after-resume", BOOKED, runs as usize).await;
    let p = Pause {
        runs,
        on_stream,
        events,
        after_resume,
        events_after_resume: events_now(&servers),
        dispatched: reports.iter().map(|r| dispatched(r)).collect(),
    };
    println!(
        "FIGURE server_relay_pause mutant={:?} runs={runs} paused_relays=3 \
         publish_attempts_before_pause={before_pause} publish_attempts={} published_ids={} \
         published_again={} on_stream={} wrong={:?} after_resume: publish_attempts={} \
         published_again={} on_stream={} wrong={:?} dispatched_by_relay={:?} reports={reports:?}",
        mutant.map(Mutant::name),
        p.events.total(PUBLISH),
        p.events.counts(PUBLISH).len(),
        published_again(&p.events),
        p.on_stream.len(),
        stream_differences(&p.on_stream, runs),
        p.events_after_resume.total(PUBLISH),
        published_again(&p.events_after_resume),
        p.after_resume.len(),
        stream_differences(&p.after_resume, runs),
        p.dispatched,
    );
    drop(store);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_paused_past_its_lease_is_taken_over_without_loss_or_double() {
    let p = relay_pause("relaypause", size(60), None).await;
    assert_eq!(
        stream_differences(&p.on_stream, p.runs),
        Vec::<String>::new()
    );
    assert_eq!(p.events.counts(PUBLISH).len(), p.runs as usize);
    // Resumed, a paused relay that held a claimed batch sends it once more (one stopped inside
    // a transaction finds it ended by the server, and sends nothing): the stream keeps one copy
    // of each, and no row is marked twice. How many are sent again depends on where each relay
    // stopped, so it is reported, not required.
    assert_eq!(
        stream_differences(&p.after_resume, p.runs),
        Vec::<String>::new()
    );
    assert_eq!(p.dispatched.len(), 4, "a report from each relay");
    assert_eq!(
        p.dispatched.iter().sum::<u64>(),
        p.runs,
        "{:?}",
        p.dispatched
    );
}

/// Marking before publishing: rows the paused relays had marked but not yet published are
/// never sent by anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_marking_before_publishing_loses_the_paused_relays_messages() {
    let p = relay_pause("relaypause-mutant", 60, Some(Mutant::MarkBeforePublish)).await;
    let wrong = stream_differences(&p.on_stream, p.runs);
    assert!(
        wrong.iter().any(|w| w.ends_with("missing")),
        "nothing lost: {wrong:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fenced sends: a holder paused past its lease sends nothing again once resumed.

/// The stream's duplicate window in the pause tests: shorter than the pause, so that the
/// stream cannot hide a message sent a second time.
const PAUSE_WINDOW: Duration = Duration::from_millis(1_000);

struct Fenced {
    runs: u64,
    /// Once the other process finished everything, before the paused one resumed.
    on_stream_before: Vec<(String, u64)>,
    events_before: Events,
    /// After the paused one resumed and ran on.
    on_stream: Vec<(String, u64)>,
    events: Events,
    reports: Vec<String>,
}

/// A process stopped (SIGSTOP) at `point` — a worker right after its group commit, or a relay
/// right after its claim — holding every run's outbox rows, for longer than its 1 s lease and
/// the stream's duplicate window; a second process of the same kind takes the rows over and
/// publishes them; then the first is resumed and runs on for 3 s.
async fn fenced(name: &str, runs: u64, point: &str, mutant: Option<Mutant>) -> Fenced {
    let relay = point == "after_claim";
    let servers = Servers::start(name).await;
    let store = servers.store().await;
    let nats = nats_support::connect_or_explain(nats_config_with_window(
        &servers.nats.url(),
        &servers.stream,
        Some(PAUSE_WINDOW),
    ))
    .await;
    let workload = if relay {
        commit_pending(&servers, &store, &nats, runs).await;
        "relay"
    } else {
        book::seed(&nats, 0..runs, false)
            .await
            .expect("publish the inputs");
        "book"
    };
    let mut common: Vec<String> = [
        "--lease-ms",
        "1000",
        "--visibility-ms",
        "1500",
        "--duplicate-window-ms",
        "1000",
        "--batch",
        "100000",
        "--concurrency",
        "8",
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(m) = mutant {
        common.extend(["--mutant".to_owned(), m.name().to_owned()]);
    }
    let mut pausing = common.clone();
    pausing.extend(
        [
            "--pause-at",
            point,
            "--pause-ms",
            "500",
            "--worker-relay",
            "false",
        ]
        .map(str::to_owned),
    );
    let mut first = servers.child(1, workload, &pausing);
    let at = tokio::task::block_in_place(|| first.wait_for("PAUSE", Duration::from_secs(60)))
        .unwrap_or_else(|e| panic!("{e}"));
    sigstop(&first, "-STOP");
    // Past the lease and the duplicate window.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let second = servers.child(2, workload, &common);
    if relay {
        let deadline = Instant::now() + bound(60, runs);
        while store.backlog().await.expect("backlog").pending_rows > 0 {
            assert!(Instant::now() < deadline, "the second relay did not finish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        wait_until_done(&nats, &store, HANDLER_NAME, INPUTS, runs, bound(90, runs)).await;
    }
    let on_stream_before = read_back(&nats, "before-resume", BOOKED, runs as usize).await;
    let events_before = events_now(&servers);
    // Well past the window after the takeover's publishes (the server forgets ids in periodic
    // sweeps): a copy published now is stored again.
    tokio::time::sleep(2 * PAUSE_WINDOW + Duration::from_millis(500)).await;
    sigstop(&first, "-CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reports = tokio::task::block_in_place(|| stop_all(vec![first, second]));
    let f = Fenced {
        runs,
        on_stream_before,
        events_before,
        on_stream: read_back(&nats, "after-resume", BOOKED, runs as usize).await,
        events: events_now(&servers),
        reports,
    };
    println!(
        "FIGURE server_fenced point={point} mutant={:?} runs={runs} paused_at=`{at}` \
         before_resume: on_stream={} published_again={} wrong={:?} \
         after_resume: on_stream={} published_again={} wrong={:?} reports={:?}",
        mutant.map(Mutant::name),
        f.on_stream_before.len(),
        published_again(&f.events_before),
        stream_differences(&f.on_stream_before, runs),
        f.on_stream.len(),
        published_again(&f.events),
        stream_differences(&f.on_stream, runs),
        f.reports,
    );
    drop(store);
    f
}

fn assert_sent_once(f: &Fenced) {
    assert_eq!(
        stream_differences(&f.on_stream_before, f.runs),
        Vec::<String>::new(),
        "taken over: each message on the stream once"
    );
    assert_eq!(
        stream_differences(&f.on_stream, f.runs),
        Vec::<String>::new(),
        "resumed: still each message once on the stream"
    );
    assert_eq!(
        published_again(&f.events),
        0,
        "no publish attempt a second time, counted at the source"
    );
}

/// A worker paused right after its group commit, past its lease: the relay of another process
/// sends the runs' messages; resumed, the paused worker sends none of them (its fence finds the
/// leases taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_after_its_commit_sends_nothing_twice() {
    assert_sent_once(&fenced("fencedworker", size(40), "after_commit", None).await);
}

/// A relay paused right after it claimed a batch, past its lease: another relay sends it;
/// resumed, the paused relay sends none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_paused_after_its_claim_sends_nothing_twice() {
    assert_sent_once(&fenced("fencedrelay", size(40), "after_claim", None).await);
}

fn assert_sent_twice(f: &Fenced) {
    assert!(published_again(&f.events) > 0, "published again");
    assert!(
        !stream_differences(&f.on_stream, f.runs).is_empty(),
        "copies on the stream"
    );
}

/// Without the fence the resumed relay publishes its batch again, and the stream, whose
/// duplicate window has passed, stores the copies: the checks above fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_the_fence_sends_a_paused_batch_twice() {
    assert_sent_twice(&fenced("fencedmutant", 40, "after_claim", Some(Mutant::NoFence)).await);
}

/// ... and so does the resumed worker with what it had committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_the_fence_sends_a_paused_commit_twice() {
    assert_sent_twice(&fenced("fencedmutantw", 40, "after_commit", Some(Mutant::NoFence)).await);
}

// ---------------------------------------------------------------------------------------------
// A relay down for longer than the duplicate window.

const WINDOW: Duration = Duration::from_millis(1_000);

/// Reads `BOOKED` and records each run, counting its calls.
#[derive(Debug)]
struct AuditHandler {
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl effects_core::Handler for AuditHandler {
    type Input = book::Booking;
    type Output = Effects;
    const DESCRIPTOR: &'static effects_core::HandlerDescriptor = &effects_core::HandlerDescriptor {
        name: "audit",
        topic: Some(BOOKED),
        key: None,
        input: "Booking",
        schemas: &[],
    };

    fn handle(&self, b: book::Booking) -> Effects {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Effects::from(DatomEffect::assert(
            LookupRef::new("audit/id", b.id.as_str()),
            [("audit/seen", json!(true))],
        ))
    }
}

struct Window {
    runs: u64,
    on_stream: Vec<(String, u64)>,
    audit_transactions: BTreeMap<String, usize>,
    deliveries: Vec<(String, u64, bool)>,
    handler_calls: usize,
}

fn window_differences(w: &Window) -> Vec<String> {
    let mut wrong = Vec::new();
    for i in 0..w.runs {
        let key = message_key("audit", BOOKED, &format!("{}#0", run_key(i)));
        let n = w.audit_transactions.get(&key).copied().unwrap_or(0);
        if n != 1 {
            wrong.push(format!("{key} applied {n} times"));
        }
    }
    if w.audit_transactions.len() as u64 != w.runs {
        wrong.push(format!(
            "{} audit keys committed for {} messages",
            w.audit_transactions.len(),
            w.runs
        ));
    }
    wrong
}

async fn relay_down_past_window(
    name: &str,
    runs: u64,
    cycles: usize,
    mutant: Option<Mutant>,
) -> Window {
    let servers = Servers::start(name).await;
    let store = servers.store().await;
    let nats = nats_support::connect_or_explain(nats_config_with_window(
        &servers.nats.url(),
        &servers.stream,
        Some(WINDOW),
    ))
    .await;
    commit_pending(&servers, &store, &nats, runs).await;
    let window_ms = WINDOW.as_millis().to_string();
    let mut args: Vec<String> = [
        "--lease-ms",
        "500",
        "--batch",
        "1",
        "--duplicate-window-ms",
        &window_ms,
    ]
    .map(str::to_owned)
    .to_vec();
    // Each relay publishes one message, marks it, publishes the next and dies before marking
    // it; the next relay comes after the window.
    let mut died = 0;
    for n in 0..cycles {
        let mut dying = args.clone();
        dying.extend(["--die-at-publish".to_owned(), "2".to_owned()]);
        let mut relay = servers.child(n + 1, "relay", &dying);
        tokio::task::block_in_place(|| {
            relay
                .wait_for("FAULT", Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = relay.wait(Duration::from_secs(10));
        });
        died += 1;
        // Past the lease, and well past the window: the server forgets ids in periodic
        // sweeps, not at the very millisecond.
        tokio::time::sleep(2 * WINDOW + Duration::from_millis(500)).await;
    }
    args.extend(["--concurrency".to_owned(), "1".to_owned()]);
    if large(runs) {
        // The last relay takes a batch's worth at a time in the larger runs.
        if let Some(at) = args.iter().position(|a| a == "--batch") {
            args[at + 1] = "64".to_owned();
        }
    }
    let last = servers.child(99, "relay", &args);
    let deadline = Instant::now() + bound(60, runs);
    while store.backlog().await.expect("backlog").pending_rows > 0 {
        assert!(Instant::now() < deadline, "the last relay did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::task::block_in_place(|| stop_all(vec![last]));

    // The consumers: a worker on `BOOKED`, keyed by the message id.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut builder = Executor::builder(store.clone(), nats.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let seen: Arc<std::sync::Mutex<Vec<(String, u64, bool)>>> = Arc::default();
    let log = Arc::clone(&seen);
    let worker = effects_core::worker::Worker::new(
        Arc::new(builder.build()),
        AuditHandler {
            calls: Arc::clone(&calls),
        },
    )
    .with_config(effects_core::worker::WorkerConfig {
        concurrency: if large(runs) { 8 } else { 1 },
        // One delivery at a time in the small runs: a copy is fetched only once its original
        // settled.
        max_in_flight: if large(runs) { 256 } else { 1 },
        fetch_wait: Duration::from_millis(50),
        ..effects_core::worker::WorkerConfig::default()
    })
    .on_processed(move |d, p| {
        let applied = matches!(p, effects_core::worker::Processed::Applied { .. });
        log.lock()
            .expect("seen")
            .push((d.message_id.clone(), d.sequence, applied));
    });
    let on_stream = read_back(&nats, "check", BOOKED, runs as usize).await;
    let total = on_stream.len() as u64;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    wait_until_done(&nats, &store, "audit", BOOKED, total, bound(60, total)).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), running).await;
    let audit_transactions: BTreeMap<String, usize> = servers
        .transactions()
        .await
        .into_iter()
        .filter(|(k, _)| k.starts_with("audit:"))
        .collect();
    let deliveries = seen.lock().expect("seen").clone();
    let w = Window {
        runs,
        on_stream,
        audit_transactions,
        deliveries,
        handler_calls: calls.load(std::sync::atomic::Ordering::Relaxed),
    };
    let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, _) in &w.on_stream {
        *copies.entry(id.as_str()).or_default() += 1;
    }
    let doubled_on_stream = copies.values().filter(|n| **n > 1).count();
    let delivered_twice = {
        let mut by: BTreeMap<&str, std::collections::BTreeSet<u64>> = BTreeMap::new();
        for (id, seq, _) in &w.deliveries {
            by.entry(id.as_str()).or_default().insert(*seq);
        }
        by.values().filter(|s| s.len() > 1).count()
    };
    println!(
        "FIGURE server_duplicate_window mutant={:?} runs={runs} window_ms={} relays_died={died} \
         on_stream={} ids_stored_twice={doubled_on_stream} ids_delivered_twice={delivered_twice} \
         deliveries={} handler_calls={} audit_transactions={} wrong={:?}",
        mutant.map(Mutant::name),
        WINDOW.as_millis(),
        w.on_stream.len(),
        w.deliveries.len(),
        w.handler_calls,
        w.audit_transactions.values().sum::<usize>(),
        window_differences(&w),
    );
    drop(store);
    w
}

fn stored_twice(w: &Window) -> usize {
    let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, _) in &w.on_stream {
        *copies.entry(id.as_str()).or_default() += 1;
    }
    copies.values().filter(|n| **n > 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_down_past_the_duplicate_window_is_absorbed_by_the_consumers() {
    let w = relay_down_past_window("window", size(12), 3, None).await;
    // Each relay that died left one message published and unmarked; its successor came after
    // the window, so the stream took the copy: the duplicates reached the consumers.
    let twice = stored_twice(&w);
    assert!(twice >= 1, "no copy got in: {:?}", w.on_stream);
    assert!(w.on_stream.len() > w.runs as usize, "{:?}", w.on_stream);
    let delivered: usize = w.deliveries.len();
    assert_eq!(delivered, w.on_stream.len());
    // And were absorbed: one transaction per message id.
    assert_eq!(window_differences(&w), Vec::<String>::new());
    if large(w.runs) {
        // Eight deliveries at a time: a copy handled beside its original reaches the handler
        // too (the key refuses it at the commit), so calls are bounded by the deliveries.
        assert!(w.handler_calls <= delivered, "{} calls", w.handler_calls);
    } else {
        // One delivery at a time: a copy finds its run there and never reaches the handler.
        assert_eq!(w.handler_calls, w.runs as usize);
    }
}

/// Without the duplicate check, the copies are applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_duplicate_check_applies_the_copies() {
    let w = relay_down_past_window("window-mutant", 12, 3, Some(Mutant::SkipDuplicateCheck)).await;
    assert!(stored_twice(&w) > 0);
    assert!(
        !window_differences(&w).is_empty(),
        "the copies were absorbed"
    );
}
