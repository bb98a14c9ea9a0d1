//! The macros as functions over `proc_macro2` tokens: what the entry points in `lib.rs` call, and
//! what the no-panic test (`tests/no_panic.rs`) feeds directly. Each returns the expansion or
//! `compile_error!` calls, and must never panic, whatever the input.

use proc_macro2::TokenStream;

/// `effects! { .. }` and `effects![A | B]`.
pub(crate) fn effects(input: TokenStream) -> TokenStream {
    crate::schema::effects(input).unwrap_or_else(syn::Error::into_compile_error)
}

/// `#[effect_handler(args)] item`.
pub(crate) fn effect_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    crate::handler::effect_handler(args, item)
}

/// `#[derive(Datom)]`.
pub(crate) fn derive_datom(input: TokenStream) -> TokenStream {
    derive(input, crate::derive::Derive::Datom)
}

/// `#[derive(Message)]`.
pub(crate) fn derive_message(input: TokenStream) -> TokenStream {
    derive(input, crate::derive::Derive::Message)
}

/// `#[derive(Request)]`.
pub(crate) fn derive_request(input: TokenStream) -> TokenStream {
    derive(input, crate::derive::Derive::Request)
}

fn derive(input: TokenStream, which: crate::derive::Derive) -> TokenStream {
    let input: syn::DeriveInput = match syn::parse2(input) {
        Ok(input) => input,
        Err(e) => return e.into_compile_error(),
    };
    let expanded = match which {
        crate::derive::Derive::Datom => crate::derive::datom(&input),
        crate::derive::Derive::Message => crate::derive::message(&input),
        crate::derive::Derive::Request => crate::derive::request(&input),
    };
    expanded.unwrap_or_else(|e| crate::derive::with_fallback(e, &input, which))
}
