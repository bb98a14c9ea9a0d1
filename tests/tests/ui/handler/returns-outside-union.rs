use cards::{BlockAll, BlockCard, Card, CardsBlockedNotify, Customer};
use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn block(card: &Card) -> effects![BlockCard | Empty] {
    let customer = Customer { id: card.customer_id.clone(), name: String::new() };
    BlockAll::builder()
        .cards_blocked_notify(CardsBlockedNotify::from(&customer))
        .build()
        .into()
}

fn main() {}
