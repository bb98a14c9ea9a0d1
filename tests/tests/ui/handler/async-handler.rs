use cards::{BlockCard, Card};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub async fn block(card: &Card) -> effects![BlockCard | Empty] {
    let _ = card;
    Empty.into()
}

fn main() {}
