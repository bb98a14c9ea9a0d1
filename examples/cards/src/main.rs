//! The card-blocking service end to end on the embedded default: one SQLite file holds the store
//! and the log, and no server runs.
//!
//! ```text
//! cargo run -p cards               # a fresh database in the temporary directory
//! cargo run -p cards -- cards.db   # or at a path that does not exist yet
//! cargo run -p cards -- describe --format mermaid|json   # the handler catalogue
//! cargo run -p cards --features postgres,nats -- --store postgres://postgres@127.0.0.1/test \
//!     --transport nats://127.0.0.1:4222 --processes 2     # on the servers, two worker processes
//! ```
//!
//! It seeds a customer and her cards, feeds block requests to the `block` and `block_all`
//! workers through the log — one delivered twice, one malformed, one for a card that is blocked
//! already — shuts the workers down, and prints what was applied, what was a duplicate, what was
//! dead-lettered, the datom history and the messages the runs published. See [`cards::job`].

use std::error::Error;
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use effects_core::transport::HEADER_TX;
use effects_core::worker::Processed;

use cards::job::{BLOCK_ALL_REQUEST, BLOCK_REQUESTS, Report, Target};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cards [DATABASE]
       cards [--store URL] [--transport URL] [--namespace NAME] [--processes N]
       cards worker [--store URL] [--transport URL] [--namespace NAME]
       cards describe [--format mermaid|json]

  DATABASE      a SQLite file that does not exist yet (default: a new one in the temporary
                directory); the same as --store sqlite:DATABASE
  --store       the store (or EFFECTS_STORE): `sqlite:PATH`, or `postgres://USER@HOST:PORT/DB`
                (built with --features postgres,nats)
  --transport   with a PostgreSQL store, `nats://HOST:PORT` (or EFFECTS_TRANSPORT)
  --namespace   on the servers, the schema and the NATS stream of this run (or
                EFFECTS_NAMESPACE; default: a fresh `cards_<pid>_<time>_<n>`)
  --processes   on the servers, run the workers in N separate processes (default: in this one)
  worker        run the `block` and `block_all` workers on a running job's servers until told to
                stop on stdin (what --processes starts)";

/// What the command line asks for.
enum Mode {
    Embedded(PathBuf),
    Servers {
        store: String,
        transport: String,
        namespace: Option<String>,
        processes: usize,
    },
    Worker {
        store: String,
        transport: String,
        namespace: String,
        mutant: Option<String>,
    },
}

/// A flag's value, or else the environment variable's (unset or empty: none).
fn or_env(flag: Option<String>, var: &str) -> Option<String> {
    flag.or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let worker = args.first().is_some_and(|a| a == "worker");
    let mut rest = args.iter().skip(usize::from(worker));
    let (mut store, mut transport, mut namespace, mut database) = (None, None, None, None);
    let mut processes = 0;
    let mut mutant = None;
    while let Some(arg) = rest.next() {
        if !arg.starts_with("--") {
            if worker || database.is_some() {
                return Err(format!("unexpected argument `{arg}`"));
            }
            database = Some(arg.clone());
            continue;
        }
        let value = rest.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--store" => store = Some(value.clone()),
            "--transport" => transport = Some(value.clone()),
            "--namespace" => namespace = Some(value.clone()),
            // Testing only: a worker process with a deliberately broken executor.
            "--mutant" if worker => mutant = Some(value.clone()),
            "--processes" if !worker => {
                processes = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        format!("--processes takes a whole number of at least 1, not `{value}`")
                    })?;
            }
            _ => return Err(format!("unknown argument `{arg}`")),
        }
    }
    if let Some(path) = database {
        if store.is_some() {
            return Err("give a DATABASE or --store, not both".to_owned());
        }
        store = Some(format!("sqlite:{path}"));
    }
    let store = or_env(store, cards::STORE_ENV);
    let transport = or_env(transport, cards::TRANSPORT_ENV);
    let namespace = or_env(namespace, cards::NAMESPACE_ENV);
    let servers = |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
    match store {
        Some(url) if servers(&url) => {
            let transport = transport
                .filter(|t| t.starts_with("nats://") || t.starts_with("tls://"))
                .ok_or_else(|| {
                    "a PostgreSQL store needs --transport nats://HOST:PORT (or EFFECTS_TRANSPORT)"
                        .to_owned()
                })?;
            if worker {
                let namespace = namespace.ok_or_else(|| {
                    format!(
                        "worker needs --namespace NAME (or {})",
                        cards::NAMESPACE_ENV
                    )
                })?;
                return Ok(Mode::Worker {
                    store: url,
                    transport,
                    namespace,
                    mutant,
                });
            }
            Ok(Mode::Servers {
                store: url,
                transport,
                namespace,
                processes,
            })
        }
        _ if worker => Err(
            "worker runs on the servers: give --store postgres://.. and --transport nats://.."
                .to_owned(),
        ),
        Some(url) => {
            let path = url
                .strip_prefix("sqlite:")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    format!(
                        "--store `{url}`: use `sqlite:PATH`, or `postgres://USER@HOST:PORT/DB` \
                         with --transport nats://HOST:PORT"
                    )
                })?;
            embedded(PathBuf::from(path), transport.as_deref(), processes)
        }
        None => embedded(
            cards::job::fresh_database_path(),
            transport.as_deref(),
            processes,
        ),
    }
}

/// The embedded default: the store's own log, in this process.
fn embedded(path: PathBuf, transport: Option<&str>, processes: usize) -> Result<Mode, String> {
    if let Some(t) = transport {
        if t != format!("sqlite:{}", path.display()) {
            return Err(format!(
                "--transport `{t}`: the embedded store publishes to its own log; leave \
                 --transport out, or give --store postgres://.. with --transport nats://.."
            ));
        }
    }
    if processes > 0 {
        return Err(
            "--processes runs the workers on the servers: give --store postgres://.. and \
             --transport nats://.."
                .to_owned(),
        );
    }
    Ok(Mode::Embedded(path))
}

fn run() -> Result<(), Box<dyn Error + Send + Sync>> {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "describe") {
        let rest: Vec<String> = args
            .skip(1)
            .map(|a| a.into_string().map_err(|_| "arguments must be UTF-8"))
            .collect::<Result<_, _>>()?;
        print!("{}", describe(&rest)?);
        return Ok(());
    }
    let args: Vec<String> = args
        .map(|a| a.into_string().map_err(|_| "arguments must be UTF-8"))
        .collect::<Result<_, _>>()?;
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let mode = parse(&args).map_err(|e| format!("{e}\n\n{USAGE}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match mode {
        Mode::Embedded(database) => {
            let report = runtime.block_on(cards::job::run(&database))?;
            print!("{}", Printout(&report));
            Ok(())
        }
        Mode::Servers {
            store,
            transport,
            namespace,
            processes,
        } => runtime.block_on(servers(store, transport, namespace, processes)),
        Mode::Worker {
            store,
            transport,
            namespace,
            mutant,
        } => runtime.block_on(worker(store, transport, namespace, mutant)),
    }
}

#[cfg(all(feature = "postgres", feature = "nats"))]
async fn servers(
    store: String,
    transport: String,
    namespace: Option<String>,
    processes: usize,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    use cards::servers::{self, ServersOptions};
    let namespace = namespace.unwrap_or_else(servers::fresh_namespace);
    servers::check_namespace(&namespace)?;
    let program = if processes > 0 {
        Some(std::env::current_exe()?)
    } else {
        None
    };
    let report = servers::run(ServersOptions {
        store_url: store,
        nats_url: transport,
        namespace,
        processes,
        program,
        mutant: None,
    })
    .await?;
    print!("{report}");
    let failed = report.checks().iter().filter(|c| !c.1).count();
    if failed > 0 {
        return Err(format!("{failed} check(s) failed").into());
    }
    Ok(())
}

#[cfg(all(feature = "postgres", feature = "nats"))]
async fn worker(
    store: String,
    transport: String,
    namespace: String,
    mutant: Option<String>,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let mutant = match mutant {
        Some(name) => Some(
            effects_core::executor::Mutant::from_name(&name)
                .ok_or_else(|| format!("unknown mutant `{name}`"))?,
        ),
        None => None,
    };
    let line = cards::servers::work(&store, &transport, &namespace, mutant).await?;
    println!("{line}");
    Ok(())
}

/// What a build without the server backends says when asked to use them.
#[cfg(not(all(feature = "postgres", feature = "nats")))]
const NO_SERVERS: &str = "this build has no PostgreSQL store or NATS transport: build the \
     example with `--features postgres,nats` (`cargo run -p cards --features postgres,nats -- \
     --store postgres://.. --transport nats://..`)";

#[cfg(not(all(feature = "postgres", feature = "nats")))]
async fn servers(
    _: String,
    _: String,
    _: Option<String>,
    _: usize,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    Err(NO_SERVERS.into())
}

#[cfg(not(all(feature = "postgres", feature = "nats")))]
async fn worker(
    _: String,
    _: String,
    _: String,
    _: Option<String>,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    Err(NO_SERVERS.into())
}

/// `describe [--format mermaid|json]`: the handler catalogue, as a Mermaid diagram (the
/// default) or as JSON Schema.
fn describe(args: &[String]) -> Result<String, Box<dyn Error + Send + Sync>> {
    const USAGE: &str = "usage: cards describe [--format mermaid|json]";
    let format = match args {
        [] => "mermaid",
        [flag, format] if flag == "--format" => format.as_str(),
        [flag] if flag.starts_with("--format=") => &flag["--format=".len()..],
        _ => return Err(USAGE.into()),
    };
    let catalogue = cards::catalogue();
    match format {
        "mermaid" => Ok(catalogue.to_mermaid()),
        "json" => Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&catalogue.to_json())?
        )),
        other => Err(format!("unknown format `{other}`: {USAGE}").into()),
    }
}

/// The report as aligned plain text.
struct Printout<'a>(&'a Report);

impl fmt::Display for Printout<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report = self.0;
        writeln!(
            f,
            "Cards on the embedded default: store and log in {}",
            report.database.display()
        )?;
        writeln!(
            f,
            "Seed: run `{}` applied in tx {} ({} datoms)\n",
            report.seed.key, report.seed.tx, report.seed.datoms
        )?;

        writeln!(f, "Requests published to the log")?;
        let requests = BLOCK_REQUESTS.iter().chain([&BLOCK_ALL_REQUEST]).map(|r| {
            let handler = match r.target {
                Target::Block => "block",
                Target::BlockAll => "block_all",
            };
            vec![
                r.message_id.to_owned(),
                handler.to_owned(),
                r.payload.to_owned(),
                r.purpose.to_owned(),
            ]
        });
        writeln!(
            f,
            "{}",
            table(&["id", "for", "payload", "what it shows"], requests)
        )?;

        writeln!(f, "Applied (in tx order)")?;
        let applied = report.runs.iter().map(|run| {
            let note = if run.datoms == 0 && run.messages == 0 {
                "nothing to do: Empty"
            } else {
                ""
            };
            vec![
                run.key.clone(),
                run.tx.to_string(),
                run.datoms.to_string(),
                run.messages.to_string(),
                note.to_owned(),
            ]
        });
        writeln!(
            f,
            "{}",
            table(&["key", "tx", "datoms", "messages", ""], applied)
        )?;

        writeln!(f, "Duplicates (nothing applied again)")?;
        let duplicates = report.duplicates().map(|(d, tx)| {
            vec![
                d.key.clone(),
                tx.to_string(),
                d.message_id.clone(),
                d.delivery.to_string(),
            ]
        });
        writeln!(
            f,
            "{}",
            table(&["key", "original tx", "id", "delivery"], duplicates)
        )?;

        writeln!(f, "Dead-lettered (acknowledged, never retried)")?;
        let dead = report.dead_letters.iter().map(|d| {
            vec![
                d.message_id.clone(),
                d.consumer.clone(),
                String::from_utf8_lossy(&d.payload).into_owned(),
                d.reason.clone(),
            ]
        });
        writeln!(
            f,
            "{}",
            table(&["id", "consumer", "payload", "reason"], dead)
        )?;

        writeln!(f, "Deliveries (in the order the workers finished them)")?;
        let deliveries = report.deliveries.iter().map(|d| {
            let outcome = match &d.processed {
                Processed::Applied { tx } => format!("applied in tx {tx}"),
                Processed::Duplicate { tx } => format!("duplicate of tx {tx}"),
                Processed::DeadLettered { .. } => "dead-lettered".to_owned(),
                Processed::Retry { error, .. } => format!("given back: {error}"),
            };
            vec![
                d.message_id.clone(),
                d.handler.to_owned(),
                d.delivery.to_string(),
                outcome,
            ]
        });
        writeln!(
            f,
            "{}",
            table(&["id", "worker", "delivery", "outcome"], deliveries)
        )?;

        writeln!(f, "Workers (shut down gracefully)")?;
        let workers = report.workers.iter().map(|(name, r)| {
            vec![
                (*name).to_owned(),
                r.deliveries.to_string(),
                r.applied.to_string(),
                r.duplicates.to_string(),
                r.dead_lettered.to_string(),
                r.retried.to_string(),
                r.transport_errors.to_string(),
            ]
        });
        let header = [
            "worker",
            "deliveries",
            "applied",
            "duplicates",
            "dead-lettered",
            "retried",
            "transport errors",
        ];
        writeln!(f, "{}", table(&header, workers))?;

        writeln!(f, "Datoms (the store's history)")?;
        let datoms = report.history.iter().map(|d| {
            vec![
                d.tx.to_string(),
                d.run_key.clone(),
                d.entity.to_string(),
                d.attribute.clone(),
                format!("{:?}", d.op).to_lowercase(),
                d.value.to_string(),
            ]
        });
        writeln!(
            f,
            "{}",
            table(&["tx", "run", "entity", "attribute", "op", "value"], datoms)
        )?;

        writeln!(f, "Messages published by the runs (the log)")?;
        let published = report.published.iter().map(|m| {
            vec![
                m.sequence.to_string(),
                m.topic.clone(),
                m.partition_key.clone().unwrap_or_default(),
                m.message_id.clone(),
                m.headers.get(HEADER_TX).cloned().unwrap_or_default(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            ]
        });
        writeln!(
            f,
            "{}",
            table(
                &["seq", "topic", "key", "message id", "tx", "payload"],
                published
            )
        )?;

        writeln!(f, "Cards now")?;
        let cards = report.cards.iter().map(|(card, tx)| {
            vec![
                card.id.clone(),
                card.customer_id.clone(),
                format!("{:?}", card.status).to_lowercase(),
                tx.to_string(),
            ]
        });
        write!(
            f,
            "{}",
            table(&["card", "customer", "status", "last changed in tx"], cards)
        )
    }
}

/// Rows under a header, each column as wide as its widest cell, indented by two spaces; the last
/// column is not padded. An empty table says `(none)`.
fn table<I>(header: &[&str], rows: I) -> String
where
    I: IntoIterator<Item = Vec<String>>,
{
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    if rows.is_empty() {
        return "  (none)\n".to_owned();
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut widths = vec![0; header.len()];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut text = String::from(" ");
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            text.push(' ');
            text.push_str(cell);
            if i + 1 < row.len() {
                let pad = width - cell.chars().count();
                text.extend(std::iter::repeat_n(' ', pad + 1));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use effects_core::Op;
    use effects_core::store::Tx;
    use effects_core::transport::HEADER_TX;
    use effects_core::worker::Processed;
    use serde_json::json;

    use super::Printout;
    use cards::job::{self, AppliedRun};

    /// A database path for one test, removed (with its WAL files) when dropped.
    struct TempDatabase(PathBuf);

    impl TempDatabase {
        fn new() -> TempDatabase {
            TempDatabase(job::fresh_database_path())
        }

        fn path(&self) -> &Path {
            &self.0
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

    fn applied(key: &str, tx: i64, datoms: usize, messages: usize) -> AppliedRun {
        AppliedRun {
            key: key.to_owned(),
            tx: Tx(tx),
            datoms,
            messages,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_main_job_applies_every_request_once_and_reports_what_happened() {
        let database = TempDatabase::new();
        let report = job::run(database.path()).await.unwrap();

        // The seed is a run of its own: the customer's two attributes and two per card.
        assert_eq!(report.seed, applied(job::SEED_KEY, 1, 10, 0));

        // m1, m2 (Empty), m4 and n1 applied, once each; m3 never ran.
        assert_eq!(
            report.runs,
            [
                applied("block:card-block-requested:m1", 2, 2, 1),
                applied("block:card-block-requested:m2", 3, 0, 0),
                applied("block:card-block-requested:m4", 4, 2, 1),
                applied("block_all:customer-cards-block-requested:n1", 5, 2, 2),
            ]
        );

        // m1 came back after its acknowledgement was lost: a duplicate of its first run.
        let duplicates: Vec<_> = report
            .duplicates()
            .map(|(d, tx)| (d.key.as_str(), tx, d.delivery))
            .collect();
        assert_eq!(duplicates, [("block:card-block-requested:m1", Tx(2), 2)]);

        // The malformed payload is dead-lettered with its reason, and acknowledged.
        assert_eq!(report.dead_letters.len(), 1);
        let dead = &report.dead_letters[0];
        assert_eq!(
            (dead.message_id.as_str(), dead.consumer.as_str()),
            ("m3", "block")
        );
        assert_eq!(
            dead.reason,
            "`block` cannot decode its input `BlockRequest`: expected value at line 1 column 13"
        );
        let dead_lettered: Vec<_> = report
            .deliveries
            .iter()
            .filter_map(|d| match &d.processed {
                Processed::DeadLettered { reason } => Some((d.message_id.as_str(), reason)),
                _ => None,
            })
            .collect();
        assert_eq!(dead_lettered, [("m3", &dead.reason)]);

        // Both workers stopped with nothing left to retry; the only transport error is the
        // acknowledgement that was lost on purpose.
        let counts: Vec<_> = report
            .workers
            .iter()
            .map(|(name, r)| {
                (
                    *name,
                    r.deliveries,
                    r.applied,
                    r.duplicates,
                    r.dead_lettered,
                    r.retried,
                    r.transport_errors,
                )
            })
            .collect();
        assert_eq!(
            counts,
            [("block", 5, 3, 1, 1, 0, 1), ("block_all", 1, 1, 0, 0, 0, 0)]
        );

        // The history: the seed's 10 datoms, then a retraction of "active" and an assertion of
        // "blocked" for c1, c2 and c4 — nothing twice, nothing for c3.
        assert_eq!(report.history.len(), 16);
        let changes: Vec<_> = report
            .history
            .iter()
            .skip(10)
            .map(|d| {
                (
                    d.tx.0,
                    d.entity.value.clone(),
                    d.attribute.as_str(),
                    d.op,
                    d.value.clone(),
                )
            })
            .collect();
        let change =
            |tx, card: &str, op, status: &str| (tx, json!(card), "card/status", op, json!(status));
        assert_eq!(
            changes,
            [
                change(2, "c1", Op::Retract, "active"),
                change(2, "c1", Op::Assert, "blocked"),
                change(4, "c2", Op::Retract, "active"),
                change(4, "c2", Op::Assert, "blocked"),
                change(5, "c4", Op::Retract, "active"),
                change(5, "c4", Op::Assert, "blocked"),
            ]
        );

        // What the runs published, in the log: one status change per blocked card and one
        // notification, each with its run's tx.
        let published: Vec<_> = report
            .published
            .iter()
            .map(|m| {
                (
                    m.topic.as_str(),
                    m.partition_key.as_deref(),
                    m.message_id.as_str(),
                    m.headers[HEADER_TX].as_str(),
                    serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap(),
                )
            })
            .collect();
        let status =
            |card: &str| json!({"card_id": card, "customer_id": "u1", "status": "blocked"});
        assert_eq!(
            published,
            [
                (
                    "card-status-changed",
                    Some("c1"),
                    "block:card-block-requested:m1#0",
                    "2",
                    status("c1")
                ),
                (
                    "card-status-changed",
                    Some("c2"),
                    "block:card-block-requested:m4#0",
                    "4",
                    status("c2")
                ),
                (
                    "card-status-changed",
                    Some("c4"),
                    "block_all:customer-cards-block-requested:n1#0",
                    "5",
                    status("c4")
                ),
                (
                    "cards-blocked-notify",
                    Some("u1"),
                    "block_all:customer-cards-block-requested:n1#1",
                    "5",
                    json!({"customer_id": "u1", "name": "Ana"})
                ),
            ]
        );

        // Every card is blocked now; c3 since the seed.
        let cards: Vec<_> = report
            .cards
            .iter()
            .map(|(card, tx)| (card.id.as_str(), card.can_block(), tx.0))
            .collect();
        assert_eq!(
            cards,
            [
                ("c1", false, 2),
                ("c2", false, 4),
                ("c3", false, 1),
                ("c4", false, 5)
            ]
        );

        // The printout has every section, aligned.
        let printed = Printout(&report).to_string();
        for expected in [
            "Applied (in tx order)\n  key                                          tx  datoms  messages\n  block:card-block-requested:m1                2   2       1\n",
            "Duplicates (nothing applied again)\n  key                            original tx  id  delivery\n  block:card-block-requested:m1  2            m1  2\n",
            "  m3  block     {\"card_id\": c2}  `block` cannot decode its input `BlockRequest`",
            "  5   block_all:customer-cards-block-requested:n1  [card/id \"c4\"]      card/status       assert   \"blocked\"\n",
            "  block      5           3        1           1              0        1\n",
        ] {
            assert!(
                printed.contains(expected),
                "missing {expected:?} in\n{printed}"
            );
        }
    }

    #[tokio::test]
    async fn the_main_job_refuses_an_existing_database() {
        let database = TempDatabase::new();
        std::fs::write(database.path(), b"").unwrap();
        let err = job::run(database.path()).await.unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
