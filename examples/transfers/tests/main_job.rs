//! The `transfers` binary, run as `cargo run -p transfers` runs it: it exits 0 and prints what
//! happened and that every check holds; it refuses to reuse a database, and says what is wrong
//! with a flag. (The race itself is asserted in detail by `tests/race.rs`.)

use std::path::PathBuf;
use std::process::{Command, Output};

/// A database path for one test, removed (with its WAL files) when dropped.
struct TempDatabase(PathBuf);

impl TempDatabase {
    fn new(name: &str) -> TempDatabase {
        TempDatabase(std::env::temp_dir().join(format!(
            "effects-transfers-main-job-{name}-{}.db",
            std::process::id()
        )))
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

fn transfers(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_transfers"))
        .args(args)
        .env_remove("EFFECTS_STORE")
        .env_remove("EFFECTS_TRANSPORT")
        .env_remove("EFFECTS_NAMESPACE")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn without_arguments_it_runs_on_a_fresh_database_and_every_check_holds() {
    let output = transfers(&[]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stderr}\n{stdout}");
    let database = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Transfers on the embedded default: store and log in "))
        .map(PathBuf::from)
        .unwrap();
    let _cleanup = TempDatabase(database.clone());
    assert!(database.exists(), "{}", database.display());
    for section in [
        "Fraud-check service on http://127.0.0.1:",
        "104 transfers (103 distinct) through the `transfer` and `settle` workers of this process, 8 at a time each",
        "\nBalances\n",
        "\nTransfers (as recorded in the store)\n",
        "  x-overdraft refused: insufficient funds: low holds 50 and would pay 500\n",
        "  t0032 reversed: payee mule is on the watch list\n",
        "\nDead-lettered (acknowledged, never retried)\n  transfer m0102: an account [account/id \"ghost\"] was not found\n",
        "\nWorkers (shut down gracefully once every transfer was handled)\n",
        "\nFraud checks (counted at the service)\n  6 requests received, 6 distinct idempotency keys, 0 without one; 6 verdicts published on `fraud-checked`\n",
        "  ok     money is conserved: ",
        "  ok     every balance is exact: ",
        "  ok     every run applied once: 108 keys with one transaction each, and the seed\n",
        "  ok     the re-sent transfer was a duplicate: duplicate deliveries absorbed: 1\n",
    ] {
        assert!(stdout.contains(section), "missing {section:?} in\n{stdout}");
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");
}

#[test]
fn with_a_store_it_writes_there_and_refuses_to_reuse_it() {
    let database = TempDatabase::new("store");
    let store = format!("sqlite:{}", database.0.display());
    let first = transfers(&["--store", &store, "--transfers", "20"]);
    let stdout = text(&first.stdout);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        stdout.contains(&database.0.display().to_string()),
        "{stdout}"
    );
    assert!(stdout.contains("24 transfers (23 distinct)"), "{stdout}");
    assert!(database.0.exists());

    let second = transfers(&["--store", &store]);
    assert_eq!(second.status.code(), Some(1));
    let stderr = text(&second.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(second.stdout.is_empty());
}

#[test]
fn worker_processes_share_the_file() {
    let output = transfers(&["--processes", "2", "--transfers", "24"]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stderr}\n{stdout}");
    let _cleanup = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Transfers on the embedded default: store and log in "))
        .map(|path| TempDatabase(PathBuf::from(path)));
    assert!(
        stdout.contains("through 2 worker processes on the same file"),
        "{stdout}"
    );
    assert!(stdout.contains("  process 1  transfer  "), "{stdout}");
    assert!(stdout.contains("  process 2  transfer  "), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
}

#[test]
fn flags_it_cannot_use_are_usage_errors() {
    for (args, message) in [
        (
            &["--store", "postgres://127.0.0.1/test"][..],
            "error: a PostgreSQL store needs --transport nats://HOST:PORT (or EFFECTS_TRANSPORT)",
        ),
        (
            &[
                "--store",
                "sqlite:/tmp/a.db",
                "--transport",
                "nats://127.0.0.1:4222",
            ][..],
            "error: --transport `nats://127.0.0.1:4222`: NATS goes with the PostgreSQL store",
        ),
        (
            &["--store", "mysql://127.0.0.1/test"][..],
            "error: --store `mysql://127.0.0.1/test`: is not a store URL this example knows",
        ),
        (
            &["--namespace", "Bad-Name"][..],
            "error: --namespace `Bad-Name`: use lower-case letters",
        ),
        (
            &[
                "--store",
                "sqlite:/tmp/a.db",
                "--transport",
                "sqlite:/tmp/b.db",
            ][..],
            "error: --transport `sqlite:/tmp/b.db`: the embedded log lives in the store's file",
        ),
        (
            &["--transfers", "0"][..],
            "error: --transfers takes a whole number of at least 1, not `0`",
        ),
        (&["--processes"][..], "error: --processes needs a value"),
        (
            &["--frobnicate", "1"][..],
            "error: unknown argument `--frobnicate`",
        ),
        (
            &["worker", "--store", "sqlite:/tmp/x.db"][..],
            "error: worker needs --fraud-check URL",
        ),
        (
            &["worker", "--fraud-check", "http://127.0.0.1:1"][..],
            "error: worker needs --store URL (or EFFECTS_STORE)",
        ),
    ] {
        let output = transfers(args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("usage: transfers"), "{stderr}");
        assert!(stderr.starts_with(message), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty());
    }
    let help = transfers(&["--help"]);
    assert!(help.status.success());
    assert!(text(&help.stdout).starts_with("usage: transfers"));
}

/// Without the server features, server URLs are refused with the command that builds them.
#[cfg(not(all(feature = "postgres", feature = "nats")))]
#[test]
fn server_urls_need_the_server_features() {
    let output = transfers(&[
        "--store",
        "postgres://postgres@127.0.0.1:1/test",
        "--transport",
        "nats://127.0.0.1:1",
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("build the example with `--features postgres,nats`"),
        "{stderr}"
    );
}
