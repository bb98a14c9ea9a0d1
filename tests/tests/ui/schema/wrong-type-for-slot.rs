use cards::{BlockCard, Card, CardStatus, StatusChanged};

fn main() {
    let card = Card { id: "c1".into(), customer_id: "u1".into(), status: CardStatus::Blocked };
    let _ = BlockCard::builder()
        .blocked_card(card.clone())
        .status_changed(StatusChanged::from(&card))
        .build();
}
