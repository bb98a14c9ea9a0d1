//! The soak at CI size: a few thousand messages through two worker processes that are killed
//! with SIGKILL and restarted every second (every other restart armed to die at a boundary of
//! the executor), 20 % of the messages really redelivered, every figure counted at the source
//! by `effects-soak` (`tests/src/bin/soak.rs`), which exits 0 only if nothing was lost and
//! nothing doubled. The full size is run by hand (RELIABILITY.md):
//! `cargo run --release -p effects-tests --bin effects-soak -- --messages 100000`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use effects_tests::harness::process::ChildProcess;
use support::PrivateDir;

const SOAK: &str = env!("CARGO_BIN_EXE_effects-soak");

/// Runs the soak in a private directory; returns its exit success and its output.
fn soak(name: &str, args: &[&str]) -> (bool, Vec<String>) {
    let dir = PrivateDir::new(name);
    let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    all.extend([
        "--dir".to_owned(),
        dir.join("soak").display().to_string(),
        "--timeout-s".to_owned(),
        "150".to_owned(),
    ]);
    let mut process = ChildProcess::spawn("the soak", &PathBuf::from(SOAK), &all).unwrap();
    let result = process
        .wait_for("RESULT", Duration::from_secs(240))
        .unwrap_or_else(|e| panic!("{e}"));
    let status = process.wait(Duration::from_secs(30)).unwrap();
    let mut lines = process.seen().to_vec();
    lines.push(result);
    for l in &lines {
        println!("{l}");
    }
    (status.success(), lines)
}

/// `name=value` from the soak's `RESULT` line.
fn result(lines: &[String], name: &str) -> String {
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("RESULT"))
        .and_then(|l| {
            l.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        })
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn soak_ci_size() {
    let (ok, lines) = soak(
        "soak",
        &[
            "--messages",
            "6000",
            "--workers",
            "2",
            "--kill-every-ms",
            "1000",
        ],
    );
    assert_eq!(result(&lines, "lost"), "0");
    assert_eq!(result(&lines, "doubled"), "0");
    assert_eq!(result(&lines, "ok"), "true");
    let kills: u64 = result(&lines, "kills").parse().unwrap_or(0);
    assert!(kills >= 3, "workers were killed and restarted: {kills}");
    let redelivered: f64 = result(&lines, "redelivered_pct").parse().unwrap_or(0.0);
    assert!(redelivered >= 20.0, "20 % redelivered: {redelivered}");
    assert!(ok, "the soak exits 0");
}

/// A broken executor (no duplicate check) fails the soak: its figures can fail.
#[test]
fn mutant_skip_duplicate_check_fails_the_soak() {
    let (ok, lines) = soak(
        "soak-mutant",
        &[
            "--messages",
            "400",
            "--workers",
            "2",
            "--kill-every-ms",
            "1000",
            "--mutant",
            "skip-duplicate-check",
        ],
    );
    let doubled: u64 = result(&lines, "doubled").parse().unwrap_or(0);
    assert!(doubled > 0, "the mutant doubles runs");
    assert_eq!(result(&lines, "ok"), "false");
    assert!(!ok, "and the soak exits non-zero");
}
