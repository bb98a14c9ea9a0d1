use cards::{BlockCard, BlockedCard, Card, CardStatus};
use effects_core::effects;

effects! {
    pub Freeze {
        datoms: [one BlockedCard],
    }
}

fn main() {
    let card = Card { id: "c1".into(), customer_id: "u1".into(), status: CardStatus::Blocked };
    let _ = BlockCard::builder();
    let _ = Freeze::builder()
        .status_changed(cards::StatusChanged::from(&card))
        .build();
}
