//! Procedural macros of `effects-core`: `effects!` and the `Datom`, `Message` and `Request`
//! derives. They only generate tokens; the code they generate calls `effects_core`, so use them
//! through that crate, which re-exports them.

mod ctxt;
mod derive;
mod handler;
mod schema;
mod util;

#[cfg(test)]
mod expand_tests;

use proc_macro::TokenStream;

/// Declares effect schemas. See `effects_core::effects!`.
#[proc_macro]
pub fn effects(input: TokenStream) -> TokenStream {
    schema::effects(input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Marks a pure handler. See `effects_core::effect_handler`.
#[proc_macro_attribute]
pub fn effect_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::effect_handler(args.into(), item.into()).into()
}

/// Derives `effects_core::Datom`.
#[proc_macro_derive(Datom, attributes(datom))]
pub fn derive_datom(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::datom(&input)
        .unwrap_or_else(|e| derive::with_fallback(e, &input, derive::Derive::Datom))
        .into()
}

/// Derives `effects_core::Message`.
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::message(&input)
        .unwrap_or_else(|e| derive::with_fallback(e, &input, derive::Derive::Message))
        .into()
}

/// Derives `effects_core::Request`.
#[proc_macro_derive(Request, attributes(request))]
pub fn derive_request(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    derive::request(&input)
        .unwrap_or_else(|e| derive::with_fallback(e, &input, derive::Derive::Request))
        .into()
}
