//! `Schema` (shape metadata and erasure), `From<Schema> for Effects` and canonical `Serialize`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::Names;
use crate::schema::ast::{Cardinality, Kind, Slot};
use crate::util::doc_text;

/// `<BlockedCard as ::effects_core::Datom>`, spanned at the user's type so that a type that is
/// not a datom is reported there.
pub(super) fn as_trait(slot: &Slot) -> TokenStream {
    let ty = &slot.ty;
    let span = ty.span();
    match slot.kind {
        Kind::Datoms => quote_spanned!(span=> <#ty as ::effects_core::Datom>),
        Kind::Requests => quote_spanned!(span=> <#ty as ::effects_core::Request>),
        Kind::Messages => quote_spanned!(span=> <#ty as ::effects_core::Message>),
    }
}

fn erase_fn(kind: Kind) -> TokenStream {
    match kind {
        Kind::Datoms => quote!(to_datom),
        Kind::Requests => quote!(to_request),
        Kind::Messages => quote!(to_message),
    }
}

fn matcher(slot: &Slot) -> TokenStream {
    let t = as_trait(slot);
    match slot.kind {
        Kind::Datoms => quote! {
            ::effects_core::Matcher::Datom { identity: #t::IDENTITY, attributes: #t::ATTRIBUTES }
        },
        Kind::Requests => quote! {
            ::effects_core::Matcher::Request { method: #t::METHOD, endpoint: #t::ENDPOINT, path: #t::PATH }
        },
        Kind::Messages => quote! {
            ::effects_core::Matcher::Message { topic: #t::TOPIC }
        },
    }
}

fn cardinality(c: Cardinality) -> TokenStream {
    match c {
        Cardinality::One => quote!(::effects_core::Cardinality::One),
        Cardinality::Optional => quote!(::effects_core::Cardinality::Optional),
        Cardinality::Many => quote!(::effects_core::Cardinality::Many),
        Cardinality::AtLeastOne => quote!(::effects_core::Cardinality::AtLeastOne),
    }
}

pub(super) fn expand(names: &Names<'_>) -> TokenStream {
    let schema = names.schema;
    let name = &schema.name;
    let name_str = crate::util::unraw(name);
    let doc = doc_text(&schema.attrs);
    let kinds = [Kind::Datoms, Kind::Requests, Kind::Messages];

    let shape_slots = kinds.map(|kind| {
        let slots = schema.slots.iter().filter(|s| s.kind == kind).map(|slot| {
            let slot_name = slot.name_str();
            let type_name = slot.type_str();
            let card = cardinality(slot.cardinality);
            let matcher = matcher(slot);
            quote! {
                ::effects_core::SlotShape {
                    name: #slot_name,
                    type_name: #type_name,
                    cardinality: #card,
                    matcher: #matcher,
                }
            }
        });
        quote!(&[#(#slots),*])
    });
    let [datom_slots, request_slots, message_slots] = shape_slots;
    let merges = schema
        .merges
        .iter()
        .map(|p| crate::schema::type_string(&syn::Type::Verbatim(quote!(#p))));

    // `by_ref`: `to_effects(&self)`; otherwise `From<Schema> for Effects`, which moves datoms.
    let erased = |by_ref: bool| {
        kinds.map(|kind| {
            let slots: Vec<&Slot> = schema.slots.iter().filter(|s| s.kind == kind).collect();
            if slots.is_empty() {
                return quote!(::std::vec::Vec::new());
            }
            let source = |field: &syn::Ident| {
                if by_ref {
                    quote!(self.#field)
                } else {
                    quote!(value.#field)
                }
            };
            let capacity = slots.iter().map(|slot| {
                let field = source(&slot.name);
                match slot.cardinality {
                    Cardinality::One => quote!(1usize),
                    Cardinality::Optional => quote!(usize::from(#field.is_some())),
                    Cardinality::Many | Cardinality::AtLeastOne => quote!(#field.len()),
                }
            });
            let pushes = slots.iter().map(|slot| {
                let field = source(&slot.name);
                let t = as_trait(slot);
                let moves = !by_ref && kind != Kind::Requests;
                // `item` is a reference when `by_ref`, owned otherwise.
                let (f, item) = if moves {
                    let f = if kind == Kind::Datoms {
                        quote!(into_datom)
                    } else {
                        quote!(into_message)
                    };
                    (f, quote!(item))
                } else if by_ref {
                    (erase_fn(kind), quote!(item))
                } else {
                    (erase_fn(kind), quote!(&item))
                };
                let (whole, iter) = if by_ref {
                    (quote!(&#field), quote!(#field.iter()))
                } else {
                    (quote!(#field), quote!(#field))
                };
                let convert = quote!(#t::#f(#item));
                match slot.cardinality {
                    Cardinality::One => quote! {
                        let item = #whole;
                        erased.push(#convert);
                    },
                    Cardinality::Optional => quote! {
                        if let ::core::option::Option::Some(item) = #whole {
                            erased.push(#convert);
                        }
                    },
                    Cardinality::Many | Cardinality::AtLeastOne => quote! {
                        for item in #iter {
                            erased.push(#convert);
                        }
                    },
                }
            });
            quote! {{
                let mut erased = ::std::vec::Vec::with_capacity(#(#capacity)+*);
                #(#pushes)*
                erased
            }}
        })
    };
    let [datoms, requests, messages] = erased(true);
    let [datoms_moved, requests_moved, messages_moved] = erased(false);

    quote! {
        #[automatically_derived]
        impl ::effects_core::Schema for #name {
            const SHAPE: &'static ::effects_core::Shape = &::effects_core::Shape {
                name: #name_str,
                doc: #doc,
                datoms: #datom_slots,
                requests: #request_slots,
                messages: #message_slots,
                merges: &[#(#merges),*],
            };

            fn to_effects(&self) -> ::effects_core::Effects {
                ::effects_core::Effects {
                    datoms: #datoms,
                    requests: #requests,
                    messages: #messages,
                }
            }

            fn into_effects(self) -> ::effects_core::Effects {
                let value = self;
                ::effects_core::Effects {
                    datoms: #datoms_moved,
                    requests: #requests_moved,
                    messages: #messages_moved,
                }
            }
        }

        #[automatically_derived]
        impl ::core::convert::From<#name> for ::effects_core::Effects {
            #[inline]
            fn from(value: #name) -> Self {
                ::effects_core::Schema::into_effects(value)
            }
        }

        #[automatically_derived]
        impl ::effects_core::__private::serde::Serialize for #name {
            fn serialize<__S>(&self, serializer: __S) -> ::core::result::Result<__S::Ok, __S::Error>
            where
                __S: ::effects_core::__private::serde::Serializer,
            {
                ::effects_core::__private::serde::Serialize::serialize(
                    &::effects_core::Schema::to_effects(self),
                    serializer,
                )
            }
        }
    }
}
