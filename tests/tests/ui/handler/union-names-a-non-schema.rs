use cards::Card;
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn block(card: &Card) -> effects![Card | Empty] {
    let _ = card;
    Empty.into()
}

fn main() {}
