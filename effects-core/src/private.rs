//! Runtime helpers for generated code. Not a public API: names and signatures change without
//! notice.

use std::fmt::{Display, Write as _};

use serde::Serialize;
use serde_json::Value;

pub use ::serde;
pub use ::serde_json;

pub use crate::schema::NonEmpty;

/// Typestate marker: a builder slot that has not been filled.
#[derive(Debug)]
pub enum Unset {}

/// Typestate marker: a builder slot that has been filled.
#[derive(Debug)]
pub enum Set {}

/// The JSON form of a payload or attribute value.
///
/// # Panics
/// If `T`'s `Serialize` implementation fails or produces something JSON cannot hold (a map with
/// non-string keys). That is a bug in the payload type, found the first time a handler builds
/// the effect, long before the executor sees it.
#[track_caller]
pub fn to_value<T: Serialize + ?Sized>(value: &T, type_name: &str, what: &str) -> Value {
    match serde_json::to_value(value) {
        Ok(v) => v,
        Err(e) => panic!("{what} of `{type_name}` cannot be represented as JSON: {e}"),
    }
}

/// Appends one path segment, percent-encoding everything but RFC 3986's unreserved characters.
pub fn push_segment(path: &mut String, value: &dyn Display) {
    let raw = value.to_string();
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            path.push(char::from(b));
        } else {
            let _ = write!(path, "%{b:02X}");
        }
    }
}

/// Called where a builder's typestate guarantees a slot is filled.
#[cold]
#[track_caller]
pub fn unreachable_unset(schema: &str, slot: &str) -> ! {
    unreachable!("builder of `{schema}` reached build() with slot `{slot}` unset")
}
