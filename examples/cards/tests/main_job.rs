//! The `cards` binary, run as `cargo run -p cards` runs it: it exits 0 and prints what happened;
//! it refuses to reuse a database. (The job's outcome is asserted in detail by the unit tests in
//! `src/main.rs`.)

use std::path::PathBuf;
use std::process::Command;

/// A database path for one test, removed (with its WAL files) when dropped.
struct TempDatabase(PathBuf);

impl TempDatabase {
    fn new(name: &str) -> TempDatabase {
        TempDatabase(std::env::temp_dir().join(format!(
            "effects-cards-main-job-{name}-{}.db",
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

#[test]
fn without_arguments_it_runs_on_a_fresh_database_and_exits_0() {
    let output = Command::new(env!("CARGO_BIN_EXE_cards")).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stderr}\n{stdout}");
    let database = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Cards on the embedded default: store and log in "))
        .map(PathBuf::from)
        .unwrap();
    let _cleanup = TempDatabase(database.clone());
    assert!(database.exists(), "{}", database.display());
    for section in [
        "Applied (in tx order)",
        "Duplicates (nothing applied again)",
        "Dead-lettered (acknowledged, never retried)",
        "Workers (shut down gracefully)",
        "Datoms (the store's history)",
        "Messages published by the runs (the log)",
    ] {
        assert!(stdout.contains(section), "missing {section:?} in\n{stdout}");
    }
}

#[test]
fn with_a_path_it_writes_there_and_refuses_to_reuse_it() {
    let database = TempDatabase::new("path");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_cards"))
            .arg(&database.0)
            .output()
            .unwrap()
    };

    let first = run();
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        stdout.contains(&database.0.display().to_string()),
        "{stdout}"
    );
    assert!(
        stdout.contains("  block:card-block-requested:m1  2            m1  2\n"),
        "one duplicate, of tx 2:\n{stdout}"
    );
    assert!(database.0.exists());

    let second = run();
    assert!(!second.status.success());
    let stderr = String::from_utf8(second.stderr).unwrap();
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(second.stdout.is_empty());
}
