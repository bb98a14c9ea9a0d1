//! The reqwest client against a real HTTP server on loopback (wiremock).

#![cfg(feature = "http")]

use std::future::Future;
use std::time::{Duration, Instant};

use effects_core::http::{
    HttpClient, HttpConfig, HttpConfigError, HttpError, ReqwestClient, RetryPolicy,
};
use effects_core::{Method, RequestEffect};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// No test may run longer than this.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

/// Fast retries so that the suite runs in seconds.
fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        jitter: true,
    }
}

fn config(base_url: &str, max_attempts: u32) -> HttpConfig {
    HttpConfig::new()
        .with_endpoint("svc", base_url)
        .expect("valid base URL")
        .with_attempt_timeout(Duration::from_secs(5))
        .with_retry(fast_retries(max_attempts))
        .expect("valid retry policy")
}

fn client(base_url: &str, max_attempts: u32) -> ReqwestClient {
    ReqwestClient::new(config(base_url, max_attempts)).expect("client builds")
}

async fn received(server: &MockServer) -> Vec<wiremock::Request> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
}

fn idempotency_keys(requests: &[wiremock::Request]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .expect("every attempt carries an Idempotency-Key")
                .to_str()
                .expect("ASCII key")
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn idempotency_key_is_identical_on_every_attempt() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/things"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(2)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/things"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 7})))
            .mount(&server)
            .await;

        let request = RequestEffect::new(Method::Post, "svc", "/things").with_body(json!({}));
        let response = client(&server.uri(), 5)
            .send("handler:msg-1#0", &request)
            .await
            .expect("third attempt succeeds");

        assert_eq!(response.status, 201);
        assert_eq!(response.attempts, 3);
        assert_eq!(response.body, json!({"id": 7}));
        let keys = idempotency_keys(&received(&server).await);
        assert_eq!(keys, vec!["handler:msg-1#0"; 3]);
    })
    .await;
}

#[tokio::test]
async fn server_error_then_success_takes_two_attempts() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(500))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
            .mount(&server)
            .await;

        let request = RequestEffect::new(Method::Get, "svc", "/status");
        let response = client(&server.uri(), 5)
            .send("k#0", &request)
            .await
            .expect("second attempt succeeds");

        assert_eq!(response.status, 200);
        assert_eq!(response.attempts, 2);
        assert_eq!(response.body, json!({"ok": true}));
        assert_eq!(received(&server).await.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn retry_after_seconds_on_429_is_waited_for() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;

        let request = RequestEffect::new(Method::Post, "svc", "/limited").with_body(json!(1));
        let started = Instant::now();
        let response = client(&server.uri(), 3)
            .send("k#0", &request)
            .await
            .expect("the retry succeeds");
        let elapsed = started.elapsed();

        assert_eq!(response.attempts, 2);
        assert!(
            elapsed >= Duration::from_secs(1),
            "retried after {elapsed:?}, before the 1 s the server asked for"
        );
    })
    .await;
}

#[tokio::test]
async fn retry_after_http_date_on_503_is_waited_for() {
    bounded(async {
        let server = MockServer::start().await;
        // HTTP-dates have whole seconds, so "in 3 s" is more than 2 s away.
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", date.as_str()))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(204))
            .mount(&server)
            .await;

        let request = RequestEffect::new(Method::Put, "svc", "/x").with_body(json!({}));
        let started = Instant::now();
        let response = client(&server.uri(), 3)
            .send("k#0", &request)
            .await
            .expect("the retry succeeds");
        let elapsed = started.elapsed();

        assert_eq!(response.status, 204);
        assert_eq!(response.body, serde_json::Value::Null);
        assert_eq!(response.attempts, 2);
        assert!(
            elapsed >= Duration::from_millis(1500),
            "retried after {elapsed:?}, before the date the server gave"
        );
    })
    .await;
}

#[tokio::test]
async fn retry_after_is_capped() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "3600"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;

        let client = ReqwestClient::new(
            config(&server.uri(), 3).with_max_retry_after(Duration::from_millis(300)),
        )
        .expect("client builds");
        let started = Instant::now();
        let response = client
            .send("k#0", &RequestEffect::new(Method::Get, "svc", "/x"))
            .await
            .expect("the retry succeeds");
        let elapsed = started.elapsed();

        assert_eq!(response.attempts, 2);
        assert!(
            elapsed >= Duration::from_millis(300),
            "retried after {elapsed:?}, before the cap"
        );
    })
    .await;
}

#[tokio::test]
async fn client_errors_are_rejected_without_retry() {
    bounded(async {
        for status in [400, 404, 409, 422] {
            let server = MockServer::start().await;
            let body = json!({"error": "no", "status": status});
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(status).set_body_json(&body))
                .mount(&server)
                .await;

            let request = RequestEffect::new(Method::Post, "svc", "/things").with_body(json!({}));
            let error = client(&server.uri(), 5)
                .send("k#0", &request)
                .await
                .expect_err("a 4xx is an error");

            match error {
                HttpError::Rejected {
                    method,
                    endpoint,
                    path,
                    response,
                } => {
                    assert_eq!((method.as_str(), endpoint.as_str()), ("POST", "svc"));
                    assert_eq!(path, "/things");
                    assert_eq!(response.status, status);
                    assert_eq!(response.body, body);
                    assert_eq!(response.attempts, 1);
                    assert_eq!(
                        response.headers.get("content-type").map(String::as_str),
                        Some("application/json")
                    );
                }
                other => panic!("status {status}: expected Rejected, got {other:?}"),
            }
            assert_eq!(
                received(&server).await.len(),
                1,
                "status {status} was retried"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn persistent_server_errors_exhaust_the_attempts() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("DELETE"))
            .respond_with(ResponseTemplate::new(502).set_body_string("bad gateway"))
            .mount(&server)
            .await;

        let error = client(&server.uri(), 3)
            .send("k#0", &RequestEffect::new(Method::Delete, "svc", "/x/1"))
            .await
            .expect_err("every attempt fails");

        match error {
            HttpError::Exhausted { attempts, last, .. } => {
                assert_eq!(attempts, 3);
                assert_eq!(last, "status 502: bad gateway");
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        let requests = received(&server).await;
        assert_eq!(idempotency_keys(&requests), vec!["k#0"; 3]);
    })
    .await;
}

#[tokio::test]
async fn transport_errors_are_retried_then_exhausted() {
    bounded(async {
        // A loopback port that nothing listens on.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            listener.local_addr().expect("bound address").port()
        };
        let error = client(&format!("http://127.0.0.1:{port}"), 3)
            .send("k#0", &RequestEffect::new(Method::Get, "svc", "/x"))
            .await
            .expect_err("nothing listens");

        match error {
            HttpError::Exhausted {
                method,
                endpoint,
                path,
                attempts,
                last,
            } => {
                assert_eq!((method.as_str(), endpoint.as_str()), ("GET", "svc"));
                assert_eq!(path, "/x");
                assert_eq!(attempts, 3);
                assert!(!last.is_empty());
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn slow_attempts_time_out_and_are_retried() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
            .mount(&server)
            .await;

        let client = ReqwestClient::new(
            config(&server.uri(), 2).with_attempt_timeout(Duration::from_millis(200)),
        )
        .expect("client builds");
        let started = Instant::now();
        let error = client
            .send("k#0", &RequestEffect::new(Method::Get, "svc", "/slow"))
            .await
            .expect_err("every attempt times out");

        assert!(
            matches!(error, HttpError::Exhausted { attempts: 2, .. }),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(received(&server).await.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn unknown_endpoint_makes_no_request() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;

        let error = client(&server.uri(), 5)
            .send("k#0", &RequestEffect::new(Method::Get, "elsewhere", "/x"))
            .await
            .expect_err("the endpoint is not configured");

        assert_eq!(
            error,
            HttpError::UnknownEndpoint {
                endpoint: "elsewhere".into()
            }
        );
        assert!(received(&server).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn json_body_path_and_headers_are_sent() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/api/v1/customers/u1/notify"))
            .respond_with(
                ResponseTemplate::new(202)
                    .insert_header("X-Request-Id", "abc")
                    .set_body_json(json!({"queued": true})),
            )
            .mount(&server)
            .await;

        let body = json!({"text": "hi", "n": [1, 2, 3]});
        let mut request =
            RequestEffect::new(Method::Post, "svc", "/customers/u1/notify").with_body(body.clone());
        request.headers.insert("X-Tenant".into(), "acme".into());
        // The base URL's trailing slash and the path's leading slash make one slash.
        let response = client(&format!("{}/api/v1/", server.uri()), 5)
            .send("notify:m1#2", &request)
            .await
            .expect("accepted");

        assert_eq!(response.status, 202);
        assert_eq!(response.attempts, 1);
        assert_eq!(response.body, json!({"queued": true}));
        assert_eq!(
            response.headers.get("x-request-id").map(String::as_str),
            Some("abc")
        );

        let requests = received(&server).await;
        assert_eq!(requests.len(), 1);
        let sent = &requests[0];
        assert_eq!(sent.url.path(), "/api/v1/customers/u1/notify");
        assert_eq!(
            sent.body_json::<serde_json::Value>().expect("JSON body"),
            body
        );
        let header = |name: &str| {
            sent.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        assert_eq!(header("x-tenant").as_deref(), Some("acme"));
        assert_eq!(header("idempotency-key").as_deref(), Some("notify:m1#2"));
    })
    .await;
}

#[tokio::test]
async fn non_json_body_is_recorded_as_a_string() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_string("plain <b>text</b>"))
            .mount(&server)
            .await;

        let response = client(&server.uri(), 5)
            .send("k#0", &RequestEffect::new(Method::Get, "svc", "/page"))
            .await
            .expect("ok");

        assert_eq!(response.body, json!("plain <b>text</b>"));
    })
    .await;
}

#[tokio::test]
async fn redirects_are_recorded_not_followed() {
    bounded(async {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(303).insert_header("Location", "/elsewhere"))
            .mount(&server)
            .await;

        let request = RequestEffect::new(Method::Post, "svc", "/x").with_body(json!({}));
        let response = client(&server.uri(), 5)
            .send("k#0", &request)
            .await
            .expect("a 3xx is a response");

        assert_eq!(response.status, 303);
        assert_eq!(
            response.headers.get("location").map(String::as_str),
            Some("/elsewhere")
        );
        assert_eq!(received(&server).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn invalid_headers_are_refused_before_sending() {
    bounded(async {
        let server = MockServer::start().await;
        let mut request = RequestEffect::new(Method::Get, "svc", "/x");
        request.headers.insert("X-Bad".into(), "line\nbreak".into());

        let error = client(&server.uri(), 5)
            .send("k#0", &request)
            .await
            .expect_err("a header value with a newline cannot be sent");

        assert!(
            matches!(error, HttpError::InvalidRequest { .. }),
            "{error:?}"
        );
        assert!(received(&server).await.is_empty());
    })
    .await;
}

#[test]
fn bad_configuration_is_refused_with_a_reason() {
    for url in ["not a url", "ftp://h/x", "http://h/api?x=1", "http://h/#f"] {
        match HttpConfig::new().with_endpoint("svc", url) {
            Err(HttpConfigError::InvalidBaseUrl { endpoint, .. }) => assert_eq!(endpoint, "svc"),
            other => panic!("{url}: expected InvalidBaseUrl, got {other:?}"),
        }
    }
    let twice = HttpConfig::new()
        .with_endpoint("svc", "http://127.0.0.1:1")
        .and_then(|c| c.with_endpoint("svc", "http://127.0.0.1:2"));
    assert!(matches!(
        twice,
        Err(HttpConfigError::DuplicateEndpoint { .. })
    ));
    for policy in [
        RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        },
        RetryPolicy {
            min_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        },
    ] {
        assert!(matches!(
            HttpConfig::new().with_retry(policy),
            Err(HttpConfigError::InvalidRetryPolicy { .. })
        ));
    }
}
