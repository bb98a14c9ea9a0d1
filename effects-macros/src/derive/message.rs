//! `#[derive(Message)]`: `#[message(topic = "...")]` on the struct; the payload is the struct's
//! `Serialize` form; an optional `#[message(key)]` field (its `Display` form) is the partition key.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{DeriveInput, LitStr};

use super::fields::{field_ident, is_option, named_fields, string_value, unknown_key};
use crate::ctxt::Ctxt;
use crate::util::unraw;

pub(crate) fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::new();
    let mut topic: Option<LitStr> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("message")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("topic") {
                topic = Some(string_value(
                    &meta,
                    "#[message(topic = \"card-status-changed\")]",
                )?);
                Ok(())
            } else {
                Err(unknown_key(&meta, "message", &["topic"]))
            }
        });
        if let Err(e) = parsed {
            cx.syn_error(e);
        }
    }
    let ident = &input.ident;
    let fields = named_fields(input, "Message", &cx);
    if topic.is_none() && !cx.has_errors() {
        cx.error_spanned_by(
            ident,
            format!(
                "`Message` needs a topic: add `#[message(topic = \"...\")]` above `struct {ident}`"
            ),
        );
    }
    let mut key: Option<(syn::Ident, bool)> = None;
    for field in fields.into_iter().flatten() {
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("message")) {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("key") {
                    let fident = field_ident(field);
                    if let Some((first, _)) = &key {
                        return Err(meta.error(format!(
                            "a message has one partition key: `{first}` is already `#[message(key)]`"
                        )));
                    }
                    key = Some((fident, is_option(&field.ty)));
                    Ok(())
                } else {
                    Err(unknown_key(&meta, "message", &["key"]))
                }
            });
            if let Err(e) = parsed {
                cx.syn_error(e);
            }
        }
    }
    cx.check()?;
    let Some(topic) = topic else {
        unreachable!("a missing topic was reported above");
    };
    let type_name = unraw(ident);
    let has_key = key.is_some();
    let key_moved = match &key {
        None => quote!(__None),
        Some((field, false)) => quote!(__Some(__IntoKey(self.#field).into_key())),
        Some((field, true)) => quote!(self.#field.map(|key| __IntoKey(key).into_key())),
    };
    let key_expr = match key {
        None => quote!(__None),
        Some((field, false)) => quote!(__Some(__ToString::to_string(&self.#field))),
        Some((field, true)) => quote!(self.#field.as_ref().map(__ToString::to_string)),
    };
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    // Spanned at the struct's name: a payload that is not `Serialize` is reported there, once.
    let payload_to_value = quote::quote_spanned!(ident.span()=> __to_value::<#ident #ty_generics>);
    // Without a key, moving saves nothing: the trait's default `into_message` calls `to_message`.
    let into_message = has_key.then(|| {
        quote! {
            #[inline]
            fn into_message(self) -> __MessageEffect {
                // The payload is serialized first: serde reads through `&self`.
                let payload = #payload_to_value(&self, #type_name, "the payload");
                __message(#topic, #key_moved, payload)
            }
        }
    });
    // Inside the block, the glob import of `__private::names` gives every helper a one-token
    // name and brings `__MoveIntoKey` and `__DisplayIntoKey` into scope for `into_key`.
    let impl_attrs = super::impl_attrs();
    Ok(quote! {
        const _: () = {
        use ::effects_core::__private::names::*;
        #impl_attrs
        impl #impl_generics __Message for #ident #ty_generics #where_clause {
            const TOPIC: &'static str = #topic;

            #[inline]
            fn to_message(&self) -> __MessageEffect {
                __message(#topic, #key_expr, #payload_to_value(self, #type_name, "the payload"))
            }

            #into_message
        }
        };
    })
}
