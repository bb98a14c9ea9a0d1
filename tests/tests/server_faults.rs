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
//!
//! Counted at the source: committed transactions per key (the `transactions` table, one row
//! per commit, never deduplicated), and in per-process event files that survive SIGKILL,
//! handler calls, publish attempts, fetched deliveries and redeliveries (the broker's delivery
//! count) and lost acknowledgements. Each check is run once more against a deliberately broken
//! executor (`Mutant`) and must fail there.
//!
//! `cargo test -p effects-tests --features postgres,nats --test server_faults -- --nocapture`
//! prints a `FIGURE` line per run. `EFFECTS_SERVER_FAULTS_MESSAGES=100000` sets the storm's size
//! (the larger run of RELIABILITY.md; build with `--release`).

#![cfg(all(feature = "postgres", feature = "nats"))]

mod backends;
mod nats_support;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::postgres::{Postgres, PrivateServer, client};
use effects_core::executor::{Executor, Mutant};
use effects_core::handler::business_key;
use effects_core::nats::async_nats::jetstream::consumer::pull;
use effects_core::nats::{NatsConfig, NatsTransport, Reconnect};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::store::Store;
use effects_core::transport::{OutgoingMessage, Transport};
use effects_core::{DatomEffect, Effects, LookupRef};
use effects_tests::harness::book::{self, HANDLER_NAME, INPUTS, run_key};
use effects_tests::harness::process::ChildProcess;
use effects_tests::harness::tally::{ACK_LOST, Events, FETCH, HANDLER, PUBLISH, REDELIVERY};
use nats_support::PrivateNats;
use serde_json::json;

const CHILD: &str = env!("CARGO_BIN_EXE_effects-server-child");

/// The topic of the transfer workload's inputs (the child's `TRANSFERS`).
const TRANSFERS: &str = "transfer-requests";

/// The NATS settings of the test and of every child (the child's `nats_config`).
fn nats_config(url: &str, stream: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url).with_stream(stream, stream.to_ascii_lowercase());
    config.connect_timeout = Duration::from_secs(3);
    config.request_timeout = Duration::from_secs(2);
    config.reconnect = Reconnect {
        max_attempts: None,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(250),
    };
    config.poll_interval = Duration::from_millis(20);
    config
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

    /// Committed transactions per run key, on a fresh connection.
    async fn transactions(&self) -> BTreeMap<String, usize> {
        let raw = client(self.pg.port, self.db.name()).await.expect("connect");
        raw.query(
            "SELECT set_config('search_path', $1, false)",
            &[&self.schema],
        )
        .await
        .expect("search path");
        raw.query(
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
    book::seed(&nats, 0..messages, false)
        .await
        .expect("publish the inputs");
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
    let started = Instant::now();
    let children: Vec<ChildProcess> = (1..=4).map(|n| servers.child(n, "book", &extra)).collect();
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

fn storm_size() -> u64 {
    std::env::var("EFFECTS_SERVER_FAULTS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_across_four_worker_processes() {
    let messages = storm_size();
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
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("a{i}")).collect();
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
        let from = rng.next(ACCOUNTS as u64) as usize;
        let to = (from + 1 + rng.next(ACCOUNTS as u64 - 1) as usize) % ACCOUNTS;
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
    // SIGKILL a random process every 0.3–0.9 s and start a new one in its place.
    let mut kills_landed = 0;
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(300 + rng.next(600))).await;
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
        Duration::from_secs(120),
    )
    .await;
    let reports = tokio::task::block_in_place(|| stop_all(children));

    let mut expected = vec![START; ACCOUNTS];
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
        transactions: servers.transactions().await,
        balances,
        expected,
        unrecorded,
        kills_landed,
    };
    println!(
        "FIGURE server_kills seed={seed_value} mutant={:?} transfers={transfers} \
         processes=3 kills={kills} kills_landed={kills_landed} booked={booked} \
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
    let k = kills("kills", 300, 5, None).await;
    assert!(
        k.kills_landed >= 3,
        "the kills hit running processes: {}",
        k.kills_landed
    );
    assert_eq!(kills_differences(&k), Vec::<String>::new());
    assert_eq!(k.balances.iter().sum::<i64>(), START * ACCOUNTS as i64);
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
