//! The store on PostgreSQL (feature `postgres`): datoms, effect runs and the outbox in one
//! schema, shared by any number of worker processes on any number of machines.
//!
//! [`PostgresStore`] gives the same guarantees as the embedded [`SqliteStore`](crate::store::SqliteStore)
//! (see [`Store`](crate::store::Store)); the store conformance suite runs the same cases
//! against both. There is no log in the database: [`Store::colocation`](crate::store::Store::colocation)
//! is `None`, so messages always go out through a separate transport (NATS JetStream, or a
//! [`SqliteLog`](crate::transport::SqliteLog) file), after the commit, and an outbox row is
//! marked dispatched only once the broker acknowledged it.
//!
//! ```no_run
//! use std::time::Duration;
//! use effects_core::postgres::{PostgresOptions, PostgresStore};
//!
//! # async fn start() -> Result<(), effects_core::store::StoreError> {
//! let store = PostgresStore::connect(PostgresOptions {
//!     pool_size: 32,
//!     statement_timeout: Some(Duration::from_secs(10)),
//!     ..PostgresOptions::new("postgres://effects@db.internal:5432/payments").with_schema("transfers")
//! })
//! .await?;
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! # Concurrency and locking
//!
//! Every write is one transaction at `READ COMMITTED` with explicit row locks, taken in one
//! global order so that commits cannot deadlock each other:
//!
//! 1. **Keys.** The batch's idempotency keys, sorted, are claimed by inserting their
//!    `effect_runs` rows (`ON CONFLICT DO NOTHING`). A key another transaction is committing
//!    makes this one wait for it, then see it taken: two commits of one key never both succeed.
//! 2. **Entities.** Every entity the runs read or write, sorted, is locked through a
//!    transaction-scoped advisory lock on its identity, then `FOR UPDATE` if it exists. Every
//!    transaction creating or changing an entity holds its advisory lock, so "it did not exist"
//!    is a read that holds until the commit as well. The lock statements are pipelined (sent
//!    together, run by the server in order).
//! 3. **Read validation** then compares each read's version (the entity's `updated_tx`) and each
//!    compare-and-set expectation with the locked rows: nothing can change them between the
//!    check and the commit. A run that fails it is refused ([`Commit::Conflict`](crate::store::Commit::Conflict)),
//!    its key claim withdrawn, and nothing of it written.
//! 4. **The `tx`.** Only then is the run's `tx` taken from a counter row (`sequences.tx`), which
//!    stays locked until the transaction commits. The next commit cannot take a `tx` before this
//!    one has committed, so **`tx` order is commit order**: a reader never sees `tx` 8 without
//!    7, and "as of `tx`" reads are well defined. The cost: from allocating the `tx` to
//!    committing (the datom, history and outbox inserts and the commit's WAL flush), commits of
//!    runs go one at a time across all processes. Keys, reads and entity locks happen before it
//!    and overlap freely; commit several runs in one transaction
//!    ([`Executor::run_batch`](crate::executor::Executor::run_batch)) to pay for it once per
//!    batch.
//!
//! A commit of one run takes these steps with a statement per key, entity, datom and outbox
//! row, pipelined where they do not depend on each other's answers. A run that cannot be
//! refused (no reads, no compare-and-set) has nothing to validate, so it takes its `tx` and its
//! rows' ready order in the same round trip as its entity locks (still after them on the
//! server); a run that can be refused takes them only once its reads hold, so refused runs
//! leave no gap in the numbering.
//!
//! A commit of several runs takes them **set-based**, in three round trips whatever its
//! size (four when some keys are taken already): every key claimed in one statement; the advisory locks, the entities' rows, the
//! current values of the attributes the runs name and the counter rows (`tx`, then
//! `outbox_ready`) locked and read in one pipeline; then, with everything locked, the runs are
//! played in order in memory exactly as they would be applied one after the other (a key taken
//! by an earlier item is a duplicate, a key of a refused item can be used by a later one, reads
//! and compare-and-set see what earlier items changed, only the runs that commit take a `tx`,
//! densely and in batch order); and the result is written with one `INSERT .. SELECT FROM
//! unnest(..)` (or `UPDATE .. FROM unnest(..)`) per table. Both give the same rows; the store
//! conformance suite compares them.
//!
//! `SERIALIZABLE` was not chosen: every commit updates the counter row, so under serializable
//! snapshot isolation every pair of concurrent commits would conflict and one of them fail;
//! explicit locks make them wait instead, and make the check-then-commit of read validation
//! atomic without predicate locks. Reads of several statements (an entity as of a `tx`, the
//! history) run in `REPEATABLE READ READ ONLY` transactions: one snapshot.
//!
//! **Claims** choose candidates in ready order from the committed state and apply the ordering
//! rules of [`Store::claim_due`](crate::store::Store::claim_due) — a run's requests in order,
//! and messages with one topic and partition key in the order they became ready (that order
//! comes from a second counter row, `outbox_ready`, locked like the `tx` one, so it is commit
//! order too) — then lock only the rows chosen, `FOR UPDATE SKIP LOCKED` and still due. (The
//! rows of the runs a commit writes are claimed by that same transaction in one `UPDATE ..
//! RETURNING`: no other transaction can see them yet, so only the partition rule applies.) Relays
//! and workers never wait for each other's rows and never hold a row they do not claim, so
//! several relays share the work; a chosen row another claimant took meanwhile blocks the rest
//! of its run or partition in this claim, and the next candidates are tried instead. A lease carries a fencing token from a sequence (`lease_token`):
//! recording a response, marking a row dispatched, rescheduling, dead-lettering and renewing
//! all require the row to still carry the caller's token. Resolving a row locks its run's row,
//! so the last two rows of a run resolved at once still complete the run.
//!
//! **Time** is the server's: every lease expiry, retry time, stall and pruning age is computed
//! with `clock_timestamp()` on the server (the `effects_now_ms()` function of the schema), so
//! processes whose clocks disagree still agree on who holds a lease, and a worker's clock, right
//! or wrong, changes nothing. What a jump of the *server's* clock does: forward, leases expire
//! early (another claimant takes the rows; fencing refuses the old holder's records, and
//! receivers dedup on `Idempotency-Key`) and pruning removes records as much earlier — keep the
//! server's clock on NTP, and retention well beyond any redelivery; backward, leases last
//! longer and pruning waits. Liveness (below) does not depend on any clock.
//!
//! # Liveness: a dead process's leases are freed in about a second
//!
//! Every owner registered through the store ([`Store::register_owner`](crate::store::Store::register_owner),
//! which the executor calls before its first claim) holds a session-level advisory lock on a
//! connection of the store's own, outside the pool; the relays of every process try those locks
//! about once a second ([`Store::reap_dead_owners`](crate::store::Store::reap_dead_owners)):
//!
//! ```text
//!  process A (alive)                      server                            schema
//!  liveness connection ──session──▶       advisory lock 0x3f1c…9a (held)    owners: (A, 0x3f1c…9a)
//!  pool (8 connections) ─────────▶        ...
//!
//!  process B (killed: its kernel          session gone, advisory lock       owners: (B, 0x7d20…41)
//!  closed its connections)                0x7d20…41 released with it        outbox: rows leased to B
//!
//!  any relay's reaper, one short transaction on a pool connection:
//!    pg_try_advisory_xact_lock(0x7d20…41) ──▶ true: B's session is gone
//!    pg_try_advisory_xact_lock(0x3f1c…9a) ──▶ false: A is alive, left alone
//!    DELETE owners (B, 0x7d20…41); free the rows leased to B; COMMIT (the lock goes with it)
//! ```
//!
//! - **What dies with the process:** the liveness connection's session, hence its advisory
//!   locks. A killed process's kernel closes the connection at once; a machine that vanishes is
//!   noticed by TCP keepalives set on that connection (by the server in about 25 s). Dropping
//!   the store handle (its last clone) closes the connection too. A process that is paused or
//!   stuck keeps its session: never reaped, its rows wait for their leases.
//! - **Registration** takes the lock of a fresh random key (`pg_try_advisory_lock`, in the
//!   one-bigint key space, which entity locks do not use) before the owner's row is written, so
//!   a reaper that sees the row finds the lock held. Keys are random because advisory locks
//!   span the whole database, across schemas.
//! - **Reaping** takes each owner's key with `pg_try_advisory_xact_lock` in its transaction, so
//!   two reapers never reap one owner, and deletes a row only if it still carries the key found
//!   free: an owner that registered again meanwhile is left alone.
//! - **A lost liveness connection** (a server restart, `pg_terminate_backend`, a network cut)
//!   while the process lives: the store notices at once when the server closes it, and within
//!   about 10 s otherwise (a check every 5 s, 5 s to answer); it logs the loss at error level,
//!   opens a new connection and registers every owner again with a new lock. **The window:**
//!   from the session's end to the new registration, other processes take the owner for dead
//!   and take over its leased rows while it may still be working on them. Nothing is lost or
//!   applied twice: fencing tokens refuse its records and marks on those rows, and a request it
//!   sends meanwhile is sent again by the new holder with the same `Idempotency-Key`.
//!   The supervisor that does this lives as long as the store handle.
//!
//! **Retries.** A transaction failing with a serialization failure (`40001`) or a deadlock
//! (`40P01`) runs again from the start on a fresh transaction, after a random backoff of up to
//! 5 ms doubling to 200 ms, at most [`PostgresOptions::retries`] times. Other errors, a lost
//! connection included, are returned: nothing of the transaction was written unless the commit
//! itself was acknowledged, and the caller (the worker, the relay) tries again later, when a
//! run that did commit is a duplicate.
//!
//! **Errors in a pipeline.** The first statement of a pipeline to fail aborts the transaction,
//! and the statements sent after it fail too ("current transaction is aborted", `25P02`). The
//! store waits for every answer of the pipeline and returns the error that caused the others,
//! whatever the order they arrived in: a constraint or trigger error reaches the caller as
//! itself, and a serialization failure or deadlock is retried as above.
//!
//! # Migrations
//!
//! The files under `effects-core/migrations/postgres/` are compiled in and applied when the
//! store connects, all pending ones in one transaction under an advisory lock (two processes
//! starting at once take turns), and recorded in the schema's `schema_version` table with their
//! SHA-256. A schema whose recorded migration differs from the file, or that was migrated by a
//! newer version of this library, is refused.
//!
//! # Inspection
//!
//! [`PostgresStore`] implements [`Inspect`](crate::store::Inspect), as the SQLite store does:
//! the `effects` CLI works on it with a `postgres://` URL and a schema. Its reads run in one
//! `REPEATABLE READ READ ONLY` snapshot and measure time with the server's clock; retrying a
//! dead-lettered outbox row is one transaction locking the row, then its run's row, then (for
//! a message that gets its turn) the `outbox_ready` counter row, like every writer resolving a
//! row, and clears the row's lease so that a claimant holding an older token is refused. Input
//! dead letters are kept by the broker (the NATS stream), not by this store: none is listed,
//! and retrying one is refused with that reason. [`PostgresStore::connect_existing`] opens a
//! schema that must already hold a store, creating nothing.
//!
//! # Options
//!
//! [`PostgresOptions`]: the URL (`postgres://user@host:port/db`, or libpq's `key=value` form;
//! never printed with its password), the schema (created if missing; one per service or test
//! keeps them apart in one database), the pool size, the connect and pool-wait timeouts, the
//! server's `statement_timeout` for the store's connections, and the retry bound. Connections
//! are pooled with deadpool-postgres; one found closed (a restarted server) is replaced on the
//! next call.
//!
//! # TLS
//!
//! With the feature `postgres-tls`, [`PostgresOptions::tls`] connects over TLS with rustls (the
//! ring provider reqwest already uses), verifying the server's certificate against the Mozilla
//! roots ([`PostgresTls::mozilla_roots`]) or a private CA ([`PostgresTls::with_ca_pem`]); the
//! connection then fails rather than fall back to plain text. The bridge is the
//! `tokio-postgres-rustls` crate (it adds `x509-cert` and its DER parser for channel binding).

mod blocked;
mod commit;
mod db;
mod inspect;
mod liveness;
mod pipeline;
mod single;
mod store;

#[cfg(feature = "postgres-tls")]
pub use self::db::PostgresTls;
pub use self::db::{PostgresError, PostgresOptions};
pub use self::store::PostgresStore;
pub use crate::store::Backlog;
