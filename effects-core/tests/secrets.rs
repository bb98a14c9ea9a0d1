//! No byte of a credential in the SQLite files, the tracing output, `Debug` output or a
//! snapshot: a run against a real server on loopback (wiremock) that echoes every credential it
//! receives and hands out a session cookie and a session header.
//!
//! The tracing subscriber is the process's global one, so that every span and event of every
//! thread is written down; this binary therefore holds one test, which runs the check and then
//! the same searches against secrets that are there, to show that they can fail.

#![cfg(all(feature = "http", feature = "sqlite"))]

mod support;

#[cfg(feature = "testing")]
use std::collections::BTreeMap;
use std::time::Duration;

use effects_core::executor::{Backoff, Executor, RunOutcome};
use effects_core::http::{
    Endpoint, HttpConfig, REDACTED, ReqwestClient, RetryPolicy, Secret, Token,
};
use effects_core::store::{RequestOutcome, RunStatus, SqliteStore, Store};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use serde_json::json;
use support::{Capture, every_attempt_carries, files_containing, received, temp_dir};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

const API_KEY: &str = "sk-live-4f9c2e7a1b";
const TOKEN: &str = "tok-8d3e5f1a9c";
const COOKIE: &str = "ck-71a2b3c4d5";
const SESSION: &str = "sess-5e6f7a8b9c";
const SECRETS: [&str; 4] = [API_KEY, TOKEN, COOKIE, SESSION];

fn client(endpoint: Endpoint) -> ReqwestClient {
    let config = HttpConfig::new()
        .add_endpoint(endpoint)
        .expect("endpoint")
        .with_attempt_timeout(Duration::from_secs(5))
        .with_retry(RetryPolicy {
            max_attempts: 2,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            jitter: false,
        })
        .expect("retry policy");
    ReqwestClient::new(config).expect("client")
}

/// Answers with the credentials it received in its body, a session cookie and a session
/// header: the worst a server can do with secrets.
struct Echo {
    status: u16,
}

impl Respond for Echo {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        ResponseTemplate::new(self.status)
            .insert_header("set-cookie", format!("sid={COOKIE}; HttpOnly").as_str())
            .insert_header("x-session", SESSION)
            .insert_header("x-echo", header("x-api-key").as_str())
            .set_body_json(json!({
                "received": {
                    "authorization": header("authorization"),
                    "x-api-key": header("x-api-key"),
                    "idempotency-key": header("idempotency-key"),
                },
                "note": format!("your key {} is fine", header("x-api-key")),
            }))
    }
}

fn fraud_check(server: &MockServer) -> Endpoint {
    Endpoint::new("fraud-check", &server.uri())
        .unwrap()
        .with_header("X-Api-Key", Secret::new(API_KEY))
        .unwrap()
        .with_bearer(|| async { Ok(Token::new(TOKEN).expires_in(Duration::from_secs(3600))) })
        .unwrap()
        .with_secret_header("X-Session")
        .unwrap()
}

fn transfer_effects() -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("transfer/id", "t1"),
        [("transfer/amount", json!(100))],
    ))
    .merge(
        RequestEffect::new(Method::Post, "fraud-check", "/checks")
            .with_body(json!({"amount": 100})),
    )
    .merge(MessageEffect::new(
        "transfers",
        json!({"transfer_id": "t1"}),
    ))
}

#[test]
fn no_byte_of_a_secret_is_stored_logged_or_shown() {
    let capture = Capture::install_global();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(support::bounded(async {
        secrets_stay_out(&capture).await;
        capture.clear();
        mutant_secrets_that_are_there_are_found(&capture).await;
    }));
}

/// A run whose request fails twice (the client's retries are exhausted, the failure is
/// recorded) and then succeeds from the relay. Nothing of the credentials reaches the database
/// files, the tracing output, `Debug` output or a snapshot.
async fn secrets_stay_out(capture: &Capture) {
    let dir = temp_dir("secrets");
    let db = dir.join("effects.db");
    let shown = {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(Echo { status: 500 })
            .up_to_n_times(2)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(Echo { status: 200 })
            .mount(&server)
            .await;

        let store = SqliteStore::open(&db).unwrap();
        let client = client(fraud_check(&server));
        let executor = Executor::builder(store.clone(), store.log())
            .http(client.clone())
            .retry(Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(20),
                max_attempts: None,
            })
            .build();

        let outcome = executor
            .run("transfer:t1", transfer_effects())
            .await
            .unwrap();
        assert!(matches!(outcome, RunOutcome::Applied { .. }), "{outcome:?}");
        assert_eq!(
            outcome.progress().pending,
            2,
            "the request failed, the message waits"
        );
        let failed = store.outbox("transfer:t1").await.unwrap();
        let last_error = failed[0]
            .last_error
            .clone()
            .expect("the failure is recorded");
        assert!(last_error.contains("status 500"), "{last_error}");

        for _ in 0..200 {
            executor.dispatch_due(10).await.unwrap();
            let run = store.run("transfer:t1").await.unwrap().unwrap();
            if run.status == RunStatus::Done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            store.run("transfer:t1").await.unwrap().unwrap().status,
            RunStatus::Done
        );

        // The credentials went out on every attempt, the relay's included.
        let requests = received(&server).await;
        assert_eq!(requests.len(), 3);
        every_attempt_carries(&requests, "x-api-key", API_KEY).unwrap();
        every_attempt_carries(&requests, "authorization", &format!("Bearer {TOKEN}")).unwrap();

        // What was recorded: the response, masked.
        let recorded = store.recorded_requests("transfer:t1").await.unwrap();
        let RequestOutcome::Response { response } = &recorded[0].outcome else {
            panic!("{:?}", recorded[0].outcome)
        };
        assert_eq!(response.status, 200);
        assert_eq!(response.headers["set-cookie"], REDACTED);
        assert_eq!(response.headers["x-session"], REDACTED);
        assert_eq!(response.headers["x-echo"], REDACTED);
        assert_eq!(response.body["received"]["x-api-key"], json!(REDACTED));
        assert_eq!(
            response.body["received"]["authorization"],
            json!("Bearer [redacted]")
        );
        assert_eq!(
            response.body["received"]["idempotency-key"],
            json!("transfer:t1#0")
        );

        #[cfg(feature = "testing")]
        snapshots(&recorded, &requests);

        format!("{executor:?}\n{client:?}\n{:?}", client.config())
    };

    for secret in SECRETS {
        let (found, searched) = files_containing(&dir, secret.as_bytes());
        assert!(searched > 0, "no database file was searched");
        assert!(found.is_empty(), "`{secret}` is in {found:?}");
    }
    let traced = capture.text();
    assert!(
        traced.contains("http_attempt") && traced.contains("transfer:t1#0"),
        "the capture missed the client's spans:\n{traced}"
    );
    for secret in SECRETS {
        assert!(!traced.contains(secret), "`{secret}` was traced:\n{traced}");
        assert!(
            !shown.contains(secret),
            "`{secret}` is in Debug output:\n{shown}"
        );
    }
    assert!(shown.contains("x-api-key: [redacted]"), "{shown}");
}

/// What was recorded, and what the server received (raw credentials), through the testing
/// kit's redactions.
#[cfg(feature = "testing")]
fn snapshots(recorded: &[effects_core::store::RecordedRequest], requests: &[wiremock::Request]) {
    use effects_core::testing::Redactions;

    let redactions = Redactions::default().timestamp_field("date");
    insta::assert_yaml_snapshot!("recorded_requests", redactions.apply(recorded));

    let received: Vec<BTreeMap<&str, &str>> = requests
        .iter()
        .map(|r| {
            ["authorization", "x-api-key", "idempotency-key"]
                .into_iter()
                .map(|name| (name, r.headers[name].to_str().unwrap()))
                .collect()
        })
        .collect();
    insta::assert_yaml_snapshot!("what_the_server_received", redactions.apply(&received));

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    for name in ["recorded_requests", "what_the_server_received"] {
        let path = dir.join(format!("secrets__{name}.snap"));
        let text = std::fs::read_to_string(&path).expect("the snapshot file exists");
        for secret in [API_KEY, TOKEN, COOKIE, SESSION] {
            assert!(
                !text.contains(secret),
                "`{secret}` is in {}",
                path.display()
            );
        }
    }
}

/// The searches above, against secrets that are there: a cookie stored in a message payload
/// (messages are not checked for credentials), a trace that carries a header value, and a
/// document that skips the testing kit. Each search must find its secret.
async fn mutant_secrets_that_are_there_are_found(capture: &Capture) {
    let dir = temp_dir("secrets-mutant");
    let store = SqliteStore::open(dir.join("effects.db")).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();
    let careless = MessageEffect::new("sessions", json!({"set-cookie": format!("sid={COOKIE}")}));
    executor
        .run("transfer:t1", Effects::from(careless))
        .await
        .unwrap();
    let (found, _) = files_containing(&dir, COOKIE.as_bytes());
    assert!(!found.is_empty(), "the search missed a stored cookie");

    tracing::trace!(authorization = %format!("Bearer {TOKEN}"), "a careless trace");
    assert!(capture.text().contains(TOKEN), "the capture missed a trace");

    let raw = json!({"authorization": format!("Bearer {TOKEN}")});
    assert!(raw.to_string().contains(TOKEN));
    #[cfg(feature = "testing")]
    assert!(
        !effects_core::testing::redact(&raw)
            .to_string()
            .contains(TOKEN)
    );
}
