//! The executor on PostgreSQL + NATS JetStream against hand-written tokio-postgres doing the same
//! writes, in one process, against the same servers, in alternating rounds:
//!
//! - **hand-written**: per run, one transaction that takes a `tx` from the counter row, claims
//!   the key (`INSERT .. ON CONFLICT DO NOTHING`), records the transaction, upserts the entity,
//!   writes the history row and the attribute, and writes the outbox row — the writes the
//!   executor makes for one datom and one message — with prepared statements and no checks; then
//!   the message is published to NATS (waiting for the stream's acknowledgement) and a second
//!   transaction marks the outbox row dispatched and the run done.
//! - **executor**: `Executor::run(key, effects)` with the same 1 datom + 1 message on a
//!   [`PostgresStore`] and a [`NatsTransport`] (validation, canonical JSON, SHA-256, the key
//!   claim, entity locks, read validation, the outbox claim with its lease, publish, mark).
//! - **executor batched**: `Executor::run_batch` with `BATCH` runs per commit, next to the
//!   executor at concurrency 1.
//! - **pgbench**: PostgreSQL's own ceiling for the first transaction's writes (a pgbench script
//!   with the same inserts and updates, prepared statements, no publish), at the same client
//!   counts, so the reader sees how close the executor gets to the database.
//!
//! Each mode runs at 1 and at 8 concurrent runs (8 tasks, each with its own connection for the
//! hand-written mode; the executor's pool holds 8).
//!
//! Run: `cargo bench -p effects-core --features postgres,nats --bench postgres` (add `-- quick`
//! for a smoke run). Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust; or
//! `EFFECTS_POSTGRES_URL`), NATS with JetStream on 127.0.0.1:4222 (or `EFFECTS_NATS_URL`) and
//! `pgbench` (from the PostgreSQL packages; the pgbench rows are skipped, saying so, without it).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use effects_core::executor::{BatchItem, Executor};
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::transport::{OutgoingMessage, Transport};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use serde_json::json;
use tokio_postgres::{Client, NoTls};

const BATCH: usize = 100;
const TOPIC: &str = "card-balance";

fn postgres_url() -> String {
    std::env::var("EFFECTS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn nats_url() -> String {
    std::env::var("EFFECTS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn effects(i: usize) -> Effects {
    let id = format!("c{i}");
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id.clone()),
        [("card/balance", json!(i))],
    ))
    .merge(MessageEffect::new(TOPIC, json!({"card_id": id, "balance": i})).with_key(id))
}

/// A schema of its own, migrated by the store (same tables and indexes for every mode).
async fn store(schema: &str, pool: usize) -> PostgresStore {
    PostgresStore::connect(PostgresOptions {
        pool_size: pool,
        ..PostgresOptions::new(postgres_url()).with_schema(schema)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "this benchmark needs PostgreSQL at {} (user postgres, trust auth): {e}",
            postgres_url()
        )
    })
}

/// A stream of its own, remembered in `streams` to be deleted at the end.
async fn transport(name: &str, streams: &mut Vec<(NatsTransport, String)>) -> NatsTransport {
    let stream = format!("BENCH_{name}_{}", std::process::id());
    let config = NatsConfig::new(nats_url()).with_stream(
        stream.clone(),
        format!("bench{}{}", name.to_ascii_lowercase(), std::process::id()),
    );
    let transport = NatsTransport::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "this benchmark needs NATS with JetStream at {}: {e}; start one with \
             `nats-server -js -p 4222 -sd <dir>`",
            nats_url()
        )
    });
    streams.push((transport.clone(), stream));
    transport
}

async fn raw_client(schema: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(&postgres_url(), NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await
        .expect("search_path");
    client
}

/// The hand-written transactional outbox for runs `ids`, on one connection.
async fn hand_written(client: &mut Client, nats: &NatsTransport, ids: Vec<usize>) {
    let claim = client
        .prepare(
            "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, \
             created_at_ms, updated_at_ms) VALUES ($1, 'x', $2, 'messages_pending', 1, $3, $3) \
             ON CONFLICT (key) DO NOTHING",
        )
        .await
        .expect("prepare");
    let counter = client
        .prepare("UPDATE sequences SET value = value + 1 WHERE name = 'tx' RETURNING value")
        .await
        .expect("prepare");
    let transaction = client
        .prepare("INSERT INTO transactions (tx, run_key, committed_at_ms) VALUES ($1, $2, $3)")
        .await
        .expect("prepare");
    let entity = client
        .prepare(
            "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
             VALUES ('card/id', $1, $2, $2) ON CONFLICT (identity, identity_value) \
             DO UPDATE SET updated_tx = excluded.updated_tx RETURNING id",
        )
        .await
        .expect("prepare");
    let history = client
        .prepare(
            "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
             VALUES ($1, $2, 'card/balance', $3, true)",
        )
        .await
        .expect("prepare");
    let attribute = client
        .prepare(
            "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
             VALUES ($1, 'card/balance', $2, $3) ON CONFLICT (entity_id, attribute) \
             DO UPDATE SET value = excluded.value, tx = excluded.tx",
        )
        .await
        .expect("prepare");
    let outbox = client
        .prepare(
            "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
             payload, tx, ready_seq, next_attempt_at_ms, created_at_ms) \
             VALUES ($1, $2, 0, 'message', $3, $4, '{}', $5, $6, $6, $7, $7)",
        )
        .await
        .expect("prepare");
    let dispatched = client
        .prepare("UPDATE outbox SET dispatched_at_ms = $2 WHERE id = $1")
        .await
        .expect("prepare");
    let done = client
        .prepare(
            "UPDATE effect_runs SET status = 'done', completed_at_ms = $2, updated_at_ms = $2 \
             WHERE key = $1",
        )
        .await
        .expect("prepare");
    for i in ids {
        let key = format!("hand:{i}");
        let id = format!("c{i}");
        let identity_value = serde_json::to_string(&json!(id)).expect("json");
        let value = serde_json::to_string(&json!(i)).expect("json");
        let payload = serde_json::to_string(&json!({"balance": i, "card_id": id})).expect("json");
        let now = 1_700_000_000_000_i64 + i as i64;
        let message_id = format!("{key}#0");
        let tx = client.transaction().await.expect("begin");
        let txid: i64 = tx.query_one(&counter, &[]).await.expect("tx").get(0);
        let claimed = tx
            .execute(&claim, &[&key, &txid, &now])
            .await
            .expect("claim");
        assert_eq!(claimed, 1, "a fresh key");
        tx.execute(&transaction, &[&txid, &key, &now])
            .await
            .expect("transaction");
        let entity_id: i64 = tx
            .query_one(&entity, &[&identity_value, &txid])
            .await
            .expect("entity")
            .get(0);
        tx.execute(&history, &[&txid, &entity_id, &value])
            .await
            .expect("history");
        tx.execute(&attribute, &[&entity_id, &value, &txid])
            .await
            .expect("attribute");
        tx.execute(
            &outbox,
            &[&message_id, &key, &TOPIC, &id, &payload, &txid, &now],
        )
        .await
        .expect("outbox");
        tx.commit().await.expect("commit");
        let mut headers = BTreeMap::new();
        headers.insert("effects-key".to_owned(), key.clone());
        headers.insert("effects-tx".to_owned(), txid.to_string());
        nats.publish(OutgoingMessage {
            id: message_id.clone(),
            topic: TOPIC.to_owned(),
            partition_key: Some(id),
            headers,
            payload: payload.into_bytes(),
        })
        .await
        .expect("publish");
        let tx = client.transaction().await.expect("begin");
        tx.execute(&dispatched, &[&message_id, &now])
            .await
            .expect("mark");
        tx.execute(&done, &[&key, &now]).await.expect("done");
        tx.commit().await.expect("commit");
    }
}

type Exec = Executor<PostgresStore, NatsTransport>;

/// Runs `ids` through the executor, one run per commit or `batch` runs per commit.
async fn executor_runs(executor: &Exec, prefix: &str, ids: Vec<usize>, batch: Option<usize>) {
    match batch {
        None => {
            for i in ids {
                let outcome = executor
                    .run(format!("{prefix}:{i}"), effects(i))
                    .await
                    .expect("run");
                assert!(!outcome.is_duplicate());
                assert_eq!(outcome.progress().pending, 0, "dispatched in the run");
            }
        }
        Some(size) => {
            for chunk in ids.chunks(size) {
                let items = chunk
                    .iter()
                    .map(|&i| BatchItem::new(format!("{prefix}:{i}"), effects(i)))
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
}

/// `from..to` split over `concurrency` lanes, round robin.
fn lanes(from: usize, to: usize, concurrency: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); concurrency];
    for i in from..to {
        out[i % concurrency].push(i);
    }
    out
}

struct Hand {
    clients: Vec<Client>,
    nats: NatsTransport,
}

async fn hand_round(hand: &mut Hand, from: usize, to: usize) -> Duration {
    let started = Instant::now();
    let lanes = lanes(from, to, hand.clients.len());
    let nats = &hand.nats;
    let tasks = hand
        .clients
        .iter_mut()
        .zip(lanes)
        .map(|(client, ids)| hand_written(client, nats, ids));
    futures_join_all(tasks).await;
    started.elapsed()
}

async fn exec_round(
    executor: &Arc<Exec>,
    prefix: &str,
    from: usize,
    to: usize,
    concurrency: usize,
    batch: Option<usize>,
) -> Duration {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for ids in lanes(from, to, concurrency) {
        let executor = Arc::clone(executor);
        let prefix = prefix.to_owned();
        tasks.spawn(async move { executor_runs(&executor, &prefix, ids, batch).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("executor task");
    }
    started.elapsed()
}

/// Polls the futures together on this task (the hand-written lanes borrow their clients).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// pgbench with the first transaction's writes, on `schema`: transactions per second, or why
/// not.
fn pgbench(schema: &str, clients: usize, seconds: u64) -> Result<f64, String> {
    let program = pgbench_program().ok_or("pgbench not found (PostgreSQL's client packages)")?;
    let script = std::env::temp_dir().join(format!("effects-bench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set k random(1, 1000000000000)\n\
         BEGIN;\n\
         UPDATE sequences SET value = value + 1 WHERE name = 'tx' RETURNING value \\gset t_\n\
         INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, created_at_ms, \
         updated_at_ms) VALUES ('pgb:' || :client_id || ':' || :k, 'x', :t_value, \
         'messages_pending', 1, 1, 1) ON CONFLICT (key) DO NOTHING;\n\
         INSERT INTO transactions (tx, run_key, committed_at_ms) VALUES (:t_value, \
         'pgb:' || :client_id || ':' || :k, 1);\n\
         INSERT INTO entities (identity, identity_value, created_tx, updated_tx) VALUES \
         ('card/id', '\"p' || :client_id || ':' || :k || '\"', :t_value, :t_value) \
         ON CONFLICT (identity, identity_value) DO UPDATE SET updated_tx = excluded.updated_tx \
         RETURNING id \\gset e_\n\
         INSERT INTO datoms (tx, entity_id, attribute, value, added) VALUES (:t_value, :e_id, \
         'card/balance', '1', true);\n\
         INSERT INTO entity_attributes (entity_id, attribute, value, tx) VALUES (:e_id, \
         'card/balance', '1', :t_value) ON CONFLICT (entity_id, attribute) DO UPDATE SET \
         value = excluded.value, tx = excluded.tx;\n\
         INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
         payload, tx, ready_seq, next_attempt_at_ms, created_at_ms) VALUES \
         ('pgb:' || :client_id || ':' || :k || '#0', 'pgb:' || :client_id || ':' || :k, 0, \
         'message', 'card-balance', 'p', '{}', '{}', :t_value, :t_value, 1, 1);\n\
         COMMIT;\n",
    )
    .map_err(|e| e.to_string())?;
    let output = Command::new(program)
        .env("PGOPTIONS", format!("-c search_path={schema}"))
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
        .arg(format!("-c{clients}"))
        .arg(format!("-j{clients}"))
        .arg(format!("-T{seconds}"))
        .arg("-f")
        .arg(&script)
        .arg("test")
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| format!("no tps in pgbench's output: {text}"))
}

fn pgbench_program() -> Option<std::path::PathBuf> {
    let on_path = Command::new("pgbench").arg("--version").output();
    if on_path.is_ok_and(|o| o.status.success()) {
        return Some("pgbench".into());
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// `median [min–max]` with `digits` decimals.
fn spread(xs: &[f64], digits: usize) -> String {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => {
            format!("{:.digits$} [{lo:.digits$}–{hi:.digits$}]", v[v.len() / 2])
        }
        _ => "-".to_owned(),
    }
}

async fn drop_schema(schema: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(&postgres_url(), NoTls).await {
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await;
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let rounds = if quick { 2 } else { 6 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(run(rounds, quick));
}

async fn run(rounds: usize, quick: bool) {
    let pid = std::process::id();
    let mut schemas = Vec::new();
    let mut streams = Vec::new();
    println!(
        "executor on PostgreSQL + NATS vs hand-written tokio-postgres, 1 datom + 1 message per \
         run; {rounds} rounds, each running one block per mode in turn"
    );
    println!(
        "| concurrent runs | runs per mode | hand-written runs/s | executor runs/s | ratio (total) | ratio per round, median [min–max] | pgbench (first transaction alone) tx/s | executor / pgbench |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut batched_line = String::new();
    for concurrency in [1_usize, 8] {
        let block = match (quick, concurrency) {
            (true, _) => 50,
            (false, 1) => 300,
            (false, _) => 800,
        };
        let hand_schema = format!("bench_hand_{pid}_{concurrency}");
        let exec_schema = format!("bench_exec_{pid}_{concurrency}");
        let batch_schema = format!("bench_batch_{pid}_{concurrency}");
        schemas.extend([
            hand_schema.clone(),
            exec_schema.clone(),
            batch_schema.clone(),
        ]);
        drop(store(&hand_schema, 1).await);
        let mut clients = Vec::new();
        for _ in 0..concurrency {
            clients.push(raw_client(&hand_schema).await);
        }
        let mut hand = Hand {
            clients,
            nats: transport(&format!("H{concurrency}"), &mut streams).await,
        };
        let exec = Arc::new(
            Executor::builder(
                store(&exec_schema, concurrency.max(2)).await,
                transport(&format!("E{concurrency}"), &mut streams).await,
            )
            .build(),
        );
        let batch = if concurrency == 1 {
            Some(Arc::new(
                Executor::builder(
                    store(&batch_schema, 2).await,
                    transport(&format!("B{concurrency}"), &mut streams).await,
                )
                .build(),
            ))
        } else {
            None
        };
        // Warm-up: connections, prepared statements, streams.
        hand_round(&mut hand, 1_000_000, 1_000_000 + 2 * concurrency).await;
        exec_round(&exec, "warm", 0, 2 * concurrency, concurrency, None).await;

        let (mut hand_t, mut exec_t, mut batch_t) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let (from, to) = (round * block, (round + 1) * block);
            let h = hand_round(&mut hand, from, to).await;
            let e = exec_round(&exec, "exec", from, to, concurrency, None).await;
            if let Some(batch) = &batch {
                batch_t += exec_round(batch, "batch", from, to, 1, Some(BATCH)).await;
            }
            ratios.push(h.as_secs_f64() / e.as_secs_f64());
            hand_t += h;
            exec_t += e;
        }
        let runs = (rounds * block) as f64;
        let rate = |t: Duration| runs / t.as_secs_f64();
        let (h, e) = (rate(hand_t), rate(exec_t));
        let seconds = if quick { 2 } else { 5 };
        let (pgb, pgb_ratio) = match pgbench(&hand_schema, concurrency, seconds) {
            Ok(tps) => (format!("{tps:.0}"), format!("{:.2}x", e / tps)),
            Err(why) => (format!("not measured: {why}"), "-".to_owned()),
        };
        println!(
            "| {concurrency} | {} | {h:.0} | {e:.0} | {:.2}x | {} | {pgb} | {pgb_ratio} |",
            rounds * block,
            e / h,
            spread(&ratios, 2),
        );
        if batch.is_some() {
            let b = rate(batch_t);
            batched_line = format!("| {} | {e:.0} | {b:.0} | {:.1}x |", rounds * block, b / e);
        }
    }
    println!(
        "\nbatched: {BATCH} runs per commit (`Executor::run_batch`) against one commit per run, both one task"
    );
    println!("| runs | one commit per run, runs/s | batched runs/s | speedup |");
    println!("|---|---|---|---|");
    println!("{batched_line}");
    for schema in schemas {
        drop_schema(&schema).await;
    }
    for (transport, stream) in streams {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            transport.jetstream().delete_stream(&stream),
        )
        .await;
    }
}
