//! A process that takes leases and is killed, for the liveness tests
//! (`tests/tests/store_conformance.rs`, `tests/tests/recovery.rs`).
//!
//! ```text
//! effects-liveness-child hold --store SPEC --owner NAME --runs N --lease-ms L [--record true]
//! effects-liveness-child execute --store SPEC --broker PATH --http URL --runs N [--prefix P]
//! ```
//!
//! `SPEC` is `sqlite:PATH` or `postgres:URL` (with the `postgres` feature).
//!
//! - `hold` registers `NAME` with the store, commits `N` runs (`NAME:0` ..), each one request
//!   and one message, claiming their requests under `NAME` for `L` ms, and with `--record true`
//!   records a response for each (the runs then wait for their after-requests step). It prints
//!   `HELD <rows>` and waits.
//! - `execute` runs `N` runs (`P:0` ..) through an executor with the default configuration
//!   (owner, lease), each a datom, a request to the `notify` endpoint at `URL` and a message,
//!   all at once, and prints `STARTED <owner>` (its executor's owner name); the runs then wait
//!   for their responses.
//!
//! Either way it waits to be killed (SIGKILL), stops when stdin closes or says `STOP`, and exits
//! by itself (code 3) after 120 s so that a broken test never leaves it behind.

use std::io::BufRead as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use effects_core::executor::{BatchItem, Executor};
use effects_core::http::{HttpConfig, HttpResponse, ReqwestClient, RetryPolicy};
use effects_core::store::{
    ClaimOptions, Commit, NewOutboxRow, NewRun, OutboxKind, RequestOutcome, SqliteOptions, Store,
};
use effects_core::transport::SqliteLog;
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use effects_tests::harness::child::{open_store, say};
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn required(args: &[String], name: &str) -> Result<String, BoxError> {
    arg(args, name).ok_or_else(|| format!("`{name}` is required").into())
}

fn number(args: &[String], name: &str) -> Result<u64, BoxError> {
    let value = required(args, name)?;
    value
        .parse()
        .map_err(|e| format!("`{name} {value}`: not a number: {e}").into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    // Never outlive a broken test.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(120));
        std::process::exit(3);
    });
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liveness child failed: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: &[String]) -> Result<(), BoxError> {
    let spec = required(args, "--store")?;
    if let Some(path) = spec.strip_prefix("sqlite:") {
        let store = open_store(std::path::Path::new(path), &SqliteOptions::default())?;
        return mode(store, args).await;
    }
    #[cfg(feature = "postgres")]
    if let Some(url) = spec.strip_prefix("postgres:") {
        let store = effects_core::postgres::PostgresStore::connect(
            effects_core::postgres::PostgresOptions {
                pool_size: 4,
                ..effects_core::postgres::PostgresOptions::new(url)
            },
        )
        .await?;
        return mode(store, args).await;
    }
    Err(format!("unknown store `{spec}`").into())
}

async fn mode<S: Store + Clone>(store: S, args: &[String]) -> Result<(), BoxError> {
    // The store handle lives until the process ends: the owner is alive as long as it does.
    match args.first().map(String::as_str) {
        Some("hold") => hold(&store, args).await?,
        Some("execute") => execute(store.clone(), args).await?,
        other => return Err(format!("unknown mode {other:?}: hold or execute").into()),
    }
    // Wait to be killed; stop when stdin closes or says STOP.
    tokio::task::spawn_blocking(|| {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "STOP" => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await?;
    Ok(())
}

fn request(i: u64) -> RequestEffect {
    RequestEffect::new(Method::Post, "notify", format!("/notify/{i}")).with_body(json!({"n": i}))
}

/// Registers the owner, commits runs whose requests it claims, records their responses if
/// asked, and says how many rows it holds.
async fn hold<S: Store>(store: &S, args: &[String]) -> Result<(), BoxError> {
    let owner = required(args, "--owner")?;
    let runs = number(args, "--runs")?;
    let lease = Duration::from_millis(number(args, "--lease-ms")?);
    let record = arg(args, "--record").is_some_and(|v| v == "true");
    store.register_owner(&owner).await?;
    let new_runs: Vec<NewRun> = (0..runs)
        .map(|i| -> Result<NewRun, BoxError> {
            Ok(NewRun {
                key: format!("{owner}:{i}"),
                effects_sha256: format!("{i:064x}"),
                after_requests: None,
                reads: Vec::new(),
                datoms: Vec::new(),
                outbox: vec![
                    NewOutboxRow {
                        seq: 0,
                        kind: OutboxKind::Request,
                        destination: "notify".to_owned(),
                        partition_key: None,
                        headers: Default::default(),
                        payload: serde_json::to_string(&request(i))?,
                    },
                    NewOutboxRow {
                        seq: 1,
                        kind: OutboxKind::Message,
                        destination: "held".to_owned(),
                        partition_key: None,
                        headers: Default::default(),
                        payload: json!({"n": i}).to_string(),
                    },
                ],
                ack: None,
            })
        })
        .collect::<Result<_, _>>()?;
    let commits = store
        .commit_runs(
            new_runs,
            ClaimOptions {
                owner: owner.clone(),
                lease,
                publish_inline: false,
                before_commit: None,
            },
        )
        .await?;
    let mut held = 0;
    for commit in commits {
        let Commit::Applied { claimed, .. } = commit else {
            return Err(format!("a run was not applied: {commit:?}").into());
        };
        for row in claimed {
            held += 1;
            if record {
                let lease = row.lease.clone().ok_or("a claimed row without its lease")?;
                let outcome = RequestOutcome::Response {
                    response: HttpResponse {
                        status: 200,
                        headers: Default::default(),
                        body: json!({"ok": true}),
                        attempts: 1,
                    },
                };
                if !store.record_request(&row.id, outcome, &lease).await? {
                    return Err(format!("`{}`: the lease was refused", row.id).into());
                }
            }
        }
    }
    say(&format!("HELD {held}"));
    Ok(())
}

/// Runs runs through an executor with the default configuration; they wait for their
/// responses.
async fn execute<S: Store + Clone>(store: S, args: &[String]) -> Result<(), BoxError> {
    let runs = number(args, "--runs")?;
    let prefix = arg(args, "--prefix").unwrap_or_else(|| "run".to_owned());
    let broker = SqliteLog::open(required(args, "--broker")?)?;
    let http = ReqwestClient::new(
        HttpConfig::new()
            .with_endpoint("notify", &required(args, "--http")?)?
            .with_attempt_timeout(Duration::from_secs(110))
            .with_retry(RetryPolicy {
                max_attempts: 1,
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
                jitter: false,
            })?,
    )?;
    let executor = Arc::new(Executor::builder(store, broker).http(http).build());
    let owner = executor.config().owner.clone();
    // As a worker does: runs committed in groups of 64 (what one dispatch drives at once), one
    // group at a time, each group's requests sent (and left waiting for their responses) while
    // the next group commits — so that 10 000 runs do not queue 10 000 commits on the store's
    // pool at once.
    let items: Vec<BatchItem> = (0..runs)
        .map(|i| {
            let effects = Effects::from(DatomEffect::assert(
                LookupRef::new("card/id", format!("c{i}")),
                [("card/status", json!("blocked"))],
            ))
            .merge(request(i))
            .merge(MessageEffect::new("card-status-changed", json!({"n": i})));
            BatchItem::new(format!("{prefix}:{i}"), effects)
        })
        .collect();
    for group in items.chunks(64) {
        let mut committed = Vec::new();
        for result in executor.commit_batch(group).await? {
            match result {
                Ok(c) => committed.push(c),
                Err(e) => eprintln!("run failed: {e}"),
            }
        }
        let executor = Arc::clone(&executor);
        tokio::spawn(async move {
            for result in executor.dispatch(committed).await {
                if let Err(e) = result {
                    eprintln!("dispatch failed: {e}");
                }
            }
        });
    }
    say(&format!("STARTED {owner}"));
    Ok(())
}
