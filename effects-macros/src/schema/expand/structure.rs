//! The schema struct: one public field per slot.

use proc_macro2::TokenStream;
use quote::quote;

use super::Names;
use crate::schema::ast::{Cardinality, Slot};

/// The field's type for a slot's cardinality.
pub(super) fn field_type(slot: &Slot) -> TokenStream {
    let ty = &slot.ty;
    match slot.cardinality {
        Cardinality::One => quote!(#ty),
        Cardinality::Optional => quote!(::core::option::Option<#ty>),
        Cardinality::Many => quote!(::std::vec::Vec<#ty>),
        Cardinality::AtLeastOne => quote!(::effects_core::NonEmpty<#ty>),
    }
}

/// "Exactly one `BlockedCard` datom."
pub(super) fn slot_summary(slot: &Slot) -> String {
    let ty = slot.type_str();
    let what = slot.kind.singular();
    match slot.cardinality {
        Cardinality::One => format!("Exactly one `{ty}` {what}."),
        Cardinality::Optional => format!("At most one `{ty}` {what}."),
        Cardinality::Many => format!("Any number of `{ty}` {what}s."),
        Cardinality::AtLeastOne => format!("One or more `{ty}` {what}s."),
    }
}

pub(super) fn expand(names: &Names<'_>) -> TokenStream {
    let schema = names.schema;
    let (attrs, vis, name) = (&schema.attrs, &schema.vis, &schema.name);
    let has_docs = attrs.iter().any(|a| a.path().is_ident("doc"));
    let intro = (!has_docs).then(|| {
        let line = format!(" Effects schema `{name}`.");
        quote!(#[doc = #line])
    });
    let mut table = String::from("\n\n| kind | slot | cardinality | type |\n|---|---|---|---|\n");
    for slot in &schema.slots {
        table.push_str(&format!(
            "| {} | `{}` | `{}` | `{}` |\n",
            slot.kind.key(),
            slot.name_str(),
            slot.cardinality.keyword(),
            slot.type_str()
        ));
    }
    if schema.slots.is_empty() {
        table = "\n\nNo effects.".to_owned();
    }
    let builder_line = format!(
        "\n\nBuild it with [`{name}::builder`]; merge other schemas into it with [`{name}::merge`]."
    );
    let fields = schema.slots.iter().map(|slot| {
        let field = &slot.name;
        let ty = field_type(slot);
        let docs = &slot.docs;
        let doc = (slot.docs.is_empty()).then(|| {
            let line = format!(" {}", slot_summary(slot));
            quote!(#[doc = #line])
        });
        quote! {
            #(#docs)*
            #doc
            pub #field: #ty,
        }
    });
    quote! {
        #intro
        #(#attrs)*
        #[doc = #table]
        #[doc = #builder_line]
        #vis struct #name {
            #(#fields)*
        }
    }
}
