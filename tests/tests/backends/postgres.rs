//! PostgreSQL for the tests: the machine's server at 127.0.0.1:5432 (user postgres, trust), a
//! database per case, and private servers that a fault test may stop and start.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use effects_core::postgres::{PostgresOptions, PostgresStore};

use super::Backend;

/// Where the suite expects PostgreSQL.
pub const HOST: &str = "127.0.0.1";
/// Its port.
pub const PORT: u16 = 5432;

fn required(reason: &str) -> String {
    format!(
        "PostgreSQL is required at {HOST}:{PORT} (user postgres, trust authentication) for the \
         `postgres` store tests, and {reason}. Start it with \
         `pg_ctlcluster --skip-systemctl-redirect 15 main start`, or run the tests without the \
         `postgres` feature."
    )
}

/// A client of `dbname` on the server at `port`, its connection driven by a task.
pub async fn client(
    port: u16,
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(HOST)
        .port(port)
        .user("postgres")
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(5))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The server's message for an error (tokio-postgres's own says only "db error").
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), ToString::to_string)
}

/// A database of its own on the machine's server: `effects_<pid>_<n>`.
#[derive(Clone, Debug)]
pub struct Postgres {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    port: u16,
    name: String,
    dir: PathBuf,
    raw: tokio_postgres::Client,
}

impl Postgres {
    /// Creates a fresh database on the machine's server; fails saying how to start PostgreSQL
    /// when it is not there.
    pub async fn create(case: &str) -> Postgres {
        Postgres::create_on(PORT, case).await
    }

    /// Creates a fresh database on the server at `port`.
    pub async fn create_on(port: u16, case: &str) -> Postgres {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let admin = client(port, "postgres")
            .await
            .unwrap_or_else(|e| panic!("{}", required(&format!("connecting failed: {e}"))));
        let name = format!(
            "effects_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The name is made here of two numbers: nothing from outside reaches this DDL.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("`{sql}` failed: {}", message(&e)));
        }
        let raw = client(port, &name)
            .await
            .unwrap_or_else(|e| panic!("connecting to {name}: {e}"));
        Postgres {
            inner: Arc::new(Inner {
                port,
                dir: super::super::support::temp_dir(case),
                name,
                raw,
            }),
        }
    }

    /// The database's URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@{HOST}:{}/{}",
            self.inner.port, self.inner.name
        )
    }

    /// The options a case's store is opened with.
    pub fn options(&self) -> PostgresOptions {
        PostgresOptions {
            pool_size: 8,
            ..PostgresOptions::new(self.url())
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The raw client on the database.
    pub fn raw(&self) -> &tokio_postgres::Client {
        &self.inner.raw
    }
}

impl Backend for Postgres {
    type Store = PostgresStore;
    const NAME: &'static str = "postgres";

    fn open(&self) -> impl Future<Output = PostgresStore> + Send {
        let options = self.options();
        async move {
            PostgresStore::connect(options)
                .await
                .unwrap_or_else(|e| panic!("{}", required(&format!("the store failed: {e}"))))
        }
    }

    fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn child_store(&self) -> String {
        format!("postgres:{}", self.url())
    }

    fn count(&self, sql: &str) -> impl Future<Output = i64> + Send {
        let sql = sql.to_owned();
        async move {
            let row = self
                .inner
                .raw
                .query_one(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("`{sql}`: {}", message(&e)));
            row.get(0)
        }
    }

    fn exec(&self, sql: &str) -> impl Future<Output = ()> + Send {
        let sql = sql.to_owned();
        async move {
            self.inner
                .raw
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("`{sql}`: {}", message(&e)));
        }
    }

    fn fail_inserts(
        &self,
        table: &str,
        condition: &str,
        message: &str,
    ) -> impl Future<Output = ()> + Send {
        let sql = format!(
            "CREATE FUNCTION fail_{table}() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF {condition} THEN RAISE EXCEPTION '{message}'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} \
             FOR EACH ROW EXECUTE FUNCTION fail_{table}();"
        );
        async move { self.exec(&sql).await }
    }

    fn heal(&self, table: &str) -> impl Future<Output = ()> + Send {
        let sql = format!("DROP TRIGGER fail_{table} ON {table}; DROP FUNCTION fail_{table}();");
        async move { self.exec(&sql).await }
    }

    fn destroy(&self) -> impl Future<Output = ()> + Send {
        let (port, name) = (self.inner.port, self.inner.name.clone());
        let _ = std::fs::remove_dir_all(&self.inner.dir);
        async move {
            if let Ok(admin) = client(port, "postgres").await {
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    }

    async fn transactions_per_key(&self) -> BTreeMap<String, i64> {
        self.inner
            .raw
            .query(
                "SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key",
                &[],
            )
            .await
            .expect("transactions per key")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// A private server, to stop and start.

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of the test's own on a free loopback port: `initdb -A trust -U
/// postgres` into a temporary directory owned by the postgres user, run with `pg_ctl` as that
/// user. Stopped (immediately) when dropped.
#[derive(Debug)]
pub struct PrivateServer {
    pub port: u16,
    data: PathBuf,
    root: PathBuf,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("runuser -u postgres -- {args:?}: {e}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((HOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PrivateServer {
    /// Initialises and starts a server; fails saying what is missing.
    pub fn start(name: &str) -> PrivateServer {
        let initdb = format!("{BIN}/initdb");
        assert!(
            Path::new(&initdb).exists(),
            "the fault test needs PostgreSQL 15's server binaries in {BIN} (apt-get install \
             postgresql-15) and the `postgres` user"
        );
        let root = std::env::temp_dir().join(format!(
            "effects-pg-{name}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the server's directory");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&root)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown the server's directory to postgres");
        let data = root.join("data");
        let data_s = data.to_str().expect("a UTF-8 path");
        let out = as_postgres(&[&initdb, "-A", "trust", "-U", "postgres", "-D", data_s]);
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = PrivateServer {
            port: free_port(),
            data,
            root,
        };
        server.up();
        server
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let pg_ctl = format!("{BIN}/pg_ctl");
        let data = self.data.to_str().expect("a UTF-8 path").to_owned();
        let log = self.root.join("server.log");
        let log = log.to_str().expect("a UTF-8 path").to_owned();
        let mut all = vec![pg_ctl.as_str(), "-D", data.as_str(), "-l", log.as_str()];
        all.extend_from_slice(args);
        as_postgres(&all)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -c listen_addresses={HOST} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.root.display()
        );
        let out = self.ctl(&["-w", "-t", "30", "-o", &options, "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server at once (`-m immediate`: like a crash, connections cut).
    pub fn down(&self) {
        let out = self.ctl(&["-w", "-t", "30", "-m", "immediate", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.ctl(&["-w", "-t", "30", "-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
