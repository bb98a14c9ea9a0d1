//! `effects![..]` in a handler's return type is consumed by `#[effect_handler]`; the import it
//! came through still counts as used, so a warnings-denied build passes.
#![deny(warnings)]

mod handlers {
    use cards::{BlockCard, Card};
    use effects_core::{effect_handler, effects, Empty};

    #[effect_handler]
    pub fn block(card: &Card) -> effects![BlockCard | Empty] {
        let _ = card;
        Empty.into()
    }
}

fn main() {
    let _ = handlers::BlockHandler;
}
