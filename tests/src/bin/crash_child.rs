//! A worker process for the crash tests (`tests/tests/reliability.rs`): see
//! `effects_tests::harness::child` for its arguments and what it prints.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    effects_tests::harness::child::worker_main(&args)
}
