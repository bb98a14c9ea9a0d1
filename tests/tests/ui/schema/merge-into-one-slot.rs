use cards::{BlockCard, BlockedCard, StatusChanged};
use effects_core::effects;

effects! {
    /// `one` slots cannot take a second effect from a merged schema.
    pub Single {
        datoms: [one BlockedCard],
        messages: [one StatusChanged],
        merges: [BlockCard],
    }
}

fn main() {}
