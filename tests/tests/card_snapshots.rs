//! Snapshots of the card domain's effect values: the canonical form a reviewer reads.

mod cards_fixture;

use cards::{BlockAll, CardsBlockedNotify};
use cards_fixture::block_card;
use effects_core::{Effects, Empty};

#[test]
fn one_card() {
    insta::assert_yaml_snapshot!(block_card("c1"));
}

#[test]
fn block_all_merges_each_card() {
    let all = BlockAll::builder()
        .cards_blocked_notify(CardsBlockedNotify {
            customer_id: "u1".into(),
            name: "Ana".into(),
        })
        .build()
        .merge(block_card("c1"))
        .merge(block_card("c2"))
        .merge(Empty);
    insta::assert_yaml_snapshot!(all);
}

#[test]
fn empty() {
    insta::assert_yaml_snapshot!(Empty);
}

#[test]
fn serialization_is_canonical() {
    // Equal values give identical text, and the typed and erased forms serialize alike.
    let a = serde_json::to_string(&block_card("c1")).unwrap();
    let b = serde_json::to_string(&block_card("c1")).unwrap();
    assert_eq!(a, b);
    let erased: Effects = block_card("c1").into();
    assert_eq!(a, serde_json::to_string(&erased).unwrap());
    assert_eq!(
        erased.canonical_json(),
        Effects::from(block_card("c1")).canonical_json()
    );
}
