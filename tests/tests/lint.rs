//! Generated code compiles cleanly under `#![deny(warnings)]`, `missing_docs` and clippy's
//! pedantic lints (clippy runs on this file in CI with `--all-targets -D warnings`).
#![deny(warnings, missing_docs, clippy::all, clippy::pedantic)]

use effects_core::{Datom, Effects, Message, Request, Schema, effects};
use serde::Serialize;

/// A ledger entry.
#[derive(Clone, Debug, PartialEq, Datom)]
#[datom(entity = "entry")]
pub struct Entry {
    /// Its id.
    #[datom(id)]
    pub id: u64,
    /// Amount in cents.
    pub amount: i64,
    /// An optional memo.
    pub memo: Option<String>,
}

/// Something happened.
#[derive(Clone, Debug, PartialEq, Serialize, Message)]
#[message(topic = "events")]
pub struct Event {
    /// Partition key.
    #[message(key)]
    pub account: Option<String>,
}

/// A webhook.
#[derive(Clone, Debug, PartialEq, Serialize, Request)]
#[request(method = "DELETE", endpoint = "hooks", path = "/hooks/{id}")]
pub struct Unhook {
    /// The hook.
    pub id: u32,
}

effects! {
    /// Every cardinality of every kind.
    #[derive(Clone, Debug, PartialEq)]
    pub Full {
        datoms: [
            /// The entry.
            one Entry,
        ],
        requests: [optional Unhook],
        messages: [at_least_one Event],
    }

    /// Absorbs `Full`.
    pub Ledger {
        datoms: [many Entry],
        requests: [many Unhook],
        messages: [many Event],
        merges: [Full, effects_core::Empty],
    }

    pub(crate) Private {
        messages: [many Event],
    }
}

#[test]
fn generated_code_is_lint_clean_and_works() {
    let full = Full::builder()
        .entry(Entry {
            id: 1,
            amount: -250,
            memo: None,
        })
        .maybe_unhook(Some(Unhook { id: 9 }))
        .event(Event { account: None })
        .extend_event([Event {
            account: Some("a".into()),
        }])
        .build();
    let ledger = Ledger::builder().build().merge(full.clone());
    assert_eq!(ledger.entry.len(), 1);
    assert_eq!(ledger.event.len(), 2);
    let erased = Effects::from(full);
    assert_eq!(erased.requests[0].path, "/hooks/9");
    assert!(!erased.datoms[0].attributes.contains_key("entry/memo"));
    Full::validate(&erased).unwrap();
    let private = Private::builder().build();
    assert!(Effects::from(private).is_empty());
}
