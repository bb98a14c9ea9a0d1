//! The command line, as clap parses it.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The operator's CLI of an effects service: runs, the outbox, dead letters, blocked inputs,
/// history, pruning.
#[derive(Debug, Parser)]
#[command(name = "effects", version, about, long_about = None)]
pub(crate) struct Cli {
    /// The store: `sqlite:PATH` (the embedded store), or `postgres://USER@HOST:PORT/DATABASE`
    /// (also `postgresql://`) for a PostgreSQL store, in the schema given by `--schema`. The
    /// store must exist: nothing is ever created.
    #[arg(long, env = "EFFECTS_STORE", value_name = "URL", global = true)]
    pub(crate) store: Option<String>,

    /// With a `postgres://` store: the schema the store lives in (the name services and
    /// examples give as their namespace). Ignored for `sqlite:` stores.
    #[arg(
        long,
        env = "EFFECTS_NAMESPACE",
        value_name = "NAME",
        default_value = crate::open::DEFAULT_SCHEMA,
        global = true
    )]
    pub(crate) schema: String,

    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Effect runs: list them, or show one with everything it wrote and sent.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// The outbox: requests and messages not sent yet.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Dead letters: requests, messages and inputs that were given up on, and retrying them.
    ///
    /// On a `postgres://` store, inputs come from the broker (NATS JetStream) and their dead
    /// letters are kept in its stream, not in the store: they are not listed, and retrying an
    /// `input:` id is refused. Requests and messages are listed and retried as on SQLite.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Consumers' inputs: those whose processing keeps failing and holds up their partition
    /// key.
    #[command(subcommand)]
    Inputs(InputsCommand),
    /// An entity's attributes as of a transaction, and their history.
    History(HistoryArgs),
    /// Removes what is old enough: dispatched outbox rows, finished runs, acknowledged log
    /// messages. Never a pending row or a run in progress.
    Prune(PruneArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunsCommand {
    /// A run: status, tx, the datoms it wrote, its requests with their recorded responses, its
    /// messages and whether each was dispatched, and operators' retries.
    Show {
        /// The run's idempotency key (`handler:topic:message-id`, `handler:business-key`, ...).
        key: String,
    },
    /// Runs, newest first.
    List {
        /// Only runs in this state.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Only runs applied since: an age (`30m`, `7d`) or a UTC time (`2026-05-01`,
        /// `2026-05-01T12:00:00Z`).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// A run state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum StatusArg {
    /// Requests or messages still to send.
    Pending,
    /// With a dead-lettered request or message.
    DeadLettered,
    /// Everything dispatched or dead-lettered.
    Done,
}

#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// Rows neither dispatched nor dead-lettered, oldest first, with why each is waiting.
    Pending {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum InputsCommand {
    /// Inputs that have been failing for longer than their worker's `blocked_after` (30 s by
    /// default), each holding up the later inputs of its partition key: which key, since when,
    /// how many attempts, why, and which process holds it. Longest failing first.
    ///
    /// Workers report them on every heartbeat (a third of their visibility), and say so when
    /// none are left; a process found dead takes its reports with it. What a process that is
    /// still alive reported long ago (see the `reported` column) comes from a worker that
    /// stopped while its inputs were failing.
    Blocked {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// Dead letters with their reason: requests and messages of runs, and inputs of consumers.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Sends dead letters again under the same key, and records who asked and why. A request
    /// or message is made pending for the relay; an input is delivered again to its consumer.
    Retry(RetryArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// Dead letter ids, as `dead-letters list` shows them: `key#n`, or `input:SEQUENCE:CONSUMER`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) ids: Vec<String>,
    /// Every dead letter (of `--kind`, if given).
    #[arg(long)]
    pub(crate) all: bool,
    /// With `--all`: only dead letters of this kind.
    #[arg(long, value_enum, requires = "all")]
    pub(crate) kind: Option<KindArg>,
    /// Why: recorded with the retry.
    #[arg(long)]
    pub(crate) reason: String,
    /// Who: recorded with the retry. Default: `$EFFECTS_OPERATOR`, then `$USER`.
    #[arg(long, env = "EFFECTS_OPERATOR")]
    pub(crate) operator: Option<String>,
}

/// A dead letter kind on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum KindArg {
    /// Outbox requests.
    Request,
    /// Outbox messages.
    Message,
    /// Consumers' input messages.
    Input,
}

#[derive(Debug, Args)]
pub(crate) struct HistoryArgs {
    /// The entity's lookup ref, `ATTRIBUTE=VALUE`: `card/id=c1`. VALUE is read as JSON when it
    /// is JSON (`account/number=42` is the number 42; write `account/number='"42"'` for the
    /// string), and as a string otherwise.
    pub(crate) entity: String,
    /// As of this transaction (default: now).
    #[arg(long, value_name = "TX")]
    pub(crate) as_of: Option<i64>,
}

#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// Only count what would be removed.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Dispatched outbox rows of finished runs older than this (`1d`).
    #[arg(long, value_name = "AGE", default_value = "1d")]
    pub(crate) dispatched_older_than: String,
    /// Finished runs older than this (`7d`): after that, their keys can be applied again.
    #[arg(long, value_name = "AGE", default_value = "7d")]
    pub(crate) runs_older_than: String,
    /// Log messages acknowledged by every consumer, older than this (`7d`).
    #[arg(long, value_name = "AGE", default_value = "7d")]
    pub(crate) log_older_than: String,
}
