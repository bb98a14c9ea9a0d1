//! The executor against a hand-written rusqlite transaction doing the same writes, in one
//! process, on the same disk, in alternating rounds:
//!
//! - **hand-written**: one `BEGIN IMMEDIATE` transaction per run that claims the key
//!   (`INSERT .. ON CONFLICT DO NOTHING`), allocates a `tx`, upserts the entity, its attribute and
//!   a history row, writes the outbox row and appends the message to the log — the writes the
//!   executor makes for one datom and one message on the embedded default — with cached
//!   statements and no checks.
//! - **executor**: `Executor::run(key, effects)` with 1 datom + 1 message per run (validation,
//!   canonical JSON, SHA-256 of the effects, the blocking-pool hop, the same writes plus the
//!   reads its checks need).
//! - **executor batched**: `Executor::run_batch` with `BATCH` runs per transaction.
//!
//! Run: `cargo bench -p effects-core --bench executor` (add `-- quick` for a smoke run).
//! It prints runs/s per mode and synchronous setting, the executor / hand-written ratio (target
//! ≥ 0.8) and the batching speedup.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use effects_core::executor::{BatchItem, Executor};
use effects_core::store::{SqliteOptions, SqliteStore, Synchronous};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use rusqlite::{Connection, TransactionBehavior, params};
use serde_json::json;

const BATCH: usize = 100;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("effects-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir.join("bench.db")
}

fn effects(i: usize) -> Effects {
    let id = format!("c{i}");
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id.clone()),
        [("card/balance", json!(i))],
    ))
    .merge(MessageEffect::new("card-balance", json!({"card_id": id, "balance": i})).with_key(id))
}

/// Creates the schema through the store (same tables and indexes), then closes it.
fn prepared_db(name: &str, sync: Synchronous) -> (PathBuf, SqliteOptions) {
    let path = scratch(name);
    let options = SqliteOptions {
        synchronous: sync,
        ..SqliteOptions::default()
    };
    drop(SqliteStore::open_with(&path, &options).expect("open the store"));
    (path, options)
}

/// A raw connection configured like the store's writer.
fn raw_connection(path: &Path, sync: Synchronous) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        },
    )
    .expect("synchronous");
    conn.pragma_update(None, "foreign_keys", "ON").expect("fk");
    conn.set_prepared_statement_cache_capacity(64);
    conn
}

/// Runs `from..to` by hand, one transaction each.
fn hand_written(conn: &mut Connection, from: usize, to: usize) -> Duration {
    let started = Instant::now();
    for i in from..to {
        let key = format!("hand:{i}");
        let id = format!("c{i}");
        let identity_value = serde_json::to_string(&json!(id)).expect("json");
        let value = serde_json::to_string(&json!(i)).expect("json");
        let payload = serde_json::to_string(&json!({"balance": i, "card_id": id})).expect("json");
        let now = 1_700_000_000_000_i64 + i as i64;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        tx.prepare_cached("INSERT INTO transactions (run_key, committed_at_ms) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![key, now]))
            .expect("tx");
        let txid = tx.last_insert_rowid();
        let claimed = tx
            .prepare_cached(
                "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, \
                 created_at_ms, updated_at_ms, completed_at_ms) VALUES (?1, 'x', ?2, 'done', 1, ?3, ?3, ?3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, txid, now]))
            .expect("claim");
        assert_eq!(claimed, 1);
        let entity: i64 = tx
            .prepare_cached(
                "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
                 VALUES ('card/id', ?1, ?2, ?2) ON CONFLICT (identity, identity_value) \
                 DO UPDATE SET updated_tx = excluded.updated_tx RETURNING id",
            )
            .and_then(|mut s| s.query_row(params![identity_value, txid], |r| r.get(0)))
            .expect("entity");
        tx.prepare_cached(
            "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
             VALUES (?1, 'card/balance', ?2, ?3) ON CONFLICT (entity_id, attribute) \
             DO UPDATE SET value = excluded.value, tx = excluded.tx",
        )
        .and_then(|mut s| s.execute(params![entity, value, txid]))
        .expect("attribute");
        tx.prepare_cached(
            "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
             VALUES (?1, ?2, 'card/balance', ?3, 1)",
        )
        .and_then(|mut s| s.execute(params![txid, entity, value]))
        .expect("datom");
        let message_id = format!("{key}#0");
        tx.prepare_cached(
            "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
             payload, tx, next_attempt_at_ms, created_at_ms, dispatched_at_ms) \
             VALUES (?1, ?2, 0, 'message', 'card-balance', ?3, '{}', ?4, ?5, ?6, ?6, ?6)",
        )
        .and_then(|mut s| s.execute(params![message_id, key, id, payload, txid, now]))
        .expect("outbox");
        let headers = format!(r#"{{"effects-key":"{key}","effects-tx":"{txid}"}}"#);
        tx.prepare_cached(
            "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
             published_at_ms) VALUES ('card-balance', ?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (topic, message_id) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![message_id, id, headers, payload.as_bytes(), now]))
        .expect("log");
        tx.commit().expect("commit");
    }
    started.elapsed()
}

type Exec = Executor<SqliteStore, effects_core::transport::SqliteLog>;

/// Runs `from..to` through the executor, one run (`batch = None`) or `batch` runs per commit.
fn executor_runs(
    runtime: &tokio::runtime::Runtime,
    executor: &Exec,
    from: usize,
    to: usize,
    batch: Option<usize>,
) -> Duration {
    runtime.block_on(async {
        let started = Instant::now();
        match batch {
            None => {
                for i in from..to {
                    let outcome = executor
                        .run(format!("exec:{i}"), effects(i))
                        .await
                        .expect("run");
                    assert!(!outcome.is_duplicate());
                }
            }
            Some(size) => {
                for chunk in (from..to).collect::<Vec<_>>().chunks(size) {
                    let items = chunk
                        .iter()
                        .map(|&i| BatchItem::new(format!("batch:{i}"), effects(i)))
                        .collect();
                    let results = executor.run_batch(items).await.expect("batch");
                    assert!(
                        results
                            .iter()
                            .all(|r| matches!(r, Ok(o) if !o.is_duplicate()))
                    );
                }
            }
        }
        started.elapsed()
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// `--only MODE`: one mode alone, 2 000 runs with `synchronous = NORMAL`, for instruction counts
/// (`valgrind --tool=callgrind`); `baseline` is the set-up alone, to subtract.
fn only(mode: &str) {
    const RUNS: usize = 2_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let (path, options) = prepared_db(&format!("only-{mode}"), Synchronous::Normal);
    let store = SqliteStore::open_with(&path, &options).expect("open");
    let executor = Executor::builder(store.clone(), store.log()).build();
    let mut conn = raw_connection(&path, Synchronous::Normal);
    match mode {
        "baseline" => {}
        "hand" => drop(hand_written(&mut conn, 0, RUNS)),
        "exec" => drop(executor_runs(&runtime, &executor, 0, RUNS, None)),
        "batch" => drop(executor_runs(&runtime, &executor, 0, RUNS, Some(BATCH))),
        other => panic!("unknown mode `{other}`: baseline, hand, exec or batch"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--only") {
        only(args.get(i + 1).map_or("", String::as_str));
        cleanup();
        return;
    }
    let quick = args.iter().any(|a| a == "quick");
    let rounds = if quick { 2 } else { 10 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    println!(
        "executor vs hand-written rusqlite, 1 datom + 1 message per run; {rounds} rounds, each \
         running one block per mode in turn (so all modes share the machine's noise)"
    );
    println!(
        "| synchronous | runs per mode | hand-written runs/s | executor runs/s | ratio (total) | ratio (median of rounds) | batched ({BATCH}/tx) runs/s | batch speedup |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (sync, block) in [
        (Synchronous::Full, if quick { 100 } else { 200 }),
        (Synchronous::Normal, if quick { 500 } else { 2_000 }),
    ] {
        let (hand_path, _) = prepared_db(&format!("{sync:?}-hand"), sync);
        let mut hand_conn = raw_connection(&hand_path, sync);
        let (exec_path, options) = prepared_db(&format!("{sync:?}-exec"), sync);
        let exec_store = SqliteStore::open_with(&exec_path, &options).expect("open");
        let exec = Executor::builder(exec_store.clone(), exec_store.log()).build();
        assert!(exec.publishes_inline());
        let (batch_path, options) = prepared_db(&format!("{sync:?}-batch"), sync);
        let batch_store = SqliteStore::open_with(&batch_path, &options).expect("open");
        let batch = Executor::builder(batch_store.clone(), batch_store.log()).build();

        let (mut hand_t, mut exec_t, mut batch_t) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let (from, to) = (round * block, (round + 1) * block);
            let h = hand_written(&mut hand_conn, from, to);
            let e = executor_runs(&runtime, &exec, from, to, None);
            let b = executor_runs(&runtime, &batch, from, to, Some(BATCH));
            ratios.push(h.as_secs_f64() / e.as_secs_f64());
            hand_t += h;
            exec_t += e;
            batch_t += b;
        }
        let runs = (rounds * block) as f64;
        let (h, e, b) = (
            runs / hand_t.as_secs_f64(),
            runs / exec_t.as_secs_f64(),
            runs / batch_t.as_secs_f64(),
        );
        println!(
            "| {sync:?} | {} | {h:.0} | {e:.0} | {:.2}x | {:.2}x | {b:.0} | {:.1}x |",
            rounds * block,
            e / h,
            median(ratios),
            b / e
        );
    }
    cleanup();
}

/// Removes the scratch databases of this process.
fn cleanup() {
    let prefix = format!("effects-bench-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
