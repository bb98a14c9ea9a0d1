//! One of two processes running the same keys on one SQLite file
//! (`tests/tests/reliability.rs`, `same_keys_from_two_processes`).
//!
//! `effects-same-key-child --db PATH --keys N [--mutant NAME]` opens the store, prints `READY`,
//! waits for `GO` on stdin (so that both processes start together), then runs the keys
//! `same:0` .. `same:N-1` in order — each one datom and one message on `balances` — printing
//! `K <i> applied|duplicate <tx>` per key (or `ERR <i> <error>`) and finally
//! `DONE applied=<n> duplicates=<n> errors=<n>`. It exits by itself if stdin closes before `GO`
//! or after 120 s.

use std::io::BufRead as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use effects_core::executor::Executor;
use effects_core::store::{SqliteOptions, Synchronous};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use effects_tests::harness::child::{mutant, open_store, say};
use serde_json::json;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(db), Some(keys)) = (arg(&args, "--db"), arg(&args, "--keys")) else {
        eprintln!("usage: effects-same-key-child --db PATH --keys N [--mutant NAME]");
        return ExitCode::from(2);
    };
    let Ok(keys) = keys.parse::<u64>() else {
        eprintln!("`--keys {keys}`: not a number");
        return ExitCode::from(2);
    };
    let broken = match arg(&args, "--mutant") {
        None => None,
        Some(name) => match mutant(&name) {
            Some(m) => Some(m),
            None => {
                eprintln!("unknown mutant `{name}`");
                return ExitCode::from(2);
            }
        },
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
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };
    let store = match open_store(std::path::Path::new(&db), &options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open the store: {e}");
            return ExitCode::from(1);
        }
    };
    let mut builder = Executor::builder(store.clone(), store.log());
    if let Some(m) = broken {
        builder = builder.mutant(m);
    }
    let executor = builder.build();

    say("READY");
    let go = std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .any(|l| l.trim() == "GO");
    if !go {
        eprintln!("stdin closed before GO");
        return ExitCode::from(1);
    }
    let started = Instant::now();
    let (mut applied, mut duplicates, mut errors) = (0u64, 0u64, 0u64);
    runtime.block_on(async {
        for i in 0..keys {
            if started.elapsed() > Duration::from_secs(120) {
                say(&format!("ERR {i} not done after 120 s"));
                errors += 1;
                break;
            }
            let effects = Effects::from(DatomEffect::assert(
                LookupRef::new("account/id", format!("a{i}")),
                [("account/balance", json!(i))],
            ))
            .merge(MessageEffect::new(
                "balances",
                json!({"id": format!("a{i}")}),
            ));
            match executor.run(format!("same:{i}"), effects).await {
                Ok(o) if o.is_duplicate() => {
                    duplicates += 1;
                    say(&format!("K {i} duplicate {}", o.tx()));
                }
                Ok(o) => {
                    applied += 1;
                    say(&format!("K {i} applied {}", o.tx()));
                }
                Err(e) => {
                    errors += 1;
                    say(&format!("ERR {i} {e}"));
                }
            }
        }
    });
    say(&format!(
        "DONE applied={applied} duplicates={duplicates} errors={errors}"
    ));
    ExitCode::SUCCESS
}
