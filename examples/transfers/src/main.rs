//! `cargo run -p transfers`: many concurrent transfers, most of them from one hot account,
//! through the `transfer` and `settle` workers on an embedded SQLite file, with an HTTP fraud
//! check; prints the balances, the conflicts and re-runs, the requests the fraud-check service
//! received, and checks that money is conserved (exit status 1 if a check fails).
//!
//! ```text
//! transfers [--store sqlite:PATH] [--transport sqlite:PATH] [--transfers N]
//!           [--processes N] [--concurrency N] [--patience SECS]
//! transfers worker --store sqlite:PATH --fraud-check URL [--concurrency N] [--patience SECS]
//! ```
//!
//! `--processes N` starts N worker processes — this binary in its `worker` mode — on the same
//! file instead of running the workers in the job's process. A worker process runs both
//! workers until every transfer is handled and prints its counts as `report {json}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use effects_core::store::SqliteStore;
use transfers::backend::{StoreUrl, TransportUrl};
use transfers::job::{self, JobOptions, Printout};
use transfers::service::{self, WorkerOptions};

const USAGE: &str = "\
usage: transfers [--store sqlite:PATH] [--transport sqlite:PATH] [--transfers N]
                 [--processes N] [--concurrency N] [--patience SECS]
       transfers worker --store sqlite:PATH --fraud-check URL [--concurrency N] [--patience SECS]

  --store        where the job keeps its state: a fresh SQLite file (default: a new file in the
                 temporary directory)
  --transport    where the transfers are published: the store's own log (the default)
  --transfers    how many transfers to publish, most from one hot account (default 100)
  --processes    run the workers in N separate processes on the same file (default: in this one)
  --concurrency  deliveries each worker handles at once (default 8)
  --patience     seconds the workers may take to handle everything (default 60)
  worker         run the `transfer` and `settle` workers on an existing store until every
                 transfer is handled (what --processes starts)";

/// A command-line mistake: usage on stderr, exit status 2.
#[derive(Debug)]
struct Usage(String);

/// What the command line asks for.
enum Mode {
    Job(JobOptions),
    Worker {
        store: StoreUrl,
        fraud_check_url: String,
        options: WorkerOptions,
        start_on_stdin: bool,
    },
    Help,
}

fn number<T>(flag: &str, value: &str, min: T) -> Result<T, Usage>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match value.parse::<T>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(Usage(format!(
            "{flag} takes a whole number of at least {min}, not `{value}`"
        ))),
    }
}

fn parse(args: &[String]) -> Result<Mode, Usage> {
    let worker = args.first().is_some_and(|a| a == "worker");
    let mut rest = args.iter().skip(usize::from(worker));
    let (mut store, mut transport, mut fraud_check_url) = (None, None, None);
    let mut start_on_stdin = false;
    let mut options = JobOptions::new(StoreUrl::Sqlite(PathBuf::new()));
    while let Some(flag) = rest.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(Mode::Help);
        }
        // Set by the job: print `ready`, then wait for `start` on stdin.
        if worker && flag == "--start-on-stdin" {
            start_on_stdin = true;
            continue;
        }
        let value = rest
            .next()
            .ok_or_else(|| Usage(format!("{flag} needs a value")))?;
        match (flag.as_str(), worker) {
            ("--store", _) => {
                store = Some(StoreUrl::parse(value).map_err(|e| Usage(e.to_string()))?);
            }
            ("--transport", false) => {
                transport = Some(TransportUrl::parse(value).map_err(|e| Usage(e.to_string()))?);
            }
            ("--transfers", false) => options.transfers = number(flag, value, 1)?,
            ("--processes", false) => options.processes = number(flag, value, 1)?,
            ("--concurrency", _) => options.workers.concurrency = number(flag, value, 1)?,
            ("--patience", _) => {
                options.workers.patience = Duration::from_secs(number(flag, value, 1)?);
            }
            ("--fraud-check", true) => fraud_check_url = Some(value.clone()),
            // Testing only: a worker process with a deliberately broken executor.
            ("--mutant", true) => {
                options.workers.mutant = Some(
                    job::parse_mutant(value)
                        .ok_or_else(|| Usage(format!("unknown mutant `{value}`")))?,
                );
            }
            _ => return Err(Usage(format!("unknown argument `{flag}`"))),
        }
    }
    if worker {
        return Ok(Mode::Worker {
            store: store.ok_or_else(|| Usage("worker needs --store sqlite:PATH".to_owned()))?,
            fraud_check_url: fraud_check_url
                .ok_or_else(|| Usage("worker needs --fraud-check URL".to_owned()))?,
            options: options.workers,
            start_on_stdin,
        });
    }
    let store = store.unwrap_or_else(|| StoreUrl::Sqlite(job::fresh_database_path()));
    options.transport = transport.unwrap_or_else(|| TransportUrl::beside(&store));
    options
        .transport
        .check_with(&store)
        .map_err(|e| Usage(e.to_string()))?;
    options.store = store;
    Ok(Mode::Job(options))
}

/// A worker process: both workers on an existing store until everything is handled; the
/// counts on stdout.
async fn worker(
    store: &StoreUrl,
    fraud_check_url: &str,
    options: &WorkerOptions,
    start_on_stdin: bool,
) -> Result<String, job::Error> {
    let path = store.sqlite_path();
    if !path.exists() {
        return Err(job::Error::Setup {
            reason: format!(
                "{} does not exist: a worker joins a job's store",
                path.display()
            ),
        });
    }
    let store = SqliteStore::open(path)?;
    let executor = Arc::new(service::executor(&store, fraud_check_url, options.mutant)?);
    if start_on_stdin {
        wait_for_start(options.patience).await?;
    }
    let workers = service::run_until_drained(executor, options).await?;
    Ok(format!(
        "{}{}",
        job::REPORT_PREFIX,
        serde_json::to_string(&workers)?
    ))
}

/// Says `ready` on stdout and waits (at most `patience`) for `start` on stdin.
async fn wait_for_start(patience: Duration) -> Result<(), job::Error> {
    println!("{}", job::READY);
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    let io = |what: &str, source| job::Error::Io {
        what: what.to_owned(),
        source,
    };
    match tokio::time::timeout(patience, read).await {
        Ok(Ok(Ok(line))) if line.trim() == job::START => Ok(()),
        Ok(Ok(Ok(line))) => Err(job::Error::Setup {
            reason: format!("expected `{}` on stdin, got `{}`", job::START, line.trim()),
        }),
        Ok(Ok(Err(e))) => Err(io("cannot read stdin", e)),
        Ok(Err(e)) => Err(job::Error::Setup {
            reason: format!("the task reading stdin failed: {e}"),
        }),
        Err(_) => Err(job::Error::Timeout {
            what: format!("not told to start within {}s", patience.as_secs()),
        }),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse(&args) {
        Ok(mode) => mode,
        Err(Usage(message)) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Mode::Worker {
            store,
            fraud_check_url,
            options,
            start_on_stdin,
        } => match worker(&store, &fraud_check_url, &options, start_on_stdin).await {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Mode::Job(mut options) => {
            if options.processes > 0 {
                match std::env::current_exe() {
                    Ok(program) => options.worker_program = Some(program),
                    Err(e) => {
                        eprintln!("error: cannot find this program to start workers: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            match job::run(options).await {
                Ok(report) => {
                    print!("{}", Printout(&report));
                    let failed = report.checks().iter().filter(|c| !c.passed).count();
                    if failed > 0 {
                        eprintln!("error: {failed} check(s) failed");
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
