//! The typestate builder: its declaration, the state traits whose
//! `#[diagnostic::on_unimplemented]` messages are the compile errors users read, and its methods.
//!
//! Every `one`, `optional` and `at_least_one` slot gets a type parameter that is
//! `effects_core::__private::Unset` or `Set`. `build()` requires the `one` and `at_least_one`
//! parameters to be `Set`, through one trait per such slot (its message names the setter),
//! declared inside the schema's `const _` block; the setter of a `one` or `optional` slot
//! requires `Unset`, through one of six traits effects-core shares between all schemas (its
//! message names the schema and the type, at the second call). Both are `where` clauses on the
//! method rather than on the impl, so a violation is reported as the trait's message at the
//! user's call instead of "method not found".

use proc_macro2::{Ident, TokenStream};
use quote::{format_ident, quote, quote_spanned};

use super::Names;
use super::structure::slot_summary;
use crate::schema::ast::{Cardinality, Kind, Slot};

/// The type parameter tracking a slot, if the slot is tracked.
fn state_param(index: usize) -> Ident {
    format_ident!("__S{}", index)
}

/// `blocked_card` → `BlockedCard`
fn camel(slot: &Slot) -> String {
    slot.name_str()
        .split('_')
        .filter(|s| !s.is_empty())
        .map(|s| {
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn is_set_trait(slot: &Slot) -> Ident {
    format_ident!("__{}IsSet", camel(slot))
}

/// The shared bound of a `one` or `optional` slot's setter (`__OneDatomUnset<Schema, T>`): the
/// state must still be `Unset`. One trait per kind and amount in effects-core instead of one per
/// slot here; its message names the schema and the type, at the second call.
fn unset_bound(schema: &Ident, slot: &Slot) -> TokenStream {
    let trait_name = match (slot.cardinality, slot.kind) {
        (Cardinality::One, Kind::Datoms) => "__OneDatomUnset",
        (Cardinality::One, Kind::Requests) => "__OneRequestUnset",
        (Cardinality::One, Kind::Messages) => "__OneMessageUnset",
        (_, Kind::Datoms) => "__OptionalDatomUnset",
        (_, Kind::Requests) => "__OptionalRequestUnset",
        (_, Kind::Messages) => "__OptionalMessageUnset",
    };
    let trait_name = Ident::new(trait_name, proc_macro2::Span::call_site());
    let ty = &slot.ty;
    quote!(#trait_name<#schema, #ty>)
}

/// The tracked slots with their type parameters.
fn tracked<'a>(names: &'a Names<'_>) -> Vec<(&'a Slot, Ident)> {
    names
        .schema
        .slots
        .iter()
        .filter(|s| s.cardinality.tracked())
        .enumerate()
        .map(|(i, s)| (s, state_param(i)))
        .collect()
}

/// A typestate bound spanned at the slot's type in the user's `effects!` block, so that "required
/// by this bound" points at the slot (`one BlockedCard`) rather than at the whole invocation.
fn slot_bound(slot: &Slot, bound: TokenStream) -> TokenStream {
    let span = syn::spanned::Spanned::span(&slot.ty);
    bound
        .into_iter()
        .map(|mut tt| {
            tt.set_span(span);
            tt
        })
        .collect()
}

pub(super) fn declaration(names: &Names<'_>) -> TokenStream {
    let schema = names.schema;
    let (vis, builder) = (&schema.vis, &names.builder);
    let params: Vec<Ident> = tracked(names).into_iter().map(|(_, p)| p).collect();
    let fields = schema.slots.iter().map(|slot| {
        let (name, ty) = (&slot.name, &slot.ty);
        match slot.cardinality {
            Cardinality::One | Cardinality::Optional => {
                quote!(#name: ::core::option::Option<#ty>,)
            }
            Cardinality::Many | Cardinality::AtLeastOne => quote!(#name: ::std::vec::Vec<#ty>,),
        }
    });
    let doc = format!(
        " Builds a [`{}`]: one setter call per effect, then `.build()`, which compiles only once every required slot is filled.",
        schema.name
    );
    // The keyword, the generics' brackets and the braces spanned at the schema's body, the name
    // at the schema's name: the item's span, which rustc labels "method not found for this
    // struct" when a setter the schema does not have is called, then runs from the name through
    // the declared slots (`pub Freeze { datoms: [..] }`), so the error shows which schema's
    // builder it is and what it takes, instead of the whole `effects!` block (rustc widens a mix
    // of the invocation's and the user's spans to the invocation). Generics are written even
    // when empty (`<>`): their span is what reaches the body. Everything inside keeps the
    // macro's span, so lints still see generated code there.
    let span = schema.body;
    let defaults = quote!(#(#params = ::effects_core::__private::Unset),*);
    let body = quote! {
        #(#fields)*
        __state: ::core::marker::PhantomData<fn() -> (#(#params,)*)>,
    };
    let (keyword, generics, body) = (
        quote_spanned!(span=> struct),
        quote_spanned!(span=> <#defaults>),
        quote_spanned!(span=> {#body}),
    );
    quote! {
        #[doc = #doc]
        #[must_use = "a builder does nothing until `.build()` is called"]
        #vis #keyword #builder #generics #body
    }
}

/// One `__{Slot}IsSet` trait per `one` or `at_least_one` slot, implemented for `Set`, that
/// `build()` requires; declared inside the schema's `const _` block, where the methods name it.
pub(super) fn state_traits(names: &Names<'_>) -> TokenStream {
    let schema = names.schema;
    let schema_name = schema.name.to_string();
    let mut items = TokenStream::new();
    for (slot, _) in tracked(names) {
        let ty = slot.type_str();
        let what = slot.kind.singular();
        let setter = slot.name_str();
        let card = slot.cardinality.keyword();
        if matches!(slot.cardinality, Cardinality::One | Cardinality::AtLeastOne) {
            let trait_name = is_set_trait(slot);
            let amount = if slot.cardinality == Cardinality::One {
                "exactly one"
            } else {
                "at least one"
            };
            let message = format!(
                "`{schema_name}` needs {amount} `{ty}` {what}: call `.{setter}(..)` before `.build()`"
            );
            let label = format!("`.{setter}(..)` has not been called");
            let note = if slot.cardinality == Cardinality::One {
                format!("`{schema_name}` declares `{card} {ty}` in its {what}s")
            } else {
                format!(
                    "`{schema_name}` declares `{card} {ty}` in its {what}s; `.extend_{setter}(..)` alone does not fill it, since it may add none: call `.{setter}(first)`, then `.extend_{setter}(rest)`"
                )
            };
            items.extend(quote! {
                #[diagnostic::on_unimplemented(message = #message, label = #label, note = #note)]
                pub trait #trait_name {}
                #[diagnostic::do_not_recommend]
                impl #trait_name for ::effects_core::__private::Set {}
            });
        }
    }
    items
}

pub(super) fn methods(names: &Names<'_>) -> TokenStream {
    let schema = names.schema;
    let (name, builder) = (&schema.name, &names.builder);
    let tracked = tracked(names);
    let params: Vec<&Ident> = tracked.iter().map(|(_, p)| p).collect();
    let generics = (!params.is_empty()).then(|| quote!(<#(#params),*>));
    let all_fields: Vec<&Ident> = schema.slots.iter().map(|s| &s.name).collect();

    // The builder type with the parameter of `slot` replaced by `Set`.
    let with_set = |slot: &Slot| {
        let args = tracked.iter().map(|(s, p)| {
            if std::ptr::eq(*s, slot) {
                quote!(__Set)
            } else {
                quote!(#p)
            }
        });
        if params.is_empty() {
            quote!(#builder)
        } else {
            quote!(#builder<#(#args),*>)
        }
    };
    // The same builder with other state parameters: what every setter that fills a tracked slot
    // returns after storing its value, so each setter is a line rather than a builder literal.
    let retype = (!params.is_empty()).then(|| {
        let to: Vec<Ident> = (0..params.len())
            .map(|i| format_ident!("__T{}", i))
            .collect();
        quote! {
            #[inline]
            fn __effects_retype<#(#to),*>(self) -> #builder<#(#to),*> {
                #builder { #(#all_fields: self.#all_fields,)* __state: __PhantomData }
            }
        }
    });
    let param_of = |slot: &Slot| {
        tracked
            .iter()
            .find(|(s, _)| std::ptr::eq(*s, slot))
            .map(|(_, p)| p.clone())
    };

    let mut setters = TokenStream::new();
    for slot in &schema.slots {
        let (field, ty) = (&slot.name, &slot.ty);
        let summary = slot_summary(slot);
        let tystr = slot.type_str();
        match slot.cardinality {
            Cardinality::One | Cardinality::Optional => {
                let p = param_of(slot);
                let unset = unset_bound(name, slot);
                let ret = with_set(slot);
                let set_doc = if slot.cardinality == Cardinality::One {
                    format!(
                        " Sets the `{tystr}` {}, filling the slot `build()` requires; callable once. {summary}",
                        slot.kind.singular()
                    )
                } else {
                    format!(
                        " Sets the `{tystr}` {}; callable once, this or `maybe_{}`. {summary}",
                        slot.kind.singular(),
                        slot.name_str()
                    )
                };
                let bound = slot_bound(slot, quote!(#p: #unset));
                setters.extend(quote! {
                    #[doc = #set_doc]
                    #[inline]
                    pub fn #field(mut self, value: #ty) -> #ret
                    where
                        #bound,
                    {
                        self.#field = __Some(value);
                        self.__effects_retype()
                    }
                });
                if slot.cardinality == Cardinality::Optional {
                    let maybe = format_ident!("maybe_{}", slot.name_str());
                    let doc = format!(
                        " Sets the `{tystr}` {} if `value` is `Some`; counts as the one call either way. {summary}",
                        slot.kind.singular()
                    );
                    setters.extend(quote! {
                        #[doc = #doc]
                        #[inline]
                        pub fn #maybe(mut self, value: __Option<#ty>) -> #ret
                        where
                            #bound,
                        {
                            self.#field = value;
                            self.__effects_retype()
                        }
                    });
                }
            }
            Cardinality::Many | Cardinality::AtLeastOne => {
                let extend = format_ident!("extend_{}", slot.name_str());
                let (add_doc, extend_doc) = if slot.cardinality == Cardinality::Many {
                    (
                        format!(" Adds one `{tystr}` {}. {summary}", slot.kind.singular()),
                        format!(" Adds every `{tystr}` of `values`. {summary}"),
                    )
                } else {
                    (
                        format!(
                            " Adds one `{tystr}` {}, filling the slot `build()` requires. {summary}",
                            slot.kind.singular()
                        ),
                        format!(
                            " Adds every `{tystr}` of `values`. It does not fill the slot on its own, since `values` may be empty: call `.{}(..)` at least once. {summary}",
                            slot.name_str()
                        ),
                    )
                };
                let add = if slot.cardinality == Cardinality::Many {
                    quote! {
                        pub fn #field(mut self, value: #ty) -> Self {
                            self.#field.push(value);
                            self
                        }
                    }
                } else {
                    let ret = with_set(slot);
                    quote! {
                        pub fn #field(mut self, value: #ty) -> #ret {
                            self.#field.push(value);
                            self.__effects_retype()
                        }
                    }
                };
                setters.extend(quote! {
                    #[doc = #add_doc]
                    #[inline]
                    #add

                    #[doc = #extend_doc]
                    #[inline]
                    pub fn #extend(mut self, values: impl __IntoIterator<Item = #ty>) -> Self {
                        self.#field.extend(values);
                        self
                    }
                });
            }
        }
    }

    let schema_str = schema.name.to_string();
    let required = tracked
        .iter()
        .filter(|(slot, _)| matches!(slot.cardinality, Cardinality::One | Cardinality::AtLeastOne))
        .map(|(slot, p)| {
            let set = is_set_trait(slot);
            let bound = slot_bound(slot, quote!(#p: #set));
            quote!(#bound,)
        });
    let finish = schema.slots.iter().map(|slot| {
        let field = &slot.name;
        let fstr = slot.name_str();
        match slot.cardinality {
            Cardinality::One => quote! {
                #field: __filled(self.#field, #schema_str, #fstr)
            },
            Cardinality::Optional | Cardinality::Many => quote!(#field: self.#field),
            Cardinality::AtLeastOne => quote! {
                #field: __filled(
                    __NonEmpty::from_vec(self.#field),
                    #schema_str,
                    #fstr,
                )
            },
        }
    });
    let build_doc = format!(
        " The finished [`{name}`]. Compiles only once every `one` and `at_least_one` slot is filled."
    );
    let starts = all_fields
        .iter()
        .zip(&schema.slots)
        .map(|(f, s)| match s.cardinality {
            Cardinality::One | Cardinality::Optional => quote!(#f: __None),
            Cardinality::Many | Cardinality::AtLeastOne => quote!(#f: __Vec::new()),
        });
    let builder_doc = format!(" Starts building a [`{name}`].");
    let merge_doc = format!(
        " Moves every effect of `other` into this `{name}`. Compiles only when `{name}` has a `many` or `at_least_one` slot for each of `other`'s effect types."
    );
    quote! {
        impl #name {
            #[doc = #builder_doc]
            #[inline]
            pub fn builder() -> #builder {
                #builder { #(#starts,)* __state: __PhantomData }
            }

            #[doc = #merge_doc]
            #[inline]
            #[must_use]
            pub fn merge<__M: __MergeInto<Self>>(mut self, other: __M) -> Self {
                __MergeInto::merge_into(other, &mut self);
                self
            }
        }

        impl #generics #builder #generics {
            #retype

            #setters

            #[doc = #build_doc]
            #[inline]
            pub fn build(self) -> #name
            where
                #(#required)*
            {
                #name { #(#finish,)* }
            }
        }
    }
}
