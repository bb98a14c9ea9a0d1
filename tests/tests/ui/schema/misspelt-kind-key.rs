use cards::BlockedCard;
use effects_core::effects;

effects! {
    pub SaveCard {
        datom: [one BlockedCard],
    }
}

fn main() {}
