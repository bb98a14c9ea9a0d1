use cards::Card;
use effects_core::{effect_handler, effects};

#[effect_handler]
pub fn block(card: &Card) -> effects![] {
    let _ = card;
    effects_core::Effects::new()
}

fn main() {}
