//! `#[derive(Request)]`: `#[request(method = "POST", endpoint = "name", path = "/a/{field}")]`.
//! `{field}` placeholders are filled from the struct's fields (their `Display` form, percent-
//! encoded); the body is the struct's `Serialize` form for `POST`, `PUT` and `PATCH`.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{DeriveInput, LitStr};

use super::fields::{field_ident, named_fields, string_value, unknown_key};
use crate::ctxt::Ctxt;
use crate::util::{did_you_mean, unraw};

const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

enum Piece {
    Literal(String),
    Field(syn::Ident),
}

pub(crate) fn derive(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::new();
    let (mut method, mut endpoint, mut path) = (None::<LitStr>, None::<LitStr>, None::<LitStr>);
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("request")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("method") {
                let lit = string_value(&meta, "#[request(method = \"POST\")]")?;
                let upper = lit.value().to_ascii_uppercase();
                if !METHODS.contains(&upper.as_str()) {
                    let hint = match did_you_mean(&upper, &METHODS) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => "expected GET, HEAD, POST, PUT, PATCH or DELETE".to_owned(),
                    };
                    return Err(syn::Error::new(
                        lit.span(),
                        format!("unknown HTTP method `{}`: {hint}", lit.value()),
                    ));
                }
                method = Some(lit);
            } else if meta.path.is_ident("endpoint") {
                endpoint = Some(string_value(
                    &meta,
                    "#[request(endpoint = \"notifications\")]",
                )?);
            } else if meta.path.is_ident("path") {
                let lit = string_value(&meta, "#[request(path = \"/v1/items/{id}\")]")?;
                if !lit.value().starts_with('/') {
                    return Err(syn::Error::new(
                        lit.span(),
                        format!("the path starts with `/`, as in \"/{}\"", lit.value()),
                    ));
                }
                path = Some(lit);
            } else {
                return Err(unknown_key(
                    &meta,
                    "request",
                    &["method", "endpoint", "path"],
                ));
            }
            Ok(())
        });
        if let Err(e) = parsed {
            cx.syn_error(e);
        }
    }
    let ident = &input.ident;
    let fields = named_fields(input, "Request", &cx);
    if !cx.has_errors() {
        let missing: Vec<&str> = [
            ("method", &method),
            ("endpoint", &endpoint),
            ("path", &path),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k)
        .collect();
        if !missing.is_empty() {
            cx.error_spanned_by(
                ident,
                format!(
                    "`Request` needs {}: add `#[request(method = \"POST\", endpoint = \"name\", path = \"/...\")]` above `struct {ident}`",
                    missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }
    for field in fields.iter().flatten() {
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("request")) {
            cx.error_spanned_by(
                attr,
                "`#[request(..)]` goes on the struct; fields are placed in the path with `{field}` placeholders",
            );
        }
    }
    let field_names: Vec<syn::Ident> = fields.iter().flatten().map(|f| field_ident(f)).collect();
    let pieces = path
        .as_ref()
        .map(|lit| template(lit, &field_names, &cx))
        .unwrap_or_default();
    cx.check()?;
    let (Some(method), Some(endpoint), Some(path)) = (method, endpoint, path) else {
        unreachable!("missing keys were reported above");
    };

    let upper = method.value().to_ascii_uppercase();
    let method_variant = syn::Ident::new(
        match upper.as_str() {
            "GET" => "Get",
            "HEAD" => "Head",
            "POST" => "Post",
            "PUT" => "Put",
            "PATCH" => "Patch",
            _ => "Delete",
        },
        method.span(),
    );
    let type_name = unraw(ident);
    let build_path = pieces.iter().map(|p| match p {
        Piece::Literal(s) => quote!(path.push_str(#s);),
        Piece::Field(f) => quote!(::effects_core::__private::push_segment(&mut path, &self.#f);),
    });
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    // Spanned at the struct's name: a payload that is not `Serialize` is reported there, once.
    let payload_to_value = quote::quote_spanned!(ident.span()=> ::effects_core::__private::to_value::<#ident #ty_generics>);
    let body = if matches!(upper.as_str(), "POST" | "PUT" | "PATCH") {
        quote!(::core::option::Option::Some(#payload_to_value(self, #type_name, "the body")))
    } else {
        quote!(::core::option::Option::None)
    };
    let capacity = path.value().len();
    let impl_attrs = super::impl_attrs();
    Ok(quote! {
        #impl_attrs
        impl #impl_generics ::effects_core::Request for #ident #ty_generics #where_clause {
            const METHOD: ::effects_core::Method = ::effects_core::Method::#method_variant;
            const ENDPOINT: &'static str = #endpoint;
            const PATH: &'static str = #path;

            fn to_request(&self) -> ::effects_core::RequestEffect {
                let mut path = ::std::string::String::with_capacity(#capacity);
                #(#build_path)*
                ::effects_core::RequestEffect {
                    method: Self::METHOD,
                    endpoint: ::std::string::String::from(#endpoint),
                    path,
                    headers: ::std::collections::BTreeMap::new(),
                    body: #body,
                }
            }
        }
    })
}

/// Splits `/a/{id}/b` into literals and fields; each placeholder must be a whole segment naming a
/// field.
fn template(lit: &LitStr, fields: &[syn::Ident], cx: &Ctxt) -> Vec<Piece> {
    let value = lit.value();
    let mut pieces = Vec::new();
    let mut literal = String::new();
    for (i, segment) in value.split('/').enumerate() {
        if i > 0 {
            literal.push('/');
        }
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let name = name.strip_prefix("r#").unwrap_or(name);
            match fields.iter().find(|f| unraw(f) == name) {
                Some(f) => {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    pieces.push(Piece::Field(f.clone()));
                }
                None => {
                    let names: Vec<String> = fields.iter().map(unraw).collect();
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    let hint = match did_you_mean(name, &refs) {
                        Some(s) => format!("did you mean `{{{s}}}`?"),
                        None => format!(
                            "the fields are {}",
                            refs.iter()
                                .map(|r| format!("`{r}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    };
                    cx.error_spanned_by(
                        lit,
                        format!("`{{{name}}}` in the path names no field: {hint}"),
                    );
                }
            }
        } else if segment.contains('{') || segment.contains('}') {
            cx.error_spanned_by(
                lit,
                format!(
                    "`{segment}`: a placeholder is a whole path segment, as in `/items/{{id}}`"
                ),
            );
        } else {
            literal.push_str(segment);
        }
    }
    pieces.push(Piece::Literal(literal));
    pieces.retain(|p| !matches!(p, Piece::Literal(s) if s.is_empty()));
    pieces
}
