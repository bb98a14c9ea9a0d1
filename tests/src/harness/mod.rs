//! The reliability harness: what the reliability tests, their child processes and the soak
//! share. A workload ([`book`]), counting at the source ([`tally`], [`figures`]), real
//! redeliveries through the broker's visibility timeout ([`redeliver`]), the worker child
//! process ([`child`]) and a guard that never leaves a child behind ([`process`]).

pub mod book;
pub mod child;
pub mod figures;
pub mod process;
pub mod redeliver;
pub mod tally;
