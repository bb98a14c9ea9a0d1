//! `#[derive(Datom)]`: `#[datom(entity = "card")]` on the struct, one `#[datom(id)]` field; every
//! other field is an attribute `entity/field` (renamed with `#[datom(rename = "..")]`, left out
//! with `#[datom(skip)]`). An `Option` field that is `None` is left out of the datom.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{DeriveInput, LitStr};

use super::fields::{field_ident, is_option, named_fields, string_value, unknown_key};
use crate::ctxt::Ctxt;
use crate::util::unraw;

struct Attribute {
    name: String,
    field: syn::Ident,
    optional: bool,
}

pub(crate) fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::new();
    let mut entity: Option<LitStr> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("datom")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("entity") {
                let lit = string_value(&meta, "#[datom(entity = \"card\")]")?;
                if lit.value().contains('/') {
                    return Err(syn::Error::new(
                        lit.span(),
                        "the entity is a namespace without `/`, as in `#[datom(entity = \"card\")]`",
                    ));
                }
                entity = Some(lit);
                Ok(())
            } else {
                Err(unknown_key(&meta, "datom", &["entity"]))
            }
        });
        if let Err(e) = parsed {
            cx.syn_error(e);
        }
    }
    let fields = named_fields(input, "Datom", &cx);
    let ident = &input.ident;
    if entity.is_none() && !cx.has_errors() {
        cx.error_spanned_by(
            ident,
            format!(
                "`Datom` needs the entity namespace: add `#[datom(entity = \"{}\")]` above `struct {ident}`",
                crate::util::snake_case(&unraw(ident))
            ),
        );
    }

    let mut id: Option<(syn::Ident, String)> = None;
    let mut attributes: Vec<Attribute> = Vec::new();
    for field in fields.into_iter().flatten() {
        let (mut is_id, mut skip, mut rename) = (false, false, None::<LitStr>);
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("datom")) {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("id") {
                    is_id = true;
                } else if meta.path.is_ident("skip") {
                    skip = true;
                } else if meta.path.is_ident("rename") {
                    rename = Some(string_value(&meta, "#[datom(rename = \"status\")]")?);
                } else {
                    return Err(unknown_key(&meta, "datom", &["id", "skip", "rename"]));
                }
                Ok(())
            });
            if let Err(e) = parsed {
                cx.syn_error(e);
            }
        }
        let fident = field_ident(field);
        let name = rename.map_or_else(|| unraw(&fident), |r| r.value());
        if is_id {
            if let Some((first, _)) = &id {
                cx.error_spanned_by(
                    &fident,
                    format!("a datom has one identity: `{first}` is already `#[datom(id)]`"),
                );
            }
            if skip {
                cx.error_spanned_by(&fident, "the `#[datom(id)]` field cannot be skipped");
            }
            id = Some((fident, name));
        } else if !skip {
            attributes.push(Attribute {
                name,
                optional: is_option(&field.ty),
                field: fident,
            });
        }
    }
    if id.is_none() && !cx.has_errors() {
        cx.error_spanned_by(
            ident,
            format!(
                "`Datom` needs an identity: mark the field that names the entity with `#[datom(id)]` in `{ident}`"
            ),
        );
    }
    cx.check()?;
    let (Some(entity), Some((id_field, id_name))) = (entity, id) else {
        unreachable!("errors were reported above");
    };

    let ns = entity.value();
    let identity = format!("{ns}/{id_name}");
    let mut names: Vec<String> = attributes
        .iter()
        .map(|a| format!("{ns}/{}", a.name))
        .collect();
    names.sort();
    let type_name = unraw(ident);
    // `by_ref` reads fields through `&self` and serializes them; otherwise fields are moved
    // out of `self`, and strings (the common case) move into the datom without a copy.
    let inserts = |by_ref: bool| {
        attributes
            .iter()
            .map(|a| {
                let (field, qualified) = (&a.field, format!("{ns}/{}", a.name));
                let what = format!("attribute `{qualified}`");
                let value = if by_ref {
                    quote!(::effects_core::__private::to_value(value, #type_name, #what))
                } else {
                    quote!(::effects_core::__private::IntoValue(value).into_value(#type_name, #what))
                };
                let source = if by_ref {
                    quote!(&self.#field)
                } else {
                    quote!(self.#field)
                };
                let insert = quote! {
                    attributes.insert(::std::string::String::from(#qualified), #value);
                };
                if a.optional {
                    quote! {
                        if let ::core::option::Option::Some(value) = #source {
                            #insert
                        }
                    }
                } else {
                    quote! {
                        let value = #source;
                        #insert
                    }
                }
            })
            .collect::<TokenStream>()
    };
    let (ref_inserts, move_inserts) = (inserts(true), inserts(false));
    let id_what = format!("identity `{identity}`");
    let mutability = (!attributes.is_empty()).then(|| quote!(mut));
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::effects_core::Datom for #ident #ty_generics #where_clause {
            const ENTITY: &'static str = #ns;
            const IDENTITY: &'static str = #identity;
            const ATTRIBUTES: &'static [&'static str] = &[#(#names),*];

            fn to_datom(&self) -> ::effects_core::DatomEffect {
                let #mutability attributes = ::std::collections::BTreeMap::new();
                #ref_inserts
                ::effects_core::DatomEffect {
                    entity: ::effects_core::LookupRef {
                        attribute: ::std::string::String::from(#identity),
                        value: ::effects_core::__private::to_value(&self.#id_field, #type_name, #id_what),
                    },
                    op: ::effects_core::Op::Assert,
                    attributes,
                }
            }

            fn into_datom(self) -> ::effects_core::DatomEffect {
                #[allow(unused_imports)]
                use ::effects_core::__private::{MoveIntoValue as _, SerializeIntoValue as _};
                let #mutability attributes = ::std::collections::BTreeMap::new();
                #move_inserts
                ::effects_core::DatomEffect {
                    entity: ::effects_core::LookupRef {
                        attribute: ::std::string::String::from(#identity),
                        value: ::effects_core::__private::IntoValue(self.#id_field).into_value(#type_name, #id_what),
                    },
                    op: ::effects_core::Op::Assert,
                    attributes,
                }
            }
        }
    })
}
