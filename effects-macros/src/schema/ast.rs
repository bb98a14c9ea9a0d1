//! `effects!` input → model. Recoverable mistakes (an unknown key or cardinality) are recorded in
//! the context and parsing goes on, so one compile shows every mistake; malformed syntax stops.

use proc_macro2::TokenStream;
use syn::Ident;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Attribute, Token, Type, Visibility, bracketed, braced};

use crate::ctxt::Ctxt;
use crate::util::{did_you_mean, ident, snake_case, unraw};

/// Every schema of one invocation.
pub(crate) struct Input {
    pub(crate) schemas: Vec<SchemaDef>,
}

/// One schema: `pub BlockCard { datoms: [one BlockedCard], ... }`.
pub(crate) struct SchemaDef {
    pub(crate) attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) name: Ident,
    pub(crate) slots: Vec<Slot>,
    pub(crate) merges: Vec<syn::Path>,
    /// A recoverable mistake was found inside: report it, generate nothing for this schema.
    pub(crate) broken: bool,
}

/// The kind of effect a slot holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Datoms,
    Requests,
    Messages,
}

impl Kind {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Kind::Datoms => "datoms",
            Kind::Requests => "requests",
            Kind::Messages => "messages",
        }
    }

    pub(crate) fn singular(self) -> &'static str {
        match self {
            Kind::Datoms => "datom",
            Kind::Requests => "request",
            Kind::Messages => "message",
        }
    }
}

/// How many effects a slot takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cardinality {
    One,
    Optional,
    Many,
    AtLeastOne,
}

pub(crate) const CARDINALITIES: [&str; 4] = ["one", "optional", "many", "at_least_one"];
const KEYS: [&str; 4] = ["datoms", "requests", "messages", "merges"];

impl Cardinality {
    fn from_keyword(word: &str) -> Option<Self> {
        Some(match word {
            "one" => Cardinality::One,
            "optional" => Cardinality::Optional,
            "many" => Cardinality::Many,
            "at_least_one" => Cardinality::AtLeastOne,
            _ => return None,
        })
    }

    pub(crate) fn keyword(self) -> &'static str {
        match self {
            Cardinality::One => "one",
            Cardinality::Optional => "optional",
            Cardinality::Many => "many",
            Cardinality::AtLeastOne => "at_least_one",
        }
    }

    /// Whether the builder tracks the slot in its typestate.
    pub(crate) fn tracked(self) -> bool {
        self != Cardinality::Many
    }

    /// Whether the slot can take any number of effects from a merged schema.
    pub(crate) fn absorbs(self) -> bool {
        matches!(self, Cardinality::Many | Cardinality::AtLeastOne)
    }
}

/// One slot: `one BlockedCard`, `many StatusChanged as changed`.
pub(crate) struct Slot {
    pub(crate) docs: Vec<Attribute>,
    pub(crate) kind: Kind,
    pub(crate) cardinality: Cardinality,
    pub(crate) ty: Type,
    /// The setter and field name: the type's name in snake case, or the `as` name.
    pub(crate) name: Ident,
    /// The `as name` token, when given.
    pub(crate) rename: Option<Ident>,
}

impl Slot {
    /// The slot's name without `r#`.
    pub(crate) fn name_str(&self) -> String {
        unraw(&self.name)
    }

    /// The slot's type as the user wrote it, compactly.
    pub(crate) fn type_str(&self) -> String {
        type_string(&self.ty)
    }
}

/// `a :: b < C >` → `a::b<C>`.
pub(crate) fn type_string(ty: &Type) -> String {
    let raw = quote::quote!(#ty).to_string();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ' ' {
            let prev = out.chars().last();
            let next = chars.peek().copied();
            let tight = |ch: Option<char>| matches!(ch, Some(':' | '<' | '>' | '&' | '(' | ')' | '[' | ']'));
            if tight(prev) && prev != Some('>') || tight(next) && next != Some('(') || next == Some(',') {
                continue;
            }
            if prev == Some('>') && matches!(next, Some('>' | ':' | ')' | ']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

pub(crate) fn parse(tokens: TokenStream, cx: &Ctxt) -> syn::Result<Input> {
    (|input: ParseStream<'_>| parse_input(input, cx)).parse2(tokens)
}

fn parse_input(input: ParseStream<'_>, cx: &Ctxt) -> syn::Result<Input> {
    let mut schemas = Vec::new();
    while !input.is_empty() {
        schemas.push(parse_schema(input, cx)?);
    }
    Ok(Input { schemas })
}

fn parse_schema(input: ParseStream<'_>, cx: &Ctxt) -> syn::Result<SchemaDef> {
    let attrs = input.call(Attribute::parse_outer)?;
    let vis: Visibility = input.parse()?;
    let lookahead = input.lookahead1();
    if input.peek(Token![struct]) {
        let kw: Token![struct] = input.parse()?;
        return Err(syn::Error::new(
            kw.span,
            "remove `struct`: a schema is declared as `pub Name { datoms: [...], ... }`",
        ));
    }
    if !lookahead.peek(Ident) {
        return Err(lookahead.error());
    }
    let name: Ident = input.parse()?;
    if !input.peek(syn::token::Brace) {
        return Err(syn::Error::new(
            input.span(),
            format!(
                "expected `{{` after `{name}`: a schema is declared as `{name} {{ datoms: [one T], messages: [...] }}`"
            ),
        ));
    }
    let content;
    braced!(content in input);
    let mut schema = SchemaDef {
        attrs,
        vis,
        name,
        slots: Vec::new(),
        merges: Vec::new(),
        broken: false,
    };
    let mut seen_keys: Vec<Ident> = Vec::new();
    while !content.is_empty() {
        let key: Ident = content.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected a key: `datoms`, `requests`, `messages` or `merges`",
            )
        })?;
        content.parse::<Token![:]>()?;
        let list;
        bracketed!(list in content);
        let key_str = key.to_string();
        if let Some(first) = seen_keys.iter().find(|k| **k == key_str) {
            cx.error_spanned_by(
                &key,
                format!(
                    "`{key}` is declared twice in `{}`: list all of them in the first `{first}: [...]`",
                    schema.name
                ),
            );
            schema.broken = true;
            let _: TokenStream = list.parse()?;
        } else {
            match key_str.as_str() {
                "datoms" => parse_slots(&list, Kind::Datoms, &mut schema, cx)?,
                "requests" => parse_slots(&list, Kind::Requests, &mut schema, cx)?,
                "messages" => parse_slots(&list, Kind::Messages, &mut schema, cx)?,
                "merges" => {
                    let paths = Punctuated::<syn::Path, Token![,]>::parse_terminated(&list)?;
                    schema.merges.extend(paths);
                }
                other => {
                    let hint = match did_you_mean(other, &KEYS) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => "expected `datoms`, `requests`, `messages` or `merges`".to_owned(),
                    };
                    cx.error_spanned_by(&key, format!("unknown key `{other}`: {hint}"));
                    schema.broken = true;
                    let _: TokenStream = list.parse()?;
                }
            }
            seen_keys.push(key);
        }
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    Ok(schema)
}

fn parse_slots(
    list: ParseStream<'_>,
    kind: Kind,
    schema: &mut SchemaDef,
    cx: &Ctxt,
) -> syn::Result<()> {
    while !list.is_empty() {
        let docs = list.call(Attribute::parse_outer)?;
        for attr in &docs {
            if !attr.path().is_ident("doc") {
                cx.error_spanned_by(attr, "only doc comments are allowed on a slot");
                schema.broken = true;
            }
        }
        let cardinality_token: Ident = list.call(<Ident as syn::ext::IdentExt>::parse_any).map_err(|e| {
            syn::Error::new(
                e.span(),
                "expected a slot: `one T`, `optional T`, `many T` or `at_least_one T`",
            )
        })?;
        // `[BlockedCard]`: the type with no cardinality before it.
        if list.is_empty() || list.peek(Token![,]) || list.peek(Token![<]) || list.peek(Token![::]) {
            cx.error_spanned_by(
                &cardinality_token,
                format!(
                    "missing cardinality before `{cardinality_token}`: write `one {cardinality_token}`, `optional {cardinality_token}`, `many {cardinality_token}` or `at_least_one {cardinality_token}`"
                ),
            );
            schema.broken = true;
            skip_to_comma(list)?;
        } else {
            let ty: Type = list.parse()?;
            let rename = if list.peek(Token![as]) {
                list.parse::<Token![as]>()?;
                Some(list.call(<Ident as syn::ext::IdentExt>::parse_any)?)
            } else {
                None
            };
            let word = cardinality_token.to_string();
            match Cardinality::from_keyword(&word) {
                Some(cardinality) => {
                    let name = match &rename {
                        Some(r) => r.clone(),
                        None => match slot_name_from_type(&ty) {
                            Some(n) => n,
                            None => {
                                cx.error_spanned_by(
                                    &ty,
                                    format!(
                                        "cannot name a setter after `{}`: name the slot, as in `{word} {} as name`",
                                        type_string(&ty),
                                        type_string(&ty)
                                    ),
                                );
                                schema.broken = true;
                                Ident::new("__unnamed", cardinality_token.span())
                            }
                        },
                    };
                    schema.slots.push(Slot {
                        docs,
                        kind,
                        cardinality,
                        ty,
                        name,
                        rename,
                    });
                }
                None => {
                    let hint = match did_you_mean(&word, &CARDINALITIES) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => "expected `one`, `optional`, `many` or `at_least_one`".to_owned(),
                    };
                    cx.error_spanned_by(
                        &cardinality_token,
                        format!("unknown cardinality `{word}`: {hint}"),
                    );
                    schema.broken = true;
                }
            }
        }
        if list.is_empty() {
            break;
        }
        list.parse::<Token![,]>()?;
    }
    Ok(())
}

/// `BlockedCard` → `blocked_card`; `cards::BlockedCard<X>` → `blocked_card`.
fn slot_name_from_type(ty: &Type) -> Option<Ident> {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            let last = p.path.segments.last()?;
            Some(ident(&snake_case(&unraw(&last.ident)), last.ident.span()))
        }
        Type::Group(g) => slot_name_from_type(&g.elem),
        Type::Paren(p) => slot_name_from_type(&p.elem),
        _ => None,
    }
}

/// Skips the rest of a malformed slot, up to the next top-level comma.
fn skip_to_comma(list: ParseStream<'_>) -> syn::Result<()> {
    list.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            if matches!(&tt, proc_macro2::TokenTree::Punct(p) if p.as_char() == ',') {
                break;
            }
            rest = next;
        }
        Ok(((), rest))
    })
}
