//! `effects!`: parse → check → expand.

mod ast;
mod check;
mod expand;

use proc_macro2::TokenStream;

use crate::ctxt::Ctxt;

pub(crate) use ast::type_string;

pub(crate) fn effects(input: TokenStream) -> syn::Result<TokenStream> {
    // `effects![A | B]` as a return type is rewritten by `#[effect_handler]`; reaching here means
    // the attribute is missing.
    if let Some(types) = return_type_use(&input) {
        // In type position the expansion must be a type: erased effects, carrying the error in a
        // const argument so the function's body adds no errors of its own.
        let error = syn::Error::new_spanned(
            &input,
            "`effects![..]` as a return type needs `#[effect_handler]` on the function; to declare schemas, write `effects! { pub Name { datoms: [...] } }`",
        )
        .into_compile_error();
        // Name the listed types, so their imports are not reported unused on top.
        return Ok(quote::quote! {
            <() as ::effects_core::__private::Erased<{
                #error;
                let _: ::core::marker::PhantomData<(#(#types,)*)> = ::core::marker::PhantomData;
                0
            }>>::Effects
        });
    }
    let cx = Ctxt::new();
    let mut parsed = match ast::parse(input, &cx) {
        Ok(p) => p,
        Err(e) => {
            // Report the recoverable mistakes found before the syntax error as well.
            let mut errors = cx.into_compile_errors();
            errors.extend(e.into_compile_error());
            return Ok(errors);
        }
    };
    check::check(&mut parsed, &cx);
    let mut out = TokenStream::new();
    for schema in &parsed.schemas {
        out.extend(expand::schema(schema));
    }
    out.extend(cx.into_compile_errors());
    Ok(out)
}

/// The types of `effects![A | B]` written as a type, or `None` for a declaration. Input that reads
/// as a declaration (an attribute, a visibility, a `{ .. }` body, or anything that is not a list
/// of types) is parsed as one, so a malformed schema is reported by the schema parser (``expected
/// `{` ``), not as a misplaced return type.
fn return_type_use(input: &TokenStream) -> Option<Vec<syn::Type>> {
    use proc_macro2::{Delimiter, TokenTree};
    let mut tokens = input.clone().into_iter();
    match tokens.next()? {
        TokenTree::Punct(p) if p.as_char() == '#' => return None,
        TokenTree::Ident(i) if i == "pub" || i == "struct" => return None,
        _ => {}
    }
    let has_body = input
        .clone()
        .into_iter()
        .any(|tt| matches!(&tt, TokenTree::Group(g) if g.delimiter() == Delimiter::Brace));
    if has_body {
        return None;
    }
    syn::parse::Parser::parse2(
        syn::punctuated::Punctuated::<syn::Type, syn::Token![|]>::parse_terminated,
        input.clone(),
    )
    .ok()
    .map(|t| t.into_iter().collect())
}
