//! A group's lanes on the server: one durable pull consumer per partition (`p<i>`) and one for
//! messages without a key (`u`), and their settings ([`ConsumerSettings`]), which are the same
//! for every process of the group: created by the group's first fetch, checked by every later
//! one, changed only explicitly.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use futures_util::future::join_all;

use super::names;
use super::transport::{Shared, refused, unavailable};
use crate::transport::TransportError;

/// The settings of a group's consumers, the same for every process of the group (see
/// [`NatsTransport::set_consumer_settings`](super::NatsTransport::set_consumer_settings)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// How long a delivered message stays invisible unless acknowledged or heartbeated (the
    /// consumers' `AckWait`): the visibility every fetch and heartbeat of the group uses.
    pub ack_wait: Duration,
    /// The partition consumers' `max_ack_pending` ([`NatsConfig::partition_in_flight`]).
    ///
    /// [`NatsConfig::partition_in_flight`]: super::NatsConfig::partition_in_flight
    pub partition_in_flight: u32,
    /// The `u` consumer's `max_ack_pending` ([`NatsConfig::unordered_in_flight`]).
    ///
    /// [`NatsConfig::unordered_in_flight`]: super::NatsConfig::unordered_in_flight
    pub unordered_in_flight: u32,
}

impl ConsumerSettings {
    /// Settings with this ack wait and these in-flight limits.
    pub fn new(
        ack_wait: Duration,
        partition_in_flight: u32,
        unordered_in_flight: u32,
    ) -> ConsumerSettings {
        ConsumerSettings {
            ack_wait,
            partition_in_flight,
            unordered_in_flight,
        }
    }
}

/// The consumers' ack wait for a fetch's visibility (NATS reads zero as "the default", 30 s).
pub(super) fn ack_wait_for(visibility: Duration) -> Duration {
    visibility.max(Duration::from_millis(10))
}

pub(super) fn lane_ids(partitions: u16) -> impl Iterator<Item = String> {
    (0..partitions)
        .map(|i| format!("p{i}"))
        .chain(std::iter::once("u".to_owned()))
}

fn consumer_config(
    shared: &Shared,
    group: &str,
    topic: &str,
    lane: &str,
    settings: ConsumerSettings,
) -> pull::Config {
    let config = &shared.config;
    let keyed = lane != "u";
    pull::Config {
        durable_name: Some(names::consumer_name(group, topic, lane)),
        description: Some(format!(
            "effects: consumer {group:?} of topic {topic:?}, lane {lane}"
        )),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        filter_subject: format!(
            "{}.msg.{}.{lane}",
            config.subject_prefix,
            names::subject_token(topic)
        ),
        replay_policy: ReplayPolicy::Instant,
        max_ack_pending: i64::from(if keyed {
            settings.partition_in_flight
        } else {
            settings.unordered_in_flight
        }),
        ..pull::Config::default()
    }
}

/// Makes sure a group's consumers exist with `settings`: missing ones are created; existing ones
/// with other settings are refused with both values named, or (with `update`) changed.
pub(super) async fn ensure_consumers(
    shared: &Shared,
    group: &str,
    topic: &str,
    settings: ConsumerSettings,
    update: bool,
) -> Result<(), TransportError> {
    let ids: Vec<String> = lane_ids(shared.config.partitions).collect();
    let infos = join_all(ids.iter().map(|id| {
        shared
            .stream
            .consumer_info(names::consumer_name(group, topic, id))
    }))
    .await;
    let mut to_write = Vec::new();
    for (id, info) in ids.iter().zip(infos) {
        let wanted = consumer_config(shared, group, topic, id, settings);
        match info {
            Ok(info) => {
                let have = &info.config;
                if have.ack_wait == wanted.ack_wait
                    && have.max_ack_pending == wanted.max_ack_pending
                    && have.filter_subject == wanted.filter_subject
                {
                    continue;
                }
                if !update {
                    let (what, ours, theirs) = if have.ack_wait != wanted.ack_wait {
                        (
                            "ack wait (the fetch's visibility)".to_owned(),
                            format!("{:?}", wanted.ack_wait),
                            format!("{:?}", have.ack_wait),
                        )
                    } else if have.max_ack_pending != wanted.max_ack_pending {
                        (
                            if id == "u" {
                                "max_ack_pending (NatsConfig::unordered_in_flight)".to_owned()
                            } else {
                                "max_ack_pending (NatsConfig::partition_in_flight)".to_owned()
                            },
                            wanted.max_ack_pending.to_string(),
                            have.max_ack_pending.to_string(),
                        )
                    } else {
                        (
                            "filter subject".to_owned(),
                            wanted.filter_subject.clone(),
                            have.filter_subject.clone(),
                        )
                    };
                    return Err(refused(format!(
                        "consumer group {group:?} on topic {topic:?} (consumer {}): this process \
                         asks for the {what} {ours} and the group's consumers have {theirs}; \
                         every process of a group uses one configuration: use {theirs}, or \
                         change the group's with NatsTransport::set_consumer_settings",
                        info.name
                    )));
                }
                to_write.push(wanted);
            }
            Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => to_write.push(wanted),
            Err(e) => {
                return Err(unavailable(
                    &format!("reading the consumers of {group:?} on {topic:?}"),
                    e,
                ));
            }
        }
    }
    let written = join_all(to_write.into_iter().map(|config| async move {
        let name = config.durable_name.clone().unwrap_or_default();
        shared
            .js
            .create_consumer_on_stream(config, shared.config.stream.as_str())
            .await
            .map_err(|e| unavailable(&format!("creating or updating consumer {name}"), e))
    }))
    .await;
    for w in written {
        w?;
    }
    Ok(())
}
