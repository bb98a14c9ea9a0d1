//! Connecting, and the streams a transport needs on the server: the message stream (created,
//! or checked against this process's configuration) and the holds stream next to it.
//!
//! One configuration per stream: a transport whose settings differ from the server's refuses to
//! connect, naming both values ([`NatsError::Settings`]); changing them is an explicit call,
//! [`NatsTransport::update_stream_settings`](super::NatsTransport::update_stream_settings),
//! which [`Check::Update`] implements.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::config::{Auth, NatsConfig, Storage};
use super::error::NatsError;
use super::names;

/// What to do with an existing stream whose settings differ from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Check {
    /// Refuse, naming both values.
    Refuse,
    /// Change the server's to the configured ones.
    Update,
}

/// Connects to the server(s) of `config`.
pub(super) async fn connect_client(
    config: &NatsConfig,
) -> Result<(async_nats::Client, jetstream::Context), NatsError> {
    let url = config.url.clone();
    let connect_error = |reason: String| NatsError::Connect {
        url: url.clone(),
        reason,
    };
    let reconnect = config.reconnect;
    let mut options = async_nats::ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .reconnect_delay_callback(move |attempt| reconnect.delay(attempt))
        .event_callback(|event| async move {
            tracing::info!(%event, "NATS connection event");
        });
    options = match reconnect.max_attempts {
        // async-nats reads 0 as "forever": at least one attempt.
        Some(n) => options.max_reconnects(n.max(1)),
        None => options.max_reconnects(None),
    };
    if let Some(name) = &config.connection_name {
        options = options.name(name);
    }
    match &config.auth {
        Some(Auth::Token(token)) => options = options.token(token.clone()),
        Some(Auth::UserPassword { user, password }) => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        None => {}
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(tls.required);
        if let Some(roots) = &tls.root_certificates {
            options = options.add_root_certificates(roots.clone());
        }
        if let Some((cert, key)) = &tls.client_certificate {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let servers: Vec<String> = config
        .url
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let client = options
        .connect(servers)
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    let js = jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .ack_timeout(config.request_timeout)
        .build(client.clone());
    Ok((client, js))
}

pub(super) fn description(config: &NatsConfig) -> String {
    format!(
        "effects transport: messages on {p}.msg.<topic>.<p0..p{last}|u>, dead letters on \
         {p}.dead.<consumer>.<topic>; partitions={n}",
        p = config.subject_prefix,
        last = config.partitions.saturating_sub(1),
        n = config.partitions
    )
}

pub(super) fn recorded_partitions(description: Option<&str>) -> Option<u16> {
    let text = description?;
    let at = text.find("partitions=")? + "partitions=".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The message stream as the configuration wants it.
fn message_stream(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        description: Some(description(config)),
        subjects: vec![
            format!("{}.msg.>", config.subject_prefix),
            format!("{}.dead.>", config.subject_prefix),
        ],
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: config.duplicate_window,
        max_age: config.max_age.unwrap_or(Duration::ZERO),
        storage: match config.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: config.replicas,
        ..stream::Config::default()
    }
}

/// The holds stream as the configuration wants it: one message per subject, each expiring after
/// the hold TTL, on disk (a hold must survive a server restart as long as it lasts).
fn holds_stream(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: names::holds_stream(&config.stream),
        description: Some(format!(
            "effects transport: lane holds and group members of stream {}",
            config.stream
        )),
        subjects: vec![
            format!("{}.hold.>", config.subject_prefix),
            format!("{}.member.>", config.subject_prefix),
        ],
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        max_age: config.hold_ttl,
        duplicate_window: config.hold_ttl,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..stream::Config::default()
    }
}

/// Creates the message stream, or checks an existing one against the configuration (its
/// layout must match; its duplicate window and age limit are refused or updated per `check`).
pub(super) async fn ensure_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    check: Check,
) -> Result<stream::Stream, NatsError> {
    ensure(js, config, message_stream(config), check, |existing, wanted| {
        let stream_error = |reason: String| NatsError::Stream {
            stream: config.stream.clone(),
            reason,
        };
        match recorded_partitions(existing.description.as_deref()) {
            Some(recorded) if recorded != config.partitions => {
                return Err(stream_error(format!(
                    "it was created with {recorded} partitions and this transport is configured \
                     with {}: every publisher and consumer of a stream must use the same count",
                    config.partitions
                )));
            }
            Some(_) => {}
            None => {
                return Err(stream_error(
                    "it exists but was not created by this transport (no partition count in \
                     its description): use another stream name"
                        .into(),
                ));
            }
        }
        if existing.retention != stream::RetentionPolicy::Limits {
            return Err(stream_error(
                "its retention is not `limits`: several consumer groups need every message kept"
                    .into(),
            ));
        }
        let mut differ = Vec::new();
        if existing.duplicate_window != wanted.duplicate_window {
            differ.push((
                "duplicate window (NatsConfig::duplicate_window)",
                format!("{:?}", existing.duplicate_window),
                format!("{:?}", wanted.duplicate_window),
            ));
        }
        if existing.max_age != wanted.max_age {
            let show = |age: Duration| {
                if age.is_zero() {
                    "none (messages kept until deleted)".to_owned()
                } else {
                    format!("{age:?}")
                }
            };
            differ.push((
                "age limit (NatsConfig::max_age)",
                show(existing.max_age),
                show(wanted.max_age),
            ));
        }
        Ok(differ)
    })
    .await
}

/// Creates the holds stream, or checks an existing one (its hold TTL is refused or updated per
/// `check`).
pub(super) async fn ensure_holds_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    check: Check,
) -> Result<stream::Stream, NatsError> {
    ensure(
        js,
        config,
        holds_stream(config),
        check,
        |existing, wanted| {
            if existing.max_messages_per_subject != 1 {
                return Err(NatsError::Stream {
                    stream: wanted.name.clone(),
                    reason:
                        "it keeps more than one message per subject: it was not created by this \
                         transport"
                            .into(),
                });
            }
            let mut differ = Vec::new();
            if existing.max_age != wanted.max_age {
                differ.push((
                    "hold TTL (NatsConfig::hold_ttl, the stream's age limit)",
                    format!("{:?}", existing.max_age),
                    format!("{:?}", wanted.max_age),
                ));
            }
            Ok(differ)
        },
    )
    .await
}

/// Settings that differ: (setting, on the server, configured).
type Differences = Vec<(&'static str, String, String)>;

async fn ensure(
    js: &jetstream::Context,
    config: &NatsConfig,
    wanted: stream::Config,
    check: Check,
    layout: impl Fn(&stream::Config, &stream::Config) -> Result<Differences, NatsError>,
) -> Result<stream::Stream, NatsError> {
    let name = wanted.name.clone();
    let stream_error = |reason: String| NatsError::Stream {
        stream: name.clone(),
        reason,
    };
    // Bounded: a lost creation race is retried once.
    for _ in 0..2 {
        match js.get_stream(&name).await {
            Ok(stream) => {
                let existing = stream.cached_info().config.clone();
                for subject in &wanted.subjects {
                    if !existing.subjects.contains(subject) {
                        return Err(stream_error(format!(
                            "it does not hold the subject {subject} (it has {:?}): another \
                             subject prefix?",
                            existing.subjects
                        )));
                    }
                }
                let differ = layout(&existing, &wanted)?;
                if differ.is_empty() {
                    return Ok(stream);
                }
                if check == Check::Refuse {
                    let (setting, server, configured) = differ.into_iter().next().unwrap_or((
                        "settings",
                        String::new(),
                        String::new(),
                    ));
                    return Err(NatsError::Settings {
                        stream: name.clone(),
                        setting,
                        server,
                        configured,
                    });
                }
                let updated = stream::Config {
                    duplicate_window: wanted.duplicate_window,
                    max_age: wanted.max_age,
                    ..existing
                };
                js.update_stream(&updated)
                    .await
                    .map_err(|e| stream_error(format!("cannot update its settings: {e}")))?;
                tracing::info!(stream = %name, ?differ, "updated the stream's settings");
                return js
                    .get_stream(&name)
                    .await
                    .map_err(|e| stream_error(format!("cannot read it back: {e}")));
            }
            Err(e) => {
                let not_found = matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref err)
                        if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                );
                if !not_found {
                    return Err(no_jetstream(config, e.to_string()));
                }
            }
        }
        match js.create_stream(wanted.clone()).await {
            Ok(stream) => {
                tracing::info!(stream = %name, "created the stream");
                return Ok(stream);
            }
            Err(e) => {
                let exists = matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(ref err)
                        if err.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                );
                if !exists {
                    return Err(stream_error(format!("cannot create it: {e}")));
                }
            }
        }
    }
    Err(stream_error("created and deleted concurrently".into()))
}

fn no_jetstream(config: &NatsConfig, reason: String) -> NatsError {
    NatsError::NoJetStream {
        url: config.url.clone(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_records_its_partition_count() {
        let config = NatsConfig::new("nats://127.0.0.1:4222");
        assert_eq!(recorded_partitions(Some(&description(&config))), Some(16));
        assert_eq!(recorded_partitions(Some("made by hand")), None);
        assert_eq!(recorded_partitions(None), None);
    }
}
