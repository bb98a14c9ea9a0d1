//! The PostgreSQL store's connection handling: options, the pool, TLS, migrations, and the
//! retry of transactions that failed for a serialization failure or a deadlock.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Transaction,
};
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use crate::store::StoreError;

/// TLS to the server, verified with rustls (feature `postgres-tls`).
///
/// The server's certificate must chain to one of the roots and name the host connected to. The
/// connection then requires TLS (`sslmode=require`, with verification): it fails rather than
/// falling back to plain text.
#[cfg(feature = "postgres-tls")]
#[derive(Clone)]
pub struct PostgresTls {
    roots: std::sync::Arc<rustls::RootCertStore>,
}

#[cfg(feature = "postgres-tls")]
impl fmt::Debug for PostgresTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTls")
            .field("roots", &self.roots.len())
            .finish()
    }
}

#[cfg(feature = "postgres-tls")]
impl PostgresTls {
    /// Verifies the server against the Mozilla roots (webpki-roots), as a public CA would
    /// issue its certificate.
    pub fn mozilla_roots() -> PostgresTls {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        PostgresTls {
            roots: std::sync::Arc::new(roots),
        }
    }

    /// Verifies the server against the CA certificates in `pem` only (a private CA).
    pub fn with_ca_pem(pem: &[u8]) -> Result<PostgresTls, StoreError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let invalid = |reason: String| StoreError::Open {
            location: "the TLS roots".to_owned(),
            source: reason.into(),
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| invalid(format!("the CA PEM cannot be read: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("a CA certificate is invalid: {e}")))?;
        }
        if roots.is_empty() {
            return Err(invalid("the CA PEM holds no certificate".to_owned()));
        }
        Ok(PostgresTls {
            roots: std::sync::Arc::new(roots),
        })
    }

    pub(super) fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Open {
                location: "the TLS configuration".to_owned(),
                source: Box::new(e),
            })?
            .with_root_certificates(std::sync::Arc::clone(&self.roots))
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// Options of a [`PostgresStore`](super::PostgresStore).
#[derive(Clone)]
pub struct PostgresOptions {
    /// The server and database: `postgres://user[:password]@host:port/dbname` or the
    /// `key=value` form of libpq. Never printed with its password.
    pub url: String,
    /// The schema the store's tables live in, created if missing. Lowercase ASCII letters,
    /// digits and `_`, not starting with a digit, at most 63 bytes. Default `public`; give each
    /// service (or test) its own to keep them apart in one database.
    pub schema: String,
    /// Connections in the pool. Default 16. Once an owner registers
    /// ([`Store::register_owner`](crate::store::Store::register_owner), as every executor does
    /// before its first claim) the store holds one more, outside the pool: its liveness
    /// connection (see the [module documentation](super)).
    pub pool_size: usize,
    /// How long opening a connection may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long a call waits for a free connection of the pool. Default 30 s.
    pub pool_timeout: Duration,
    /// The server's `statement_timeout` for the store's connections: a statement running longer
    /// is cancelled (and its transaction rolled back). `None` keeps the server's setting.
    /// Default 30 s.
    pub statement_timeout: Option<Duration>,
    /// The server's `idle_in_transaction_session_timeout` for the store's connections: a
    /// transaction left open with no statement running for longer — its process stopped,
    /// frozen or cut off between two statements — is ended by the server and rolled back,
    /// releasing the rows it locked. Without it such a process keeps its rows from every other
    /// worker and relay (they claim with `FOR UPDATE SKIP LOCKED`, which passes over locked
    /// rows) for as long as it is frozen, whatever its lease says. The store never leaves a
    /// transaction idle on purpose: its transactions send their statements and commit. `None`
    /// keeps the server's setting. Default 10 s.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// How many times a transaction that failed for a serialization failure (`40001`) or a
    /// deadlock (`40P01`) is run again, after a short random backoff, before the error is
    /// returned. Default 8.
    pub retries: u32,
    /// TLS; `None` (the default) connects in plain text, as the URL's `sslmode` says.
    #[cfg(feature = "postgres-tls")]
    pub tls: Option<PostgresTls>,
}

impl PostgresOptions {
    /// Default options for the database at `url`.
    pub fn new(url: impl Into<String>) -> PostgresOptions {
        PostgresOptions {
            url: url.into(),
            schema: "public".to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            pool_timeout: Duration::from_secs(30),
            statement_timeout: Some(Duration::from_secs(30)),
            idle_in_transaction_timeout: Some(Duration::from_secs(10)),
            retries: 8,
            #[cfg(feature = "postgres-tls")]
            tls: None,
        }
    }

    /// The same options with another schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> PostgresOptions {
        self.schema = schema.into();
        self
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("PostgresOptions");
        s.field("url", &redacted_url(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_timeout", &self.pool_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("retries", &self.retries);
        #[cfg(feature = "postgres-tls")]
        s.field("tls", &self.tls);
        s.finish()
    }
}

/// The URL with any password replaced: `postgres://app:[redacted]@db/x`, or `password=[redacted]`
/// in the `key=value` form.
pub(crate) fn redacted_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest
            .split_once('/')
            .map_or((rest, None), |(a, p)| (a, Some(p)));
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:[redacted]@{host}"),
                None => format!("{userinfo}@{host}"),
            },
            None => authority.to_owned(),
        };
        let path = path.map(|p| {
            p.split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.ends_with("password") => format!("{k}=[redacted]"),
                    _ => kv.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("&")
        });
        match path {
            Some(p) => format!("{scheme}://{authority}/{p}"),
            None => format!("{scheme}://{authority}"),
        }
    } else {
        url.split_whitespace()
            .map(|kv| match kv.split_once('=') {
                Some(("password", _)) => "password=[redacted]".to_owned(),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Whether `schema` is a name this store accepts (it is written into DDL, so it is checked
/// rather than quoted).
fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63
}

struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_store.sql",
        sql: include_str!("../../migrations/postgres/0001_store.sql"),
    },
    Migration {
        version: 2,
        name: "0002_dead_letter_retries.sql",
        sql: include_str!("../../migrations/postgres/0002_dead_letter_retries.sql"),
    },
    Migration {
        version: 3,
        name: "0003_owners.sql",
        sql: include_str!("../../migrations/postgres/0003_owners.sql"),
    },
    Migration {
        version: 4,
        name: "0004_blocked_inputs.sql",
        sql: include_str!("../../migrations/postgres/0004_blocked_inputs.sql"),
    },
];

/// The advisory lock (one 64-bit key) held while migrating, so that two processes migrating
/// one database at once take turns. Entity locks use the two-key space, which never overlaps.
pub(crate) const MIGRATION_LOCK: i64 = 0x6566_6665_6374_7301;

/// The first key of the advisory locks on entity identities that do not exist yet (see
/// `store.rs`).
pub(crate) const ENTITY_LOCK_CLASS: i32 = 0x6566_6601;

/// The first key of the advisory locks that give the reports of one owner, consumer and topic
/// their turns (see `blocked.rs`).
pub(crate) const BLOCKED_LOCK_CLASS: i32 = 0x6566_6602;

pub(crate) struct Db {
    pool: Pool,
    retries: u32,
    pub(crate) location: String,
    pub(crate) schema: String,
    /// The owners registered through this handle and the connection holding their locks.
    pub(crate) liveness: super::liveness::Liveness,
}

/// An error of the PostgreSQL driver or server, with the server's message (the source of a
/// [`StoreError::Database`] of the PostgreSQL store).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PostgresError {
    message: String,
    #[source]
    source: tokio_postgres::Error,
}

impl PostgresError {
    /// The SQLSTATE the server reported, if the server reported the error.
    pub fn code(&self) -> Option<&SqlState> {
        self.source.code()
    }
}

impl From<tokio_postgres::Error> for PostgresError {
    fn from(source: tokio_postgres::Error) -> Self {
        PostgresError {
            message: describe(&source),
            source,
        }
    }
}

pub(crate) fn db_error(
    operation: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| StoreError::Database {
        operation,
        source: Box::new(PostgresError::from(e)),
    }
}

/// The SQLSTATE of a store error the server reported.
pub(crate) fn sql_state(e: &StoreError) -> Option<&SqlState> {
    let StoreError::Database { source, .. } = e else {
        return None;
    };
    source
        .downcast_ref::<PostgresError>()
        .and_then(PostgresError::code)
}

/// Whether running the transaction again may succeed: a serialization failure or a deadlock.
fn retryable(e: &StoreError) -> bool {
    sql_state(e).is_some_and(|c| {
        *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

impl Db {
    pub(super) async fn connect(options: &PostgresOptions) -> Result<Db, StoreError> {
        let db = Db::pool(options)?;
        let mut client = db.pool.get().await.map_err(|e| db.open_error(e))?;
        migrate(&mut client, &db.schema).await?;
        Ok(db)
    }

    /// Connects to a schema that must hold an effects store already: a schema that does not
    /// exist, or holds no `schema_version` whose first migration is `0001_store.sql`, is
    /// refused and nothing is created. A store of an older version gets the pending migrations,
    /// as [`Db::connect`] would give it.
    pub(super) async fn connect_existing(options: &PostgresOptions) -> Result<Db, StoreError> {
        const OP: &str = "looking for the store";
        let db = Db::pool(options)?;
        let refuse = |reason: String| StoreError::Open {
            location: db.location.clone(),
            source: reason.into(),
        };
        let mut client = db.pool.get().await.map_err(|e| db.open_error(e))?;
        let schema = client
            .query_opt(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                &[&db.schema],
            )
            .await
            .map_err(db_error(OP))?;
        if schema.is_none() {
            return Err(refuse(format!(
                "the schema `{}` does not exist: it is not an effects store",
                db.schema
            )));
        }
        let table = client
            .query_opt(
                "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'schema_version'",
                &[&db.schema],
            )
            .await
            .map_err(db_error(OP))?;
        if table.is_none() {
            return Err(refuse(format!(
                "the schema `{}` is not an effects store (no `schema_version` table)",
                db.schema
            )));
        }
        // The search path is the schema (see `pool`).
        let first: Option<String> = client
            .query_opt("SELECT name FROM schema_version WHERE version = 1", &[])
            .await
            .map_err(|e| {
                refuse(format!(
                    "the schema `{}` is not an effects store (its `schema_version` cannot be \
                     read: {})",
                    db.schema,
                    describe(&e)
                ))
            })?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(db_error(OP))?;
        if first.as_deref() != Some(MIGRATIONS[0].name) {
            return Err(refuse(format!(
                "the schema `{}` is not an effects store (its `schema_version` does not start \
                 with {})",
                db.schema, MIGRATIONS[0].name
            )));
        }
        // Up to date: nothing to write (an operator's role may not be allowed to), only the
        // recorded migrations to check. Otherwise the pending ones are applied.
        let applied: Vec<(i64, String, String)> = client
            .query(
                "SELECT version, name, sha256 FROM schema_version ORDER BY version",
                &[],
            )
            .await
            .map_err(db_error(OP))?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(db_error(OP))?;
        check_recorded(&applied)?;
        if MIGRATIONS
            .iter()
            .any(|m| !applied.iter().any(|(v, _, _)| *v == m.version))
        {
            migrate(&mut client, &db.schema).await?;
        }
        Ok(db)
    }

    /// Why the first connection failed, with the server's or the driver's cause (the pool's own
    /// message says only that creating a connection failed).
    fn open_error(&self, e: deadpool_postgres::PoolError) -> StoreError {
        let reason = match &e {
            deadpool_postgres::PoolError::Backend(e) => {
                format!("cannot connect: {}", describe(e))
            }
            deadpool_postgres::PoolError::Timeout(_) => {
                "cannot connect: the server did not answer in time".to_owned()
            }
            other => format!("cannot connect: {other}"),
        };
        StoreError::Open {
            location: self.location.clone(),
            source: reason.into(),
        }
    }

    /// The pool, checked options; no connection is opened yet.
    fn pool(options: &PostgresOptions) -> Result<Db, StoreError> {
        let location = format!("{} (schema {})", redacted_url(&options.url), options.schema);
        let open_error = |reason: String| StoreError::Open {
            location: location.clone(),
            source: reason.into(),
        };
        if !valid_schema(&options.schema) {
            return Err(open_error(format!(
                "the schema name `{}` is not accepted: use lowercase ASCII letters, digits and \
                 `_`, not starting with a digit, at most 63 bytes",
                options.schema
            )));
        }
        if options.pool_size == 0 {
            return Err(open_error("the pool size must be at least 1".to_owned()));
        }
        let mut config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| open_error(format!("the URL cannot be parsed: {e}")))?;
        let mut startup = config.get_options().unwrap_or_default().to_owned();
        startup.push_str(&format!(" -c search_path={}", options.schema));
        if let Some(timeout) = options.statement_timeout {
            startup.push_str(&format!(
                " -c statement_timeout={}",
                timeout.as_millis().max(1)
            ));
        }
        if let Some(timeout) = options.idle_in_transaction_timeout {
            startup.push_str(&format!(
                " -c idle_in_transaction_session_timeout={}",
                timeout.as_millis().max(1)
            ));
        }
        config.options(startup.trim());
        if config.get_application_name().is_none() {
            config.application_name("effects");
        }
        config.connect_timeout(options.connect_timeout);
        let liveness = super::liveness::Liveness::new(
            config.clone(),
            #[cfg(feature = "postgres-tls")]
            options.tls.clone(),
            location.clone(),
        );

        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        #[cfg(feature = "postgres-tls")]
        let manager = match &options.tls {
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Manager::from_config(config, tls.connector()?, manager_config)
            }
            None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
        };
        #[cfg(not(feature = "postgres-tls"))]
        let manager = Manager::from_config(config, tokio_postgres::NoTls, manager_config);
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.pool_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| open_error(format!("the pool cannot be built: {e}")))?;
        let db = Db {
            pool,
            retries: options.retries,
            location,
            schema: options.schema.clone(),
            liveness,
        };
        Ok(db)
    }

    pub(crate) async fn client(&self, operation: &'static str) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Database {
            operation,
            source: Box::new(e),
        })
    }

    /// Waits before the `attempt`th retry: 5 ms doubling, capped at 200 ms, with full jitter.
    async fn backoff(attempt: u32) {
        let cap = 5u64.saturating_mul(1 << attempt.min(6)).min(200);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        tokio::time::sleep(Duration::from_millis(1 + random % cap)).await;
    }

    /// Runs `body` in one transaction at `isolation` and commits, again from the start (on a
    /// fresh transaction) after a serialization failure or a deadlock, at most `retries` times.
    pub(crate) async fn transaction<T, F>(
        &self,
        operation: &'static str,
        isolation: Isolation,
        mut body: F,
    ) -> Result<T, StoreError>
    where
        F: for<'t> FnMut(&'t Transaction<'t>) -> BoxFuture<'t, Result<T, StoreError>>,
    {
        let mut attempt = 0;
        loop {
            let result = async {
                let mut client = self.client(operation).await?;
                let tx = client
                    .build_transaction()
                    .isolation_level(isolation.level())
                    .read_only(isolation == Isolation::Snapshot)
                    .start()
                    .await
                    .map_err(db_error(operation))?;
                let out = body(&tx).await?;
                tx.commit().await.map_err(db_error(operation))?;
                Ok(out)
            }
            .await;
            match result {
                Err(e) if attempt < self.retries && retryable(&e) => {
                    attempt += 1;
                    tracing::debug!(operation, attempt, error = %e, "retrying the transaction");
                    Db::backoff(attempt).await;
                }
                other => return other,
            }
        }
    }
}

/// A boxed future borrowing a transaction.
pub(crate) type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a transaction isolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isolation {
    /// `READ COMMITTED` with explicit row locks: every write.
    Write,
    /// `REPEATABLE READ READ ONLY`: reads of several statements that must see one snapshot.
    Snapshot,
}

impl Isolation {
    fn level(self) -> IsolationLevel {
        match self {
            Isolation::Write => IsolationLevel::ReadCommitted,
            Isolation::Snapshot => IsolationLevel::RepeatableRead,
        }
    }
}

/// Prepares `sqls` through the connection's cache of prepared statements. Statements sent
/// together afterwards go out in the order they are first polled (a statement still to be
/// prepared would wait for its own round trip and go out after the others), and the server runs
/// them in that order: one round trip for all of them.
pub(crate) async fn prepare_all(
    tx: &Transaction<'_>,
    operation: &'static str,
    sqls: &[&str],
) -> Result<Vec<tokio_postgres::Statement>, StoreError> {
    super::pipeline::all(sqls.iter().map(|sql| tx.prepare_cached(sql)))
        .await
        .map_err(db_error(operation))
}

/// Statements through the connection's cache of prepared statements.
pub(crate) async fn query(
    tx: &Transaction<'_>,
    operation: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(db_error(operation))?;
    tx.query(&statement, params)
        .await
        .map_err(db_error(operation))
}

pub(crate) async fn query_opt(
    tx: &Transaction<'_>,
    operation: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(db_error(operation))?;
    tx.query_opt(&statement, params)
        .await
        .map_err(db_error(operation))
}

pub(crate) async fn query_one(
    tx: &Transaction<'_>,
    operation: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Row, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(db_error(operation))?;
    tx.query_one(&statement, params)
        .await
        .map_err(db_error(operation))
}

pub(crate) async fn execute(
    tx: &Transaction<'_>,
    operation: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(db_error(operation))?;
    tx.execute(&statement, params)
        .await
        .map_err(db_error(operation))
}

fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

/// Refuses recorded migrations this library does not know (a newer version migrated the
/// schema) or whose file changed since they were applied.
fn check_recorded(applied: &[(i64, String, String)]) -> Result<(), StoreError> {
    for (version, name, sha) in applied {
        match MIGRATIONS.iter().find(|m| m.version == *version) {
            None => {
                return Err(StoreError::Migration {
                    version: *version,
                    name: name.clone(),
                    reason: format!(
                        "is recorded in the database but unknown to this library (it knows up to \
                         version {}): the database was migrated by a newer version",
                        MIGRATIONS.len()
                    ),
                });
            }
            Some(m) if sha256_hex(m.sql) != *sha => {
                return Err(StoreError::Migration {
                    version: *version,
                    name: name.clone(),
                    reason: "was changed after it was applied: its SHA-256 differs from the \
                             recorded one; add a new migration instead of editing this one"
                        .to_owned(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Applies the pending migrations in one transaction, under an advisory lock so that processes
/// starting together take turns; refuses a database whose recorded migrations differ from the
/// files or come from a newer version.
async fn migrate(client: &mut Object, schema: &str) -> Result<(), StoreError> {
    const OP: &str = "applying migrations";
    let tx = client.transaction().await.map_err(db_error(OP))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error(OP))?;
    // The schema name was checked by `valid_schema`: it cannot carry anything but a name.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (
             version       bigint PRIMARY KEY,
             name          text   NOT NULL,
             sha256        text   NOT NULL,
             applied_at_ms bigint NOT NULL
         );"
    ))
    .await
    .map_err(db_error(OP))?;
    let applied: Vec<(i64, String, String)> = tx
        .query(
            "SELECT version, name, sha256 FROM schema_version ORDER BY version",
            &[],
        )
        .await
        .map_err(db_error(OP))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db_error(OP))?;
    check_recorded(&applied)?;
    for m in MIGRATIONS {
        if applied.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| StoreError::Migration {
                version: m.version,
                name: m.name.to_owned(),
                reason: format!("failed: {}", describe(&e)),
            })?;
        tx.execute(
            "INSERT INTO schema_version (version, name, sha256, applied_at_ms) \
             VALUES ($1, $2, $3, effects_now_ms())",
            &[&m.version, &m.name, &sha256_hex(m.sql)],
        )
        .await
        .map_err(db_error(OP))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            schema,
            "applied migration"
        );
    }
    tx.commit().await.map_err(db_error(OP))
}

/// The server's message of an error, when it has one (tokio-postgres's `Display` says only
/// "db error"), or the driver's with its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match (e.as_db_error(), e.source()) {
        (Some(db), _) => db.to_string(),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{redacted_url, valid_schema};

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted_url("postgres://app:s3cret@db:5432/x?sslmode=require&password=p2"),
            "postgres://app:[redacted]@db:5432/x?sslmode=require&password=[redacted]"
        );
        assert_eq!(redacted_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redacted_url("host=db user=app password=s3cret"),
            "host=db user=app password=[redacted]"
        );
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        for ok in ["public", "effects_1", "_x"] {
            assert!(valid_schema(ok), "{ok}");
        }
        for bad in ["", "1x", "Public", "a-b", "a;drop", "a b", &"x".repeat(64)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }
}
