use cards::{BlockCard, BlockedCard};
use effects_core::effects;

effects! {
    pub SaveCards {
        datoms: [many BlockedCard],
    }
}

fn absorb(all: SaveCards, one: BlockCard) -> SaveCards {
    all.merge(one)
}

fn main() {}
