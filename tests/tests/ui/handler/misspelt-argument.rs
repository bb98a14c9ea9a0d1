use cards::{BlockCard, Card};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler(topik = "card-block-requested")]
pub fn block(card: &Card) -> effects![BlockCard | Empty] {
    if card.can_block() {
        return Empty.into();
    }
    Empty.into()
}

fn main() {}
