//! The transfer race: many transfers from one hot account at once, through one worker at
//! concurrency 8 and through two worker processes on one SQLite file. Each handler computes
//! absolute balances from accounts it loaded, so without read validation concurrent runs
//! overwrite each other's balances (a lost update); with it, every balance ends exact.
//!
//! Counted at the source: balances in the store, applied runs per key in its `transactions`
//! table (one row per commit, not the deduplicating `effect_runs`), requests where the
//! fraud-check service received them. The conflict counter must be above zero, or the race did
//! not happen and the test proves nothing. Each race is run once more with read validation
//! switched off (`Mutant::SkipReadValidation`), and then the balances must be wrong: the checks
//! can fail.

use std::path::PathBuf;
use std::time::Duration;

use effects_core::executor::Mutant;
use transfers::job::{self, JobOptions, Report};
use transfers::service::WorkerOptions;
use transfers::workload::HOT;

/// Transfers per race in one process: most from the hot account.
const TRANSFERS: usize = 48;

/// Transfers per race between processes: more, because SQLite does not hand the write lock out
/// fairly between processes (a waiting process polls; the busy one takes the lock again at
/// once), so in a short race the second process may not get a single write in (160 were too few
/// on a loaded machine).
const TRANSFERS_BETWEEN_PROCESSES: usize = 400;

/// The most a race may take, start to finish.
const LIMIT: Duration = Duration::from_secs(120);

/// A database path for one test, removed (with its WAL files) when dropped.
struct TempDatabase(PathBuf);

impl TempDatabase {
    fn new() -> TempDatabase {
        TempDatabase(job::fresh_database_path())
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

fn options(database: &TempDatabase, processes: usize, mutant: Option<Mutant>) -> JobOptions {
    JobOptions {
        transfers: if processes == 0 {
            TRANSFERS
        } else {
            TRANSFERS_BETWEEN_PROCESSES
        },
        processes,
        workers: WorkerOptions {
            concurrency: 8,
            patience: Duration::from_secs(60),
            mutant,
        },
        worker_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_transfers"))),
        ..JobOptions::new(database.0.clone())
    }
}

async fn race(options: JobOptions) -> Report {
    match tokio::time::timeout(LIMIT, job::run(options)).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => panic!("the job failed: {e}"),
        Err(_) => panic!("the race did not finish within {}s", LIMIT.as_secs()),
    }
}

/// Everything a correct race must show.
fn assert_exact(report: &Report) {
    let printed = job::Printout(report).to_string();
    // The race happened: runs were refused because an account changed under them.
    let counts = report.counts();
    assert!(
        counts.conflicts > 0,
        "no conflict: the race did not happen\n{printed}"
    );
    assert_eq!(counts.reruns, counts.conflicts, "{printed}");
    // Final balances exact, and the sum conserved.
    assert_eq!(report.balances, report.expected.balances, "{printed}");
    assert_eq!(report.total(), report.workload.total(), "{printed}");
    assert_eq!(report.held(), 0, "{printed}");
    // Each transfer applied once: one transaction per key, none for anything else.
    assert_eq!(report.not_applied_once(), [], "{printed}");
    let transfer_runs: Vec<u64> = report
        .runs_per_key
        .iter()
        .filter(|(k, _)| k.starts_with("transfer:"))
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(transfer_runs.len(), report.expected.transfers, "{printed}");
    assert!(transfer_runs.iter().all(|n| *n == 1), "{printed}");
    // Each fraud check reached the service once.
    assert_eq!(
        report.received.requests, report.expected.fraud_checks,
        "{printed}"
    );
    assert_eq!(
        report.received.idempotency_keys, report.received.requests,
        "{printed}"
    );
    let failed: Vec<_> = report.checks().into_iter().filter(|c| !c.passed).collect();
    assert_eq!(failed, [], "{printed}");
}

/// What a race without read validation must show: money created or destroyed.
fn assert_lost_updates(report: &Report) {
    let printed = job::Printout(report).to_string();
    assert_eq!(
        report.counts().conflicts,
        0,
        "nothing is validated: no conflict\n{printed}"
    );
    assert_ne!(
        report.balances, report.expected.balances,
        "without read validation the balances must be wrong\n{printed}"
    );
    // The hot account lost updates: it was debited less than it paid.
    assert_ne!(
        report.balances[HOT], report.expected.balances[HOT],
        "{printed}"
    );
    assert!(!report.passed(), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_at_concurrency_8_through_one_worker_end_exact() {
    let database = TempDatabase::new();
    let report = race(options(&database, 0, None)).await;
    assert_exact(&report);
    assert_eq!(report.ran.len(), 1);
    assert_eq!(
        report.ran[0].workers.transfer.applied as usize,
        report.expected.transfers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_from_two_worker_processes_on_one_file_end_exact() {
    let database = TempDatabase::new();
    let report = race(options(&database, 2, None)).await;
    assert_exact(&report);
    assert_eq!(report.ran.len(), 2);
    let printed = job::Printout(&report).to_string();
    for ran in &report.ran {
        assert!(
            ran.workers.transfer.applied > 0,
            "{} applied nothing: the processes did not race\n{printed}",
            ran.label
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_read_validation_one_worker_loses_updates() {
    let database = TempDatabase::new();
    let report = race(options(&database, 0, Some(Mutant::SkipReadValidation))).await;
    assert_lost_updates(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_read_validation_two_worker_processes_lose_updates() {
    let database = TempDatabase::new();
    let report = race(options(&database, 2, Some(Mutant::SkipReadValidation))).await;
    assert_lost_updates(&report);
}
