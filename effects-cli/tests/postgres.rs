//! [`Inspect`] on the PostgreSQL store, and the `effects` binary on a PostgreSQL schema, against
//! the machine's PostgreSQL (127.0.0.1:5432, user postgres, trust, database `test`). Each test
//! works in a schema of its own, dropped at the end. The store is filled by the real executor
//! (HTTP on a wiremock server, messages to a SQLite log); what is sent is counted at the source:
//! requests the HTTP server received, messages the broker holds. The cases of requests,
//! messages and pruning are the ones `retry.rs` runs on SQLite (`common/inspect_cases.rs`).
//!
//! Without PostgreSQL these tests fail, saying how to start it. They run with the feature
//! `postgres-tests`: `cargo test -p effects-cli --features postgres-tests`.

#[path = "common/inspect_cases.rs"]
mod cases;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use assert_cmd::Command;
use cases::{ana, ledger_entry};
use effects_core::executor::{Backoff, Executor};
use effects_core::http::{HttpConfig, ReqwestClient, RetryPolicy};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::store::{
    BlockedInput, ClaimOptions, DeadLetterId, Inspect, PruneOlderThan, RequestOutcome,
    RetryOutcome, RunQuery, RunState, RunStatus, Store, Tx,
};
use effects_core::transport::SqliteLog;
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const HOST: &str = "127.0.0.1";
const PORT: u16 = 5432;
const DATABASE: &str = "test";
const TIMEOUT: Duration = Duration::from_secs(60);

fn url() -> String {
    format!("postgres://postgres@{HOST}:{PORT}/{DATABASE}")
}

fn required(reason: impl std::fmt::Display) -> String {
    format!(
        "PostgreSQL is required at {HOST}:{PORT} (user postgres, trust authentication, database \
         `{DATABASE}`) for the effects CLI's PostgreSQL tests: {reason}. Start it with \
         `pg_ctlcluster --skip-systemctl-redirect 15 main start` and create the database with \
         `createdb -h {HOST} -U postgres {DATABASE}`."
    )
}

async fn raw() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host(HOST)
        .port(PORT)
        .user("postgres")
        .dbname(DATABASE)
        .connect_timeout(Duration::from_secs(5))
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{}", required(e)));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A schema name no other test uses, dropped (with everything in it) when this is dropped.
struct Schema {
    name: String,
    dir: PathBuf,
}

impl Schema {
    /// A fresh name; the schema itself is created by whoever connects first.
    async fn new(case: &str) -> Schema {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("effects_cli_{}_{n}", std::process::id());
        // The name is made here of two numbers: nothing from outside reaches this DDL.
        raw()
            .await
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            .await
            .unwrap_or_else(|e| panic!("{}", required(e)));
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("effects-cli-pg-{case}-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test directory");
        Schema { name, dir }
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions {
            pool_size: 4,
            ..PostgresOptions::new(url()).with_schema(&self.name)
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        let client = raw().await;
        client
            .batch_execute(&format!("SET search_path TO {}", self.name))
            .await
            .expect("set the search path");
        client.query_one(sql, &[]).await.expect(sql).get(0)
    }

    async fn exists(name: &str) -> bool {
        raw()
            .await
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&name])
            .await
            .expect("read the schemas")
            .is_some()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Dropped inside a runtime: drop the schema from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                raw()
                    .await
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await
            })
        })
        .join();
    }
}

type PgExecutor = Executor<PostgresStore, SqliteLog, ReqwestClient>;

/// A real executor on a PostgreSQL schema of its own, messages to a SQLite log, HTTP endpoint
/// `ledger` on a wiremock server.
struct Pg {
    schema: Schema,
    store: PostgresStore,
    log: SqliteLog,
    server: MockServer,
    executor: PgExecutor,
}

impl Pg {
    async fn new(case: &str) -> Pg {
        Pg::with_hook(case, false).await
    }

    /// With `notify`: an after-requests hook `notify` publishing to `ledger-results`.
    async fn with_hook(case: &str, notify: bool) -> Pg {
        let schema = Schema::new(case).await;
        let store = PostgresStore::connect(schema.options())
            .await
            .unwrap_or_else(|e| panic!("{}", required(e)));
        let log = SqliteLog::open(schema.dir.join("broker.db")).expect("the broker log");
        let server = MockServer::start().await;
        let config = HttpConfig::new()
            .with_retry(RetryPolicy {
                max_attempts: 2,
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
                jitter: false,
            })
            .expect("a retry policy")
            .with_endpoint("ledger", &server.uri())
            .expect("an endpoint");
        let mut builder = Executor::builder(store.clone(), log.clone())
            .http(ReqwestClient::new(config).expect("an HTTP client"))
            .owner("pg-test")
            .lease(Duration::from_secs(5))
            .retry(Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(100),
                max_attempts: Some(50),
            });
        if notify {
            builder = builder.after_requests("notify", |recorded| {
                vec![MessageEffect::new(
                    "ledger-results",
                    json!({"ok": recorded.iter().all(|r| r.outcome.is_success())}),
                )]
            });
        }
        Pg {
            executor: builder.build(),
            schema,
            store,
            log,
            server,
        }
    }

    /// Relay rounds until no outbox row is pending, or 10 s; the requests sent.
    async fn settle(&self) -> usize {
        let mut sent = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let report = self
                .executor
                .dispatch_due(100)
                .await
                .expect("a relay round");
            sent += report.progress.requests_sent;
            let pending = self
                .store
                .backlog()
                .await
                .expect("the backlog")
                .pending_rows;
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl cases::Fixture for Pg {
    type Store = PostgresStore;

    fn executor(&self) -> &PgExecutor {
        &self.executor
    }

    fn server(&self) -> &MockServer {
        &self.server
    }

    fn log(&self) -> SqliteLog {
        self.log.clone()
    }

    async fn settle(&self) -> usize {
        Pg::settle(self).await
    }
}

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

fn status(card: &str, s: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", card),
        [("card/status", json!(s))],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_request_is_sent_again_under_its_key_and_its_new_outcome_recorded() {
    bounded(async {
        let pg = Pg::new("request").await;
        cases::a_rejected_request_is_sent_again(&pg).await;
        assert_eq!(
            pg.schema
                .count("SELECT COUNT(*) FROM dead_letter_retries")
                .await,
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_outcome_an_after_requests_hook_used_is_not_retried() {
    bounded(async {
        let pg = Pg::with_hook("hook", true).await;
        cases::a_request_an_after_requests_hook_used_is_not_retried(&pg).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_message_is_published_again_under_its_id() {
    bounded(async {
        let pg = Pg::new("message").await;
        cases::a_dead_lettered_message_is_published_again(&pg).await;
    })
    .await;
}

/// A claimant that held the row's lease before it was dead-lettered and retried holds nothing:
/// the retry cleared the lease, so its token is refused; the next claim takes a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_with_a_lease_from_before_the_retry_is_refused() {
    bounded(async {
        let pg = Pg::new("lease").await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&pg.server)
            .await;
        pg.executor.run("post:4", ledger_entry()).await.unwrap();
        let options = ClaimOptions {
            owner: "old-relay".to_owned(),
            lease: Duration::from_secs(60),
            publish_inline: false,
            before_commit: None,
        };
        let mut claimed = Vec::new();
        for _ in 0..100 {
            claimed = pg.store.claim_due(10, options.clone()).await.unwrap().rows;
            if !claimed.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let [row] = claimed.as_slice() else {
            panic!("one row claimed: {claimed:?}");
        };
        let old = row.lease.clone().expect("leased");
        assert!(
            pg.store
                .dead_letter("post:4#0", "failed for good", Some(&old))
                .await
                .unwrap()
        );
        assert!(matches!(
            pg.store
                .retry_dead_letter(&DeadLetterId::Outbox("post:4#0".into()), &ana())
                .await
                .unwrap(),
            RetryOutcome::Retried(_)
        ));
        let response = RequestOutcome::Failed {
            reason: "late".to_owned(),
        };
        assert!(
            !pg.store
                .record_request("post:4#0", response, &old)
                .await
                .unwrap()
        );
        assert!(!pg.store.mark_dispatched("post:4#0", &old).await.unwrap());
        let row = &pg.store.outbox("post:4").await.unwrap()[0];
        assert!(
            row.lease.is_none() && row.dead_lettered.is_none(),
            "{row:?}"
        );
        assert_eq!(row.attempts, 0);
        let again = pg.store.claim_due(10, options).await.unwrap().rows;
        assert_eq!(again.len(), 1);
        assert!(again[0].lease.as_ref().unwrap().token > old.token);
    })
    .await;
}

/// On PostgreSQL, input dead letters are in the broker: none is listed, and retrying one is a
/// refusal that says where they are, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_dead_letters_are_left_to_the_broker() {
    bounded(async {
        let pg = Pg::new("inputs").await;
        let id: DeadLetterId = "input:3:block".parse().unwrap();
        let RetryOutcome::Refused { reason } =
            pg.store.retry_dead_letter(&id, &ana()).await.unwrap()
        else {
            panic!("an input retry is refused");
        };
        assert!(reason.contains("kept by the broker"), "{reason}");
        assert!(pg.store.retries(10).await.unwrap().is_empty());
        let backlog = Inspect::backlog(&pg.store).await.unwrap();
        assert_eq!(backlog.dead_lettered_inputs, 0);
        assert!(backlog.consumers.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_pending_rows_and_history_as_of_a_tx() {
    bounded(async {
        let pg = Pg::new("reads").await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&pg.server)
            .await;
        let t1 = pg
            .executor
            .run("card:1", status("c1", "active"))
            .await
            .unwrap()
            .tx();
        let t2 = pg
            .executor
            .run(
                "card:2",
                status("c1", "blocked").merge(MessageEffect::new("cards", json!({"c": 1}))),
            )
            .await
            .unwrap()
            .tx();
        pg.executor.run("post:5", ledger_entry()).await.unwrap();
        assert!(t2 > t1);

        let all = pg.store.runs(RunQuery::default()).await.unwrap();
        let keys: Vec<&str> = all.iter().map(|s| s.run.key.as_str()).collect();
        assert_eq!(keys, ["post:5", "card:2", "card:1"], "newest first");
        assert_eq!((all[1].dispatched, all[1].pending), (1, 0));
        let pending_runs = pg
            .store
            .runs(RunQuery {
                state: Some(RunState::Pending),
                ..RunQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(pending_runs.len(), 1);
        assert_eq!(pending_runs[0].run.key, "post:5");
        let done = pg
            .store
            .runs(RunQuery {
                state: Some(RunState::Done),
                limit: 1,
                ..RunQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(done.len(), 1, "the limit keeps the newest");
        assert_eq!(done[0].run.key, "card:2");
        let later = pg
            .store
            .runs(RunQuery {
                since: Some(pg.store.clock().await.unwrap() + 60_000),
                ..RunQuery::default()
            })
            .await
            .unwrap();
        assert!(later.is_empty());

        let detail = pg.store.run_detail("card:2").await.unwrap().unwrap();
        assert_eq!(detail.run.tx, t2);
        let written: Vec<(&str, &Value)> = detail
            .datoms
            .iter()
            .map(|d| (d.attribute.as_str(), &d.value))
            .collect();
        assert_eq!(
            written,
            [
                ("card/status", &json!("active")),
                ("card/status", &json!("blocked"))
            ],
            "the retraction of the old value, then the new one"
        );
        assert_eq!(detail.outbox.len(), 1);
        assert!(detail.outbox[0].row.dispatched_at.is_some());
        assert!(pg.store.run_detail("nope").await.unwrap().is_none());

        let pending = pg.store.pending(10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].row.id, "post:5#0");
        assert!(pending[0].ready && pending[0].recorded.is_none());

        let c1 = LookupRef::new("card/id", "c1");
        let then = pg
            .store
            .entity_history(&c1, Some(t1))
            .await
            .unwrap()
            .unwrap();
        let entity = then.entity.unwrap();
        assert_eq!(entity.attributes["card/status"], json!("active"));
        assert_eq!(entity.tx, t1);
        assert_eq!(then.datoms.len(), 1);
        let now = pg.store.entity_history(&c1, None).await.unwrap().unwrap();
        assert_eq!(
            now.entity.unwrap().attributes["card/status"],
            json!("blocked")
        );
        assert_eq!(now.datoms.len(), 3);
        let before = pg
            .store
            .entity_history(&c1, Some(Tx(t1.0 - 1)))
            .await
            .unwrap()
            .unwrap();
        assert!(before.entity.is_none() && before.datoms.is_empty());
        assert!(
            pg.store
                .entity_history(&LookupRef::new("card/id", "c9"), None)
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_preview_counts_what_a_prune_removes() {
    bounded(async {
        let pg = Pg::new("prune").await;
        cases::a_prune_preview_counts_what_a_prune_removes(&pg).await;
    })
    .await;
}

/// A schema made by an older version (without the retries table) gets the new migration when
/// it is opened, and one that is not an effects store is refused with nothing created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_schema_migrates_forward_and_a_foreign_one_is_refused() {
    bounded(async {
        let schema = Schema::new("migrate").await;
        let store = PostgresStore::connect(schema.options())
            .await
            .unwrap_or_else(|e| panic!("{}", required(e)));
        assert_eq!(
            store.schema_versions().await.unwrap(),
            [
                (1, "0001_store.sql".to_owned()),
                (2, "0002_dead_letter_retries.sql".to_owned()),
                (3, "0003_owners.sql".to_owned()),
                (4, "0004_blocked_inputs.sql".to_owned())
            ]
        );
        drop(store);
        let client = raw().await;
        client
            .batch_execute(&format!(
                "DROP TABLE {0}.dead_letter_retries; \
                 DELETE FROM {0}.schema_version WHERE version = 2",
                schema.name
            ))
            .await
            .unwrap();
        let store = PostgresStore::connect_existing(schema.options())
            .await
            .unwrap();
        assert_eq!(store.schema_versions().await.unwrap().len(), 4);
        assert!(store.retries(10).await.unwrap().is_empty());

        // Up to date, it is opened without writing: a role that may only read can inspect it.
        let reader = format!("{}_reader", schema.name);
        client
            .batch_execute(&format!(
                "DROP ROLE IF EXISTS {reader}; CREATE ROLE {reader} LOGIN; \
                 GRANT USAGE ON SCHEMA {0} TO {reader}; \
                 GRANT SELECT ON ALL TABLES IN SCHEMA {0} TO {reader}",
                schema.name
            ))
            .await
            .unwrap();
        let read_only = PostgresOptions {
            pool_size: 1,
            ..PostgresOptions::new(format!("postgres://{reader}@{HOST}:{PORT}/{DATABASE}"))
                .with_schema(&schema.name)
        };
        let opened = PostgresStore::connect_existing(read_only).await;
        let listed = match &opened {
            Ok(store) => Ok(store.runs(RunQuery::default()).await),
            Err(e) => Err(e.to_string()),
        };
        drop(opened);
        client
            .batch_execute(&format!("DROP OWNED BY {reader}; DROP ROLE {reader}"))
            .await
            .unwrap();
        let listed = listed.expect("a reader opens an up-to-date store");
        assert!(listed.expect("and lists its runs").is_empty());

        let missing = Schema::new("missing").await;
        let err = PostgresStore::connect_existing(missing.options())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(
            !Schema::exists(&missing.name).await,
            "the schema was created"
        );

        let foreign = Schema::new("foreign").await;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {0}; CREATE TABLE {0}.notes (body text)",
                foreign.name
            ))
            .await
            .unwrap();
        let err = PostgresStore::connect_existing(foreign.options())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not an effects store"), "{err}");
        let tables: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM pg_tables WHERE schemaname = $1",
                &[&foreign.name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(tables, 1, "nothing was created in it");
    })
    .await;
}

// -----------------------------------------------------------------------------------------------
// The binary.

/// Runs `effects --store URL --schema SCHEMA ARGS`: exit code, stdout, stderr.
fn effects(store: &str, schema: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_effects"))
        .env_remove("EFFECTS_STORE")
        .env_remove("EFFECTS_NAMESPACE")
        .env_remove("EFFECTS_OPERATOR")
        .env("USER", "ops")
        .arg("--store")
        .arg(store)
        .arg("--schema")
        .arg(schema)
        .args(args)
        .timeout(Duration::from_secs(30))
        .output()
        .expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs the binary on a thread of its own (the test's runtime keeps the wiremock server going).
async fn cli(schema: &str, args: &[&str]) -> (i32, String, String) {
    let schema = schema.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        effects(&url(), &schema, &args)
    })
    .await
    .expect("the CLI thread")
}

fn parse(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_on_a_postgres_schema_filled_by_the_executor() {
    bounded(async {
        let pg = Pg::new("cli").await;
        Mock::given(path("/entries/1"))
            .respond_with(
                ResponseTemplate::new(422).set_body_json(json!({"error": "account closed"})),
            )
            .up_to_n_times(1)
            .mount(&pg.server)
            .await;
        Mock::given(path("/entries/1"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({"entry": 1})))
            .mount(&pg.server)
            .await;
        Mock::given(path("/entries/2"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&pg.server)
            .await;
        let entry = |n: u32| {
            Effects::from(
                RequestEffect::new(Method::Post, "ledger", format!("/entries/{n}"))
                    .with_body(json!({"amount": n * 100})),
            )
            .merge(MessageEffect::new("entries", json!({"entry": n})).with_key(format!("a{n}")))
        };
        let t1 = pg
            .executor
            .run("card:1", status("c1", "active"))
            .await
            .unwrap()
            .tx();
        pg.executor
            .run("card:2", status("c1", "blocked"))
            .await
            .unwrap();
        pg.executor.run("post:1", entry(1)).await.unwrap();
        pg.executor.run("post:2", entry(2)).await.unwrap();
        let schema = pg.schema.name.clone();

        let (code, out, err) = cli(&schema, &["--json", "runs", "list"]).await;
        assert_eq!(code, 0, "{err}");
        let runs = parse(&out);
        let keys: Vec<&str> = runs
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["post:2", "post:1", "card:2", "card:1"], "{out}");

        let (code, out, _) = cli(&schema, &["runs", "list", "--status", "dead-lettered"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("post:1") && !out.contains("post:2"), "{out}");

        let (code, out, _) = cli(&schema, &["runs", "show", "post:1"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("422") && out.contains("/entries/1"), "{out}");

        let (code, out, _) = cli(&schema, &["--json", "outbox", "pending"]).await;
        assert_eq!(code, 0);
        let ids: Vec<String> = parse(&out)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["post:2#0", "post:2#1"], "{out}");

        let (code, out, _) = cli(&schema, &["--json", "dead-letters", "list"]).await;
        assert_eq!(code, 0);
        let dead = parse(&out);
        assert_eq!(dead.as_array().unwrap().len(), 1, "{out}");
        assert_eq!(dead[0]["id"], "post:1#0");
        assert_eq!(dead[0]["reason"], "rejected with status 422");

        let (code, out, _) = cli(
            &schema,
            &[
                "--json",
                "dead-letters",
                "retry",
                "input:1:block",
                "--reason",
                "r",
            ],
        )
        .await;
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("kept by the broker"), "{out}");

        let (code, out, err) = cli(
            &schema,
            &[
                "dead-letters",
                "retry",
                "post:1#0",
                "--reason",
                "account reopened",
                "--operator",
                "ana",
            ],
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("retried"), "{out}");
        assert_eq!(pg.settle().await, 1, "the retried request, sent once more");
        assert_eq!(
            cases::idempotency_keys(&pg)
                .await
                .iter()
                .filter(|k| k.starts_with("post:1"))
                .collect::<Vec<_>>(),
            ["post:1#0", "post:1#0"],
            "sent again under its key"
        );
        let (code, out, _) = cli(&schema, &["--json", "runs", "show", "post:1"]).await;
        assert_eq!(code, 0);
        let shown = parse(&out);
        assert_eq!(shown["run"]["status"], "done", "{out}");
        assert!(out.contains("\"operator\": \"ana\""), "{out}");

        let as_of = t1.0.to_string();
        let (code, out, _) = cli(
            &schema,
            &["--json", "history", "card/id=c1", "--as-of", &as_of],
        )
        .await;
        assert_eq!(code, 0);
        assert!(
            out.contains("\"active\"") && !out.contains("\"blocked\""),
            "{out}"
        );
        let (code, out, _) = cli(&schema, &["history", "card/id=c1"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("blocked"), "{out}");

        let before = pg.schema.count("SELECT COUNT(*) FROM outbox").await;
        let (code, out, _) = cli(
            &schema,
            &[
                "--json",
                "prune",
                "--dry-run",
                "--dispatched-older-than",
                "0s",
                "--runs-older-than",
                "0s",
            ],
        )
        .await;
        assert_eq!(code, 0, "{out}");
        let preview = parse(&out);
        assert_eq!(preview["dry_run"], true);
        let expected = pg
            .store
            .prune_preview(PruneOlderThan {
                outbox_dispatched: Some(Duration::ZERO),
                runs_completed: Some(Duration::ZERO),
                log_published: Some(Duration::ZERO),
            })
            .await
            .unwrap();
        assert_eq!(preview["outbox_rows"], expected.outbox_rows, "{out}");
        assert!(expected.outbox_rows >= 2, "{expected:?}");
        assert_eq!(pg.schema.count("SELECT COUNT(*) FROM outbox").await, before);
    })
    .await;
}

/// What workers report as blocked, listed by `effects inputs blocked` on a PostgreSQL schema
/// (table and JSON), with a reason holding NUL (which `text` refuses: written `\u{0}`), and
/// "(none)" once the reports say none are left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_blocked_inputs_on_a_postgres_schema() {
    bounded(async {
        let schema = Schema::new("cli-blocked").await;
        let store = PostgresStore::connect(schema.options())
            .await
            .unwrap_or_else(|e| panic!("{}", required(e)));
        let (code, out, err) = cli(&schema.name, &["inputs", "blocked"]).await;
        assert_eq!((code, out.as_str()), (0, "(none)\n"), "{err}");

        store
            .report_blocked(
                "worker-1",
                "block",
                "card-block-requested",
                vec![
                    BlockedInput {
                        partition_key: Some("c7".into()),
                        message_id: "m9".into(),
                        failing_for: Duration::from_secs(3 * 3600 + 60),
                        attempts: 41,
                        reason: "the store failed: connection reset\0 by peer".into(),
                    },
                    BlockedInput {
                        partition_key: None,
                        message_id: "m12".into(),
                        failing_for: Duration::from_secs(90),
                        attempts: 3,
                        reason: "not yet: [card/id \"c9\"] has not been created yet".into(),
                    },
                ],
            )
            .await
            .unwrap();
        let before = store.clock().await.unwrap();
        let (code, out, err) = cli(&schema.name, &["--json", "inputs", "blocked"]).await;
        assert_eq!(code, 0, "{err}");
        let listed = parse(&out);
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 2, "{out}");
        let first = &listed[0];
        assert_eq!(
            (
                &first["consumer"],
                &first["topic"],
                &first["partition_key"],
                &first["message_id"],
                &first["attempts"],
                &first["reason"],
                &first["owner"]
            ),
            (
                &json!("block"),
                &json!("card-block-requested"),
                &json!("c7"),
                &json!("m9"),
                &json!(41),
                &json!("the store failed: connection reset\\u{0} by peer"),
                &json!("worker-1")
            ),
            "the longest failing first: {out}"
        );
        let failing_for = first["failing_for_ms"].as_i64().unwrap();
        assert!(
            (3 * 3_600_000 + 60_000..3 * 3_600_000 + 120_000).contains(&failing_for),
            "{failing_for}"
        );
        assert!(first["reported_at"].as_i64().unwrap() <= before, "{out}");
        assert_eq!(listed[1]["partition_key"], Value::Null, "{out}");

        let (code, out, _) = cli(&schema.name, &["inputs", "blocked", "--limit", "1"]).await;
        assert_eq!(code, 0);
        for expected in [
            "c7",
            "m9",
            "3h",
            "41",
            "connection reset\\u{0} by peer",
            "worker-1",
        ] {
            assert!(out.contains(expected), "`{expected}` is not in\n{out}");
        }
        assert!(!out.contains("m12"), "--limit 1:\n{out}");
        assert_eq!(Inspect::backlog(&store).await.unwrap().blocked_inputs, 2);

        store
            .report_blocked("worker-1", "block", "card-block-requested", Vec::new())
            .await
            .unwrap();
        let (code, out, _) = cli(&schema.name, &["inputs", "blocked"]).await;
        assert_eq!((code, out.as_str()), (0, "(none)\n"));
        assert_eq!(schema.count("SELECT COUNT(*) FROM blocked_inputs").await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_a_schema_that_is_not_a_store_or_a_server_that_is_down() {
    bounded(async {
        let missing = Schema::new("cli-missing").await;
        let (code, _, err) = cli(&missing.name, &["runs", "list"]).await;
        assert_eq!(code, 1);
        assert!(
            err.contains("does not exist") && err.contains("not an effects store"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !Schema::exists(&missing.name).await,
            "the CLI created the schema"
        );

        let foreign = Schema::new("cli-foreign").await;
        raw()
            .await
            .batch_execute(&format!(
                "CREATE SCHEMA {0}; CREATE TABLE {0}.schema_version (version bigint)",
                foreign.name
            ))
            .await
            .unwrap();
        let (code, _, err) = cli(&foreign.name, &["outbox", "pending"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("not an effects store"), "{err}");

        let bad = tokio::task::spawn_blocking(|| {
            effects(
                "postgres://postgres@127.0.0.1:9/test",
                "public",
                &["runs", "list"],
            )
        })
        .await
        .unwrap();
        assert_eq!(bad.0, 1);
        assert!(
            bad.2.starts_with("error: ") && !bad.2.contains("panicked"),
            "{}",
            bad.2
        );
        assert!(bad.2.contains("127.0.0.1:9"), "{}", bad.2);

        let invalid =
            tokio::task::spawn_blocking(|| effects(&url(), "Not-A-Schema", &["runs", "list"]))
                .await
                .unwrap();
        assert_eq!(invalid.0, 1);
        assert!(invalid.2.contains("is not accepted"), "{}", invalid.2);
    })
    .await;
}

// -----------------------------------------------------------------------------------------------
// The run's row lock: a retry of a message that waited for its run's requests, while another
// transaction finishing those requests holds the run's row.

/// What became of the retried message.
#[derive(Debug)]
struct AfterTheRace {
    /// Whether the retry waited for the transaction holding the run's row.
    waited: bool,
    /// Whether the message was ready once both had committed.
    ready: bool,
    /// The message ids the broker holds on `entries` after the relay settled.
    published: Vec<String>,
    /// The run's status after the relay settled.
    status: RunStatus,
}

async fn retry_while_the_requests_finish(mutant: bool) -> AfterTheRace {
    let pg = Pg::new(if mutant { "race-mutant" } else { "race" }).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&pg.server)
        .await;
    let effects = ledger_entry().merge(MessageEffect::new("entries", json!({"n": 6})));
    pg.executor.run("post:6", effects).await.unwrap();
    // The message waits for the request; an operator gives up on it.
    assert!(
        pg.store
            .dead_letter("post:6#1", "not wanted any more", None)
            .await
            .unwrap()
    );
    // The request is resolved (failed for good): the run's requests are all resolved, and the
    // run waits for its after-requests step.
    let options = ClaimOptions {
        owner: "relay".to_owned(),
        lease: Duration::from_secs(60),
        publish_inline: false,
        before_commit: None,
    };
    let mut claimed = Vec::new();
    for _ in 0..100 {
        claimed = pg.store.claim_due(10, options.clone()).await.unwrap().rows;
        if !claimed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lease = claimed[0].lease.clone().expect("leased");
    let failed = RequestOutcome::Failed {
        reason: "the ledger is down".to_owned(),
    };
    assert!(
        pg.store
            .record_request("post:6#0", failed, &lease)
            .await
            .unwrap()
    );
    assert_eq!(
        pg.store.run("post:6").await.unwrap().unwrap().status,
        RunStatus::RequestsPending
    );

    // Another transaction finishing the run's requests: it holds the run's row and, with no
    // row of the run left pending, completes it.
    let finishing = raw().await;
    finishing
        .batch_execute(&format!(
            "SET search_path TO {}; BEGIN; \
             SELECT 1 FROM effect_runs WHERE key = 'post:6' FOR UPDATE; \
             UPDATE effect_runs SET status = 'done', completed_at_ms = effects_now_ms(), \
             updated_at_ms = effects_now_ms() WHERE key = 'post:6'",
            pg.schema.name
        ))
        .await
        .unwrap();
    let store = pg.store.clone();
    let retry = tokio::spawn(async move {
        let id = DeadLetterId::Outbox("post:6#1".into());
        if mutant {
            store
                .mutant_retry_without_run_lock("post:6#1", &ana())
                .await
        } else {
            store.retry_dead_letter(&id, &ana()).await
        }
    });
    // A retry that takes the run's row waits for that transaction; one that does not is done
    // in a few milliseconds (a second allows for a loaded machine).
    for _ in 0..50 {
        if retry.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = !retry.is_finished();
    finishing.batch_execute("COMMIT").await.unwrap();
    let outcome = retry.await.unwrap().unwrap();
    assert!(matches!(outcome, RetryOutcome::Retried(_)), "{outcome:?}");

    let ready = pg
        .store
        .run_detail("post:6")
        .await
        .unwrap()
        .unwrap()
        .outbox
        .iter()
        .find(|e| e.row.id == "post:6#1")
        .expect("the message")
        .ready;
    pg.settle().await;
    AfterTheRace {
        waited,
        ready,
        published: cases::published(&pg, "entries").await,
        status: pg.store.run("post:6").await.unwrap().unwrap().status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_for_the_run_s_row_and_sees_the_requests_finished() {
    let after = bounded(retry_while_the_requests_finish(false)).await;
    assert!(after.waited, "{after:?}");
    assert!(after.ready, "{after:?}");
    assert_eq!(after.published, ["post:6#1"], "{after:?}");
    assert_eq!(after.status, RunStatus::Done, "{after:?}");
}

/// The checks above fail against a retry that reads the run's row without locking it: it does
/// not wait, decides from the run as it was, and the message is left waiting for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_a_retry_without_the_run_lock_fails_the_race_checks() {
    let after = bounded(retry_while_the_requests_finish(true)).await;
    assert!(!after.waited, "the check on waiting fails: {after:?}");
    assert!(!after.ready, "the check on readiness fails: {after:?}");
    assert!(
        after.published.is_empty(),
        "the check on publishing fails: {after:?}"
    );
}
