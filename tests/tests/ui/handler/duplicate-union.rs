use cards::{BlockCard, Card};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn block(card: &Card) -> effects![BlockCard | Empty | BlockCard] {
    let _ = card;
    Empty.into()
}

fn main() {}
