//! `#[effect_handler]`: parse → check → expand.

mod ast;
mod expand;

use proc_macro2::TokenStream;

use crate::ctxt::Ctxt;

pub(crate) fn effect_handler(args: TokenStream, item: TokenStream) -> TokenStream {
    let cx = Ctxt::new();
    let handler = match ast::parse(args, item.clone(), &cx) {
        Ok(h) => h,
        Err(e) => {
            // Nothing usable: report, and keep the user's item so the rest of the crate (and the
            // IDE) still sees the function.
            let mut out = cx.into_compile_errors();
            out.extend(e.into_compile_error());
            out.extend(item);
            return out;
        }
    };
    let mut out = expand::expand(&handler, cx.has_errors());
    out.extend(cx.into_compile_errors());
    out
}
