//! `effects!`: parse → check → expand.

mod ast;
mod check;
mod expand;

use proc_macro2::TokenStream;

use crate::ctxt::Ctxt;

pub(crate) use ast::type_string;

pub(crate) fn effects(input: TokenStream) -> syn::Result<TokenStream> {
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
