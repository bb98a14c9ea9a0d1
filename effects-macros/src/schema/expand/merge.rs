//! Typed merge: `Absorbs` for every slot that takes any number, `MergeInto` for any target that
//! absorbs every slot, and a check per `merges:` entry spanned at the user's token.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::Names;
use crate::schema::ast::{Cardinality, Kind};

fn kind_marker(kind: Kind) -> TokenStream {
    match kind {
        Kind::Datoms => quote!(__Datoms),
        Kind::Requests => quote!(__Requests),
        Kind::Messages => quote!(__Messages),
    }
}

pub(super) fn expand(names: &Names<'_>) -> TokenStream {
    let schema = names.schema;
    let name = &schema.name;

    let absorbs = schema
        .slots
        .iter()
        .filter(|s| s.cardinality.absorbs())
        .map(|slot| {
            let (field, ty) = (&slot.name, &slot.ty);
            let marker = kind_marker(slot.kind);
            quote! {
                #[automatically_derived]
                impl __Absorbs<#ty, #marker> for #name {
                    #[inline]
                    fn absorb(&mut self, value: #ty) {
                        self.#field.push(value);
                    }
                }
            }
        });

    let bounds = schema.slots.iter().map(|slot| {
        let ty = &slot.ty;
        let marker = kind_marker(slot.kind);
        quote!(__T: __Absorbs<#ty, #marker>,)
    });
    let moves = schema.slots.iter().map(|slot| {
        let (field, ty) = (&slot.name, &slot.ty);
        let marker = kind_marker(slot.kind);
        let items = if slot.cardinality == Cardinality::One {
            quote!([self.#field])
        } else {
            quote!(self.#field)
        };
        quote!(__absorb::<__T, #ty, #marker>(target, #items);)
    });
    let target = if schema.slots.is_empty() {
        quote!(_target)
    } else {
        quote!(target)
    };

    let checks = schema.merges.iter().map(|path| {
        quote_spanned! {path.span()=>
            const _: () = {
                fn merges<__M: __MergeInto<#name>>() {}
                let _ = merges::<#path>;
            };
        }
    });

    quote! {
        #(#absorbs)*

        #[automatically_derived]
        impl<__T> __MergeInto<__T> for #name
        where
            #(#bounds)*
        {
            #[inline]
            fn merge_into(self, #target: &mut __T) {
                #(#moves)*
            }
        }

        #(#checks)*
    }
}
