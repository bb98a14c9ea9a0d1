//! The erased effects value, merge and conflict detection.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datom::{DatomEffect, LookupRef, Op};
use crate::message::MessageEffect;
use crate::request::RequestEffect;

/// Everything a handler asks the world to do, as plain data: datoms to write, requests to send
/// and messages to publish, each in order.
///
/// `Effects::default()` is empty. [`Effects::merge`] appends kind by kind and never drops or
/// overwrites anything; it is associative and has the empty value as identity.
///
/// ```
/// use effects_core::{Effects, MessageEffect};
/// use serde_json::json;
///
/// let a = Effects::from(MessageEffect::new("t", json!(1)));
/// let b = Effects::from(MessageEffect::new("t", json!(2)));
/// let both = a.merge(b);
/// assert_eq!(both.messages.len(), 2);
/// assert_eq!(both.messages[1].payload, json!(2));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effects {
    /// Database writes.
    #[serde(default)]
    pub datoms: Vec<DatomEffect>,
    /// Outgoing HTTP requests.
    #[serde(default)]
    pub requests: Vec<RequestEffect>,
    /// Outgoing broker messages.
    #[serde(default)]
    pub messages: Vec<MessageEffect>,
}

impl Effects {
    /// No effects.
    pub const fn new() -> Self {
        Effects {
            datoms: Vec::new(),
            requests: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.datoms.is_empty() && self.requests.is_empty() && self.messages.is_empty()
    }

    /// The total number of effects of every kind.
    pub fn len(&self) -> usize {
        self.datoms.len() + self.requests.len() + self.messages.len()
    }

    /// `self` followed by `other`, kind by kind. Nothing is dropped or overwritten, even when
    /// datoms conflict: call [`Effects::check_conflicts`] (the executor does) to find those.
    #[must_use]
    pub fn merge(mut self, other: impl Into<Effects>) -> Effects {
        self.append(other.into());
        self
    }

    /// Appends `other` to `self`, kind by kind.
    pub fn append(&mut self, mut other: Effects) {
        self.datoms.append(&mut other.datoms);
        self.requests.append(&mut other.requests);
        self.messages.append(&mut other.messages);
    }

    /// Finds the first pair of datoms that disagree: the same entity and attribute given
    /// different values, or one value both asserted and retracted.
    ///
    /// ```
    /// use effects_core::{DatomEffect, Effects, LookupRef};
    /// use serde_json::json;
    ///
    /// let card = LookupRef::new("card/id", "c1");
    /// let effects = Effects::from(DatomEffect::assert(card.clone(), [("card/status", json!("blocked"))]))
    ///     .merge(DatomEffect::assert(card, [("card/status", json!("active"))]));
    /// let err = effects.check_conflicts().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "conflicting datoms on [card/id \"c1\"]: datoms[0] asserts card/status = \"blocked\" \
    ///      but datoms[1] asserts card/status = \"active\""
    /// );
    /// ```
    pub fn check_conflicts(&self) -> Result<(), ConflictError> {
        // (entity attribute, entity value in canonical form, attribute) -> first (index, op, value)
        let mut seen: BTreeMap<(&str, String, &str), (usize, Op, &Value)> = BTreeMap::new();
        for (index, datom) in self.datoms.iter().enumerate() {
            let entity_key = canonical_json(&datom.entity.value);
            for (attribute, value) in &datom.attributes {
                let slot = (
                    datom.entity.attribute.as_str(),
                    entity_key.clone(),
                    attribute.as_str(),
                );
                match seen.get(&slot) {
                    None => {
                        seen.insert(slot, (index, datom.op, value));
                    }
                    Some(&(first, op, first_value)) => {
                        let agree = if op == datom.op {
                            // Two assertions of one attribute must agree; retractions of
                            // different values are independent.
                            op == Op::Retract || first_value == value
                        } else {
                            first_value != value
                        };
                        if !agree {
                            return Err(ConflictError {
                                entity: datom.entity.clone(),
                                attribute: attribute.clone(),
                                first: Box::new(DatomAt {
                                    index: first,
                                    op,
                                    value: first_value.clone(),
                                }),
                                second: Box::new(DatomAt {
                                    index,
                                    op: datom.op,
                                    value: value.clone(),
                                }),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The canonical JSON text of these effects: object keys sorted, no whitespace. Equal values
    /// give identical text whatever features other crates enable in `serde_json`.
    pub fn canonical_json(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_else(|e| {
            // Every field is a String, a map with String keys or a serde_json::Value, which
            // always serialize.
            unreachable!("Effects always serialize to JSON: {e}")
        });
        canonical_json(&value)
    }
}

impl From<DatomEffect> for Effects {
    fn from(d: DatomEffect) -> Self {
        Effects {
            datoms: vec![d],
            ..Effects::new()
        }
    }
}

impl From<RequestEffect> for Effects {
    fn from(r: RequestEffect) -> Self {
        Effects {
            requests: vec![r],
            ..Effects::new()
        }
    }
}

impl From<MessageEffect> for Effects {
    fn from(m: MessageEffect) -> Self {
        Effects {
            messages: vec![m],
            ..Effects::new()
        }
    }
}

impl<E: Into<Effects>> FromIterator<E> for Effects {
    fn from_iter<I: IntoIterator<Item = E>>(iter: I) -> Self {
        let mut all = Effects::new();
        for e in iter {
            all.append(e.into());
        }
        all
    }
}

/// One side of a [`ConflictError`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatomAt {
    /// The datom's index in [`Effects::datoms`].
    pub index: usize,
    /// Whether it asserts or retracts.
    pub op: Op,
    /// The value it gives the attribute.
    pub value: Value,
}

impl fmt::Display for DatomAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.op {
            Op::Assert => "asserts",
            Op::Retract => "retracts",
        };
        write!(f, "datoms[{}] {verb}", self.index)
    }
}

/// Two datoms give one attribute of one entity different values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "conflicting datoms on {entity}: {first} {attribute} = {first_value} but {second} {attribute} = {second_value}",
    first_value = first.value,
    second_value = second.value
)]
pub struct ConflictError {
    /// The entity both datoms address.
    pub entity: LookupRef,
    /// The attribute they disagree on.
    pub attribute: String,
    /// The earlier datom.
    pub first: Box<DatomAt>,
    /// The later datom.
    pub second: Box<DatomAt>,
}

/// JSON text with object keys sorted at every level and no whitespace.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    // Only JSON text was written: strings through serde_json's escaper, the rest ASCII.
    String::from_utf8(out).unwrap_or_else(|e| unreachable!("canonical JSON is UTF-8: {e}"))
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // Already sorted unless serde_json's `preserve_order` is enabled by some crate.
            if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&**k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing a string, number, bool or null into a Vec cannot fail.
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        unreachable!("a JSON scalar always serializes: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_is_sorted_compact_and_stable() {
        // Run hashes are stored: this text must never change for the same value.
        let v = json!({"b": 1, "a": [true, null, "x\"y"], "c": {"z": 1.5, "y": "é\n"}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":[true,null,"x\"y"],"b":1,"c":{"y":"é\n","z":1.5}}"#
        );
        let effects = Effects::from(MessageEffect::new("t", json!({"k": 2, "a": 1})).with_key("p"));
        assert_eq!(
            effects.canonical_json(),
            r#"{"datoms":[],"messages":[{"key":"p","payload":{"a":1,"k":2},"topic":"t"}],"requests":[]}"#
        );
    }
}
