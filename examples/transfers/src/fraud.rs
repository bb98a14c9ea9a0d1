//! The fraud-check service the job talks to: a real HTTP server on 127.0.0.1 (wiremock), which
//! answers `POST /checks/{transfer_id}` with a [`Verdict`] — rejected when the
//! payee is on its watch list, approved otherwise — and records every request it receives, so
//! the job counts what was sent where it arrived.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;

use serde_json::json;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

use crate::{FraudCheck, Verdict};

/// Accounts the service rejects transfers to.
pub const WATCH_LIST: &[&str] = &["mule"];

/// Whether the service approves a transfer to `payee`.
pub fn approves(payee: &str) -> bool {
    !WATCH_LIST.contains(&payee)
}

/// The verdict on one check.
struct Verdicts;

impl Respond for Verdicts {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        match serde_json::from_slice::<FraudCheck>(&request.body) {
            Ok(check) if approves(&check.to) => ResponseTemplate::new(200).set_body_json(Verdict {
                approved: true,
                reason: None,
            }),
            Ok(check) => ResponseTemplate::new(200).set_body_json(Verdict {
                approved: false,
                reason: Some(format!("payee {} is on the watch list", check.to)),
            }),
            Err(e) => ResponseTemplate::new(422)
                .set_body_json(json!({"error": format!("not a fraud check: {e}")})),
        }
    }
}

/// The running service; it stops when dropped.
pub struct FraudService {
    server: MockServer,
}

impl std::fmt::Debug for FraudService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FraudService")
            .field("url", &self.server.uri())
            .finish()
    }
}

/// What the service received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Requests received (every attempt counts).
    pub requests: usize,
    /// Distinct `Idempotency-Key` values among them.
    pub idempotency_keys: usize,
    /// Requests without an `Idempotency-Key`.
    pub without_key: usize,
    /// Requests per transfer id (from the path).
    pub per_transfer: BTreeMap<String, usize>,
}

impl FraudService {
    /// Starts the service on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<FraudService> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = MockServer::builder().listener(listener).start().await;
        Mock::given(method("POST"))
            .and(path_regex(r"^/checks/[^/]+$"))
            .respond_with(Verdicts)
            .mount(&server)
            .await;
        Ok(FraudService { server })
    }

    /// Its base URL, `http://127.0.0.1:PORT`: the `fraud-check` endpoint.
    pub fn url(&self) -> String {
        self.server.uri()
    }

    /// What it has received so far.
    pub async fn received(&self) -> Received {
        let requests = self.server.received_requests().await.unwrap_or_default();
        let mut keys = BTreeSet::new();
        let mut received = Received {
            requests: requests.len(),
            ..Received::default()
        };
        for request in &requests {
            match request
                .headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
            {
                Some(key) => {
                    keys.insert(key.to_owned());
                }
                None => received.without_key += 1,
            }
            if let Some(id) = request.url.path().strip_prefix("/checks/") {
                *received.per_transfer.entry(id.to_owned()).or_default() += 1;
            }
        }
        received.idempotency_keys = keys.len();
        received
    }
}
