//! The embedded backend on SQLite (feature `sqlite`): one database file in WAL mode, or an
//! in-memory database, holding the datoms, effect runs, the outbox and the embedded log
//! ([`SqliteLog`]).
//!
//! # Concurrency
//!
//! One writer connection behind a mutex serialises this process's writes; every write is one
//! `BEGIN IMMEDIATE` transaction, so other processes sharing the file wait (up to
//! [`SqliteOptions::busy_timeout`]) instead of failing half-way. Reads use a small pool of reader
//! connections and see the last committed state (WAL snapshots). An in-memory database has a
//! single connection for everything. Every call runs on tokio's blocking pool.
//!
//! Several processes may share one file, and everything stays correct — the key claim, read
//! validation and leases hold across them — but SQLite does not queue writers fairly: a process
//! waiting for the write lock polls for it, while a busy process takes it again the moment it
//! commits, so under a steady load one process can do nearly all the writing while the other
//! waits. Run one writing process per file on one machine, and move to the PostgreSQL store when
//! the work needs several processes.
//!
//! # Liveness: a dead process's leases are freed in about a second
//!
//! Every owner registered through a file database ([`Store::register_owner`], which the
//! executor calls before its first claim) holds an exclusive lock on a small file of its own,
//! next to the database; the relays of every process try those locks about once a second
//! ([`Store::reap_dead_owners`]):
//!
//! ```text
//!  process A (alive)                          store.db-owners/            store.db
//!  connection on 3f1c…9a.lock ──holds──▶      3f1c…9a.lock (locked)       owners: (A, 3f1c…9a)
//!  (BEGIN EXCLUSIVE, never ended)
//!
//!  process B (killed: the kernel             7d20…41.lock (free)         owners: (B, 7d20…41)
//!  released its lock with it)                                             outbox: rows leased to B
//!
//!  any relay's reaper:
//!    BEGIN EXCLUSIVE on 7d20…41.lock, no wait  ──▶ taken: B is gone
//!      one write transaction: delete (B, 7d20…41), free the rows leased to B
//!      remove 7d20…41.lock
//!    BEGIN EXCLUSIVE on 3f1c…9a.lock, no wait  ──▶ busy: A is alive, left alone
//! ```
//!
//! - **What dies with the process:** the connection whose open `BEGIN EXCLUSIVE` on the lock
//!   file is the lock (an OS file lock, `fcntl` on Unix), however the process ends, and also
//!   when the store handle (its last clone) is dropped. Nothing else: a paused or stuck process
//!   keeps its lock, and its rows wait for their leases.
//! - **Registration** takes the lock of a fresh random key first and writes the owner's row
//!   after, so a reaper that sees the row finds the lock held; keys are never reused. A row
//!   whose lock file is missing counts as dead: never delete the `-owners` directory under a
//!   running service.
//! - **The window:** none while the process lives; the lock is never given up early. It needs
//!   the file locks SQLite itself needs (one machine; not a network file system).
//! - An in-memory database has one process: nothing is registered or reaped.
//!
//! # The store's clock
//!
//! Leases, retries, stalls and pruning ages are measured with the store's clock, not with each
//! process's wall clock: the database keeps the newest time any process used, no process uses
//! an earlier one, and each advances it no faster than its monotonic clock says real time
//! passes, plus 1 % to catch up with its wall clock. What a clock jump can and cannot do:
//!
//! | A process whose wall clock is … | can | cannot |
//! |---|---|---|
//! | ahead (or jumps forward), by any amount | make the store's time run up to 1 % fast while it runs | hold a lease longer than the lease (+1 %); make pruning remove a record younger than 99 % of its retention |
//! | behind (or jumps back) | nothing: it uses the store's time | take a lease another process holds; set an expiry already past for others |
//! | right, after no process had the file open for a while | — (the store's time is behind by that while, catching up at 1 %; retention is longer by as much, never shorter; times shown are behind until then) | — |
//!
//! Processes agree on the time within the time since each last wrote (every write reads the
//! store's newest time), which is about a relay interval for processes running a relay.
//!
//! # Migrations
//!
//! The files under `effects-core/migrations/sqlite/` are compiled in and applied in order when
//! the store opens, each in its own transaction, and recorded in `schema_version` with their
//! SHA-256. Opening a database migrated by a newer version of this library, or one whose
//! recorded migration differs from the file, fails instead of guessing.
//!
//! # Layout
//!
//! The store ([`SqliteStore`]) and the log transport ([`SqliteLog`]) share one database handle
//! (`db.rs`: connections, options, migrations, the clock of `clock.rs` and the owners' locks of
//! `liveness.rs`); neither imports the other's internals.
//!
//! [`Store::register_owner`]: crate::store::Store::register_owner
//! [`Store::reap_dead_owners`]: crate::store::Store::reap_dead_owners

mod blocked;
mod clock;
mod db;
mod inspect;
mod liveness;
mod log;
mod store;

pub use self::db::{Blocking, SqliteOptions, Synchronous};
pub use self::log::{DeadLetter, LoggedMessage, SqliteLog};
pub use self::store::SqliteStore;
pub use crate::store::Backlog;
