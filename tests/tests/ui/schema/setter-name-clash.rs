use effects_core::{effects, Message};
use serde::Serialize;

#[derive(Serialize, Message)]
#[message(topic = "build")]
pub struct Build {
    pub id: u32,
}

effects! {
    pub Release {
        messages: [one Build],
    }
}

fn main() {}
