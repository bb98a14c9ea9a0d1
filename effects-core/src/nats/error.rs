//! Errors of connecting the transport and setting up its stream.

use crate::transport::TransportError;

/// Why the NATS transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A setting is not usable.
    #[error("invalid NATS setting `{field}`: {reason}")]
    InvalidConfig {
        /// The field of [`NatsConfig`](super::NatsConfig).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The server could not be reached (or refused the connection).
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The configured URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// JetStream is not enabled on the server, or the account has no access to it.
    #[error("JetStream is not available on {url}: {reason} (start the server with `-js`)")]
    NoJetStream {
        /// The configured URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A setting of the stream on the server differs from this transport's configuration. Every
    /// process of a stream uses the same settings: change this configuration, or change the
    /// server's explicitly with
    /// [`NatsTransport::update_stream_settings`](super::NatsTransport::update_stream_settings).
    #[error(
        "stream {stream}: its {setting} is {server} on the server and {configured} in this \
         transport's configuration; every process of a stream uses the same settings (use the \
         server's, or change them for everyone with NatsTransport::update_stream_settings)"
    )]
    Settings {
        /// The stream's name.
        stream: String,
        /// Which setting.
        setting: &'static str,
        /// Its value on the server.
        server: String,
        /// Its value in this configuration.
        configured: String,
    },
    /// The stream could not be created, or exists with a layout this transport cannot use.
    #[error("stream {stream}: {reason}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// Why.
        reason: String,
    },
}

impl From<NatsError> for TransportError {
    fn from(e: NatsError) -> TransportError {
        match e {
            NatsError::Connect { .. } | NatsError::NoJetStream { .. } => {
                TransportError::Unavailable {
                    reason: e.to_string(),
                }
            }
            NatsError::InvalidConfig { .. }
            | NatsError::Stream { .. }
            | NatsError::Settings { .. } => TransportError::Refused {
                reason: e.to_string(),
            },
        }
    }
}
