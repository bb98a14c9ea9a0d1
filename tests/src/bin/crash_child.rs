//! The child process of the crash tests (`tests/tests/reliability.rs`).
//!
//! It runs a worker with the `transfer` handler over a real SQLite store, with HTTP to the
//! parent's server on loopback. With `--fault POINT` it prints `FAULT <point> <at>` when the
//! executor reaches that point for the first time and then waits to be killed (SIGKILL by the
//! parent); it exits by itself after 60 s so that a broken test never leaves it behind. Without
//! a fault it runs until every input is acknowledged and nothing is pending, prints
//! `DONE applied=<n> duplicates=<n>`, and exits 0.
//!
//! Arguments: `--db PATH` (store), `--broker PATH` (a separate log file, like an external
//! broker; default: the log in the store's database, published to inside its transactions),
//! `--http URL` (base of the `notify` endpoint), `--fault POINT` (`before_commit`,
//! `after_commit`, `after_http_before_record`, `after_publish_before_mark`), `--owner NAME`.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use effects_core::executor::{Executor, FaultPoint};
use effects_core::http::{HttpConfig, ReqwestClient, RetryPolicy};
use effects_core::relay::RelayConfig;
use effects_core::store::SqliteStore;
use effects_core::transport::SqliteLog;
use effects_core::worker::{Worker, WorkerConfig};
use effects_core::{
    DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect, Method,
    RequestEffect,
};
use serde::Deserialize;
use serde_json::json;

/// The topic the parent seeds.
const INPUTS: &str = "transfers";

/// The input of `transfer`.
#[derive(Deserialize)]
struct Transfer {
    id: String,
}

/// Books a transfer: a datom, a request to the notification service, a message.
struct TransferHandler;

impl Handler for TransferHandler {
    type Input = Transfer;
    type Output = Effects;
    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "transfer",
        topic: Some(INPUTS),
        key: None,
        input: "Transfer",
        schemas: &[],
    };

    fn handle(&self, t: Transfer) -> Effects {
        Effects::from(DatomEffect::assert(
            LookupRef::new("transfer/id", t.id.clone()),
            [
                ("transfer/amount", json!(100)),
                ("transfer/state", json!("booked")),
            ],
        ))
        .merge(
            RequestEffect::new(Method::Post, "notify", format!("/notify/{}", t.id))
                .with_body(json!({"id": t.id})),
        )
        .merge(MessageEffect::new("transfer-booked", json!({"id": t.id})).with_key(t.id))
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn fault_point(name: &str) -> Option<FaultPoint> {
    Some(match name {
        "before_commit" => FaultPoint::BeforeCommit,
        "after_commit" => FaultPoint::AfterCommit,
        "after_http_before_record" => FaultPoint::AfterHttpBeforeRecord,
        "after_publish_before_mark" => FaultPoint::AfterPublishBeforeMark,
        _ => return None,
    })
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(db), Some(http)) = (arg(&args, "--db"), arg(&args, "--http")) else {
        eprintln!(
            "usage: effects-crash-child --db PATH --http URL [--broker PATH] [--fault POINT] [--owner NAME]"
        );
        return ExitCode::from(2);
    };
    let fault = match arg(&args, "--fault") {
        None => None,
        Some(name) => match fault_point(&name) {
            Some(p) => Some(p),
            None => {
                eprintln!("unknown fault point `{name}`");
                return ExitCode::from(2);
            }
        },
    };
    let owner = arg(&args, "--owner").unwrap_or_else(|| "child".to_owned());
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
    let result = runtime.block_on(async {
        let store = SqliteStore::open(&db)?;
        match arg(&args, "--broker") {
            Some(broker) => run(store, SqliteLog::open(broker)?, &http, fault, &owner).await,
            None => {
                let log = store.log();
                run(store, log, &http, fault, &owner).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("child failed: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(
    store: SqliteStore,
    transport: SqliteLog,
    http: &str,
    fault: Option<FaultPoint>,
    owner: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = ReqwestClient::new(
        HttpConfig::new()
            .with_endpoint("notify", http)?
            .with_attempt_timeout(Duration::from_secs(5))
            .with_retry(RetryPolicy {
                max_attempts: 3,
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
                jitter: false,
            })?,
    )?;
    let fired = Arc::new(AtomicBool::new(false));
    let hook = {
        let fired = Arc::clone(&fired);
        Arc::new(move |point: FaultPoint, at: &str| {
            if Some(point) == fault && !fired.swap(true, Ordering::SeqCst) {
                say(&format!("FAULT {point:?} {at}"));
                // Wait for SIGKILL; never carry on past the fault point.
                std::thread::sleep(Duration::from_secs(60));
                std::process::exit(3);
            }
        })
    };
    let executor = Arc::new(
        Executor::builder(store.clone(), transport.clone())
            .http(client)
            .owner(owner)
            .lease(Duration::from_secs(2))
            .after_requests("receipt", |recorded| {
                recorded
                    .iter()
                    .map(|r| {
                        MessageEffect::new(
                            "transfer-receipts",
                            json!({"id": r.id, "ok": r.outcome.is_success()}),
                        )
                    })
                    .collect()
            })
            .fault_hook(hook)
            .build(),
    );
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), TransferHandler).with_config(WorkerConfig {
            concurrency: 1,
            fetch_wait: Duration::from_millis(50),
            visibility: Duration::from_millis(1500),
            relay: Some(RelayConfig {
                interval: Duration::from_millis(50),
                ..RelayConfig::default()
            }),
            after_requests: Some("receipt".to_owned()),
            ..WorkerConfig::default()
        }),
    );
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
    say("READY");
    let started = Instant::now();
    // Bounded: a child that cannot finish in 60 s fails.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let inputs_left = transport.unacknowledged("transfer", INPUTS).await?;
        let backlog = store.backlog().await?;
        if inputs_left == 0 && backlog.pending_rows == 0 && backlog.open_runs == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "not done after 60 s: {inputs_left} inputs left, backlog {backlog:?}"
            )
            .into());
        }
    }
    let _ = stop.send(());
    let report = task.await?;
    say(&format!(
        "DONE applied={} duplicates={}",
        report.applied, report.duplicates
    ));
    Ok(())
}
