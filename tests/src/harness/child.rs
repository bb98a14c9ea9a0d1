//! The worker process of the crash tests and the soak (`effects-crash-child`, and
//! `effects-soak worker`): a [`Worker`] running [`BookHandler`] over a real SQLite store, with
//! HTTP to the parent's server on loopback, counting at the source into a [`Tally`] file.
//!
//! It prints `READY` once started. With a fault point it prints `FAULT <point> <at>` the
//! `fault_after`-th time the executor reaches that point and then waits to be killed (SIGKILL
//! by the parent), exiting by itself (code 3) after 60 s so that a broken test never leaves it
//! behind. It stops — finishing the work in flight — when its stdin closes or says `STOP`, or,
//! with `until_drained`, once every input is acknowledged and nothing is pending; then it
//! prints `DONE applied=<n> duplicates=<n> deliveries=<n>` and exits 0. A child that is not
//! done within its timeout exits 1.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use effects_core::executor::{Executor, FaultPoint, Mutant};
use effects_core::http::{HttpConfig, ReqwestClient, RetryPolicy};
use effects_core::relay::RelayConfig;
use effects_core::store::{SqliteOptions, SqliteStore, Synchronous};
use effects_core::transport::SqliteLog;
use effects_core::worker::{Acknowledge, GroupCommit, Worker, WorkerConfig};

use super::book::{BookHandler, HANDLER_NAME, INPUTS, RECEIPT_HOOK, Requests, receipts};
use super::redeliver::{CountingTransport, Redeliveries, StallFirstDelivery};
use super::tally::Tally;

/// How a worker child runs. [`WorkerArgs::to_args`] and [`WorkerArgs::parse`] are inverse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The store's file.
    pub db: PathBuf,
    /// A separate log file for inputs and outputs (like an external broker); `None`: the log
    /// in the store's file, written inside the runs' commits.
    pub broker: Option<PathBuf>,
    /// The base URL of the `notify` endpoint.
    pub http: Option<String>,
    /// Which inputs send a request.
    pub requests: Requests,
    /// Stop at this fault point and wait to be killed.
    pub fault: Option<FaultPoint>,
    /// ... the n-th time it is reached (1: the first).
    pub fault_after: u64,
    /// At the fault point, go on after this long instead of waiting to be killed: the parent
    /// stops the process (SIGSTOP) meanwhile, to pause it there.
    pub fault_pause: Option<Duration>,
    /// The lease owner's name; `None`: the default, unique per process.
    pub owner: Option<String>,
    /// The executor's lease on claimed outbox rows.
    pub lease: Duration,
    /// The inputs' visibility timeout.
    pub visibility: Duration,
    /// Where the tally file goes; `None`: counted in memory only.
    pub events: Option<PathBuf>,
    /// A deliberately broken executor.
    pub mutant: Option<Mutant>,
    /// Percent of inputs whose first acknowledgement is lost.
    pub lose_acks: u64,
    /// Percent of inputs whose first delivery stalls until the redelivery is acknowledged.
    pub stalls: u64,
    /// Deliveries decided at once.
    pub concurrency: usize,
    /// Deliveries the worker holds at once (1: one input at a time, from fetch to settle).
    pub max_in_flight: usize,
    /// Group commit's wait for more runs; `None`: every run commits alone.
    pub group_commit: Option<Duration>,
    /// Acknowledge an input only once its run's effects were dispatched (otherwise at commit).
    pub after_effects: bool,
    /// The store's `synchronous` setting.
    pub synchronous: Synchronous,
    /// Stop once every input is acknowledged and nothing is pending.
    pub until_drained: bool,
    /// Exit with an error when not done by then.
    pub timeout: Duration,
}

impl WorkerArgs {
    /// Defaults: inline log, a request per input, no fault, default owner, 2 s lease, 1.5 s
    /// visibility, no redeliveries, concurrency 1 with the worker's default in-flight limit and
    /// group commit, `synchronous = FULL`, until drained, 60 s.
    pub fn new(db: PathBuf) -> WorkerArgs {
        WorkerArgs {
            db,
            broker: None,
            http: None,
            requests: Requests::Every(1),
            fault: None,
            fault_after: 1,
            fault_pause: None,
            owner: None,
            lease: Duration::from_secs(2),
            visibility: Duration::from_millis(1500),
            events: None,
            mutant: None,
            lose_acks: 0,
            stalls: 0,
            concurrency: 1,
            max_in_flight: WorkerConfig::default().max_in_flight,
            group_commit: Some(GroupCommit::default().max_wait),
            after_effects: false,
            synchronous: Synchronous::Full,
            until_drained: true,
            timeout: Duration::from_secs(60),
        }
    }

    /// The command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--db".to_owned(), self.db.display().to_string()];
        let mut push = |k: &str, v: String| {
            a.push(k.to_owned());
            a.push(v);
        };
        if let Some(b) = &self.broker {
            push("--broker", b.display().to_string());
        }
        if let Some(h) = &self.http {
            push("--http", h.clone());
        }
        push(
            "--requests-every",
            match self.requests {
                Requests::None => "0".to_owned(),
                Requests::Every(n) => n.to_string(),
            },
        );
        if let Some(f) = self.fault {
            push("--fault", fault_name(f).to_owned());
        }
        push("--fault-after", self.fault_after.to_string());
        if let Some(pause) = self.fault_pause {
            push("--fault-pause-ms", pause.as_millis().to_string());
        }
        if let Some(o) = &self.owner {
            push("--owner", o.clone());
        }
        push("--lease-ms", self.lease.as_millis().to_string());
        push("--visibility-ms", self.visibility.as_millis().to_string());
        if let Some(e) = &self.events {
            push("--events", e.display().to_string());
        }
        if let Some(m) = self.mutant {
            push("--mutant", mutant_name(m).to_owned());
        }
        push("--lose-acks", self.lose_acks.to_string());
        push("--stalls", self.stalls.to_string());
        push("--concurrency", self.concurrency.to_string());
        push("--max-in-flight", self.max_in_flight.to_string());
        push("--after-effects", self.after_effects.to_string());
        push(
            "--group-commit-wait-ms",
            self.group_commit
                .map_or_else(|| "off".to_owned(), |d| d.as_millis().to_string()),
        );
        push(
            "--synchronous",
            match self.synchronous {
                Synchronous::Normal => "normal",
                Synchronous::Full => "full",
                Synchronous::Extra => "extra",
            }
            .to_owned(),
        );
        push("--until-drained", self.until_drained.to_string());
        push("--timeout-s", self.timeout.as_secs().to_string());
        a
    }

    /// Parses a command line written by [`WorkerArgs::to_args`] (program name excluded).
    pub fn parse(args: &[String]) -> Result<WorkerArgs, String> {
        let mut it = args.iter();
        let mut db = None;
        let mut w = WorkerArgs::new(PathBuf::new());
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("`{flag}` needs a value"))?
                .clone();
            let number = |v: &str| -> Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|e| format!("`{flag} {v}`: not a number: {e}"))
            };
            match flag.as_str() {
                "--db" => db = Some(PathBuf::from(value)),
                "--broker" => w.broker = Some(PathBuf::from(value)),
                "--http" => w.http = Some(value),
                "--requests-every" => {
                    w.requests = match number(&value)? {
                        0 => Requests::None,
                        n => Requests::Every(n),
                    }
                }
                "--fault" => {
                    w.fault = Some(
                        fault_point(&value).ok_or_else(|| format!("unknown fault `{value}`"))?,
                    );
                }
                "--fault-after" => w.fault_after = number(&value)?.max(1),
                "--fault-pause-ms" => w.fault_pause = Some(Duration::from_millis(number(&value)?)),
                "--owner" => w.owner = Some(value),
                "--lease-ms" => w.lease = Duration::from_millis(number(&value)?),
                "--visibility-ms" => w.visibility = Duration::from_millis(number(&value)?),
                "--events" => w.events = Some(PathBuf::from(value)),
                "--mutant" => {
                    w.mutant =
                        Some(mutant(&value).ok_or_else(|| format!("unknown mutant `{value}`"))?);
                }
                "--lose-acks" => w.lose_acks = number(&value)?,
                "--stalls" => w.stalls = number(&value)?,
                "--concurrency" => {
                    w.concurrency = usize::try_from(number(&value)?).map_err(|e| e.to_string())?;
                }
                "--max-in-flight" => {
                    w.max_in_flight =
                        usize::try_from(number(&value)?).map_err(|e| e.to_string())?;
                }
                "--after-effects" => {
                    w.after_effects = value
                        .parse()
                        .map_err(|e| format!("`--after-effects {value}`: {e}"))?;
                }
                "--group-commit-wait-ms" => {
                    w.group_commit = match value.as_str() {
                        "off" => None,
                        ms => Some(Duration::from_millis(number(ms)?)),
                    };
                }
                "--synchronous" => {
                    w.synchronous = match value.as_str() {
                        "normal" => Synchronous::Normal,
                        "full" => Synchronous::Full,
                        "extra" => Synchronous::Extra,
                        other => return Err(format!("unknown synchronous `{other}`")),
                    }
                }
                "--until-drained" => {
                    w.until_drained = value
                        .parse()
                        .map_err(|_| format!("`--until-drained {value}`: true or false"))?;
                }
                "--timeout-s" => w.timeout = Duration::from_secs(number(&value)?),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        w.db = db.ok_or("`--db PATH` is required")?;
        Ok(w)
    }
}

/// The name of a fault point on the command line.
pub fn fault_name(point: FaultPoint) -> &'static str {
    match point {
        FaultPoint::BeforeCommit => "before_commit",
        FaultPoint::AfterCommit => "after_commit",
        FaultPoint::AfterHttpBeforeRecord => "after_http_before_record",
        FaultPoint::AfterPublishBeforeMark => "after_publish_before_mark",
        FaultPoint::AfterClaim => "after_claim",
        FaultPoint::Fenced => "fenced",
    }
}

/// The fault point named `name`.
pub fn fault_point(name: &str) -> Option<FaultPoint> {
    [
        FaultPoint::BeforeCommit,
        FaultPoint::AfterCommit,
        FaultPoint::AfterHttpBeforeRecord,
        FaultPoint::AfterPublishBeforeMark,
        FaultPoint::AfterClaim,
        FaultPoint::Fenced,
    ]
    .into_iter()
    .find(|p| fault_name(*p) == name)
}

/// The name of a mutant on the command line.
pub fn mutant_name(m: Mutant) -> &'static str {
    m.name()
}

/// The mutant named `name`.
pub fn mutant(name: &str) -> Option<Mutant> {
    Mutant::from_name(name)
}

/// Prints one line on stdout at once.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs a worker child with the command line `args` (program name excluded).
pub fn worker_main(args: &[String]) -> ExitCode {
    let args = match WorkerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker child failed: {e}");
            ExitCode::from(1)
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a store, retrying for up to 60 s: opening applies migrations, which can meet
/// `database is locked` at once (no busy wait) while another process is writing to the file.
pub fn open_store(
    path: &std::path::Path,
    options: &SqliteOptions,
) -> Result<SqliteStore, effects_core::store::StoreError> {
    let started = Instant::now();
    // Bounded: 60 s of attempts 50 ms apart.
    loop {
        match SqliteStore::open_with(path, options) {
            Ok(store) => return Ok(store),
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("opening {} failed, trying again: {e}", path.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run(a: WorkerArgs) -> Result<(), BoxError> {
    let options = SqliteOptions {
        synchronous: a.synchronous,
        ..SqliteOptions::default()
    };
    let store = open_store(&a.db, &options)?;
    let tally = match &a.events {
        Some(dir) => Tally::in_dir(dir)?,
        None => Tally::in_memory(),
    };
    let log_db = a.broker.clone().unwrap_or_else(|| a.db.clone());
    let plan = Arc::new(Redeliveries::new(
        a.lose_acks,
        a.stalls,
        a.concurrency / 2,
        a.visibility * 4,
        log_db,
        tally.clone(),
    ));
    // A separate log file opened as a store's log, so it takes the same `synchronous`
    // setting; its colocation differs from the store's, so runs publish to it after their
    // commit, as to an external broker.
    let log = match &a.broker {
        Some(b) => open_store(b, &options)?.log(),
        None => store.log(),
    };
    work(
        store,
        CountingTransport::new(log, plan.clone()),
        plan,
        tally,
        &a,
    )
    .await
}

async fn work(
    store: SqliteStore,
    transport: CountingTransport<SqliteLog>,
    plan: Arc<Redeliveries>,
    tally: Tally,
    a: &WorkerArgs,
) -> Result<(), BoxError> {
    let http = a
        .http
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:9".to_owned());
    let client = ReqwestClient::new(
        HttpConfig::new()
            .with_endpoint(super::book::ENDPOINT, &http)?
            .with_attempt_timeout(Duration::from_secs(5))
            .with_retry(RetryPolicy {
                max_attempts: 3,
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
                jitter: false,
            })?,
    )?;
    let mut builder = Executor::builder(store.clone(), transport.clone())
        .http(client)
        .lease(a.lease)
        .after_requests(RECEIPT_HOOK, receipts);
    if let Some(owner) = &a.owner {
        builder = builder.owner(owner.clone());
    }
    if let Some(m) = a.mutant {
        builder = builder.mutant(m);
    }
    if let Some(fault) = a.fault {
        let hits = Arc::new(AtomicU64::new(0));
        let after = a.fault_after;
        let pause = a.fault_pause;
        builder = builder.fault_hook(Arc::new(move |point: FaultPoint, at: &str| {
            if point == fault && hits.fetch_add(1, Ordering::SeqCst) + 1 == after {
                say(&format!("FAULT {} {at}", fault_name(point)));
                if let Some(pause) = pause {
                    // The parent stops the process meanwhile; then it goes on.
                    std::thread::sleep(pause);
                    return;
                }
                // Wait for SIGKILL; never carry on past the fault point.
                std::thread::sleep(Duration::from_secs(60));
                std::process::exit(3);
            }
        }));
    }
    let executor = Arc::new(builder.build());
    let worker = Arc::new(
        Worker::new(
            Arc::clone(&executor),
            BookHandler {
                tally,
                requests: a.requests,
            },
        )
        .with_config(WorkerConfig {
            concurrency: a.concurrency.max(1),
            max_in_flight: a.max_in_flight.max(1),
            acknowledge: if a.after_effects {
                Acknowledge::AfterEffects
            } else {
                Acknowledge::AtCommit
            },
            group_commit: a.group_commit.map(|max_wait| GroupCommit {
                max_wait,
                ..GroupCommit::default()
            }),
            fetch_wait: Duration::from_millis(50),
            visibility: a.visibility,
            relay: Some(RelayConfig {
                interval: Duration::from_millis(50),
                ..RelayConfig::default()
            }),
            after_requests: Some(RECEIPT_HOOK.to_owned()),
            ..WorkerConfig::default()
        })
        .load_with(StallFirstDelivery::new(plan)),
    );

    // Stop when stdin closes or says STOP (the parent's signal, or the parent is gone).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    {
        let stop_tx = stop_tx.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line {
                    Ok(l) if l.trim() == "STOP" => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = stop_tx.send(true);
        });
    }
    let task = tokio::spawn({
        let worker = Arc::clone(&worker);
        let mut stop_rx = stop_rx.clone();
        async move {
            worker
                .run(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await
        }
    });
    say("READY");
    let started = Instant::now();
    // Bounded: a child that is not done within its timeout fails.
    let mut drained = false;
    loop {
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => break,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if a.until_drained {
            let inputs_left = transport
                .inner()
                .unacknowledged(HANDLER_NAME, INPUTS)
                .await?;
            let backlog = store.backlog().await?;
            if inputs_left == 0 && backlog.pending_rows == 0 && backlog.open_runs == 0 {
                drained = true;
                break;
            }
        }
        if started.elapsed() > a.timeout {
            let backlog = store.backlog().await?;
            let _ = stop_tx.send(true);
            return Err(format!("not done after {:?}: backlog {backlog:?}", a.timeout).into());
        }
    }
    let _ = stop_tx.send(true);
    let report = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .map_err(|_| "the worker did not stop within 30 s")??;
    say(&format!(
        "DONE applied={} duplicates={} deliveries={} drained={drained}",
        report.applied, report.duplicates, report.deliveries
    ));
    Ok(())
}
