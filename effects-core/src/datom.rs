//! Datoms: assertions and retractions of attributes on one entity.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A user type that becomes a datom: an assertion of attributes on one entity.
///
/// Implement it with `#[derive(Datom)]`:
///
/// ```
/// use effects_core::Datom;
///
/// #[derive(Datom)]
/// #[datom(entity = "card")]
/// pub struct BlockedCard {
///     #[datom(id)]
///     pub id: String,
///     pub status: String,
/// }
///
/// let datom = BlockedCard { id: "c1".into(), status: "blocked".into() }.to_datom();
/// assert_eq!(datom.entity.attribute, "card/id");
/// assert_eq!(datom.attributes["card/status"], "blocked");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a datom",
    label = "not a datom",
    note = "derive it: `#[derive(effects_core::Datom)] #[datom(entity = \"...\")]` with one `#[datom(id)]` field"
)]
pub trait Datom {
    /// The entity namespace, such as `card`.
    const ENTITY: &'static str;
    /// The identity attribute used in the lookup ref, such as `card/id`.
    const IDENTITY: &'static str;
    /// Every attribute this type may assert, namespaced (`card/status`), sorted.
    const ATTRIBUTES: &'static [&'static str];

    /// The erased datom.
    fn to_datom(&self) -> DatomEffect;

    /// The erased datom, moving what can be moved instead of copying it.
    fn into_datom(self) -> DatomEffect
    where
        Self: Sized,
    {
        self.to_datom()
    }

    crate::__private::slot_items!(
        datoms,
        crate::Matcher::Datom {
            identity: Self::IDENTITY,
            attributes: Self::ATTRIBUTES
        },
        |item| item.to_datom(),
        |item| item.into_datom()
    );
}

/// Whether a datom asserts or retracts its attributes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The attributes now hold these values.
    #[default]
    Assert,
    /// The attributes no longer hold these values.
    Retract,
}

impl Op {
    fn is_assert(&self) -> bool {
        *self == Op::Assert
    }
}

/// Addresses an entity by a unique attribute and its value, like Datomic's `[:card/id "c1"]`.
///
/// Serializes as a two-element array: `["card/id", "c1"]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(String, Value)", into = "(String, Value)")]
pub struct LookupRef {
    /// The identity attribute, namespaced: `card/id`.
    pub attribute: String,
    /// Its value.
    pub value: Value,
}

impl LookupRef {
    /// A lookup ref from an identity attribute and a value.
    pub fn new(attribute: impl Into<String>, value: impl Into<Value>) -> Self {
        LookupRef {
            attribute: attribute.into(),
            value: value.into(),
        }
    }

    /// The entity namespace: the part of the attribute before `/` (`card` for `card/id`).
    pub fn entity(&self) -> &str {
        self.attribute
            .split_once('/')
            .map_or(self.attribute.as_str(), |(ns, _)| ns)
    }
}

impl From<(String, Value)> for LookupRef {
    fn from((attribute, value): (String, Value)) -> Self {
        LookupRef { attribute, value }
    }
}

impl From<LookupRef> for (String, Value) {
    fn from(r: LookupRef) -> Self {
        (r.attribute, r.value)
    }
}

impl fmt::Display for LookupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} {}]", self.attribute, self.value)
    }
}

/// An erased datom: attribute values asserted (or retracted) on the entity a lookup ref names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatomEffect {
    /// The entity.
    pub entity: LookupRef,
    /// Assert (the default, omitted when serialized) or retract.
    #[serde(default, skip_serializing_if = "Op::is_assert")]
    pub op: Op,
    /// Namespaced attribute names (`card/status`) and their values, sorted by name.
    pub attributes: BTreeMap<String, Value>,
    /// Compare-and-set: the values some attributes must hold when the run commits (Datomic's
    /// `:db/cas`), by namespaced name. `null` means "holds no value". If any differs, the whole
    /// run is refused with [`RunError::Conflict`](crate::executor::RunError::Conflict) and
    /// nothing of it is written. Empty (the default, omitted when serialized) checks nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub expected: BTreeMap<String, Value>,
}

impl DatomEffect {
    /// An assertion of `attributes` on `entity`.
    pub fn assert(
        entity: LookupRef,
        attributes: impl IntoIterator<Item = (impl Into<String>, Value)>,
    ) -> Self {
        DatomEffect {
            entity,
            op: Op::Assert,
            attributes: attributes.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            expected: BTreeMap::new(),
        }
    }

    /// A retraction of `attributes` on `entity`.
    pub fn retract(
        entity: LookupRef,
        attributes: impl IntoIterator<Item = (impl Into<String>, Value)>,
    ) -> Self {
        DatomEffect {
            op: Op::Retract,
            ..DatomEffect::assert(entity, attributes)
        }
    }

    /// Makes this datom a compare-and-set: the run commits only if `attribute` (namespaced)
    /// holds `value` at that moment (`Value::Null`: holds no value). Otherwise the run is
    /// refused with [`RunError::Conflict`](crate::executor::RunError::Conflict) and nothing of
    /// it is written.
    ///
    /// ```
    /// use effects_core::{DatomEffect, LookupRef};
    /// use serde_json::json;
    ///
    /// // Debit 100 from an account that held 1 000 when the handler decided.
    /// let debit = DatomEffect::assert(LookupRef::new("account/id", "a1"), [("account/balance", json!(900))])
    ///     .expecting("account/balance", json!(1000));
    /// assert_eq!(debit.expected["account/balance"], json!(1000));
    /// ```
    #[must_use]
    pub fn expecting(mut self, attribute: impl Into<String>, value: Value) -> Self {
        self.expected.insert(attribute.into(), value);
        self
    }
}
