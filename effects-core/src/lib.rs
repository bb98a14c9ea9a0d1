//! Side effects as data.
//!
//! A domain handler is a pure function: it takes what it needs to decide and returns *effects*
//! — datoms to write, HTTP requests to send, broker messages to publish — as a typed value that
//! the compiler checks against a declared schema.

#[allow(unused_extern_crates)]
extern crate self as effects_core;

pub mod datom;
pub mod effects;
pub mod executor;
pub mod handler;
pub mod http;
pub mod message;
pub mod relay;
pub mod request;
pub mod schema;
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
