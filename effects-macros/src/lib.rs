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

/// Declares effect schemas.
///
/// ```text
/// effects! {
///     /// Docs are carried over.
///     #[derive(Debug)]                        // other attributes too
///     pub BlockAll {
///         datoms:   [many BlockedCard],
///         requests: [optional Notify as notify_customer],   // `as` renames the setter
///         messages: [at_least_one StatusChanged, one CardsBlockedNotify],
///         merges:   [BlockCard],              // schemas it can absorb, checked
///     }
/// }
/// ```
///
/// Per schema it generates the struct (one public field per slot: `T`, `Option<T>`, `Vec<T>`,
/// `NonEmpty<T>`), `Schema::builder()` returning a typestate builder with one setter per slot
/// (named after the type in snake case; `maybe_x` for `optional`, `extend_x` for `many` and
/// `at_least_one`), `From<Schema> for Effects`, canonical `Serialize`, `Schema` (shape metadata
/// and run-time validation) and typed `merge`.
#[proc_macro]
pub fn effects(input: TokenStream) -> TokenStream {
    schema::effects(input.into())
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Marks a pure handler whose return type is a union of schemas, `effects![A | B]`.
///
/// Generates, next to the function `name`: the union enum `NameEffects` (with `From` for each
/// schema, `Into<Effects>`, `MergeInto`, and `Serialize` as `{Variant: effects}`), the unit
/// struct `NameHandler` implementing `Handler` for the worker, and for a function with several
/// parameters the input struct `NameInput`. Arguments: `topic = "..."` (the topic it consumes)
/// and `name = "..."` (the idempotency-key prefix; the function's name by default).
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
