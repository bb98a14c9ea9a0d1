use cards::Card;
use effects_core::effects;

effects! {
    pub SaveCard {
        datoms: [one Card],
    }
}

fn main() {}
