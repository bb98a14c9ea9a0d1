use cards::BlockedCard;
use effects_core::effects;

effects! {
    pub SaveCard {
        datoms: [one BlockedCard as self],
    }
}

fn main() {}
