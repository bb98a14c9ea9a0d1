//! The `effects` binary end to end, on real store files: one made by the cards example's main
//! job, one made by the test harness with HTTP requests that were rejected or keep failing.
//! Output is compared with reviewed insta snapshots; times, temporary paths, ages and process
//! ids are redacted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use assert_cmd::Command;
use effects_core::store::{BlockedInput, SqliteStore, Store};
use effects_core::testing::harness::Harness;
use effects_core::{Effects, MessageEffect, Method, RequestEffect};
use serde_json::json;
use wiremock::matchers::path;
use wiremock::{Mock, ResponseTemplate};

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

/// A store file made by the cards example's main job.
fn cards_store(dir: &TempDir) -> PathBuf {
    let path = dir.0.join("cards.db");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(cards::job::run(&path))
        .expect("the cards job runs");
    path
}

/// Runs `effects --store sqlite:PATH ARGS`; returns the exit code, stdout and stderr as one
/// text for a snapshot.
fn effects(store: &str, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_effects"))
        .env_remove("EFFECTS_STORE")
        .env_remove("EFFECTS_NAMESPACE")
        .env_remove("EFFECTS_OPERATOR")
        .env("USER", "ops")
        .arg("--store")
        .arg(store)
        .args(args)
        .timeout(Duration::from_secs(30))
        .output()
        .expect("the binary runs");
    format!(
        "$ effects {}\nexit: {}\n{}{}",
        args.join(" "),
        output
            .status
            .code()
            .map_or("killed".to_owned(), |c| c.to_string()),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}

fn sqlite(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// Redactions of what changes from run to run.
fn settings(dir: &TempDir) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(&regex_escape(&dir.0.display().to_string()), "[dir]");
    s.add_filter(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", "[time]          ");
    s.add_filter(r#""(\w+_at)": \d+"#, r#""$1": "[ms]""#);
    s.add_filter(r"harness-\d+", "harness-[pid]");
    s.add_filter(r"localhost:\d+|127\.0\.0\.1:\d+", "[server]");
    s.set_prepend_module_to_snapshot(false);
    s
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[test]
fn the_cards_store_through_the_cli() {
    let dir = TempDir::new("cards");
    let db = cards_store(&dir);
    let store = sqlite(&db);
    settings(&dir).bind(|| {
        insta::assert_snapshot!("runs_list", effects(&store, &["runs", "list"]));
        insta::assert_snapshot!(
            "runs_list_pending",
            effects(
                &store,
                &["runs", "list", "--status", "pending", "--since", "1h"]
            )
        );
        insta::assert_snapshot!(
            "runs_show",
            effects(
                &store,
                &[
                    "runs",
                    "show",
                    "block_all:customer-cards-block-requested:n1"
                ]
            )
        );
        insta::assert_snapshot!(
            "runs_show_json",
            effects(
                &store,
                &["--json", "runs", "show", "block:card-block-requested:m1"]
            )
        );
        insta::assert_snapshot!("outbox_pending", effects(&store, &["outbox", "pending"]));
        insta::assert_snapshot!(
            "dead_letters_list",
            effects(&store, &["dead-letters", "list"])
        );
        insta::assert_snapshot!(
            "inputs_blocked_none",
            effects(&store, &["inputs", "blocked"])
        );
        insta::assert_snapshot!(
            "history_as_of",
            effects(&store, &["history", "card/id=c1", "--as-of", "1"])
        );
        insta::assert_snapshot!("history_now", effects(&store, &["history", "card/id=c1"]));
        insta::assert_snapshot!("prune_dry_run", effects(&store, &["prune", "--dry-run"]));
        insta::assert_snapshot!(
            "retry_input",
            effects(
                &store,
                &[
                    "dead-letters",
                    "retry",
                    "input:3:block",
                    "--reason",
                    "c2's request was fixed upstream",
                ]
            )
        );
        insta::assert_snapshot!(
            "retry_input_again",
            effects(
                &store,
                &[
                    "dead-letters",
                    "retry",
                    "input:3:block",
                    "--reason",
                    "again"
                ]
            )
        );
        insta::assert_snapshot!(
            "dead_letters_after_retry",
            effects(&store, &["--json", "dead-letters", "list"])
        );
    });
}

/// What workers reported as blocked, as the CLI shows it: longest failing first, a message
/// without a key, a reason over two lines, NUL in text (written `\u{0}`), two processes.
#[test]
fn blocked_inputs_through_the_cli() {
    let dir = TempDir::new("blocked");
    let db = dir.0.join("store.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let store = SqliteStore::open(&db).expect("a store");
    let report = |owner: &str, consumer: &str, topic: &str, blocked: Vec<BlockedInput>| {
        runtime
            .block_on(store.report_blocked(owner, consumer, topic, blocked))
            .expect("the report is kept");
    };
    let input =
        |key: Option<&str>, id: &str, failing_for: Duration, attempts, reason: &str| BlockedInput {
            partition_key: key.map(str::to_owned),
            message_id: id.to_owned(),
            failing_for,
            attempts,
            reason: reason.to_owned(),
        };
    report(
        "worker-1",
        "block",
        "card-block-requested",
        vec![
            input(
                Some("c7"),
                "m9",
                Duration::from_secs(3 * 3600 + 60),
                41,
                "the store failed while loading the input: database error while loading a card: \
                 database is locked",
            ),
            input(
                None,
                "m12",
                Duration::from_secs(2 * 3600 + 60),
                3,
                "not yet: [card/id \"c9\"] has not been created yet\n(the card service is behind)",
            ),
        ],
    );
    report(
        "worker-2",
        "notify",
        "card-status-changed",
        vec![input(
            Some("u\u{0}1"),
            "n4",
            Duration::from_secs(5 * 60 + 30),
            7,
            "the store failed: a\0b",
        )],
    );
    let db_url = sqlite(&db);
    let mut table = settings(&dir);
    // How long ago the test wrote the reports: a second or two, on a slow machine more; the
    // padding follows.
    table.add_filter(r"\b\d+s ago", "[age] ago");
    table.add_filter(r" {2,}", " ");
    table.add_filter(r"[─═]{2,}", "─");
    table.bind(|| {
        insta::assert_snapshot!("inputs_blocked", effects(&db_url, &["inputs", "blocked"]));
    });
    let mut json = settings(&dir);
    json.add_filter(r#""failing_for_ms": \d+"#, r#""failing_for_ms": "[ms]""#);
    json.bind(|| {
        insta::assert_snapshot!(
            "inputs_blocked_json",
            effects(&db_url, &["--json", "inputs", "blocked", "--limit", "2"])
        );
    });
    report("worker-1", "block", "card-block-requested", Vec::new());
    report("worker-2", "notify", "card-status-changed", Vec::new());
    assert_eq!(
        effects(&db_url, &["inputs", "blocked"]),
        "$ effects inputs blocked\nexit: 0\n(none)\n"
    );
    assert_eq!(
        effects(&db_url, &["--json", "inputs", "blocked"]),
        "$ effects --json inputs blocked\nexit: 0\n[]\n"
    );
}

#[test]
fn a_missing_or_wrong_store_is_a_clear_error_and_nothing_is_created() {
    let dir = TempDir::new("errors");
    let missing = dir.0.join("missing.db");
    let text = dir.0.join("notes.txt");
    std::fs::write(&text, "not a database\n").expect("write a file");
    let foreign = dir.0.join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .and_then(|c| c.execute_batch("CREATE TABLE notes (body TEXT)"))
        .expect("a SQLite database of another program");
    let foreign_before = std::fs::read(&foreign).expect("read it");
    settings(&dir).bind(|| {
        insta::assert_snapshot!(
            "missing_store",
            effects(&sqlite(&missing), &["runs", "list"])
        );
        insta::assert_snapshot!("text_file", effects(&sqlite(&text), &["runs", "list"]));
        insta::assert_snapshot!(
            "foreign_database",
            effects(&sqlite(&foreign), &["runs", "list"])
        );
        // Nothing listens on port 9 of loopback: a PostgreSQL server that is down.
        insta::assert_snapshot!(
            "postgres",
            effects("postgres://postgres@127.0.0.1:9/test", &["runs", "list"])
        );
        insta::assert_snapshot!("not_a_url", effects("cards.db", &["runs", "list"]));
    });
    assert!(!missing.exists(), "the CLI created {}", missing.display());
    assert_eq!(std::fs::read(&foreign).expect("read it"), foreign_before);
    assert_eq!(
        std::fs::read_dir(&dir.0).expect("list").count(),
        2,
        "nothing else was created: the two files the test wrote"
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = TempDir::new("arguments");
    let db = cards_store(&dir);
    let store = sqlite(&db);
    settings(&dir).bind(|| {
        insta::assert_snapshot!(
            "unknown_run",
            effects(&store, &["runs", "show", "block:card-block-requested:nope"])
        );
        insta::assert_snapshot!(
            "bad_since",
            effects(&store, &["runs", "list", "--since", "yesterday"])
        );
        insta::assert_snapshot!("bad_entity", effects(&store, &["history", "c1"]));
        insta::assert_snapshot!(
            "unknown_entity",
            effects(&store, &["history", "card/id=c9"])
        );
        insta::assert_snapshot!(
            "bad_dead_letter_id",
            effects(
                &store,
                &["dead-letters", "retry", "input:x:block", "--reason", "r"]
            )
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_rejected_and_pending_through_the_cli() {
    let dir = TempDir::new("requests");
    let h = Harness::builder()
        .endpoint("ledger")
        .keep_database()
        .build()
        .await;
    Mock::given(path("/entries/1"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({"error": "account closed"})))
        .up_to_n_times(1)
        .mount(h.server())
        .await;
    Mock::given(path("/entries/1"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"entry": 1})))
        .mount(h.server())
        .await;
    Mock::given(path("/entries/2"))
        .respond_with(ResponseTemplate::new(503))
        .mount(h.server())
        .await;
    let entry = |n: u32| {
        Effects::from(
            RequestEffect::new(Method::Post, "ledger", format!("/entries/{n}"))
                .with_body(json!({"amount": n * 100})),
        )
        .merge(MessageEffect::new("entries", json!({"entry": n})).with_key(format!("a{n}")))
    };
    h.executor().run("post:1", entry(1)).await.expect("run 1");
    h.executor().run("post:2", entry(2)).await.expect("run 2");
    let store = sqlite(h.path());
    let mut s = settings(&dir);
    s.add_filter(
        &regex_escape(
            &h.path()
                .parent()
                .expect("a directory")
                .display()
                .to_string(),
        ),
        "[harness]",
    );
    // Ages and lease times change with the machine's speed: normalise them and the padding.
    s.add_filter(r"\b\d+[smhd]\b", "[age]");
    s.add_filter(r" {2,}", " ");
    s.add_filter(r"[─═]{2,}", "─");
    let run = |args: Vec<&str>| {
        let store = store.clone();
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        std::thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            effects(&store, &args)
        })
        .join()
        .expect("the CLI thread")
    };
    s.bind(|| {
        insta::assert_snapshot!("harness_outbox_pending", run(vec!["outbox", "pending"]));
        insta::assert_snapshot!("harness_dead_letters", run(vec!["dead-letters", "list"]));
        insta::assert_snapshot!(
            "harness_runs_show_rejected",
            run(vec!["runs", "show", "post:1"])
        );
        insta::assert_snapshot!(
            "harness_runs_list_dead_lettered",
            run(vec!["runs", "list", "--status", "dead-lettered"])
        );
        insta::assert_snapshot!(
            "harness_retry_all",
            run(vec![
                "dead-letters",
                "retry",
                "--all",
                "--kind",
                "request",
                "--reason",
                "account reopened",
                "--operator",
                "ana",
            ])
        );
    });
    let settled = h.settle().await;
    assert_eq!(settled.progress.requests_sent, 1, "{settled:?}");
    s.bind(|| {
        insta::assert_snapshot!(
            "harness_runs_show_retried",
            run(vec!["runs", "show", "post:1"])
        );
    });
    let keys: Vec<String> = h
        .server()
        .received_requests()
        .await
        .expect("recording is on")
        .iter()
        .filter(|r| r.url.path() == "/entries/1")
        .filter_map(|r| {
            r.headers
                .get("idempotency-key")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(keys, ["post:1#0", "post:1#0"], "sent again under its key");
    let _ = std::fs::remove_dir_all(h.path().parent().expect("a directory"));
}
