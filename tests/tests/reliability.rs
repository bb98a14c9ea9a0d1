//! Reliability figures (see RELIABILITY.md), counted at the source: committed transactions per
//! run key (the `transactions` table: one row per committed run, never deduplicated), handler
//! calls (the handler counts them), publish attempts and fetched deliveries (a counting
//! wrapper around the transport), HTTP attempts (what the wiremock server received). Every
//! figure is asserted against what is expected, id by id, and for every figure a test below
//! runs a deliberately broken executor (`Mutant`) and asserts that the same check fails.
//!
//! Duplicate storms with real redeliveries through `Worker::run` (lost acknowledgements and
//! deliveries stalled past their visibility timeout), one key from two tasks and from two
//! processes, a real child process killed with SIGKILL at every boundary and restarted (with a
//! fixed owner name and with the default one), key reuse, bad input. Every test is bounded
//! (fixed sizes, a timeout on every wait) and prints a `FIGURE` line; run with
//! `-- --nocapture --test-threads 1` to read them in order.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use effects_core::executor::{Executor, FaultPoint, Limits, Mutant, RunError, RunOptions};
use effects_core::relay::RelayConfig;
use effects_core::store::{SqliteOptions, SqliteStore, Synchronous};
use effects_core::transport::{FetchRequest, OutgoingMessage, Transport};
use effects_core::worker::{Processed, Worker, WorkerConfig};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use effects_tests::harness::book::{
    self, BOOKED, BookHandler, HANDLER_NAME, INPUTS, RECEIPTS, Requests, input_message_id, run_key,
    transfer_id,
};
use effects_tests::harness::child::{WorkerArgs, fault_name};
use effects_tests::harness::figures::{self, HttpAttempts, differences};
use effects_tests::harness::process::ChildProcess;
use effects_tests::harness::redeliver::{
    CountingTransport, Fate, Redeliveries, StallFirstDelivery,
};
use effects_tests::harness::tally::{
    ACK_LOST, Events, FETCH, HANDLER, PUBLISH, STALL, STALL_TIMEOUT, Tally,
};
use serde_json::json;
use support::{BlockHandler, PrivateDir, eventually, http_client, sql_i64};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const CRASH_CHILD: &str = env!("CARGO_BIN_EXE_effects-crash-child");
const SAME_KEY_CHILD: &str = env!("CARGO_BIN_EXE_effects-same-key-child");

/// `synchronous = NORMAL`: for the tests about idempotency, not durability (commits survive a
/// killed process either way; the crash tests use the default, FULL).
fn normal() -> SqliteOptions {
    SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    }
}

fn sizes(sets: BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, usize> {
    sets.into_iter().map(|(k, v)| (k, v.len())).collect()
}

/// A server on loopback answering 200 to every POST.
async fn http_server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&server)
        .await;
    server
}

/// Per-path checks: every listed path got exactly the expected attempts, and all the attempts
/// at a path carried one idempotency key, `<run key>#0`.
fn http_differences(
    http: &HttpAttempts,
    inputs: impl Iterator<Item = u64> + Clone,
    attempts: impl Fn(u64) -> usize,
) -> (Vec<String>, Vec<String>) {
    let paths: Vec<(u64, String)> = inputs
        .map(|i| (i, format!("/notify/{}", transfer_id(i))))
        .collect();
    let by_path: BTreeMap<&str, u64> = paths.iter().map(|(i, p)| (p.as_str(), *i)).collect();
    let counted = differences(
        "HTTP attempts",
        paths.iter().map(|(_, p)| p.as_str()),
        &http.attempts(),
        |p| by_path.get(p).map_or(0, |i| attempts(*i)),
    );
    let mut keys = Vec::new();
    for (i, path) in &paths {
        let expected: BTreeSet<String> = [format!("{}#0", run_key(*i))].into();
        if let Some(a) = http.by_path.get(path) {
            if a.keys != expected {
                keys.push(format!(
                    "idempotency keys at {path}: {:?}, expected {expected:?}",
                    a.keys
                ));
            }
        }
    }
    (counted, keys)
}

// ---------------------------------------------------------------------------------------------
// Duplicate storm, redelivered for real.

/// What a storm counted, and how it differed from what is expected, by figure.
#[derive(Debug, Default)]
struct Storm {
    inputs: u64,
    deliveries: usize,
    redelivered: usize,
    planned: usize,
    lost_acks: usize,
    stalls: usize,
    stall_timeouts: usize,
    handler_calls: usize,
    transactions: usize,
    http_attempts: usize,
    booked: usize,
    elapsed: Duration,
    diffs: BTreeMap<&'static str, Vec<String>>,
}

impl Storm {
    fn failed(&self) -> Vec<&str> {
        self.diffs
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(k, _)| *k)
            .collect()
    }
}

/// `n` inputs through `Worker::run` (8 at once), each booking one transfer: a datom, an HTTP
/// request, a message. 10 % lose their first acknowledgement and 10 % stall on their first
/// delivery until the redelivery was acknowledged (at most 2 at once; a stall that finds no
/// slot loses its first ack instead): 20 % are redelivered by the log once their 2 s
/// visibility passes.
///
/// The log is a file of its own, like an external broker: a log in the store's file is
/// acknowledged inside the run's commit, where no acknowledgement can be lost.
async fn storm(name: &str, n: u64, mutant: Option<Mutant>) -> Storm {
    let dir = PrivateDir::new(name);
    let db = dir.join("store.db");
    let broker = dir.join("broker.db");
    let store = SqliteStore::open_with(&db, &normal()).unwrap();
    let broker_store = SqliteStore::open_with(&broker, &normal()).unwrap();
    let server = http_server().await;
    let tally = Tally::in_memory();
    let plan = Arc::new(Redeliveries::new(
        10,
        10,
        2,
        Duration::from_secs(30),
        broker.clone(),
        tally.clone(),
    ));
    let transport = CountingTransport::new(broker_store.log(), Arc::clone(&plan));
    let mut builder =
        Executor::builder(store.clone(), transport.clone()).http(http_client(&server.uri(), 3));
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    let worker = Arc::new(
        Worker::new(
            Arc::clone(&executor),
            BookHandler {
                tally: tally.clone(),
                requests: Requests::Every(1),
            },
        )
        .with_config(WorkerConfig {
            concurrency: 8,
            fetch_wait: Duration::from_millis(50),
            visibility: Duration::from_secs(2),
            relay: Some(RelayConfig {
                interval: Duration::from_millis(50),
                ..RelayConfig::default()
            }),
            ..WorkerConfig::default()
        })
        .load_with(StallFirstDelivery::new(Arc::clone(&plan))),
    );
    book::seed(transport.inner(), 0..n, false).await.unwrap();

    let started = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let worker = Arc::clone(&worker);
        async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    eventually(
        "every input acknowledged and nothing pending",
        Duration::from_secs(240),
        || {
            let (log, store) = (transport.inner().clone(), store.clone());
            async move {
                let unacked = log.unacknowledged(HANDLER_NAME, INPUTS).await.unwrap();
                let backlog = store.backlog().await.unwrap();
                unacked == 0 && backlog.pending_rows == 0 && backlog.open_runs == 0
            }
        },
    )
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the worker stops")
        .unwrap();
    let elapsed = started.elapsed();

    let events = tally.events();
    let ids: Vec<String> = (0..n).map(transfer_id).collect();
    let keys: Vec<String> = (0..n).map(run_key).collect();
    let fetches = events.counts(FETCH);
    let planned: Vec<String> = (0..n)
        .map(input_message_id)
        .filter(|m| plan.fate(m) != Fate::Normal)
        .collect();
    let txs = figures::transactions_per_key(&db).unwrap();
    let http = HttpAttempts::of(&server.received_requests().await.unwrap());
    let booked = sizes(figures::message_ids_by_transfer(&broker, BOOKED).unwrap());

    let mut diffs = BTreeMap::new();
    diffs.insert(
        "transactions per key",
        differences("transactions", keys.iter().map(String::as_str), &txs, |_| 1),
    );
    // A stalled first delivery reaches the handler after its redelivery did: two calls, one
    // run. A lost ack's redelivery finds the run and never calls the handler.
    diffs.insert(
        "handler calls per input",
        differences(
            "handler calls",
            ids.iter().map(String::as_str),
            &events.counts(HANDLER),
            |id| {
                let message = input_message_id(book::number(id).unwrap_or(u64::MAX));
                if events.count(STALL, &message) > 0 {
                    2
                } else {
                    1
                }
            },
        ),
    );
    let (http_counted, http_keys) = http_differences(&http, 0..n, |_| 1);
    diffs.insert("HTTP attempts per request", http_counted);
    diffs.insert("idempotency keys per request", http_keys);
    diffs.insert(
        "messages per input",
        differences(BOOKED, ids.iter().map(String::as_str), &booked, |_| 1),
    );
    diffs.insert(
        "redelivered",
        planned
            .iter()
            .filter(|m| fetches.get(*m).copied().unwrap_or(0) < 2)
            .map(|m| format!("{m} was planned for redelivery but fetched once"))
            .collect(),
    );
    let unacked = transport
        .inner()
        .unacknowledged(HANDLER_NAME, INPUTS)
        .await
        .unwrap();
    let (pending, dead) = figures::outbox_left(&db).unwrap();
    diffs.insert(
        "left over",
        [
            (
                "inputs unacknowledged",
                i64::try_from(unacked).unwrap_or(i64::MAX),
            ),
            ("outbox rows pending", pending),
            ("outbox rows dead-lettered", dead),
            (
                "stalls that gave up",
                i64::try_from(events.total(STALL_TIMEOUT)).unwrap_or(0),
            ),
        ]
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .map(|(what, v)| format!("{what}: {v}"))
        .collect(),
    );
    Storm {
        inputs: n,
        deliveries: events.total(FETCH),
        redelivered: fetches.values().filter(|c| **c > 1).count(),
        planned: planned.len(),
        lost_acks: events.total(ACK_LOST),
        stalls: events.total(STALL),
        stall_timeouts: events.total(STALL_TIMEOUT),
        handler_calls: events.total(HANDLER),
        transactions: txs.values().sum(),
        http_attempts: http.total(),
        booked: booked.values().sum(),
        elapsed,
        diffs,
    }
}

fn print_storm(name: &str, s: &Storm) {
    println!(
        "FIGURE {name}: inputs={} deliveries={} redelivered={} (planned {}: first acks lost {}, \
         stalled past the visibility timeout {}, stalls gave up {}) handler_calls={} \
         transactions={} http_attempts={} messages={} failed_checks={:?} elapsed_ms={}",
        s.inputs,
        s.deliveries,
        s.redelivered,
        s.planned,
        s.lost_acks,
        s.stalls,
        s.stall_timeouts,
        s.handler_calls,
        s.transactions,
        s.http_attempts,
        s.booked,
        s.failed(),
        s.elapsed.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_with_real_redeliveries() {
    const N: u64 = 1_000;
    let s = storm("storm", N, None).await;
    print_storm("duplicate_storm", &s);
    assert!(s.failed().is_empty(), "{:#?}", s.diffs);
    assert!(
        s.redelivered as u64 >= N / 5,
        "20 % redelivered, counted in fetched deliveries: {}",
        s.redelivered
    );
    assert!(
        s.stalls > 0,
        "some deliveries really stalled past their visibility"
    );
    assert!(s.lost_acks > 0, "some acknowledgements were really lost");
}

/// Without the duplicate check every redelivery applies again: the same checks fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_skip_duplicate_check_fails_the_storm() {
    let s = storm("storm-mutant", 300, Some(Mutant::SkipDuplicateCheck)).await;
    print_storm("duplicate_storm_mutant", &s);
    for figure in [
        "transactions per key",
        "handler calls per input",
        "HTTP attempts per request",
        "idempotency keys per request",
        "messages per input",
    ] {
        assert!(
            !s.diffs[figure].is_empty(),
            "the mutant must fail `{figure}`: {:#?}",
            s.diffs
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One key, two tasks in one process.

struct SameKey {
    keys: usize,
    applied: usize,
    duplicates: usize,
    both_applied: usize,
    transactions: Vec<String>,
    messages: Vec<String>,
}

fn balance(i: usize) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("account/id", format!("a{i}")),
        [("account/balance", json!(i))],
    ))
    .merge(MessageEffect::new(
        "balances",
        json!({"id": format!("a{i}")}),
    ))
}

async fn two_tasks(name: &str, mutant: Option<Mutant>) -> SameKey {
    const KEYS: usize = 500;
    let dir = PrivateDir::new(name);
    let db = dir.join("store.db");
    let store = SqliteStore::open_with(&db, &normal()).unwrap();
    let mut builder = Executor::builder(store.clone(), store.log());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    let (mut applied, mut duplicates, mut both_applied) = (0, 0, 0);
    for i in 0..KEYS {
        let a = tokio::spawn({
            let executor = Arc::clone(&executor);
            async move { executor.run(format!("k{i}"), balance(i)).await }
        });
        let b = tokio::spawn({
            let executor = Arc::clone(&executor);
            async move { executor.run(format!("k{i}"), balance(i)).await }
        });
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        for o in [a, b] {
            if o.is_duplicate() {
                duplicates += 1;
            } else {
                applied += 1;
            }
        }
        if !a.is_duplicate() && !b.is_duplicate() {
            both_applied += 1;
        }
    }
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let accounts: Vec<String> = (0..KEYS).map(|i| format!("a{i}")).collect();
    SameKey {
        keys: KEYS,
        applied,
        duplicates,
        both_applied,
        transactions: differences(
            "transactions",
            keys.iter().map(String::as_str),
            &figures::transactions_per_key(&db).unwrap(),
            |_| 1,
        ),
        messages: differences(
            "messages",
            accounts.iter().map(String::as_str),
            &sizes(figures::message_ids_by_transfer(&db, "balances").unwrap()),
            |_| 1,
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_from_two_tasks() {
    let s = two_tasks("same-key-tasks", None).await;
    println!(
        "FIGURE same_key_two_tasks: keys={} runs={} applied={} duplicates={} both_applied={} \
         keys_with_other_than_one_transaction={} accounts_with_other_than_one_message={}",
        s.keys,
        s.keys * 2,
        s.applied,
        s.duplicates,
        s.both_applied,
        s.transactions.len(),
        s.messages.len()
    );
    assert!(s.transactions.is_empty(), "{:?}", s.transactions);
    assert!(s.messages.is_empty(), "{:?}", s.messages);
    assert_eq!(
        (s.applied, s.duplicates, s.both_applied),
        (s.keys, s.keys, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_skip_duplicate_check_fails_same_key_from_two_tasks() {
    let s = two_tasks("same-key-tasks-mutant", Some(Mutant::SkipDuplicateCheck)).await;
    println!(
        "FIGURE same_key_two_tasks_mutant: keys={} both_applied={} transaction_differences={} \
         message_differences={}",
        s.keys,
        s.both_applied,
        s.transactions.len(),
        s.messages.len()
    );
    assert_eq!(s.transactions.len(), s.keys, "every key applied twice");
    assert_eq!(s.messages.len(), s.keys, "every message sent twice");
}

// ---------------------------------------------------------------------------------------------
// The same keys from two processes on one file.

struct TwoProcesses {
    keys: u64,
    applied: [usize; 2],
    same_tx: usize,
    errors: Vec<String>,
    applied_per_key: Vec<String>,
    transactions: Vec<String>,
    messages: Vec<String>,
    elapsed: Duration,
}

fn two_processes(name: &str, mutant: Option<Mutant>) -> TwoProcesses {
    const KEYS: u64 = 1_000;
    let dir = PrivateDir::new(name);
    let db = dir.join("store.db");
    drop(SqliteStore::open(&db).expect("create the store"));
    let mut args = vec![
        "--db".to_owned(),
        db.display().to_string(),
        "--keys".to_owned(),
        KEYS.to_string(),
    ];
    if let Some(m) = mutant {
        args.extend([
            "--mutant".to_owned(),
            effects_tests::harness::child::mutant_name(m).to_owned(),
        ]);
    }
    let program = PathBuf::from(SAME_KEY_CHILD);
    let mut children: Vec<ChildProcess> = ["A", "B"]
        .iter()
        .map(|n| ChildProcess::spawn(&format!("process {n}"), &program, &args).unwrap())
        .collect();
    for c in &mut children {
        c.wait_for("READY", Duration::from_secs(60)).unwrap();
    }
    let started = Instant::now();
    for c in &mut children {
        c.say("GO").unwrap();
    }
    // outcome[key][process] = (applied, tx)
    let mut outcome: BTreeMap<u64, Vec<(bool, String)>> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut applied = [0usize; 2];
    for (p, c) in children.iter_mut().enumerate() {
        c.wait_for("DONE", Duration::from_secs(180)).unwrap();
        for line in c.seen() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["K", i, what, tx] => {
                    let i: u64 = i.parse().unwrap();
                    let was_applied = *what == "applied";
                    if was_applied {
                        applied[p] += 1;
                    }
                    outcome
                        .entry(i)
                        .or_default()
                        .push((was_applied, (*tx).to_owned()));
                }
                ["ERR", ..] => errors.push(line.clone()),
                _ => {}
            }
        }
    }
    let elapsed = started.elapsed();
    for c in children {
        let status = c.stop(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "a child failed: {status}");
    }
    let keys: Vec<String> = (0..KEYS).map(|i| format!("same:{i}")).collect();
    let accounts: Vec<String> = (0..KEYS).map(|i| format!("a{i}")).collect();
    let applied_per_key = (0..KEYS)
        .filter_map(|i| {
            let o = outcome.get(&i).map(Vec::as_slice).unwrap_or_default();
            let n = o.iter().filter(|(a, _)| *a).count();
            (o.len() != 2 || n != 1).then(|| {
                format!(
                    "key same:{i}: {} outcomes, {n} applied (expected 2 and 1)",
                    o.len()
                )
            })
        })
        .collect();
    TwoProcesses {
        keys: KEYS,
        applied,
        same_tx: outcome
            .values()
            .filter(|o| o.len() == 2 && o[0].1 == o[1].1)
            .count(),
        errors,
        applied_per_key,
        transactions: differences(
            "transactions",
            keys.iter().map(String::as_str),
            &figures::transactions_per_key(&db).unwrap(),
            |_| 1,
        ),
        messages: differences(
            "messages",
            accounts.iter().map(String::as_str),
            &sizes(figures::message_ids_by_transfer(&db, "balances").unwrap()),
            |_| 1,
        ),
        elapsed,
    }
}

fn print_two_processes(name: &str, s: &TwoProcesses) {
    println!(
        "FIGURE {name}: keys={} runs={} applied_by_a={} applied_by_b={} both_report_one_tx={} \
         errors={} keys_not_applied_exactly_once={} keys_with_other_than_one_transaction={} \
         accounts_with_other_than_one_message={} elapsed_ms={}",
        s.keys,
        s.keys * 2,
        s.applied[0],
        s.applied[1],
        s.same_tx,
        s.errors.len(),
        s.applied_per_key.len(),
        s.transactions.len(),
        s.messages.len(),
        s.elapsed.as_millis()
    );
}

#[test]
fn same_keys_from_two_processes() {
    let s = two_processes("same-key-processes", None);
    print_two_processes("same_keys_two_processes", &s);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(s.applied_per_key.is_empty(), "{:?}", s.applied_per_key);
    assert!(s.transactions.is_empty(), "{:?}", s.transactions);
    assert!(s.messages.is_empty(), "{:?}", s.messages);
    assert_eq!(s.same_tx as u64, s.keys, "both processes report the one tx");
}

#[test]
fn mutant_skip_duplicate_check_fails_same_keys_from_two_processes() {
    let s = two_processes(
        "same-key-processes-mutant",
        Some(Mutant::SkipDuplicateCheck),
    );
    print_two_processes("same_keys_two_processes_mutant", &s);
    assert_eq!(
        s.applied_per_key.len() as u64,
        s.keys,
        "both applied every key"
    );
    assert_eq!(s.transactions.len() as u64, s.keys);
    assert_eq!(s.messages.len() as u64, s.keys);
}

// ---------------------------------------------------------------------------------------------
// Crash at every boundary: a real child process, SIGKILL, restart.

const INPUTS_N: u64 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// A stable name (`child`): the restarted process reclaims the dead one's leases at once.
    Fixed,
    /// The default, unique per process: the restarted process waits for them to expire.
    Default,
}

struct Crash {
    point: FaultPoint,
    separate: bool,
    owner: Owner,
    mutant: Option<Mutant>,
    /// All five inputs in one group commit (killed in its middle, or between it and the
    /// acknowledgements); otherwise one input at a time.
    batch: bool,
}

/// What was counted when the child was killed, and at the end.
#[derive(Debug, Default)]
struct Counted {
    transactions: BTreeMap<String, usize>,
    handler: BTreeMap<String, usize>,
    publishes: BTreeMap<String, usize>,
    http: HttpAttempts,
}

impl Counted {
    async fn now(db: &std::path::Path, events: &std::path::Path, server: &MockServer) -> Counted {
        let e = Events::read_dir(events).unwrap_or_default();
        Counted {
            transactions: figures::transactions_per_key(db).unwrap(),
            handler: e.counts(HANDLER),
            publishes: e.counts(PUBLISH),
            http: HttpAttempts::of(&server.received_requests().await.unwrap()),
        }
    }
}

struct CrashFigures {
    fault: String,
    at_crash: Counted,
    after: Counted,
    resumed: Option<Duration>,
    restart: Duration,
    done: String,
    diffs: BTreeMap<&'static str, Vec<String>>,
}

impl CrashFigures {
    fn failed(&self) -> Vec<&str> {
        self.diffs
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Five inputs (`in-0` .. `in-4`, one at a time); per input one datom (two attributes), one
/// HTTP request, one `transfer-booked` message and, from the after-requests hook, one receipt.
/// The child is killed the first time it reaches `point` (while processing `in-0`), then
/// started again without the fault and waited for until every input is acknowledged and
/// nothing is pending.
async fn crash_and_restart(name: &str, c: Crash) -> CrashFigures {
    let dir = PrivateDir::new(name);
    let db = dir.join("store.db");
    let broker = c.separate.then(|| dir.join("broker.db"));
    let out_db = broker.clone().unwrap_or_else(|| db.clone());
    let events = dir.join("events");
    let server = http_server().await;
    {
        let store = SqliteStore::open(&db).unwrap();
        let log = match &broker {
            Some(b) => SqliteStore::open(b).unwrap().log(),
            None => store.log(),
        };
        book::seed(&log, 0..INPUTS_N, true).await.unwrap();
    }
    let args = |fault: Option<FaultPoint>| {
        let mut a = WorkerArgs::new(db.clone());
        a.broker = broker.clone();
        a.http = Some(server.uri());
        a.events = Some(events.clone());
        a.owner = (c.owner == Owner::Fixed).then(|| "child".to_owned());
        a.mutant = c.mutant;
        a.fault = fault;
        if c.batch {
            // The five inputs decided one after the other, committed together.
            a.group_commit = Some(Duration::from_millis(500));
        } else {
            // One input at a time, from fetch to its effects out: what is at each boundary is
            // exactly one run.
            a.max_in_flight = 1;
            a.after_effects = true;
        }
        a.to_args()
    };
    let program = PathBuf::from(CRASH_CHILD);

    let mut first = ChildProcess::spawn("the first child", &program, &args(Some(c.point))).unwrap();
    let fault = first
        .wait_for("FAULT", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        first.kill_9().unwrap(),
        "the child was still at the fault point when killed"
    );
    let at_crash = Counted::now(&db, &events, &server).await;

    let restarted = Instant::now();
    let mut second = ChildProcess::spawn("the restarted child", &program, &args(None)).unwrap();
    // How long the interrupted run's rows wait after the restart: at once when the restarted
    // process reclaims the dead one's leases (same owner name), or until they expire.
    let key0 = run_key(0);
    let mut resumed = None;
    if c.point != FaultPoint::BeforeCommit {
        // Bounded: 60 s of polls 10 ms apart.
        while restarted.elapsed() < Duration::from_secs(60) {
            if figures::pending_rows_of_run(&db, &key0).unwrap() == 0 {
                resumed = Some(restarted.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let done = second
        .wait_for("DONE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let restart = restarted.elapsed();
    let status = second.wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "the restarted child exited with {status}");
    let after = Counted::now(&db, &events, &server).await;

    // What is expected, id by id.
    let keys: Vec<String> = (0..INPUTS_N).map(run_key).collect();
    let ids: Vec<String> = (0..INPUTS_N).map(transfer_id).collect();
    let committed_at_crash = c.point != FaultPoint::BeforeCommit;
    let http_at_crash = matches!(
        c.point,
        FaultPoint::AfterHttpBeforeRecord | FaultPoint::AfterPublishBeforeMark
    );
    let published_at_crash: Vec<String> = at_crash.publishes.keys().cloned().collect();
    let mut diffs = BTreeMap::new();
    diffs.insert(
        "transactions when killed",
        differences(
            "transactions",
            keys.iter().map(String::as_str),
            &at_crash.transactions,
            |k| usize::from(committed_at_crash && (c.batch || k == key0)),
        ),
    );
    diffs.insert(
        "handler calls when killed",
        differences(
            "handler calls",
            ids.iter().map(String::as_str),
            &at_crash.handler,
            |id| usize::from(c.batch || id == "t0"),
        ),
    );
    diffs.insert(
        "HTTP attempts when killed",
        http_differences(&at_crash.http, 0..INPUTS_N, |i| {
            usize::from(http_at_crash && i == 0)
        })
        .0,
    );
    // A run's messages of distinct partitions are published together (one wave), then marked:
    // killed between the publish and the mark, both of the first run's messages (a booking and
    // a receipt, two topics) are out and unmarked, and go out again after the restart.
    let expected_published = if c.point == FaultPoint::AfterPublishBeforeMark {
        2
    } else {
        0
    };
    let republished: BTreeSet<String> = published_at_crash.iter().cloned().collect();
    diffs.insert(
        "publish attempts when killed",
        if published_at_crash.len() == expected_published
            && published_at_crash
                .iter()
                .all(|id| id.starts_with(&format!("{key0}#")))
        {
            Vec::new()
        } else {
            vec![format!(
                "published when killed: {published_at_crash:?}, expected {expected_published} \
                 messages of {key0}"
            )]
        },
    );
    diffs.insert(
        "transactions per key",
        differences(
            "transactions",
            keys.iter().map(String::as_str),
            &after.transactions,
            |_| 1,
        ),
    );
    diffs.insert(
        "handler calls per input",
        differences(
            "handler calls",
            ids.iter().map(String::as_str),
            &after.handler,
            |id| {
                if c.point == FaultPoint::BeforeCommit && (c.batch || id == "t0") {
                    2
                } else {
                    1
                }
            },
        ),
    );
    let (http_counted, http_keys) = http_differences(&after.http, 0..INPUTS_N, |i| {
        if c.point == FaultPoint::AfterHttpBeforeRecord && i == 0 {
            2
        } else {
            1
        }
    });
    diffs.insert("HTTP attempts per request", http_counted);
    diffs.insert("idempotency keys per request", http_keys);
    let booked = sizes(figures::message_ids_by_transfer(&out_db, BOOKED).unwrap());
    let receipts = sizes(figures::message_ids_by_transfer(&out_db, RECEIPTS).unwrap());
    diffs.insert(
        "messages per input",
        differences(BOOKED, ids.iter().map(String::as_str), &booked, |_| 1),
    );
    diffs.insert(
        "receipts per input",
        differences(RECEIPTS, ids.iter().map(String::as_str), &receipts, |_| 1),
    );
    // Inline, messages are written by the commit and never reach `publish`; through a separate
    // file each is published once, and the one published when the child died twice.
    let logged: BTreeSet<String> = figures::message_ids_by_transfer(&out_db, BOOKED)
        .unwrap()
        .into_values()
        .chain(
            figures::message_ids_by_transfer(&out_db, RECEIPTS)
                .unwrap()
                .into_values(),
        )
        .flatten()
        .collect();
    diffs.insert(
        "publish attempts per message",
        if c.separate {
            differences(
                "publish attempts",
                logged.iter().map(String::as_str),
                &after.publishes,
                |id| if republished.contains(id) { 2 } else { 1 },
            )
        } else {
            differences(
                "publish attempts",
                std::iter::empty(),
                &after.publishes,
                |_| 0,
            )
        },
    );
    // Per input (run key, whatever message ids a run gave its messages): two messages each,
    // and again those published when the child died.
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for (id, n) in &after.publishes {
        let key = id.split('#').next().unwrap_or(id);
        let key = key.split('~').next().unwrap_or(key);
        *per_key.entry(key.to_owned()).or_default() += n;
    }
    diffs.insert(
        "publish attempts per input",
        differences(
            "publish attempts",
            keys.iter().map(String::as_str),
            &per_key,
            |k| {
                let again = republished
                    .iter()
                    .filter(|id| id.starts_with(&format!("{k}#")))
                    .count();
                if c.separate { 2 + again } else { 0 }
            },
        ),
    );
    let unacked = figures::unacknowledged(&out_db, HANDLER_NAME, INPUTS).unwrap();
    let (pending, dead) = figures::outbox_left(&db).unwrap();
    diffs.insert(
        "left over",
        [
            ("inputs unacknowledged", unacked),
            ("outbox rows pending", pending),
            ("outbox rows dead-lettered", dead),
        ]
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .map(|(what, v)| format!("{what}: {v}"))
        .collect(),
    );
    CrashFigures {
        fault,
        at_crash,
        after,
        resumed,
        restart,
        done,
        diffs,
    }
}

async fn crash_case(point: FaultPoint, separate: bool, owner: Owner) {
    crash_case_of(point, separate, owner, false).await;
}

async fn crash_case_of(point: FaultPoint, separate: bool, owner: Owner, batch: bool) {
    let transport = if separate { "separate" } else { "inline" };
    let owner_name = match owner {
        Owner::Fixed => "fixed-owner",
        Owner::Default => "default-owner",
    };
    let batch_name = if batch { "-batch" } else { "" };
    let name = format!(
        "crash-{}-{transport}-{owner_name}{batch_name}",
        fault_name(point)
    );
    let f = crash_and_restart(
        &name,
        Crash {
            point,
            separate,
            owner,
            mutant: None,
            batch,
        },
    )
    .await;
    let total = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
    println!(
        "FIGURE crash point={} transport={transport} owner={owner_name} batch={batch} fault=`{}` \
         when_killed: transactions={} handler_calls={} http_attempts={} publish_attempts={} \
         after_restart: transactions={} handler_calls={} http_attempts={} publish_attempts={} \
         restart_to_interrupted_run_dispatched_ms={} restart_to_done_ms={} restarted=`{}` \
         failed_checks={:?}",
        fault_name(point),
        f.fault,
        total(&f.at_crash.transactions),
        total(&f.at_crash.handler),
        f.at_crash.http.total(),
        total(&f.at_crash.publishes),
        total(&f.after.transactions),
        total(&f.after.handler),
        f.after.http.total(),
        total(&f.after.publishes),
        f.resumed
            .map_or_else(|| "-".to_owned(), |d| d.as_millis().to_string()),
        f.restart.as_millis(),
        f.done,
        f.failed()
    );
    assert!(f.failed().is_empty(), "{:#?}", f.diffs);
}

/// Killed in the middle of a group commit of all five inputs: nothing of it was written; after
/// the restart each input is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_a_group_commit_inline() {
    crash_case_of(FaultPoint::BeforeCommit, false, Owner::Default, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_a_group_commit_separate_broker() {
    crash_case_of(FaultPoint::BeforeCommit, true, Owner::Default, true).await;
}

/// Killed between a group commit of all five inputs and their acknowledgements (ack at
/// commit): the redelivered inputs are duplicates, and the runs' requests and messages go out
/// once, from the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_group_commit_and_acknowledgement_inline() {
    crash_case_of(FaultPoint::AfterCommit, false, Owner::Default, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_group_commit_and_acknowledgement_separate_broker() {
    crash_case_of(FaultPoint::AfterCommit, true, Owner::Default, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit_inline() {
    crash_case(FaultPoint::BeforeCommit, false, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_inline() {
    crash_case(FaultPoint::AfterCommit, false, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_http_before_record_inline() {
    crash_case(FaultPoint::AfterHttpBeforeRecord, false, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit_separate_broker() {
    crash_case(FaultPoint::BeforeCommit, true, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_separate_broker() {
    crash_case(FaultPoint::AfterCommit, true, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_http_before_record_separate_broker() {
    crash_case(FaultPoint::AfterHttpBeforeRecord, true, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_publish_before_mark_separate_broker() {
    crash_case(FaultPoint::AfterPublishBeforeMark, true, Owner::Fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit_inline_default_owner() {
    crash_case(FaultPoint::BeforeCommit, false, Owner::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_inline_default_owner() {
    crash_case(FaultPoint::AfterCommit, false, Owner::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_http_before_record_inline_default_owner() {
    crash_case(FaultPoint::AfterHttpBeforeRecord, false, Owner::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit_separate_broker_default_owner() {
    crash_case(FaultPoint::BeforeCommit, true, Owner::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_separate_broker_default_owner() {
    crash_case(FaultPoint::AfterCommit, true, Owner::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_http_before_record_separate_broker_default_owner() {
    crash_case(FaultPoint::AfterHttpBeforeRecord, true, Owner::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_publish_before_mark_separate_broker_default_owner() {
    crash_case(FaultPoint::AfterPublishBeforeMark, true, Owner::Default).await;
}

/// Without the duplicate check the restarted child applies the redelivered input again: every
/// figure counted at the source shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_skip_duplicate_check_fails_the_crash_checks() {
    let f = crash_and_restart(
        "crash-mutant-duplicate",
        Crash {
            point: FaultPoint::AfterCommit,
            separate: true,
            owner: Owner::Fixed,
            mutant: Some(Mutant::SkipDuplicateCheck),
            batch: false,
        },
    )
    .await;
    println!(
        "FIGURE crash_mutant_skip_duplicate_check failed_checks={:?}",
        f.failed()
    );
    for figure in [
        "transactions per key",
        "handler calls per input",
        "HTTP attempts per request",
        "idempotency keys per request",
        "messages per input",
        "receipts per input",
        "publish attempts per input",
    ] {
        assert!(
            !f.diffs[figure].is_empty(),
            "the mutant must fail `{figure}`: {:#?}",
            f.diffs
        );
    }
}

/// Marking a message dispatched before publishing it loses the message when the process dies
/// in between: the lost-message checks catch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_mark_before_publish_fails_the_lost_message_check() {
    let f = crash_and_restart(
        "crash-mutant-mark",
        Crash {
            point: FaultPoint::AfterPublishBeforeMark,
            separate: true,
            owner: Owner::Fixed,
            mutant: Some(Mutant::MarkBeforePublish),
            batch: false,
        },
    )
    .await;
    println!(
        "FIGURE crash_mutant_mark_before_publish failed_checks={:?} diffs={:?}",
        f.failed(),
        f.diffs
    );
    let lost: Vec<&String> = ["messages per input", "receipts per input"]
        .iter()
        .flat_map(|k| &f.diffs[k])
        .filter(|d| d.contains("counted 0"))
        .collect();
    assert_eq!(lost.len(), 1, "one message lost: {:#?}", f.diffs);
}

// ---------------------------------------------------------------------------------------------
// Key reuse and bad input.

struct Reuse {
    refused: usize,
    transactions: Vec<String>,
    wrong: i64,
}

async fn key_reuse(name: &str, mutant: Option<Mutant>) -> Reuse {
    const KEYS: usize = 100;
    let dir = PrivateDir::new(name);
    let db = dir.join("store.db");
    let store = SqliteStore::open_with(&db, &normal()).unwrap();
    let mut builder = Executor::builder(store.clone(), store.log());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = builder.build();
    let pay = |i: usize, amount: i64| {
        Effects::from(DatomEffect::assert(
            LookupRef::new("payment/id", format!("p{i}")),
            [("payment/amount", json!(amount))],
        ))
        .merge(MessageEffect::new(
            "payments",
            json!({"i": i, "amount": amount}),
        ))
    };
    for i in 0..KEYS {
        executor.run(format!("pay:{i}"), pay(i, 10)).await.unwrap();
    }
    let mut refused = 0;
    for i in 0..KEYS {
        if let Err(RunError::KeyReuse { .. }) = executor.run(format!("pay:{i}"), pay(i, 999)).await
        {
            refused += 1;
        }
    }
    let keys: Vec<String> = (0..KEYS).map(|i| format!("pay:{i}")).collect();
    Reuse {
        refused,
        transactions: differences(
            "transactions",
            keys.iter().map(String::as_str),
            &figures::transactions_per_key(&db).unwrap(),
            |_| 1,
        ),
        wrong: sql_i64(
            &db,
            "SELECT COUNT(*) FROM entity_attributes WHERE attribute = 'payment/amount' AND value = '999'",
        ),
    }
}

#[tokio::test]
async fn key_reuse_is_refused() {
    let r = key_reuse("key-reuse", None).await;
    println!(
        "FIGURE key_reuse: keys=100 reuses=100 refused={} keys_with_other_than_one_transaction={} \
         wrong_amounts={}",
        r.refused,
        r.transactions.len(),
        r.wrong
    );
    assert_eq!(r.refused, 100);
    assert!(r.transactions.is_empty(), "{:?}", r.transactions);
    assert_eq!(r.wrong, 0);
}

#[tokio::test]
async fn mutant_skip_duplicate_check_fails_key_reuse() {
    let r = key_reuse("key-reuse-mutant", Some(Mutant::SkipDuplicateCheck)).await;
    println!(
        "FIGURE key_reuse_mutant: refused={} keys_with_other_than_one_transaction={} wrong_amounts={}",
        r.refused,
        r.transactions.len(),
        r.wrong
    );
    assert_eq!(r.refused, 0);
    assert_eq!(r.transactions.len(), 100);
    assert_eq!(r.wrong, 100);
}

#[tokio::test]
async fn bad_input_is_refused_before_any_write() {
    let dir = PrivateDir::new("bad-input");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let log = store.log();
    let limits = Limits {
        max_payload_bytes: 1024,
        ..Limits::default()
    };
    let executor = Arc::new(
        Executor::builder(store.clone(), log.clone())
            .limits(limits)
            .build(),
    );
    let card = LookupRef::new("card/id", "c1");
    let many: Effects = (0..1_001)
        .map(|i| MessageEffect::new("t", json!(i)))
        .collect();
    let cases: Vec<(&str, String, Effects, RunOptions)> = vec![
        (
            "empty key",
            String::new(),
            Effects::new(),
            RunOptions::default(),
        ),
        (
            "key too long",
            "k".repeat(513),
            Effects::new(),
            RunOptions::default(),
        ),
        (
            "control char in key",
            "a\u{0}b".into(),
            Effects::new(),
            RunOptions::default(),
        ),
        (
            "oversized payload",
            "k1".into(),
            Effects::from(MessageEffect::new("t", json!("x".repeat(2_000)))),
            RunOptions::default(),
        ),
        (
            "oversized datom value",
            "k2".into(),
            Effects::from(DatomEffect::assert(
                card.clone(),
                [("card/note", json!("x".repeat(2_000)))],
            )),
            RunOptions::default(),
        ),
        (
            "too many messages",
            "k3".into(),
            many,
            RunOptions::default(),
        ),
        (
            "conflicting datoms",
            "k4".into(),
            Effects::from(DatomEffect::assert(
                card.clone(),
                [("card/status", json!("a"))],
            ))
            .merge(DatomEffect::retract(
                card.clone(),
                [("card/status", json!("a"))],
            )),
            RunOptions::default(),
        ),
        (
            "empty topic",
            "k5".into(),
            Effects::from(MessageEffect::new("", json!(1))),
            RunOptions::default(),
        ),
        (
            "unknown after-requests hook",
            "k6".into(),
            Effects::new(),
            RunOptions::after_requests("nope"),
        ),
    ];
    let total = cases.len();
    let mut refused = 0;
    for (what, key, effects, options) in cases {
        match executor.run_with(key, effects, options).await {
            Err(e @ RunError::Invalid { .. }) => {
                refused += 1;
                println!("  {what}: {e}");
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
    // Undecodable payloads through the worker: dead-lettered with the reason, acknowledged.
    let worker = Worker::new(Arc::clone(&executor), BlockHandler::default());
    let payloads: [&[u8]; 4] = [b"", b"\x00\x01", br#"{"id": "c1"}"#, br#"[1, 2, 3]"#];
    for (i, p) in payloads.iter().enumerate() {
        log.publish(OutgoingMessage {
            id: format!("bad-{i}"),
            topic: "cards-to-block".into(),
            partition_key: None,
            headers: BTreeMap::new(),
            payload: p.to_vec(),
        })
        .await
        .unwrap();
    }
    let fetched = log
        .fetch(FetchRequest {
            consumer: "block".into(),
            topic: "cards-to-block".into(),
            max: 10,
            visibility: Duration::from_secs(60),
            wait: Duration::ZERO,
        })
        .await
        .unwrap();
    let mut dead = 0;
    for d in fetched {
        if let Processed::DeadLettered { reason } = worker.process(d).await {
            println!("  undecodable: {reason}");
            dead += 1;
        }
    }
    let handler_calls = worker
        .handler()
        .calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let written: i64 = [
        "transactions",
        "effect_runs",
        "entities",
        "datoms",
        "outbox",
    ]
    .iter()
    .map(|t| sql_i64(&db, &format!("SELECT COUNT(*) FROM {t}")))
    .sum();
    let unacked = log.unacknowledged("block", "cards-to-block").await.unwrap();
    println!(
        "FIGURE bad_input: executor_cases={total} refused={refused} undecodable={} \
         dead_lettered_and_acked={dead} handler_calls={handler_calls} unacked={unacked} \
         rows_written={written}",
        payloads.len()
    );
    assert_eq!(refused, total);
    assert_eq!(dead, payloads.len());
    assert_eq!(
        handler_calls, 0,
        "no undecodable payload reached the handler"
    );
    assert_eq!(unacked, 0);
    assert_eq!(written, 0);
}
