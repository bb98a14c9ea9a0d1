use cards::BlockedCard;
use effects_core::effects;

effects! {
    pub Announce {
        messages: [many BlockedCard],
    }
}

fn main() {}
