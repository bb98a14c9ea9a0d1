//! The talk's handlers, tested as what they are: pure functions from cards to effects.

use cards::{
    BlockAll, BlockAllHandler, BlockCard, BlockHandler, BlockedCard, Card, CardStatus,
    CardsBlockedNotify, Customer, StatusChanged, block, block_all,
};
use effects_core::testing::{assert_deterministic, assert_effects_eq, assert_replayable};
use effects_core::{Effects, Empty, Handler, assert_effects_snapshot};

fn card(id: &str, status: CardStatus) -> Card {
    Card {
        id: id.into(),
        customer_id: "u1".into(),
        status,
    }
}

fn ana() -> Customer {
    Customer {
        id: "u1".into(),
        name: "Ana".into(),
    }
}

#[test]
fn blocking_an_active_card() {
    assert_effects_snapshot!(block(&card("c1", CardStatus::Active)));
}

#[test]
fn blocking_a_blocked_card_does_nothing() {
    let effects = block(&card("c1", CardStatus::Blocked));
    assert_eq!(effects.variant(), "Empty");
    assert_effects_eq!(effects, Empty);
}

#[test]
fn blocking_is_exactly_one_datom_and_one_message() {
    let blocked = card("c1", CardStatus::Blocked);
    let expected = BlockCard::builder()
        .blocked_card(BlockedCard::from(&blocked))
        .status_changed(StatusChanged::from(&blocked))
        .build();
    assert_effects_eq!(block(&card("c1", CardStatus::Active)), expected);
}

#[test]
fn blocking_all_cards_of_a_customer() {
    let cards = [
        card("c1", CardStatus::Active),
        card("c2", CardStatus::Blocked),
        card("c3", CardStatus::Active),
        card("c4", CardStatus::Cancelled),
    ];
    assert_effects_snapshot!(block_all(&ana(), &cards));
}

#[test]
fn block_all_is_the_merge_of_block() {
    let cards = [
        card("c1", CardStatus::Active),
        card("c2", CardStatus::Active),
    ];
    let by_hand = BlockAll::builder()
        .cards_blocked_notify(CardsBlockedNotify::from(&ana()))
        .build()
        .merge(block(&cards[0]))
        .merge(block(&cards[1]));
    assert_effects_eq!(block_all(&ana(), &cards), by_hand);
    let erased = Effects::from(block_all(&ana(), &cards));
    assert_eq!((erased.datoms.len(), erased.messages.len()), (2, 3));
}

#[test]
fn handlers_are_deterministic_and_replayable() {
    assert_deterministic(|| block(&card("c1", CardStatus::Active)));
    assert_replayable(
        &BlockHandler,
        br#"{"id": "c1", "customer_id": "u1", "status": "active"}"#,
    );
    assert_replayable(
        &BlockAllHandler,
        br#"{"customer": {"id": "u1", "name": "Ana"},
             "cards": [{"id": "c1", "customer_id": "u1", "status": "active"}]}"#,
    );
}

#[test]
fn descriptors_name_the_handler_its_topic_input_and_schemas() {
    let d = BlockHandler::DESCRIPTOR;
    assert_eq!(
        (d.name, d.topic, d.input),
        ("block", Some("card-block-requested"), "Card")
    );
    let schemas: Vec<&str> = d.schemas.iter().map(|s| s.name).collect();
    assert_eq!(schemas, ["BlockCard", "Empty"]);
    let d = BlockAllHandler::DESCRIPTOR;
    assert_eq!((d.name, d.input), ("block_all", "BlockAllInput"));
}

#[test]
fn undecodable_input_is_a_clear_error() {
    let err = BlockHandler.decode(br#"{"id": "c1"}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`block` cannot decode its input `Card`: missing field `customer_id` at line 1 column 12"
    );
    let Err(err) = BlockAllHandler
        .decode(br#"{"customer": {"id": "u1", "name": "Ana"}, "cards": [], "extra": 1}"#)
    else {
        panic!("an unknown field is refused");
    };
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");
}
