use effects_core::{effect_handler, Empty};

#[effect_handler]
pub fn ignore<T>(input: &T) -> effects![Empty] {
    let _ = input;
    Empty.into()
}

fn main() {}
