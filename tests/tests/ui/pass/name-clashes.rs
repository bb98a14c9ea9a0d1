//! User types whose names collide with what the macros generate or use must still compile.
#![deny(warnings)]

use effects_core::{effects, Datom, Message, Request};
use serde::Serialize;

#[derive(Datom)]
#[datom(entity = "effects")]
pub struct Effects {
    #[datom(id)]
    pub id: u64,
    pub r#type: String,
}

#[derive(Serialize, Message)]
#[message(topic = "builder")]
pub struct Builder {
    pub r#match: bool,
}

#[derive(Serialize, Message)]
#[message(topic = "state")]
pub struct State {
    #[message(key)]
    pub r#ref: String,
}

#[derive(Serialize, Request)]
#[request(method = "PUT", endpoint = "option", path = "/options/{r#type}")]
pub struct Option {
    pub r#type: String,
}

#[derive(Serialize, Message)]
#[message(topic = "set")]
#[allow(non_camel_case_types)]
pub struct r#struct {
    pub n: u8,
}

pub struct Set;
pub struct Unset;
pub struct Schema;
pub struct Vec;
pub struct Result;
pub struct PhantomData;

effects! {
    pub Everything {
        datoms: [one Effects],
        requests: [optional Option as r#type],
        messages: [many Builder, at_least_one State, one r#struct],
    }
    pub Absorber {
        datoms: [many Effects],
        messages: [many Builder, many State, many r#struct],
        requests: [many Option as r#type],
        merges: [Everything],
    }
}

fn main() {
    let everything = Everything::builder()
        .effects(Effects { id: 1, r#type: "t".into() })
        .r#type(Option { r#type: "a/b".into() })
        .builder(Builder { r#match: true })
        .state(State { r#ref: "k".into() })
        .r#struct(r#struct { n: 1 })
        .build();
    let erased: effects_core::Effects = everything.into();
    assert_eq!(erased.requests[0].path, "/options/a%2Fb");
}
