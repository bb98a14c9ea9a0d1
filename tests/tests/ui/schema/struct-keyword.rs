use cards::BlockedCard;
use effects_core::effects;

effects! {
    pub struct SaveCard {
        datoms: [one BlockedCard],
    }
}

fn main() {}
