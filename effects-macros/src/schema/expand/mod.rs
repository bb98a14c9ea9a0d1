//! Code generation for one schema, one file per generated piece.

mod builder;
mod convert;
mod merge;
mod structure;

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote};

use crate::schema::ast::SchemaDef;

/// Names shared by the generated pieces of one schema.
pub(super) struct Names<'a> {
    pub(super) schema: &'a SchemaDef,
    /// `BlockCardBuilder`
    pub(super) builder: Ident,
}

pub(crate) fn schema(schema: &SchemaDef) -> TokenStream {
    let name = &schema.name;
    let names = Names {
        schema,
        // Spanned at the schema's name; see `builder::declaration` for the item's other tokens.
        builder: format_ident!("{}Builder", name, span = name.span()),
    };
    let structure = structure::expand(&names);
    let builder_struct = builder::declaration(&names);
    let state_traits = builder::state_traits(&names);
    let builder_impl = builder::methods(&names);
    let convert = convert::expand(&names);
    let merge = merge::expand(&names);
    // The pieces inside the block name effects-core's items through the glob import of
    // `__private::names` at its top (`__Effects`, `__Datom`): one token instead of up to
    // eight, which the compiler then has less to read. A path spanned at the user's type
    // (`<T as __Datom>`) resolves through the same import, so an error there stays at the
    // user's token.
    quote! {
        #structure
        #builder_struct
        const _: () = {
            use ::effects_core::__private::names::*;
            #state_traits
            #builder_impl
            #convert
            #merge
        };
    }
}
