use effects_core::Request;
use serde::Serialize;

#[derive(Serialize, Request)]
#[request(method = "PSOT", endpoint = "notifications", path = "/notify")]
pub struct Notify {
    pub text: String,
}

fn main() {}
