//! Procedural macros of `effects-core`: `effects!` and the `Datom`, `Message` and `Request`
//! derives. They only generate tokens; the code they generate calls `effects_core`, so use them
//! through that crate, which re-exports them.

mod ctxt;
mod derive;
mod entry;
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
    guard(TokenStream::new(), || entry::effects(input.into()))
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
    guard(item.clone(), || {
        entry::effect_handler(args.into(), item.into())
    })
}

/// Derives `effects_core::Datom`.
#[proc_macro_derive(Datom, attributes(datom))]
pub fn derive_datom(input: TokenStream) -> TokenStream {
    guard(TokenStream::new(), || entry::derive_datom(input.into()))
}

/// Derives `effects_core::Message`.
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    guard(TokenStream::new(), || entry::derive_message(input.into()))
}

/// Derives `effects_core::Request`.
#[proc_macro_derive(Request, attributes(request))]
pub fn derive_request(input: TokenStream) -> TokenStream {
    guard(TokenStream::new(), || entry::derive_request(input.into()))
}

/// Runs a macro; should it panic (a bug: `tests/no_panic.rs` looks for them), reports the panic as
/// a compile error and keeps `keep` (an attribute's item), so the rest of the crate still sees it.
fn guard(keep: TokenStream, expand: impl FnOnce() -> proc_macro2::TokenStream) -> TokenStream {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(expand)) {
        Ok(tokens) => tokens.into(),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let message =
                format!("effects-macros failed on this input (a bug; please report it): {why}");
            let mut out: TokenStream = syn::Error::new(proc_macro2::Span::call_site(), message)
                .into_compile_error()
                .into();
            out.extend(keep);
            out
        }
    }
}
