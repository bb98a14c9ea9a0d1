//! Schemas: the declared shape of a handler's effects, checked at compile time by the generated
//! builders and at run time for effects that arrive from outside.

use std::fmt;

use serde::Serialize;

use crate::datom::DatomEffect;
use crate::effects::Effects;
use crate::message::MessageEffect;
use crate::request::{Method, RequestEffect, path_matches};

/// A schema declared with [`effects!`](crate::effects!): a typed value that turns into
/// [`Effects`] and knows its own [`Shape`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an effects schema",
    label = "not declared with `effects!`",
    note = "declare it: `effects! {{ pub {Self} {{ datoms: [...], messages: [...] }} }}`, or use the built-in `Empty`"
)]
pub trait Schema {
    /// The declared shape.
    const SHAPE: &'static Shape;

    /// The erased effects, without consuming the value.
    fn to_effects(&self) -> Effects;

    /// The erased effects, moving what can be moved; `Effects::from(schema)` calls it.
    fn into_effects(self) -> Effects
    where
        Self: Sized;

    /// Checks effects that arrived from outside (decoded from a message, say) against this
    /// schema's shape.
    fn validate(effects: &Effects) -> Result<(), ShapeError> {
        Self::SHAPE.validate(effects)
    }
}

/// Every schema converts into its erased effects (through [`Schema::into_effects`]), so
/// `effects.into()` works for any of them; one impl here rather than one per declared schema.
impl<S: Schema> From<S> for Effects {
    #[inline]
    fn from(schema: S) -> Self {
        schema.into_effects()
    }
}

/// How many effects a slot takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cardinality {
    /// Exactly one.
    One,
    /// Zero or one.
    Optional,
    /// Any number, zero included.
    Many,
    /// One or more.
    AtLeastOne,
}

impl Cardinality {
    /// The keyword that declares it in `effects!`.
    pub const fn keyword(self) -> &'static str {
        match self {
            Cardinality::One => "one",
            Cardinality::Optional => "optional",
            Cardinality::Many => "many",
            Cardinality::AtLeastOne => "at_least_one",
        }
    }

    /// Whether `count` effects fit.
    pub const fn admits(self, count: usize) -> bool {
        match self {
            Cardinality::One => count == 1,
            Cardinality::Optional => count <= 1,
            Cardinality::Many => true,
            Cardinality::AtLeastOne => count >= 1,
        }
    }

    const fn expectation(self) -> &'static str {
        match self {
            Cardinality::One => "exactly 1",
            Cardinality::Optional => "at most 1",
            Cardinality::Many => "any number",
            Cardinality::AtLeastOne => "at least 1",
        }
    }
}

/// The three kinds of effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Database writes.
    Datoms,
    /// Outgoing HTTP requests.
    Requests,
    /// Outgoing broker messages.
    Messages,
}

impl Kind {
    /// The key that declares it in `effects!`: `datoms`, `requests` or `messages`.
    pub const fn key(self) -> &'static str {
        match self {
            Kind::Datoms => "datoms",
            Kind::Requests => "requests",
            Kind::Messages => "messages",
        }
    }

    const fn singular(self) -> &'static str {
        match self {
            Kind::Datoms => "datom",
            Kind::Requests => "request",
            Kind::Messages => "message",
        }
    }
}

/// Which erased effects belong to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Matcher {
    /// Datoms on entities addressed by `identity` whose attributes are among `attributes`.
    Datom {
        /// The identity attribute, `card/id`.
        identity: &'static str,
        /// The attributes the type may assert.
        attributes: &'static [&'static str],
    },
    /// Requests with this method and endpoint whose path fits the template.
    Request {
        /// The method.
        method: Method,
        /// The endpoint's name.
        endpoint: &'static str,
        /// The path template.
        path: &'static str,
    },
    /// Messages on this topic.
    Message {
        /// The topic.
        topic: &'static str,
    },
}

impl Matcher {
    /// The kind of effect it matches.
    pub const fn kind(&self) -> Kind {
        match self {
            Matcher::Datom { .. } => Kind::Datoms,
            Matcher::Request { .. } => Kind::Requests,
            Matcher::Message { .. } => Kind::Messages,
        }
    }

    fn matches_datom(&self, d: &DatomEffect) -> Option<bool> {
        match *self {
            Matcher::Datom {
                identity,
                attributes,
            } if d.entity.attribute == identity
                && d.attributes
                    .keys()
                    .all(|a| attributes.contains(&a.as_str())) =>
            {
                // Some(true) when the datom carries every attribute: the best fit.
                Some(d.attributes.len() == attributes.len())
            }
            _ => None,
        }
    }

    fn matches_request(&self, r: &RequestEffect) -> bool {
        matches!(*self, Matcher::Request { method, endpoint, path }
            if r.method == method && r.endpoint == endpoint && path_matches(path, &r.path))
    }

    fn matches_message(&self, m: &MessageEffect) -> bool {
        matches!(*self, Matcher::Message { topic } if m.topic == topic)
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Datom {
                identity,
                attributes,
            } => write!(f, "[{identity} ..] {{{}}}", attributes.join(", ")),
            Matcher::Request {
                method,
                endpoint,
                path,
            } => write!(f, "{method} {endpoint} {path}"),
            Matcher::Message { topic } => write!(f, "topic {topic}"),
        }
    }
}

/// One slot of a schema: `one BlockedCard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SlotShape {
    /// The slot's name: its setter and field (`blocked_card`).
    pub name: &'static str,
    /// The payload type as written in the schema (`BlockedCard`).
    pub type_name: &'static str,
    /// How many it takes.
    pub cardinality: Cardinality,
    /// Which erased effects belong to it.
    pub matcher: Matcher,
}

/// The static description of a schema, generated by `effects!`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// The schema's name.
    pub name: &'static str,
    /// The schema's doc comment.
    pub doc: &'static str,
    /// Datom slots, in declaration order.
    pub datoms: &'static [SlotShape],
    /// Request slots, in declaration order.
    pub requests: &'static [SlotShape],
    /// Message slots, in declaration order.
    pub messages: &'static [SlotShape],
    /// The schemas it declares it can absorb with `merge`.
    pub merges: &'static [&'static str],
}

impl Shape {
    /// The slots of one kind.
    pub const fn slots(&self, kind: Kind) -> &'static [SlotShape] {
        match kind {
            Kind::Datoms => self.datoms,
            Kind::Requests => self.requests,
            Kind::Messages => self.messages,
        }
    }

    /// Checks that every effect belongs to a slot and every slot holds as many as its
    /// cardinality allows.
    ///
    /// ```
    /// use effects_core::{effects, Datom, Effects, Schema};
    ///
    /// #[derive(Datom)]
    /// #[datom(entity = "card")]
    /// pub struct BlockedCard {
    ///     #[datom(id)]
    ///     pub id: String,
    ///     pub status: String,
    /// }
    ///
    /// effects! {
    ///     pub BlockCard { datoms: [one BlockedCard] }
    /// }
    ///
    /// let err = BlockCard::validate(&Effects::new()).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "`BlockCard` slot `blocked_card` (one BlockedCard) takes exactly 1 datom, got 0"
    /// );
    /// ```
    pub fn validate(&self, effects: &Effects) -> Result<(), ShapeError> {
        let mut counts = [
            vec![0usize; self.datoms.len()],
            vec![0usize; self.requests.len()],
            vec![0usize; self.messages.len()],
        ];
        for (index, d) in effects.datoms.iter().enumerate() {
            let mut found = None;
            for (slot, shape) in self.datoms.iter().enumerate() {
                match shape.matcher.matches_datom(d) {
                    Some(true) => {
                        found = Some(slot);
                        break;
                    }
                    Some(false) if found.is_none() => found = Some(slot),
                    _ => {}
                }
            }
            let slot = found.ok_or_else(|| ShapeError::Unmatched {
                schema: self.name,
                kind: Kind::Datoms,
                index,
                effect: format!(
                    "{} {{{}}}",
                    d.entity,
                    d.attributes.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })?;
            counts[0][slot] += 1;
        }
        for (index, r) in effects.requests.iter().enumerate() {
            let slot = self
                .requests
                .iter()
                .position(|s| s.matcher.matches_request(r))
                .ok_or_else(|| ShapeError::Unmatched {
                    schema: self.name,
                    kind: Kind::Requests,
                    index,
                    effect: format!("{} {} {}", r.method, r.endpoint, r.path),
                })?;
            counts[1][slot] += 1;
        }
        for (index, m) in effects.messages.iter().enumerate() {
            let slot = self
                .messages
                .iter()
                .position(|s| s.matcher.matches_message(m))
                .ok_or_else(|| ShapeError::Unmatched {
                    schema: self.name,
                    kind: Kind::Messages,
                    index,
                    effect: format!("topic {}", m.topic),
                })?;
            counts[2][slot] += 1;
        }
        for (kind, counts) in [Kind::Datoms, Kind::Requests, Kind::Messages]
            .into_iter()
            .zip(counts)
        {
            for (slot, count) in self.slots(kind).iter().zip(counts) {
                if !slot.cardinality.admits(count) {
                    return Err(ShapeError::Count {
                        schema: self.name,
                        kind,
                        slot: slot.name,
                        type_name: slot.type_name,
                        cardinality: slot.cardinality,
                        count,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Erased effects that do not fit a schema.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// An effect belongs to no slot.
    #[error("{kind}[{index}] ({effect}) fits no slot of `{schema}`", kind = kind.key())]
    Unmatched {
        /// The schema.
        schema: &'static str,
        /// The effect's kind.
        kind: Kind,
        /// Its index among the effects of its kind.
        index: usize,
        /// What it is.
        effect: String,
    },
    /// A slot holds too many or too few.
    #[error(
        "`{schema}` slot `{slot}` ({card} {type_name}) takes {expected} {what}, got {count}",
        card = cardinality.keyword(),
        expected = cardinality.expectation(),
        what = kind.singular()
    )]
    Count {
        /// The schema.
        schema: &'static str,
        /// The slot's kind.
        kind: Kind,
        /// The slot.
        slot: &'static str,
        /// Its payload type.
        type_name: &'static str,
        /// Its cardinality.
        cardinality: Cardinality,
        /// How many effects it got.
        count: usize,
    },
}

/// One or more values: the field type of an `at_least_one` slot. It can never be empty.
///
/// ```
/// use effects_core::NonEmpty;
///
/// let mut v = NonEmpty::new(1);
/// v.push(2);
/// assert_eq!(v.as_slice(), &[1, 2]);
/// assert!(NonEmpty::<i32>::from_vec(vec![]).is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NonEmpty<T> {
    items: Vec<T>,
}

impl<T> NonEmpty<T> {
    /// One value.
    pub fn new(first: T) -> Self {
        NonEmpty { items: vec![first] }
    }

    /// The values, or `None` when `items` is empty.
    pub fn from_vec(items: Vec<T>) -> Option<Self> {
        (!items.is_empty()).then_some(NonEmpty { items })
    }

    /// Adds one more.
    pub fn push(&mut self, value: T) {
        self.items.push(value);
    }

    /// The first value.
    pub fn first(&self) -> &T {
        &self.items[0]
    }

    /// The values as a slice, never empty.
    pub fn as_slice(&self) -> &[T] {
        &self.items
    }

    /// The values as a `Vec`, never empty.
    pub fn into_vec(self) -> Vec<T> {
        self.items
    }
}

impl<T> std::ops::Deref for NonEmpty<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T> Extend<T> for NonEmpty<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        self.items.extend(iter);
    }
}

impl<T> IntoIterator for NonEmpty<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a NonEmpty<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

/// Marks the datoms kind in [`Absorbs`].
#[derive(Debug)]
pub enum Datoms {}
/// Marks the requests kind in [`Absorbs`].
#[derive(Debug)]
pub enum Requests {}
/// Marks the messages kind in [`Absorbs`].
#[derive(Debug)]
pub enum Messages {}

/// A schema with a `many` or `at_least_one` slot for `T` effects of kind `K`: it can take
/// more of them when another schema is merged into it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot absorb more `{T}`: it has no `many {T}` or `at_least_one {T}` slot",
    label = "`{Self}` cannot absorb this",
    note = "declare the slot `many {T}` in `{Self}`, or merge something without `{T}` effects"
)]
pub trait Absorbs<T, K> {
    /// Adds one more.
    fn absorb(&mut self, value: T);
}

/// A schema whose every effect fits a slot of `Target` that takes any number: merging it into
/// `Target` loses nothing and breaks no cardinality.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be merged into `{Target}`",
    label = "`{Target}` has no slot for some of `{Self}`'s effects",
    note = "every effect of `{Self}` needs a `many` or `at_least_one` slot of its type in `{Target}`"
)]
pub trait MergeInto<Target> {
    /// Moves every effect of `self` into `target`.
    fn merge_into(self, target: &mut Target);
}

/// No effects at all: the schema of a handler that decided to do nothing.
///
/// ```
/// use effects_core::{Effects, Empty};
///
/// assert!(Effects::from(Empty).is_empty());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Empty;

impl Empty {
    /// `Empty`, for symmetry with generated builders.
    pub const fn new() -> Self {
        Empty
    }
}

impl Serialize for Empty {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Effects::new().serialize(s)
    }
}

impl Schema for Empty {
    fn into_effects(self) -> Effects {
        Effects::new()
    }

    const SHAPE: &'static Shape = &Shape {
        name: "Empty",
        doc: "No effects at all.",
        datoms: &[],
        requests: &[],
        messages: &[],
        merges: &[],
    };

    fn to_effects(&self) -> Effects {
        Effects::new()
    }
}

impl<T> MergeInto<T> for Empty {
    fn merge_into(self, _: &mut T) {}
}
