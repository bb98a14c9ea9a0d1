//! The workload: `transfer`, a handler that books a transfer — one datom (two attributes), an
//! HTTP request to the `notify` endpoint for some inputs, and a `transfer-booked` message — and
//! counts its calls; an after-requests hook that adds a `transfer-receipts` message per
//! request; and the input messages `in-<i>` carrying `{"id": "t<i>"}` on `transfers`.

use std::collections::BTreeMap;

use effects_core::handler::message_key;
use effects_core::store::RecordedRequest;
use effects_core::transport::{OutgoingMessage, Transport, TransportError};
use effects_core::{
    DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect, Method,
    RequestEffect,
};
use serde::Deserialize;
use serde_json::json;

use super::tally::{HANDLER, Tally};

/// The handler's name: the first part of every run key.
pub const HANDLER_NAME: &str = "transfer";
/// The topic of the inputs.
pub const INPUTS: &str = "transfers";
/// The topic of the message every run sends.
pub const BOOKED: &str = "transfer-booked";
/// The topic of the after-requests hook's messages.
pub const RECEIPTS: &str = "transfer-receipts";
/// The name the after-requests hook is registered under.
pub const RECEIPT_HOOK: &str = "receipt";
/// The HTTP endpoint of the requests.
pub const ENDPOINT: &str = "notify";

/// The input of `transfer`.
#[derive(Clone, Debug, Deserialize)]
pub struct Booking {
    /// `t<i>`.
    pub id: String,
}

/// Which inputs send an HTTP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requests {
    /// None.
    None,
    /// Input `t<i>` sends one when `i` is a multiple of `n` (1: every input).
    Every(u64),
}

impl Requests {
    /// Whether input number `i` sends a request.
    pub fn for_input(self, i: u64) -> bool {
        match self {
            Requests::None => false,
            Requests::Every(n) => n > 0 && i % n == 0,
        }
    }
}

/// Books a transfer, counting its calls by input id in a [`Tally`] ([`HANDLER`] events).
#[derive(Debug)]
pub struct BookHandler {
    /// Where calls are counted.
    pub tally: Tally,
    /// Which inputs send a request.
    pub requests: Requests,
}

/// The number in an id such as `t12` or `in-12` (its trailing digits).
pub fn number(id: &str) -> Option<u64> {
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    id[id.len() - digits..].parse().ok()
}

impl Handler for BookHandler {
    type Input = Booking;
    type Output = Effects;
    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: HANDLER_NAME,
        topic: Some(INPUTS),
        key: None,
        input: "Booking",
        schemas: &[],
    };

    fn handle(&self, t: Booking) -> Effects {
        self.tally.record(HANDLER, &t.id);
        let mut effects = Effects::from(DatomEffect::assert(
            LookupRef::new("transfer/id", t.id.clone()),
            [
                ("transfer/amount", json!(100)),
                ("transfer/state", json!("booked")),
            ],
        ));
        if number(&t.id).is_some_and(|i| self.requests.for_input(i)) {
            effects = effects.merge(
                RequestEffect::new(Method::Post, ENDPOINT, format!("/notify/{}", t.id))
                    .with_body(json!({"id": t.id})),
            );
        }
        effects.merge(MessageEffect::new(BOOKED, json!({"id": t.id})).with_key(t.id))
    }
}

/// The after-requests hook: one receipt message per recorded request, keyed by the transfer.
pub fn receipts(recorded: &[RecordedRequest]) -> Vec<MessageEffect> {
    recorded
        .iter()
        .map(|r| {
            let id = r
                .request
                .body
                .as_ref()
                .and_then(|b| b.get("id"))
                .cloned()
                .unwrap_or_else(|| json!(r.id));
            MessageEffect::new(
                RECEIPTS,
                json!({"id": id, "request": r.id, "ok": r.outcome.is_success()}),
            )
        })
        .collect()
}

/// The id of input message `i`.
pub fn input_message_id(i: u64) -> String {
    format!("in-{i}")
}

/// The transfer id input `i` carries.
pub fn transfer_id(i: u64) -> String {
    format!("t{i}")
}

/// The run key of input `i`.
pub fn run_key(i: u64) -> String {
    message_key(HANDLER_NAME, INPUTS, &input_message_id(i))
}

/// Publishes inputs `range` on [`INPUTS`], each with its transfer id as partition key when
/// `keyed`.
pub async fn seed<T: Transport>(
    log: &T,
    range: std::ops::Range<u64>,
    keyed: bool,
) -> Result<(), TransportError> {
    for i in range {
        log.publish(OutgoingMessage {
            id: input_message_id(i),
            topic: INPUTS.to_owned(),
            partition_key: keyed.then(|| transfer_id(i)),
            headers: BTreeMap::new(),
            payload: json!({"id": transfer_id(i)}).to_string().into_bytes(),
        })
        .await?;
    }
    Ok(())
}
