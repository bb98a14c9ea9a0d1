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
    let has_body = input
        .clone()
        .into_iter()
        .any(|tt| matches!(&tt, proc_macro2::TokenTree::Group(g) if g.delimiter() == proc_macro2::Delimiter::Brace));
    if !input.is_empty() && !has_body {
        // In type position the expansion must be a type: erased effects, carrying the error in a
        // const argument so the function's body adds no errors of its own.
        let error = syn::Error::new_spanned(
            &input,
            "`effects![..]` as a return type needs `#[effect_handler]` on the function; to declare schemas, write `effects! { pub Name { datoms: [...] } }`",
        )
        .into_compile_error();
        // Name the listed types, so their imports are not reported unused on top.
        let types = syn::parse::Parser::parse2(
            syn::punctuated::Punctuated::<syn::Type, syn::Token![|]>::parse_terminated,
            input,
        )
        .map(|t| t.into_iter().collect::<Vec<_>>())
        .unwrap_or_default();
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
