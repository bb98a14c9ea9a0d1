//! No input may panic a macro. Every macro's parse-and-expand function is fed, in-process:
//! every valid example cut after each of its tokens (inside groups too), random mutations of the
//! examples (tokens deleted, duplicated, swapped, replaced by keywords, literals, punctuation or
//! groups, groups re-delimited), and random token trees. Each call must return tokens (the
//! expansion or `compile_error!`) that print and lex again; a panic fails the test with the input.
//!
//! The case count is bounded so the test takes seconds; `NO_PANIC_CASES=20000 cargo test -p
//! effects-macros --test no_panic` runs a longer search.

// The macro crate is a `proc-macro` crate, which exports nothing but macros: its modules are
// compiled into this test as they are.
#![allow(dead_code, unreachable_pub, missing_docs)]

#[path = "../src/ctxt.rs"]
mod ctxt;
#[path = "../src/derive/mod.rs"]
mod derive;
#[path = "../src/entry.rs"]
mod entry;
#[path = "../src/handler/mod.rs"]
mod handler;
#[path = "../src/schema/mod.rs"]
mod schema;
#[path = "../src/util.rs"]
mod util;

use std::panic::{AssertUnwindSafe, catch_unwind};

use proc_macro2::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use quote::quote;

/// Which macro an input goes to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Effects,
    HandlerItem,
    HandlerArgs,
    Datom,
    Message,
    Request,
}

const TARGETS: [Target; 6] = [
    Target::Effects,
    Target::HandlerItem,
    Target::HandlerArgs,
    Target::Datom,
    Target::Message,
    Target::Request,
];

fn valid_handler_item() -> TokenStream {
    quote! {
        pub fn block(card: &Card) -> effects![BlockCard | Empty] {
            if !card.can_block() {
                return Empty.into();
            }
            BlockCard::builder().build().into()
        }
    }
}

/// Valid inputs, per target.
fn examples(target: Target) -> Vec<TokenStream> {
    match target {
        Target::Effects => vec![
            quote! {
                /// Blocking one card.
                #[derive(Clone, Debug)]
                pub BlockCard {
                    datoms:   [one BlockedCard],
                    messages: [one StatusChanged],
                }
            },
            quote! {
                pub BlockAll {
                    datoms:   [many BlockedCard],
                    requests: [optional NotifyCustomer as notify],
                    messages: [at_least_one StatusChanged, one cards::CardsBlockedNotify],
                    merges:   [BlockCard, other::Schema],
                }
                pub(crate) Nothing {}
            },
        ],
        Target::HandlerItem => vec![
            valid_handler_item(),
            quote! {
                pub(crate) fn block_all(customer: &Customer, cards: &[Card], reason: String) -> effects![BlockAll] {
                    let _ = (customer, cards, reason);
                    BlockAll::builder().build().into()
                }
            },
        ],
        Target::HandlerArgs => vec![
            quote!(topic = "card-block-requested", name = "block"),
            quote!(topic = "cards", key = card.id.to_string()),
        ],
        Target::Datom => vec![quote! {
            #[datom(entity = "card")]
            pub struct BlockedCard {
                #[datom(id)]
                pub id: String,
                pub status: CardStatus,
                #[datom(rename = "blocked_by")]
                pub by: Option<String>,
                #[datom(skip)]
                pub cached: u32,
                #[datom(expect = "status")]
                pub was: Option<CardStatus>,
            }
        }],
        Target::Message => vec![quote! {
            #[message(topic = "card-status-changed")]
            pub struct StatusChanged<'a, T: Clone> where T: Copy {
                #[message(key)]
                pub card_id: &'a str,
                pub status: T,
            }
        }],
        Target::Request => vec![quote! {
            #[request(method = "post", endpoint = "notifications", path = "/customers/{customer_id}/notify")]
            pub struct NotifyCustomer {
                pub customer_id: String,
                pub text: String,
            }
        }],
    }
}

/// Runs one macro on `input`.
fn run_macro(target: Target, input: TokenStream) -> TokenStream {
    match target {
        Target::Effects => entry::effects(input),
        Target::HandlerItem => entry::effect_handler(quote!(topic = "card-block-requested"), input),
        Target::HandlerArgs => entry::effect_handler(input, valid_handler_item()),
        Target::Datom => entry::derive_datom(input),
        Target::Message => entry::derive_message(input),
        Target::Request => entry::derive_request(input),
    }
}

/// Runs `expand` on `input`; `Err` carries the panic message.
fn catch(
    expand: impl FnOnce(TokenStream) -> TokenStream,
    input: &TokenStream,
) -> Result<TokenStream, String> {
    let input = input.clone();
    catch_unwind(AssertUnwindSafe(|| expand(input))).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned())
    })
}

fn expand(target: Target, input: &TokenStream) -> Result<TokenStream, String> {
    catch(|input| run_macro(target, input), input)
}

/// Expands and checks: no panic, and the output prints as tokens that lex again.
fn check_with(
    name: &str,
    expand: impl FnOnce(TokenStream) -> TokenStream,
    input: &TokenStream,
) -> Result<(), String> {
    let out = catch(expand, input)
        .map_err(|why| format!("{name} panicked ({why}) on input:\n{input}"))?;
    let text = out.to_string();
    text.parse::<TokenStream>()
        .map_err(|e| format!("{name} gave tokens that do not lex ({e}) on input:\n{input}"))?;
    Ok(())
}

fn check(target: Target, input: &TokenStream) -> Result<(), String> {
    check_with(
        &format!("{target:?}"),
        |input| run_macro(target, input),
        input,
    )
}

/// `input` as the compiler could hand it to a macro: printed and lexed again. Token trees built
/// by hand can be impossible as input (a `'` not followed by a lifetime's name); those are
/// skipped.
fn relexed(input: &TokenStream) -> Option<TokenStream> {
    input.to_string().parse().ok()
}

/// Leaf tokens in order; a group counts as one token for its opening, then its content.
fn count_leaves(stream: &TokenStream) -> usize {
    stream
        .clone()
        .into_iter()
        .map(|tt| match tt {
            TokenTree::Group(g) => 1 + count_leaves(&g.stream()),
            _ => 1,
        })
        .sum()
}

/// The first `n` tokens of `stream`, with any group opened among them closed where the cut is.
fn cut(stream: &TokenStream, n: &mut usize) -> TokenStream {
    let mut out = TokenStream::new();
    for tt in stream.clone() {
        if *n == 0 {
            break;
        }
        *n -= 1;
        match tt {
            TokenTree::Group(g) => {
                let inner = cut(&g.stream(), n);
                out.extend([TokenTree::Group(Group::new(g.delimiter(), inner))]);
            }
            other => out.extend([other]),
        }
    }
    out
}

#[test]
fn every_example_expands_and_every_cut_of_it_is_reported_not_panicked() {
    let mut failures = Vec::new();
    let mut calls = 0usize;
    for target in TARGETS {
        for example in examples(target) {
            // The uncut example is valid: it expands without `compile_error!`.
            let full = expand(target, &example).expect("a valid example expands");
            assert!(
                !full.to_string().contains("compile_error"),
                "{target:?}: a valid example gave an error:\n{full}"
            );
            let total = count_leaves(&example);
            for len in 0..total {
                let Some(input) = relexed(&cut(&example, &mut { len })) else {
                    continue;
                };
                calls += 1;
                if let Err(e) = check(target, &input) {
                    failures.push(e);
                }
            }
        }
    }
    // `effects![A | B]` without the attribute: an error, and so is every cut of it.
    let union = quote!(BlockCard | cards::Empty<'static>);
    for len in 0..=count_leaves(&union) {
        if let Some(input) = relexed(&cut(&union, &mut { len })) {
            calls += 1;
            if let Err(e) = check(Target::Effects, &input) {
                failures.push(e);
            }
        }
    }
    assert!(calls > 300, "only {calls} cuts");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Tokens people and fuzzers reach for: keywords (some that cannot be raw identifiers), the
/// macros' own words, literals, punctuation.
fn atom() -> impl Strategy<Value = TokenTree> {
    static WORDS: &[&str] = &[
        "crate",
        "self",
        "super",
        "Self",
        "_",
        "pub",
        "struct",
        "enum",
        "fn",
        "async",
        "unsafe",
        "as",
        "mut",
        "ref",
        "where",
        "impl",
        "dyn",
        "type",
        "r#type",
        "r#match",
        "one",
        "optional",
        "many",
        "at_least_one",
        "datoms",
        "requests",
        "messages",
        "merges",
        "datom",
        "message",
        "request",
        "id",
        "key",
        "topic",
        "name",
        "entity",
        "rename",
        "skip",
        "expect",
        "method",
        "endpoint",
        "path",
        "effects",
        "Empty",
        "Option",
        "Vec",
        "String",
        "Card",
        "T",
        "x",
        "é",
        "Ünïcode",
        "__S0",
        "IsSet",
    ];
    prop_oneof![
        4 => proptest::sample::select(WORDS).prop_map(|w| {
            let ident = match w.strip_prefix("r#") {
                Some(raw) => Ident::new_raw(raw, Span::call_site()),
                None => Ident::new(w, Span::call_site()),
            };
            TokenTree::Ident(ident)
        }),
        2 => proptest::sample::select(&[':', ',', '|', '<', '>', '#', '!', '=', ';', '&', '\'', '.', '-', '/', '?', '*', '+'][..])
            .prop_flat_map(|c| {
                proptest::bool::ANY.prop_map(move |joint| {
                    let spacing = if joint { Spacing::Joint } else { Spacing::Alone };
                    TokenTree::Punct(Punct::new(c, spacing))
                })
            }),
        1 => prop_oneof![
            Just(Literal::string("")),
            Just(Literal::string("card")),
            Just(Literal::string("/a/{id}/{")),
            Just(Literal::string("a/b")),
            Just(Literal::u32_unsuffixed(0)),
            Just(Literal::i64_suffixed(-1)),
            Just(Literal::character('x')),
            Just(Literal::f64_unsuffixed(1.5)),
            Just(Literal::byte_string(b"x")),
        ]
        .prop_map(TokenTree::Literal),
    ]
}

fn delimiter() -> impl Strategy<Value = Delimiter> {
    proptest::sample::select(
        &[
            Delimiter::Brace,
            Delimiter::Bracket,
            Delimiter::Parenthesis,
            Delimiter::None,
        ][..],
    )
}

/// Random token trees: atoms and nested groups.
fn random_stream() -> impl Strategy<Value = TokenStream> {
    let tree = atom().prop_recursive(4, 48, 8, |inner| {
        (delimiter(), proptest::collection::vec(inner, 0..8))
            .prop_map(|(d, tts)| TokenTree::Group(Group::new(d, tts.into_iter().collect())))
    });
    proptest::collection::vec(tree, 0..16).prop_map(|tts| tts.into_iter().collect())
}

/// One edit of a token stream, at a position counted over the stream's top level or inside one
/// of its groups.
#[derive(Clone, Debug)]
enum Edit {
    Delete(usize),
    Duplicate(usize),
    Swap(usize),
    Replace(usize, TokenTree),
    Insert(usize, TokenTree),
    Redelimit(usize, Delimiter),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = 0usize..64;
    prop_oneof![
        at.clone().prop_map(Edit::Delete),
        at.clone().prop_map(Edit::Duplicate),
        at.clone().prop_map(Edit::Swap),
        (at.clone(), atom()).prop_map(|(i, t)| Edit::Replace(i, t)),
        (at.clone(), atom()).prop_map(|(i, t)| Edit::Insert(i, t)),
        (at, delimiter()).prop_map(|(i, d)| Edit::Redelimit(i, d)),
    ]
}

/// Applies `edit` at the `*at`-th token, counting depth-first; `*at` is consumed as tokens pass.
fn apply(stream: &TokenStream, edit: &Edit, at: &mut usize, done: &mut bool) -> TokenStream {
    let mut tts: Vec<TokenTree> = stream.clone().into_iter().collect();
    let mut i = 0;
    while i < tts.len() && !*done {
        if *at == 0 {
            *done = true;
            match edit {
                Edit::Delete(_) => {
                    tts.remove(i);
                }
                Edit::Duplicate(_) => {
                    let t = tts[i].clone();
                    tts.insert(i, t);
                }
                Edit::Swap(_) => {
                    if i + 1 < tts.len() {
                        tts.swap(i, i + 1);
                    }
                }
                Edit::Replace(_, t) => tts[i] = t.clone(),
                Edit::Insert(_, t) => tts.insert(i, t.clone()),
                Edit::Redelimit(_, d) => {
                    if let TokenTree::Group(g) = &tts[i] {
                        tts[i] = TokenTree::Group(Group::new(*d, g.stream()));
                    } else {
                        *done = false;
                    }
                }
            }
            if *done {
                break;
            }
        }
        *at = at.saturating_sub(1);
        if let TokenTree::Group(g) = &tts[i] {
            let inner = apply(&g.stream(), edit, at, done);
            let mut group = Group::new(g.delimiter(), inner);
            group.set_span(g.span());
            tts[i] = TokenTree::Group(group);
        }
        i += 1;
    }
    tts.into_iter().collect()
}

fn mutate(example: &TokenStream, edits: &[Edit]) -> TokenStream {
    let mut stream = example.clone();
    for edit in edits {
        let mut at = match edit {
            Edit::Delete(i)
            | Edit::Duplicate(i)
            | Edit::Swap(i)
            | Edit::Replace(i, _)
            | Edit::Insert(i, _)
            | Edit::Redelimit(i, _) => *i,
        };
        stream = apply(&stream, edit, &mut at, &mut false);
    }
    stream
}

fn cases(default: u32) -> u32 {
    std::env::var("NO_PANIC_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(strategy: impl Strategy<Value = (usize, TokenStream)>, count: u32) {
    let mut runner = TestRunner::new(Config {
        cases: count,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(target, input)| {
        let Some(input) = relexed(&input) else {
            return Ok(());
        };
        check(TARGETS[target], &input).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn mutated_examples_are_reported_not_panicked() {
    let strategy = (0..TARGETS.len())
        .prop_flat_map(|target| {
            let examples = examples(TARGETS[target]);
            (
                Just(target),
                proptest::sample::select(examples),
                proptest::collection::vec(edit(), 1..5),
            )
        })
        .prop_map(|(target, example, edits)| (target, mutate(&example, &edits)));
    run(strategy, cases(1500));
}

#[test]
fn random_token_trees_are_reported_not_panicked() {
    let strategy = (0..TARGETS.len(), random_stream());
    run(strategy, cases(1500));
}

#[test]
fn keyword_type_names_are_reported_not_panicked() {
    // The inputs that panicked once: a payload type whose snake-cased name cannot be an
    // identifier, even a raw one.
    for name in ["Crate", "Self", "Super", "_"] {
        let input: TokenStream =
            format!("pub S {{ datoms: [one {name}], messages: [many {name} as x] }}")
                .parse()
                .expect("lexes");
        let out = expand(Target::Effects, &input).unwrap_or_else(|why| panic!("{name}: {why}"));
        assert!(out.to_string().contains("compile_error"), "{name}: {out}");
    }
}

#[test]
fn the_check_fails_on_a_panicking_macro() {
    // A macro that names a setter the way the old `effects!` did (`Ident::new_raw` on `crate`)
    // panics, and `check_with` reports it.
    let input: TokenStream = "pub S { datoms: [one Crate] }".parse().expect("lexes");
    let old_naming = |_: TokenStream| {
        let setter = Ident::new_raw("crate", Span::call_site());
        quote!(fn #setter() {})
    };
    let failed = check_with("old naming", old_naming, &input);
    assert!(failed.is_err_and(|e| e.contains("panicked")));
    assert!(check(Target::Effects, &input).is_ok());
}
