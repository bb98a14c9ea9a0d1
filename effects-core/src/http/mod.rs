//! Outgoing HTTP: the seam the executor calls, and its reqwest implementation (feature `http`).

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::RequestEffect;

#[cfg(feature = "http")]
mod client;
#[cfg(feature = "http")]
mod endpoint;

#[cfg(feature = "http")]
pub use self::client::{HttpConfig, HttpConfigError, ReqwestClient, RetryPolicy};
#[cfg(feature = "http")]
pub use self::endpoint::{Endpoint, Secret, Token, TokenError, TokenFuture, TokenProvider};

/// Request headers that carry credentials whatever the endpoint, lower case: a request effect
/// that sets one is refused before anything is written. Credentials are configured on the
/// endpoint instead (see [`Endpoint`]).
pub const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// Response headers masked in every recorded response, lower case: they hand out credentials.
pub const SECRET_RESPONSE_HEADERS: [&str; 2] = ["set-cookie", "set-cookie2"];

/// What a masked value reads.
pub const REDACTED: &str = "[redacted]";

/// Masks the values of the headers of `response` that carry secrets, before it is recorded:
/// `Set-Cookie` ([`SECRET_RESPONSE_HEADERS`]), [`CREDENTIAL_HEADERS`] echoed back, and every
/// header `is_secret` names (it gets lower-case names). The header stays, so the record still
/// shows that it was there.
///
/// ```
/// use effects_core::http::{HttpResponse, REDACTED, redact_response};
///
/// let mut response = HttpResponse {
///     status: 200,
///     headers: [("set-cookie", "sid=abc; HttpOnly"), ("x-session", "s-1"), ("x-request-id", "r-9")]
///         .into_iter()
///         .map(|(k, v)| (k.to_owned(), v.to_owned()))
///         .collect(),
///     body: serde_json::Value::Null,
///     attempts: 1,
/// };
/// redact_response(&mut response, |name| name == "x-session");
/// assert_eq!(response.headers["set-cookie"], REDACTED);
/// assert_eq!(response.headers["x-session"], REDACTED);
/// assert_eq!(response.headers["x-request-id"], "r-9");
/// ```
pub fn redact_response(response: &mut HttpResponse, is_secret: impl Fn(&str) -> bool) {
    for (name, value) in &mut response.headers {
        let lower = name.to_ascii_lowercase();
        if SECRET_RESPONSE_HEADERS.contains(&lower.as_str())
            || CREDENTIAL_HEADERS.contains(&lower.as_str())
            || is_secret(&lower)
        {
            REDACTED.clone_into(value);
        }
    }
}

/// A response recorded before the request counts as done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Response headers, lower-cased names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body: JSON when it parses as JSON, otherwise a JSON string of the text.
    pub body: Value,
    /// How many attempts it took.
    pub attempts: u32,
}

/// Why a request did not complete.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request names an endpoint the configuration does not have.
    #[error("unknown endpoint `{endpoint}`: configure its base URL")]
    UnknownEndpoint {
        /// The endpoint's name.
        endpoint: String,
    },
    /// The server refused the request for good (a 4xx other than 429): it is dead-lettered and
    /// never retried.
    #[error("{method} {endpoint}{path} was rejected with status {status}", status = response.status)]
    Rejected {
        /// The method.
        method: String,
        /// The endpoint.
        endpoint: String,
        /// The path.
        path: String,
        /// The response.
        response: HttpResponse,
    },
    /// The request cannot be put on the wire as it stands (a header, path or idempotency key that
    /// is not valid HTTP): nothing was sent; it is dead-lettered and never retried.
    #[error("{method} {endpoint}{path} cannot be sent: {reason}")]
    InvalidRequest {
        /// The method.
        method: String,
        /// The endpoint.
        endpoint: String,
        /// The path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Every attempt failed with a transport error, a 5xx or a 429; the request may be retried
    /// later with the same idempotency key.
    #[error("{method} {endpoint}{path} failed after {attempts} attempts: {last}")]
    Exhausted {
        /// The method.
        method: String,
        /// The endpoint.
        endpoint: String,
        /// The path.
        path: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

/// [`redact_response`] on the response a send returned, successful or rejected: what the
/// executor records.
pub(crate) fn redact_result(
    result: &mut Result<HttpResponse, HttpError>,
    is_secret: impl Fn(&str) -> bool,
) {
    match result {
        Ok(response) | Err(HttpError::Rejected { response, .. }) => {
            redact_response(response, is_secret);
        }
        Err(_) => {}
    }
}

/// Sends one request with its idempotency key on every attempt.
///
/// Besides sending, a client answers two questions the executor asks before it writes anything,
/// so that a mistake is refused instead of being committed and dead-lettered later: does it know
/// the endpoint a request names, and which headers are secrets of that endpoint. A client that
/// wraps another must forward both.
pub trait HttpClient: Send + Sync {
    /// Sends `request` with `Idempotency-Key: idempotency_key`, retrying what can be retried.
    fn send(
        &self,
        idempotency_key: &str,
        request: &RequestEffect,
    ) -> impl Future<Output = Result<HttpResponse, HttpError>> + Send;

    /// Whether requests to the endpoint named `endpoint` can be sent. A run with a request to an
    /// endpoint the client does not know is refused before anything is written.
    fn knows(&self, endpoint: &str) -> bool;

    /// Whether the header `name` (lower case) carries a secret of `endpoint`: a request effect
    /// that sets it is refused before anything is written, and its value is masked in recorded
    /// responses. [`CREDENTIAL_HEADERS`] are refused and masked whatever this says.
    fn is_secret_header(&self, endpoint: &str, name: &str) -> bool;
}
