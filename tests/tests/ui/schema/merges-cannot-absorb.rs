use cards::{BlockCard, BlockedCard};
use effects_core::effects;

effects! {
    /// Can take many datoms, but has nowhere to put `BlockCard`'s `StatusChanged` message.
    pub SaveCards {
        datoms: [many BlockedCard],
        merges: [BlockCard],
    }
}

fn main() {}
