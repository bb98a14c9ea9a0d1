//! What the three derives share: named fields, `key = "value"` attributes with did-you-mean.

use proc_macro2::{Ident, Span};
use syn::meta::ParseNestedMeta;
use syn::{Data, DeriveInput, Field, Fields, LitStr};

use crate::ctxt::Ctxt;
use crate::util::did_you_mean;

/// The named fields of a struct, or an error that says the derive needs them.
pub(crate) fn named_fields<'a>(
    input: &'a DeriveInput,
    derive: &str,
    cx: &Ctxt,
) -> Option<Vec<&'a Field>> {
    match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(named) => Some(named.named.iter().collect()),
            _ => {
                cx.error_spanned_by(
                    &input.ident,
                    format!(
                        "`{derive}` needs a struct with named fields: its fields become the {}",
                        what(derive)
                    ),
                );
                None
            }
        },
        Data::Enum(e) => {
            cx.syn_error(syn::Error::new(
                e.enum_token.span,
                format!("`{derive}` cannot be derived for an enum: use a struct with named fields"),
            ));
            None
        }
        Data::Union(u) => {
            cx.syn_error(syn::Error::new(
                u.union_token.span,
                format!("`{derive}` cannot be derived for a union: use a struct with named fields"),
            ));
            None
        }
    }
}

fn what(derive: &str) -> &'static str {
    match derive {
        "Datom" => "datom's attributes",
        _ => "payload",
    }
}

/// Reports an unknown key of `#[attr(..)]`, suggesting the closest known one.
pub(crate) fn unknown_key(meta: &ParseNestedMeta<'_>, attr: &str, known: &[&str]) -> syn::Error {
    let key = meta
        .path
        .get_ident()
        .map_or_else(|| "?".to_owned(), ToString::to_string);
    let list = known
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = match did_you_mean(&key, known) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("expected one of {list}"),
    };
    meta.error(format!("unknown `#[{attr}(..)]` key `{key}`: {hint}"))
}

/// `key = "value"` with a non-empty string value.
pub(crate) fn string_value(meta: &ParseNestedMeta<'_>, example: &str) -> syn::Result<LitStr> {
    let lit: LitStr = meta
        .value()?
        .parse()
        .map_err(|e| syn::Error::new(e.span(), format!("expected a string, as in `{example}`")))?;
    if lit.value().is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            format!("must not be empty, as in `{example}`"),
        ));
    }
    Ok(lit)
}

/// Whether the type is written `Option<..>` (or `core::option::Option<..>`).
pub(crate) fn is_option(ty: &syn::Type) -> bool {
    option_inner(ty).is_some()
}

/// `T` of a type written `Option<T>` (or `core::option::Option<T>`).
pub(crate) fn option_inner(ty: &syn::Type) -> Option<&syn::Type> {
    match ty {
        syn::Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last()?;
            if last.ident != "Option" {
                return None;
            }
            match &last.arguments {
                syn::PathArguments::AngleBracketed(args) if args.args.len() == 1 => {
                    match args.args.first()? {
                        syn::GenericArgument::Type(t) => Some(t),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        syn::Type::Group(g) => option_inner(&g.elem),
        _ => None,
    }
}

/// `__to_value::<T>` (through the glob import at the top of `#[derive(Datom)]`'s block) spanned
/// at the user's `T`, so that a type that is not `Serialize` is reported at the field, once:
/// every use for one field is this same path.
pub(crate) fn to_value_fn(ty: &syn::Type) -> proc_macro2::TokenStream {
    let span = syn::spanned::Spanned::span(ty);
    quote::quote_spanned!(span=> __to_value::<#ty>)
}

/// The field's identifier (named fields always have one).
pub(crate) fn field_ident(field: &Field) -> Ident {
    field
        .ident
        .clone()
        .unwrap_or_else(|| Ident::new("_", Span::call_site()))
}
