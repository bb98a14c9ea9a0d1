//! Expansion snapshots: the generated code of representative inputs, pretty-printed and compared
//! with the reviewed files in `src/snapshots`, so every codegen change shows up in a diff.

use proc_macro2::TokenStream;
use quote::quote;

fn pretty(tokens: TokenStream) -> String {
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(e) => panic!("generated code does not parse ({e}):\n{tokens}"),
    }
}

fn expand_schema(input: TokenStream) -> String {
    pretty(crate::schema::effects(input).unwrap_or_else(syn::Error::into_compile_error))
}

fn expand_derive(
    input: TokenStream,
    derive: fn(&syn::DeriveInput) -> syn::Result<TokenStream>,
) -> String {
    let parsed: syn::DeriveInput = syn::parse2(input).expect("derive input parses");
    pretty(derive(&parsed).unwrap_or_else(syn::Error::into_compile_error))
}

#[test]
fn one_datom_one_message() {
    insta::assert_snapshot!(expand_schema(quote! {
        /// Blocking one card.
        pub BlockCard {
            datoms:   [one BlockedCard],
            messages: [one StatusChanged],
        }
    }));
}

#[test]
fn every_cardinality_and_merges() {
    insta::assert_snapshot!(expand_schema(quote! {
        /// Blocking every card of a customer.
        pub BlockAll {
            datoms:   [many BlockedCard],
            requests: [optional NotifyCustomer as notify],
            messages: [at_least_one StatusChanged, one CardsBlockedNotify],
            merges:   [BlockCard],
        }
    }));
}

#[test]
fn no_slots() {
    insta::assert_snapshot!(expand_schema(quote! {
        pub(crate) Nothing {}
    }));
}

#[test]
fn recovered_mistake_still_expands() {
    // `datom` is reported, then read as `datoms`: the schema still expands.
    insta::assert_snapshot!(expand_schema(quote! {
        pub SaveCard { datom: [one BlockedCard] }
    }));
}

#[test]
fn derive_datom() {
    insta::assert_snapshot!(expand_derive(
        quote! {
            #[datom(entity = "card")]
            pub struct BlockedCard {
                #[datom(id)]
                pub id: String,
                pub status: CardStatus,
                #[datom(rename = "blocked_by")]
                pub by: Option<String>,
                #[datom(skip)]
                pub cached: u32,
            }
        },
        crate::derive::datom
    ));
}

#[test]
fn derive_message() {
    insta::assert_snapshot!(expand_derive(
        quote! {
            #[message(topic = "card-status-changed")]
            pub struct StatusChanged {
                #[message(key)]
                pub card_id: String,
                pub status: CardStatus,
            }
        },
        crate::derive::message
    ));
}

#[test]
fn derive_request() {
    insta::assert_snapshot!(expand_derive(
        quote! {
            #[request(method = "POST", endpoint = "notifications", path = "/customers/{customer_id}/notify")]
            pub struct NotifyCustomer {
                pub customer_id: String,
                pub text: String,
            }
        },
        crate::derive::request
    ));
}

fn expand_handler(args: TokenStream, item: TokenStream) -> String {
    pretty(crate::handler::effect_handler(args, item))
}

#[test]
fn handler_with_one_parameter() {
    insta::assert_snapshot!(expand_handler(
        quote!(topic = "card-block-requested"),
        quote! {
            /// Blocks one card.
            pub fn block(card: &Card) -> effects![BlockCard | Empty] {
                if !card.can_block() {
                    return Empty.into();
                }
                BlockCard::builder().build().into()
            }
        }
    ));
}

#[test]
fn handler_with_several_parameters() {
    insta::assert_snapshot!(expand_handler(
        TokenStream::new(),
        quote! {
            pub(crate) fn block_all(customer: &Customer, cards: &[Card], reason: String) -> effects![BlockAll] {
                let _ = (customer, cards, reason);
                BlockAll::builder().build().into()
            }
        }
    ));
}
