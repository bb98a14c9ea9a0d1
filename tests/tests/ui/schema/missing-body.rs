use effects_core::effects;

effects! {
    pub SaveCard
}

fn main() {}
