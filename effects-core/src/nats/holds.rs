//! Lane holds and group members on the holds stream (`<stream>_HOLDS`): one message per
//! subject (`max_msgs_per_subject = 1`), every message expiring after
//! [`NatsConfig::hold_ttl`](super::NatsConfig::hold_ttl).
//!
//! A hold is the last message on a lane's hold subject. It is taken by publishing with
//! `Nats-Expected-Last-Subject-Sequence` set to the sequence of the message seen there (0 when
//! none is: nobody holds it, or the last hold expired), renewed the same way with the sequence of
//! the holder's own last message, and released by writing a `released` record. The stream's
//! check of the expected sequence makes each of these an atomic compare-and-set: of two
//! processes racing for a lane one wins, and a holder that lost its hold (it expired, someone
//! else took it) learns it at its next renewal. The lease logic around it (validity by the
//! holder's own clock, waiting for a dead holder's messages) is in the [group](super::group)
//! module.
//!
//! A member is a process fetching from a group on a topic: it publishes a presence message on
//! its own subject every third of the hold time, and the members are the subjects that still
//! have one.

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::transport::TransportError;

const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";

/// Whether a hold record says the lane is held or was let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum HoldState {
    /// The member holds the lane.
    Held,
    /// The member let the lane go.
    Released,
}

/// What a hold subject's message says (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct HoldRecord {
    /// The member that wrote it.
    pub(super) member: String,
    /// Held or released.
    pub(super) state: HoldState,
    /// On a release: how long a new holder waits before pulling the lane when its consumer still
    /// has messages pending (milliseconds): 0 when everything the member had was acknowledged or
    /// given back, more when some of it is still out (a delayed give-back, a delivery still in
    /// work at shutdown).
    #[serde(default)]
    pub(super) wait_ms: u64,
}

impl HoldRecord {
    pub(super) fn held(member: &str) -> HoldRecord {
        HoldRecord {
            member: member.to_owned(),
            state: HoldState::Held,
            wait_ms: 0,
        }
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Unavailable {
        reason: format!("{what}: {e}"),
    }
}

/// The last message on a hold subject: its sequence and the record (`None` when it cannot be
/// read, which a holder treats as someone else's hold).
pub(super) async fn last(
    holds: &Stream,
    subject: &str,
) -> Result<Option<(u64, Option<HoldRecord>)>, TransportError> {
    match holds.get_last_raw_message_by_subject(subject).await {
        Ok(message) => {
            let record = serde_json::from_slice(&message.payload).ok();
            Ok(Some((message.sequence, record)))
        }
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(unavailable("reading a lane hold", e)),
    }
}

/// How a conditional write went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// Stored with this sequence.
    Done(u64),
    /// The last message on the subject is not the expected one: someone else wrote since, or
    /// the expected one expired.
    Conflict,
}

/// Publishes `record` on `subject` if the subject's last message has sequence `expected` (0:
/// no message).
pub(super) async fn write(
    js: &jetstream::Context,
    subject: String,
    record: &HoldRecord,
    expected: u64,
) -> Result<Written, TransportError> {
    let mut headers = HeaderMap::new();
    headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string());
    let payload = serde_json::to_vec(record).unwrap_or_default();
    let published = async {
        js.publish_with_headers(subject, headers, Bytes::from(payload))
            .await?
            .await
    };
    match published.await {
        Ok(ack) => Ok(Written::Done(ack.sequence)),
        Err(e) if matches!(e.kind(), PublishErrorKind::WrongLastSequence) => Ok(Written::Conflict),
        Err(e) => Err(unavailable("writing a lane hold", e)),
    }
}

/// Announces (or renews) a member's presence.
pub(super) async fn announce(
    js: &jetstream::Context,
    subject: String,
    member: &str,
) -> Result<(), TransportError> {
    let payload = serde_json::to_vec(&serde_json::json!({ "member": member })).unwrap_or_default();
    let published = async { js.publish(subject, Bytes::from(payload)).await?.await };
    published
        .await
        .map(|_| ())
        .map_err(|e| unavailable("announcing a group member", e))
}

/// How many members have a presence message on `filter`.
pub(super) async fn count_members(holds: &Stream, filter: &str) -> Result<usize, TransportError> {
    let mut subjects = holds
        .info_with_subjects(filter)
        .await
        .map_err(|e| unavailable("counting group members", e))?;
    let mut n = 0;
    // Bounded by the number of members (one page per 100 000 subjects on the server).
    while subjects
        .try_next()
        .await
        .map_err(|e| unavailable("counting group members", e))?
        .is_some()
    {
        n += 1;
    }
    Ok(n)
}

/// Removes a member's presence.
pub(super) async fn withdraw(holds: &Stream, subject: &str) -> Result<(), TransportError> {
    holds
        .purge()
        .filter(subject)
        .await
        .map(|_| ())
        .map_err(|e| unavailable("withdrawing a group member", e))
}
