//! Requests the executor refuses before anything is written: a request effect that carries
//! credentials, and a request to an endpoint the HTTP client does not know. Counted at the
//! source: the rows of every table of the real SQLite file, and the requests a real server
//! (wiremock on loopback) received.

#![cfg(all(feature = "http", feature = "sqlite"))]

mod support;

use std::time::Duration;

use effects_core::executor::{BatchItem, Executor, ValidationError};
use effects_core::http::{
    Endpoint, HttpClient, HttpConfig, HttpError, HttpResponse, ReqwestClient, RetryPolicy,
};
use effects_core::store::{SqliteStore, Store};
use effects_core::{
    DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect, RunError,
};
use serde_json::json;
use support::{bounded, row_counts, temp_dir, unchanged};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn accepting_server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

fn client(server: &MockServer) -> ReqwestClient {
    let endpoint = Endpoint::new("fraud-check", &server.uri())
        .unwrap()
        .with_header("X-Api-Key", "sk-live-4f9c2e7a1b")
        .unwrap()
        .with_secret_header("X-Session")
        .unwrap();
    let config = HttpConfig::new()
        .add_endpoint(endpoint)
        .unwrap()
        .with_attempt_timeout(Duration::from_secs(5))
        .with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .unwrap();
    ReqwestClient::new(config).unwrap()
}

/// A transfer: a datom, a fraud check and a message.
fn transfer(request: RequestEffect) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("transfer/id", "t1"),
        [("transfer/amount", json!(100))],
    ))
    .merge(request)
    .merge(MessageEffect::new(
        "transfers",
        json!({"transfer_id": "t1"}),
    ))
}

fn check(endpoint: &str) -> RequestEffect {
    RequestEffect::new(Method::Post, endpoint, "/checks").with_body(json!({"amount": 100}))
}

fn with_header(mut request: RequestEffect, name: &str, value: &str) -> RequestEffect {
    request.headers.insert(name.to_owned(), value.to_owned());
    request
}

/// A fresh database file and its row counts before anything ran.
fn fresh_store(name: &str) -> (SqliteStore, std::path::PathBuf, Vec<(String, i64)>) {
    let path = temp_dir(name).join("effects.db");
    let store = SqliteStore::open(&path).unwrap();
    let before = row_counts(&path);
    (store, path, before)
}

async fn requests_received(server: &MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

#[tokio::test]
async fn a_request_carrying_credentials_is_refused_with_nothing_written() {
    bounded(async {
        let server = accepting_server().await;
        let (store, path, before) = fresh_store("refuse-credentials");
        let executor = Executor::builder(store.clone(), store.log())
            .http(client(&server))
            .build();

        let carrying = [
            ("Authorization", "Bearer tok-8d3e5f1a9c"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("Cookie", "sid=ck-71a2b3c4d5"),
            // Configured on the endpoint, any spelling.
            ("x-api-key", "sk-live-4f9c2e7a1b"),
            // Declared secret on the endpoint.
            ("X-SESSION", "sess-5e6f7a8b9c"),
        ];
        for (name, value) in carrying {
            let effects = transfer(with_header(check("fraud-check"), name, value));
            let error = executor.run("transfer:t1", effects).await.unwrap_err();
            let RunError::Invalid { source, .. } = &error else {
                panic!("{name}: expected Invalid, got {error:?}")
            };
            assert_eq!(
                source,
                &ValidationError::CredentialHeader {
                    index: 0,
                    endpoint: "fraud-check".to_owned(),
                    header: name.to_owned(),
                }
            );
            let message = error.to_string();
            assert!(
                message.contains("configure it on the endpoint"),
                "{message}"
            );
            assert!(
                !message.contains(value),
                "the error repeats the value: {message}"
            );
            unchanged(&before, &row_counts(&path)).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(requests_received(&server).await, 0);

        // A batch refuses the item alone.
        let results = executor
            .run_batch(vec![
                BatchItem::new(
                    "transfer:t1",
                    transfer(with_header(check("fraud-check"), "Authorization", "x")),
                ),
                BatchItem::new(
                    "transfer:t2",
                    Effects::from(MessageEffect::new("t", json!(2))),
                ),
            ])
            .await
            .unwrap();
        assert!(matches!(results[0], Err(RunError::Invalid { .. })));
        assert!(results[1].is_ok());
        assert!(store.run("transfer:t1").await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn a_misnamed_endpoint_is_refused_with_nothing_written() {
    bounded(async {
        let server = accepting_server().await;
        let (store, path, before) = fresh_store("refuse-endpoint");
        let executor = Executor::builder(store.clone(), store.log())
            .http(client(&server))
            .build();

        let error = executor
            .run("transfer:t1", transfer(check("fraud-chek")))
            .await
            .unwrap_err();
        let RunError::Invalid { source, .. } = &error else {
            panic!("expected Invalid, got {error:?}")
        };
        assert_eq!(
            source,
            &ValidationError::UnknownEndpoint {
                index: 0,
                endpoint: "fraud-chek".to_owned(),
            }
        );
        assert!(error.to_string().contains("`fraud-chek`"), "{error}");
        unchanged(&before, &row_counts(&path)).unwrap();
        assert_eq!(requests_received(&server).await, 0);
    })
    .await;
}

/// The same effects without the credential, and with the right endpoint name, are written: the
/// row counts do see a run.
#[tokio::test]
async fn mutant_valid_effects_change_the_counts() {
    bounded(async {
        let server = accepting_server().await;
        let (store, path, before) = fresh_store("refuse-mutant-valid");
        let executor = Executor::builder(store.clone(), store.log())
            .http(client(&server))
            .build();
        executor
            .run("transfer:t1", transfer(check("fraud-check")))
            .await
            .unwrap();
        assert!(unchanged(&before, &row_counts(&path)).is_err());
        assert_eq!(requests_received(&server).await, 1);
    })
    .await;
}

/// A client that claims to know every endpoint: the check that nothing is written before a
/// misnamed endpoint is found must fail with it, since the run then commits and is
/// dead-lettered afterwards.
struct KnowsEverything(ReqwestClient);

impl HttpClient for KnowsEverything {
    async fn send(&self, key: &str, request: &RequestEffect) -> Result<HttpResponse, HttpError> {
        self.0.send(key, request).await
    }

    fn knows(&self, _endpoint: &str) -> bool {
        true
    }

    fn is_secret_header(&self, endpoint: &str, name: &str) -> bool {
        self.0.is_secret_header(endpoint, name)
    }
}

#[tokio::test]
async fn mutant_a_client_that_knows_every_name_fails_the_check() {
    bounded(async {
        let server = accepting_server().await;
        let (store, path, before) = fresh_store("refuse-mutant-endpoint");
        let executor = Executor::builder(store.clone(), store.log())
            .http(KnowsEverything(client(&server)))
            .build();
        let outcome = executor
            .run("transfer:t1", transfer(check("fraud-chek")))
            .await
            .expect("without the check the run commits");
        assert_eq!(outcome.progress().dead_lettered, 1);
        assert!(unchanged(&before, &row_counts(&path)).is_err());
    })
    .await;
}
