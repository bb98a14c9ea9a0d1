use cards::Card;
use effects_core::effect_handler;

#[effect_handler]
pub fn block(card: &Card) {
    let _ = card;
}

fn main() {}
