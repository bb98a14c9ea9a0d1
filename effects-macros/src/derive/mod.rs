//! `#[derive(Datom)]`, `#[derive(Message)]`, `#[derive(Request)]`.

mod datom;
mod fields;
mod message;
mod request;

pub(crate) use datom::derive as datom;
pub(crate) use fields::unknown_key;
pub(crate) use message::derive as message;
pub(crate) use request::derive as request;

use proc_macro2::TokenStream;
use quote::quote;

/// The attributes of every derived impl. `do_not_recommend`: the impl is not listed among "the
/// following types implement" when a type in a schema's wrong list is reported; the trait's own
/// message and note say what to do.
fn impl_attrs() -> TokenStream {
    quote! {
        #[automatically_derived]
        #[diagnostic::do_not_recommend]
    }
}

/// Which derive failed.
pub(crate) enum Derive {
    Datom,
    Message,
    Request,
}

/// The errors, plus an impl of the trait whose bodies are never run, so that the type's uses
/// elsewhere (in `effects!` slots, say) do not pile more errors on the one mistake.
pub(crate) fn with_fallback(
    err: syn::Error,
    input: &syn::DeriveInput,
    derive: Derive,
) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let body = match derive {
        Derive::Datom => quote! {
            ::effects_core::Datom for #ident #ty_generics #where_clause {
                const ENTITY: &'static str = "";
                const IDENTITY: &'static str = "";
                const ATTRIBUTES: &'static [&'static str] = &[];
                fn to_datom(&self) -> ::effects_core::DatomEffect {
                    ::core::unreachable!()
                }
            }
        },
        Derive::Message => quote! {
            ::effects_core::Message for #ident #ty_generics #where_clause {
                const TOPIC: &'static str = "";
                fn to_message(&self) -> ::effects_core::MessageEffect {
                    ::core::unreachable!()
                }
            }
        },
        Derive::Request => quote! {
            ::effects_core::Request for #ident #ty_generics #where_clause {
                const METHOD: ::effects_core::Method = ::effects_core::Method::Get;
                const ENDPOINT: &'static str = "";
                const PATH: &'static str = "";
                fn to_request(&self) -> ::effects_core::RequestEffect {
                    ::core::unreachable!()
                }
            }
        },
    };
    let mut out = err.into_compile_error();
    out.extend(quote!(impl #impl_generics #body));
    out
}
