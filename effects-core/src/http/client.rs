//! The reqwest implementation of [`HttpClient`]: named endpoints with their credentials,
//! per-attempt timeouts, retries with exponential backoff and jitter, `Retry-After`, and an
//! `Idempotency-Key` on every attempt.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use reqwest::Url;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use serde_json::Value;
use tracing::Instrument;

use super::endpoint::{Endpoint, Secret, Token, TokenProvider, sensitive_value};
use super::{CREDENTIAL_HEADERS, HttpClient, HttpError, HttpResponse, REDACTED, redact_response};
use crate::request::{Method, RequestEffect};

/// The header that carries the idempotency key, sent on every attempt.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How much of a failed response's body goes into [`HttpError::Exhausted`]'s `last`.
const SUMMARY_CHARS: usize = 200;

/// Secrets shorter than this are not searched for in response bodies: masking every `abc` in a
/// body would garble it. Header values are masked by name whatever their length.
const MIN_SCRUBBED_BYTES: usize = 6;

/// How the client retries transport errors, 5xx and 429.
///
/// Delays grow exponentially (factor 2) from `min_delay` to `max_delay`; with `jitter` each delay
/// gets a random extra of up to itself, so a delay of `d` becomes one in `[d, 2d)`. A
/// `Retry-After` on a 429 or 503 raises the delay to what the server asked for, up to
/// [`HttpConfig::max_retry_after`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; at least 1 (1 means no retries).
    pub max_attempts: u32,
    /// The delay before the first retry.
    pub min_delay: Duration,
    /// The longest delay the exponential growth reaches (before jitter).
    pub max_delay: Duration,
    /// Whether to add random jitter, so that clients failing together do not retry together.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    /// 5 attempts, delays from 100 ms to 10 s, jitter on.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    fn validate(&self) -> Result<(), HttpConfigError> {
        if self.max_attempts == 0 {
            return Err(HttpConfigError::InvalidRetryPolicy {
                reason: "`max_attempts` is 0: it counts the first attempt, so use at least 1"
                    .to_owned(),
            });
        }
        if self.min_delay > self.max_delay {
            return Err(HttpConfigError::InvalidRetryPolicy {
                reason: format!(
                    "`min_delay` ({:?}) is longer than `max_delay` ({:?})",
                    self.min_delay, self.max_delay
                ),
            });
        }
        Ok(())
    }

    fn backoff(&self) -> ExponentialBuilder {
        let retries = usize::try_from(self.max_attempts.saturating_sub(1)).unwrap_or(usize::MAX);
        let builder = ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(retries);
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }
}

/// Why an [`HttpConfig`], an [`Endpoint`] or a [`ReqwestClient`] could not be built. No variant
/// carries a credential's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpConfigError {
    /// An endpoint's base URL is unusable.
    #[error("endpoint `{endpoint}`: base URL `{url}` {reason}")]
    InvalidBaseUrl {
        /// The endpoint's name.
        endpoint: String,
        /// The URL as given (any user name and password masked).
        url: String,
        /// What is wrong with it, and what to write instead.
        reason: String,
    },
    /// The same endpoint name was configured twice.
    #[error("endpoint `{endpoint}` is configured twice: give each endpoint one base URL")]
    DuplicateEndpoint {
        /// The endpoint's name.
        endpoint: String,
    },
    /// The retry policy cannot be followed.
    #[error("invalid retry policy: {reason}")]
    InvalidRetryPolicy {
        /// What is wrong with it.
        reason: String,
    },
    /// An environment variable holding a credential is missing or unusable.
    #[error("environment variable `{var}` {reason}: set it to the credential")]
    Environment {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A credential header cannot be configured as given.
    #[error("endpoint `{endpoint}`: header `{header}` {reason}")]
    InvalidHeader {
        /// The endpoint's name.
        endpoint: String,
        /// The header's name as given.
        header: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A client certificate or CA certificate is unusable.
    #[error("endpoint `{endpoint}`: {reason}")]
    Tls {
        /// The endpoint's name.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// The endpoint has credentials and a plain `http` base URL to a host that is not loopback.
    #[error(
        "endpoint `{endpoint}` would send credentials in clear text over `http`: use `https`, \
         or call Endpoint::allow_credentials_over_http if the hop is encrypted otherwise"
    )]
    CleartextCredentials {
        /// The endpoint's name.
        endpoint: String,
    },
    /// reqwest could not build its client (for example, TLS could not be initialised).
    #[error("cannot build the HTTP client: {reason}")]
    Client {
        /// reqwest's explanation.
        reason: String,
    },
}

/// Configuration of a [`ReqwestClient`]: every named endpoint (base URL and credentials), the
/// per-attempt timeout, the retry policy and how long a `Retry-After` may hold a retry back.
///
/// Everything is validated as it is set, so a configuration that exists is usable. An executor
/// with a client refuses, before writing anything, a run whose request names an endpoint the
/// configuration does not have, or sets one of its secret headers.
///
/// ```
/// use std::time::Duration;
/// use effects_core::http::{Endpoint, HttpConfig, RetryPolicy, Secret};
///
/// let config = HttpConfig::new()
///     .with_endpoint("notifications", "https://notify.example.com/api/v1")?
///     .add_endpoint(
///         Endpoint::new("fraud-check", "https://fraud.example.com")?
///             .with_header("X-Api-Key", Secret::new("fk_live_8c1f"))?,
///     )?
///     .with_attempt_timeout(Duration::from_secs(5))
///     .with_retry(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() })?
///     .with_max_retry_after(Duration::from_secs(30));
/// assert_eq!(
///     config.base_url("notifications").map(|url| url.as_str()),
///     Some("https://notify.example.com/api/v1"),
/// );
/// assert!(config.is_secret_header("fraud-check", "x-api-key"));
/// assert!(!format!("{config:?}").contains("fk_live_8c1f"));
///
/// // Mistakes are caught here, not on the first request.
/// assert!(HttpConfig::new().with_endpoint("billing", "ftp://billing.example.com").is_err());
/// # Ok::<(), effects_core::http::HttpConfigError>(())
/// ```
#[derive(Clone)]
pub struct HttpConfig {
    endpoints: BTreeMap<String, Endpoint>,
    attempt_timeout: Duration,
    retry: RetryPolicy,
    max_retry_after: Duration,
}

impl fmt::Debug for HttpConfig {
    /// Endpoints with the names and kinds of their credentials, never the values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("endpoints", &self.endpoints.values().collect::<Vec<_>>())
            .field("attempt_timeout", &self.attempt_timeout)
            .field("retry", &self.retry)
            .field("max_retry_after", &self.max_retry_after)
            .finish()
    }
}

impl Default for HttpConfig {
    /// No endpoints, a 10 s per-attempt timeout, [`RetryPolicy::default`], and `Retry-After`
    /// honoured up to 60 s.
    fn default() -> Self {
        HttpConfig {
            endpoints: BTreeMap::new(),
            attempt_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl HttpConfig {
    /// The default configuration, with no endpoints yet.
    pub fn new() -> Self {
        HttpConfig::default()
    }

    /// Adds the endpoint `name` with its base URL and no credentials (see [`Endpoint::new`]).
    pub fn with_endpoint(
        self,
        name: impl Into<String>,
        base_url: &str,
    ) -> Result<Self, HttpConfigError> {
        self.add_endpoint(Endpoint::new(name, base_url)?)
    }

    /// Adds an endpoint with its credentials. Credentials over plain `http` to a host that is
    /// not loopback are refused unless the endpoint allows them
    /// ([`Endpoint::allow_credentials_over_http`]).
    pub fn add_endpoint(mut self, endpoint: Endpoint) -> Result<Self, HttpConfigError> {
        endpoint.check()?;
        if self.endpoints.contains_key(&endpoint.name) {
            return Err(HttpConfigError::DuplicateEndpoint {
                endpoint: endpoint.name,
            });
        }
        self.endpoints.insert(endpoint.name.clone(), endpoint);
        Ok(self)
    }

    /// Sets how long one attempt may take, from connecting until the response body is read. A
    /// bearer token provider gets as long for each token.
    #[must_use]
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets the retry policy; it needs at least one attempt and `min_delay <= max_delay`.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Result<Self, HttpConfigError> {
        retry.validate()?;
        self.retry = retry;
        Ok(self)
    }

    /// Sets the longest wait a `Retry-After` may impose; a server asking for more is retried
    /// after this long.
    #[must_use]
    pub fn with_max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// The base URL of endpoint `name`, if it is configured.
    pub fn base_url(&self, name: &str) -> Option<&Url> {
        self.endpoints.get(name).map(Endpoint::base_url)
    }

    /// The endpoint `name`, if it is configured.
    pub fn endpoint(&self, name: &str) -> Option<&Endpoint> {
        self.endpoints.get(name)
    }

    /// The configured endpoints and their base URLs, by name.
    pub fn endpoints(&self) -> impl Iterator<Item = (&str, &Url)> {
        self.endpoints
            .iter()
            .map(|(name, endpoint)| (name.as_str(), endpoint.base_url()))
    }

    /// Whether the header `name` (any case) is a secret of the endpoint `endpoint` (see
    /// [`Endpoint::is_secret_header`]); for an unknown endpoint, whether it is one of the
    /// [`CREDENTIAL_HEADERS`].
    pub fn is_secret_header(&self, endpoint: &str, name: &str) -> bool {
        match self.endpoints.get(endpoint) {
            Some(e) => e.is_secret_header(name),
            None => CREDENTIAL_HEADERS.contains(&name.to_ascii_lowercase().as_str()),
        }
    }

    /// How long one attempt may take.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The longest wait a `Retry-After` may impose.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(self.attempt_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("effects-core/", env!("CARGO_PKG_VERSION")))
    }
}

/// An [`HttpClient`] on reqwest (rustls).
///
/// Each request goes to its endpoint's base URL plus its path, with its headers, its body as
/// JSON (`Content-Type: application/json` unless the request sets one) and
/// `Idempotency-Key: <key>` on every attempt (replacing any such header the request carries).
/// The endpoint's credentials are added to every attempt (see [`Endpoint`]); a request that sets
/// a credential header itself is [`HttpError::InvalidRequest`] and nothing is sent (the executor
/// refuses such effects before writing them anyway).
///
/// Transport errors, 5xx and 429 are retried per the [`RetryPolicy`], waiting at least as long
/// as a `Retry-After` on a 429 or 503 asks (delta-seconds or HTTP-date, capped by
/// [`HttpConfig::max_retry_after`]). A 401 to a request with a bearer token from a provider is
/// answered by asking the provider for a new token and sending once more at once; a second 401
/// stands. Other 4xx are [`HttpError::Rejected`] at once. 2xx and 3xx are responses: redirects
/// are recorded, not followed, so a request is never silently re-sent elsewhere with another
/// method (or its credentials to another host).
///
/// Responses are masked before they are returned: `Set-Cookie` and the endpoint's secret headers
/// read `[redacted]` (see [`redact_response`](super::redact_response)), and any credential the
/// endpoint sent that the server echoes back, in a header or the body, is replaced by
/// `[redacted]` (credentials shorter than 6 bytes are not searched for in bodies).
///
/// Every attempt runs in an `http_attempt` tracing span with the idempotency key, method,
/// endpoint, path, attempt number and status; no span or event carries a header value.
///
/// ```no_run
/// use effects_core::http::{HttpClient, HttpConfig, ReqwestClient};
/// use effects_core::{Method, RequestEffect};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = HttpConfig::new().with_endpoint("notifications", "https://notify.example.com")?;
/// let client = ReqwestClient::new(config)?;
///
/// let request = RequestEffect::new(Method::Post, "notifications", "/customers/u1/notify")
///     .with_body(serde_json::json!({ "text": "your card is blocked" }));
/// let response = client.send("block-card:msg-42#0", &request).await?;
/// println!("{} after {} attempt(s): {}", response.status, response.attempts, response.body);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ReqwestClient {
    config: Arc<HttpConfig>,
    routes: Arc<BTreeMap<String, Route>>,
}

impl fmt::Debug for ReqwestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the client keeps per endpoint: its connection pool (its own when it has TLS settings)
/// and its credentials, ready to be put on the wire.
struct Route {
    endpoint: Endpoint,
    client: reqwest::Client,
    headers: Vec<(HeaderName, HeaderValue)>,
    secrets: Vec<Secret>,
    bearer: Option<Bearer>,
}

impl ReqwestClient {
    /// A client for `config`.
    pub fn new(config: HttpConfig) -> Result<Self, HttpConfigError> {
        config.retry.validate()?;
        let shared = config
            .client_builder()
            .build()
            .map_err(|e| HttpConfigError::Client {
                reason: error_chain(&e),
            })?;
        let mut routes = BTreeMap::new();
        for (name, endpoint) in &config.endpoints {
            let client = if endpoint.identity.is_some() || !endpoint.roots.is_empty() {
                tls_client(config.client_builder(), endpoint)?
            } else {
                shared.clone()
            };
            let mut headers = Vec::with_capacity(endpoint.headers.len());
            for (header, value) in &endpoint.headers {
                // Checked when the header was configured.
                let value = sensitive_value(value.expose()).map_err(|()| {
                    HttpConfigError::InvalidHeader {
                        endpoint: name.clone(),
                        header: header.to_string(),
                        reason: "has a value that is not a valid header value".to_owned(),
                    }
                })?;
                headers.push((header.clone(), value));
            }
            let route = Route {
                client,
                headers,
                secrets: endpoint.secret_values(),
                bearer: endpoint.bearer.clone().map(Bearer::new),
                endpoint: endpoint.clone(),
            };
            routes.insert(name.clone(), route);
        }
        Ok(ReqwestClient {
            config: Arc::new(config),
            routes: Arc::new(routes),
        })
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &HttpConfig {
        &self.config
    }

    /// Everything about the request that does not change between attempts.
    fn prepare<'a>(
        &self,
        key: &'a str,
        request: &'a RequestEffect,
        route: &Route,
    ) -> Result<Prepared<'a>, String> {
        let url = join_url(route.endpoint.base_url(), &request.path)
            .map_err(|e| format!("the path `{}` does not make a URL: {e}", request.path))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &request.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a valid header name"))?;
            if route.endpoint.is_secret_header(header.as_str()) {
                return Err(format!(
                    "the request sets `{name}`, which carries credentials: configure them on \
                     the endpoint `{}`",
                    request.endpoint
                ));
            }
            let value = HeaderValue::from_bytes(value.as_bytes())
                .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
            headers.insert(header, value);
        }
        let key_value = HeaderValue::from_bytes(key.as_bytes()).map_err(|_| {
            format!("the idempotency key `{key}` is not a valid header value (control characters?)")
        })?;
        headers.insert(IDEMPOTENCY_KEY, key_value);
        let body = match &request.body {
            None => None,
            Some(body) => {
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(
                    serde_json::to_vec(body)
                        .map_err(|e| format!("the body cannot be serialised: {e}"))?,
                )
            }
        };
        Ok(Prepared {
            key,
            request,
            method: reqwest_method(request.method),
            url,
            headers,
            body,
        })
    }

    /// One try as the retry policy counts it: get a token if the endpoint uses a provider, send,
    /// and after a 401 with a provider's token, once per request, get a new token and send again.
    async fn try_once(
        &self,
        prepared: &Prepared<'_>,
        route: &Route,
        attempts: &AtomicU32,
        refreshed: &AtomicBool,
    ) -> Result<HttpResponse, Failure> {
        let timeout = self.config.attempt_timeout;
        let token = match &route.bearer {
            Some(bearer) => Some(
                bearer
                    .current(timeout)
                    .await
                    .map_err(Failure::Credentials)?,
            ),
            None => None,
        };
        let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let result = self.attempt(prepared, route, token.as_ref(), attempt).await;
        match (result, &route.bearer, token) {
            (Err(Failure::Rejected(response)), Some(bearer), Some(used))
                if response.status == 401 && !refreshed.swap(true, Ordering::Relaxed) =>
            {
                tracing::info!(
                    idempotency_key = prepared.key,
                    endpoint = prepared.request.endpoint.as_str(),
                    "401 with a bearer token: asking the provider for a new one and sending once more"
                );
                bearer.invalidate(used.generation).await;
                let token = bearer
                    .current(timeout)
                    .await
                    .map_err(Failure::Credentials)?;
                let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
                self.attempt(prepared, route, Some(&token), attempt).await
            }
            (result, _, _) => result,
        }
    }

    /// One attempt on the wire: send with the credentials, read the whole response, mask what
    /// is secret in it, classify it.
    async fn attempt(
        &self,
        prepared: &Prepared<'_>,
        route: &Route,
        token: Option<&CurrentToken>,
        attempt: u32,
    ) -> Result<HttpResponse, Failure> {
        let request = prepared.request;
        let span = tracing::info_span!(
            "http_attempt",
            idempotency_key = prepared.key,
            method = request.method.as_str(),
            endpoint = request.endpoint.as_str(),
            path = request.path.as_str(),
            attempt,
            status = tracing::field::Empty,
        );
        let span_handle = span.clone();
        async move {
            let mut headers = prepared.headers.clone();
            for (name, value) in &route.headers {
                headers.insert(name.clone(), value.clone());
            }
            if let Some(token) = token {
                headers.insert(AUTHORIZATION, token.header.clone());
            }
            let mut builder = route
                .client
                .request(prepared.method.clone(), prepared.url.clone())
                .headers(headers);
            if let Some(body) = &prepared.body {
                builder = builder.body(body.clone());
            }
            let response = match builder.send().await {
                Ok(response) => response,
                Err(e) if e.is_builder() => return Err(Failure::Invalid(error_chain(&e))),
                Err(e) => {
                    let failure = Failure::Transport(error_chain(&e));
                    tracing::warn!(error = %failure, "attempt failed");
                    return Err(failure);
                }
            };
            let status = response.status().as_u16();
            span_handle.record("status", status);
            let headers = lower_cased_headers(response.headers());
            let retry_after = if status == 429 || status == 503 {
                response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
            } else {
                None
            };
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => {
                    let failure = Failure::Transport(format!(
                        "status {status}, but reading the body failed: {}",
                        error_chain(&e)
                    ));
                    tracing::warn!(error = %failure, "attempt failed");
                    return Err(failure);
                }
            };
            let mut secrets: Vec<&str> = route.secrets.iter().map(Secret::expose).collect();
            if let Some(token) = token {
                secrets.push(token.token.value().expose());
            }
            // Longest first, so a secret inside a longer one leaves no piece of the longer.
            secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
            let mut recorded = HttpResponse {
                status,
                headers,
                body: parse_body(&bytes),
                attempts: attempt,
            };
            redact_response(&mut recorded, |name| route.endpoint.is_secret_header(name));
            scrub_response(&mut recorded, &secrets);
            match status {
                ..400 => {
                    tracing::debug!(status, "response");
                    Ok(recorded)
                }
                429 | 500..=599 => {
                    let mut summary = summarise(&bytes);
                    scrub_text(&mut summary, &secrets);
                    let failure = Failure::Status {
                        status,
                        retry_after,
                        summary,
                    };
                    tracing::warn!(status, error = %failure, "attempt failed");
                    Err(failure)
                }
                _ => {
                    tracing::warn!(status, "rejected");
                    Err(Failure::Rejected(recorded))
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl HttpClient for ReqwestClient {
    async fn send(
        &self,
        idempotency_key: &str,
        request: &RequestEffect,
    ) -> Result<HttpResponse, HttpError> {
        let Some(route) = self.routes.get(&request.endpoint) else {
            tracing::warn!(
                idempotency_key,
                endpoint = request.endpoint.as_str(),
                "unknown endpoint"
            );
            return Err(HttpError::UnknownEndpoint {
                endpoint: request.endpoint.clone(),
            });
        };
        let prepared = self
            .prepare(idempotency_key, request, route)
            .map_err(|reason| invalid_request(request, reason))?;

        let attempts = AtomicU32::new(0);
        let refreshed = AtomicBool::new(false);
        let cap = self.config.max_retry_after;
        let outcome = (|| self.try_once(&prepared, route, &attempts, &refreshed))
            .retry(self.config.retry.backoff())
            .sleep(tokio::time::sleep)
            .when(Failure::is_retryable)
            .adjust(|failure, delay| {
                // `None` means the policy has no attempts left; a Retry-After does not add any.
                delay.map(|delay| match failure.retry_after() {
                    Some(asked) => delay.max(asked.min(cap)),
                    None => delay,
                })
            })
            .notify(|failure, delay| {
                tracing::info!(
                    idempotency_key,
                    method = request.method.as_str(),
                    endpoint = request.endpoint.as_str(),
                    path = request.path.as_str(),
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %failure,
                    "retrying"
                );
            })
            .await;

        outcome.map_err(|failure| match failure {
            Failure::Rejected(response) => HttpError::Rejected {
                method: request.method.to_string(),
                endpoint: request.endpoint.clone(),
                path: request.path.clone(),
                response,
            },
            Failure::Invalid(reason) => invalid_request(request, reason),
            last @ (Failure::Transport(_) | Failure::Status { .. } | Failure::Credentials(_)) => {
                HttpError::Exhausted {
                    method: request.method.to_string(),
                    endpoint: request.endpoint.clone(),
                    path: request.path.clone(),
                    attempts: attempts.load(Ordering::Relaxed),
                    last: last.to_string(),
                }
            }
        })
    }

    fn knows(&self, endpoint: &str) -> bool {
        self.routes.contains_key(endpoint)
    }

    fn is_secret_header(&self, endpoint: &str, name: &str) -> bool {
        self.config.is_secret_header(endpoint, name)
    }
}

/// A client for an endpoint with TLS settings of its own.
fn tls_client(
    builder: reqwest::ClientBuilder,
    endpoint: &Endpoint,
) -> Result<reqwest::Client, HttpConfigError> {
    let mut builder = builder;
    if let Some(identity) = &endpoint.identity {
        builder = builder.identity(identity.clone());
    }
    if !endpoint.roots.is_empty() {
        builder = builder.tls_built_in_root_certs(false);
        for root in &endpoint.roots {
            builder = builder.add_root_certificate(root.clone());
        }
    }
    builder.build().map_err(|e| HttpConfigError::Tls {
        endpoint: endpoint.name.clone(),
        reason: format!(
            "the TLS settings are not usable ({}): does the key belong to the certificate?",
            error_chain(&e)
        ),
    })
}

/// The token cache of one endpoint with a provider.
struct Bearer {
    provider: Arc<dyn TokenProvider>,
    /// Held while the provider is asked, so concurrent requests wait for one refresh.
    cached: tokio::sync::Mutex<Option<CurrentToken>>,
    generations: AtomicU64,
}

/// A token as the client uses it: the header ready for the wire, and which token it was, so a
/// 401 replaces that one and not a newer one another request got meanwhile.
#[derive(Clone)]
struct CurrentToken {
    header: HeaderValue,
    token: Token,
    generation: u64,
}

impl Bearer {
    fn new(provider: Arc<dyn TokenProvider>) -> Bearer {
        Bearer {
            provider,
            cached: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
        }
    }

    /// The cached token, or a new one when there is none or it is about to expire.
    async fn current(&self, timeout: Duration) -> Result<CurrentToken, String> {
        let mut cached = self.cached.lock().await;
        if let Some(current) = cached.as_ref()
            && !current.token.is_stale(Instant::now())
        {
            return Ok(current.clone());
        }
        let token = match tokio::time::timeout(timeout, self.provider.token()).await {
            Ok(Ok(token)) => token,
            Ok(Err(e)) => return Err(format!("the bearer token provider failed: {e}")),
            Err(_) => {
                return Err(format!(
                    "the bearer token provider did not answer within {timeout:?}"
                ));
            }
        };
        let header = sensitive_value(&format!("Bearer {}", token.value().expose())).map_err(
            |()| "the bearer token provider returned a token that is not a valid header value (a line break?)".to_owned(),
        )?;
        let current = CurrentToken {
            header,
            token,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
        };
        *cached = Some(current.clone());
        Ok(current)
    }

    /// Forgets the token of `generation` (the one a 401 refused), unless it was replaced already.
    async fn invalidate(&self, generation: u64) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.generation == generation) {
            *cached = None;
        }
    }
}

/// A request ready to be sent, as many times as it takes.
struct Prepared<'a> {
    key: &'a str,
    request: &'a RequestEffect,
    method: reqwest::Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

/// How one attempt failed.
#[derive(Debug)]
enum Failure {
    /// No complete response: connecting, sending, timing out or reading failed. Retried.
    Transport(String),
    /// A 5xx or 429. Retried.
    Status {
        status: u16,
        retry_after: Option<Duration>,
        summary: String,
    },
    /// Any other 4xx (or a status outside 100–599). Permanent.
    Rejected(HttpResponse),
    /// reqwest refused to build the request. Permanent.
    Invalid(String),
    /// The endpoint's token provider failed or gave an unusable token; nothing was sent.
    /// Retried.
    Credentials(String),
}

impl Failure {
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            Failure::Transport(_) | Failure::Status { .. } | Failure::Credentials(_)
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Transport(reason) | Failure::Invalid(reason) => f.write_str(reason),
            Failure::Credentials(reason) => write!(f, "no credentials: {reason}"),
            Failure::Status {
                status, summary, ..
            } if summary.is_empty() => write!(f, "status {status}"),
            Failure::Status {
                status, summary, ..
            } => write!(f, "status {status}: {summary}"),
            Failure::Rejected(response) => write!(f, "status {}", response.status),
        }
    }
}

fn invalid_request(request: &RequestEffect, reason: String) -> HttpError {
    HttpError::InvalidRequest {
        method: request.method.to_string(),
        endpoint: request.endpoint.clone(),
        path: request.path.clone(),
        reason,
    }
}

fn reqwest_method(method: Method) -> reqwest::Method {
    match method {
        Method::Get => reqwest::Method::GET,
        Method::Head => reqwest::Method::HEAD,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
        Method::Patch => reqwest::Method::PATCH,
        Method::Delete => reqwest::Method::DELETE,
    }
}

/// `base` and `path` joined with exactly one `/`: `https://h/api/` + `/x` is `https://h/api/x`.
fn join_url(base: &Url, path: &str) -> Result<Url, String> {
    let base = base.as_str().trim_end_matches('/');
    let path = path.trim_start_matches('/');
    Url::parse(&format!("{base}/{path}")).map_err(|e| e.to_string())
}

/// Header names are lower case already; repeated headers are joined with `, `.
fn lower_cased_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        out.entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    out
}

/// JSON when it parses as JSON, `null` when empty, otherwise a JSON string of the text.
fn parse_body(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The start of a body, for error messages.
fn summarise(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(SUMMARY_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A `Retry-After` value as a wait from `now`: delta-seconds or an HTTP-date (a date in the past
/// means no wait). `None` when it is neither.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time"; the cap applies anyway.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Replaces every secret of at least [`MIN_SCRUBBED_BYTES`] in `text` by [`REDACTED`].
fn scrub_text(text: &mut String, secrets: &[&str]) {
    for secret in secrets {
        if secret.len() >= MIN_SCRUBBED_BYTES && text.contains(secret) {
            *text = text.replace(secret, REDACTED);
        }
    }
}

/// [`scrub_text`] on every header value, and every string and key of the body.
fn scrub_response(response: &mut HttpResponse, secrets: &[&str]) {
    fn scrub_value(value: &mut Value, secrets: &[&str]) {
        match value {
            Value::String(text) => scrub_text(text, secrets),
            Value::Array(items) => items.iter_mut().for_each(|v| scrub_value(v, secrets)),
            Value::Object(map) => {
                let entries = std::mem::take(map);
                for (mut key, mut v) in entries {
                    scrub_text(&mut key, secrets);
                    scrub_value(&mut v, secrets);
                    map.insert(key, v);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    if secrets.iter().all(|s| s.len() < MIN_SCRUBBED_BYTES) {
        return;
    }
    for value in response.headers.values_mut() {
        scrub_text(value, secrets);
    }
    scrub_value(&mut response.body, secrets);
}

/// An error and its sources, `: `-separated, since reqwest's own message names only the URL.
pub(crate) fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::{
        join_url, lower_cased_headers, parse_body, parse_retry_after, scrub_response, summarise,
    };
    use crate::http::HttpResponse;
    use reqwest::Url;
    use reqwest::header::{HeaderMap, HeaderValue};
    use serde_json::{Value, json};

    #[test]
    fn echoed_secrets_are_scrubbed_from_headers_and_bodies() {
        let mut response = HttpResponse {
            status: 200,
            headers: [("x-echo".to_owned(), "key=sk-123456".to_owned())].into(),
            body: json!({
                "auth": "Basic c3ZjOnB3LTEyMzQ1Ng==",
                "sk-123456": [1, "sk-123456-and-more"],
                "short": "abc",
                "n": 7
            }),
            attempts: 1,
        };
        // Longest first, as the client orders them.
        let secrets = ["Basic c3ZjOnB3LTEyMzQ1Ng==", "sk-123456", "abc"];
        scrub_response(&mut response, &secrets);
        assert_eq!(response.headers["x-echo"], "key=[redacted]");
        assert_eq!(
            response.body,
            json!({
                "auth": "[redacted]",
                "[redacted]": [1, "[redacted]-and-more"],
                "short": "abc",
                "n": 7
            })
        );
    }

    #[test]
    fn urls_join_with_exactly_one_slash() {
        let cases = [
            ("http://h", "/x", "http://h/x"),
            ("http://h/", "/x", "http://h/x"),
            ("http://h/api", "x/y", "http://h/api/x/y"),
            ("http://h/api/", "/x", "http://h/api/x"),
            ("http://h/api//", "//x", "http://h/api/x"),
            ("http://h:8080/api", "/x?a=1", "http://h:8080/api/x?a=1"),
        ];
        for (base, path, want) in cases {
            let base = Url::parse(base).expect("test base URL");
            let got = join_url(&base, path).expect("joins");
            assert_eq!(got.as_str(), want, "{base} + {path}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn bodies_are_json_text_or_null() {
        assert_eq!(parse_body(b""), Value::Null);
        assert_eq!(parse_body(br#"{"a":1}"#), json!({"a": 1}));
        assert_eq!(parse_body(b"42"), json!(42));
        assert_eq!(parse_body(b"not json"), json!("not json"));
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append("Content-Type", HeaderValue::from_static("text/plain"));
        let map = lower_cased_headers(&headers);
        assert_eq!(map.get("x-a").map(String::as_str), Some("1, 2"));
        assert_eq!(
            map.get("content-type").map(String::as_str),
            Some("text/plain")
        );
    }

    #[test]
    fn summaries_are_short() {
        assert_eq!(summarise(b"  oops \n"), "oops");
        let long = "é".repeat(500);
        let summary = summarise(long.as_bytes());
        assert_eq!(summary.chars().count(), super::SUMMARY_CHARS + 1);
    }
}
