//! `effects!` input → model. Recoverable mistakes (an unknown key or cardinality) are recorded in
//! the context and parsing goes on, so one compile shows every mistake; malformed syntax stops.

use proc_macro2::TokenStream;
use syn::Ident;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Attribute, Token, Type, Visibility, braced, bracketed};

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
    /// The body, `{ .. }` after the name.
    pub(crate) body: proc_macro2::Span,
    pub(crate) slots: Vec<Slot>,
    pub(crate) merges: Vec<syn::Path>,
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
    /// `name` without `r#`, computed once: the expansion quotes it many times.
    name_text: String,
    /// `ty` as text, computed once.
    type_text: String,
}

impl Slot {
    /// The slot's name without `r#`.
    pub(crate) fn name_str(&self) -> &str {
        &self.name_text
    }

    /// The slot's type as the user wrote it, compactly.
    pub(crate) fn type_str(&self) -> &str {
        &self.type_text
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
            let tight = |ch: Option<char>| {
                matches!(ch, Some(':' | '<' | '>' | '&' | '(' | ')' | '[' | ']'))
            };
            if tight(prev) && prev != Some('>')
                || tight(next) && next != Some('(')
                || next == Some(',')
            {
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
        cx.syn_error(syn::Error::new(
            kw.span,
            "remove `struct`: a schema is declared as `pub Name { datoms: [...], ... }`",
        ));
    } else if !lookahead.peek(Ident) {
        return Err(lookahead.error());
    }
    let name: Ident = input.parse()?;
    if !input.peek(syn::token::Brace) {
        // Nothing after the name: point at the name rather than at the whole invocation.
        let span = if input.is_empty() {
            name.span()
        } else {
            input.span()
        };
        return Err(syn::Error::new(
            span,
            format!(
                "expected `{{` after `{name}`: a schema is declared as `{name} {{ datoms: [one T], messages: [...] }}`"
            ),
        ));
    }
    let content;
    let brace = braced!(content in input);
    let mut schema = SchemaDef {
        attrs,
        vis,
        name,
        body: brace.span.join(),
        slots: Vec::new(),
        merges: Vec::new(),
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
        if !content.peek(syn::token::Bracket) {
            let example = if key == "merges" {
                "merges: [OtherSchema]".to_owned()
            } else {
                format!("{key}: [one T, many U]")
            };
            return Err(syn::Error::new(
                content.span(),
                format!(
                    "expected `[` after `{key}:`: the list goes in square brackets, as in `{example}`"
                ),
            ));
        }
        let list;
        bracketed!(list in content);
        let key_str = key.to_string();
        if let Some(first) = seen_keys.iter().find(|k| **k == key_str) {
            // Reported, then parsed as if it were part of the first list.
            cx.error_spanned_by(
                &key,
                format!(
                    "`{key}` is declared twice in `{}`: list all of them in the first `{first}: [...]`",
                    schema.name
                ),
            );
        } else {
            seen_keys.push(key.clone());
        }
        // An unknown key is reported, then read as the key it most likely meant.
        let meant = if KEYS.contains(&key_str.as_str()) {
            Some(key_str.as_str())
        } else {
            let guess = did_you_mean(&key_str, &KEYS);
            let hint = match guess {
                Some(s) => format!("did you mean `{s}`?"),
                None => "expected `datoms`, `requests`, `messages` or `merges`".to_owned(),
            };
            cx.error_spanned_by(&key, format!("unknown key `{key_str}`: {hint}"));
            guess
        };
        match meant {
            Some("datoms") => parse_slots(&list, Kind::Datoms, &mut schema, cx)?,
            Some("requests") => parse_slots(&list, Kind::Requests, &mut schema, cx)?,
            Some("messages") => parse_slots(&list, Kind::Messages, &mut schema, cx)?,
            Some(_) => {
                let paths = Punctuated::<syn::Path, Token![,]>::parse_terminated(&list)?;
                schema.merges.extend(paths);
            }
            None => {
                let _: TokenStream = list.parse()?;
            }
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
            }
        }
        let ahead = list.fork();
        let first: Ident = ahead
            .call(<Ident as syn::ext::IdentExt>::parse_any)
            .map_err(|e| {
                syn::Error::new(
                    e.span(),
                    "expected a slot: `one T`, `optional T`, `many T` or `at_least_one T`",
                )
            })?;
        let cardinality = if ahead.is_empty()
            || ahead.peek(Token![,])
            || ahead.peek(Token![<])
            || ahead.peek(Token![::])
            || ahead.peek(Token![as])
        {
            // `[BlockedCard]`: the type with no cardinality before it; read it as `many`.
            cx.error_spanned_by(
                &first,
                format!(
                    "missing cardinality before `{first}`: write `one {first}`, `optional {first}`, `many {first}` or `at_least_one {first}`"
                ),
            );
            Cardinality::Many
        } else {
            let word: Ident = list.call(<Ident as syn::ext::IdentExt>::parse_any)?;
            let text = word.to_string();
            Cardinality::from_keyword(&text).unwrap_or_else(|| {
                // Reported, then read as the closest cardinality, or `many`.
                let guess = did_you_mean(&text, &CARDINALITIES).or_else(|| synonym(&text));
                let hint = match guess {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "expected `one`, `optional`, `many` or `at_least_one`".to_owned(),
                };
                cx.error_spanned_by(&word, format!("unknown cardinality `{text}`: {hint}"));
                guess
                    .and_then(Cardinality::from_keyword)
                    .unwrap_or(Cardinality::Many)
            })
        };
        let ty: Type = list.parse()?;
        let rename = if list.peek(Token![as]) {
            list.parse::<Token![as]>()?;
            Some(list.call(<Ident as syn::ext::IdentExt>::parse_any)?)
        } else {
            None
        };
        let name = match &rename {
            Some(r) => {
                let text = unraw(r);
                let name = ident(&text, r.span());
                if name.is_none() {
                    cx.error_spanned_by(
                        r,
                        format!("`{text}` cannot name a slot: it is a keyword; choose another name, as in `as {text}_slot`"),
                    );
                }
                name
            }
            None => slot_name_from_type(&ty).or_else(|| {
                let (word, shown) = (cardinality.keyword(), type_string(&ty));
                let why = slot_word(&ty).map_or_else(String::new, |w| {
                    format!(" (`{w}` is a keyword)")
                });
                cx.error_spanned_by(
                    &ty,
                    format!(
                        "cannot name a setter after `{shown}`{why}: name the slot, as in `{word} {shown} as name`"
                    ),
                );
                None
            }),
        };
        if let Some(name) = name {
            schema.slots.push(Slot {
                docs,
                kind,
                cardinality,
                name_text: unraw(&name),
                type_text: type_string(&ty),
                ty,
                name,
                rename,
            });
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
            ident(&snake_case(&unraw(&last.ident)), last.ident.span())
        }
        Type::Group(g) => slot_name_from_type(&g.elem),
        Type::Paren(p) => slot_name_from_type(&p.elem),
        _ => None,
    }
}

/// The snake-cased word a type would name its slot with, when that word is a keyword that
/// cannot be an identifier (`Crate` → `crate`).
fn slot_word(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            let word = snake_case(&unraw(&p.path.segments.last()?.ident));
            crate::util::NOT_RAW
                .contains(&word.as_str())
                .then_some(word)
        }
        Type::Group(g) => slot_word(&g.elem),
        Type::Paren(p) => slot_word(&p.elem),
        _ => None,
    }
}

/// Words people reach for instead of a cardinality keyword.
fn synonym(word: &str) -> Option<&'static str> {
    Some(match word {
        "single" | "exactly_one" | "required" | "s_one" => "one",
        "maybe" | "option" | "opt" | "zero_or_one" => "optional",
        "vec" | "list" | "zero_or_more" | "any" => "many",
        "some" | "one_or_more" | "non_empty" | "nonempty" => "at_least_one",
        _ => return None,
    })
}
