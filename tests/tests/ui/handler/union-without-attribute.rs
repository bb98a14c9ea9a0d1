use cards::{BlockCard, Card};
use effects_core::{effects, Empty};

pub fn block(card: &Card) -> effects![BlockCard | Empty] {
    let _ = card;
    Empty.into()
}

fn main() {}
