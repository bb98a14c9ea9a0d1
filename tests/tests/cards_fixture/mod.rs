//! Card values shared by the snapshot and shape tests.

use cards::{BlockCard, BlockedCard, Card, CardStatus, StatusChanged};

/// The card `id` of customer `u1`, already blocked.
pub(crate) fn blocked(id: &str) -> Card {
    Card {
        id: id.into(),
        customer_id: "u1".into(),
        status: CardStatus::Blocked,
    }
}

/// The effects of blocking the card `id`, built with the generated builder.
pub(crate) fn block_card(id: &str) -> BlockCard {
    let card = blocked(id);
    BlockCard::builder()
        .blocked_card(BlockedCard::from(&card))
        .status_changed(StatusChanged::from(&card))
        .build()
}
