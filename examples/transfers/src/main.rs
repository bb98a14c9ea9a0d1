//! `cargo run -p transfers`: many concurrent transfers, most of them from one hot account,
//! through the `transfer` and `settle` workers, with an HTTP fraud check; prints the balances,
//! the conflicts and re-runs, the requests the fraud-check service received, and checks that
//! money is conserved (exit status 1 if a check fails). On an embedded SQLite file by default;
//! on PostgreSQL and NATS JetStream when given their URLs (features `postgres` and `nats`).
//!
//! ```text
//! transfers [--store URL] [--transport URL] [--namespace NAME] [--transfers N]
//!           [--processes N] [--concurrency N] [--patience SECS]
//! transfers worker --fraud-check URL [--store URL] [--transport URL] [--namespace NAME]
//!           [--concurrency N] [--patience SECS]
//! ```
//!
//! `--store`, `--transport` and `--namespace` default to `EFFECTS_STORE`, `EFFECTS_TRANSPORT`
//! and `EFFECTS_NAMESPACE`. `--processes N` starts N worker processes — this binary in its
//! `worker` mode, given the URLs in its environment — on the same store and transport instead
//! of running the workers in the job's process. A worker process runs both workers until every
//! transfer is handled and prints its counts as `report {json}`.

use std::process::ExitCode;
use std::time::Duration;

use transfers::backend::{Namespace, StoreUrl, TransportUrl};
use transfers::job::{self, JobOptions, NAMESPACE_ENV, Printout, STORE_ENV, TRANSPORT_ENV};

const USAGE: &str = "\
usage: transfers [--store URL] [--transport URL] [--namespace NAME] [--transfers N]
                 [--processes N] [--concurrency N] [--patience SECS]
       transfers worker --fraud-check URL [--store URL] [--transport URL] [--namespace NAME]
                 [--concurrency N] [--patience SECS]

  --store        where the job keeps its state (or EFFECTS_STORE): `sqlite:PATH`, a fresh SQLite
                 file (default: a new file in the temporary directory), or
                 `postgres://USER@HOST:PORT/DB` (built with --features postgres,nats)
  --transport    where the transfers are published (or EFFECTS_TRANSPORT): the SQLite store's
                 own log (the default), or `nats://HOST:PORT` with a PostgreSQL store
  --namespace    on the servers, the schema and the NATS stream of this run (or
                 EFFECTS_NAMESPACE; default: a fresh `transfers_<pid>_<time>_<n>`)
  --transfers    how many transfers to publish, most from one hot account (default 100)
  --processes    run the workers in N separate processes on the same store (default: in this one)
  --concurrency  deliveries each worker handles at once (default 8)
  --patience     seconds the workers may take to handle everything (default 60)
  worker         run the `transfer` and `settle` workers on a running job's store until every
                 transfer is handled (what --processes starts)";

/// A command-line mistake: usage on stderr, exit status 2.
#[derive(Debug)]
struct Usage(String);

/// What the command line asks for.
enum Mode {
    Job(JobOptions),
    Worker {
        job: JobOptions,
        fraud_check_url: String,
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

/// A flag's value, or else the environment variable's (unset or empty: none).
fn or_env(flag: Option<String>, var: &str) -> Option<String> {
    flag.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

fn parse(args: &[String]) -> Result<Mode, Usage> {
    let worker = args.first().is_some_and(|a| a == "worker");
    let mut rest = args.iter().skip(usize::from(worker));
    let (mut store, mut transport, mut namespace, mut fraud_check_url) = (None, None, None, None);
    let mut start_on_stdin = false;
    let mut options = JobOptions::new(job::fresh_database_path());
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
            ("--store", _) => store = Some(value.clone()),
            ("--transport", _) => transport = Some(value.clone()),
            ("--namespace", _) => namespace = Some(value.clone()),
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
    let store = match or_env(store, STORE_ENV) {
        Some(url) => StoreUrl::parse(&url).map_err(|e| Usage(e.to_string()))?,
        None if worker => {
            return Err(Usage(format!("worker needs --store URL (or {STORE_ENV})")));
        }
        None => options.store.clone(),
    };
    let transport = match or_env(transport, TRANSPORT_ENV) {
        Some(url) => TransportUrl::parse(&url).map_err(|e| Usage(e.to_string()))?,
        None => TransportUrl::beside(&store).ok_or_else(|| {
            Usage(format!(
                "a PostgreSQL store needs --transport nats://HOST:PORT (or {TRANSPORT_ENV})"
            ))
        })?,
    };
    transport
        .check_with(&store)
        .map_err(|e| Usage(e.to_string()))?;
    if let Some(name) = or_env(namespace, NAMESPACE_ENV) {
        options.namespace = Namespace::parse(&name).map_err(Usage)?;
    }
    options.store = store;
    options.transport = transport;
    if worker {
        return Ok(Mode::Worker {
            job: options,
            fraud_check_url: fraud_check_url
                .ok_or_else(|| Usage("worker needs --fraud-check URL".to_owned()))?,
            start_on_stdin,
        });
    }
    Ok(Mode::Job(options))
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
            job,
            fraud_check_url,
            start_on_stdin,
        } => match job::work(
            &job.store,
            &job.transport,
            &job.namespace,
            &fraud_check_url,
            &job.workers,
            start_on_stdin,
        )
        .await
        {
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
