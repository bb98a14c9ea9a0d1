//! The card job on the servers (features `postgres` and `nats`): PostgreSQL at 127.0.0.1:5432
//! (user postgres, trust; or `EFFECTS_TEST_POSTGRES_URL`) and NATS with JetStream at
//! 127.0.0.1:4222 (or `EFFECTS_NATS_URL`), each run in a schema and a stream of its own,
//! removed afterwards; the workers in two worker processes.
//!
//! Counted at the source: committed transactions per key (the `transactions` table), the runs
//! that blocked each card (the datom history). The same run with every run keyed apart
//! (`Mutant::SkipDuplicateCheck`) applies the redelivered request again, and the check fails.
//!
//! `cargo test -p cards --features postgres,nats --test servers`

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cards::servers::{self, ServersOptions, ServersReport};
use effects_core::executor::Mutant;

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
struct Cleanup(String);

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
                    servers::remove(&store_url(), &nats_url(), &namespace),
                )
                .await;
            });
        })
        .join();
    }
}

async fn run(mutant: Option<Mutant>) -> (ServersReport, Cleanup) {
    servers_or_explain();
    let namespace = servers::fresh_namespace();
    let cleanup = Cleanup(namespace.clone());
    let options = ServersOptions {
        store_url: store_url(),
        nats_url: nats_url(),
        namespace,
        processes: 2,
        program: Some(PathBuf::from(env!("CARGO_BIN_EXE_cards"))),
        mutant,
    };
    match tokio::time::timeout(Duration::from_secs(90), servers::run(options)).await {
        Ok(Ok(report)) => (report, cleanup),
        Ok(Err(e)) => panic!("the job failed: {e}"),
        Err(_) => panic!("the job did not finish within 90 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_apply_each_request_once_and_block_each_card_once() {
    let (report, _cleanup) = run(None).await;
    let printed = report.to_string();
    println!("{printed}");
    // One committed transaction per key: the seed, m1, m2 (Empty), m4 and n1; none for m3.
    let expected = ServersReport::expected_keys();
    assert_eq!(
        report.runs_per_key.keys().collect::<Vec<_>>(),
        {
            let mut keys: Vec<&String> = expected.iter().collect();
            keys.sort();
            keys
        },
        "{printed}"
    );
    assert!(report.runs_per_key.values().all(|n| *n == 1), "{printed}");
    // Each card blocked by exactly one run: c1 by m1, c2 by m4, c4 by n1; c3 was blocked.
    let blocked: Vec<(&str, Vec<&str>)> = report
        .blocked_by
        .iter()
        .map(|(card, runs)| (card.as_str(), runs.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        blocked,
        [
            ("c1", vec!["block:card-block-requested:m1"]),
            ("c2", vec!["block:card-block-requested:m4"]),
            ("c4", vec!["block_all:customer-cards-block-requested:n1"]),
        ],
        "{printed}"
    );
    assert!(report.cards.iter().all(|c| !c.can_block()), "{printed}");
    // m1's redelivery (its first acknowledgement lost) was absorbed as a duplicate.
    assert!(report.duplicates() >= 1, "{printed}");
    assert_eq!(
        report.workers.len(),
        4,
        "two workers in each process\n{printed}"
    );
    let failed: Vec<_> = report.checks().into_iter().filter(|c| !c.1).collect();
    assert_eq!(failed, [], "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_duplicate_check_applies_the_redelivery_again() {
    let (report, _cleanup) = run(Some(Mutant::SkipDuplicateCheck)).await;
    let printed = report.to_string();
    let m1: Vec<_> = report
        .runs_per_key
        .keys()
        .filter(|k| k.starts_with("block:card-block-requested:m1"))
        .collect();
    assert!(
        m1.len() >= 2,
        "m1 applied once more under a key of its own\n{printed}"
    );
    let failed: Vec<&str> = report
        .checks()
        .into_iter()
        .filter(|c| !c.1)
        .map(|c| c.0)
        .collect();
    assert!(failed.contains(&"every request applied once"), "{printed}");
}

/// The binary itself, on the servers given in the environment, as the README shows.
#[test]
fn the_binary_runs_on_the_servers_with_two_processes() {
    servers_or_explain();
    let namespace = servers::fresh_namespace();
    let _cleanup = Cleanup(namespace.clone());
    let output = Command::new(env!("CARGO_BIN_EXE_cards"))
        .args(["--processes", "2"])
        .env("EFFECTS_STORE", store_url())
        .env("EFFECTS_TRANSPORT", nats_url())
        .env("EFFECTS_NAMESPACE", &namespace)
        .output()
        .expect("run cards");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}\n{stdout}");
    assert!(
        stdout.contains("Workers `block` and `block_all` in 2 worker processes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  ok     every card blocked once"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
}
