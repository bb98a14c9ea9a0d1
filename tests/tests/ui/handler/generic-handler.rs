use effects_core::{effect_handler, effects, Empty};

#[effect_handler]
pub fn ignore<T>(input: &T) -> effects![Empty] {
    let _ = input;
    Empty.into()
}

fn main() {}
