//! Liveness of the owners registered through a SQLite database: a lock held on a small file
//! per owner, which the operating system releases when the process ends.
//!
//! See the module documentation of the SQLite backend for the picture.
//!
//! **What dies with the process:** the connection holding the lock file's `BEGIN EXCLUSIVE`
//! (an OS file lock, `fcntl` on Unix), released by the kernel when the process ends however it
//! ends, or when the store handle (its last clone) is dropped. Nothing else: a process that is
//! paused or stuck keeps its lock, and its rows wait for their leases.
//!
//! **Registration** takes the lock first, on a file named by a fresh random key, and only then
//! writes the owner's row: a reaper that sees the row finds the lock held. Keys are never
//! reused, so a reaper never confuses a new owner with a dead one. A row whose lock file is
//! missing counts as dead: do not delete the `-owners` directory of a running service.
//!
//! **The window:** none while the process lives — the lock cannot be lost without closing the
//! connection, which only this module does. Processes must share the file on one machine (as
//! SQLite itself requires); a file system whose locks do not work (some network file systems)
//! breaks SQLite's own locking too.
//!
//! An in-memory database has one process: nothing is registered, nothing is reaped.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, ErrorCode, OpenFlags, params};

use super::db::{Ctx, Db};
use crate::store::{Reaped, StoreError};

/// Lock files not named in `owners` and not locked are removed once older than this: a
/// registration creates its file an instant before it locks it.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// Owners checked per reap.
const REAP_LIMIT: i64 = 1000;

/// The owners registered through one database handle, with their locks.
pub(crate) struct Liveness {
    /// `<database>-owners`; `None` for an in-memory database.
    dir: Option<PathBuf>,
    held: Mutex<HashMap<String, Held>>,
    /// Held while registering, so that one owner is registered once.
    registering: Mutex<()>,
}

struct Held {
    key: i64,
    /// The connection whose open `BEGIN EXCLUSIVE` is the lock.
    _lock: Connection,
}

/// What probing an owner's lock found.
enum Probe {
    /// Someone holds it.
    Alive,
    /// Nobody held it: the lock is now ours until dropped (`None`: the file is gone).
    Dead(Option<Connection>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_error(operation: &'static str, e: std::io::Error) -> StoreError {
    StoreError::Database {
        operation,
        source: Box::new(e),
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// A fresh random key: positive, so that its file name sorts and reads plainly.
fn random_key() -> i64 {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    i64::try_from(random >> 1).unwrap_or(i64::MAX).max(1)
}

fn file_name(key: i64) -> String {
    format!("{key:016x}.lock")
}

fn key_of_file(name: &str) -> Option<i64> {
    let hex = name.strip_suffix(".lock")?;
    (hex.len() == 16)
        .then(|| i64::from_str_radix(hex, 16).ok())
        .flatten()
}

impl Liveness {
    pub(crate) fn new(database: Option<&Path>) -> Liveness {
        Liveness {
            dir: database.map(|p| {
                let mut dir = p.as_os_str().to_owned();
                dir.push("-owners");
                PathBuf::from(dir)
            }),
            held: Mutex::new(HashMap::new()),
            registering: Mutex::new(()),
        }
    }

    /// Whether owners can be registered (a file database).
    pub(crate) fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// The lock key of `owner`, if it is registered through this handle.
    pub(crate) fn key_of(&self, owner: &str) -> Option<i64> {
        lock(&self.held).get(owner).map(|h| h.key)
    }

    fn path(&self, dir: &Path, key: i64) -> PathBuf {
        let _ = self;
        dir.join(file_name(key))
    }

    /// Takes the lock of a fresh key.
    fn take_lock(&self, dir: &Path) -> Result<(i64, Connection), StoreError> {
        const OP: &str = "taking an owner's lock";
        std::fs::create_dir_all(dir).map_err(|e| io_error(OP, e))?;
        // Bounded: a random key is taken on the first try but for a collision.
        for _ in 0..8 {
            let key = random_key();
            let path = self.path(dir, key);
            if path.exists() {
                continue;
            }
            let conn = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .ctx(OP)?;
            conn.busy_timeout(Duration::ZERO).ctx(OP)?;
            match conn.execute_batch("BEGIN EXCLUSIVE") {
                Ok(()) => return Ok((key, conn)),
                Err(e) if is_busy(&e) => continue,
                Err(e) => return Err(e).ctx(OP),
            }
        }
        Err(StoreError::Database {
            operation: OP,
            source: "no free lock key after 8 random tries".into(),
        })
    }

    /// Tries the lock of `key` without waiting.
    fn probe(&self, dir: &Path, key: i64) -> Result<Probe, StoreError> {
        const OP: &str = "probing an owner's lock";
        let path = self.path(dir, key);
        if !path.exists() {
            return Ok(Probe::Dead(None));
        }
        let conn = match Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        ) {
            Ok(conn) => conn,
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::CannotOpen) && !path.exists() => {
                return Ok(Probe::Dead(None));
            }
            Err(e) => return Err(e).ctx(OP),
        };
        conn.busy_timeout(Duration::ZERO).ctx(OP)?;
        match conn.execute_batch("BEGIN EXCLUSIVE") {
            Ok(()) => Ok(Probe::Dead(Some(conn))),
            Err(e) if is_busy(&e) => Ok(Probe::Alive),
            Err(e) => Err(e).ctx(OP),
        }
    }
}

/// Registers `owner` through `db` (see [`Store::register_owner`](crate::store::Store::register_owner)).
pub(crate) fn register(db: &Db, owner: &str) -> Result<(), StoreError> {
    const OP: &str = "registering an owner";
    let liveness = &db.liveness;
    let Some(dir) = &liveness.dir else {
        return Ok(());
    };
    let _registering = lock(&liveness.registering);
    if liveness.key_of(owner).is_some() {
        return Ok(());
    }
    // The lock first, then the row: whoever sees the row finds the lock held.
    let (key, conn) = liveness.take_lock(dir)?;
    db.write_at_blocking(OP, |tx, now| {
        tx.prepare_cached(
            "INSERT INTO owners (owner, lock_key, started_at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (owner) DO UPDATE SET lock_key = excluded.lock_key, \
             started_at_ms = excluded.started_at_ms",
        )
        .ctx(OP)?
        .execute(params![owner, key, now])
        .ctx(OP)?;
        Ok(())
    })?;
    lock(&liveness.held).insert(owner.to_owned(), Held { key, _lock: conn });
    tracing::debug!(owner, key, "owner registered");
    Ok(())
}

/// Reaps the dead owners of `db` (see [`Store::reap_dead_owners`](crate::store::Store::reap_dead_owners)).
pub(crate) fn reap(db: &Db) -> Result<Reaped, StoreError> {
    const OP: &str = "reaping dead owners";
    let liveness = &db.liveness;
    let Some(dir) = &liveness.dir else {
        return Ok(Reaped::default());
    };
    let owners: Vec<(String, i64)> = db.read_blocking(OP, |conn| {
        let mut stmt = conn
            .prepare_cached("SELECT owner, lock_key FROM owners ORDER BY started_at_ms LIMIT ?1")
            .ctx(OP)?;
        stmt.query_map([REAP_LIMIT], |r| Ok((r.get(0)?, r.get(1)?)))
            .ctx(OP)?
            .collect::<rusqlite::Result<_>>()
            .ctx(OP)
    })?;
    let ours: HashSet<i64> = lock(&liveness.held).values().map(|h| h.key).collect();
    // The locks of the dead, held until their rows and files are gone.
    let mut dead: Vec<(String, i64, Option<Connection>)> = Vec::new();
    for (owner, key) in &owners {
        if ours.contains(key) {
            continue;
        }
        if let Probe::Dead(held) = liveness.probe(dir, *key)? {
            dead.push((owner.clone(), *key, held));
        }
    }
    let mut reaped = Reaped::default();
    if !dead.is_empty() {
        reaped = db.write_at_blocking(OP, |tx, _now| {
            let mut reaped = Reaped::default();
            for (owner, key, _) in &dead {
                let forgotten = tx
                    .prepare_cached("DELETE FROM owners WHERE owner = ?1 AND lock_key = ?2")
                    .ctx(OP)?
                    .execute(params![owner, key])
                    .ctx(OP)?;
                if forgotten == 0 {
                    // Another reaper was first, or the owner registered again under a new key.
                    continue;
                }
                let freed = tx
                    .prepare_cached(
                        "UPDATE outbox SET lease_owner = NULL, lease_until_ms = NULL, \
                         lease_token = NULL WHERE lease_owner = ?1 \
                         AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL",
                    )
                    .ctx(OP)?
                    .execute([owner])
                    .ctx(OP)?;
                super::blocked::forget_owner_tx(tx, owner)?;
                reaped.owners.push(owner.clone());
                reaped.rows += freed as u64;
            }
            Ok(reaped)
        })?;
    }
    let known: HashSet<i64> = owners.iter().map(|(_, key)| *key).collect();
    for (_, key, held) in dead {
        // Still holding the lock: nobody else uses this key, and nobody will again.
        remove(&liveness.path(dir, key));
        drop(held);
    }
    sweep_orphans(liveness, dir, &known, &ours);
    Ok(reaped)
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a dead owner's lock file");
        }
    }
}

/// Removes lock files that no owner row names and nobody locks, left by a process that died
/// between taking its lock and writing its row, or by a reaper that died before removing one.
fn sweep_orphans(liveness: &Liveness, dir: &Path, known: &HashSet<i64>, ours: &HashSet<i64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(key_of_file) else {
            continue;
        };
        if known.contains(&key) || ours.contains(&key) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age >= ORPHAN_AGE);
        if !old {
            continue;
        }
        if let Ok(Probe::Dead(held)) = liveness.probe(dir, key) {
            remove(&entry.path());
            drop(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{file_name, key_of_file};

    #[test]
    fn lock_file_names_round_trip() {
        for key in [1, 0x3f1c_0000_0000_009a, i64::MAX] {
            assert_eq!(key_of_file(&file_name(key)), Some(key));
        }
        assert_eq!(key_of_file("store.db"), None);
        assert_eq!(key_of_file("zz.lock"), None);
    }
}
