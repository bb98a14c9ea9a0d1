//! Liveness of the owners registered through a PostgreSQL store: one session-level advisory
//! lock per owner, held on a connection of the store's own (outside the pool) for as long as
//! the store handle lives, and the reaper that takes over from owners whose session is gone.
//! The module documentation of the PostgreSQL backend has the picture and the window.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::{Client, Config, NoTls};

use super::db::{Db, Isolation, MIGRATION_LOCK, db_error, execute, query};
use super::store::get;
use crate::store::{Reaped, StoreError};

/// How often the liveness connection is checked when nothing else says it is lost.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long a check may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest pause between two attempts to reconnect.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Owners checked per reap.
const REAP_LIMIT: i64 = 1000;

/// The owners registered through one store handle and the connection holding their locks.
pub(crate) struct Liveness {
    shared: Arc<Shared>,
}

struct Shared {
    /// The pool's configuration, with TCP keepalives and its own application name.
    config: Config,
    #[cfg(feature = "postgres-tls")]
    tls: Option<super::db::PostgresTls>,
    location: String,
    /// Each registered owner's current lock key.
    keys: Mutex<HashMap<String, i64>>,
    session: tokio::sync::Mutex<Session>,
    /// Dropped with the store handle: the supervisor then stops.
    stop: watch::Sender<()>,
}

#[derive(Default)]
struct Session {
    /// The connection holding the locks; `None` while it is lost.
    client: Option<Client>,
    /// Resolves when that connection ends, with why.
    lost: Option<oneshot::Receiver<String>>,
    /// Whether the supervisor runs.
    supervised: bool,
}

fn random_key() -> i64 {
    // Bounded: a key equal to the migration lock's is drawn again (one in 2^63).
    loop {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let key = i64::try_from(random >> 1).unwrap_or(i64::MAX);
        if key != MIGRATION_LOCK && key != 0 {
            return key;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Liveness {
    /// Liveness for a store whose pool connects with `config`. Nothing is opened until an
    /// owner registers.
    pub(crate) fn new(
        mut config: Config,
        #[cfg(feature = "postgres-tls")] tls: Option<super::db::PostgresTls>,
        location: String,
    ) -> Liveness {
        // A killed process's connection is closed by its kernel at once; a machine that
        // vanishes is noticed by the server's keepalives (about 25 s), and by ours the other
        // way round.
        let mut options = config.get_options().unwrap_or_default().to_owned();
        options.push_str(
            " -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
        );
        config.options(options.trim());
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let name = config
            .get_application_name()
            .unwrap_or("effects")
            .to_owned();
        config.application_name(format!("{name} liveness"));
        let (stop, _) = watch::channel(());
        Liveness {
            shared: Arc::new(Shared {
                config,
                #[cfg(feature = "postgres-tls")]
                tls,
                location,
                keys: Mutex::new(HashMap::new()),
                session: tokio::sync::Mutex::new(Session::default()),
                stop,
            }),
        }
    }

    /// The lock key of `owner`, if it is registered through this handle.
    pub(crate) fn key_of(&self, owner: &str) -> Option<i64> {
        lock(&self.shared.keys).get(owner).copied()
    }

    /// Registers `owner`: its lock on the liveness connection (opened if needed), then its row.
    pub(crate) async fn register(&self, owner: &str) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut session = shared.session.lock().await;
        if self.key_of(owner).is_some() {
            // Registered; while the connection is lost, the supervisor registers it again.
            return Ok(());
        }
        if session.client.is_none() {
            shared.reconnect(&mut session).await?;
        }
        if !session.supervised {
            session.supervised = true;
            tokio::spawn(supervise(Arc::downgrade(shared), shared.stop.subscribe()));
        }
        let client = session
            .client
            .as_ref()
            .ok_or_else(|| StoreError::Database {
                operation: "registering an owner",
                source: "the liveness connection is not open".into(),
            })?;
        let key = register_on(client, owner).await?;
        lock(&shared.keys).insert(owner.to_owned(), key);
        tracing::debug!(owner, key, "owner registered");
        Ok(())
    }
}

impl Shared {
    /// Opens the liveness connection and registers every known owner on it with a new lock.
    async fn reconnect(&self, session: &mut Session) -> Result<(), StoreError> {
        let (client, lost) = self.open().await?;
        let owners: Vec<String> = lock(&self.keys).keys().cloned().collect();
        for owner in owners {
            let key = register_on(&client, &owner).await?;
            lock(&self.keys).insert(owner, key);
        }
        session.client = Some(client);
        session.lost = Some(lost);
        Ok(())
    }

    async fn open(&self) -> Result<(Client, oneshot::Receiver<String>), StoreError> {
        const OP: &str = "opening the liveness connection";
        let (tx, rx) = oneshot::channel();
        #[cfg(feature = "postgres-tls")]
        if let Some(tls) = &self.tls {
            let (client, connection) = self
                .config
                .connect(tls.connector()?)
                .await
                .map_err(db_error(OP))?;
            tokio::spawn(drive(connection, tx));
            return Ok((client, rx));
        }
        let (client, connection) = self.config.connect(NoTls).await.map_err(db_error(OP))?;
        tokio::spawn(drive(connection, tx));
        Ok((client, rx))
    }
}

/// Drives a connection and says why it ended.
async fn drive<F>(connection: F, lost: oneshot::Sender<String>)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    let reason = match connection.await {
        Ok(()) => "the server closed it".to_owned(),
        Err(e) => e.to_string(),
    };
    let _ = lost.send(reason);
}

/// Takes a fresh key's session lock on `client`, then writes the owner's row with it: whoever
/// sees the row finds the lock held.
async fn register_on(client: &Client, owner: &str) -> Result<i64, StoreError> {
    const OP: &str = "registering an owner";
    // Bounded: a random key is free on the first try but for a collision.
    for _ in 0..8 {
        let key = random_key();
        let taken: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(db_error(OP))?
            .try_get(0)
            .map_err(db_error(OP))?;
        if !taken {
            continue;
        }
        client
            .execute(
                "INSERT INTO owners (owner, lock_key, started_at_ms) \
                 VALUES ($1, $2, effects_now_ms()) ON CONFLICT (owner) DO UPDATE \
                 SET lock_key = EXCLUDED.lock_key, started_at_ms = EXCLUDED.started_at_ms",
                &[&owner, &key],
            )
            .await
            .map_err(db_error(OP))?;
        return Ok(key);
    }
    Err(StoreError::Database {
        operation: OP,
        source: "no free lock key after 8 random tries".into(),
    })
}

/// Watches the liveness connection for as long as the store handle lives: when it is lost,
/// says so at error level, and opens a new one on which every owner registers again with a new
/// lock.
async fn supervise(shared: Weak<Shared>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let lost = strong.session.lock().await.lost.take();
        drop(strong);
        let reason = match lost {
            Some(lost) => {
                tokio::select! {
                    reason = lost => reason.unwrap_or_else(|_| "its task ended".to_owned()),
                    reason = ping(&shared) => reason,
                    _ = stop.changed() => return,
                }
            }
            None => "it is not open".to_owned(),
        };
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let owners: Vec<String> = lock(&strong.keys).keys().cloned().collect();
        tracing::error!(
            location = %strong.location,
            %reason,
            ?owners,
            "the liveness connection is lost: other processes may take these owners for dead \
             and take over their rows (fencing refuses this process's records on them); \
             registering them again with new locks"
        );
        strong.session.lock().await.client = None;
        drop(strong);
        // Bounded by the store handle's life: stops once it is dropped.
        let mut pause = Duration::from_millis(100);
        loop {
            let Some(strong) = shared.upgrade() else {
                return;
            };
            let mut session = strong.session.lock().await;
            if session.client.is_some() {
                break;
            }
            match strong.reconnect(&mut session).await {
                Ok(()) => {
                    tracing::error!(
                        location = %strong.location,
                        ?owners,
                        "liveness restored: owners registered again with new locks"
                    );
                    break;
                }
                Err(e) => {
                    tracing::error!(location = %strong.location, error = %e, "cannot reopen the liveness connection; trying again");
                }
            }
            drop(session);
            drop(strong);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
            pause = (pause * 2).min(RECONNECT_MAX);
        }
    }
}

/// Checks the liveness connection every [`PING_EVERY`]; returns why once a check fails.
async fn ping(shared: &Weak<Shared>) -> String {
    // Bounded by the connection's life: the caller stops waiting once it ends.
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(strong) = shared.upgrade() else {
            return "the store was dropped".to_owned();
        };
        let session = strong.session.lock().await;
        let Some(client) = &session.client else {
            return "it is not open".to_owned();
        };
        match tokio::time::timeout(PING_TIMEOUT, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("a check failed: {e}"),
            Err(_) => return format!("a check got no answer within {PING_TIMEOUT:?}"),
        }
    }
}

/// Reaps the dead owners (see [`Store::reap_dead_owners`](crate::store::Store::reap_dead_owners)),
/// in one short transaction: the owners whose lock this transaction can take are gone; their
/// rows are forgotten (only if they still carry the key found dead: an owner that registered
/// again meanwhile is left alone), the pending rows they held leased freed and what they
/// reported as blocked deleted.
pub(crate) async fn reap(db: &Db) -> Result<Reaped, StoreError> {
    db.transaction("reaping dead owners", Isolation::Write, |tx| {
        Box::pin(async move {
            const OP: &str = "reaping dead owners";
            let what = || "an owner".to_owned();
            let owners = query(
                tx,
                OP,
                "SELECT owner, lock_key FROM owners ORDER BY started_at_ms LIMIT $1",
                &[&REAP_LIMIT],
            )
            .await?;
            if owners.is_empty() {
                return Ok(Reaped::default());
            }
            let mut names: Vec<String> = Vec::with_capacity(owners.len());
            let mut keys: Vec<i64> = Vec::with_capacity(owners.len());
            for row in &owners {
                names.push(get(row, 0, &what)?);
                keys.push(get(row, 1, &what)?);
            }
            // A lock this transaction takes was held by nobody: that owner's session is gone.
            // It is held until the transaction ends, so two reapers never reap one owner.
            let dead: Vec<i64> = query(
                tx,
                OP,
                "SELECT k FROM unnest($1::bigint[]) AS k WHERE pg_try_advisory_xact_lock(k)",
                &[&keys],
            )
            .await?
            .iter()
            .map(|r| get(r, 0, &what))
            .collect::<Result<_, _>>()?;
            if dead.is_empty() {
                return Ok(Reaped::default());
            }
            let (dead_names, dead_keys): (Vec<&str>, Vec<i64>) = names
                .iter()
                .zip(&keys)
                .filter(|(_, key)| dead.contains(key))
                .map(|(name, key)| (name.as_str(), *key))
                .unzip();
            let forgotten: Vec<String> = query(
                tx,
                OP,
                "DELETE FROM owners o USING unnest($1::text[], $2::bigint[]) AS d(owner, lock_key) \
                 WHERE o.owner = d.owner AND o.lock_key = d.lock_key RETURNING o.owner",
                &[&dead_names, &dead_keys],
            )
            .await?
            .iter()
            .map(|r| get(r, 0, &what))
            .collect::<Result<_, _>>()?;
            if forgotten.is_empty() {
                return Ok(Reaped::default());
            }
            let rows = execute(
                tx,
                OP,
                "UPDATE outbox SET lease_owner = NULL, lease_until_ms = NULL, lease_token = NULL \
                 WHERE lease_owner = ANY($1) AND dispatched_at_ms IS NULL \
                 AND dead_lettered_reason IS NULL",
                &[&forgotten],
            )
            .await?;
            super::blocked::forget_owners_tx(tx, &forgotten).await?;
            Ok(Reaped {
                owners: forgotten,
                rows,
            })
        })
    })
    .await
}
