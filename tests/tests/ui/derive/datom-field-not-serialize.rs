use effects_core::Datom;

pub struct Money {
    pub cents: i64,
}

#[derive(Datom)]
#[datom(entity = "account")]
pub struct Balance {
    #[datom(id)]
    pub id: String,
    pub amount: Money,
}

fn main() {}
