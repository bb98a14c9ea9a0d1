//! A store handle that records what is read through it, for read validation.

use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{
    BlockedInput, ClaimOptions, Claimed, Colocation, Commit, Entity, Finish, Lease, NewOutboxRow,
    NewRun, OutboxRow, PruneOlderThan, PruneReport, ReadVersion, Reaped, RecordedRequest,
    RequestOutcome, RunRecord, Store, StoreError, Tx,
};
use crate::datom::LookupRef;

/// A store handle that records every entity read through it, with the version read, so that a
/// run computed from those reads commits only if they still hold (see
/// [`RunOptions::reads`](crate::executor::RunOptions::reads)).
///
/// The worker hands one to its loaders ([`LoadEntity`](crate::worker::LoadEntity),
/// [`LoadWith`](crate::worker::LoadWith)) for each attempt at a delivery. It is a [`Store`]
/// itself (every other method passes through untouched) and dereferences to the store, so a
/// loader uses it like the store. Reads it cannot see — an [`SqliteStore::history`] call through
/// the dereferenced store, or a query to another database — are not validated.
///
/// [`SqliteStore::history`]: crate::store::SqliteStore::history
///
/// ```
/// use effects_core::store::{ReadVersion, SqliteStore, Tracked};
/// use effects_core::LookupRef;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let tracked = Tracked::new(SqliteStore::in_memory()?);
/// let missing = LookupRef::new("account/id", "a1");
/// assert_eq!(tracked.entity(&missing, None).await?, None);
/// assert_eq!(tracked.reads(), [ReadVersion::missing(missing)]);
/// # Ok::<(), effects_core::store::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct Tracked<S> {
    store: S,
    reads: Arc<Mutex<Vec<ReadVersion>>>,
}

impl<S: Store> Tracked<S> {
    /// A handle on `store` with no reads recorded.
    pub fn new(store: S) -> Tracked<S> {
        Tracked {
            store,
            reads: Arc::default(),
        }
    }

    /// The entity a lookup ref names, now or as of a transaction, through the store; the read
    /// is recorded with the version it saw (the entity's [`Entity::tx`], or "absent").
    pub fn entity(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send {
        let read = self.store.entity(lookup, as_of);
        let reads = Arc::clone(&self.reads);
        let lookup = lookup.clone();
        async move {
            let entity = read.await?;
            let version = match &entity {
                Some(e) => ReadVersion::of(e),
                None => ReadVersion::missing(lookup),
            };
            let mut reads = reads.lock().unwrap_or_else(PoisonError::into_inner);
            if !reads.contains(&version) {
                reads.push(version);
            }
            Ok(entity)
        }
    }

    /// Every read recorded so far (clones of this handle share them), in order, each once.
    pub fn reads(&self) -> Vec<ReadVersion> {
        self.reads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The store itself: reads through it are not recorded.
    pub fn untracked(&self) -> &S {
        &self.store
    }
}

impl<S> Deref for Tracked<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.store
    }
}

impl<S: Store> Store for Tracked<S> {
    fn colocation(&self) -> Option<Colocation> {
        self.store.colocation()
    }

    fn commit_runs(
        &self,
        runs: Vec<NewRun>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Vec<Commit>, StoreError>> + Send {
        self.store.commit_runs(runs, options)
    }

    fn run(&self, key: &str) -> impl Future<Output = Result<Option<RunRecord>, StoreError>> + Send {
        self.store.run(key)
    }

    fn claim_run(
        &self,
        key: &str,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send {
        self.store.claim_run(key, options)
    }

    fn claim_due(
        &self,
        limit: usize,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send {
        self.store.claim_due(limit, options)
    }

    fn stalled_runs(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RunRecord>, StoreError>> + Send {
        self.store.stalled_runs(idle_for, limit)
    }

    fn record_request(
        &self,
        id: &str,
        outcome: RequestOutcome,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.record_request(id, outcome, lease)
    }

    fn recorded_requests(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<RecordedRequest>, StoreError>> + Send {
        self.store.recorded_requests(key)
    }

    fn finish_requests(
        &self,
        key: &str,
        after_requests: Vec<NewOutboxRow>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Finish, StoreError>> + Send {
        self.store.finish_requests(key, after_requests, options)
    }

    fn mark_dispatched(
        &self,
        id: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.mark_dispatched(id, lease)
    }

    fn mark_dispatched_many(
        &self,
        rows: Vec<(String, Lease)>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        self.store.mark_dispatched_many(rows)
    }

    fn dead_letter(
        &self,
        id: &str,
        reason: &str,
        lease: Option<&Lease>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.dead_letter(id, reason, lease)
    }

    fn retry_later(
        &self,
        id: &str,
        lease: &Lease,
        error: &str,
        delay: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.store.retry_later(id, lease, error, delay)
    }

    fn renew(
        &self,
        ids: Vec<String>,
        lease: &Lease,
        duration: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        self.store.renew(ids, lease, duration)
    }

    fn release(
        &self,
        ids: Vec<String>,
        owner: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.store.release(ids, owner)
    }

    fn register_owner(&self, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.register_owner(owner)
    }

    fn reap_dead_owners(&self) -> impl Future<Output = Result<Reaped, StoreError>> + Send {
        self.store.reap_dead_owners()
    }

    fn report_blocked(
        &self,
        owner: &str,
        consumer: &str,
        topic: &str,
        blocked: Vec<BlockedInput>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.report_blocked(owner, consumer, topic, blocked)
    }

    fn runs_by_key(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<RunRecord>>, StoreError>> + Send {
        self.store.runs_by_key(keys)
    }

    fn outbox(&self, key: &str) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send {
        self.store.outbox(key)
    }

    fn entity(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send {
        Tracked::entity(self, lookup, as_of)
    }

    fn latest_tx(&self) -> impl Future<Output = Result<Option<Tx>, StoreError>> + Send {
        self.store.latest_tx()
    }

    fn prune(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send {
        self.store.prune(older_than)
    }
}
