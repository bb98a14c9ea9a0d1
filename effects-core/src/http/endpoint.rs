//! Endpoints and their credentials: static headers, bearer tokens from a provider, basic auth and
//! client certificates. They live in the configuration, never in a request effect, so they are
//! never hashed, stored, recorded, snapshotted or logged with it.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};

use super::CREDENTIAL_HEADERS;
use super::client::HttpConfigError;

/// Headers the client sets itself; an endpoint cannot configure them.
const RESERVED_HEADERS: [&str; 5] = [
    "idempotency-key",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
];

/// A credential: a header value, a password, a token.
///
/// It cannot be printed: `Debug` shows `Secret([redacted])` and there is no `Display`, so a
/// secret that ends up in a log line or an error by accident shows nothing. Read it with
/// [`Secret::expose`] where it is really needed.
///
/// ```
/// use effects_core::http::Secret;
///
/// let key = Secret::new("sk_live_51Habc");
/// assert_eq!(format!("{key:?}"), "Secret([redacted])");
/// assert_eq!(key.expose(), "sk_live_51Habc");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// A secret given in code.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Arc::from(value.into()))
    }

    /// The value of the environment variable `var`. It must be set, valid UTF-8 and not empty;
    /// the error names the variable, never its value.
    pub fn from_env(var: &str) -> Result<Secret, HttpConfigError> {
        let missing = |reason: &str| HttpConfigError::Environment {
            var: var.to_owned(),
            reason: reason.to_owned(),
        };
        match std::env::var(var) {
            Ok(value) if value.is_empty() => Err(missing("is empty")),
            Ok(value) => Ok(Secret::new(value)),
            Err(std::env::VarError::NotPresent) => Err(missing("is not set")),
            Err(std::env::VarError::NotUnicode(_)) => Err(missing("is not valid UTF-8")),
        }
    }

    /// The secret's value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret::new(value)
    }
}

/// A bearer token and when it expires, as a [`TokenProvider`] hands it out.
///
/// The client sends `Authorization: Bearer <token>` and asks the provider again once the token
/// has less than [`Token::REFRESH_MARGIN`] left (or has no expiry and a request got a 401).
#[derive(Clone)]
pub struct Token {
    value: Secret,
    expires_at: Option<Instant>,
}

impl Token {
    /// How long before its expiry a token is replaced, so that it does not expire on the way. A
    /// token that lives shorter than this is fetched again for every attempt.
    pub const REFRESH_MARGIN: Duration = Duration::from_secs(5);

    /// A token with no known expiry: it is used until a request with it gets a 401.
    pub fn new(value: impl Into<Secret>) -> Token {
        Token {
            value: value.into(),
            expires_at: None,
        }
    }

    /// The token expires `lifetime` from now.
    #[must_use]
    pub fn expires_in(self, lifetime: Duration) -> Token {
        // An expiry too far to represent is no expiry.
        let expires_at = Instant::now().checked_add(lifetime);
        Token { expires_at, ..self }
    }

    /// The token expires at `at`.
    #[must_use]
    pub fn expires_at(self, at: Instant) -> Token {
        Token {
            expires_at: Some(at),
            ..self
        }
    }

    /// The token.
    pub fn value(&self) -> &Secret {
        &self.value
    }

    /// When it expires, if it was said.
    pub fn expiry(&self) -> Option<Instant> {
        self.expires_at
    }

    /// Whether it must be replaced before it is used at `now`.
    pub(crate) fn is_stale(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| {
            now.checked_add(Token::REFRESH_MARGIN)
                .is_none_or(|t| t >= at)
        })
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &self.value)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why a [`TokenProvider`] could not hand out a token. The attempt counts as failed without
/// anything being sent, and is retried like a transport error.
///
/// Its text is recorded with the request's failure: it must not contain the credentials the
/// provider used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct TokenError {
    reason: String,
}

impl TokenError {
    /// An error saying `reason`.
    pub fn new(reason: impl fmt::Display) -> TokenError {
        TokenError {
            reason: reason.to_string(),
        }
    }
}

/// What [`TokenProvider::token`] returns.
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, TokenError>> + Send + 'a>>;

/// Hands out bearer tokens for an endpoint: an OAuth client-credentials exchange, a token read
/// from a file a sidecar refreshes, a call to a secrets manager.
///
/// The client caches the token it got and asks again when it is about to expire or when a
/// request with it got a 401 (then the request is sent once more with the new token). Calls are
/// serialised per endpoint: concurrent requests wait for one refresh instead of each starting
/// one.
///
/// Any `Fn() -> impl Future<Output = Result<Token, TokenError>>` is a provider:
///
/// ```
/// use std::time::Duration;
/// use effects_core::http::{Endpoint, Token, TokenError};
///
/// async fn fetch_token() -> Result<String, std::io::Error> {
///     Ok("eyJhbGciOi...".to_owned()) // an OAuth token request, in real life
/// }
///
/// let endpoint = Endpoint::new("fraud-check", "https://fraud.example.com/v2")?
///     .with_bearer(|| async {
///         let token = fetch_token().await.map_err(TokenError::new)?;
///         Ok(Token::new(token).expires_in(Duration::from_secs(3600)))
///     })?;
/// # Ok::<(), effects_core::http::HttpConfigError>(())
/// ```
pub trait TokenProvider: Send + Sync {
    /// A fresh token.
    fn token(&self) -> TokenFuture<'_>;
}

impl<F, Fut> TokenProvider for F
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Result<Token, TokenError>> + Send + 'static,
{
    fn token(&self) -> TokenFuture<'_> {
        Box::pin(self())
    }
}

/// One named endpoint: its base URL and how to authenticate to it. Add it to a configuration
/// with [`HttpConfig::add_endpoint`](super::HttpConfig::add_endpoint).
///
/// Credentials are added to every attempt at send time, after the request left the store; they
/// replace nothing a request carries, because a request effect that sets `Authorization`,
/// `Proxy-Authorization`, `Cookie` or one of the endpoint's secret headers is refused before
/// anything is written. Every header configured here is a secret header of the endpoint, and
/// [`Endpoint::with_secret_header`] declares more (a session header the server sends back, say):
/// their values are masked in recorded responses.
///
/// Everything is checked as it is set: header names and values, conflicting `Authorization`
/// sources, PEM files.
///
/// ```
/// use effects_core::http::{Endpoint, HttpConfig, Secret};
///
/// // In a service the key comes from the environment: `Secret::from_env("LEDGER_API_KEY")?`.
/// let api_key = Secret::new("k-123");
/// let config = HttpConfig::new()
///     .add_endpoint(
///         Endpoint::new("ledger", "https://ledger.internal.example/api")?
///             .with_header("X-Api-Key", api_key)?
///             .with_secret_header("X-Session")?,
///     )?
///     .add_endpoint(
///         Endpoint::new("reports", "https://reports.example.com")?
///             .with_basic_auth("svc-effects", Secret::new("correct horse"))?,
///     )?;
///
/// // Debug output names the credentials, never their values.
/// let shown = format!("{config:?}");
/// assert!(shown.contains("x-api-key") && !shown.contains("k-123"));
/// # Ok::<(), effects_core::http::HttpConfigError>(())
/// ```
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) name: String,
    pub(crate) base_url: Url,
    /// Static credential headers, lower-case names; basic auth is one of them.
    pub(crate) headers: Vec<(HeaderName, Secret)>,
    /// Set by [`Endpoint::with_basic_auth`]: the password on its own, so that it can be masked
    /// wherever it shows up (the header holds it encoded).
    pub(crate) basic_password: Option<Secret>,
    pub(crate) bearer: Option<Arc<dyn TokenProvider>>,
    pub(crate) identity: Option<reqwest::Identity>,
    pub(crate) roots: Vec<reqwest::Certificate>,
    /// Declared secret headers, lower case (configured headers are secret without being here).
    pub(crate) secret_headers: BTreeSet<String>,
    pub(crate) plain_http_allowed: bool,
}

impl Endpoint {
    /// The endpoint `name` at `base_url`: an absolute `http` or `https` URL with a host, no
    /// user name or password, no query and no fragment. A request's path is appended to it with
    /// exactly one `/` in between.
    pub fn new(name: impl Into<String>, base_url: &str) -> Result<Endpoint, HttpConfigError> {
        let name = name.into();
        let base_url = parse_base_url(&name, base_url)?;
        Ok(Endpoint {
            name,
            base_url,
            headers: Vec::new(),
            basic_password: None,
            bearer: None,
            identity: None,
            roots: Vec::new(),
            secret_headers: BTreeSet::new(),
            plain_http_allowed: false,
        })
    }

    /// The endpoint's name, as requests give it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base URL.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// Sends the header `name: value` on every attempt, for an API key or a static token. The
    /// header becomes a secret header of the endpoint.
    pub fn with_header(
        mut self,
        name: &str,
        value: impl Into<Secret>,
    ) -> Result<Endpoint, HttpConfigError> {
        let header = self.header_name(name)?;
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(self.invalid_header(
                name,
                "is set by the client itself and cannot be configured".to_owned(),
            ));
        }
        if header == reqwest::header::AUTHORIZATION {
            self.check_no_authorization(name)?;
        } else if self.headers.iter().any(|(h, _)| *h == header) {
            return Err(self.invalid_header(name, "is configured twice".to_owned()));
        }
        let value = value.into();
        sensitive_value(value.expose()).map_err(|_| {
            self.invalid_header(
                name,
                "has a value that is not a valid header value (a line break or other control \
                 character?)"
                    .to_owned(),
            )
        })?;
        self.headers.push((header, value));
        Ok(self)
    }

    /// [`Endpoint::with_header`] with the value of the environment variable `var`.
    pub fn with_header_from_env(self, name: &str, var: &str) -> Result<Endpoint, HttpConfigError> {
        let value = Secret::from_env(var)?;
        self.with_header(name, value)
    }

    /// Sends `Authorization: Bearer <token>` with tokens from `provider`, refreshed when they
    /// expire and after a 401 (see [`TokenProvider`]).
    pub fn with_bearer(
        mut self,
        provider: impl TokenProvider + 'static,
    ) -> Result<Endpoint, HttpConfigError> {
        self.check_no_authorization("Authorization")?;
        self.bearer = Some(Arc::new(provider));
        Ok(self)
    }

    /// Sends `Authorization: Basic ..` with `user` and `password` (RFC 7617).
    pub fn with_basic_auth(
        mut self,
        user: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Result<Endpoint, HttpConfigError> {
        let user = user.into();
        if user.contains(':') {
            return Err(self.invalid_header(
                "Authorization",
                "has a basic-auth user name with a `:`, which RFC 7617 does not allow".to_owned(),
            ));
        }
        let password = password.into();
        let encoded = base64(format!("{user}:{}", password.expose()).as_bytes());
        self = self.with_header("Authorization", Secret::new(format!("Basic {encoded}")))?;
        self.basic_password = Some(password);
        Ok(self)
    }

    /// Presents a client certificate (mutual TLS): `cert_pem` holds the certificate and any
    /// intermediates, `key_pem` its private key (PKCS #8, PKCS #1 or SEC1), both PEM.
    pub fn with_client_certificate(
        mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Endpoint, HttpConfigError> {
        if self.identity.is_some() {
            return Err(self.tls("a client certificate is configured twice".to_owned()));
        }
        let mut pem = Vec::with_capacity(cert_pem.len() + key_pem.len() + 1);
        pem.extend_from_slice(cert_pem);
        pem.push(b'\n');
        pem.extend_from_slice(key_pem);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            self.tls(format!(
                "the client certificate and key are not usable PEM ({}): give the certificate \
                 chain and the private key, each in PEM",
                super::client::error_chain(&e)
            ))
        })?;
        // The key must belong to the certificate; only building a TLS client tells.
        reqwest::Client::builder()
            .identity(identity.clone())
            .build()
            .map_err(|e| {
                self.tls(format!(
                    "the client certificate and key cannot be used together ({}): does the key \
                     belong to the certificate?",
                    super::client::error_chain(&e)
                ))
            })?;
        self.identity = Some(identity);
        Ok(self)
    }

    /// Trusts the certificate authorities in `pem` (one or more PEM certificates) for this
    /// endpoint, instead of the built-in public roots: for services behind a private CA.
    pub fn with_ca_certificate(mut self, pem: &[u8]) -> Result<Endpoint, HttpConfigError> {
        let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            self.tls(format!(
                "the CA certificate is not PEM ({})",
                super::client::error_chain(&e)
            ))
        })?;
        if roots.is_empty() {
            return Err(self.tls("the CA file holds no certificate".to_owned()));
        }
        self.roots.extend(roots);
        Ok(self)
    }

    /// Declares the header `name` secret for this endpoint: a request effect that sets it is
    /// refused before anything is written, and its value is masked in recorded responses.
    pub fn with_secret_header(mut self, name: &str) -> Result<Endpoint, HttpConfigError> {
        let header = self.header_name(name)?;
        self.secret_headers.insert(header.as_str().to_owned());
        Ok(self)
    }

    /// Allows credentials over plain `http` to a host that is not loopback (a service mesh
    /// that encrypts the hop, say). Without it, such an endpoint with credentials is refused by
    /// [`HttpConfig::add_endpoint`](super::HttpConfig::add_endpoint): they would cross the
    /// network in clear text.
    #[must_use]
    pub fn allow_credentials_over_http(mut self) -> Endpoint {
        self.plain_http_allowed = true;
        self
    }

    /// Whether the header `name` (any case) is a secret of this endpoint: one it sends as a
    /// credential or one declared with [`Endpoint::with_secret_header`]. `Authorization`,
    /// `Proxy-Authorization` and `Cookie` are secret for every endpoint.
    pub fn is_secret_header(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        CREDENTIAL_HEADERS.contains(&name.as_str())
            || self.secret_headers.contains(&name)
            || self.headers.iter().any(|(h, _)| h.as_str() == name)
    }

    /// Whether the endpoint sends credentials of any kind.
    pub fn has_credentials(&self) -> bool {
        !self.headers.is_empty() || self.bearer.is_some() || self.identity.is_some()
    }

    /// Checks what only makes sense for the whole endpoint.
    pub(crate) fn check(&self) -> Result<(), HttpConfigError> {
        let plain = self.base_url.scheme() == "http";
        let host = self.base_url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if plain && !loopback && self.has_credentials() && !self.plain_http_allowed {
            return Err(HttpConfigError::CleartextCredentials {
                endpoint: self.name.clone(),
            });
        }
        if plain && (self.identity.is_some() || !self.roots.is_empty()) {
            return Err(self.tls("has TLS settings but an `http` base URL: use `https`".to_owned()));
        }
        Ok(())
    }

    /// Every secret value, for masking wherever it might show up: each header value, and for a
    /// `Scheme credentials` value the credentials alone, and the basic-auth password.
    pub(crate) fn secret_values(&self) -> Vec<Secret> {
        let mut values = Vec::with_capacity(self.headers.len() * 2 + 1);
        for (_, value) in &self.headers {
            values.push(value.clone());
            if let Some((_, credentials)) = value.expose().split_once(' ') {
                let credentials = credentials.trim();
                if !credentials.is_empty() {
                    values.push(Secret::new(credentials));
                }
            }
        }
        values.extend(self.basic_password.clone());
        values
    }

    fn header_name(&self, name: &str) -> Result<HeaderName, HttpConfigError> {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| self.invalid_header(name, "is not a valid header name".to_owned()))
    }

    fn check_no_authorization(&self, name: &str) -> Result<(), HttpConfigError> {
        let taken = self
            .headers
            .iter()
            .any(|(h, _)| *h == reqwest::header::AUTHORIZATION)
            || self.bearer.is_some();
        if taken {
            return Err(self.invalid_header(
                name,
                "is configured twice: choose one of a static header, basic auth or a bearer \
                 token provider"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    fn invalid_header(&self, header: &str, reason: String) -> HttpConfigError {
        HttpConfigError::InvalidHeader {
            endpoint: self.name.clone(),
            header: header.to_owned(),
            reason,
        }
    }

    fn tls(&self, reason: String) -> HttpConfigError {
        HttpConfigError::Tls {
            endpoint: self.name.clone(),
            reason,
        }
    }
}

impl fmt::Debug for Endpoint {
    /// Names and kinds of credentials only, never their values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(h, _)| format!("{h}: [redacted]"))
            .collect();
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("base_url", &self.base_url.as_str())
            .field("headers", &headers)
            .field("bearer", &self.bearer.as_ref().map(|_| "[provider]"))
            .field(
                "client_certificate",
                &self.identity.as_ref().map(|_| "[redacted]"),
            )
            .field("ca_certificates", &self.roots.len())
            .field("secret_headers", &self.secret_headers)
            .field("credentials_over_http", &self.plain_http_allowed)
            .finish()
    }
}

/// `value` as a header value marked sensitive (hidden from `Debug`, never HPACK-indexed).
pub(crate) fn sensitive_value(value: &str) -> Result<HeaderValue, ()> {
    let mut value = HeaderValue::from_str(value).map_err(|_| ())?;
    value.set_sensitive(true);
    Ok(value)
}

fn parse_base_url(name: &str, base_url: &str) -> Result<Url, HttpConfigError> {
    let invalid = |reason: String| HttpConfigError::InvalidBaseUrl {
        endpoint: name.to_owned(),
        url: shown_url(base_url),
        reason,
    };
    let url = Url::parse(base_url).map_err(|e| {
        invalid(format!(
            "is not an absolute URL ({e}): write it like `https://host/prefix`"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "uses the scheme `{}`: use `http` or `https`",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(invalid("has no host".to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "has a user name or password: configure credentials on the endpoint \
             (Endpoint::with_basic_auth), where they are never stored or shown"
                .to_owned(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            "has a query or fragment: a base URL ends with its path; put the rest in the request's path"
                .to_owned(),
        ));
    }
    Ok(url)
}

/// A base URL as shown in an error: without what sits between `://` and `@`, which may be a
/// password.
fn shown_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}[redacted]{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Standard base64 with padding (RFC 4648), for basic auth.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..4 {
            if i < symbols {
                let index = usize::try_from((n >> (18 - 6 * i)) & 0x3f).unwrap_or(0);
                out.push(char::from(ALPHABET[index]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Secret, Token, base64, shown_url};
    use std::time::{Duration, Instant};

    #[test]
    fn base64_matches_rfc_4648() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            // RFC 7617's example.
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter22");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        let token = Token::new("tok-123456").expires_in(Duration::from_secs(60));
        assert!(!format!("{token:?}").contains("tok-123456"));
    }

    #[test]
    fn tokens_go_stale_before_they_expire() {
        let now = Instant::now();
        assert!(!Token::new("t").is_stale(now));
        let fresh = Token::new("t").expires_at(now + Duration::from_secs(60));
        assert!(!fresh.is_stale(now));
        let almost = Token::new("t").expires_at(now + Duration::from_secs(2));
        assert!(almost.is_stale(now));
    }

    #[test]
    fn urls_in_errors_lose_their_user_info() {
        assert_eq!(
            shown_url("https://u:pw@h.example/x"),
            "https://[redacted]@h.example/x"
        );
        assert_eq!(shown_url("https://h.example/x"), "https://h.example/x");
    }
}
