//! Side effects as data.
//!
//! A domain handler is a pure function: it takes what it needs to decide and returns *effects* —
//! datoms to write, HTTP requests to send, broker messages to publish — as a typed value. A
//! schema declares which effects a handler may return and how many of each, and the compiler
//! checks every handler against it. Effects merge, serialize to a canonical form for snapshot
//! tests, and are run by one [`Executor`]: idempotently, in a fixed order,
//! without losing or doubling work when a process crashes or a message arrives twice.
//!
//! # From a schema to a handler to a test
//!
//! **1. Payload types.** A datom asserts attributes on one entity, addressed by a lookup ref; a
//! message is a payload on a topic; a request is an HTTP call to a named endpoint. Derive them:
//!
//! ```
//! use effects_core::{Datom, Message};
//! use serde::Serialize;
//!
//! /// `card/status` of the card `[card/id ..]`.
//! #[derive(Datom)]
//! #[datom(entity = "card")]
//! pub struct BlockedCard {
//!     #[datom(id)]
//!     pub id: String,
//!     pub status: String,
//! }
//!
//! /// Published on `card-status-changed`, keyed by card so one card's changes stay in order.
//! #[derive(Serialize, Message)]
//! #[message(topic = "card-status-changed")]
//! pub struct StatusChanged {
//!     #[message(key)]
//!     pub card_id: String,
//!     pub status: String,
//! }
//! # fn main() {}
//! ```
//!
//! **2. Schemas.** [`effects!`] declares what a handler may return: per kind, slots with a
//! cardinality — `one`, `optional`, `many` or `at_least_one` — like the `s/one` of the original
//! Clojure schemas. Each schema gets a struct, a builder whose `build()` compiles only when every
//! required slot is filled, `Into<Effects>`, canonical `Serialize`, its [`Shape`] for run-time
//! validation, and typed `merge` (`merges:` lists what it absorbs, checked at compile time):
//!
//! ```
//! # use effects_core::{Datom, Message};
//! # use serde::Serialize;
//! # #[derive(Datom)] #[datom(entity = "card")]
//! # pub struct BlockedCard { #[datom(id)] pub id: String, pub status: String }
//! # #[derive(Serialize, Message)] #[message(topic = "card-status-changed")]
//! # pub struct StatusChanged { #[message(key)] pub card_id: String, pub status: String }
//! use effects_core::effects;
//!
//! effects! {
//!     /// Blocking one card.
//!     pub BlockCard {
//!         datoms:   [one BlockedCard],
//!         messages: [one StatusChanged],
//!     }
//!     /// Blocking several.
//!     pub BlockMany {
//!         datoms:   [many BlockedCard],
//!         messages: [many StatusChanged],
//!         merges:   [BlockCard],
//!     }
//! }
//! # fn main() {}
//! ```
//!
//! **3. Handlers.** [`#[effect_handler]`](effect_handler) marks a pure function whose return
//! type is a union of schemas, `effects![A | B]`. It generates the union (`BlockEffects` for
//! `block`), rejects what cannot be a pure handler (`async`, `unsafe`, `&mut` parameters, a
//! return type that is not a union of schemas), and describes the handler for the worker
//! (`BlockHandler`: its name, the topic it consumes, its input, its schemas):
//!
//! ```
//! # use effects_core::{Datom, Message, effects};
//! # use serde::Serialize;
//! # #[derive(Datom)] #[datom(entity = "card")]
//! # pub struct BlockedCard { #[datom(id)] pub id: String, pub status: String }
//! # #[derive(Serialize, Message)] #[message(topic = "card-status-changed")]
//! # pub struct StatusChanged { #[message(key)] pub card_id: String, pub status: String }
//! # effects! {
//! #     pub BlockCard { datoms: [one BlockedCard], messages: [one StatusChanged] }
//! #     pub BlockMany { datoms: [many BlockedCard], messages: [many StatusChanged], merges: [BlockCard] }
//! # }
//! use effects_core::{effect_handler, Empty, Handler};
//!
//! #[derive(serde::Deserialize)]
//! pub struct Card {
//!     pub id: String,
//!     pub status: String,
//! }
//!
//! #[effect_handler(topic = "card-block-requested")]
//! pub fn block(card: &Card) -> effects![BlockCard | Empty] {
//!     if card.status != "active" {
//!         return Empty.into();
//!     }
//!     BlockCard::builder()
//!         .blocked_card(BlockedCard { id: card.id.clone(), status: "blocked".into() })
//!         .status_changed(StatusChanged { card_id: card.id.clone(), status: "blocked".into() })
//!         .build()
//!         .into()
//! }
//!
//! /// Several parameters: the input is decoded from `{"cards": [...]}`.
//! #[effect_handler]
//! pub fn block_many(cards: &[Card]) -> effects![BlockMany] {
//!     cards.iter().map(block).fold(BlockMany::builder().build(), BlockMany::merge).into()
//! }
//!
//! # fn main() {
//! let card = Card { id: "c1".into(), status: "active".into() };
//! assert_eq!(block(&card).variant(), "BlockCard");
//! assert_eq!(BlockHandler::DESCRIPTOR.topic, Some("card-block-requested"));
//! let effects: effects_core::Effects = block_many(&[card]).into();
//! assert_eq!((effects.datoms.len(), effects.messages.len()), (1, 1));
//! # }
//! ```
//!
//! **4. Tests.** A handler is tested by calling it. With the `testing` feature,
//! [`assert_effects_snapshot!`] records its effects with insta (ids and timestamps redacted),
//! `assert_effects_eq!` asserts an exact match with a diff, and
//! `testing::assert_replayable` runs a handler twice on one payload and fails if the runs
//! differ. A snapshot is an exact assertion: nothing else was produced.
//!
//! ```text
//! #[test]
//! fn blocking_an_active_card() {
//!     effects_core::assert_effects_snapshot!(block(&card("c1", "active")));
//! }
//! ```
//!
//! gives the reviewed file `snapshots/handlers__blocking_an_active_card.snap`:
//!
//! ```yaml
//! BlockCard:
//!   datoms:
//!     - attributes:
//!         card/status: blocked
//!       entity:
//!         - card/id
//!         - "[id 1]"
//!   messages:
//!     - key: "[id 1]"
//!       payload:
//!         card_id: "[id 1]"
//!         status: blocked
//!       topic: card-status-changed
//!   requests: []
//! ```
//!
//! **5. Running.** The [`Executor`] validates effects before any write,
//! claims the idempotency key and applies the datoms and the outbox in one transaction, then
//! sends requests and publishes messages; the [`Worker`] consumes a topic,
//! decodes (or loads) each handler's input, calls it and runs the effects. On one machine the
//! embedded [`SqliteStore`](store::SqliteStore) keeps the store and the message log in one file.
//!
//! # What the compiler says
//!
//! Wrong effect shapes are compile errors at your own token, saying the fix. Building a
//! `BlockCard` without its datom:
//!
//! ```text
//! error[E0277]: `BlockCard` needs exactly one `BlockedCard` datom: call `.blocked_card(..)` before `.build()`
//!  --> src/handlers.rs:7:10
//!   |
//! 7 |         .build();
//!   |          ^^^^^ `.blocked_card(..)` has not been called
//!   |
//!   = note: `BlockCard` declares `one BlockedCard` in its datoms
//! ```
//!
//! Setting a `one` slot twice:
//!
//! ```text
//! error[E0277]: `.blocked_card(..)` is called twice: `BlockCard` takes exactly one `BlockedCard` datom
//!  --> src/handlers.rs:7:10
//!   |
//! 7 |         .blocked_card(BlockedCard::from(&card))
//!   |          ^^^^^^^^^^^^ second `BlockedCard`
//!   |
//!   = note: to take several, declare the slot `many BlockedCard` or `at_least_one BlockedCard` in `BlockCard`
//! ```
//!
//! Merging a schema into one that has nowhere to put some of its effects:
//!
//! ```text
//! error[E0277]: `SaveCards` cannot absorb more `StatusChanged`: it has no `many StatusChanged` or `at_least_one StatusChanged` slot
//!  --> src/schemas.rs:8:18
//!   |
//! 8 |         merges: [BlockCard],
//!   |                  ^^^^^^^^^ `SaveCards` cannot absorb this
//!   |
//!   = note: declare the slot `many StatusChanged` in `SaveCards`, or merge something without `StatusChanged` effects
//! ```
//!
//! And a handler that is not pure:
//!
//! ```text
//! error: a handler cannot be `async`: it is a pure function that returns effects; the executor does the I/O (remove `async`)
//!  --> src/handlers.rs:5:5
//!   |
//! 5 | pub async fn block(card: &Card) -> effects![BlockCard | Empty] {
//!   |     ^^^^^
//! ```
//!
//! # Features
//!
//! - `sqlite` (default): the embedded store and log transport on SQLite.
//! - `http` (default): outgoing requests through reqwest.
//! - `nats`: the NATS JetStream transport ([`nats::NatsTransport`]), for many worker processes.
//! - `testing`: the snapshot and assertion helpers of [`testing`](crate#4-tests).

#[allow(unused_extern_crates)]
extern crate self as effects_core;

pub mod datom;
pub mod effects;
pub mod executor;
pub mod handler;
pub mod http;
pub mod message;
#[cfg(feature = "nats")]
pub mod nats;
pub mod relay;
pub mod request;
pub mod schema;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transport;
pub mod worker;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use crate::datom::{Datom, DatomEffect, LookupRef, Op};
pub use crate::effects::{ConflictError, DatomAt, Effects, canonical_json};
pub use crate::executor::{Executor, RunError, RunOutcome};
pub use crate::handler::{DecodeError, Handler, HandlerDescriptor};
pub use crate::message::{Message, MessageEffect};
pub use crate::relay::Relay;
pub use crate::request::{Method, Request, RequestEffect};
pub use crate::schema::{
    Absorbs, Cardinality, Empty, Kind, Matcher, MergeInto, NonEmpty, Schema, Shape, ShapeError,
    SlotShape,
};
pub use crate::store::{Store, Tx};
pub use crate::transport::Transport;
pub use crate::worker::Worker;

pub use effects_macros::{Datom, Message, Request, effect_handler, effects};
