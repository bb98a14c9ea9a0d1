//! The card-blocking service on the embedded default.

fn main() {
    let card = cards::Card {
        id: "c1".into(),
        customer_id: "u1".into(),
        status: cards::CardStatus::Active,
    };
    let blocked = card.block();
    let effects: effects_core::Effects = cards::BlockCard::builder()
        .blocked_card(cards::BlockedCard::from(&blocked))
        .status_changed(cards::StatusChanged::from(&blocked))
        .build()
        .into();
    println!("{effects:#?}");
}
