//! The stores a conformance case runs against: a fresh database per case, a second handle on it
//! (as another process would open), raw SQL to count at the source, and real database errors
//! injected through triggers.
//!
//! SQLite always; PostgreSQL with the `postgres` feature, each case in a database of its own
//! (`effects_<pid>_<n>`), dropped afterwards.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use effects_core::store::{SqliteStore, Store};
use effects_core::transport::SqliteLog;

#[cfg(feature = "postgres")]
pub mod postgres;

/// A database under test.
pub trait Backend: Clone + Send + Sync + 'static {
    /// The store on it.
    type Store: Store + Clone + std::fmt::Debug;

    /// The backend's name, for messages.
    const NAME: &'static str;

    /// A handle on the database, as a process opening it would get (its own connections).
    fn open(&self) -> impl Future<Output = Self::Store> + Send;

    /// A directory of the case's own, for the broker's file.
    fn dir(&self) -> &Path;

    /// The store as `effects-liveness-child --store` takes it: `sqlite:PATH` or
    /// `postgres:URL`.
    fn child_store(&self) -> String;

    /// One integer from raw SQL (`SELECT COUNT(*) ...`, written to run on both databases).
    fn count(&self, sql: &str) -> impl Future<Output = i64> + Send;

    /// Raw SQL statements.
    fn exec(&self, sql: &str) -> impl Future<Output = ()> + Send;

    /// Makes every insert into `table` whose new row satisfies `condition` (SQL on `NEW`, such
    /// as `NEW.run_key = 'b2'`, or `TRUE`) fail with `message`: a real database error in the
    /// middle of the store's transaction.
    fn fail_inserts(
        &self,
        table: &str,
        condition: &str,
        message: &str,
    ) -> impl Future<Output = ()> + Send;

    /// Removes what [`Backend::fail_inserts`] added to `table`.
    fn heal(&self, table: &str) -> impl Future<Output = ()> + Send;

    /// Ends the case: drops its database and removes its directory.
    fn destroy(&self) -> impl Future<Output = ()> + Send;

    /// Committed transactions per run key, from the `transactions` table: one row per applied
    /// run, never deduplicated.
    fn transactions_per_key(&self) -> impl Future<Output = BTreeMap<String, i64>> + Send;

    /// The broker of the case: the SQLite log in a file of its own, an external transport for
    /// both stores.
    fn broker(&self) -> SqliteLog {
        SqliteLog::open(self.broker_path()).expect("open the broker's file")
    }

    /// The broker's file, for raw SQL (fault injection).
    fn broker_path(&self) -> PathBuf {
        self.dir().join("broker.db")
    }
}

/// Runs `case` on `backend` in a task of its own, drops the database whatever the outcome, and
/// fails if the case failed.
pub async fn run_case<B, F, Fut>(backend: B, case: F)
where
    B: Backend,
    F: FnOnce(B) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(case(backend.clone())).await;
    backend.destroy().await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the case did not finish: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite.

/// A SQLite file per case.
#[derive(Clone, Debug)]
pub struct Sqlite {
    dir: Arc<PathBuf>,
}

impl Sqlite {
    pub async fn create(name: &str) -> Sqlite {
        Sqlite {
            dir: Arc::new(super::support::temp_dir(name)),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("store.db")
    }

    fn exec_now(&self, sql: &str) {
        self.connection()
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("`{sql}`: {e}"));
    }

    fn connection(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.path()).expect("open the database file");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn
    }
}

impl Backend for Sqlite {
    type Store = SqliteStore;
    const NAME: &'static str = "sqlite";

    fn open(&self) -> impl Future<Output = SqliteStore> + Send {
        let store = SqliteStore::open(self.path()).expect("open the store");
        async move { store }
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn child_store(&self) -> String {
        format!("sqlite:{}", self.path().display())
    }

    fn count(&self, sql: &str) -> impl Future<Output = i64> + Send {
        let n = self
            .connection()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("`{sql}`: {e}"));
        async move { n }
    }

    fn exec(&self, sql: &str) -> impl Future<Output = ()> + Send {
        self.exec_now(sql);
        async {}
    }

    fn fail_inserts(
        &self,
        table: &str,
        condition: &str,
        message: &str,
    ) -> impl Future<Output = ()> + Send {
        self.exec_now(&format!(
            "CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} WHEN {condition} \
             BEGIN SELECT RAISE(ABORT, '{message}'); END;"
        ));
        async {}
    }

    fn heal(&self, table: &str) -> impl Future<Output = ()> + Send {
        self.exec_now(&format!("DROP TRIGGER fail_{table};"));
        async {}
    }

    async fn destroy(&self) {
        let _ = std::fs::remove_dir_all(&*self.dir);
    }

    fn transactions_per_key(&self) -> impl Future<Output = BTreeMap<String, i64>> + Send {
        let conn = self.connection();
        let mut stmt = conn
            .prepare("SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key")
            .expect("prepare");
        let map: BTreeMap<String, i64> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        async move { map }
    }
}
