//! Testing kit (feature `testing`): snapshots with ids and timestamps redacted, an exact-match
//! assertion that shows a diff, and replay checks for determinism.
//!
//! Handlers are pure, so testing one is calling it and looking at the value it returns:
//!
//! ```
//! use effects_core::testing::assert_effects_eq;
//! use effects_core::{effect_handler, effects, Empty, Message};
//! use serde::Serialize;
//!
//! #[derive(Serialize, Message)]
//! #[message(topic = "greetings")]
//! pub struct Greeting { pub to: String }
//!
//! effects! { pub Greet { messages: [one Greeting] } }
//!
//! #[effect_handler]
//! pub fn greet(name: &str) -> effects![Greet | Empty] {
//!     if name.is_empty() {
//!         return Empty.into();
//!     }
//!     Greet::builder().greeting(Greeting { to: name.to_owned() }).build().into()
//! }
//!
//! let expected = Greet::builder().greeting(Greeting { to: "Ana".into() }).build();
//! assert_effects_eq!(greet("Ana"), expected);
//! assert_effects_eq!(greet(""), Empty);
//! ```

pub mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::handler::Handler;

/// Which values a snapshot hides.
///
/// Ids are replaced by `[id N]`, numbered by first appearance, everywhere the same value occurs
/// (lookup refs, payload fields, message keys, path segments), so a snapshot still shows which
/// effects concern the same entity. Timestamps become `[timestamp]`. Credentials become
/// `[redacted]`, and so does every other occurrence of their value in the document.
///
/// By default an id is a lookup ref's value or the value of a field named `id` or ending in
/// `_id`; a timestamp is the value of a field named `timestamp`, `time` or ending in `_at`, or
/// any string that reads as an RFC 3339 date-time. A credential is the value of a field (or
/// header) named `authorization`, `proxy-authorization`, `cookie`, `set-cookie`, or ending in
/// `password`, `secret`, `token`, `api-key` or `apikey` (case, `-` and `_` ignored), and of every
/// field named with [`Redactions::secret_field`]; credentials are masked even with
/// [`Redactions::none`].
///
/// ```
/// use effects_core::testing::Redactions;
/// use serde_json::json;
///
/// let doc = json!({"headers": {"Authorization": "Bearer eyJhbGciOi", "x-session": "s-51f0aa"},
///                  "body": {"echo": "s-51f0aa"}});
/// let redacted = Redactions::default().secret_field("x-session").apply(&doc);
/// assert_eq!(redacted, json!({
///     "headers": {"Authorization": "[redacted]", "x-session": "[redacted]"},
///     "body": {"echo": "[redacted]"}
/// }));
/// ```
///
/// ```
/// use effects_core::testing::Redactions;
/// use serde_json::json;
///
/// let doc = json!({"entity": ["card/id", "c-81"], "payload": {"card_id": "c-81", "number": "4111", "sent_at": 17}});
/// let redacted = Redactions::default().id_field("number").apply(&doc);
/// assert_eq!(redacted, json!({
///     "entity": ["card/id", "[id 1]"],
///     "payload": {"card_id": "[id 1]", "number": "[id 2]", "sent_at": "[timestamp]"}
/// }));
/// ```
#[derive(Clone, Debug)]
pub struct Redactions {
    id_fields: Vec<String>,
    timestamp_fields: Vec<String>,
    secret_fields: Vec<String>,
    standard: bool,
}

impl Default for Redactions {
    fn default() -> Self {
        Redactions {
            id_fields: Vec::new(),
            timestamp_fields: Vec::new(),
            secret_fields: Vec::new(),
            standard: true,
        }
    }
}

/// Field names (normalised: lower case, `_` as `-`) whose values are credentials.
const SECRET_FIELDS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "set-cookie2",
];

/// Endings of field names (normalised) whose values are credentials.
const SECRET_FIELD_ENDINGS: [&str; 5] = ["password", "secret", "token", "api-key", "apikey"];

/// Credentials shorter than this are not searched for elsewhere in a document: masking every
/// `abc` would garble it.
const MIN_SECRET_CHARS: usize = 6;

/// What a credential becomes.
const REDACTED: &str = "[redacted]";

fn normalised(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

impl Redactions {
    /// No id or timestamp rules; add your own with [`Redactions::id_field`] and
    /// [`Redactions::timestamp_field`]. Credentials are still masked.
    pub fn none() -> Self {
        Redactions {
            standard: false,
            ..Redactions::default()
        }
    }

    /// Also treats fields with this name as ids.
    #[must_use]
    pub fn id_field(mut self, name: impl Into<String>) -> Self {
        self.id_fields.push(name.into());
        self
    }

    /// Also treats fields with this name as timestamps.
    #[must_use]
    pub fn timestamp_field(mut self, name: impl Into<String>) -> Self {
        self.timestamp_fields.push(name.into());
        self
    }

    /// Also treats fields (or headers) with this name as credentials; case, `-` and `_` are
    /// ignored.
    #[must_use]
    pub fn secret_field(mut self, name: impl Into<String>) -> Self {
        self.secret_fields.push(normalised(&name.into()));
        self
    }

    fn is_secret_field(&self, key: &str) -> bool {
        let key = normalised(key);
        SECRET_FIELDS.contains(&key.as_str())
            || SECRET_FIELD_ENDINGS.iter().any(|end| key.ends_with(end))
            || self.secret_fields.contains(&key)
    }

    fn is_id_field(&self, key: &str) -> bool {
        self.id_fields.iter().any(|f| f == key)
            || (self.standard && (key == "id" || key.ends_with("_id")))
    }

    fn is_timestamp_field(&self, key: &str) -> bool {
        self.timestamp_fields.iter().any(|f| f == key)
            || (self.standard && (key == "timestamp" || key == "time" || key.ends_with("_at")))
    }

    /// `value`'s JSON form with credentials, ids and timestamps replaced.
    ///
    /// # Panics
    /// If `value` cannot be represented as JSON (a map with non-string keys).
    pub fn apply<T: Serialize + ?Sized>(&self, value: &T) -> Value {
        let mut doc = serde_json::to_value(value)
            .unwrap_or_else(|e| panic!("cannot snapshot a value that is not JSON: {e}"));
        let mut secrets: BTreeSet<String> = BTreeSet::new();
        self.mask_secrets(&mut doc, &mut secrets);
        if !secrets.is_empty() {
            mask_occurrences(&mut doc, &secrets);
        }
        let mut ids: BTreeMap<String, usize> = BTreeMap::new();
        self.collect(&doc, &mut ids);
        self.replace(&mut doc, None, &ids);
        doc
    }

    /// Masks the values of credential fields, collecting them (and, for `Scheme credentials`,
    /// the credentials alone) to mask them wherever else they occur.
    fn mask_secrets(&self, value: &mut Value, secrets: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if self.is_secret_field(k) && !v.is_null() {
                        collect_strings(v, secrets);
                        *v = Value::from(REDACTED);
                    } else {
                        self.mask_secrets(v, secrets);
                    }
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.mask_secrets(v, secrets);
                }
            }
            _ => {}
        }
    }

    /// Finds id values, numbering them in document order.
    fn collect(&self, value: &Value, ids: &mut BTreeMap<String, usize>) {
        fn add(v: &Value, ids: &mut BTreeMap<String, usize>) {
            if let Some(text) = id_text(v) {
                let next = ids.len() + 1;
                ids.entry(text).or_insert(next);
            }
        }
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match v {
                        Value::Array(pair) if k == "entity" && is_lookup_ref(v) => {
                            add(&pair[1], ids)
                        }
                        Value::Object(_) | Value::Array(_) => {}
                        _ if self.is_id_field(k) => add(v, ids),
                        _ => {}
                    }
                    self.collect(v, ids);
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.collect(v, ids);
                }
            }
            _ => {}
        }
    }

    fn replace(&self, value: &mut Value, key: Option<&str>, ids: &BTreeMap<String, usize>) {
        if let Some(k) = key
            && self.is_timestamp_field(k)
            && !value.is_object()
            && !value.is_array()
            && !value.is_null()
        {
            *value = Value::from("[timestamp]");
            return;
        }
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    self.replace(v, Some(k), ids);
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.replace(v, key, ids);
                }
            }
            Value::String(s) => {
                if self.standard && looks_like_rfc3339(s) {
                    *value = Value::from("[timestamp]");
                } else if let Some(n) = ids.get(s.as_str()) {
                    *value = Value::from(format!("[id {n}]"));
                } else if s.contains('/') && s.starts_with('/') {
                    // A request path: redact the segments that are ids.
                    let path = s
                        .split('/')
                        .map(|seg| match ids.get(seg) {
                            Some(n) => format!("[id {n}]"),
                            None => seg.to_owned(),
                        })
                        .collect::<Vec<_>>()
                        .join("/");
                    *value = Value::from(path);
                }
            }
            Value::Number(n) => {
                if let Some(k) = ids.get(&n.to_string()) {
                    *value = Value::from(format!("[id {k}]"));
                }
            }
            _ => {}
        }
    }
}

/// Every string in a credential's value, with the parts that are credentials on their own: what
/// follows the scheme of `Scheme credentials`, and the values of `name=value; ...` cookies.
fn collect_strings(value: &Value, secrets: &mut BTreeSet<String>) {
    match value {
        Value::String(text) => {
            let mut candidates = vec![text.as_str()];
            if let Some((scheme, credentials)) = text.split_once(' ')
                && !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                candidates.push(credentials);
            }
            candidates.extend(
                text.split(';')
                    .filter_map(|pair| pair.split_once('=').map(|(_, v)| v)),
            );
            for candidate in candidates {
                let candidate = candidate.trim().trim_matches('"');
                if candidate.chars().count() >= MIN_SECRET_CHARS {
                    secrets.insert(candidate.to_owned());
                }
            }
        }
        Value::Number(n) => {
            let text = n.to_string();
            if text.len() >= MIN_SECRET_CHARS {
                secrets.insert(text);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, secrets)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, secrets)),
        Value::Null | Value::Bool(_) => {}
    }
}

/// Replaces every occurrence of a collected credential in strings and keys.
fn mask_occurrences(value: &mut Value, secrets: &BTreeSet<String>) {
    let mask = |text: &mut String| {
        // Longest first, so a credential inside a longer one leaves no piece behind.
        let mut ordered: Vec<&String> = secrets.iter().collect();
        ordered.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in ordered {
            if text.contains(secret.as_str()) {
                *text = text.replace(secret.as_str(), REDACTED);
            }
        }
    };
    match value {
        Value::String(text) => mask(text),
        Value::Number(n) if secrets.contains(&n.to_string()) => *value = Value::from(REDACTED),
        Value::Array(items) => items.iter_mut().for_each(|v| mask_occurrences(v, secrets)),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (mut k, mut v) in entries {
                mask(&mut k);
                mask_occurrences(&mut v, secrets);
                map.insert(k, v);
            }
        }
        _ => {}
    }
}

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn is_lookup_ref(v: &Value) -> bool {
    matches!(v, Value::Array(pair) if pair.len() == 2 && pair[0].as_str().is_some_and(|a| a.contains('/')))
}

/// `2026-11-26T14:02:22Z`, `2026-11-26T14:02:22.5+01:00`, `2026-11-26 14:02:22`.
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 19
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't' | b' ')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
}

/// `value`'s JSON form with ids and timestamps replaced by the default [`Redactions`].
pub fn redact<T: Serialize + ?Sized>(value: &T) -> Value {
    Redactions::default().apply(value)
}

/// Snapshots effects with insta (YAML), ids and timestamps redacted by the default
/// [`Redactions`]. Takes the same forms as `insta::assert_yaml_snapshot!`: a value, or a name
/// and a value.
///
/// ```no_run
/// # use effects_core::{effects, Empty};
/// # fn block() -> Empty { Empty }
/// effects_core::assert_effects_snapshot!(block());
/// effects_core::assert_effects_snapshot!("nothing_to_block", block());
/// ```
#[macro_export]
macro_rules! assert_effects_snapshot {
    ($value:expr $(,)?) => {
        $crate::__private::insta::with_settings!(
            { omit_expression => true, description => ::core::stringify!($value) },
            { $crate::__private::insta::assert_yaml_snapshot!($crate::testing::redact(&$value)) }
        )
    };
    ($name:expr, $value:expr $(,)?) => {
        $crate::__private::insta::with_settings!(
            { omit_expression => true, description => ::core::stringify!($value) },
            { $crate::__private::insta::assert_yaml_snapshot!($name, $crate::testing::redact(&$value)) }
        )
    };
}

pub use crate::assert_effects_snapshot;

/// Asserts that two effect values are exactly equal in canonical form — nothing missing,
/// nothing extra, in the same order — and shows a line diff when they are not. The two sides
/// may be of different types: a handler's union, a schema, `Effects`.
///
/// ```should_panic
/// use effects_core::testing::assert_effects_eq;
/// use effects_core::{Effects, Empty, MessageEffect};
/// use serde_json::json;
///
/// assert_effects_eq!(Effects::from(MessageEffect::new("t", json!(1))), Empty);
/// ```
#[macro_export]
macro_rules! assert_effects_eq {
    ($actual:expr, $expected:expr $(,)?) => {
        if let ::core::result::Result::Err(diff) = $crate::testing::compare(&$actual, &$expected) {
            ::core::panic!(
                "effects differ ({} vs {}):\n{}",
                ::core::stringify!($actual),
                ::core::stringify!($expected),
                diff
            );
        }
    };
}

pub use crate::assert_effects_eq;

/// The erased form of an effect value, for comparison: a handler's union serializes as
/// `{Variant: effects}`, which is unwrapped here so a union compares equal to the schema it holds.
fn erased_form<T: Serialize + ?Sized>(value: &T) -> Value {
    let v = serde_json::to_value(value)
        .unwrap_or_else(|e| panic!("cannot compare a value that is not JSON: {e}"));
    if let Value::Object(map) = &v
        && map.len() == 1
        && let Some((variant, inner)) = map.iter().next()
        && !is_effects_key(variant)
        && matches!(inner, Value::Object(m) if m.keys().all(|k| is_effects_key(k)))
    {
        return inner.clone();
    }
    v
}

fn is_effects_key(k: &str) -> bool {
    matches!(k, "datoms" | "requests" | "messages")
}

/// `Ok` when `actual` and `expected` have the same canonical form, otherwise a unified line diff
/// of their pretty-printed forms (expected `-`, actual `+`).
pub fn compare<A: Serialize + ?Sized, E: Serialize + ?Sized>(
    actual: &A,
    expected: &E,
) -> Result<(), String> {
    let (a, e) = (erased_form(actual), erased_form(expected));
    if crate::effects::canonical_json(&a) == crate::effects::canonical_json(&e) {
        return Ok(());
    }
    Err(diff(&pretty(&e), &pretty(&a)))
}

fn pretty(v: &Value) -> String {
    // Re-parse the canonical text so maps print in sorted order.
    let sorted: Value =
        serde_json::from_str(&crate::effects::canonical_json(v)).unwrap_or(Value::Null);
    serde_json::to_string_pretty(&sorted).unwrap_or_default()
}

fn diff(expected: &str, actual: &str) -> String {
    let mut out = String::new();
    let text = similar::TextDiff::from_lines(expected, actual);
    for hunk in text.unified_diff().context_radius(3).iter_hunks() {
        let _ = write!(out, "{hunk}");
    }
    out.lines().map(|l| format!("  {l}\n")).collect()
}

/// Calls `f` twice and asserts that both results are the same in canonical form: a handler that
/// reads a clock, a random number generator or global state is not replayable.
///
/// ```
/// use effects_core::testing::assert_deterministic;
/// use effects_core::Empty;
///
/// assert_deterministic(|| Empty);
/// ```
///
/// # Panics
/// With a diff of the two runs when they differ.
#[track_caller]
pub fn assert_deterministic<T: Serialize>(mut f: impl FnMut() -> T) {
    let first = f();
    let second = f();
    if let Err(d) = compare(&second, &first) {
        panic!("not deterministic: a second run on the same input gave different effects:\n{d}");
    }
}

/// Decodes `payload` for `handler` twice, runs it on each copy, and asserts that both runs give
/// the same effects: what the worker does when a message is delivered twice.
///
/// ```
/// use effects_core::testing::assert_replayable;
/// use effects_core::{effect_handler, effects, Empty};
///
/// #[effect_handler]
/// pub fn ignore(_input: &u32) -> effects![Empty] {
///     Empty.into()
/// }
///
/// assert_replayable(&IgnoreHandler, br#"7"#);
/// ```
///
/// # Panics
/// When the payload does not decode (with the reason), or with a diff when the runs differ.
#[track_caller]
pub fn assert_replayable<H: Handler>(handler: &H, payload: &[u8]) {
    let run = || {
        let input = handler
            .decode(payload)
            .unwrap_or_else(|e| panic!("cannot replay: {e}"));
        handler.handle(input)
    };
    let (first, second) = (run(), run());
    if let Err(d) = compare(&second, &first) {
        panic!(
            "`{}` is not replayable: a second run on the same payload gave different effects:\n{d}",
            H::DESCRIPTOR.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_are_recognised() {
        assert!(looks_like_rfc3339("2026-11-26T14:02:22Z"));
        assert!(looks_like_rfc3339("2026-11-26 14:02:22.123+01:00"));
        assert!(!looks_like_rfc3339("2026-11-26"));
        assert!(!looks_like_rfc3339("card-2026-11-26T14:02:22"));
    }

    #[test]
    fn ids_are_numbered_by_first_appearance_everywhere() {
        let doc = json!({
            "datoms": [{"entity": ["card/id", "c9"], "attributes": {"card/status": "blocked"}}],
            "requests": [{"path": "/cards/c9/notify", "body": {"customer_id": "u3"}}],
            "messages": [{"key": "c9", "payload": {"card_id": "c9", "customer_id": "u3", "at": "2026-01-01T00:00:00Z"}}],
        });
        assert_eq!(
            redact(&doc),
            json!({
                "datoms": [{"entity": ["card/id", "[id 1]"], "attributes": {"card/status": "blocked"}}],
                "requests": [{"path": "/cards/[id 1]/notify", "body": {"customer_id": "[id 2]"}}],
                "messages": [{"key": "[id 1]", "payload": {"card_id": "[id 1]", "customer_id": "[id 2]", "at": "[timestamp]"}}],
            })
        );
    }

    #[test]
    fn credentials_are_masked_wherever_they_occur() {
        let doc = json!({
            "requests": [{"headers": {"Authorization": "Bearer tok-0123456789", "X-Tenant": "acme"}}],
            "responses": [{"headers": {"set-cookie": "sid=9f8e7d6c; HttpOnly"},
                           "body": {"echo": "tok-0123456789", "client_secret": 123456789, "ok": true}}],
            "log": "sent Bearer tok-0123456789, got the cookie 9f8e7d6c",
            "note": "HttpOnly cookies",
        });
        let redacted = redact(&doc);
        let text = redacted.to_string();
        for secret in ["tok-0123456789", "9f8e7d6c", "123456789"] {
            assert!(!text.contains(secret), "{secret} survived: {text}");
        }
        assert_eq!(
            redacted["requests"][0]["headers"]["X-Tenant"],
            json!("acme")
        );
        assert_eq!(redacted["responses"][0]["body"]["ok"], json!(true));
        // A cookie attribute is not a credential.
        assert_eq!(redacted["note"], json!("HttpOnly cookies"));
        assert_eq!(
            Redactions::none().apply(&json!({"password": "pw-123456"})),
            json!({"password": "[redacted]"})
        );
        // Declared fields, spelled any way.
        assert_eq!(
            Redactions::default()
                .secret_field("X_Session")
                .apply(&json!({"x-session": "s"})),
            json!({"x-session": "[redacted]"})
        );
    }

    #[test]
    fn no_rules_change_nothing() {
        let doc = json!({"id": "x", "created_at": "2026-01-01T00:00:00Z"});
        assert_eq!(Redactions::none().apply(&doc), doc);
    }

    #[test]
    fn compare_shows_a_diff() {
        let err =
            compare(&json!({"a": 1, "b": [1, 2]}), &json!({"a": 1, "b": [1, 3]})).unwrap_err();
        assert!(err.contains("-    3"), "{err}");
        assert!(err.contains("+    2"), "{err}");
        compare(&json!({"b": 1, "a": 2}), &json!({"a": 2, "b": 1})).unwrap();
    }
}
