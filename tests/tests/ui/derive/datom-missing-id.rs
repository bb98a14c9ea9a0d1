use effects_core::Datom;

#[derive(Datom)]
#[datom(entity = "card")]
pub struct CardLimit {
    pub card_id: String,
    pub limit: u64,
}

fn main() {}
