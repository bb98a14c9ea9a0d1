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
//! # Concurrency
//!
//! **What is guaranteed.** Each idempotency key is applied at most once: a redelivery, or a
//! second task running the same key, is a duplicate that applies nothing. And no run writes
//! effects computed from state that changed after it was read: the worker records every entity
//! its loaders read through the [`Tracked`](store::Tracked) store, with the version read, and the
//! commit — in the same store transaction as the key claim — refuses a run if any of them
//! changed since ([`RunError::Conflict`], nothing written). Because a handler is pure, the worker
//! then loads again, calls the handler again on the fresh state and runs the new effects under
//! the same key, with backoff, up to [`WorkerConfig::reruns`](worker::WorkerConfig::reruns),
//! then dead-letters with the conflict as the reason. A caller of [`Executor::run`] that loads
//! state itself passes what it read with [`RunOptions::reading`](executor::RunOptions::reading),
//! and a compare-and-set datom ([`DatomEffect::expecting`], `#[datom(expect = "balance")]`)
//! states the value an attribute must still hold, on any path.
//!
//! **What is not.** Reads the library cannot see — through the untracked store, another
//! database, a clock, or state embedded in a message — are not validated; use compare-and-set
//! datoms there. Versions are per entity: a change to any attribute of an entity read refuses
//! the run, which costs a re-run, never a wrong result; writes to other entities and writes that
//! leave every value as it was refuse nothing.
//!
//! **Ordering and conflicts.** Messages with one partition key are delivered one at a time, in
//! order, so runs for one key (one account) do not race each other through the worker; conflicts
//! come from different keys touching the same entity (two transfers from one account). A re-run
//! keeps its delivery: it is not overtaken by later messages of its partition. Idempotency keys
//! are `handler:topic:message-id`, or `handler:business-key` for a handler declaring
//! `#[effect_handler(key = transfer.id)]`, so an upstream re-sending a transfer under a new message
//! id gets a duplicate ([`handler::message_key`], [`handler::business_key`]).
//!
//! # HTTP endpoints
//!
//! A request effect names an endpoint (`fraud-check`), never a URL or a credential: effects are
//! data, hashed to bind their idempotency key, written to the outbox, recorded with their
//! responses, printed in snapshots and logs. An endpoint's base URL and credentials live in the
//! [`HttpConfig`](http::HttpConfig) of the executor's HTTP client, read from the environment or
//! from files when the service starts: static headers, basic auth, bearer tokens from a
//! [`TokenProvider`](http::TokenProvider) (fetched when needed, refreshed before they expire and
//! once after a 401), and client certificates with a private CA (mutual TLS).
//!
//! ```no_run
//! use std::time::Duration;
//! use effects_core::Executor;
//! use effects_core::http::{Endpoint, HttpConfig, ReqwestClient, Secret, Token, TokenError};
//! use effects_core::store::SqliteStore;
//!
//! /// The service's OAuth client-credentials exchange: a token and its lifetime in seconds.
//! async fn fetch_token(client_secret: &Secret) -> Result<(String, u64), std::io::Error> {
//!     # let _ = client_secret;
//!     # Ok(("eyJhbGciOi".to_owned(), 3600))
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client_secret = Secret::from_env("FRAUD_CLIENT_SECRET")?;
//! let config = HttpConfig::new()
//!     // An API key in a header.
//!     .add_endpoint(
//!         Endpoint::new("ledger", "https://ledger.internal.example/api")?
//!             .with_header_from_env("X-Api-Key", "LEDGER_API_KEY")?,
//!     )?
//!     // Bearer tokens from the service's own token exchange.
//!     .add_endpoint(
//!         Endpoint::new("fraud-check", "https://fraud.example.com/v2")?.with_bearer(move || {
//!             let client_secret = client_secret.clone();
//!             async move {
//!                 let (token, lifetime) =
//!                     fetch_token(&client_secret).await.map_err(TokenError::new)?;
//!                 Ok(Token::new(token).expires_in(Duration::from_secs(lifetime)))
//!             }
//!         })?,
//!     )?
//!     // Mutual TLS behind a private CA, and a session header the server hands out.
//!     .add_endpoint(
//!         Endpoint::new("payments", "https://payments.internal.example")?
//!             .with_client_certificate(
//!                 &std::fs::read("/etc/effects/client.pem")?,
//!                 &std::fs::read("/etc/effects/client.key")?,
//!             )?
//!             .with_ca_certificate(&std::fs::read("/etc/effects/ca.pem")?)?
//!             .with_secret_header("X-Payment-Session")?,
//!     )?;
//!
//! let store = SqliteStore::open("effects.db")?;
//! let executor = Executor::builder(store.clone(), store.log())
//!     .http(ReqwestClient::new(config)?)
//!     .build();
//! # let _ = executor;
//! # Ok(())
//! # }
//! ```
//!
//! **What is stored about a request:** the request effect as the handler returned it (method,
//! endpoint name, path with its query, its own headers, body) in the outbox row `key#n`, which is
//! also its `Idempotency-Key`. **About its response:** the status, the response headers, the
//! body (JSON, or the text as a string) and the number of attempts, with `Set-Cookie`, echoed
//! `Authorization`, `Proxy-Authorization` and `Cookie`, and the endpoint's secret headers reading
//! `[redacted]`; any credential of the endpoint that the server echoed back, in a header or the
//! body, is replaced by `[redacted]` too. A failure is stored as text: the status and the start
//! of the body (scrubbed the same way), or the transport error. Tracing spans carry the key, the
//! method, the endpoint, the path, the attempt and the status, never a header value.
//!
//! **What is never stored:** the endpoint's credentials, whether header values, passwords,
//! bearer tokens or client keys. They are added to each attempt as it is sent and exist only in
//! the configuration and the client's memory; `Debug` shows `[redacted]`, and errors name a
//! header or an environment variable, never a value. A base URL with a user name or password is
//! refused, and so are credentials over plain `http` to a host that is not loopback (unless the
//! endpoint allows it). The executor refuses, before anything is written, a request effect that
//! sets `Authorization`, `Proxy-Authorization`, `Cookie` or a secret header of its endpoint
//! ([`ValidationError::CredentialHeader`](executor::ValidationError::CredentialHeader)), and a
//! request to an endpoint the client does not know
//! ([`ValidationError::UnknownEndpoint`](executor::ValidationError::UnknownEndpoint)).
//!
//! **What it cannot tell apart:** a secret a handler puts into a path, a query string, a body or
//! a header that is not declared secret is data like any other, and is stored as such. Keep
//! credentials out of handlers, and declare headers that carry them with
//! [`Endpoint::with_secret_header`](http::Endpoint::with_secret_header). Credentials shorter than
//! 6 bytes are not searched for in response bodies. An after-requests hook sees the responses
//! as they were recorded, masked. Snapshots taken with the testing kit mask credential fields
//! (`authorization`, `cookie`, `set-cookie`, names ending in `token`, `secret`, `password`,
//! `api-key`) and every other occurrence of their values.
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
//! - `postgres`: the [`PostgresStore`](postgres::PostgresStore) on PostgreSQL (tokio-postgres,
//!   deadpool-postgres), for many worker processes on many machines; `postgres-tls` adds TLS to
//!   the server through rustls.
//! - `testing`: the snapshot and assertion helpers of [`testing`](crate#4-tests), and the test
//!   harness (`testing::harness`: a handler through the real executor on a temporary store).
//! - `metrics` (default): counters, gauges and histograms through the `metrics` facade; see
//!   [`metrics`] for the names.
//! - `catalogue`: the handler catalogue as JSON Schema and a Mermaid diagram
//!   (`catalogue::Catalogue`).

#[allow(unused_extern_crates)]
extern crate self as effects_core;

#[cfg(feature = "catalogue")]
pub mod catalogue;
pub mod datom;
pub mod effects;
pub mod executor;
pub mod handler;
pub mod http;
pub mod message;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "postgres")]
pub mod postgres;
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
