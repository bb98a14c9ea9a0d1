use cards::StatusChanged;
use effects_core::effects;

effects! {
    pub CallOut {
        requests: [optional StatusChanged],
    }
}

fn main() {}
