use effects_core::{effects, Datom};

// `Crate` in snake case is `crate`, which cannot name a setter, not even as `r#crate`.
#[derive(Datom)]
#[datom(entity = "crate")]
pub struct Crate {
    #[datom(id)]
    pub id: String,
}

effects! {
    pub Ship {
        datoms: [one Crate],
    }
}

fn main() {}
