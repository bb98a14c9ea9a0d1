//! Reliability figures (see RELIABILITY.md): duplicate storms, one key from two tasks, a real
//! child process killed with SIGKILL at every boundary and restarted, key reuse, bad input.
//!
//! Every test is bounded (timeouts on every wait, fixed sizes) and prints a `FIGURE` line; run
//! with `-- --nocapture --test-threads 1` to read them in order.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use effects_core::executor::{Executor, Limits, RunError, RunOptions};
use effects_core::store::{SqliteOptions, SqliteStore, Synchronous};
use effects_core::transport::{FetchRequest, OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{Processed, Worker};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use serde_json::json;
use support::{BlockHandler, sql_i64, temp_dir};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const CHILD: &str = env!("CARGO_BIN_EXE_effects-crash-child");

// ---------------------------------------------------------------------------------------------
// Duplicate storm.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm() {
    const N: usize = 2_000;
    let dir = temp_dir("storm");
    let db = dir.join("store.db");
    // Durability is not what this test measures; NORMAL keeps 2 000 commits quick on CI disks.
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&db, &options).unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    let worker = Arc::new(Worker::new(Arc::clone(&executor), BlockHandler::default()));
    let started = Instant::now();

    for i in 0..N {
        let card = json!({"id": format!("c{i}"), "customer_id": "u1", "status": "active"});
        log.publish(OutgoingMessage {
            id: format!("in-{i}"),
            topic: "cards-to-block".into(),
            partition_key: None,
            headers: BTreeMap::new(),
            payload: card.to_string().into_bytes(),
        })
        .await
        .unwrap();
    }
    let mut deliveries = Vec::with_capacity(N);
    // Bounded: N messages, at most N fetches.
    for _ in 0..N {
        if deliveries.len() == N {
            break;
        }
        let batch = log
            .fetch(FetchRequest {
                consumer: "block".into(),
                topic: "cards-to-block".into(),
                max: 500,
                visibility: Duration::from_secs(600),
                wait: Duration::ZERO,
            })
            .await
            .unwrap();
        assert!(
            !batch.is_empty(),
            "the log returned fewer than {N} messages"
        );
        deliveries.extend(batch);
    }

    // 20% are delivered twice: half of them concurrently with the first delivery (two tasks at
    // once), half again after the first was processed (a lost acknowledgement).
    let concurrent = |i: usize| i % 10 == 0;
    let later = |i: usize| i % 10 == 5;
    let permits = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, d) in deliveries.iter().enumerate() {
        let copies = if concurrent(i) { 2 } else { 1 };
        for _ in 0..copies {
            let (worker, d, permits) = (Arc::clone(&worker), d.clone(), Arc::clone(&permits));
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.unwrap();
                worker.process(d).await
            });
        }
    }
    let mut outcomes: Vec<Processed> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.unwrap());
    }
    for (i, d) in deliveries.iter().enumerate() {
        if later(i) {
            outcomes.push(worker.process(d.clone()).await);
        }
    }
    let elapsed = started.elapsed();

    let applied = outcomes
        .iter()
        .filter(|o| matches!(o, Processed::Applied { .. }))
        .count();
    let duplicates = outcomes
        .iter()
        .filter(|o| matches!(o, Processed::Duplicate { .. }))
        .count();
    let redelivered = (0..N).filter(|i| concurrent(*i) || later(*i)).count();
    let txs = sql_i64(&db, "SELECT COUNT(*) FROM transactions");
    let datoms = sql_i64(&db, "SELECT COUNT(*) FROM datoms");
    let published = log.messages("card-status-changed").await.unwrap();
    let unique: HashSet<&str> = published.iter().map(|m| m.message_id.as_str()).collect();
    let dispatched_rows = sql_i64(
        &db,
        "SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NOT NULL",
    );
    let lost = N - unique.len();
    let unacked = log.unacknowledged("block", "cards-to-block").await.unwrap();
    println!(
        "FIGURE duplicate_storm: messages_in={N} redelivered={redelivered} \
         (concurrently={}) deliveries={} datoms_applied={datoms} expected={N} runs_applied={applied} \
         duplicates_absorbed={duplicates} messages_dispatched={} lost={lost} unacked_inputs={unacked} \
         elapsed_ms={}",
        (0..N).filter(|i| concurrent(*i)).count(),
        outcomes.len(),
        unique.len(),
        elapsed.as_millis()
    );
    assert_eq!(redelivered, N / 5);
    assert_eq!(outcomes.len(), N + redelivered);
    assert_eq!(applied, N);
    assert_eq!(duplicates, redelivered);
    assert_eq!(txs, N as i64, "one transaction per message, never two");
    assert_eq!(datoms, N as i64, "datoms applied == expected");
    assert_eq!(unique.len(), N, "every message dispatched");
    assert_eq!(published.len(), N, "and deduplicated by id");
    assert_eq!(dispatched_rows, N as i64);
    assert_eq!(unacked, 0, "every input acknowledged");
}

// ---------------------------------------------------------------------------------------------
// One key, two tasks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_from_two_tasks() {
    const KEYS: usize = 500;
    let dir = temp_dir("same-key-figure");
    let db = dir.join("store.db");
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&db, &options).unwrap();
    let executor = Arc::new(Executor::builder(store.clone(), store.log()).build());
    let effects = |i: usize| {
        Effects::from(DatomEffect::assert(
            LookupRef::new("account/id", format!("a{i}")),
            [("account/balance", json!(i))],
        ))
        .merge(MessageEffect::new("balances", json!({"i": i})))
    };
    let (mut applied, mut duplicates, mut both) = (0, 0, 0);
    for i in 0..KEYS {
        let key = format!("k{i}");
        let a = tokio::spawn({
            let (executor, key, e) = (Arc::clone(&executor), key.clone(), effects(i));
            async move { executor.run(key, e).await }
        });
        let b = tokio::spawn({
            let (executor, e) = (Arc::clone(&executor), effects(i));
            async move { executor.run(key, e).await }
        });
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!(a.tx(), b.tx());
        for o in [a, b] {
            if o.is_duplicate() {
                duplicates += 1;
            } else {
                applied += 1;
            }
        }
        if !a.is_duplicate() && !b.is_duplicate() {
            both += 1;
        }
    }
    let txs = sql_i64(&db, "SELECT COUNT(*) FROM transactions");
    let messages = sql_i64(&db, "SELECT COUNT(*) FROM log_messages");
    println!(
        "FIGURE same_key_two_tasks: keys={KEYS} runs={} applied={applied} duplicates={duplicates} \
         both_applied={both} transactions={txs} messages={messages}",
        KEYS * 2
    );
    assert_eq!(applied, KEYS);
    assert_eq!(duplicates, KEYS);
    assert_eq!(both, 0);
    assert_eq!(txs, KEYS as i64);
    assert_eq!(messages, KEYS as i64);
}

// ---------------------------------------------------------------------------------------------
// Crash at every boundary: a real child process, SIGKILL, restart.

const INPUTS: usize = 5;

struct ChildProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildProcess {
    fn spawn(args: &[String]) -> ChildProcess {
        let mut child = Command::new(CHILD)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the crash child");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProcess {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The first line starting with `prefix`, within `timeout`.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "no `{prefix}` from the child within {timeout:?}; it said {:?}",
                        self.seen
                    );
                }
            }
        }
    }

    fn kill_9(mut self) {
        // `Child::kill` sends SIGKILL on Unix: no destructor, no flush, no rollback.
        self.child.kill().expect("SIGKILL the child");
        let status = self.child.wait().expect("reap the child");
        assert!(!status.success());
    }

    fn wait_success(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                assert!(status.success(), "the child exited with {status}");
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the child did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn child_args(db: &Path, broker: Option<&PathBuf>, http: &str, fault: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--db".to_owned(),
        db.display().to_string(),
        "--http".to_owned(),
        http.to_owned(),
        "--owner".to_owned(),
        "child".to_owned(),
    ];
    if let Some(b) = broker {
        args.extend(["--broker".to_owned(), b.display().to_string()]);
    }
    if let Some(f) = fault {
        args.extend(["--fault".to_owned(), f.to_owned()]);
    }
    args
}

async fn crash_and_restart(point: &str, external: bool) {
    let dir = temp_dir(&format!(
        "crash-{point}-{}",
        if external { "ext" } else { "inline" }
    ));
    let db = dir.join("store.db");
    let broker = external.then(|| dir.join("broker.db"));
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
        .mount(&server)
        .await;

    // Seed the inputs where the child consumes them.
    {
        let store = SqliteStore::open(&db).unwrap();
        let log = match &broker {
            Some(b) => SqliteLog::open(b).unwrap(),
            None => store.log(),
        };
        for i in 0..INPUTS {
            log.publish(OutgoingMessage {
                id: format!("in-{i}"),
                topic: "transfers".into(),
                partition_key: Some(format!("t{i}")),
                headers: BTreeMap::new(),
                payload: json!({"id": format!("t{i}")}).to_string().into_bytes(),
            })
            .await
            .unwrap();
        }
    }

    let started = Instant::now();
    let mut first = ChildProcess::spawn(&child_args(
        &db,
        broker.as_ref(),
        &server.uri(),
        Some(point),
    ));
    let fault = first.wait_for("FAULT", Duration::from_secs(30));
    first.kill_9();
    let txs_at_crash = sql_i64(&db, "SELECT COUNT(*) FROM transactions");
    let requests_at_crash = server.received_requests().await.unwrap().len();

    let mut second = ChildProcess::spawn(&child_args(&db, broker.as_ref(), &server.uri(), None));
    let done = second.wait_for("DONE", Duration::from_secs(60));
    second.wait_success(Duration::from_secs(10));
    let elapsed = started.elapsed();

    // Nothing lost, nothing applied twice.
    let out_db = broker.clone().unwrap_or_else(|| db.clone());
    let txs = sql_i64(&db, "SELECT COUNT(*) FROM transactions");
    let datoms = sql_i64(&db, "SELECT COUNT(*) FROM datoms");
    let runs_done = sql_i64(
        &db,
        "SELECT COUNT(*) FROM effect_runs WHERE status = 'done'",
    );
    let pending = sql_i64(
        &db,
        "SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NULL",
    );
    let booked = sql_i64(
        &out_db,
        "SELECT COUNT(DISTINCT message_id) FROM log_messages WHERE topic = 'transfer-booked'",
    );
    let booked_rows = sql_i64(
        &out_db,
        "SELECT COUNT(*) FROM log_messages WHERE topic = 'transfer-booked'",
    );
    let receipts = sql_i64(
        &out_db,
        "SELECT COUNT(*) FROM log_messages WHERE topic = 'transfer-receipts'",
    );
    let unacked = SqliteLog::open(&out_db)
        .unwrap()
        .unacknowledged("transfer", "transfers")
        .await
        .unwrap();

    // Every HTTP attempt of one request carried the same key.
    let received = server.received_requests().await.unwrap();
    let mut keys_by_path: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for r in &received {
        let key = r
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
            .to_owned();
        keys_by_path
            .entry(r.url.path().to_owned())
            .or_default()
            .insert(key);
    }
    let same_key = keys_by_path.iter().all(|(path, keys)| {
        let i = path.trim_start_matches("/notify/t");
        keys.len() == 1 && keys.contains(&format!("transfer:transfers:in-{i}#0"))
    });
    let retried = received.len() - keys_by_path.len();

    println!(
        "FIGURE crash point={point} transport={} fault=`{fault}` txs_at_crash={txs_at_crash} \
         http_at_crash={requests_at_crash} messages_in={INPUTS} runs_applied={txs} \
         datoms_applied={datoms} expected={} runs_done={runs_done} messages_dispatched={booked} \
         (log rows {booked_rows}) receipts={receipts} pending={pending} unacked_inputs={unacked} \
         http_requests={} http_paths={} http_retries={retried} same_key_on_retry={same_key} \
         restart=`{done}` elapsed_ms={}",
        if external { "separate-file" } else { "inline" },
        INPUTS * 2,
        received.len(),
        keys_by_path.len(),
        elapsed.as_millis()
    );
    match point {
        "before_commit" => assert_eq!(txs_at_crash, 0, "the killed transaction must roll back"),
        _ => assert_eq!(txs_at_crash, 1, "the first run had committed"),
    }
    assert_eq!(txs, INPUTS as i64, "each input applied exactly once");
    assert_eq!(datoms, (INPUTS * 2) as i64, "two attributes per transfer");
    assert_eq!(runs_done, INPUTS as i64);
    assert_eq!(pending, 0);
    assert_eq!(booked, INPUTS as i64, "every message dispatched");
    assert_eq!(booked_rows, INPUTS as i64, "and never twice");
    assert_eq!(receipts, INPUTS as i64, "after-requests ran once per run");
    assert_eq!(unacked, 0, "every input acknowledged");
    assert_eq!(keys_by_path.len(), INPUTS, "every request sent");
    assert!(
        same_key,
        "retries carry the same idempotency key: {keys_by_path:?}"
    );
    if point == "after_http_before_record" {
        assert_eq!(
            retried, 1,
            "the unrecorded request is sent again, with its key"
        );
    } else {
        assert_eq!(retried, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit_inline() {
    crash_and_restart("before_commit", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_inline() {
    crash_and_restart("after_commit", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_http_before_record_inline() {
    crash_and_restart("after_http_before_record", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit_separate_broker() {
    crash_and_restart("before_commit", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit_separate_broker() {
    crash_and_restart("after_commit", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_http_before_record_separate_broker() {
    crash_and_restart("after_http_before_record", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_publish_before_mark_separate_broker() {
    crash_and_restart("after_publish_before_mark", true).await;
}

// ---------------------------------------------------------------------------------------------
// Key reuse and bad input.

#[tokio::test]
async fn key_reuse_is_refused() {
    const KEYS: usize = 100;
    let dir = temp_dir("key-reuse-figure");
    let db = dir.join("store.db");
    let store = SqliteStore::open_with(
        &db,
        &SqliteOptions {
            synchronous: Synchronous::Normal,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();
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
        match executor.run(format!("pay:{i}"), pay(i, 999)).await {
            Err(RunError::KeyReuse { .. }) => refused += 1,
            other => panic!("expected KeyReuse, got {other:?}"),
        }
    }
    let txs = sql_i64(&db, "SELECT COUNT(*) FROM transactions");
    let wrong = sql_i64(
        &db,
        "SELECT COUNT(*) FROM entity_attributes WHERE attribute = 'payment/amount' AND value = '999'",
    );
    let messages = sql_i64(&db, "SELECT COUNT(*) FROM log_messages");
    println!(
        "FIGURE key_reuse: keys={KEYS} reuses={KEYS} refused={refused} applied_by_reuse={} \
         wrong_amounts={wrong} messages={messages}",
        txs - KEYS as i64
    );
    assert_eq!(refused, KEYS);
    assert_eq!(txs, KEYS as i64);
    assert_eq!(wrong, 0);
    assert_eq!(messages, KEYS as i64);
}

#[tokio::test]
async fn bad_input_is_refused_before_any_write() {
    let dir = temp_dir("bad-input-figure");
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
         dead_lettered_and_acked={dead} unacked={unacked} rows_written={written}",
        payloads.len()
    );
    assert_eq!(refused, total);
    assert_eq!(dead, payloads.len());
    assert_eq!(unacked, 0);
    assert_eq!(written, 0);
}
