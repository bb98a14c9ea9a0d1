use cards::{BlockedCard, Card, CardStatus};
use effects_core::effects;

effects! {
    pub BlockSome {
        datoms: [at_least_one BlockedCard],
    }
}

fn main() {
    let card = Card { id: "c1".into(), customer_id: "u1".into(), status: CardStatus::Blocked };
    let _ = BlockSome::builder()
        .extend_blocked_card(vec![BlockedCard::from(&card)])
        .build();
}
