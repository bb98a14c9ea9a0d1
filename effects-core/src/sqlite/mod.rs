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
//! (`db.rs`: connections, options, migrations); neither imports the other's internals.

mod db;
mod inspect;
mod log;
mod store;

pub use self::db::{Blocking, SqliteOptions, Synchronous};
pub use self::log::{DeadLetter, LoggedMessage, SqliteLog};
pub use self::store::SqliteStore;
pub use crate::store::Backlog;
