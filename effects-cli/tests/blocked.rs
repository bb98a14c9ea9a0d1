//! A blocked partition as an operator sees it, end to end on the embedded store: a real
//! `Worker` (the cards example's `block` handler) whose loader keeps failing with a transient
//! store error holds its input, and the later input of the same card waits behind it. Once it has
//! failed for longer than `blocked_after`, `effects inputs blocked` — the binary, reading the
//! store file while the worker runs — shows the key, the message, the reason and the process;
//! once the loader recovers and the inputs are applied, it shows nothing.
//!
//! Each check can fail: the same scenario runs on two broken stores, one that keeps no report
//! (the default of `Store::report_blocked`) and one that ignores the report saying that none are
//! left, and each fails the check it breaks. Every wait is bounded.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use cards::job::{BlockRequest, cards, customer, seed_effects};
use cards::{BlockHandler, Card};
use effects_core::LookupRef;
use effects_core::executor::{Backoff, Executor};
use effects_core::store::{
    BlockedInput, ClaimOptions, Claimed, Colocation, Commit, Entity, Finish, Lease, NewOutboxRow,
    NewRun, OutboxRow, PruneOlderThan, PruneReport, Reaped, RecordedRequest, RequestOutcome,
    RunRecord, SqliteStore, Store, StoreError, Tracked, Tx,
};
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{LoadError, LoadWith, Worker, WorkerConfig};
use serde_json::Value;

/// How long a check waits for what it expects.
const PATIENCE: Duration = Duration::from_secs(10);

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "effects-cli-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The store, and two broken ones.

/// What the store does with the workers' reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reports {
    /// Keeps them: the SQLite store as it is.
    Kept,
    /// Keeps nothing (the trait's default).
    Dropped,
    /// Keeps them but ignores an empty report: what was blocked stays listed for good.
    EmptyIgnored,
}

/// The SQLite store, with its reports handled as `reports` says.
#[derive(Clone, Debug)]
struct Reporting {
    store: SqliteStore,
    reports: Reports,
}

impl Store for Reporting {
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

    fn runs_by_key(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<RunRecord>>, StoreError>> + Send {
        self.store.runs_by_key(keys)
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
        let kept = match self.reports {
            Reports::Kept => true,
            Reports::Dropped => false,
            Reports::EmptyIgnored => !blocked.is_empty(),
        };
        let report = kept.then(|| self.store.report_blocked(owner, consumer, topic, blocked));
        async move {
            match report {
                Some(report) => report.await,
                None => Ok(()),
            }
        }
    }

    fn outbox(&self, key: &str) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send {
        self.store.outbox(key)
    }

    fn entity(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send {
        self.store.entity(lookup, as_of)
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

// ---------------------------------------------------------------------------------------------
// The binary.

/// Runs `effects --store sqlite:PATH ARGS` on a thread of its own: exit code and stdout.
async fn effects(db: &Path, args: &[&str]) -> (i32, String) {
    let store = format!("sqlite:{}", db.display());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_effects"))
            .env_remove("EFFECTS_STORE")
            .env_remove("EFFECTS_NAMESPACE")
            .arg("--store")
            .arg(store)
            .args(&args)
            .timeout(Duration::from_secs(30))
            .output()
            .expect("the binary runs");
        assert!(
            output.status.success(),
            "effects {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    })
    .await
    .expect("the CLI thread")
}

/// `effects --json inputs blocked`.
async fn blocked_json(db: &Path) -> Vec<Value> {
    let (_, out) = effects(db, &["--json", "inputs", "blocked"]).await;
    match serde_json::from_str(&out) {
        Ok(Value::Array(entries)) => entries,
        _ => panic!("not a JSON list: {out}"),
    }
}

/// Waits up to `patience` for `check`; whether it held.
async fn within<F, Fut>(patience: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + patience;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario.

/// What the operator saw.
#[derive(Debug)]
struct Seen {
    /// `effects inputs blocked` listed the failing input (and only it) with its key, reason and
    /// process while it failed.
    listed_while_failing: bool,
    /// The inputs were applied once the loader recovered.
    applied: bool,
    /// Then `effects inputs blocked` listed nothing.
    none_once_applied: bool,
}

const TOPIC: &str = "card-block-requested";
const REASON: &str = "connection reset by peer (the card database restarts)";

async fn publish(log: &SqliteLog, id: &str, card: &str) {
    log.publish(OutgoingMessage {
        id: id.to_owned(),
        topic: TOPIC.to_owned(),
        partition_key: Some(card.to_owned()),
        headers: Default::default(),
        payload: format!(r#"{{"card_id": "{card}"}}"#).into_bytes(),
    })
    .await
    .expect("publish");
}

/// Loads the card, or fails with a transient store error while `failing` holds.
async fn flaky_load(
    request: BlockRequest,
    store: Tracked<Reporting>,
    failing: Arc<AtomicBool>,
    loads: Arc<AtomicUsize>,
) -> Result<Card, LoadError> {
    loads.fetch_add(1, Ordering::SeqCst);
    if failing.load(Ordering::SeqCst) {
        return Err(LoadError::Store(StoreError::Database {
            operation: "loading a card",
            source: REASON.into(),
        }));
    }
    let lookup = LookupRef::new("card/id", request.card_id);
    let entity = store
        .entity(&lookup, None)
        .await?
        .ok_or_else(|| LoadError::NotFound {
            what: lookup.to_string(),
        })?;
    entity.decode().map_err(|e| LoadError::Invalid {
        reason: e.to_string(),
    })
}

async fn blocked_partition(reports: Reports) -> Seen {
    let dir = TempDir::new("blocked");
    let db = dir.0.join("store.db");
    let sqlite = SqliteStore::open(&db).expect("open the store");
    let log = sqlite.log();
    let store = Reporting {
        store: sqlite,
        reports,
    };
    let executor = Arc::new(Executor::builder(store, log.clone()).build());
    executor
        .run(
            "seed",
            seed_effects(&customer(), &cards()).expect("the seed"),
        )
        .await
        .expect("seed the cards");
    let owner = executor.config().owner.clone();

    let failing = Arc::new(AtomicBool::new(true));
    let loads = Arc::new(AtomicUsize::new(0));
    let config = WorkerConfig {
        blocked_after: Duration::from_millis(200),
        visibility: Duration::from_millis(600),
        fetch_wait: Duration::from_millis(50),
        retry: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(50),
            max_attempts: None,
        },
        // Bounded by the test's waits, not by attempts.
        max_deliveries: Some(100_000),
        ..WorkerConfig::default()
    };
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), BlockHandler)
            .with_config(config)
            .load_with(LoadWith::new({
                let (failing, loads) = (Arc::clone(&failing), Arc::clone(&loads));
                move |request: BlockRequest, store: Tracked<Reporting>| {
                    flaky_load(request, store, Arc::clone(&failing), Arc::clone(&loads))
                }
            })),
    );
    let consumer = worker.consumer();
    // m1 fails; m2, of the same card, waits behind it.
    publish(&log, "m1", "c1").await;
    publish(&log, "m2", "c1").await;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let worker = Arc::clone(&worker);
        async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });

    let listed_while_failing = within(PATIENCE, || async {
        let entries = blocked_json(&db).await;
        entries.len() == 1
            && entries[0]["message_id"] == "m1"
            && entries[0]["partition_key"] == "c1"
            && entries[0]["consumer"] == consumer.as_str()
            && entries[0]["topic"] == TOPIC
            && entries[0]["owner"] == owner.as_str()
            && entries[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(REASON))
            && entries[0]["attempts"].as_u64().is_some_and(|a| a >= 1)
            && entries[0]["failing_for_ms"]
                .as_u64()
                .is_some_and(|ms| ms >= 200)
    })
    .await;
    if listed_while_failing {
        // The table says the same to a person.
        let (_, table) = effects(&db, &["inputs", "blocked"]).await;
        for expected in [
            "c1",
            "m1",
            TOPIC,
            &consumer,
            &owner,
            "connection reset by peer",
        ] {
            assert!(table.contains(expected), "`{expected}` is not in\n{table}");
        }
    }
    let load_attempts = loads.load(Ordering::SeqCst);
    assert!(
        load_attempts >= 2,
        "the loader was tried again: {load_attempts}"
    );
    assert_eq!(
        executor
            .store()
            .store
            .run(&format!("block:{TOPIC}:m2"))
            .await
            .unwrap(),
        None,
        "m2 waited behind m1"
    );

    failing.store(false, Ordering::SeqCst);
    let applied = within(PATIENCE, || async {
        log.unacknowledged(&consumer, TOPIC).await.expect("count") == 0
    })
    .await;
    let none_once_applied = applied
        && within(PATIENCE, || async {
            blocked_json(&db).await.is_empty()
                && effects(&db, &["inputs", "blocked"]).await.1 == "(none)\n"
        })
        .await;

    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .expect("the worker task");
    if applied {
        assert_eq!(report.applied, 2, "{report:?}");
        assert_eq!(report.dead_lettered, 0, "{report:?}");
    }
    Seen {
        listed_while_failing,
        applied,
        none_once_applied,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_a_blocked_key_while_it_fails_and_nothing_once_it_is_applied() {
    let seen = blocked_partition(Reports::Kept).await;
    assert!(seen.listed_while_failing, "{seen:?}");
    assert!(seen.applied, "{seen:?}");
    assert!(seen.none_once_applied, "{seen:?}");
}

/// A store that keeps no report (the trait's default) fails the first check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_a_store_that_keeps_no_report_shows_nothing_while_it_fails() {
    let seen = blocked_partition(Reports::Dropped).await;
    assert!(!seen.listed_while_failing, "{seen:?}");
    assert!(seen.applied, "{seen:?}");
}

/// A store that ignores the report saying none are left fails the last check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_a_store_that_ignores_the_empty_report_shows_the_key_for_good() {
    let seen = blocked_partition(Reports::EmptyIgnored).await;
    assert!(seen.listed_while_failing, "{seen:?}");
    assert!(seen.applied, "{seen:?}");
    assert!(!seen.none_once_applied, "{seen:?}");
}
