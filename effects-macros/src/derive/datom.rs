//! `#[derive(Datom)]`: `#[datom(entity = "card")]` on the struct, one `#[datom(id)]` field; every
//! other field is an attribute `entity/field` (renamed with `#[datom(rename = "..")]`, left out
//! with `#[datom(skip)]`). An `Option` field that is `None` is left out of the datom.
//! `#[datom(expect = "balance")]` makes a field the expected prior value of the attribute of the
//! field `balance` (compare-and-set); it is not an attribute itself.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{DeriveInput, LitStr};

use super::fields::{
    field_ident, named_fields, option_inner, string_value, to_value_fn, unknown_key,
};
use crate::ctxt::Ctxt;
use crate::util::unraw;

struct Attribute {
    name: String,
    field: syn::Ident,
    optional: bool,
    /// The type a value is serialized as: the field's, or `T` of `Option<T>`.
    value_ty: syn::Type,
}

/// A field holding the value another field's attribute must have when the run commits.
struct Expect {
    field: syn::Ident,
    optional: bool,
    value_ty: syn::Type,
    /// The field whose attribute it expects, as written.
    target: LitStr,
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

    let mut id: Option<(syn::Ident, String, syn::Type)> = None;
    let mut attributes: Vec<Attribute> = Vec::new();
    let mut expects: Vec<Expect> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for field in fields.into_iter().flatten() {
        let (mut is_id, mut skip, mut rename) = (false, false, None::<LitStr>);
        let mut expect = None::<LitStr>;
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("datom")) {
            let parsed = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("id") {
                    is_id = true;
                } else if meta.path.is_ident("skip") {
                    skip = true;
                } else if meta.path.is_ident("rename") {
                    rename = Some(string_value(&meta, "#[datom(rename = \"status\")]")?);
                } else if meta.path.is_ident("expect") {
                    expect = Some(string_value(&meta, "#[datom(expect = \"balance\")]")?);
                } else {
                    return Err(unknown_key(
                        &meta,
                        "datom",
                        &["id", "skip", "rename", "expect"],
                    ));
                }
                Ok(())
            });
            if let Err(e) = parsed {
                cx.syn_error(e);
            }
        }
        let fident = field_ident(field);
        if let Some(target) = expect {
            if is_id || skip || rename.is_some() {
                cx.error_spanned_by(
                    &target,
                    "an `expect` field only holds the expected value of another field's attribute: \
                     it cannot also be `id`, `skip` or `rename`",
                );
            }
            expects.push(Expect {
                field: fident,
                optional: option_inner(&field.ty).is_some(),
                value_ty: option_inner(&field.ty).unwrap_or(&field.ty).clone(),
                target,
            });
            continue;
        }
        let name = rename.map_or_else(|| unraw(&fident), |r| r.value());
        if skip {
            skipped.push(unraw(&fident));
        }
        if is_id {
            if let Some((first, _, _)) = &id {
                cx.error_spanned_by(
                    &fident,
                    format!("a datom has one identity: `{first}` is already `#[datom(id)]`"),
                );
            }
            if skip {
                cx.error_spanned_by(&fident, "the `#[datom(id)]` field cannot be skipped");
            }
            if let Some(inner) = option_inner(&field.ty) {
                let inner = crate::schema::type_string(inner);
                cx.error_spanned_by(
                    &field.ty,
                    format!(
                        "the `#[datom(id)]` field names the entity, so it cannot be missing: make it `{inner}`, not an `Option`"
                    ),
                );
            }
            id = Some((fident, name, field.ty.clone()));
        } else if !skip {
            attributes.push(Attribute {
                name,
                optional: option_inner(&field.ty).is_some(),
                value_ty: option_inner(&field.ty).unwrap_or(&field.ty).clone(),
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
    // Each `expect` names an attribute field, once.
    let mut resolved: Vec<(&Expect, String)> = Vec::new();
    for e in &expects {
        let wanted = e.target.value();
        let id_is_target = id.as_ref().is_some_and(|(f, _, _)| unraw(f) == wanted);
        match attributes.iter().find(|a| unraw(&a.field) == wanted) {
            Some(a) if resolved.iter().any(|(_, n)| *n == a.name) => cx.error_spanned_by(
                &e.target,
                format!("the attribute of `{wanted}` already has an `expect` field: keep one"),
            ),
            Some(a) => resolved.push((e, a.name.clone())),
            None if id_is_target => cx.error_spanned_by(
                &e.target,
                format!(
                    "`{wanted}` is the `#[datom(id)]` field: the identity never changes, so there is \
                     nothing to compare; name an attribute field"
                ),
            ),
            None if skipped.contains(&wanted) => cx.error_spanned_by(
                &e.target,
                format!("`{wanted}` is `#[datom(skip)]`: it is not an attribute; name an attribute field"),
            ),
            None => {
                let names: Vec<String> = attributes.iter().map(|a| unraw(&a.field)).collect();
                let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
                let hint = crate::util::did_you_mean(&wanted, &candidates).map_or_else(
                        || format!("the attribute fields are: {}", list(&names)),
                        |m| format!("did you mean `{m}`?"),
                    );
                cx.error_spanned_by(
                    &e.target,
                    format!("`expect` names the field whose attribute it expects, and `{ident}` has no attribute field `{wanted}`: {hint}"),
                );
            }
        }
    }
    cx.check()?;
    let (Some(entity), Some((id_field, id_name, id_ty))) = (entity, id) else {
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
    let value_of = |by_ref: bool, to_value: &TokenStream, what: &str, source: TokenStream| {
        if by_ref {
            quote!(#to_value(#source, #type_name, #what))
        } else {
            quote!(__IntoValue(#source).into_value(#to_value, #type_name, #what))
        }
    };
    // One `datom.attribute(..)` or `datom.expected(..)` call per field.
    let insert = |by_ref: bool,
                  method: TokenStream,
                  field: &syn::Ident,
                  optional: bool,
                  ty: &syn::Type,
                  qualified: &str,
                  what: &str| {
        let to_value = to_value_fn(ty);
        if optional {
            let source = if by_ref {
                quote!(&self.#field)
            } else {
                quote!(self.#field)
            };
            let value = value_of(by_ref, &to_value, what, quote!(value));
            quote! {
                if let __Some(value) = #source {
                    datom.#method(#qualified, #value);
                }
            }
        } else {
            let source = if by_ref {
                quote!(&self.#field)
            } else {
                quote!(self.#field)
            };
            let value = value_of(by_ref, &to_value, what, source);
            quote!(datom.#method(#qualified, #value);)
        }
    };
    let body = |by_ref: bool| {
        let mut out = TokenStream::new();
        for a in &attributes {
            let qualified = format!("{ns}/{}", a.name);
            let what = format!("attribute `{qualified}`");
            out.extend(insert(
                by_ref,
                quote!(attribute),
                &a.field,
                a.optional,
                &a.value_ty,
                &qualified,
                &what,
            ));
        }
        for (e, name) in &resolved {
            let qualified = format!("{ns}/{name}");
            let what = format!("expected value of `{qualified}`");
            out.extend(insert(
                by_ref,
                quote!(expected),
                &e.field,
                e.optional,
                &e.value_ty,
                &qualified,
                &what,
            ));
        }
        out
    };
    let (ref_inserts, move_inserts) = (body(true), body(false));
    let id_what = format!("identity `{identity}`");
    let id_to_value = to_value_fn(&id_ty);
    let id_ref = value_of(true, &id_to_value, &id_what, quote!(&self.#id_field));
    let id_moved = value_of(false, &id_to_value, &id_what, quote!(self.#id_field));
    let mutability = (!attributes.is_empty() || !resolved.is_empty()).then(|| quote!(mut));
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    // Inside the block, the glob import of `__private::names` gives every helper a one-token
    // name (the field types' `__to_value::<T>` too, spanned at the user's type), and brings
    // `__MoveIntoValue` and `__SerializeIntoValue` into scope for `into_value`.
    let impl_attrs = super::impl_attrs();
    Ok(quote! {
        const _: () = {
        use ::effects_core::__private::names::*;
        #impl_attrs
        impl #impl_generics __Datom for #ident #ty_generics #where_clause {
            const ENTITY: &'static str = #ns;
            const IDENTITY: &'static str = #identity;
            const ATTRIBUTES: &'static [&'static str] = &[#(#names),*];

            #[inline]
            fn to_datom(&self) -> __DatomEffect {
                let #mutability datom = __DatomParts::new(#identity, #id_ref);
                #ref_inserts
                datom.finish()
            }

            #[inline]
            fn into_datom(self) -> __DatomEffect {
                let #mutability datom = __DatomParts::new(#identity, #id_moved);
                #move_inserts
                datom.finish()
            }
        }
        };
    })
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
