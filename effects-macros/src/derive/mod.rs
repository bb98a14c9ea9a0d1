//! `#[derive(Datom)]`, `#[derive(Message)]`, `#[derive(Request)]`.

mod datom;
mod fields;
mod message;
mod request;

pub(crate) use datom::derive as datom;
pub(crate) use message::derive as message;
pub(crate) use request::derive as request;
