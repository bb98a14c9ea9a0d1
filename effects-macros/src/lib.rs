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
/// `NonEmpty<T>`), `Schema::builder()` returning a typestate builder, canonical `Serialize`,
/// `Schema` (shape metadata and run-time validation; `From<Schema> for Effects` comes with it,
/// from one blanket impl in `effects_core`) and typed `merge`.
///
/// # Slots
///
/// A slot is `cardinality Type`, optionally `as name`. Its payload type must implement the trait
/// of its list: `Datom` in `datoms`, `Request` in `requests`, `Message` in `messages` (derive
/// them). A type has one slot per schema. The slot (and its setters) are named after the type's
/// last path segment in snake case (`BlockedCard` → `blocked_card`); `as name` chooses another
/// name, and is needed when the snake-cased name is a keyword that cannot be an identifier
/// (`Crate`, `Self`) or when two setters would clash.
///
/// # Builder setters, per cardinality
///
/// `build()` compiles only once every `one` and `at_least_one` slot is filled; a setter that
/// may be called once disappears after its call (calling it again is a compile error naming the
/// slot).
///
/// | cardinality      | field          | setters                                                     | fills the slot for `build()`   |
/// |------------------|----------------|-------------------------------------------------------------|--------------------------------|
/// | `one T`          | `T`            | `x(T)`, once                                                | yes: required                  |
/// | `optional T`     | `Option<T>`    | `x(T)` or `maybe_x(Option<T>)`, once, either one            | not required                   |
/// | `many T`         | `Vec<T>`       | `x(T)` adds one, `extend_x(impl IntoIterator<Item = T>)`    | not required                   |
/// | `at_least_one T` | `NonEmpty<T>`  | `x(T)` adds one, `extend_x(impl IntoIterator<Item = T>)`    | only `x(..)`: `extend_x` alone may add none, so it does not fill the slot; call `x(first)` then `extend_x(rest)` |
///
/// `maybe_x(None)` still counts as the one call of an `optional` slot. `Schema::merge(other)`
/// moves every effect of `other` in; it compiles only when each of `other`'s effect types has a
/// `many` or `at_least_one` slot here, which is what `merges: [Other]` checks at the declaration.
///
/// # In a return type
///
/// `effects![A | B]` is the return type of an `#[effect_handler]` function, which rewrites it
/// into the handler's union; the macro must be in scope there as anywhere (`use
/// effects_core::effects;`). Without the attribute it is a compile error saying to add it.
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

/// Derives `effects_core::Datom`: the struct becomes one datom, an assertion of attributes on
/// one entity.
///
/// ```text
/// #[derive(Datom)]
/// #[datom(entity = "card")]                  // the namespace of every attribute
/// pub struct BlockedCard {
///     #[datom(id)]                            // the identity: lookup ref `card/id = <id>`
///     pub id: String,
///     pub status: CardStatus,                 // attribute `card/status`
///     #[datom(rename = "blocked_by")]
///     pub by: Option<String>,                 // attribute `card/blocked_by`, left out when `None`
///     #[datom(skip)]
///     pub cached: u32,                        // not an attribute
///     #[datom(expect = "status")]
///     pub was: Option<CardStatus>,            // compare-and-set: `card/status` must be this
/// }
/// ```
///
/// # Attributes
///
/// On the struct:
/// - `#[datom(entity = "card")]` (required): the entity's namespace, without `/`.
///
/// On fields:
/// - `#[datom(id)]` (exactly one field): the entity's identity. The datom addresses its entity
///   by the lookup ref `entity/field = value`, so `id` above gives `card/id`. The field cannot be
///   an `Option` (an entity always has its identity) nor `skip`.
/// - `#[datom(rename = "name")]`: the attribute (or, on the `id` field, the identity attribute)
///   is `entity/name` instead of `entity/field`.
/// - `#[datom(skip)]`: the field is not an attribute.
/// - `#[datom(expect = "field")]`: the field holds the value the attribute of `field` must have
///   when the run commits (Datomic's `:db/cas`); if it differs, the run is a conflict and is run
///   again. An `expect` field is not an attribute itself and cannot also be `id`, `skip` or
///   `rename`; `None` expects nothing.
///
/// Every other field is an attribute named `entity/field`.
///
/// # `Option` fields
///
/// An `Option` attribute that is `None` is left out of the datom: the entity's stored value is
/// kept, not retracted. An `Option` `expect` field that is `None` expects nothing.
///
/// # What fields need
///
/// The `id`, every attribute and every `expect` field need `serde::Serialize`: values are held
/// as JSON. A field that is not `Serialize` is a compile error at the field. `String` and
/// `serde_json::Value` fields move into the datom without a copy. Generic structs are supported.
#[proc_macro_derive(Datom, attributes(datom))]
pub fn derive_datom(input: TokenStream) -> TokenStream {
    guard(TokenStream::new(), || entry::derive_datom(input.into()))
}

/// Derives `effects_core::Message`: the struct is the payload of a message on a topic.
///
/// ```text
/// #[derive(Serialize, Message)]
/// #[message(topic = "card-status-changed")]
/// pub struct StatusChanged {
///     #[message(key)]                         // partition key: one key, one order
///     pub card_id: String,
///     pub status: CardStatus,
/// }
/// ```
///
/// # Attributes
///
/// On the struct:
/// - `#[message(topic = "name")]` (required): the topic it is published to.
///
/// On one field, optionally:
/// - `#[message(key)]`: the partition key. Messages with the same key are delivered in publish
///   order. The key is the field's `Display` form (a `String` field moves in without a copy);
///   an `Option` key field that is `None` gives a message without a key.
///
/// # What the struct needs
///
/// The payload is the struct's `serde::Serialize` form, as JSON: derive `Serialize` next to
/// `Message` (without it, the compile error is at the struct's name). The key field needs
/// `Display`. Generic structs are supported.
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    guard(TokenStream::new(), || entry::derive_message(input.into()))
}

/// Derives `effects_core::Request`: the struct is an outgoing HTTP request to a named endpoint.
///
/// ```text
/// #[derive(Serialize, Request)]
/// #[request(method = "POST", endpoint = "notifications", path = "/customers/{customer_id}/notify")]
/// pub struct NotifyCustomer {
///     pub customer_id: String,                // fills `{customer_id}`, percent-encoded
///     pub text: String,
/// }
/// ```
///
/// # Attributes
///
/// On the struct, all three required:
/// - `method = ".."`: `GET`, `HEAD`, `POST`, `PUT`, `PATCH` or `DELETE` (any case).
/// - `endpoint = ".."`: the endpoint's name; its base URL and credentials come from the
///   executor's HTTP configuration, never from the effect.
/// - `path = "/.."`: starts with `/`; a `{field}` placeholder is a whole path segment naming a
///   field, replaced by the field's `Display` form, percent-encoded (everything but RFC 3986's
///   unreserved characters).
///
/// Fields take no attributes.
///
/// # What the struct needs
///
/// For `POST`, `PUT` and `PATCH` the body is the struct's `serde::Serialize` form, as JSON, so
/// the struct derives `Serialize`; `GET`, `HEAD` and `DELETE` send no body and need no
/// `Serialize`. Placeholder fields need `Display` (so an `Option` field cannot fill one).
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
