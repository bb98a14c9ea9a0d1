//! The transport's settings: where the server is, how to connect and reconnect, and how the
//! stream and its consumers are laid out.

use std::path::PathBuf;
use std::time::Duration;

use super::error::NatsError;
use super::names;

/// Where the stream keeps its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// On disk (default): survives a server restart.
    #[default]
    File,
    /// In memory: lost when the server stops.
    Memory,
}

/// TLS for the connection (rustls; no OpenSSL). Without it, TLS is still used if the server
/// requires it, with the platform's root certificates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsConfig {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// A PEM file of root certificates to trust besides the platform's.
    pub root_certificates: Option<PathBuf>,
    /// A PEM client certificate and its key, for servers that verify clients.
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

impl TlsConfig {
    /// TLS required, trusting the platform's roots.
    pub fn required() -> TlsConfig {
        TlsConfig {
            required: true,
            ..TlsConfig::default()
        }
    }

    /// Also trusts the roots in this PEM file (a private CA).
    #[must_use]
    pub fn with_root_certificates(mut self, pem: impl Into<PathBuf>) -> TlsConfig {
        self.root_certificates = Some(pem.into());
        self
    }

    /// Presents this client certificate (PEM) with its key (PEM).
    #[must_use]
    pub fn with_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> TlsConfig {
        self.client_certificate = Some((cert.into(), key.into()));
        self
    }
}

/// Credentials for servers that require them.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// A token.
    Token(String),
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Token(..)"),
            Auth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .finish_non_exhaustive(),
        }
    }
}

/// How the connection comes back after the server went away. The client buffers what is
/// published meanwhile; a publish whose acknowledgement does not arrive within
/// [`NatsConfig::request_timeout`] fails and is published again later with the same id (the
/// stream deduplicates it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// Give up after this many attempts in a row; `None` (default) never gives up.
    pub max_attempts: Option<usize>,
    /// The delay before the first attempt, doubled each time. Default 50 ms.
    pub initial_delay: Duration,
    /// The longest delay between attempts. Default 2 s.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            max_attempts: None,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl Reconnect {
    /// The delay before attempt `attempt` (1-based).
    pub fn delay(&self, attempt: usize) -> Duration {
        let shift = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(20);
        self.initial_delay
            .saturating_mul(1_u32 << shift)
            .min(self.max_delay)
    }
}

/// The NATS JetStream transport's settings. Start from [`NatsConfig::new`] and change fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server, `nats://host:port` (or `tls://`); several separated by commas.
    pub url: String,
    /// A name for the connection, shown by the server's monitoring.
    pub connection_name: Option<String>,
    /// Credentials, if the server requires them.
    pub auth: Option<Auth>,
    /// TLS settings; `None` uses TLS only if the server requires it.
    pub tls: Option<TlsConfig>,
    /// How long connecting may take before it fails. Default 5 s.
    pub connect_timeout: Duration,
    /// How long a JetStream request (a publish acknowledgement, an API call, an ack) may take.
    /// Default 5 s.
    pub request_timeout: Duration,
    /// Reconnection after the server went away.
    pub reconnect: Reconnect,
    /// The stream's name. Default `EFFECTS`.
    pub stream: String,
    /// The first subject token(s) of every subject of the stream. Default `effects`.
    pub subject_prefix: String,
    /// Partitions per topic for messages with a partition key (see the module docs). Every
    /// publisher and consumer of a stream must agree; the stream records it. Default 16.
    pub partitions: u16,
    /// How long the stream remembers message ids to drop re-published copies. Default 2 min.
    pub duplicate_window: Duration,
    /// How long the stream keeps messages; `None` (default) keeps them until deleted.
    pub max_age: Option<Duration>,
    /// Disk (default) or memory.
    pub storage: Storage,
    /// Copies of the stream in a cluster. Default 1.
    pub replicas: usize,
    /// How many messages without a partition key one group may have in flight (the `u`
    /// consumer's `max_ack_pending`). A consumer setting of the group: see
    /// [`NatsTransport::set_consumer_settings`](super::NatsTransport::set_consumer_settings).
    /// Default 1024.
    pub unordered_in_flight: u32,
    /// How many messages of one partition may be in flight at once, all with the one process
    /// holding the partition (each partition consumer's `max_ack_pending`): the most a holder
    /// has fetched and not yet settled, plus what it has read ahead. A consumer setting of the
    /// group, like [`NatsConfig::unordered_in_flight`]. Default 128 (see the module docs).
    pub partition_in_flight: u32,
    /// How long a lane hold lasts without renewal (the holds stream's age limit; see the module
    /// docs). A holder renews every third of it and stops handing out a lane's messages one
    /// fifth of it before it would run out; a process that dies leaves its lanes to others
    /// after about this long (plus the ack wait when it died holding messages). Every process
    /// of a stream must use the same value. Default 10 s.
    pub hold_ttl: Duration,
    /// Deliveries after which a message that keeps coming back is dead-lettered by the
    /// transport with the reason; `None` (default) leaves the decision to the worker.
    pub max_deliver: Option<u32>,
    /// A deliberately broken build, for showing that a test can fail. Testing only.
    #[doc(hidden)]
    pub mutant: Option<NatsMutant>,
}

/// Deliberately broken transports, for showing that the order checks can fail. Testing only.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NatsMutant {
    /// Every process pulls every partition without holding it: a partition's messages are
    /// spread over the processes of a group.
    NoHolds,
    /// A lane taken over is pulled at once: no waiting for a dead holder's messages to come
    /// back first, no catching up on them before handing out.
    NoTakeoverWait,
}

impl NatsConfig {
    /// Settings for the server at `url`, with the defaults above.
    pub fn new(url: impl Into<String>) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            connection_name: None,
            auth: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            reconnect: Reconnect::default(),
            stream: "EFFECTS".to_owned(),
            subject_prefix: "effects".to_owned(),
            partitions: 16,
            duplicate_window: Duration::from_secs(120),
            max_age: None,
            storage: Storage::File,
            replicas: 1,
            unordered_in_flight: 1024,
            partition_in_flight: 128,
            hold_ttl: Duration::from_secs(10),
            max_deliver: None,
            mutant: None,
        }
    }

    /// The same settings for another stream and subject prefix (tests, tenants).
    #[must_use]
    pub fn with_stream(mut self, stream: impl Into<String>, prefix: impl Into<String>) -> Self {
        self.stream = stream.into();
        self.subject_prefix = prefix.into();
        self
    }

    /// Checks the settings before anything connects.
    pub(crate) fn validate(&self) -> Result<(), NatsError> {
        let invalid =
            |field: &'static str, reason: String| Err(NatsError::InvalidConfig { field, reason });
        if self.url.trim().is_empty() {
            return invalid("url", "is empty".into());
        }
        if !names::valid_stream_name(&self.stream) {
            return invalid(
                "stream",
                format!(
                    "{:?} cannot name a stream: use letters, digits, `-` and `_`",
                    self.stream
                ),
            );
        }
        if !self
            .subject_prefix
            .split('.')
            .all(names::valid_subject_token)
        {
            return invalid(
                "subject_prefix",
                format!(
                    "{:?} is not a subject without wildcards (tokens separated by `.`)",
                    self.subject_prefix
                ),
            );
        }
        if self.partitions == 0 {
            return invalid("partitions", "must be at least 1".into());
        }
        if self.duplicate_window < Duration::from_millis(100) {
            return invalid("duplicate_window", "must be at least 100 ms".into());
        }
        if let Some(age) = self.max_age {
            if age < self.duplicate_window {
                return invalid(
                    "max_age",
                    "must not be shorter than the duplicate window".into(),
                );
            }
        }
        if self.replicas == 0 {
            return invalid("replicas", "must be at least 1".into());
        }
        if self.unordered_in_flight == 0 {
            return invalid("unordered_in_flight", "must be at least 1".into());
        }
        if self.max_deliver == Some(0) {
            return invalid("max_deliver", "must be at least 1 (or None)".into());
        }
        if self.partition_in_flight == 0 {
            return invalid("partition_in_flight", "must be at least 1".into());
        }
        if self.hold_ttl < Duration::from_millis(500) {
            return invalid("hold_ttl", "must be at least 500 ms".into());
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return invalid("request_timeout", "timeouts must be above zero".into());
        }
        Ok(())
    }
}
