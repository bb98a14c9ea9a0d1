//! Endpoint credentials against a real HTTP server on loopback (wiremock): static headers,
//! basic auth and bearer tokens on every attempt, token refresh on expiry and after a 401,
//! credentials checked as they are configured and never shown by `Debug`. (That no byte of a
//! secret is stored, traced or snapshotted is `tests/secrets.rs`.)
//!
//! Each check is also run once against a deliberately broken setup (the `mutant_` tests), to
//! show that it can fail.

#![cfg(all(feature = "http", feature = "sqlite"))]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use effects_core::http::{
    Endpoint, HttpClient, HttpConfig, HttpError, ReqwestClient, RetryPolicy, Token, TokenError,
};
use effects_core::{Method, RequestEffect};
use serde_json::json;
use support::{bounded, every_attempt_carries, received};
use wiremock::matchers::{header, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

const API_KEY: &str = "sk-live-4f9c2e7a1b";
const TOKEN: &str = "tok-8d3e5f1a9c";

fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        jitter: false,
    }
}

fn client(endpoint: Endpoint, max_attempts: u32) -> ReqwestClient {
    let config = HttpConfig::new()
        .add_endpoint(endpoint)
        .expect("endpoint")
        .with_attempt_timeout(Duration::from_secs(5))
        .with_retry(fast_retries(max_attempts))
        .expect("retry policy");
    ReqwestClient::new(config).expect("client")
}

/// A provider that hands out `tok-<n>-…` and counts how often it was asked.
fn counting_provider(
    calls: &Arc<AtomicUsize>,
    lifetime: Option<Duration>,
) -> impl Fn() -> std::future::Ready<Result<Token, TokenError>> + Send + Sync + 'static {
    let calls = Arc::clone(calls);
    move || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let token = Token::new(format!("tok-{n}-a1b2c3d4"));
        std::future::ready(Ok(match lifetime {
            Some(lifetime) => token.expires_in(lifetime),
            None => token,
        }))
    }
}

/// A server that fails twice with 503 and then accepts.
async fn flaky_server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

fn post(endpoint: &str) -> RequestEffect {
    RequestEffect::new(Method::Post, endpoint, "/checks").with_body(json!({"amount": 100}))
}

#[tokio::test]
async fn static_header_arrives_on_every_attempt_including_retries() {
    bounded(async {
        let server = flaky_server().await;
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_header("X-Api-Key", API_KEY)
            .unwrap();
        let response = client(endpoint, 5)
            .send("k#0", &post("svc"))
            .await
            .expect("the third attempt succeeds");

        assert_eq!(response.attempts, 3);
        let requests = received(&server).await;
        assert_eq!(requests.len(), 3);
        every_attempt_carries(&requests, "x-api-key", API_KEY).unwrap();
    })
    .await;
}

#[tokio::test]
async fn basic_auth_arrives_on_every_attempt_including_retries() {
    bounded(async {
        let server = flaky_server().await;
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_basic_auth("Aladdin", "open sesame")
            .unwrap();
        client(endpoint, 5)
            .send("k#0", &post("svc"))
            .await
            .expect("the third attempt succeeds");

        let requests = received(&server).await;
        assert_eq!(requests.len(), 3);
        // RFC 7617's example.
        every_attempt_carries(
            &requests,
            "authorization",
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        )
        .unwrap();
    })
    .await;
}

#[tokio::test]
async fn bearer_token_arrives_on_every_attempt_and_is_asked_for_once() {
    bounded(async {
        let server = flaky_server().await;
        let calls = Arc::new(AtomicUsize::new(0));
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(counting_provider(&calls, None))
            .unwrap();
        client(endpoint, 5)
            .send("k#0", &post("svc"))
            .await
            .expect("the third attempt succeeds");

        let requests = received(&server).await;
        assert_eq!(requests.len(), 3);
        every_attempt_carries(&requests, "authorization", "Bearer tok-1-a1b2c3d4").unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the token is cached");
    })
    .await;
}

/// The check above, against a client that was given no credentials: it must fail.
#[tokio::test]
async fn mutant_attempts_without_the_header_fail_the_check() {
    bounded(async {
        let server = flaky_server().await;
        let endpoint = Endpoint::new("svc", &server.uri()).unwrap();
        client(endpoint, 5)
            .send("k#0", &post("svc"))
            .await
            .expect("the third attempt succeeds");
        let requests = received(&server).await;
        assert_eq!(requests.len(), 3);
        assert!(every_attempt_carries(&requests, "x-api-key", API_KEY).is_err());
    })
    .await;
}

/// Accepts `Bearer tok-2-…` only; everything else is a 401.
async fn server_accepting_the_second_token() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(header("authorization", "Bearer tok-2-a1b2c3d4"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"verdict": "ok"})))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn a_401_asks_the_provider_again_and_the_retry_succeeds() {
    bounded(async {
        let server = server_accepting_the_second_token().await;
        let calls = Arc::new(AtomicUsize::new(0));
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(counting_provider(&calls, None))
            .unwrap();
        // One attempt in the policy: the re-send after a 401 does not need a retry.
        let response = client(endpoint, 1)
            .send("k#0", &post("svc"))
            .await
            .expect("the re-send with the new token succeeds");

        assert_eq!(response.status, 200);
        assert_eq!(response.attempts, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let requests = received(&server).await;
        let sent: Vec<&str> = requests
            .iter()
            .map(|r| r.headers["authorization"].to_str().unwrap())
            .collect();
        assert_eq!(sent, ["Bearer tok-1-a1b2c3d4", "Bearer tok-2-a1b2c3d4"]);
        let keys: Vec<&str> = requests
            .iter()
            .map(|r| r.headers["idempotency-key"].to_str().unwrap())
            .collect();
        assert_eq!(keys, ["k#0", "k#0"]);
    })
    .await;
}

#[tokio::test]
async fn a_second_401_stands() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(counting_provider(&calls, None))
            .unwrap();
        let error = client(endpoint, 5)
            .send("k#0", &post("svc"))
            .await
            .expect_err("every token is refused");

        match error {
            HttpError::Rejected { response, .. } => {
                assert_eq!(response.status, 401);
                assert_eq!(response.attempts, 2);
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "refreshed once, not more");
        assert_eq!(received(&server).await.len(), 2);
    })
    .await;
}

/// The 401 check, against a provider that hands out the same token again: it must fail.
#[tokio::test]
async fn mutant_a_provider_that_does_not_refresh_fails_the_check() {
    bounded(async {
        let server = server_accepting_the_second_token().await;
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(|| async { Ok(Token::new("tok-1-a1b2c3d4")) })
            .unwrap();
        let result = client(endpoint, 1).send("k#0", &post("svc")).await;
        assert!(
            matches!(&result, Err(HttpError::Rejected { response, .. }) if response.status == 401),
            "{result:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_token_is_reused_until_it_is_about_to_expire() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let calls = Arc::new(AtomicUsize::new(0));
        // Fresh for 2 s (plenty for two requests on loopback); after that it has less than the
        // refresh margin left.
        let lifetime = Token::REFRESH_MARGIN + Duration::from_secs(2);
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(counting_provider(&calls, Some(lifetime)))
            .unwrap();
        let client = client(endpoint, 1);

        client.send("k#0", &post("svc")).await.unwrap();
        client.send("k#1", &post("svc")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a fresh token is reused");
        tokio::time::sleep(Duration::from_millis(2200)).await;
        client.send("k#2", &post("svc")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a stale token is replaced");

        let requests = received(&server).await;
        let sent: Vec<&str> = requests
            .iter()
            .map(|r| r.headers["authorization"].to_str().unwrap())
            .collect();
        assert_eq!(
            sent,
            [
                "Bearer tok-1-a1b2c3d4",
                "Bearer tok-1-a1b2c3d4",
                "Bearer tok-2-a1b2c3d4"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn a_failing_provider_sends_nothing_and_is_retried() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                std::future::ready(if n == 1 {
                    Err(TokenError::new("the token service answered 503"))
                } else {
                    Ok(Token::new("tok-ok-a1b2c3d4"))
                })
            })
            .unwrap();
        let response = client(endpoint, 3)
            .send("k#0", &post("svc"))
            .await
            .expect("the second try gets a token");
        assert_eq!(response.attempts, 1, "one attempt reached the wire");
        assert_eq!(received(&server).await.len(), 1);

        let always_failing = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_bearer(|| async { Err(TokenError::new("the token service is down")) })
            .unwrap();
        let error = client(always_failing, 2)
            .send("k#1", &post("svc"))
            .await
            .expect_err("no token, no request");
        match error {
            HttpError::Exhausted { attempts, last, .. } => {
                assert_eq!(attempts, 0);
                assert!(last.contains("the token service is down"), "{last}");
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        assert_eq!(received(&server).await.len(), 1, "nothing more was sent");
    })
    .await;
}

#[test]
fn debug_output_names_credentials_never_their_values() {
    let endpoint = Endpoint::new("ledger", "https://ledger.example.com")
        .unwrap()
        .with_basic_auth("svc", "pw-9f8e7d6c")
        .unwrap()
        .with_bearer(|| async { Ok(Token::new(TOKEN)) });
    assert!(endpoint.is_err(), "two kinds of Authorization are refused");
    let endpoint = Endpoint::new("ledger", "https://ledger.example.com")
        .unwrap()
        .with_header("X-Api-Key", API_KEY)
        .unwrap()
        .with_basic_auth("svc", "pw-9f8e7d6c")
        .unwrap();
    let config = HttpConfig::new().add_endpoint(endpoint).unwrap();
    let client = ReqwestClient::new(config.clone()).unwrap();
    for shown in [
        format!("{config:?}"),
        format!("{client:?}"),
        format!("{config:#?}"),
    ] {
        assert!(shown.contains("x-api-key: [redacted]"), "{shown}");
        assert!(shown.contains("authorization: [redacted]"), "{shown}");
        for secret in [API_KEY, "pw-9f8e7d6c", "c3ZjOnB3LTlmOGU3ZDZj"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
}

#[test]
fn credentials_are_checked_as_they_are_configured() {
    use effects_core::http::HttpConfigError;

    let base = || Endpoint::new("svc", "https://svc.example.com").unwrap();
    assert!(matches!(
        base().with_header("X Bad", "v"),
        Err(HttpConfigError::InvalidHeader { .. })
    ));
    let error = base().with_header("X-Api-Key", "sk\nzqxj").unwrap_err();
    assert!(!error.to_string().contains("zqxj"), "{error}");
    assert!(matches!(
        base().with_header("Idempotency-Key", "x"),
        Err(HttpConfigError::InvalidHeader { .. })
    ));
    assert!(matches!(
        base()
            .with_header("X-A", "1")
            .unwrap()
            .with_header("x-a", "2"),
        Err(HttpConfigError::InvalidHeader { .. })
    ));
    assert!(matches!(
        base().with_basic_auth("a:b", "pw"),
        Err(HttpConfigError::InvalidHeader { .. })
    ));
    assert!(matches!(
        base()
            .with_basic_auth("a", "pw")
            .unwrap()
            .with_header("Authorization", "x"),
        Err(HttpConfigError::InvalidHeader { .. })
    ));

    // Credentials in the URL are refused, and the error does not repeat them.
    let error = Endpoint::new("svc", "https://user:hunter22@svc.example.com").unwrap_err();
    assert!(matches!(error, HttpConfigError::InvalidBaseUrl { .. }));
    assert!(!error.to_string().contains("hunter22"), "{error}");

    // Clear text to a remote host only when asked for.
    let remote = Endpoint::new("svc", "http://svc.example.com")
        .unwrap()
        .with_header("X-Api-Key", "k")
        .unwrap();
    assert!(matches!(
        HttpConfig::new().add_endpoint(remote.clone()),
        Err(HttpConfigError::CleartextCredentials { .. })
    ));
    HttpConfig::new()
        .add_endpoint(remote.allow_credentials_over_http())
        .unwrap();
    for loopback in ["http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"] {
        let endpoint = Endpoint::new("svc", loopback)
            .unwrap()
            .with_header("X-Api-Key", "k")
            .unwrap();
        HttpConfig::new().add_endpoint(endpoint).unwrap();
    }

    // A variable that is not set is named, and there is no value to show.
    let missing = "EFFECTS_TEST_VARIABLE_THAT_IS_NOT_SET";
    match base().with_header_from_env("X-Api-Key", missing) {
        Err(HttpConfigError::Environment { var, .. }) => assert_eq!(var, missing),
        other => panic!("expected Environment, got {other:?}"),
    }
    assert!(matches!(
        base().with_client_certificate(b"not pem", b"not pem"),
        Err(HttpConfigError::Tls { .. })
    ));
    assert!(matches!(
        base().with_ca_certificate(b"not pem"),
        Err(HttpConfigError::Tls { .. })
    ));
}

#[test]
fn the_client_knows_its_endpoints_and_their_secret_headers() {
    let endpoint = Endpoint::new("svc", "https://svc.example.com")
        .unwrap()
        .with_header("X-Api-Key", "k")
        .unwrap()
        .with_secret_header("X-Session")
        .unwrap();
    let client = ReqwestClient::new(HttpConfig::new().add_endpoint(endpoint).unwrap()).unwrap();
    assert!(client.knows("svc"));
    assert!(!client.knows("svc2"));
    for name in ["x-api-key", "x-session", "authorization", "cookie"] {
        assert!(client.is_secret_header("svc", name), "{name}");
    }
    assert!(!client.is_secret_header("svc", "x-tenant"));
}

#[tokio::test]
async fn a_request_carrying_credentials_is_not_sent() {
    bounded(async {
        let server = MockServer::start().await;
        let endpoint = Endpoint::new("svc", &server.uri())
            .unwrap()
            .with_secret_header("X-Session")
            .unwrap();
        let client = client(endpoint, 3);
        for name in ["Authorization", "cookie", "X-Session"] {
            let mut request = post("svc");
            request.headers.insert(name.to_owned(), "v".to_owned());
            let error = client.send("k#0", &request).await.unwrap_err();
            assert!(
                matches!(&error, HttpError::InvalidRequest { reason, .. } if reason.contains("configure them on the endpoint")),
                "{name}: {error:?}"
            );
        }
        assert!(received(&server).await.is_empty());
    })
    .await;
}
