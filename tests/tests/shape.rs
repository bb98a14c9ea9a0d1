//! Run-time validation of erased effects (decoded from outside) against a schema's shape.

mod cards_fixture;

use cards::{BlockAll, BlockCard, CardsBlockedNotify};
use cards_fixture::block_card;
use effects_core::{
    Cardinality, DatomEffect, Effects, Kind, LookupRef, MessageEffect, Schema, ShapeError,
};
use serde_json::json;

#[test]
fn typed_values_always_fit_their_own_shape() {
    BlockCard::validate(&block_card("c1").into()).unwrap();
    let all = BlockAll::builder()
        .cards_blocked_notify(CardsBlockedNotify {
            customer_id: "u1".into(),
            name: "Ana".into(),
        })
        .build()
        .merge(block_card("c1"))
        .merge(block_card("c2"));
    BlockAll::validate(&all.into()).unwrap();
}

#[test]
fn a_missing_effect_names_the_slot_and_the_count() {
    let mut effects: Effects = block_card("c1").into();
    effects.messages.clear();
    let err = BlockCard::validate(&effects).unwrap_err();
    assert_eq!(
        err,
        ShapeError::Count {
            schema: "BlockCard",
            kind: Kind::Messages,
            slot: "status_changed",
            type_name: "StatusChanged",
            cardinality: Cardinality::One,
            count: 0,
        }
    );
    assert_eq!(
        err.to_string(),
        "`BlockCard` slot `status_changed` (one StatusChanged) takes exactly 1 message, got 0"
    );
}

#[test]
fn too_many_effects_name_the_slot_and_the_count() {
    let effects = Effects::from(block_card("c1")).merge(block_card("c2"));
    assert_eq!(
        BlockCard::validate(&effects).unwrap_err().to_string(),
        "`BlockCard` slot `blocked_card` (one BlockedCard) takes exactly 1 datom, got 2"
    );
}

#[test]
fn an_effect_without_a_slot_is_named() {
    let effects = Effects::from(block_card("c1")).merge(MessageEffect::new("audit", json!({})));
    assert_eq!(
        BlockCard::validate(&effects).unwrap_err().to_string(),
        "messages[1] (topic audit) fits no slot of `BlockCard`"
    );
    let stray = Effects::from(block_card("c1")).merge(DatomEffect::assert(
        LookupRef::new("card/id", "c1"),
        [("card/limit", json!(10))],
    ));
    assert_eq!(
        BlockCard::validate(&stray).unwrap_err().to_string(),
        "datoms[1] ([card/id \"c1\"] {card/limit}) fits no slot of `BlockCard`"
    );
}

#[test]
fn shapes_describe_the_declaration() {
    let shape = BlockAll::SHAPE;
    assert_eq!(shape.name, "BlockAll");
    assert_eq!(shape.doc, "Blocking every card of a customer.");
    assert_eq!(shape.merges, ["BlockCard"]);
    let slots: Vec<_> = shape
        .messages
        .iter()
        .map(|s| (s.name, s.cardinality.keyword(), s.type_name))
        .collect();
    assert_eq!(
        slots,
        [
            ("status_changed", "many", "StatusChanged"),
            ("cards_blocked_notify", "one", "CardsBlockedNotify")
        ]
    );
}
