use effects_core::Datom;

#[derive(Datom)]
#[datom(entity = "card")]
pub enum CardState {
    Active,
    Blocked,
}

fn main() {}
