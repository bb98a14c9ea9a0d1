// An `optional` slot's setter (or `maybe_` setter) called a second time: one error, at the
// second call, naming the schema, the type and how to take several.
use cards::{Card, CardStatus, StatusChanged};
use effects_core::effects;

effects! {
    pub MaybeNotify {
        messages: [optional StatusChanged],
    }
}

fn main() {
    let card = Card { id: "c1".into(), customer_id: "u1".into(), status: CardStatus::Blocked };
    let _ = MaybeNotify::builder()
        .maybe_status_changed(None)
        .status_changed(StatusChanged::from(&card))
        .build();
}
