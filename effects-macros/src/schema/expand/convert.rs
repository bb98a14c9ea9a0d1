//! `Schema` (shape metadata and erasure; `From<Schema> for Effects` is one blanket impl in
//! effects-core) and canonical `Serialize`.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::Names;
use crate::schema::ast::{Cardinality, Kind, Slot};
use crate::util::doc_text;

/// `<BlockedCard as __Datom>`, spanned at the user's type: every use
/// of a slot's type goes through this one path, so a type in the wrong list is reported once,
/// there ("`Card` is not a datom").
pub(super) fn as_trait(slot: &Slot) -> TokenStream {
    let ty = &slot.ty;
    let span = ty.span();
    match slot.kind {
        Kind::Datoms => quote_spanned!(span=> <#ty as __Datom>),
        Kind::Requests => quote_spanned!(span=> <#ty as __Request>),
        Kind::Messages => quote_spanned!(span=> <#ty as __Message>),
    }
}

fn cardinality(c: Cardinality) -> TokenStream {
    match c {
        Cardinality::One => quote!(__Cardinality::One),
        Cardinality::Optional => quote!(__Cardinality::Optional),
        Cardinality::Many => quote!(__Cardinality::Many),
        Cardinality::AtLeastOne => quote!(__Cardinality::AtLeastOne),
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
            let t = as_trait(slot);
            quote!(__slot_shape(#slot_name, #type_name, #card, #t::__MATCHER))
        });
        quote!(&[#(#slots),*])
    });
    let [datom_slots, request_slots, message_slots] = shape_slots;
    let merges = schema
        .merges
        .iter()
        .map(|p| crate::schema::type_string(&syn::Type::Verbatim(quote!(#p))));

    // One call per slot into effects-core's shared erasure, by reference or moving.
    let by_ref = schema.slots.iter().map(|slot| {
        let (t, field) = (as_trait(slot), &slot.name);
        match slot.cardinality {
            Cardinality::One => quote!(#t::__push_ref(&self.#field, &mut effects);),
            Cardinality::Optional => quote!(#t::__push_ref_option(&self.#field, &mut effects);),
            Cardinality::Many | Cardinality::AtLeastOne => {
                quote!(#t::__push_ref_slice(&self.#field, &mut effects);)
            }
        }
    });
    let moved = schema.slots.iter().map(|slot| {
        let (t, field) = (as_trait(slot), &slot.name);
        match slot.cardinality {
            Cardinality::One => quote!(#t::__push(self.#field, &mut effects);),
            Cardinality::Optional => quote!(#t::__push_option(self.#field, &mut effects);),
            Cardinality::Many => quote!(#t::__push_vec(self.#field, &mut effects);),
            Cardinality::AtLeastOne => {
                quote!(#t::__push_vec(__NonEmpty::into_vec(self.#field), &mut effects);)
            }
        }
    });
    let effects_mut = (!schema.slots.is_empty()).then(|| quote!(mut));

    quote! {
        #[automatically_derived]
        impl __Schema for #name {
            const SHAPE: &'static __Shape = &__Shape {
                name: #name_str,
                doc: #doc,
                datoms: #datom_slots,
                requests: #request_slots,
                messages: #message_slots,
                merges: &[#(#merges),*],
            };

            #[inline]
            fn to_effects(&self) -> __Effects {
                let #effects_mut effects = __Effects::default();
                #(#by_ref)*
                effects
            }

            #[inline]
            fn into_effects(self) -> __Effects {
                let #effects_mut effects = __Effects::default();
                #(#moved)*
                effects
            }
        }

        #[automatically_derived]
        impl __Serialize for #name {
            fn serialize<__S: __Serializer>(&self, serializer: __S) -> __Result<__S::Ok, __S::Error> {
                __Serialize::serialize(&__Schema::to_effects(self), serializer)
            }
        }
    }
}
