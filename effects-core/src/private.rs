//! Runtime helpers for generated code. Not a public API: names and signatures change without
//! notice.

use std::fmt::{Display, Write as _};

use serde::Serialize;
use serde_json::Value;

pub use ::serde;
pub use ::serde_json;

#[cfg(feature = "testing")]
pub use ::insta;

pub use crate::schema::NonEmpty;

/// Typestate marker: a builder slot that has not been filled.
#[derive(Debug)]
pub enum Unset {}

/// Typestate marker: a builder slot that has been filled.
#[derive(Debug)]
pub enum Set {}

/// What a payload, an attribute value or an identity needs: a `Serialize` form, turned into JSON.
/// Generated code names the type at the user's field (or struct), so a type that is not
/// `Serialize` is reported there, once, in these words rather than as a bound of a helper.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not implement `serde::Serialize`, and effects hold it as JSON",
    label = "not `Serialize`",
    note = "derive it with `#[derive(serde::Serialize)]` on `{Self}`, or use a type that implements `serde::Serialize`"
)]
pub trait Json {
    /// The JSON form.
    fn json(&self) -> Result<Value, serde_json::Error>;
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> Json for T {
    #[inline]
    fn json(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }
}

/// The JSON form of a payload or attribute value.
///
/// # Panics
/// If `T`'s `Serialize` implementation fails or produces something JSON cannot hold (a map with
/// non-string keys). That is a bug in the payload type, found the first time a handler builds
/// the effect, long before the executor sees it.
#[track_caller]
pub fn to_value<T: Json + ?Sized>(value: &T, type_name: &str, what: &str) -> Value {
    match value.json() {
        Ok(v) => v,
        Err(e) => panic!("{what} of `{type_name}` cannot be represented as JSON: {e}"),
    }
}

/// Moves a value into its JSON form when it is already one (`String`, `Value`), serializes it
/// otherwise. Generated code calls `IntoValue(x).into_value(to_value::<T>, ..)` with both traits
/// in scope: method resolution picks [`MoveIntoValue`] for the by-value receivers it is
/// implemented for and falls back to [`SerializeIntoValue`] on the auto-referenced receiver for
/// everything else. The serializing function is passed in, so the only `Serialize` requirement
/// is the one `to_value::<T>` states where the generated code names `T`.
pub struct IntoValue<T>(pub T);

/// How [`IntoValue`] serializes: `to_value::<T>`.
pub type ToValue<T> = fn(&T, &str, &str) -> Value;

/// The moving half of [`IntoValue`].
pub trait MoveIntoValue<T> {
    /// The JSON value, moved.
    fn into_value(self, serialize: ToValue<T>, type_name: &str, what: &str) -> Value;
}

impl MoveIntoValue<String> for IntoValue<String> {
    #[inline]
    fn into_value(self, _: ToValue<String>, _: &str, _: &str) -> Value {
        Value::String(self.0)
    }
}

impl MoveIntoValue<Value> for IntoValue<Value> {
    #[inline]
    fn into_value(self, _: ToValue<Value>, _: &str, _: &str) -> Value {
        self.0
    }
}

/// The serializing half of [`IntoValue`].
pub trait SerializeIntoValue<T> {
    /// The JSON value, serialized.
    fn into_value(self, serialize: ToValue<T>, type_name: &str, what: &str) -> Value;
}

impl<T> SerializeIntoValue<T> for &IntoValue<T> {
    #[inline]
    #[track_caller]
    fn into_value(self, serialize: ToValue<T>, type_name: &str, what: &str) -> Value {
        serialize(&self.0, type_name, what)
    }
}

/// Moves a partition key out of a `String` field, formats any other `Display` field.
pub struct IntoKey<T>(pub T);

/// The moving half of [`IntoKey`].
pub trait MoveIntoKey {
    /// The key, moved.
    fn into_key(self) -> String;
}

impl MoveIntoKey for IntoKey<String> {
    #[inline]
    fn into_key(self) -> String {
        self.0
    }
}

/// The formatting half of [`IntoKey`].
pub trait DisplayIntoKey {
    /// The key, formatted.
    fn into_key(self) -> String;
}

impl<T: Display> DisplayIntoKey for &IntoKey<T> {
    #[inline]
    fn into_key(self) -> String {
        self.0.to_string()
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

/// The type `effects![A | B]` expands to when `#[effect_handler]` is missing: erased effects,
/// with the compile error carried in the const argument.
pub trait Erased<const N: usize> {
    /// Always [`Effects`](crate::Effects).
    type Effects;
}

impl<const N: usize> Erased<N> for () {
    type Effects = crate::Effects;
}

/// What a business key (`#[effect_handler(key = ..)]`) can be made of.
#[diagnostic::on_unimplemented(
    message = "a business key is text or a number, and `{Self}` is neither",
    label = "cannot be a business key",
    note = "point `key = ..` at a field that implements `Display` (a `String`, a number, an id type with `Display`)"
)]
pub trait BusinessKey {
    /// The key as text.
    fn business_key(&self) -> String;
}

impl<T: Display + ?Sized> BusinessKey for T {
    fn business_key(&self) -> String {
        self.to_string()
    }
}

/// The text of a business key.
pub fn business_key_part<T: BusinessKey + ?Sized>(value: &T) -> String {
    value.business_key()
}
