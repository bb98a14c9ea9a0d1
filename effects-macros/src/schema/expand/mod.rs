//! Code generation for one schema, one file per generated piece.

mod builder;
mod convert;
mod merge;
mod structure;

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote};

use crate::schema::ast::SchemaDef;
use crate::util::snake_case;

/// Names shared by the generated pieces of one schema.
pub(super) struct Names<'a> {
    pub(super) schema: &'a SchemaDef,
    /// `BlockCardBuilder`
    pub(super) builder: Ident,
    /// `__effects_block_card`: the hidden module holding the typestate traits.
    pub(super) state_mod: Ident,
}

pub(crate) fn schema(schema: &SchemaDef) -> TokenStream {
    let name = &schema.name;
    let names = Names {
        schema,
        // Spanned at the schema's name: "method not found for this struct" points there.
        builder: format_ident!("{}Builder", name, span = name.span()),
        state_mod: format_ident!("__effects_{}", snake_case(&crate::util::unraw(name))),
    };
    let structure = structure::expand(&names);
    let builder_struct = builder::declaration(&names);
    let state_mod = builder::state_module(&names);
    let builder_impl = builder::methods(&names);
    let convert = convert::expand(&names);
    let merge = merge::expand(&names);
    let body = short_paths(quote! {
        #builder_impl
        #convert
        #merge
    });
    quote! {
        #structure
        #builder_struct
        #state_mod
        const _: () = {
            #[allow(unused_imports)]
            use ::effects_core as __effects_core;
            #[allow(unused_imports)]
            use ::effects_core::__private as __effects_private;
            #body
        };
    }
}

/// Keywords after which `::` starts a path.
const KEYWORDS_BEFORE_PATHS: [&str; 17] = [
    "as", "impl", "for", "dyn", "where", "in", "mut", "return", "let", "const", "type", "unsafe",
    "move", "ref", "match", "if", "use",
];

/// `::effects_core::__private::X` → `__effects_private::X` and `::effects_core::X` →
/// `__effects_core::X`, through the `use`s at the top of the block: the same items in a third of
/// the tokens, which the compiler then has less to read. The alias takes the span of the path's
/// first token, so an error spanned at the user's type stays there.
fn short_paths(tokens: TokenStream) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    let tts: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out = Vec::with_capacity(tts.len());
    let colons = |i: usize| {
        matches!((tts.get(i), tts.get(i + 1)), (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
            if a.as_char() == ':' && a.spacing() == proc_macro2::Spacing::Joint && b.as_char() == ':')
    };
    let ident_is =
        |i: usize, name: &str| matches!(tts.get(i), Some(TokenTree::Ident(id)) if id == name);
    let mut i = 0;
    while i < tts.len() {
        // A path start: `::` not after a name or `>` (the middle of a path), keywords aside.
        let starts_path = colons(i)
            && match out.last() {
                Some(TokenTree::Ident(id)) => KEYWORDS_BEFORE_PATHS.iter().any(|k| id == k),
                Some(TokenTree::Punct(p)) => {
                    p.as_char() != '>'
                        && !(p.as_char() == ':' && p.spacing() == proc_macro2::Spacing::Joint)
                }
                _ => true,
            };
        if starts_path && ident_is(i + 2, "effects_core") && colons(i + 3) {
            let span = tts[i].span();
            if ident_is(i + 5, "__private") && colons(i + 6) {
                out.push(TokenTree::Ident(proc_macro2::Ident::new(
                    "__effects_private",
                    span,
                )));
                i += 6;
            } else {
                out.push(TokenTree::Ident(proc_macro2::Ident::new(
                    "__effects_core",
                    span,
                )));
                i += 3;
            }
            continue;
        }
        match &tts[i] {
            TokenTree::Group(g) => {
                let mut group = Group::new(g.delimiter(), short_paths(g.stream()));
                group.set_span(g.span());
                out.push(TokenTree::Group(group));
            }
            other => out.push(other.clone()),
        }
        i += 1;
    }
    out.into_iter().collect()
}
