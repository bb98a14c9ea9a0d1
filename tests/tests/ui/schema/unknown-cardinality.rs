use cards::BlockedCard;
use effects_core::effects;

effects! {
    pub SaveCard {
        datoms: [single BlockedCard],
    }
}

fn main() {}
