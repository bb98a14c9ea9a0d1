use cards::{BlockCard, BlockedCard, Card, StatusChanged};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn block(card: &Card) -> effects![BlockCard | Empty] {
    BlockCard::builder()
        .blocked_card(BlockedCard::from(card))
        .status_changed(StatusChanged::from(card))
        .build()
}

fn main() {}
