//! The database handle the SQLite store and the SQLite log share: connections, options,
//! migrations.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::clock::Clock;
use super::liveness::Liveness;
use crate::store::{Colocation, Millis, StoreError, now_millis};

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Commits survive a crash of the process but the last ones may be lost on power failure
    /// (WAL is synced at checkpoints only). Consistent either way.
    Normal,
    /// Every commit is synced to disk before it returns: the default, for money.
    #[default]
    Full,
    /// Like `Full`, and the directory is synced too.
    Extra,
}

impl Synchronous {
    const fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// Where a store call's blocking SQLite work runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Blocking {
    /// On the calling worker thread through [`tokio::task::block_in_place`] when the runtime is
    /// multi-threaded (tokio moves the thread's other tasks elsewhere meanwhile), on the
    /// blocking pool otherwise. Saves two thread wake-ups per call: the default.
    #[default]
    InPlace,
    /// Always on tokio's blocking pool ([`tokio::task::spawn_blocking`]).
    Pool,
}

/// Options of a [`SqliteStore`](super::SqliteStore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Durability of commits. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// How long a write waits for another process's write lock before failing. Default 5 s.
    pub busy_timeout: Duration,
    /// Reader connections for a file database. Default 2.
    pub readers: usize,
    /// Prepared statements cached per connection. Default 64.
    pub statement_cache: usize,
    /// Where the blocking work runs. Default [`Blocking::InPlace`].
    pub blocking: Blocking,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            readers: 2,
            statement_cache: 64,
            blocking: Blocking::InPlace,
        }
    }
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
        sql: include_str!("../../migrations/sqlite/0001_store.sql"),
    },
    Migration {
        version: 2,
        name: "0002_log.sql",
        sql: include_str!("../../migrations/sqlite/0002_log.sql"),
    },
    Migration {
        version: 3,
        name: "0003_fencing.sql",
        sql: include_str!("../../migrations/sqlite/0003_fencing.sql"),
    },
    Migration {
        version: 4,
        name: "0004_dead_letter_retries.sql",
        sql: include_str!("../../migrations/sqlite/0004_dead_letter_retries.sql"),
    },
    Migration {
        version: 5,
        name: "0005_owners.sql",
        sql: include_str!("../../migrations/sqlite/0005_owners.sql"),
    },
    Migration {
        version: 6,
        name: "0006_clock.sql",
        sql: include_str!("../../migrations/sqlite/0006_clock.sql"),
    },
    Migration {
        version: 7,
        name: "0007_log_given_back.sql",
        sql: include_str!("../../migrations/sqlite/0007_log_given_back.sql"),
    },
    Migration {
        version: 8,
        name: "0008_blocked_inputs.sql",
        sql: include_str!("../../migrations/sqlite/0008_blocked_inputs.sql"),
    },
];

pub(crate) struct Db {
    blocking: Blocking,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    pub(crate) location: String,
    pub(crate) colocation: Colocation,
    /// Woken when messages are appended to the log, so consumers in this process need not poll.
    pub(crate) appended: Notify,
    /// The store's clock, as this process reads it.
    pub(crate) clock: Clock,
    /// The owners registered through this handle, with their locks (dropped with it).
    pub(crate) liveness: Liveness,
    /// The `synchronous` setting of the writer's ordinary transactions.
    synchronous: Synchronous,
}

impl Drop for Db {
    /// Closes the readers first and checkpoints the write-ahead log into the database file, so
    /// that once the last handle is gone the file alone holds everything (the writer, closing
    /// last, then removes the `-wal` file). A read-only reader closing last could not.
    fn drop(&mut self) {
        self.readers.clear();
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = writer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::warn!(location = %self.location, error = %e, "checkpoint on close failed: the data is safe in the -wal file");
        }
    }
}

pub(crate) trait Ctx<T> {
    fn ctx(self, operation: &'static str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, operation: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Database {
            operation,
            source: Box::new(e),
        })
    }
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while the lock was held rolled its transaction back when the `Transaction` was
    // dropped during unwinding, so the connection is usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn task_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Task {
        reason: e.to_string(),
    }
}

impl Db {
    pub(super) fn open(path: Option<&Path>, options: &SqliteOptions) -> Result<Db, StoreError> {
        let location = path.map_or_else(|| ":memory:".to_owned(), |p| p.display().to_string());
        let open_error = |e: rusqlite::Error| StoreError::Open {
            location: location.clone(),
            source: Box::new(e),
        };
        let configure = |conn: &Connection| -> rusqlite::Result<()> {
            conn.busy_timeout(options.busy_timeout)?;
            conn.set_prepared_statement_cache_capacity(options.statement_cache);
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.pragma_update(None, "synchronous", options.synchronous.pragma())?;
            Ok(())
        };
        let mut writer = match path {
            Some(p) => Connection::open_with_flags(
                p,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            ),
            None => Connection::open_in_memory(),
        }
        .map_err(open_error)?;
        // SQLite opens a file it may not write read-only without saying so; every write would
        // then fail later, half-way through some operation. Refuse now.
        if writer.is_readonly(rusqlite::MAIN_DB).map_err(open_error)? {
            return Err(StoreError::Open {
                location,
                source: "the database file (or its directory) is read-only: the store writes \
                         every run; give the process write access to the file and its directory"
                    .into(),
            });
        }
        configure(&writer).map_err(open_error)?;
        if path.is_some() {
            let mode: String = writer
                .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
                .map_err(open_error)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Open {
                    location,
                    source: format!("the database refused WAL mode (journal_mode is `{mode}`)")
                        .into(),
                });
            }
        }
        migrate(&mut writer)?;
        let mut readers = Vec::new();
        if let Some(p) = path {
            for _ in 0..options.readers.max(1) {
                let reader = Connection::open_with_flags(
                    p,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(open_error)?;
                configure(&reader).map_err(open_error)?;
                readers.push(Mutex::new(reader));
            }
        }
        Ok(Db {
            blocking: options.blocking,
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            location,
            colocation: Colocation::new(),
            appended: Notify::new(),
            clock: Clock::default(),
            liveness: Liveness::new(path),
            synchronous: options.synchronous,
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the writer, on the blocking pool.
    pub(crate) fn write<T, F>(
        self: &Arc<Self>,
        operation: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = Arc::clone(self);
        async move { db.blocking(move |db| db.write_blocking(operation, f)).await }
    }

    /// [`Db::write`], with the store's time at the start of the transaction (see
    /// [`Clock`](super::clock)).
    pub(crate) fn write_at<T, F>(
        self: &Arc<Self>,
        operation: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        F: FnOnce(&Transaction<'_>, Millis) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = Arc::clone(self);
        async move {
            db.blocking(move |db| db.write_at_blocking(operation, f))
                .await
        }
    }

    /// [`Db::write_at`] on the calling thread.
    pub(crate) fn write_at_blocking<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Transaction<'_>, Millis) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_blocking(operation, |tx| {
            let now = self.clock.advance(tx)?;
            f(tx, now)
        })
    }

    /// [`Db::write_at`] for a transaction whose loss on a power failure loses nothing: its
    /// commit does not wait for the disk (`synchronous = NORMAL` for it alone, in WAL mode the
    /// database stays consistent either way), and the next ordinary commit makes it durable
    /// with its own sync. The log's leases (fetches, heartbeats, give-backs) are such writes:
    /// lost, a lease ends early and its message is delivered again, which every consumer
    /// absorbs.
    pub(crate) fn write_lazy_at<T, F>(
        self: &Arc<Self>,
        operation: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        F: FnOnce(&Transaction<'_>, Millis) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = Arc::clone(self);
        async move {
            db.blocking(move |db| {
                if db.synchronous == Synchronous::Normal {
                    return db.write_at_blocking(operation, f);
                }
                let mut conn = lock(&db.writer);
                conn.pragma_update(None, "synchronous", Synchronous::Normal.pragma())
                    .ctx(operation)?;
                let out = (|| {
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .ctx(operation)?;
                    let now = db.clock.advance(&tx)?;
                    let out = f(&tx, now)?;
                    tx.commit().ctx(operation)?;
                    Ok(out)
                })();
                // Whatever happened, the writer's ordinary transactions sync as configured.
                conn.pragma_update(None, "synchronous", db.synchronous.pragma())
                    .ctx(operation)?;
                out
            })
            .await
        }
    }

    /// Runs blocking work per [`Blocking`].
    pub(crate) async fn blocking<T, F>(self: Arc<Self>, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let in_place = self.blocking == Blocking::InPlace
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if in_place {
            tokio::task::block_in_place(|| f(&self))
        } else {
            tokio::task::spawn_blocking(move || f(&self))
                .await
                .map_err(task_error)?
        }
    }

    pub(crate) fn write_blocking<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx(operation)?;
        let out = f(&tx)?;
        tx.commit().ctx(operation)?;
        Ok(out)
    }

    /// Runs `f` in a read transaction (one snapshot) on a reader, on the blocking pool.
    pub(crate) fn read<T, F>(
        self: &Arc<Self>,
        operation: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = Arc::clone(self);
        async move { db.blocking(move |db| db.read_blocking(operation, f)).await }
    }

    /// [`Db::read`], with the store's time at the start of the transaction.
    pub(crate) fn read_at<T, F>(
        self: &Arc<Self>,
        operation: &'static str,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        F: FnOnce(&Connection, Millis) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let db = Arc::clone(self);
        async move {
            db.blocking(move |db| {
                db.read_blocking(operation, |conn| {
                    let now = db.clock.observe(conn)?;
                    f(conn, now)
                })
            })
            .await
        }
    }

    /// [`Db::read`] on the calling thread.
    pub(crate) fn read_blocking<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = if self.readers.is_empty() {
            lock(&self.writer)
        } else {
            let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
            lock(&self.readers[i])
        };
        let tx = conn.unchecked_transaction().ctx(operation)?;
        let out = f(&tx)?;
        tx.finish().ctx(operation)?;
        Ok(out)
    }
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

/// Whether every migration is recorded with its checksum, read without taking the write lock:
/// a process opening a database that is up to date must not wait behind another process that
/// is writing without pause.
fn up_to_date(conn: &Connection) -> bool {
    let read = || -> rusqlite::Result<Vec<(i64, String)>> {
        let mut stmt =
            conn.prepare("SELECT version, sha256 FROM schema_version ORDER BY version")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
    };
    read().is_ok_and(|applied| {
        applied.len() == MIGRATIONS.len()
            && applied
                .iter()
                .zip(MIGRATIONS)
                .all(|((v, sha), m)| *v == m.version && *sha == sha256_hex(m.sql))
    })
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    const OP: &str = "applying migrations";
    if up_to_date(conn) {
        return Ok(());
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version       INTEGER PRIMARY KEY,
             name          TEXT    NOT NULL,
             sha256        TEXT    NOT NULL,
             applied_at_ms INTEGER NOT NULL
         )",
    )
    .ctx(OP)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx(OP)?;
    let applied: Vec<(i64, String, String)> = {
        let mut stmt = tx
            .prepare("SELECT version, name, sha256 FROM schema_version ORDER BY version")
            .ctx(OP)?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .ctx(OP)?
            .collect::<rusqlite::Result<_>>()
            .ctx(OP)?
    };
    for (version, name, sha) in &applied {
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
    for m in MIGRATIONS {
        if applied.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        tx.execute_batch(m.sql).map_err(|e| StoreError::Migration {
            version: m.version,
            name: m.name.to_owned(),
            reason: format!("failed: {e}"),
        })?;
        tx.execute(
            "INSERT INTO schema_version (version, name, sha256, applied_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![m.version, m.name, sha256_hex(m.sql), now_millis()],
        )
        .ctx(OP)?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    tx.commit().ctx(OP)
}
