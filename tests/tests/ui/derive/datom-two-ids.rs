use effects_core::Datom;

#[derive(Datom)]
#[datom(entity = "card")]
pub struct CardLimit {
    #[datom(id)]
    pub card_id: String,
    #[datom(id)]
    pub number: String,
    pub limit: u64,
}

fn main() {}
