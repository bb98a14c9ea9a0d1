use cards::{BlockCard, Card, CardStatus};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn block(card: &mut Card) -> effects![BlockCard | Empty] {
    card.status = CardStatus::Blocked;
    Empty.into()
}

fn main() {}
