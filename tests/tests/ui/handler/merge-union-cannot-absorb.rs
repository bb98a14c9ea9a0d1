use cards::{block, BlockedCard, Card};
use effects_core::effects;

effects! {
    /// Takes datoms only: `block` may also return a `StatusChanged` message.
    pub SaveCards {
        datoms: [many BlockedCard],
    }
}

fn save(cards: &[Card]) -> SaveCards {
    let mut all = SaveCards::builder().build();
    for card in cards {
        all = all.merge(block(card));
    }
    all
}

fn main() {}
