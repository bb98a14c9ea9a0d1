use effects_core::{effects, Message};
use serde::Serialize;

#[derive(Serialize, Message)]
#[message(topic = "audit")]
pub struct Audit {
    pub line: String,
}

effects! {
    pub Audited {
        messages: [at_least_one Audit],
    }
}

fn main() {
    let _ = Audited::builder().extend_audit(Vec::new()).build();
}
