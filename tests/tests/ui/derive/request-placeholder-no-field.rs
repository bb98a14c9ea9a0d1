use effects_core::Request;
use serde::Serialize;

#[derive(Serialize, Request)]
#[request(method = "POST", endpoint = "notifications", path = "/customers/{customer}/notify")]
pub struct Notify {
    pub customer_id: String,
    pub text: String,
}

fn main() {}
