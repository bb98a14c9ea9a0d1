use effects_core::Datom;

#[derive(Datom)]
pub struct CardLimit {
    #[datom(id)]
    pub card_id: String,
    pub limit: u64,
}

fn main() {}
