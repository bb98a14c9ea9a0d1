use effects_core::Message;

#[derive(Message)]
#[message(topic = "limit-changed")]
pub struct LimitChanged {
    pub card_id: String,
}

fn main() {}
