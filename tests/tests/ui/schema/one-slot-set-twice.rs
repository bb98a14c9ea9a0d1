use cards::{BlockCard, BlockedCard, Card, CardStatus, StatusChanged};

fn main() {
    let card = Card { id: "c1".into(), customer_id: "u1".into(), status: CardStatus::Blocked };
    let _ = BlockCard::builder()
        .blocked_card(BlockedCard::from(&card))
        .blocked_card(BlockedCard::from(&card))
        .status_changed(StatusChanged::from(&card))
        .build();
}
