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

/// The type itself. A handler's union holds `<S as Same>::Type` in its variant `S`, not `S`:
/// the same type wherever a variant is built or matched, but not one rustc offers to wrap a
/// value in, so a forgotten `.into()` gets rustc's "call `Into::into`" help rather than
/// "try wrapping the expression in `XEffects::S`".
pub trait Same {
    /// `Self`.
    type Type: ?Sized;
}

impl<T: ?Sized> Same for T {
    type Type = T;
}

/// Typestate marker: a builder slot that has not been filled.
#[derive(Debug)]
pub enum Unset {}

/// Typestate marker: a builder slot that has been filled.
#[derive(Debug)]
pub enum Set {}

/// The bound a `one` or `optional` slot's setter puts on the slot's state, one trait per kind of
/// effect and amount, shared by every schema: `Unset` meets it, `Set` (a second call) does not,
/// and the message names the schema and the type. The error is reported at the second setter
/// call, so the message need not name the setter.
macro_rules! unset_bound {
    ($($(#[doc = $doc:literal])* $name:ident: $message:literal;)*) => {$(
        $(#[doc = $doc])*
        #[diagnostic::on_unimplemented(
            message = $message,
            label = "second `{Item}`",
            note = "to take several, declare the slot `many {Item}` or `at_least_one {Item}` in `{Schema}`"
        )]
        pub trait $name<Schema, Item> {}

        #[diagnostic::do_not_recommend]
        impl<Schema, Item> $name<Schema, Item> for Unset {}
    )*};
}

unset_bound! {
    /// A `one` datom slot not yet filled.
    OneDatomUnset: "`{Schema}` takes exactly one `{Item}` datom, and this call sets it a second time";
    /// An `optional` datom slot not yet filled.
    OptionalDatomUnset: "`{Schema}` takes at most one `{Item}` datom, and this call sets it a second time";
    /// A `one` request slot not yet filled.
    OneRequestUnset: "`{Schema}` takes exactly one `{Item}` request, and this call sets it a second time";
    /// An `optional` request slot not yet filled.
    OptionalRequestUnset: "`{Schema}` takes at most one `{Item}` request, and this call sets it a second time";
    /// A `one` message slot not yet filled.
    OneMessageUnset: "`{Schema}` takes exactly one `{Item}` message, and this call sets it a second time";
    /// An `optional` message slot not yet filled.
    OptionalMessageUnset: "`{Schema}` takes at most one `{Item}` message, and this call sets it a second time";
}

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

/// One slot's entry in a schema's `Shape`.
#[inline]
#[must_use]
pub const fn slot_shape(
    name: &'static str,
    type_name: &'static str,
    cardinality: crate::Cardinality,
    matcher: crate::Matcher,
) -> crate::SlotShape {
    crate::SlotShape {
        name,
        type_name,
        cardinality,
        matcher,
    }
}

/// The hidden items `Datom`, `Request` and `Message` each carry for generated code, which calls
/// them as `<T as __Datom>::__push_ref(..)` and the like, always at the user's type: a type in
/// the wrong list is one error there, in the words of the kind's own trait ("`Card` is not a
/// datom", "the trait `effects_core::Datom` is not implemented for `Card`"). Provided, so a
/// hand-written impl never sees them.
macro_rules! slot_items {
    ($field:ident, $matcher:expr, |$r:ident| $by_ref:expr, |$o:ident| $owned:expr) => {
        /// Which erased effects belong to a slot of this type.
        #[doc(hidden)]
        const __MATCHER: crate::Matcher = $matcher;

        /// Appends the erased form of one item, by reference.
        #[doc(hidden)]
        #[inline]
        fn __push_ref(&self, effects: &mut crate::Effects) {
            let $r = self;
            effects.$field.push($by_ref);
        }

        /// Appends the erased form of an optional item, by reference.
        #[doc(hidden)]
        #[inline]
        fn __push_ref_option(item: &Option<Self>, effects: &mut crate::Effects)
        where
            Self: Sized,
        {
            if let Some($r) = item {
                effects.$field.push($by_ref);
            }
        }

        /// Appends the erased form of each item, by reference.
        #[doc(hidden)]
        #[inline]
        fn __push_ref_slice(items: &[Self], effects: &mut crate::Effects)
        where
            Self: Sized,
        {
            effects.$field.reserve(items.len());
            for $r in items {
                effects.$field.push($by_ref);
            }
        }

        /// Appends the erased form of one item, moving it.
        #[doc(hidden)]
        #[inline]
        fn __push(self, effects: &mut crate::Effects)
        where
            Self: Sized,
        {
            let $o = self;
            effects.$field.push($owned);
        }

        /// Appends the erased form of an optional item, moving it.
        #[doc(hidden)]
        #[inline]
        fn __push_option(item: Option<Self>, effects: &mut crate::Effects)
        where
            Self: Sized,
        {
            if let Some($o) = item {
                effects.$field.push($owned);
            }
        }

        /// Appends the erased form of each item, moving them.
        #[doc(hidden)]
        #[inline]
        fn __push_vec(items: Vec<Self>, effects: &mut crate::Effects)
        where
            Self: Sized,
        {
            effects.$field.reserve(items.len());
            for $o in items {
                effects.$field.push($owned);
            }
        }
    };
}

pub(crate) use slot_items;

/// A message effect with no headers.
#[inline]
#[must_use]
pub fn message(topic: &str, key: Option<String>, payload: Value) -> crate::MessageEffect {
    crate::MessageEffect {
        topic: String::from(topic),
        key,
        headers: std::collections::BTreeMap::new(),
        payload,
    }
}

/// Moves every item of one slot into `target` (typed merge).
#[inline]
pub fn absorb<Target, T, K>(target: &mut Target, items: impl IntoIterator<Item = T>)
where
    Target: crate::Absorbs<T, K>,
{
    for item in items {
        target.absorb(item);
    }
}

/// A datom being built by `#[derive(Datom)]`: an assertion on the entity `identity = value`.
pub struct DatomParts(crate::DatomEffect);

impl DatomParts {
    /// An assertion with no attributes yet.
    #[inline]
    #[must_use]
    pub fn new(identity: &str, value: Value) -> Self {
        DatomParts(crate::DatomEffect {
            entity: crate::LookupRef {
                attribute: String::from(identity),
                value,
            },
            op: crate::Op::Assert,
            attributes: std::collections::BTreeMap::new(),
            expected: std::collections::BTreeMap::new(),
        })
    }

    /// Asserts the attribute `name`.
    #[inline]
    pub fn attribute(&mut self, name: &str, value: Value) {
        self.0.attributes.insert(String::from(name), value);
    }

    /// Expects the attribute `name` to have `value` when the run commits.
    #[inline]
    pub fn expected(&mut self, name: &str, value: Value) {
        self.0.expected.insert(String::from(name), value);
    }

    /// The datom.
    #[inline]
    #[must_use]
    pub fn finish(self) -> crate::DatomEffect {
        self.0
    }
}

/// The value of a filled `one` or `at_least_one` slot at `build()`.
#[inline]
#[track_caller]
pub fn filled<T>(value: Option<T>, schema: &str, slot: &str) -> T {
    match value {
        Some(value) => value,
        None => unreachable_unset(schema, slot),
    }
}

/// Short names for generated code, imported with one glob (`use ::effects_core::__private::names::*;`)
/// at the top of each generated block: `__Effects` in one token instead of
/// `::effects_core::Effects` in six, which the compiler then has less to read. Every name starts
/// with `__`, so the import shadows none of the user's names inside the block; a name spanned at
/// the user's token (`<T as __Datom>`) resolves through the same import, so an error there
/// stays at the user's token.
pub mod names {
    pub use super::serde::{Serialize as __Serialize, Serializer as __Serializer};
    pub use super::{
        DatomParts as __DatomParts, DisplayIntoKey as __DisplayIntoKey, IntoKey as __IntoKey,
        IntoValue as __IntoValue, MoveIntoKey as __MoveIntoKey, MoveIntoValue as __MoveIntoValue,
        OneDatomUnset as __OneDatomUnset, OneMessageUnset as __OneMessageUnset,
        OneRequestUnset as __OneRequestUnset, OptionalDatomUnset as __OptionalDatomUnset,
        OptionalMessageUnset as __OptionalMessageUnset,
        OptionalRequestUnset as __OptionalRequestUnset, SerializeIntoValue as __SerializeIntoValue,
        Set as __Set, Unset as __Unset, absorb as __absorb, filled as __filled,
        message as __message, slot_shape as __slot_shape, to_value as __to_value,
    };
    pub use crate::schema::{Datoms as __Datoms, Messages as __Messages, Requests as __Requests};
    pub use crate::{
        Absorbs as __Absorbs, Cardinality as __Cardinality, Datom as __Datom,
        DatomEffect as __DatomEffect, Effects as __Effects, MergeInto as __MergeInto,
        Message as __Message, MessageEffect as __MessageEffect, NonEmpty as __NonEmpty,
        Request as __Request, Schema as __Schema, Shape as __Shape,
    };
    pub use ::core::iter::IntoIterator as __IntoIterator;
    pub use ::core::marker::PhantomData as __PhantomData;
    pub use ::core::option::Option as __Option;
    pub use ::core::option::Option::{None as __None, Some as __Some};
    pub use ::core::result::Result as __Result;
    pub use ::std::string::ToString as __ToString;
    pub use ::std::vec::Vec as __Vec;
}
