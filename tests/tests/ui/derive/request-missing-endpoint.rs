use effects_core::Request;
use serde::Serialize;

#[derive(Serialize, Request)]
#[request(method = "POST", path = "/notify")]
pub struct Notify {
    pub text: String,
}

fn main() {}
