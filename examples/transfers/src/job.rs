//! The main job of the `transfers` binary.
//!
//! 1. Open the store and its log in a fresh SQLite file (`--store sqlite:PATH`), or the
//!    PostgreSQL store and the NATS transport (`--store postgres://.. --transport nats://..`)
//!    in a schema and a stream of the run's own ([`Namespace`]).
//! 2. Start the fraud-check service on 127.0.0.1 ([`FraudService`]).
//! 3. Seed the accounts of the [`Workload`] (a run like any other) and publish its transfers,
//!    all at once, as an upstream service would — most of them from one hot account.
//! 4. Push them through the `transfer` and `settle` workers: in this process
//!    ([`run_until_drained`](crate::service::run_until_drained)), or in `--processes N` worker
//!    processes on the same store and transport, each the same binary started as
//!    `transfers worker`.
//! 5. Read back what happened, at the source: balances and transfers from the store, runs per
//!    key from its `transactions` table, requests as the fraud-check service received them,
//!    dead letters and published messages from the transport; and check it
//!    ([`Report::checks`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use effects_core::executor::{Mutant, RunError};
use effects_core::http::HttpConfigError;
use effects_core::store::{Store, StoreError};
use effects_core::transport::{DeadLetter, OutgoingMessage, Transport, TransportError};
use effects_core::{DatomEffect, Effects, Handler, Message};
use serde_json::json;

use crate::backend::{Backend, Embedded, Namespace, StoreUrl, TransportUrl, UrlError};
use crate::fraud::{FraudService, Received};
use crate::load::{account_ref, transfer_ref};
use crate::service::{self, Counts, WorkerOptions, Workers};
use crate::workload::{Expected, Workload};
use crate::{
    Account, FRAUD_CHECK_THRESHOLD, FraudChecked, SettleHandler, TransferCompleted,
    TransferHandler, TransferRecord, TransferRefused, TransferReversed, TransferStatus,
};

/// The idempotency key of the seed run.
pub const SEED_KEY: &str = "seed:accounts";

/// The line a worker process prints its counts on: `report {json}`.
pub const REPORT_PREFIX: &str = "report ";

/// What a worker process started with `--start-on-stdin` prints once it is ready.
pub const READY: &str = "ready";

/// What the job writes to such a process's stdin to start it.
pub const START: &str = "start";

/// Why the job (or a worker process) could not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--store` or `--transport` this build cannot use.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The store failed.
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    /// The log failed.
    #[error("the log failed: {0}")]
    Transport(#[from] TransportError),
    /// The seed run failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The fraud-check endpoint cannot be configured.
    #[error("the fraud-check endpoint: {0}")]
    Http(#[from] HttpConfigError),
    /// A transfer could not be encoded.
    #[error("cannot encode a transfer: {0}")]
    Json(#[from] serde_json::Error),
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the job was doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The runs per key could not be counted.
    #[error("cannot count the runs in {path}: {source}")]
    Count {
        /// The database file.
        path: PathBuf,
        /// The error.
        #[source]
        source: rusqlite::Error,
    },
    /// Something did not finish in time.
    #[error("{what}")]
    Timeout {
        /// What.
        what: String,
    },
    /// The job cannot run as asked.
    #[error("{reason}")]
    Setup {
        /// Why.
        reason: String,
    },
    /// A worker process failed.
    #[error("worker process {process} failed: {reason}")]
    Process {
        /// Its number, from 1.
        process: usize,
        /// What it said, or how it ended.
        reason: String,
    },
}

/// The environment variable a worker process reads its store URL from (and the job, when
/// `--store` is not given).
pub const STORE_ENV: &str = "EFFECTS_STORE";

/// The environment variable of the transport URL.
pub const TRANSPORT_ENV: &str = "EFFECTS_TRANSPORT";

/// The environment variable of the namespace on the servers.
pub const NAMESPACE_ENV: &str = "EFFECTS_NAMESPACE";

/// What a build without the server backends says when asked to use them.
pub const NO_SERVERS: &str = "this build has no PostgreSQL store or NATS transport: build the \
     example with `--features postgres,nats` (`cargo run -p transfers --features postgres,nats \
     -- --store postgres://.. --transport nats://..`)";

/// How to run the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOptions {
    /// The store: a fresh SQLite file, or PostgreSQL.
    pub store: StoreUrl,
    /// The transport: the store's own log, or NATS.
    pub transport: TransportUrl,
    /// On the servers, the schema and the stream of this run (fresh by default).
    pub namespace: Namespace,
    /// Transfers in the workload (four more show the other paths: see [`Workload::generate`]).
    pub transfers: usize,
    /// Worker processes to start; 0 runs the workers in the job's own process.
    pub processes: usize,
    /// How each process runs its workers.
    pub workers: WorkerOptions,
    /// The program to start as a worker process (`PROGRAM worker ..`): this binary.
    pub worker_program: Option<PathBuf>,
}

impl JobOptions {
    /// 100 transfers through the workers of this process, on the embedded store and its log in
    /// the SQLite file at `path`.
    pub fn new(path: PathBuf) -> JobOptions {
        JobOptions::on(StoreUrl::Sqlite(path.clone()), TransportUrl::Sqlite(path))
    }

    /// 100 transfers through the workers of this process, on `store` and `transport`, in a
    /// fresh namespace.
    pub fn on(store: StoreUrl, transport: TransportUrl) -> JobOptions {
        JobOptions {
            transport,
            namespace: Namespace::fresh("transfers"),
            store,
            transfers: 100,
            processes: 0,
            workers: WorkerOptions::default(),
            worker_program: None,
        }
    }
}

/// A database path that does not exist yet, in the system's temporary directory.
pub fn fresh_database_path() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "effects-transfers-{}-{nanos}.db",
        std::process::id()
    ))
}

/// Where the workers ran and what they did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ran {
    /// `this process`, or `process N`.
    pub label: String,
    /// The counts of its two workers.
    pub workers: Workers,
}

/// Everything the job did, read back from the store, the log and the fraud-check service.
#[derive(Debug)]
pub struct Report {
    /// The options it ran with.
    pub options: JobOptions,
    /// Where the state and the messages were.
    pub backend: String,
    /// The fraud-check service's URL.
    pub fraud_check_url: String,
    /// The workload.
    pub workload: Workload,
    /// What the workload must end with.
    pub expected: Expected,
    /// The balances now, by account.
    pub balances: BTreeMap<String, i64>,
    /// Every transfer as recorded in the store (`None`: never recorded), by id.
    pub transfers: BTreeMap<String, Option<TransferRecord>>,
    /// Where the workers ran and what they did.
    pub ran: Vec<Ran>,
    /// Applied runs per idempotency key, counted in the store's `transactions` table.
    pub runs_per_key: BTreeMap<String, u64>,
    /// What the fraud-check service received.
    pub received: Received,
    /// The dead letters of both workers.
    pub dead_letters: Vec<DeadLetter>,
    /// Messages in the log, by topic.
    pub published: BTreeMap<&'static str, usize>,
    /// From the first delivery to the last.
    pub elapsed: Duration,
}

/// One check of the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What it checks.
    pub name: &'static str,
    /// Whether it holds.
    pub passed: bool,
    /// The figures behind it.
    pub detail: String,
}

impl Report {
    /// Both workers of every process together.
    pub fn counts(&self) -> Counts {
        self.ran
            .iter()
            .fold(Counts::default(), |sum, r| sum + r.workers.total())
    }

    /// What the accounts hold together now.
    pub fn total(&self) -> i64 {
        self.balances.values().sum()
    }

    /// What held transfers hold (debited from their payer, not yet credited to anyone).
    pub fn held(&self) -> i64 {
        self.records()
            .filter(|t| t.status == TransferStatus::Held)
            .map(|t| t.amount)
            .sum()
    }

    /// Transfers by status, as recorded.
    pub fn by_status(&self) -> BTreeMap<TransferStatus, usize> {
        let mut by = BTreeMap::new();
        for t in self.records() {
            *by.entry(t.status).or_default() += 1;
        }
        by
    }

    fn records(&self) -> impl Iterator<Item = &TransferRecord> {
        self.transfers.values().flatten()
    }

    /// The keys whose runs were applied other than exactly once: every recorded transfer has
    /// one `transfer` run, every transfer that was held one `settle` run, and nothing else ran
    /// but the seed.
    pub fn not_applied_once(&self) -> Vec<(String, u64)> {
        let mut want: BTreeSet<String> = BTreeSet::from([SEED_KEY.to_owned()]);
        for t in self.records() {
            want.insert(effects_core::handler::business_key(
                TransferHandler::DESCRIPTOR.name,
                &t.id,
            ));
            if t.amount >= FRAUD_CHECK_THRESHOLD && t.status != TransferStatus::Refused {
                want.insert(effects_core::handler::business_key(
                    SettleHandler::DESCRIPTOR.name,
                    &t.id,
                ));
            }
        }
        let mut wrong: Vec<(String, u64)> = want
            .iter()
            .map(|k| (k.clone(), self.runs_per_key.get(k).copied().unwrap_or(0)))
            .filter(|(_, n)| *n != 1)
            .collect();
        wrong.extend(
            self.runs_per_key
                .iter()
                .filter(|(k, _)| !want.contains(*k))
                .map(|(k, n)| (k.clone(), *n)),
        );
        wrong
    }

    /// Every check, in order. The job fails unless all hold.
    pub fn checks(&self) -> Vec<Check> {
        let seeded = self.workload.total();
        let (total, held) = (self.total(), self.held());
        let by_status = self.by_status();
        let status = |s| by_status.get(&s).copied().unwrap_or(0);
        let wrong_balances: Vec<String> = self
            .expected
            .balances
            .iter()
            .filter(|(id, b)| self.balances.get(*id) != Some(b))
            .map(|(id, b)| {
                let now = self
                    .balances
                    .get(id)
                    .map_or_else(|| "nothing".to_owned(), i64::to_string);
                format!("{id} holds {now}, not {b}")
            })
            .collect();
        let overdrawn: Vec<String> = self
            .balances
            .iter()
            .filter(|(_, b)| **b < 0)
            .map(|(id, b)| format!("{id} holds {b}"))
            .collect();
        let wrong_runs = self.not_applied_once();
        let runs = self.runs_per_key.len().saturating_sub(1);
        let received = &self.received;
        let counts = self.counts();
        vec![
            Check {
                name: "money is conserved",
                passed: total == seeded && held == 0,
                detail: format!(
                    "{seeded} seeded, {total} held by the accounts, {held} held by transfers"
                ),
            },
            Check {
                name: "no account is overdrawn",
                passed: overdrawn.is_empty(),
                detail: if overdrawn.is_empty() {
                    "every balance is 0 or more".to_owned()
                } else {
                    overdrawn.join(", ")
                },
            },
            Check {
                name: "every balance is exact",
                passed: wrong_balances.is_empty(),
                detail: if wrong_balances.is_empty() {
                    format!(
                        "{} accounts as the workload computes them",
                        self.balances.len()
                    )
                } else {
                    wrong_balances.join(", ")
                },
            },
            Check {
                name: "every run applied once",
                passed: wrong_runs.is_empty(),
                detail: if wrong_runs.is_empty() {
                    format!("{runs} keys with one transaction each, and the seed")
                } else {
                    wrong_runs
                        .iter()
                        .map(|(k, n)| format!("{k} applied {n} times"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            },
            Check {
                name: "every transfer ended as expected",
                passed: status(TransferStatus::Completed) == self.expected.completed
                    && status(TransferStatus::Refused) == self.expected.refused
                    && status(TransferStatus::Reversed) == self.expected.reversed
                    && status(TransferStatus::Held) == 0
                    && self.dead_letters.len() == self.expected.dead_lettered,
                detail: format!(
                    "{} completed, {} refused, {} reversed, {} held, {} dead-lettered; expected {}, {}, {}, 0, {}",
                    status(TransferStatus::Completed),
                    status(TransferStatus::Refused),
                    status(TransferStatus::Reversed),
                    status(TransferStatus::Held),
                    self.dead_letters.len(),
                    self.expected.completed,
                    self.expected.refused,
                    self.expected.reversed,
                    self.expected.dead_lettered,
                ),
            },
            Check {
                name: "every fraud check sent once",
                passed: received.requests == self.expected.fraud_checks
                    && received.idempotency_keys == received.requests
                    && received.without_key == 0,
                detail: format!(
                    "{} requests received with {} distinct idempotency keys; {} transfers held",
                    received.requests, received.idempotency_keys, self.expected.fraud_checks
                ),
            },
            Check {
                name: "the re-sent transfer was a duplicate",
                passed: counts.duplicates >= 1,
                detail: format!("duplicate deliveries absorbed: {}", counts.duplicates),
            },
        ]
    }

    /// Whether every check holds.
    pub fn passed(&self) -> bool {
        self.checks().iter().all(|c| c.passed)
    }
}

/// Seeds the accounts: one run of datoms, with its own `tx`.
fn seed_effects(accounts: &[Account]) -> Effects {
    accounts.iter().fold(Effects::new(), |effects, account| {
        effects.merge(DatomEffect::assert(
            account_ref(&account.id),
            [("account/balance", json!(account.balance))],
        ))
    })
}

/// Runs the whole job and reports what happened.
pub async fn run(options: JobOptions) -> Result<Report, Error> {
    options.transport.check_with(&options.store)?;
    if options.processes > 0 && options.worker_program.is_none() {
        return Err(Error::Setup {
            reason: "worker processes need the program to start".to_owned(),
        });
    }
    match options.store.clone() {
        StoreUrl::Sqlite(path) => {
            if path.exists() {
                return Err(Error::Setup {
                    reason: format!(
                        "{} already exists: the job seeds a fresh database; give a new path, or none",
                        path.display()
                    ),
                });
            }
            let backend = Embedded::open(&path)?;
            run_on(options, backend).await
        }
        StoreUrl::Postgres(url) => on_servers(options, url).await,
    }
}

#[cfg(all(feature = "postgres", feature = "nats"))]
async fn on_servers(options: JobOptions, url: String) -> Result<Report, Error> {
    let TransportUrl::Nats(nats) = options.transport.clone() else {
        return Err(Error::Setup {
            reason: "a PostgreSQL store needs --transport nats://HOST:PORT".to_owned(),
        });
    };
    let pool = options.workers.concurrency * 2 + 4;
    let backend = crate::servers::Servers::connect(&url, &nats, &options.namespace, pool).await?;
    run_on(options, backend).await
}

#[cfg(not(all(feature = "postgres", feature = "nats")))]
async fn on_servers(_: JobOptions, _: String) -> Result<Report, Error> {
    Err(Error::Setup {
        reason: NO_SERVERS.to_owned(),
    })
}

/// The job on an opened backend.
async fn run_on<B: Backend>(options: JobOptions, backend: B) -> Result<Report, Error> {
    let store = backend.store().clone();
    let fraud = FraudService::start().await.map_err(|source| Error::Io {
        what: "cannot start the fraud-check service on 127.0.0.1".to_owned(),
        source,
    })?;
    let executor = Arc::new(service::executor(
        &backend,
        &fraud.url(),
        options.workers.mutant,
    )?);

    let workload = Workload::generate(options.transfers);
    if let Some(first) = workload.accounts.first() {
        if store.entity(&account_ref(&first.id), None).await?.is_some() {
            return Err(Error::Setup {
                reason: format!(
                    "{} holds accounts already: the job seeds a fresh store; give a new \
                     --namespace, or none",
                    backend.describe()
                ),
            });
        }
    }
    executor
        .run(SEED_KEY, seed_effects(&workload.accounts))
        .await?;
    let topic = TransferHandler::DESCRIPTOR
        .topic
        .ok_or_else(|| Error::Setup {
            reason: "`transfer` consumes no topic".to_owned(),
        })?;
    for published in &workload.published {
        backend
            .transport()
            .publish(OutgoingMessage {
                id: published.message_id.clone(),
                topic: topic.to_owned(),
                partition_key: None,
                headers: BTreeMap::new(),
                payload: serde_json::to_vec(&published.transfer)?,
            })
            .await?;
    }

    let started = Instant::now();
    let ran = if options.processes == 0 {
        let workers =
            service::run_until_drained(Arc::clone(&executor), &backend, &options.workers).await?;
        vec![Ran {
            label: "this process".to_owned(),
            workers,
        }]
    } else {
        let program = options.worker_program.clone().unwrap_or_default();
        let (url, count) = (fraud.url(), options.processes);
        let (job, workers) = (options.clone(), options.workers.clone());
        tokio::task::spawn_blocking(move || run_processes(&program, &job, &url, count, &workers))
            .await
            .map_err(|e| Error::Setup {
                reason: format!("the task supervising the worker processes failed: {e}"),
            })??
    };
    let elapsed = started.elapsed();

    let mut balances = BTreeMap::new();
    for account in &workload.accounts {
        let lookup = account_ref(&account.id);
        let now: Account = store
            .entity(&lookup, None)
            .await?
            .ok_or_else(|| Error::Setup {
                reason: format!("{lookup} disappeared from the store"),
            })?
            .decode()?;
        balances.insert(now.id, now.balance);
    }
    let mut transfers = BTreeMap::new();
    for published in &workload.published {
        let id = &published.transfer.id;
        let record = match store.entity(&transfer_ref(id), None).await? {
            Some(entity) => Some(entity.decode::<TransferRecord>()?),
            None => None,
        };
        transfers.insert(id.clone(), record);
    }
    let mut dead_letters = backend
        .dead_letters(TransferHandler::DESCRIPTOR.name)
        .await?;
    dead_letters.extend(backend.dead_letters(SettleHandler::DESCRIPTOR.name).await?);
    let mut published = BTreeMap::new();
    for topic in [
        topic,
        FraudChecked::TOPIC,
        TransferCompleted::TOPIC,
        TransferRefused::TOPIC,
        TransferReversed::TOPIC,
    ] {
        published.insert(topic, backend.published(topic).await?);
    }
    let runs_per_key = backend.runs_per_key().await?;
    let received = fraud.received().await;

    Ok(Report {
        backend: backend.describe(),
        expected: workload.expected(),
        fraud_check_url: fraud.url(),
        options,
        workload,
        balances,
        transfers,
        ran,
        runs_per_key,
        received,
        dead_letters,
        published,
        elapsed,
    })
}

/// A worker process (`transfers worker`): both workers on the store and transport of a job
/// that is running, until everything is handled; the counts as `report {json}`.
pub async fn work(
    store: &StoreUrl,
    transport: &TransportUrl,
    namespace: &Namespace,
    fraud_check_url: &str,
    options: &WorkerOptions,
    start_on_stdin: bool,
) -> Result<String, Error> {
    transport.check_with(store)?;
    match store {
        StoreUrl::Sqlite(path) => {
            if !path.exists() {
                return Err(Error::Setup {
                    reason: format!(
                        "{} does not exist: a worker joins a job's store",
                        path.display()
                    ),
                });
            }
            let backend = Embedded::open(path)?;
            work_on(backend, fraud_check_url, options, start_on_stdin).await
        }
        StoreUrl::Postgres(url) => {
            work_on_servers(
                url,
                transport,
                namespace,
                fraud_check_url,
                options,
                start_on_stdin,
            )
            .await
        }
    }
}

#[cfg(all(feature = "postgres", feature = "nats"))]
async fn work_on_servers(
    url: &str,
    transport: &TransportUrl,
    namespace: &Namespace,
    fraud_check_url: &str,
    options: &WorkerOptions,
    start_on_stdin: bool,
) -> Result<String, Error> {
    let TransportUrl::Nats(nats) = transport else {
        return Err(Error::Setup {
            reason: "a PostgreSQL store needs --transport nats://HOST:PORT".to_owned(),
        });
    };
    let pool = options.concurrency * 2 + 4;
    let backend = crate::servers::Servers::connect(url, nats, namespace, pool).await?;
    work_on(backend, fraud_check_url, options, start_on_stdin).await
}

#[cfg(not(all(feature = "postgres", feature = "nats")))]
async fn work_on_servers(
    _: &str,
    _: &TransportUrl,
    _: &Namespace,
    _: &str,
    _: &WorkerOptions,
    _: bool,
) -> Result<String, Error> {
    Err(Error::Setup {
        reason: NO_SERVERS.to_owned(),
    })
}

async fn work_on<B: Backend>(
    backend: B,
    fraud_check_url: &str,
    options: &WorkerOptions,
    start_on_stdin: bool,
) -> Result<String, Error> {
    let executor = Arc::new(service::executor(
        &backend,
        fraud_check_url,
        options.mutant,
    )?);
    if start_on_stdin {
        wait_for_start(options.patience).await?;
    }
    let workers = service::run_until_drained(executor, &backend, options).await?;
    Ok(format!(
        "{REPORT_PREFIX}{}",
        serde_json::to_string(&workers)?
    ))
}

/// Says `ready` on stdout and waits (at most `patience`) for `start` on stdin.
async fn wait_for_start(patience: Duration) -> Result<(), Error> {
    println!("{READY}");
    let read = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    let io = |what: &str, source| Error::Io {
        what: what.to_owned(),
        source,
    };
    match tokio::time::timeout(patience, read).await {
        Ok(Ok(Ok(line))) if line.trim() == START => Ok(()),
        Ok(Ok(Ok(line))) => Err(Error::Setup {
            reason: format!("expected `{START}` on stdin, got `{}`", line.trim()),
        }),
        Ok(Ok(Err(e))) => Err(io("cannot read stdin", e)),
        Ok(Err(e)) => Err(Error::Setup {
            reason: format!("the task reading stdin failed: {e}"),
        }),
        Err(_) => Err(Error::Timeout {
            what: format!("not told to start within {}s", patience.as_secs()),
        }),
    }
}

/// Applied runs per idempotency key: rows of the store's `transactions` table, one per commit
/// that applied a run (unlike `effect_runs`, which holds one row per key whatever happens).
pub fn count_runs(path: &Path) -> Result<BTreeMap<String, u64>, Error> {
    let count = || -> rusqlite::Result<BTreeMap<String, u64>> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut stmt =
            conn.prepare("SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|r| r.map(|(k, n)| (k, u64::try_from(n).unwrap_or(0))))
            .collect()
    };
    count().map_err(|source| Error::Count {
        path: path.to_owned(),
        source,
    })
}

/// The name of a mutant on the command line of a worker process.
pub fn mutant_flag(mutant: Mutant) -> &'static str {
    mutant.name()
}

/// The mutant a worker process was started with.
pub fn parse_mutant(flag: &str) -> Option<Mutant> {
    Mutant::from_name(flag)
}

/// Starts `count` worker processes on the store and waits for them all (at most the workers'
/// patience, plus 15 s to start and stop); kills those still running after that.
fn run_processes(
    program: &Path,
    job: &JobOptions,
    fraud_check_url: &str,
    count: usize,
    options: &WorkerOptions,
) -> Result<Vec<Ran>, Error> {
    struct Running {
        child: std::process::Child,
        stdout: std::thread::JoinHandle<String>,
        stderr: std::thread::JoinHandle<String>,
    }
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    }
    /// Reads stdout line by line, telling `ready` when the process is ready to start.
    fn watch(
        pipe: Option<impl Read + Send + 'static>,
        ready: std::sync::mpsc::Sender<()>,
    ) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(pipe) = pipe {
                for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)) {
                    let Ok(line) = line else { break };
                    if line == READY {
                        let _ = ready.send(());
                    }
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            text
        })
    }
    fn stop(running: &mut [Running]) {
        for r in running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut running = Vec::with_capacity(count);
    for n in 1..=count {
        let mut command = Command::new(program);
        // The URLs go in the environment, where a password is not shown to every user of the
        // machine as a command line is.
        command
            .arg("worker")
            .env(STORE_ENV, job.store.as_given())
            .env(TRANSPORT_ENV, job.transport.as_given())
            .env(NAMESPACE_ENV, job.namespace.as_str())
            .arg("--fraud-check")
            .arg(fraud_check_url)
            .arg("--concurrency")
            .arg(options.concurrency.to_string())
            .arg("--patience")
            .arg(options.patience.as_secs().max(1).to_string())
            .arg("--start-on-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(mutant) = options.mutant {
            command.arg("--mutant").arg(mutant_flag(mutant));
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(source) => {
                stop(&mut running);
                return Err(Error::Io {
                    what: format!("cannot start worker process {n} ({})", program.display()),
                    source,
                });
            }
        };
        let stdout = watch(child.stdout.take(), ready_tx.clone());
        let stderr = drain(child.stderr.take());
        running.push(Running {
            child,
            stdout,
            stderr,
        });
    }

    // Every process opens the store and builds its workers, then they all start at once, so
    // that they really compete for the same accounts.
    drop(ready_tx);
    let ready_by = Instant::now() + Duration::from_secs(15);
    for _ in 0..count {
        let left = ready_by.saturating_duration_since(Instant::now());
        if ready_rx.recv_timeout(left).is_err() {
            stop(&mut running);
            let said: Vec<String> = running
                .into_iter()
                .map(|r| r.stderr.join().unwrap_or_default().trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            return Err(Error::Timeout {
                what: format!(
                    "the worker processes were not all ready within 15 s: {}",
                    said.join("; ")
                ),
            });
        }
    }
    for r in &mut running {
        if let Some(mut stdin) = r.child.stdin.take() {
            // A process that cannot be told to start fails its own wait, and says so.
            let _ = std::io::Write::write_all(&mut stdin, format!("{START}\n").as_bytes());
        }
    }

    let deadline = Instant::now() + options.patience + Duration::from_secs(15);
    let mut statuses: Vec<Option<std::process::ExitStatus>> = vec![None; count];
    let mut timed_out = false;
    while statuses.iter().any(Option::is_none) {
        for (r, status) in running.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = r.child.try_wait().map_err(|source| Error::Io {
                    what: "cannot wait for a worker process".to_owned(),
                    source,
                })?;
            }
        }
        if Instant::now() >= deadline {
            timed_out = true;
            for (r, status) in running.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    let _ = r.child.kill();
                    *status = r.child.wait().ok();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut ran = Vec::with_capacity(count);
    let mut failure = None;
    for (i, (r, status)) in running.into_iter().zip(statuses).enumerate() {
        let process = i + 1;
        let stdout = r.stdout.join().unwrap_or_default();
        let stderr = r.stderr.join().unwrap_or_default();
        let report = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(REPORT_PREFIX))
            .map(serde_json::from_str::<Workers>);
        let error = |reason: String| Error::Process { process, reason };
        let outcome = match (status, report) {
            _ if timed_out => Err(Error::Timeout {
                what: format!(
                    "the worker processes did not finish within {}s and were killed",
                    (options.patience + Duration::from_secs(15)).as_secs()
                ),
            }),
            (Some(s), Some(Ok(workers))) if s.success() => Ok(workers),
            (Some(s), Some(Err(e))) if s.success() => {
                Err(error(format!("its report is not readable: {e}")))
            }
            (status, _) => Err(error(format!(
                "it ended with {} and said: {}",
                status.map_or_else(|| "an unknown status".to_owned(), |s| s.to_string()),
                stderr.trim()
            ))),
        };
        match outcome {
            Ok(workers) => ran.push(Ran {
                label: format!("process {process}"),
                workers,
            }),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(ran),
    }
}

/// The report as the binary prints it.
#[derive(Debug)]
pub struct Printout<'a>(pub &'a Report);

impl fmt::Display for Printout<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let o = &r.options;
        writeln!(f, "Transfers on {}", r.backend)?;
        writeln!(
            f,
            "Fraud-check service on {}: transfers of {FRAUD_CHECK_THRESHOLD} or more are held and checked",
            r.fraud_check_url
        )?;
        let distinct = r.transfers.len();
        let mutant = o
            .workers
            .mutant
            .map(|m| format!(" (MUTANT: {})", mutant_flag(m)))
            .unwrap_or_default();
        if o.processes == 0 {
            writeln!(
                f,
                "{} transfers ({distinct} distinct) through the `transfer` and `settle` workers of this process, {} at a time each{mutant}",
                r.workload.published.len(),
                o.workers.concurrency,
            )?;
        } else {
            writeln!(
                f,
                "{} transfers ({distinct} distinct) through {} worker processes on the same {}, each running `transfer` and `settle`, {} at a time each{mutant}",
                r.workload.published.len(),
                o.processes,
                if o.store.sqlite_path().is_some() {
                    "file"
                } else {
                    "servers"
                },
                o.workers.concurrency,
            )?;
        }

        writeln!(f, "\nBalances")?;
        let mut rows = vec![row(["account", "opening", "now", "expected"])];
        for account in &r.workload.accounts {
            let now = r.balances.get(&account.id).copied();
            let expected = r.expected.balances.get(&account.id).copied();
            rows.push(vec![
                account.id.clone(),
                account.balance.to_string(),
                now.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                expected.map_or_else(|| "-".to_owned(), |b| b.to_string()),
            ]);
        }
        rows.push(vec![
            "total".to_owned(),
            r.workload.total().to_string(),
            r.total().to_string(),
            r.expected.balances.values().sum::<i64>().to_string(),
        ]);
        f.write_str(&table(&rows))?;

        writeln!(f, "\nTransfers (as recorded in the store)")?;
        let by_status = r.by_status();
        let mut rows = vec![row(["status", "transfers", "expected"])];
        for (status, expected) in [
            (TransferStatus::Completed, r.expected.completed),
            (TransferStatus::Refused, r.expected.refused),
            (TransferStatus::Reversed, r.expected.reversed),
            (TransferStatus::Held, 0),
        ] {
            rows.push(vec![
                status.as_str().to_owned(),
                by_status.get(&status).copied().unwrap_or(0).to_string(),
                expected.to_string(),
            ]);
        }
        f.write_str(&table(&rows))?;
        for t in r.transfers.values().flatten() {
            if let Some(reason) = &t.reason {
                writeln!(f, "  {} {}: {reason}", t.id, t.status.as_str())?;
            }
        }

        writeln!(f, "\nDead-lettered (acknowledged, never retried)")?;
        if r.dead_letters.is_empty() {
            writeln!(f, "  none")?;
        }
        for d in &r.dead_letters {
            writeln!(f, "  {} {}: {}", d.consumer, d.message_id, d.reason)?;
        }

        writeln!(
            f,
            "\nWorkers (shut down gracefully once every transfer was handled)"
        )?;
        let mut rows = vec![row([
            "where",
            "worker",
            "deliveries",
            "applied",
            "duplicates",
            "dead-lettered",
            "conflicts",
            "re-runs",
            "retried",
        ])];
        let mut add = |label: &str, worker: &str, c: &Counts| {
            rows.push(vec![
                label.to_owned(),
                worker.to_owned(),
                c.deliveries.to_string(),
                c.applied.to_string(),
                c.duplicates.to_string(),
                c.dead_lettered.to_string(),
                c.conflicts.to_string(),
                c.reruns.to_string(),
                c.retried.to_string(),
            ]);
        };
        for ran in &r.ran {
            add(&ran.label, "transfer", &ran.workers.transfer);
            add(&ran.label, "settle", &ran.workers.settle);
        }
        add("all", "both", &r.counts());
        f.write_str(&table(&rows))?;
        let c = r.counts();
        writeln!(
            f,
            "  {} runs were refused at commit because an account had changed since it was read; each was computed again on fresh balances ({} re-runs)",
            c.conflicts, c.reruns
        )?;

        writeln!(f, "\nFraud checks (counted at the service)")?;
        writeln!(
            f,
            "  {} requests received, {} distinct idempotency keys, {} without one; {} verdicts published on `{}`",
            r.received.requests,
            r.received.idempotency_keys,
            r.received.without_key,
            r.published.get(FraudChecked::TOPIC).copied().unwrap_or(0),
            FraudChecked::TOPIC,
        )?;

        writeln!(f, "\nMessages published, by topic")?;
        let mut rows = vec![row(["topic", "messages"])];
        for (topic, n) in &r.published {
            rows.push(vec![(*topic).to_owned(), n.to_string()]);
        }
        f.write_str(&table(&rows))?;

        let applied = r.runs_per_key.len().saturating_sub(1);
        writeln!(
            f,
            "\n{applied} runs applied in {:.2} s ({:.0} runs/s)",
            r.elapsed.as_secs_f64(),
            applied as f64 / r.elapsed.as_secs_f64().max(1e-9)
        )?;

        writeln!(f, "\nChecks")?;
        for check in r.checks() {
            let mark = if check.passed { "ok    " } else { "FAILED" };
            writeln!(f, "  {mark} {}: {}", check.name, check.detail)?;
        }
        Ok(())
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// Rows as left-aligned columns, indented by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from("  ");
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                let pad = widths[c] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
