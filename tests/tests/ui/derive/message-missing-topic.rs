use effects_core::{effects, Message};
use serde::Serialize;

#[derive(Serialize, Message)]
pub struct LimitChanged {
    #[message(key)]
    pub card_id: String,
}

// The slot does not add a second error: the derive's mistake is reported once.
effects! {
    pub ChangeLimit {
        messages: [one LimitChanged],
    }
}

fn main() {}
