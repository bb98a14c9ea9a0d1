use effects_core::Datom;

#[derive(Datom)]
#[datom(entity = "card")]
pub struct Card {
    #[datom(id)]
    pub id: Option<String>,
    pub status: String,
}

fn main() {}
