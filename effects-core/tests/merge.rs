//! `Effects::merge` is associative, has the empty value as identity, keeps order and never
//! drops anything; conflict detection finds exactly the disagreeing datoms.

use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, Op, RequestEffect};
use proptest::prelude::*;
use serde_json::{Value, json};

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn datom() -> impl Strategy<Value = DatomEffect> {
    (
        "[a-c]",
        0u8..4,
        prop::bool::ANY,
        prop::collection::btree_map("[a-c]/[x-z]", value(), 0..3),
    )
        .prop_map(|(ns, id, retract, attributes)| DatomEffect {
            entity: LookupRef::new(format!("{ns}/id"), json!(id)),
            op: if retract { Op::Retract } else { Op::Assert },
            attributes,
            expected: Default::default(),
        })
}

fn request() -> impl Strategy<Value = RequestEffect> {
    (
        0usize..Method::ALL.len(),
        "[a-z]{1,5}",
        "/[a-z]{0,5}",
        prop::option::of(value()),
    )
        .prop_map(|(m, endpoint, path, body)| RequestEffect {
            body,
            ..RequestEffect::new(Method::ALL[m], endpoint, path)
        })
}

fn message() -> impl Strategy<Value = MessageEffect> {
    ("[a-z]{1,5}", prop::option::of("[a-z]{1,3}"), value()).prop_map(|(topic, key, payload)| {
        MessageEffect {
            key,
            ..MessageEffect::new(topic, payload)
        }
    })
}

fn effects() -> impl Strategy<Value = Effects> {
    (
        prop::collection::vec(datom(), 0..4),
        prop::collection::vec(request(), 0..3),
        prop::collection::vec(message(), 0..4),
    )
        .prop_map(|(datoms, requests, messages)| Effects {
            datoms,
            requests,
            messages,
        })
}

proptest! {
    #[test]
    fn merge_is_associative(a in effects(), b in effects(), c in effects()) {
        let left = a.clone().merge(b.clone()).merge(c.clone());
        let right = a.merge(b.merge(c));
        prop_assert_eq!(left, right);
    }

    #[test]
    fn empty_is_the_identity(a in effects()) {
        prop_assert_eq!(Effects::new().merge(a.clone()), a.clone());
        prop_assert_eq!(a.clone().merge(Effects::default()), a);
    }

    #[test]
    fn merge_appends_kind_by_kind_and_keeps_everything(a in effects(), b in effects()) {
        let m = a.clone().merge(b.clone());
        prop_assert_eq!(m.len(), a.len() + b.len());
        prop_assert_eq!(&m.datoms[..a.datoms.len()], &a.datoms[..]);
        prop_assert_eq!(&m.datoms[a.datoms.len()..], &b.datoms[..]);
        prop_assert_eq!(&m.requests[a.requests.len()..], &b.requests[..]);
        prop_assert_eq!(&m.messages[..a.messages.len()], &a.messages[..]);
    }

    #[test]
    fn canonical_json_round_trips_and_is_stable(a in effects()) {
        let text = a.canonical_json();
        let back: Effects = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &a);
        prop_assert_eq!(back.canonical_json(), text);
    }

    #[test]
    fn conflicts_are_found_exactly(a in effects()) {
        // Reference: any two assertions of one attribute with different values, or an
        // assertion and a retraction of the same value.
        let mut expected = false;
        for (i, x) in a.datoms.iter().enumerate() {
            for y in &a.datoms[i + 1..] {
                if x.entity != y.entity { continue; }
                for (attr, vx) in &x.attributes {
                    if let Some(vy) = y.attributes.get(attr) {
                        let clash = match (x.op, y.op) {
                            (Op::Assert, Op::Assert) => vx != vy,
                            (Op::Retract, Op::Retract) => false,
                            _ => vx == vy,
                        };
                        expected |= clash;
                    }
                }
            }
        }
        prop_assert_eq!(a.check_conflicts().is_err(), expected);
    }
}

#[test]
fn a_conflict_names_both_datoms() {
    let card = LookupRef::new("card/id", "c1");
    let effects = Effects::from(DatomEffect::assert(
        card.clone(),
        [("card/status", json!("blocked"))],
    ))
    .merge(DatomEffect::assert(
        LookupRef::new("card/id", "c2"),
        [("card/status", json!("active"))],
    ))
    .merge(DatomEffect::retract(
        card,
        [("card/status", json!("blocked"))],
    ));
    let err = effects.check_conflicts().unwrap_err();
    assert_eq!((err.first.index, err.second.index), (0, 2));
    assert_eq!(
        err.to_string(),
        "conflicting datoms on [card/id \"c1\"]: datoms[0] asserts card/status = \"blocked\" but \
         datoms[2] retracts card/status = \"blocked\""
    );
}
