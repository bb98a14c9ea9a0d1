//! A handler's union is an enum whose variants hold the schemas themselves: code builds them,
//! matches them and uses the value inside as the schema, with no conversion.
#![deny(warnings)]

use cards::{BlockCard, Card, CardStatus};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn block(card: &Card) -> effects![BlockCard | Empty] {
    if card.can_block() {
        BlockEffects::BlockCard(
            BlockCard::builder()
                .blocked_card(cards::BlockedCard::from(card))
                .status_changed(cards::StatusChanged::from(&card.block()))
                .build(),
        )
    } else {
        BlockEffects::Empty(Empty)
    }
}

fn blocked(effects: BlockEffects) -> Option<BlockCard> {
    match effects {
        BlockEffects::BlockCard(schema) => {
            let _: &cards::BlockedCard = &schema.blocked_card;
            Some(schema)
        }
        BlockEffects::Empty(Empty) => None,
    }
}

fn main() {
    let card = Card { id: "c1".into(), customer_id: "u1".into(), status: CardStatus::Active };
    assert!(blocked(block(&card)).is_some());
}
