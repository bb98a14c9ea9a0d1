//! `effects`: the operator's command line for a service built on effects.
//!
//! It works on a store given by URL (`--store`, or the `EFFECTS_STORE` environment variable):
//! `sqlite:PATH` for the embedded SQLite store, `postgres://USER@HOST:PORT/DATABASE` (or
//! `postgresql://`) for a PostgreSQL store, whose schema is `--schema NAME` (or the
//! `EFFECTS_NAMESPACE` environment variable; default `public`). It reads what the service's runs wrote and sent,
//! what is pending in the outbox, what was dead-lettered and why, which inputs keep failing and
//! hold up their partition key, and retries dead letters.
//!
//! ```text
//! effects --store sqlite:cards.db runs list --status pending --since 1h
//! effects --store sqlite:cards.db runs show 'block:card-block-requested:m1'
//! effects --store sqlite:cards.db outbox pending
//! effects --store sqlite:cards.db dead-letters list
//! effects --store sqlite:cards.db dead-letters retry 'input:3:block' --reason "card c2 fixed"
//! effects --store sqlite:cards.db inputs blocked
//! effects --store sqlite:cards.db history card/id=c1 --as-of 2
//! effects --store sqlite:cards.db prune --dry-run
//! effects --store postgres://postgres@127.0.0.1:5432/test --schema cards runs list
//! ```
//!
//! Every command prints aligned tables, or JSON with `--json`. A store that does not exist, a
//! file or schema that is not an effects store, or a PostgreSQL server that does not answer, is
//! an error: the CLI never creates a database or a schema. On PostgreSQL, input dead letters are
//! kept by the broker (the NATS stream), not by the store: `dead-letters` lists requests and
//! messages only, and refuses to retry an `input:` id.

mod cli;
mod commands;
mod open;
mod table;
mod time;
mod view;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::execute(cli)) {
        Ok(out) => {
            print!("{}", out.text);
            if out.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            // Every error of the store and the CLI says its cause in its own message.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
