//! Outgoing HTTP: the seam the executor calls, and its reqwest implementation (feature `http`).

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::RequestEffect;

#[cfg(feature = "http")]
mod client;

#[cfg(feature = "http")]
pub use self::client::{HttpConfig, HttpConfigError, ReqwestClient, RetryPolicy};

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

/// Sends one request with its idempotency key on every attempt.
pub trait HttpClient: Send + Sync {
    /// Sends `request` with `Idempotency-Key: idempotency_key`, retrying what can be retried.
    fn send(
        &self,
        idempotency_key: &str,
        request: &RequestEffect,
    ) -> impl Future<Output = Result<HttpResponse, HttpError>> + Send;
}
