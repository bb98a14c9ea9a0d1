//! The handler function → model, with every rule that makes it a pure handler checked here and
//! reported at the offending token.

use std::collections::BTreeMap;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, LitStr, Pat, ReturnType, Token, Type};

use crate::ctxt::Ctxt;
use crate::util::unraw;

/// One parameter and how the owned input holds it.
pub(crate) struct Param {
    pub(crate) name: Ident,
    /// The input's field type: `&Card` → `Card`, `&[Card]` → `Vec<Card>`, `&str` → `String`.
    pub(crate) owned: TokenStream,
    /// Whether the function takes it by reference (the input is borrowed when calling).
    pub(crate) by_ref: bool,
}

/// The union of schemas in `effects![A | B]`.
pub(crate) struct Union {
    /// `(variant name, schema type)`.
    pub(crate) members: Vec<(Ident, Type)>,
    /// The macro's path as written (`effects`), invoked empty by the expansion so that the import
    /// it came through counts as used.
    pub(crate) macro_path: syn::Path,
}

pub(crate) struct Handler {
    pub(crate) item: ItemFn,
    pub(crate) topic: Option<LitStr>,
    /// `key = transfer.id`: the business key, an expression over the parameters.
    pub(crate) key: Option<syn::Expr>,
    pub(crate) name: String,
    pub(crate) params: Vec<Param>,
    /// `None` when the return type was unusable (reported).
    pub(crate) union: Option<Union>,
}

pub(crate) fn parse(args: TokenStream, item: TokenStream, cx: &Ctxt) -> syn::Result<Handler> {
    let item: ItemFn = syn::parse2(item).map_err(|e| {
        syn::Error::new(
            e.span(),
            "`#[effect_handler]` goes on a function: `fn name(input: &Input) -> effects![Schema]`",
        )
    })?;
    let (mut topic, mut name) = (None::<LitStr>, None::<LitStr>);
    let mut key = None::<syn::Expr>;
    if !args.is_empty() {
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("topic") {
                topic = Some(non_empty(
                    meta.value()?.parse()?,
                    "topic = \"card-block-requested\"",
                )?);
                Ok(())
            } else if meta.path.is_ident("name") {
                name = Some(non_empty(meta.value()?.parse()?, "name = \"block\"")?);
                Ok(())
            } else if meta.path.is_ident("key") {
                key = Some(meta.value()?.parse()?);
                Ok(())
            } else {
                Err(crate::derive::unknown_key(
                    &meta,
                    "effect_handler",
                    &["topic", "name", "key"],
                ))
            }
        });
        // A mistake in the arguments is reported and the rest of the handler still expands, so
        // its `effects![..]` return type adds no error of its own.
        if let Err(e) = syn::parse::Parser::parse2(parser, args) {
            cx.syn_error(e);
        }
    }
    let sig = &item.sig;
    if let Some(a) = &sig.asyncness {
        cx.error_spanned_by(
            a,
            "a handler cannot be `async`: it is a pure function that returns effects; the executor does the I/O (remove `async`)",
        );
    }
    if let syn::Safety::Unsafe(u) = &sig.safety {
        cx.error_spanned_by(
            u,
            "a handler cannot be `unsafe`: it is a pure function (remove `unsafe`)",
        );
    }
    if let Some(abi) = &sig.abi {
        cx.error_spanned_by(abi, "a handler cannot have an `extern` ABI (remove it)");
    }
    if let Some(v) = &sig.variadic {
        cx.error_spanned_by(v, "a handler cannot be variadic");
    }
    for param in &sig.generics.params {
        if !matches!(param, syn::GenericParam::Lifetime(_)) {
            cx.error_spanned_by(
                param,
                "a handler cannot be generic: the worker decodes its input into one concrete type",
            );
        }
    }
    let params = parse_params(&item, cx);
    if let Some(key) = &key {
        check_key(key, &params, &item, cx);
    }
    let union = parse_return(&item, cx);
    let name = name.map_or_else(|| unraw(&sig.ident), |n| n.value());
    Ok(Handler {
        item,
        topic,
        key,
        name,
        params,
        union,
    })
}

/// `key = ..` must read the input: its base is one of the parameters, reached through fields,
/// method calls, indexing, references or parentheses (`transfer.id`, `order.id.to_string()`).
fn check_key(key: &syn::Expr, params: &[Param], item: &ItemFn, cx: &Ctxt) {
    fn base(expr: &syn::Expr) -> Option<&syn::Expr> {
        match expr {
            syn::Expr::Field(f) => base(&f.base),
            syn::Expr::MethodCall(m) => base(&m.receiver),
            syn::Expr::Index(i) => base(&i.expr),
            syn::Expr::Reference(r) => base(&r.expr),
            syn::Expr::Paren(p) => base(&p.expr),
            syn::Expr::Group(g) => base(&g.expr),
            syn::Expr::Path(_) => Some(expr),
            _ => None,
        }
    }
    let names: Vec<String> = params.iter().map(|p| unraw(&p.name)).collect();
    let fn_name = unraw(&item.sig.ident);
    let example = names.first().map_or("input", String::as_str);
    if names.is_empty() {
        cx.error_spanned_by(
            key,
            format!("`{fn_name}` has no parameters, so there is no input to take a key from: remove `key = ..`"),
        );
        return;
    }
    let Some(syn::Expr::Path(path)) = base(key) else {
        cx.error_spanned_by(
            key,
            format!("`key` is read from the handler's input: write an expression over a parameter, such as `key = {example}.id`"),
        );
        return;
    };
    let Some(ident) = path.path.get_ident().filter(|_| path.qself.is_none()) else {
        cx.error_spanned_by(
            path,
            format!("`key` is read from the handler's input: start it with a parameter of `{fn_name}`, such as `key = {example}.id`"),
        );
        return;
    };
    let wanted = unraw(ident);
    if !names.contains(&wanted) {
        let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
        let hint = crate::util::did_you_mean(&wanted, &candidates).map_or_else(
            || {
                let list: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
                format!("its parameters are {}", list.join(", "))
            },
            |m| format!("did you mean `{m}`?"),
        );
        cx.error_spanned_by(
            ident,
            format!("`{wanted}` is not a parameter of `{fn_name}`: the key is read from the input; {hint}"),
        );
    }
}

fn non_empty(lit: LitStr, example: &str) -> syn::Result<LitStr> {
    if lit.value().is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            format!("must not be empty, as in `{example}`"),
        ));
    }
    Ok(lit)
}

fn parse_params(item: &ItemFn, cx: &Ctxt) -> Vec<Param> {
    let many = item.sig.inputs.len() > 1;
    let mut params = Vec::new();
    for (index, input) in item.sig.inputs.iter().enumerate() {
        let pat_type = match input {
            FnArg::Receiver(r) => {
                cx.error_spanned_by(
                    r,
                    "a handler is a free function: move it out of the `impl` block and take what it needs as parameters",
                );
                continue;
            }
            FnArg::Typed(t) => t,
        };
        let name = match &*pat_type.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => p.ident.clone(),
            Pat::Wild(_) | Pat::Ident(_) | Pat::Tuple(_) | Pat::Struct(_) | Pat::TupleStruct(_)
                if !many =>
            {
                Ident::new("input", Span::call_site())
            }
            other => {
                cx.error_spanned_by(
                    other,
                    "a handler with several parameters names each one (`customer: &Customer`): the names are the input's JSON fields",
                );
                Ident::new(&format!("arg{index}"), other.span())
            }
        };
        if let Some((owned, by_ref)) = owned_type(&pat_type.ty, cx) {
            params.push(Param {
                name,
                owned,
                by_ref,
            });
        }
    }
    params
}

/// The owned type a parameter is decoded into, and whether the parameter borrows it.
fn owned_type(ty: &Type, cx: &Ctxt) -> Option<(TokenStream, bool)> {
    match ty {
        Type::Reference(r) => {
            if let Some(m) = &r.mutability {
                let amp = r.and_token;
                cx.error_spanned_by(
                    quote::quote!(#amp #m),
                    "a handler cannot take `&mut`: it must not change its inputs; take `&T` and return the change as effects",
                );
                return None;
            }
            match &*r.elem {
                Type::Slice(s) => {
                    let elem = &s.elem;
                    Some((quote::quote!(::std::vec::Vec<#elem>), true))
                }
                Type::Path(p) if p.qself.is_none() && p.path.is_ident("str") => {
                    Some((quote::quote!(::std::string::String), true))
                }
                Type::TraitObject(_) | Type::ImplTrait(_) => {
                    cx.error_spanned_by(
                        ty,
                        "a handler's input is decoded from a message, so it takes concrete types, not trait objects",
                    );
                    None
                }
                elem => Some((elem.to_token_stream(), true)),
            }
        }
        Type::ImplTrait(_) | Type::TraitObject(_) => {
            cx.error_spanned_by(
                ty,
                "a handler's input is decoded from a message, so it takes concrete types, not `impl Trait`",
            );
            None
        }
        Type::Ptr(_) => {
            cx.error_spanned_by(ty, "a handler cannot take raw pointers: take `&T` or `T`");
            None
        }
        other => Some((other.to_token_stream(), false)),
    }
}

fn parse_return(item: &ItemFn, cx: &Ctxt) -> Option<Union> {
    let ty = match &item.sig.output {
        ReturnType::Default => {
            cx.error_spanned_by(
                &item.sig.ident,
                "a handler returns its effects: add a return type such as `-> effects![BlockCard | Empty]`",
            );
            return None;
        }
        ReturnType::Type(_, ty) => ty,
    };
    let mac = match &**ty {
        Type::Macro(m)
            if m.mac
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "effects") =>
        {
            &m.mac
        }
        other => {
            let shown = crate::schema::type_string(other);
            cx.error_spanned_by(
                other,
                format!(
                    "write a handler's return type as a union of schemas: `effects![{shown}]`, or `effects![{shown} | Empty]`"
                ),
            );
            return None;
        }
    };
    let types = match mac.parse_body_with(Punctuated::<Type, Token![|]>::parse_terminated) {
        Ok(t) => t,
        Err(e) => {
            cx.syn_error(syn::Error::new(
                e.span(),
                "expected schemas separated by `|`, as in `effects![BlockCard | Empty]`",
            ));
            return None;
        }
    };
    if types.is_empty() {
        cx.error_spanned_by(
            mac,
            "a handler returns at least one schema: `effects![BlockCard]`; to return nothing, `effects![Empty]`",
        );
        return None;
    }
    let mut seen: BTreeMap<String, Type> = BTreeMap::new();
    let mut members = Vec::new();
    for ty in types {
        let Some(variant) = variant_name(&ty) else {
            cx.error_spanned_by(
                &ty,
                "a union lists schemas by name, as in `effects![BlockCard | Empty]`",
            );
            continue;
        };
        let key = unraw(&variant);
        if seen.contains_key(&key) {
            cx.error_spanned_by(
                &ty,
                format!("`{key}` is listed twice in this union: list each schema once"),
            );
            continue;
        }
        seen.insert(key, ty.clone());
        members.push((variant, ty));
    }
    (!members.is_empty()).then(|| Union {
        members,
        macro_path: mac.path.clone(),
    })
}

fn variant_name(ty: &Type) -> Option<Ident> {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last()?;
            matches!(last.arguments, syn::PathArguments::None).then(|| last.ident.clone())
        }
        Type::Group(g) => variant_name(&g.elem),
        Type::Paren(p) => variant_name(&p.elem),
        _ => None,
    }
}
