//! Where the job keeps its state and its messages, named by URL, as the `effects` CLI names
//! stores (`--store`, or `EFFECTS_STORE`):
//!
//! - `--store sqlite:PATH` (and `--transport sqlite:PATH`, the same file): the embedded
//!   default, store and log in one SQLite file.
//! - `--store postgres://USER@HOST:PORT/DB --transport nats://HOST:PORT`: the PostgreSQL store
//!   and the NATS JetStream transport (features `postgres` and `nats`), in a schema and a
//!   stream of the run's own ([`Namespace`]).
//!
//! Each kind of URL is one variant here; [`Backend`] is what the job needs of an opened pair
//! beyond the `Store` and `Transport` traits: whether everything is handled, and what happened,
//! counted at the source.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use effects_core::store::{SqliteStore, Store};
use effects_core::transport::{DeadLetter, SqliteLog, Transport};

use crate::job::Error;

/// A store URL.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:PATH`: the embedded SQLite store in the file at `PATH`.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...` (libpq's URL form): the PostgreSQL store.
    Postgres(String),
}

/// A transport URL.
#[derive(Clone, PartialEq, Eq)]
pub enum TransportUrl {
    /// `sqlite:PATH`: the embedded log in the SQLite file at `PATH`.
    Sqlite(PathBuf),
    /// `nats://HOST:PORT` (several separated by commas): NATS with JetStream.
    Nats(String),
}

/// A URL this build cannot use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlError {
    /// `--store` or `--transport`.
    pub flag: &'static str,
    /// The URL as given (without a password).
    pub url: String,
    /// What is wrong, and what to write instead.
    pub reason: String,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`: {}", self.flag, self.url, self.reason)
    }
}

impl std::error::Error for UrlError {}

/// What to write instead of a URL this example does not know.
const KNOWN: &str =
    "use `sqlite:PATH`, or `postgres://USER@HOST:PORT/DB` with `--transport nats://HOST:PORT`";

/// `url` with the password of `scheme://user:password@host` replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl StoreUrl {
    /// Parses `sqlite:PATH`, `postgres://...` or `postgresql://...`.
    pub fn parse(url: &str) -> Result<StoreUrl, UrlError> {
        let error = |reason: String| UrlError {
            flag: "--store",
            url: redacted(url),
            reason,
        };
        match url.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => Ok(StoreUrl::Sqlite(PathBuf::from(path))),
            Some(("sqlite", _)) => Err(error(
                "names no file: write `sqlite:PATH`, as in `sqlite:/tmp/transfers.db`".to_owned(),
            )),
            Some(("postgres" | "postgresql", rest)) if rest.starts_with("//") => {
                Ok(StoreUrl::Postgres(url.to_owned()))
            }
            Some(("nats", _)) => Err(error(format!(
                "NATS is a transport, not a store: give it as --transport; {KNOWN}"
            ))),
            _ => Err(error(format!(
                "is not a store URL this example knows: {KNOWN}"
            ))),
        }
    }

    /// The SQLite file, for the embedded store; `None` on a server.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            StoreUrl::Sqlite(path) => Some(path),
            StoreUrl::Postgres(_) => None,
        }
    }

    /// The URL as given, password included: for a worker process, which gets it in its
    /// environment (never on its command line).
    pub fn as_given(&self) -> String {
        match self {
            StoreUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
            StoreUrl::Postgres(url) => url.clone(),
        }
    }
}

impl TransportUrl {
    /// Parses `sqlite:PATH` or `nats://...`.
    pub fn parse(url: &str) -> Result<TransportUrl, UrlError> {
        let error = |reason: String| UrlError {
            flag: "--transport",
            url: redacted(url),
            reason,
        };
        match url.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => {
                Ok(TransportUrl::Sqlite(PathBuf::from(path)))
            }
            Some(("sqlite", _)) => Err(error(
                "names no file: write `sqlite:PATH`, as in `sqlite:/tmp/transfers.db`".to_owned(),
            )),
            Some(("nats" | "tls", rest)) if rest.starts_with("//") => {
                Ok(TransportUrl::Nats(url.to_owned()))
            }
            Some(("postgres" | "postgresql", _)) => Err(error(format!(
                "PostgreSQL is a store, not a transport: give it as --store; {KNOWN}"
            ))),
            _ => Err(error(format!(
                "is not a transport URL this example knows: {KNOWN}"
            ))),
        }
    }

    /// The transport that goes with `store` when none is named: its own log, in the same file.
    /// A PostgreSQL store has none: it needs `--transport nats://...`.
    pub fn beside(store: &StoreUrl) -> Option<TransportUrl> {
        match store {
            StoreUrl::Sqlite(path) => Some(TransportUrl::Sqlite(path.clone())),
            StoreUrl::Postgres(_) => None,
        }
    }

    /// Checks that this transport can be used with `store`: the embedded log lives in the
    /// store's own file (which lets a run publish its messages in the transaction that applies
    /// its datoms), and NATS goes with PostgreSQL.
    pub fn check_with(&self, store: &StoreUrl) -> Result<(), UrlError> {
        let error = |reason: String| UrlError {
            flag: "--transport",
            url: self.to_string(),
            reason,
        };
        match (self, store) {
            (TransportUrl::Sqlite(log), StoreUrl::Sqlite(db)) if log == db => Ok(()),
            (TransportUrl::Sqlite(_), StoreUrl::Sqlite(db)) => Err(error(format!(
                "the embedded log lives in the store's file: give `sqlite:{}` or leave --transport out",
                db.display()
            ))),
            (TransportUrl::Nats(_), StoreUrl::Postgres(_)) => Ok(()),
            (TransportUrl::Sqlite(_), StoreUrl::Postgres(_)) => Err(error(
                "the embedded log goes with the embedded store: with a PostgreSQL store give \
                 `--transport nats://HOST:PORT`"
                    .to_owned(),
            )),
            (TransportUrl::Nats(_), StoreUrl::Sqlite(_)) => Err(error(
                "NATS goes with the PostgreSQL store in this example: give \
                 `--store postgres://USER@HOST:PORT/DB`, or leave --transport out for the \
                 embedded log"
                    .to_owned(),
            )),
        }
    }

    /// The URL as given, password included (see [`StoreUrl::as_given`]).
    pub fn as_given(&self) -> String {
        match self {
            TransportUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
            TransportUrl::Nats(url) => url.clone(),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StoreUrl::Postgres(url) => f.write_str(&redacted(url)),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

impl fmt::Display for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            TransportUrl::Nats(url) => f.write_str(&redacted(url)),
        }
    }
}

impl fmt::Debug for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransportUrl({self})")
    }
}

/// The name of a run's PostgreSQL schema and NATS stream (and subject prefix), so that runs on
/// the same servers cannot see each other's data: `--namespace NAME` (or `EFFECTS_NAMESPACE`),
/// by default a fresh `transfers_<pid>_<time>_<n>`. Lower-case letters, digits and `_`, starting
/// with a letter, at most 48 characters: a valid schema, stream and subject token as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    /// A name no other run uses: `<prefix>_<pid>_<milliseconds>_<n>` (n counts within the process).
    pub fn fresh(prefix: &str) -> Namespace {
        // Two runs of one process in the same millisecond (tests started together) still differ.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Namespace(format!("{prefix}_{}_{millis}_{n}", std::process::id()))
    }

    /// Checks a name given on the command line.
    pub fn parse(name: &str) -> Result<Namespace, String> {
        let ok = name.len() <= 48
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Namespace(name.to_owned()))
        } else {
            Err(format!(
                "--namespace `{name}`: use lower-case letters, digits and `_`, starting with a \
                 letter, at most 48 characters"
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the job needs of an opened store and transport beyond the `Store` and `Transport`
/// traits.
pub trait Backend: Send + Sync + 'static {
    /// The store.
    type Store: Store + Clone;
    /// The transport.
    type Transport: Transport + Clone;

    /// The store.
    fn store(&self) -> &Self::Store;

    /// The transport.
    fn transport(&self) -> &Self::Transport;

    /// Where the state and the messages are, for the printout.
    fn describe(&self) -> String;

    /// How many messages of `topic` the consumer group `consumer` has not acknowledged yet.
    fn unacknowledged(
        &self,
        consumer: &str,
        topic: &str,
    ) -> impl Future<Output = Result<u64, Error>> + Send;

    /// Whether every run is finished: no open run, no outbox row waiting.
    fn runs_finished(&self) -> impl Future<Output = Result<bool, Error>> + Send;

    /// The dead letters of a consumer group.
    fn dead_letters(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, Error>> + Send;

    /// How many messages `topic` holds.
    fn published(&self, topic: &str) -> impl Future<Output = Result<usize, Error>> + Send;

    /// Applied runs per idempotency key: rows of the store's `transactions` table, one per
    /// commit that applied a run (unlike `effect_runs`, which holds one row per key whatever
    /// happens).
    fn runs_per_key(&self) -> impl Future<Output = Result<BTreeMap<String, u64>, Error>> + Send;
}

/// The embedded default: the SQLite store and its log in one file.
#[derive(Clone, Debug)]
pub struct Embedded {
    /// The store.
    pub store: SqliteStore,
    /// Its log.
    pub log: SqliteLog,
    /// The file.
    pub path: PathBuf,
}

impl Embedded {
    /// Opens the store and its log in the file at `path`.
    pub fn open(path: &Path) -> Result<Embedded, Error> {
        let store = SqliteStore::open(path)?;
        Ok(Embedded {
            log: store.log(),
            store,
            path: path.to_owned(),
        })
    }
}

impl Backend for Embedded {
    type Store = SqliteStore;
    type Transport = SqliteLog;

    fn store(&self) -> &SqliteStore {
        &self.store
    }

    fn transport(&self) -> &SqliteLog {
        &self.log
    }

    fn describe(&self) -> String {
        format!(
            "the embedded default: store and log in {}",
            self.path.display()
        )
    }

    async fn unacknowledged(&self, consumer: &str, topic: &str) -> Result<u64, Error> {
        Ok(self.log.unacknowledged(consumer, topic).await?)
    }

    async fn runs_finished(&self) -> Result<bool, Error> {
        let backlog = self.store.backlog().await?;
        Ok(backlog.open_runs == 0 && backlog.pending_rows == 0)
    }

    async fn dead_letters(&self, consumer: &str) -> Result<Vec<DeadLetter>, Error> {
        Ok(self.log.dead_letters(consumer).await?)
    }

    async fn published(&self, topic: &str) -> Result<usize, Error> {
        Ok(self.log.messages(topic).await?.len())
    }

    async fn runs_per_key(&self) -> Result<BTreeMap<String, u64>, Error> {
        crate::job::count_runs(&self.path)
    }
}

/// How long a server may take to answer one of the job's own questions.
pub const QUESTION_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_others_say_what_to_write() {
        assert_eq!(
            StoreUrl::parse("sqlite:/tmp/t.db"),
            Ok(StoreUrl::Sqlite("/tmp/t.db".into()))
        );
        assert_eq!(
            StoreUrl::parse("postgres://postgres@127.0.0.1/test"),
            Ok(StoreUrl::Postgres(
                "postgres://postgres@127.0.0.1/test".into()
            ))
        );
        assert_eq!(
            TransportUrl::parse("nats://127.0.0.1:4222"),
            Ok(TransportUrl::Nats("nats://127.0.0.1:4222".into()))
        );
        let err = StoreUrl::parse("nats://127.0.0.1:4222").unwrap_err();
        assert!(err.to_string().contains("give it as --transport"), "{err}");
        let err = TransportUrl::parse("sqlite:").unwrap_err();
        assert!(err.to_string().contains("names no file"), "{err}");
        assert!(TransportUrl::parse("/tmp/t.db").is_err());
        assert!(StoreUrl::parse("mysql://h/db").is_err());
    }

    #[test]
    fn passwords_are_never_shown() {
        let url = "postgres://app:s3cret@db:5432/payments";
        let store = StoreUrl::parse(url).unwrap();
        assert_eq!(store.to_string(), "postgres://app:***@db:5432/payments");
        assert!(!format!("{store:?}").contains("s3cret"));
        assert_eq!(store.as_given(), url);
        let err = StoreUrl::parse("mysql://app:s3cret@db/x").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn stores_and_transports_go_in_pairs() {
        let store = StoreUrl::parse("sqlite:/tmp/a.db").unwrap();
        let beside = TransportUrl::beside(&store).unwrap();
        assert_eq!(beside.check_with(&store), Ok(()));
        let err = TransportUrl::parse("sqlite:/tmp/b.db")
            .unwrap()
            .check_with(&store)
            .unwrap_err();
        assert!(err.to_string().contains("sqlite:/tmp/a.db"), "{err}");
        let pg = StoreUrl::parse("postgres://postgres@127.0.0.1/test").unwrap();
        assert_eq!(TransportUrl::beside(&pg), None);
        let nats = TransportUrl::parse("nats://127.0.0.1:4222").unwrap();
        assert_eq!(nats.check_with(&pg), Ok(()));
        assert!(nats.check_with(&store).is_err());
        assert!(beside.check_with(&pg).is_err());
    }

    #[test]
    fn namespaces_are_plain_names() {
        assert!(Namespace::parse("transfers_1").is_ok());
        for bad in ["", "1abc", "Upper", "a-b", "a.b", &"a".repeat(49)] {
            assert!(Namespace::parse(bad).is_err(), "{bad}");
        }
        let fresh = Namespace::fresh("transfers");
        assert_eq!(Namespace::parse(fresh.as_str()), Ok(fresh));
    }
}
