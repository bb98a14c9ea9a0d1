//! Messages: payloads published to a topic of a broker.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A user type that becomes an outgoing message.
///
/// Implement it with `#[derive(Message)]`; the payload is the type's `Serialize` form and an
/// optional `#[message(key)]` field is the partition key (messages with one key keep their order):
///
/// ```
/// use effects_core::Message;
/// use serde::Serialize;
///
/// #[derive(Message, Serialize)]
/// #[message(topic = "card-status-changed")]
/// pub struct StatusChanged {
///     #[message(key)]
///     pub card_id: String,
///     pub status: String,
/// }
///
/// let msg = StatusChanged { card_id: "c1".into(), status: "blocked".into() }.to_message();
/// assert_eq!(msg.topic, "card-status-changed");
/// assert_eq!(msg.key.as_deref(), Some("c1"));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a message",
    label = "not a message",
    note = "derive it: `#[derive(effects_core::Message, serde::Serialize)] #[message(topic = \"...\")]`"
)]
pub trait Message {
    /// The topic it is published to.
    const TOPIC: &'static str;

    /// The erased message.
    fn to_message(&self) -> MessageEffect;

    /// The erased message, moving what can be moved instead of copying it.
    fn into_message(self) -> MessageEffect
    where
        Self: Sized,
    {
        self.to_message()
    }

    crate::__private::slot_items!(
        messages,
        crate::Matcher::Message { topic: Self::TOPIC },
        |item| item.to_message(),
        |item| item.into_message()
    );
}

/// An erased outgoing message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEffect {
    /// The topic.
    pub topic: String,
    /// The partition key: messages with the same key are delivered in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Extra headers; the executor adds its own (`tx`, idempotency key) when publishing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Value,
}

impl MessageEffect {
    /// A message on `topic` with `payload`, no key and no headers.
    pub fn new(topic: impl Into<String>, payload: Value) -> Self {
        MessageEffect {
            topic: topic.into(),
            key: None,
            headers: BTreeMap::new(),
            payload,
        }
    }

    /// Sets the partition key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The message with a header of its own (carried to the broker beside the payload).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}
