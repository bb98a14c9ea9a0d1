use cards::{BlockedCard, StatusChanged};
use effects_core::effects;

effects! {
    pub SaveCard {
        datoms: [one BlockedCard],
        messages: [one StatusChanged],
        datoms: [],
    }
}

fn main() {}
