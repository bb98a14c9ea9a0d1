//! The job on the servers (features `postgres` and `nats`): PostgreSQL at 127.0.0.1:5432 (user
//! postgres, trust; or `EFFECTS_TEST_POSTGRES_URL`) and NATS with JetStream at 127.0.0.1:4222
//! (or `EFFECTS_NATS_URL`), each run in a schema and a stream of its own, removed afterwards.
//!
//! Two worker processes race for one hot account. Counted at the source: balances in the store,
//! committed transactions per key (the `transactions` table), fraud checks where the service
//! received them. Run once more without read validation (`Mutant::SkipReadValidation`): then
//! the balances must be wrong, so the checks can fail.
//!
//! `cargo test -p transfers --features postgres,nats --test servers`

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use effects_core::executor::Mutant;
use transfers::backend::{Namespace, StoreUrl, TransportUrl};
use transfers::job::{self, JobOptions, Report};
use transfers::service::WorkerOptions;
use transfers::workload::HOT;

fn store_url() -> String {
    std::env::var("EFFECTS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn nats_url() -> String {
    std::env::var("EFFECTS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Fails the test saying which server is missing and how to start it.
fn servers_or_explain() {
    for (name, port, start) in [
        (
            "PostgreSQL",
            5432,
            "pg_ctlcluster --skip-systemctl-redirect 15 main start",
        ),
        (
            "NATS with JetStream",
            4222,
            "nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server &",
        ),
    ] {
        if std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )
        .is_err()
        {
            panic!(
                "this test needs {name} on 127.0.0.1:{port}; start it with `{start}`, or run the \
                 tests without the `postgres` and `nats` features"
            );
        }
    }
}

/// A namespace removed (schema dropped, stream deleted) when dropped.
struct Cleanup(Namespace);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let namespace = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    transfers::servers::remove(&store_url(), &nats_url(), &namespace),
                )
                .await;
            });
        })
        .join();
    }
}

fn options(name: &str, mutant: Option<Mutant>) -> (JobOptions, Cleanup) {
    servers_or_explain();
    let namespace = Namespace::fresh(name);
    let options = JobOptions {
        transfers: 60,
        processes: 2,
        namespace: namespace.clone(),
        workers: WorkerOptions {
            concurrency: 8,
            patience: Duration::from_secs(90),
            mutant,
        },
        worker_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_transfers"))),
        ..JobOptions::on(
            StoreUrl::Postgres(store_url()),
            TransportUrl::Nats(nats_url()),
        )
    };
    (options, Cleanup(namespace))
}

async fn run(options: JobOptions) -> Report {
    match tokio::time::timeout(Duration::from_secs(150), job::run(options)).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => panic!("the job failed: {e}"),
        Err(_) => panic!("the job did not finish within 150 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_on_postgres_and_nats_end_exact() {
    let (options, _cleanup) = options("transfers_exact", None);
    let report = run(options).await;
    let printed = job::Printout(&report).to_string();
    println!("{printed}");
    assert!(
        printed.starts_with("Transfers on PostgreSQL and NATS"),
        "{printed}"
    );
    assert_eq!(report.ran.len(), 2, "{printed}");
    assert!(
        report.ran.iter().all(|r| r.workers.transfer.applied > 0),
        "both processes applied transfers\n{printed}"
    );
    // Balances explained by the workload, money conserved, nothing held.
    assert_eq!(report.balances, report.expected.balances, "{printed}");
    assert_eq!(report.total(), report.workload.total(), "{printed}");
    assert_eq!(report.held(), 0, "{printed}");
    // Each run applied once: one committed transaction per key, nothing else.
    assert_eq!(report.not_applied_once(), [], "{printed}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_read_validation_loses_updates_on_the_servers() {
    let (options, _cleanup) = options("transfers_mutant", Some(Mutant::SkipReadValidation));
    let report = run(options).await;
    let printed = job::Printout(&report).to_string();
    assert_eq!(report.counts().conflicts, 0, "{printed}");
    assert_ne!(
        report.balances[HOT], report.expected.balances[HOT],
        "without read validation the hot account's balance must be wrong\n{printed}"
    );
    assert!(!report.passed(), "{printed}");
}

/// The binary itself, given the servers through the environment, as the README shows.
#[test]
fn the_binary_runs_on_the_servers_from_the_environment() {
    servers_or_explain();
    let namespace = Namespace::fresh("transfers_bin");
    let _cleanup = Cleanup(namespace.clone());
    let output = Command::new(env!("CARGO_BIN_EXE_transfers"))
        .args(["--processes", "2", "--transfers", "30"])
        .env("EFFECTS_STORE", store_url())
        .env("EFFECTS_TRANSPORT", nats_url())
        .env("EFFECTS_NAMESPACE", namespace.as_str())
        .output()
        .expect("run transfers");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}\n{stdout}");
    assert!(
        stdout.contains(&format!(
            "(schema {namespace}), messages on NATS stream {namespace}"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("through 2 worker processes on the same servers"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  ok     every run applied once"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
}
