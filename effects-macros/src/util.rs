//! Small helpers shared by the macros.

use proc_macro2::{Ident, Span};

/// `BlockedCard` → `blocked_card`, `HTTPRequest` → `http_request`, `V2Card` → `v2_card`.
pub(crate) fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let boundary = match prev {
                None | Some('_') => false,
                Some(p) => {
                    p.is_lowercase()
                        || p.is_ascii_digit()
                        || (p.is_uppercase() && next.is_some_and(char::is_lowercase))
                }
            };
            if boundary {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Keywords that cannot be written as raw identifiers either (`r#crate` is not an identifier).
pub(crate) const NOT_RAW: [&str; 5] = ["crate", "self", "super", "Self", "_"];

/// An identifier for `name`, raw when `name` is a keyword (`type` → `r#type`); `None` when `name`
/// cannot be an identifier at all (`crate`, `self`, `super`, `Self`, `_`, or not a word).
pub(crate) fn ident(name: &str, span: Span) -> Option<Ident> {
    if NOT_RAW.contains(&name) {
        return None;
    }
    if syn::parse_str::<Ident>(name).is_ok() {
        return Some(Ident::new(name, span));
    }
    let mut chars = name.chars();
    let word = chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric());
    // A keyword (`type`): lexes as a word but is not an identifier.
    (word && syn::parse_str::<Ident>(&format!("r#{name}")).is_ok())
        .then(|| Ident::new_raw(name, span))
}

/// The identifier's text without a leading `r#`.
pub(crate) fn unraw(ident: &Ident) -> String {
    let s = ident.to_string();
    s.strip_prefix("r#").map(str::to_owned).unwrap_or(s)
}

/// The closest candidate within an edit distance that scales with the word's length.
pub(crate) fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.len() / 3).max(1);
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// The text of every `#[doc = "..."]` attribute, one line each, with the single leading space
/// rustdoc adds removed.
pub(crate) fn doc_text(attrs: &[syn::Attribute]) -> String {
    let mut lines = Vec::new();
    for attr in attrs {
        if !attr.path().is_ident("doc") {
            continue;
        }
        if let syn::Meta::NameValue(nv) = &attr.meta
            && let syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) = &nv.value
        {
            let v = s.value();
            lines.push(v.strip_prefix(' ').map(str::to_owned).unwrap_or(v));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_handles_acronyms_and_digits() {
        assert_eq!(snake_case("BlockedCard"), "blocked_card");
        assert_eq!(snake_case("HTTPRequest"), "http_request");
        assert_eq!(snake_case("V2Card"), "v2_card");
        assert_eq!(snake_case("Card2"), "card2");
        assert_eq!(snake_case("Empty"), "empty");
        assert_eq!(snake_case("already_snake"), "already_snake");
    }

    #[test]
    fn suggestions_are_close_words_only() {
        let keys = ["datoms", "requests", "messages", "merges"];
        assert_eq!(did_you_mean("datom", &keys), Some("datoms"));
        assert_eq!(did_you_mean("mesages", &keys), Some("messages"));
        assert_eq!(did_you_mean("merge", &keys), Some("merges"));
        assert_eq!(did_you_mean("colour", &keys), None);
    }

    #[test]
    fn keywords_become_raw_identifiers() {
        let named = |name| ident(name, Span::call_site()).map(|i| i.to_string());
        assert_eq!(named("type").as_deref(), Some("r#type"));
        assert_eq!(named("card").as_deref(), Some("card"));
        for keyword in NOT_RAW {
            assert_eq!(named(keyword), None, "{keyword}");
        }
        assert_eq!(named(""), None);
        assert_eq!(named("a-b"), None);
    }
}
