//! Step 1 of a run: validation, and turning [`Effects`] into the rows a store writes. Nothing here
//! touches the store, so invalid effects are rejected before any write.

use sha2::{Digest, Sha256};

use crate::effects::{ConflictError, Effects, canonical_json};
use crate::http::{CREDENTIAL_HEADERS, HttpClient};
use crate::message::MessageEffect;
use crate::schema::Kind;
use crate::store::{NewDatom, NewOutboxRow, NewRead, NewRun, OutboxKind, ReadVersion};

/// Size limits checked before anything is written, and the rules every value follows.
///
/// # One definition of a valid value
///
/// Effects are checked against the same rules whatever the store, before anything is written:
/// a run that holds something one store cannot keep is refused on every store, with the same
/// [`ValidationError`] ([`RunError::Invalid`](crate::executor::RunError::Invalid); a worker
/// dead-letters its input), instead of failing inside one store's transaction — where a retry
/// cannot help and the deliveries behind it on its partition key would wait for ever. The rules
/// are not limits: they hold whatever the fields below say. Each comes from a measured
/// difference between the stores (PostgreSQL 15 with a UTF-8 database, SQLite through
/// rusqlite):
///
/// - **No NUL character (U+0000) in text that is not JSON**: the idempotency key, topics,
///   partition keys, message and request header names and values, endpoints, request paths,
///   attribute names (of lookup refs, of asserted and expected values, of the reads a run was
///   computed from) and the after-requests hook's name
///   ([`ValidationError::NulCharacter`]; the idempotency key was already refused with any
///   control character, [`ValidationError::KeyControlCharacter`]). PostgreSQL's `text` refuses
///   it (`22021 invalid byte sequence for encoding "UTF8": 0x00`, for a partition key, a topic,
///   an attribute or an identity attribute); SQLite stores it.
/// - **JSON values may hold any character.** Datom values, identity values, message payloads
///   and request bodies — strings and object keys, at any depth — are stored as canonical JSON
///   text, which writes NUL and every other control character as an escape (`"a\u0000b"`):
///   both stores keep them and give them back unchanged (headers are stored as JSON too, but
///   they also travel as HTTP and broker headers, so they follow the rule above). Numbers are
///   stored as their JSON text, so every number a [`serde_json::Value`] holds (`u64::MAX`,
///   `i64::MIN`, `1.7976931348623157e308`, `5e-324`, `-0.0`) is kept by both. A lone
///   surrogate (`"\ud800"`) cannot reach a store: neither a Rust string nor a
///   [`serde_json::Value`] can hold one (serde_json refuses such JSON text), so a message whose
///   payload has one is undecodable, and a worker dead-letters it as such.
/// - **Keys and names have a ceiling**: whatever [`Limits::max_key_bytes`] and
///   [`Limits::max_name_bytes`] say, a key (idempotency key, partition key, identity value) is
///   at most [`Limits::KEY_BYTES_CEILING`] bytes and a name (attribute, topic, endpoint, header
///   name) at most [`Limits::NAME_BYTES_CEILING`]. PostgreSQL indexes them — a run key, an
///   outbox id (`key#n`), an attribute, a topic with a partition key, an identity attribute
///   with its value — and a B-tree index row holds at most 2 704 bytes: 2 720 random bytes in
///   an identity value, a partition key, a topic, an attribute or a run key fail with `54000
///   index row size … exceeds btree version 4 maximum 2704`, while a 512-byte name with a
///   2 048-byte key fits. SQLite has no such limit.
///
/// Control characters other than NUL (in partition keys, topics, names), non-characters
/// (U+FFFE, U+FFFF) and characters outside the Basic Multilingual Plane are kept by both stores
/// and are not refused (the idempotency key excepted: it travels in an HTTP header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Datoms per run. Default 1 000.
    pub max_datoms: usize,
    /// Requests per run. Default 100.
    pub max_requests: usize,
    /// Messages per run (after-requests messages not counted). Default 1 000.
    pub max_messages: usize,
    /// Bytes of canonical JSON in one datom value, one message payload or one request (method,
    /// path, headers and body together). Default 256 KiB.
    pub max_payload_bytes: usize,
    /// Bytes in an idempotency key, a message's partition key or an identity value (as JSON).
    /// Default 512; at most [`Limits::KEY_BYTES_CEILING`] whatever it is set to.
    pub max_key_bytes: usize,
    /// Bytes in a name: an attribute (identity, asserted or expected), a topic, an endpoint, a
    /// header name. Default 256; at most [`Limits::NAME_BYTES_CEILING`] whatever it is set to.
    pub max_name_bytes: usize,
    /// Bytes in one header value of a message or request. Default 8 KiB.
    pub max_header_value_bytes: usize,
    /// Bytes of the whole run: every value, payload, request and header together. Default
    /// 8 MiB.
    pub max_run_bytes: usize,
}

impl Limits {
    /// The most bytes a key (idempotency key, partition key, identity value as JSON) may have,
    /// whatever [`Limits::max_key_bytes`] says: with a name of [`Limits::NAME_BYTES_CEILING`]
    /// it still fits in a PostgreSQL index row (see
    /// [the rules](Limits#one-definition-of-a-valid-value)).
    pub const KEY_BYTES_CEILING: usize = 2048;

    /// The most bytes a name (attribute, topic, endpoint, header name) may have, whatever
    /// [`Limits::max_name_bytes`] says.
    pub const NAME_BYTES_CEILING: usize = 512;

    /// The limit on keys in effect: [`Limits::max_key_bytes`] up to its ceiling.
    pub fn key_bytes(&self) -> usize {
        self.max_key_bytes.min(Limits::KEY_BYTES_CEILING)
    }

    /// The limit on names in effect: [`Limits::max_name_bytes`] up to its ceiling.
    pub fn name_bytes(&self) -> usize {
        self.max_name_bytes.min(Limits::NAME_BYTES_CEILING)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_datoms: 1_000,
            max_requests: 100,
            max_messages: 1_000,
            max_payload_bytes: 256 * 1024,
            max_key_bytes: 512,
            max_name_bytes: 256,
            max_header_value_bytes: 8 * 1024,
            max_run_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Why effects were refused before anything was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The idempotency key is empty.
    #[error("the idempotency key is empty: use `handler-name:message-id`")]
    EmptyKey,
    /// The idempotency key is too long.
    #[error("the idempotency key is {len} bytes long; the limit is {max} (Limits::max_key_bytes)")]
    KeyTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The idempotency key contains a control character (it travels in HTTP headers).
    #[error(
        "the idempotency key has a control character at byte {index}: it must fit in an HTTP header"
    )]
    KeyControlCharacter {
        /// Where.
        index: usize,
    },
    /// More effects of one kind than the limit.
    #[error("{count} {} exceed the limit of {max} per run", kind.key())]
    TooMany {
        /// Which kind.
        kind: Kind,
        /// How many there are.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One value, payload or request is too large.
    #[error("{}[{index}] is {bytes} bytes of JSON; the limit is {max} (Limits::max_payload_bytes)", kind.key())]
    TooLarge {
        /// Which kind.
        kind: Kind,
        /// Its index in the effects.
        index: usize,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A name, key or header is longer than its limit.
    #[error("{field} is {bytes} bytes long; the limit is {max} (Limits::{limit})")]
    FieldTooLong {
        /// Which field, as in `messages[2] topic`.
        field: String,
        /// Its length in bytes.
        bytes: usize,
        /// The limit.
        max: usize,
        /// The name of the limit in [`Limits`].
        limit: &'static str,
    },
    /// Text that is not JSON — a key, a topic, a name, a header, a path — holds a NUL character
    /// (U+0000), which PostgreSQL cannot store as text (see [`Limits`]).
    #[error(
        "{field} holds a NUL character (U+0000) at byte {index}: keys, topics, names, headers \
         and paths must not (PostgreSQL cannot store it in text); only JSON values may hold it"
    )]
    NulCharacter {
        /// Which field, as in `messages[2] partition key`.
        field: String,
        /// Where, in bytes.
        index: usize,
    },
    /// The run as a whole is larger than its limit.
    #[error(
        "the run is {bytes} bytes of values, payloads, requests and headers; the limit is {max} (Limits::max_run_bytes)"
    )]
    RunTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A datom is malformed.
    #[error("datoms[{index}] is malformed: {reason}")]
    InvalidDatom {
        /// Its index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A message is malformed.
    #[error("messages[{index}] is malformed: {reason}")]
    InvalidMessage {
        /// Its index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A request cannot be represented as JSON.
    #[error("requests[{index}] is malformed: {reason}")]
    InvalidRequest {
        /// Its index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Two datoms disagree.
    #[error(transparent)]
    Conflict(Box<ConflictError>),
    /// The run names an after-requests hook the executor does not have.
    #[error(
        "after-requests hook `{name}` is not registered: register it with ExecutorBuilder::after_requests"
    )]
    UnknownAfterRequests {
        /// The name.
        name: String,
    },
    /// A request names an endpoint the executor's HTTP client does not know.
    #[error(
        "requests[{index}] names the endpoint `{endpoint}`, which the HTTP client does not know: \
         configure it (HttpConfig::with_endpoint or HttpConfig::add_endpoint) or fix the name"
    )]
    UnknownEndpoint {
        /// The request's index.
        index: usize,
        /// The name it gives.
        endpoint: String,
    },
    /// A request sets a header that carries credentials. Effects are stored, hashed, recorded
    /// and shown, so credentials belong on the endpoint.
    #[error(
        "requests[{index}] sets the header `{header}`, which carries credentials for endpoint \
         `{endpoint}`: effects are stored and shown, so configure it on the endpoint instead \
         (Endpoint::with_header, with_bearer or with_basic_auth)"
    )]
    CredentialHeader {
        /// The request's index.
        index: usize,
        /// The endpoint.
        endpoint: String,
        /// The header as the request spells it.
        header: String,
    },
    /// The effects have requests but the executor has no HTTP client.
    #[error(
        "the effects have {count} request{} but the executor has no HTTP client: configure one with ExecutorBuilder::http",
        if *count == 1 { "" } else { "s" }
    )]
    NoHttpClient {
        /// How many requests.
        count: usize,
    },
}

/// Two compare-and-set datoms of one run that expect different values of one attribute can
/// never both hold: refused before any write instead of conflicting on every re-run.
fn check_expectations(datoms: &[NewDatom]) -> Result<(), ValidationError> {
    let mut seen: std::collections::HashMap<(&str, &str, &str), (usize, &str)> =
        std::collections::HashMap::new();
    for (index, d) in datoms.iter().enumerate() {
        for (name, value) in &d.expected {
            let slot = (
                d.identity.as_str(),
                d.identity_value.as_str(),
                name.as_str(),
            );
            match seen.get(&slot) {
                Some(&(first, v)) if v != value => {
                    return Err(ValidationError::InvalidDatom {
                        index,
                        reason: format!(
                            "it expects {name} of [{} {}] to be {value}, but datoms[{first}] expects {v}: \
                             both cannot hold",
                            d.identity, d.identity_value
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    seen.insert(slot, (index, value.as_str()));
                }
            }
        }
    }
    Ok(())
}

/// What a run is checked against: the limits and, unless a mutant turns them off, the rules
/// on values every store can hold (see [`Limits`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules<'a> {
    pub(crate) limits: &'a Limits,
    /// The rules on values: no NUL in text that is not JSON, the ceilings on keys and names.
    /// Off only for [`Mutant::NoValueRules`](super::Mutant::NoValueRules).
    pub(crate) values: bool,
}

impl<'a> Rules<'a> {
    /// Every rule.
    pub(crate) fn new(limits: &'a Limits) -> Rules<'a> {
        Rules {
            limits,
            values: true,
        }
    }

    fn key_bytes(&self) -> usize {
        if self.values {
            self.limits.key_bytes()
        } else {
            self.limits.max_key_bytes
        }
    }

    fn name_bytes(&self) -> usize {
        if self.values {
            self.limits.name_bytes()
        } else {
            self.limits.max_name_bytes
        }
    }

    /// Refuses text that is not JSON if it holds a NUL character.
    fn text(&self, field: impl FnOnce() -> String, text: &str) -> Result<(), ValidationError> {
        match text.bytes().position(|b| b == 0) {
            Some(index) if self.values => Err(ValidationError::NulCharacter {
                field: field(),
                index,
            }),
            _ => Ok(()),
        }
    }

    /// A key: its length, and no NUL.
    fn key(&self, field: impl Fn() -> String, key: &str) -> Result<(), ValidationError> {
        check_len(&field, key, self.key_bytes(), "max_key_bytes")?;
        self.text(field, key)
    }

    /// A name: its length, and no NUL.
    fn name(&self, field: impl Fn() -> String, name: &str) -> Result<(), ValidationError> {
        check_len(&field, name, self.name_bytes(), "max_name_bytes")?;
        self.text(field, name)
    }
}

/// Whether a run can exist under `key`: no key [`check_key`] refuses for its characters was
/// ever written, so such a key is not looked up (a store may not even be able to compare it).
pub(crate) fn storable_key(key: &str) -> bool {
    !key.bytes().any(|b| b.is_ascii_control())
}

pub(crate) fn check_key(key: &str, rules: &Rules<'_>) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::EmptyKey);
    }
    let max = rules.key_bytes();
    if key.len() > max {
        return Err(ValidationError::KeyTooLong {
            len: key.len(),
            max,
        });
    }
    if let Some(index) = key.bytes().position(|b| b.is_ascii_control()) {
        return Err(ValidationError::KeyControlCharacter { index });
    }
    Ok(())
}

fn check_count(kind: Kind, count: usize, max: usize) -> Result<(), ValidationError> {
    if count > max {
        return Err(ValidationError::TooMany { kind, count, max });
    }
    Ok(())
}

fn check_size(kind: Kind, index: usize, text: &str, max: usize) -> Result<(), ValidationError> {
    if text.len() > max {
        return Err(ValidationError::TooLarge {
            kind,
            index,
            bytes: text.len(),
            max,
        });
    }
    Ok(())
}

fn check_len(
    field: impl FnOnce() -> String,
    text: &str,
    max: usize,
    limit: &'static str,
) -> Result<(), ValidationError> {
    if text.len() > max {
        return Err(ValidationError::FieldTooLong {
            field: field(),
            bytes: text.len(),
            max,
            limit,
        });
    }
    Ok(())
}

fn check_headers<'a>(
    what: &str,
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    rules: &Rules<'_>,
) -> Result<(), ValidationError> {
    for (name, value) in headers {
        rules.name(|| format!("{what} header name `{}…`", prefix(name)), name)?;
        let field = || format!("{what} header `{}`", prefix(name));
        check_len(
            field,
            value,
            rules.limits.max_header_value_bytes,
            "max_header_value_bytes",
        )?;
        rules.text(field, value)?;
    }
    Ok(())
}

/// The start of a long name, for errors, with control characters escaped (`\u{0}`).
fn prefix(name: &str) -> String {
    let mut end = name.len().min(40);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end);
    for c in name[..end].chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Lowercase hex SHA-256 of the effects' canonical JSON: what a key is bound to.
pub fn effects_sha256(effects: &Effects) -> String {
    hex(&Sha256::digest(effects.canonical_json().as_bytes()))
}

pub(crate) fn message_row(
    seq: u32,
    index: usize,
    message: &MessageEffect,
    rules: &Rules<'_>,
) -> Result<NewOutboxRow, ValidationError> {
    if message.topic.is_empty() {
        return Err(ValidationError::InvalidMessage {
            index,
            reason: "the topic is empty".to_owned(),
        });
    }
    rules.name(|| format!("messages[{index}] topic"), &message.topic)?;
    if let Some(key) = &message.key {
        rules.key(|| format!("messages[{index}] partition key"), key)?;
    }
    check_headers(&format!("messages[{index}]"), &message.headers, rules)?;
    let payload = canonical_json(&message.payload);
    check_size(
        Kind::Messages,
        index,
        &payload,
        rules.limits.max_payload_bytes,
    )?;
    Ok(NewOutboxRow {
        seq,
        kind: OutboxKind::Message,
        destination: message.topic.clone(),
        partition_key: message.key.clone(),
        headers: message.headers.clone(),
        payload,
    })
}

/// Checks the text of every request that is not JSON: endpoint, path, headers.
fn check_request_text(effects: &Effects, rules: &Rules<'_>) -> Result<(), ValidationError> {
    for (index, r) in effects.requests.iter().enumerate() {
        rules.name(|| format!("requests[{index}] endpoint"), &r.endpoint)?;
        rules.text(|| format!("requests[{index}] path"), &r.path)?;
        check_headers(&format!("requests[{index}]"), &r.headers, rules)?;
    }
    Ok(())
}

/// Checks every request against the client: a known endpoint, no credential header.
fn check_requests(effects: &Effects, http: &impl HttpClient) -> Result<(), ValidationError> {
    for (index, request) in effects.requests.iter().enumerate() {
        for header in request.headers.keys() {
            let lower = header.to_ascii_lowercase();
            if CREDENTIAL_HEADERS.contains(&lower.as_str())
                || http.is_secret_header(&request.endpoint, &lower)
            {
                return Err(ValidationError::CredentialHeader {
                    index,
                    endpoint: request.endpoint.clone(),
                    header: header.clone(),
                });
            }
        }
        if !http.knows(&request.endpoint) {
            return Err(ValidationError::UnknownEndpoint {
                index,
                endpoint: request.endpoint.clone(),
            });
        }
    }
    Ok(())
}

/// Validates and prepares a run. `has_hook` tells whether a named after-requests hook exists;
/// `http` is the executor's HTTP client, if it has one.
pub(crate) fn prepare(
    key: &str,
    effects: &Effects,
    reads: &[ReadVersion],
    after_requests: Option<&str>,
    has_hook: impl Fn(&str) -> bool,
    http: Option<&impl HttpClient>,
    rules: &Rules<'_>,
) -> Result<NewRun, ValidationError> {
    let limits = rules.limits;
    check_key(key, rules)?;
    check_count(Kind::Datoms, effects.datoms.len(), limits.max_datoms)?;
    check_count(Kind::Requests, effects.requests.len(), limits.max_requests)?;
    check_count(Kind::Messages, effects.messages.len(), limits.max_messages)?;
    check_request_text(effects, rules)?;
    match http {
        None if !effects.requests.is_empty() => {
            return Err(ValidationError::NoHttpClient {
                count: effects.requests.len(),
            });
        }
        None => {}
        Some(http) => check_requests(effects, http)?,
    }
    if let Some(name) = after_requests {
        rules.text(|| "the after-requests hook's name".to_owned(), name)?;
        if !has_hook(name) {
            return Err(ValidationError::UnknownAfterRequests {
                name: name.to_owned(),
            });
        }
    }
    effects
        .check_conflicts()
        .map_err(|e| ValidationError::Conflict(Box::new(e)))?;

    let mut run_bytes: usize = 0;
    let mut datoms = Vec::with_capacity(effects.datoms.len());
    for (index, d) in effects.datoms.iter().enumerate() {
        if d.entity.attribute.is_empty() {
            return Err(ValidationError::InvalidDatom {
                index,
                reason: "the lookup ref's attribute is empty".to_owned(),
            });
        }
        rules.name(
            || format!("datoms[{index}] identity attribute"),
            &d.entity.attribute,
        )?;
        let identity_value = canonical_json(&d.entity.value);
        // JSON: any character is written as text a store keeps; only its length counts.
        check_len(
            || format!("datoms[{index}] identity value"),
            &identity_value,
            rules.key_bytes(),
            "max_key_bytes",
        )?;
        run_bytes += d.entity.attribute.len() + identity_value.len();
        let mut attributes = Vec::with_capacity(d.attributes.len());
        for (name, value) in &d.attributes {
            if name.is_empty() {
                return Err(ValidationError::InvalidDatom {
                    index,
                    reason: "an attribute name is empty".to_owned(),
                });
            }
            rules.name(
                || format!("datoms[{index}] attribute `{}…`", prefix(name)),
                name,
            )?;
            let value = canonical_json(value);
            check_size(Kind::Datoms, index, &value, limits.max_payload_bytes)?;
            run_bytes += name.len() + value.len();
            attributes.push((name.clone(), value));
        }
        let mut expected = Vec::with_capacity(d.expected.len());
        for (name, value) in &d.expected {
            if name.is_empty() {
                return Err(ValidationError::InvalidDatom {
                    index,
                    reason: "an expected attribute's name is empty".to_owned(),
                });
            }
            rules.name(
                || format!("datoms[{index}] expected attribute `{}…`", prefix(name)),
                name,
            )?;
            let value = canonical_json(value);
            check_size(Kind::Datoms, index, &value, limits.max_payload_bytes)?;
            run_bytes += name.len() + value.len();
            expected.push((name.clone(), value));
        }
        datoms.push(NewDatom {
            identity: d.entity.attribute.clone(),
            identity_value,
            op: d.op,
            attributes,
            expected,
        });
    }
    check_expectations(&datoms)?;
    let mut new_reads: Vec<NewRead> = Vec::with_capacity(reads.len());
    for (index, read) in reads.iter().enumerate() {
        rules.text(
            || format!("reads[{index}] identity attribute"),
            &read.entity.attribute,
        )?;
        let identity_value = canonical_json(&read.entity.value);
        let same = |r: &NewRead| {
            r.entity.attribute == read.entity.attribute
                && r.identity_value == identity_value
                && r.tx == read.tx
        };
        if !new_reads.iter().any(same) {
            new_reads.push(NewRead {
                entity: read.entity.clone(),
                identity_value,
                tx: read.tx,
            });
        }
    }

    let mut outbox = Vec::with_capacity(effects.requests.len() + effects.messages.len());
    let mut seq: u32 = 0;
    for (index, r) in effects.requests.iter().enumerate() {
        let value = serde_json::to_value(r).map_err(|e| ValidationError::InvalidRequest {
            index,
            reason: e.to_string(),
        })?;
        let payload = canonical_json(&value);
        check_size(Kind::Requests, index, &payload, limits.max_payload_bytes)?;
        run_bytes += payload.len();
        outbox.push(NewOutboxRow {
            seq,
            kind: OutboxKind::Request,
            destination: r.endpoint.clone(),
            partition_key: None,
            headers: r.headers.clone(),
            payload,
        });
        seq += 1;
    }
    for (index, m) in effects.messages.iter().enumerate() {
        let row = message_row(seq, index, m, rules)?;
        run_bytes += row.destination.len()
            + row.partition_key.as_ref().map_or(0, String::len)
            + row
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + row.payload.len();
        outbox.push(row);
        seq += 1;
    }
    if run_bytes > limits.max_run_bytes {
        return Err(ValidationError::RunTooLarge {
            bytes: run_bytes,
            max: limits.max_run_bytes,
        });
    }
    Ok(NewRun {
        key: key.to_owned(),
        effects_sha256: effects_sha256(effects),
        after_requests: after_requests.map(str::to_owned),
        reads: new_reads,
        datoms,
        outbox,
        ack: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::datom::{DatomEffect, LookupRef};
    use crate::executor::NoHttp;
    use crate::request::{Method, RequestEffect};

    fn run(effects: &Effects, rules: &Rules<'_>) -> Result<NewRun, ValidationError> {
        run_with("k", effects, &[], None, rules)
    }

    fn run_with(
        key: &str,
        effects: &Effects,
        reads: &[ReadVersion],
        after_requests: Option<&str>,
        rules: &Rules<'_>,
    ) -> Result<NewRun, ValidationError> {
        prepare(
            key,
            effects,
            reads,
            after_requests,
            |_| true,
            None::<&NoHttp>,
            rules,
        )
    }

    fn card(id: &str) -> LookupRef {
        LookupRef::new("card/id", id)
    }

    fn nul_field(e: Result<NewRun, ValidationError>) -> (String, usize) {
        match e {
            Err(ValidationError::NulCharacter { field, index }) => (field, index),
            other => panic!("expected NulCharacter, got {other:?}"),
        }
    }

    #[test]
    fn a_nul_in_text_that_is_not_json_is_refused_and_named() {
        let limits = Limits::default();
        let rules = Rules::new(&limits);
        let m = || MessageEffect::new("t", json!(1));
        let cases: Vec<(Effects, &str, usize)> = vec![
            (
                MessageEffect::new("to\0pic", json!(1)).into(),
                "messages[0] topic",
                2,
            ),
            (m().with_key("a\0b").into(), "messages[0] partition key", 1),
            (
                m().with_header("x-\0", "v").into(),
                "messages[0] header name `x-\\u{0}…`",
                2,
            ),
            (
                m().with_header("x-a", "v\0").into(),
                "messages[0] header `x-a`",
                1,
            ),
            (
                DatomEffect::assert(card("c"), [("card/\0s", json!(1))]).into(),
                "datoms[0] attribute `card/\\u{0}s…`",
                5,
            ),
            (
                DatomEffect::assert(LookupRef::new("card/\0id", "c"), [("card/s", json!(1))])
                    .into(),
                "datoms[0] identity attribute",
                5,
            ),
            (
                DatomEffect::assert(card("c"), [("card/s", json!(1))])
                    .expecting("card/\0s", json!(0))
                    .into(),
                "datoms[0] expected attribute `card/\\u{0}s…`",
                5,
            ),
        ];
        for (effects, field, index) in cases {
            assert_eq!(nul_field(run(&effects, &rules)), (field.to_owned(), index));
        }
        let reads = [ReadVersion::missing(LookupRef::new("card/\0id", "c"))];
        assert_eq!(
            nul_field(run_with("k", &Effects::new(), &reads, None, &rules)),
            ("reads[0] identity attribute".to_owned(), 5)
        );
        assert_eq!(
            nul_field(run_with("k", &Effects::new(), &[], Some("ho\0ok"), &rules)),
            ("the after-requests hook's name".to_owned(), 2)
        );
        let request = |r: RequestEffect| Effects::from(r);
        let get = |endpoint: &str, path: &str| RequestEffect::new(Method::Get, endpoint, path);
        for (effects, field) in [
            (request(get("no\0tify", "/x")), "requests[0] endpoint"),
            (request(get("notify", "/x\0")), "requests[0] path"),
            (
                request({
                    let mut r = get("notify", "/x");
                    r.headers.insert("x-a".to_owned(), "\0".to_owned());
                    r
                }),
                "requests[0] header `x-a`",
            ),
        ] {
            match check_request_text(&effects, &rules) {
                Err(ValidationError::NulCharacter { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // The key was refused already, as any control character.
        assert_eq!(
            run_with("k\0", &Effects::new(), &[], None, &rules).unwrap_err(),
            ValidationError::KeyControlCharacter { index: 1 }
        );
        let shown = run(&m().with_key("a\0b").into(), &rules)
            .unwrap_err()
            .to_string();
        assert!(!shown.contains('\0'), "{shown}");
        assert!(
            shown.contains("NUL character (U+0000) at byte 1"),
            "{shown}"
        );
    }

    #[test]
    fn json_values_hold_any_character_as_an_escape() {
        let limits = Limits::default();
        let rules = Rules::new(&limits);
        let odd = "a\0b\u{1}\u{1f}\u{7f}\u{fffe}\u{ffff}\u{10ffff}😀";
        let value = json!({ "s": odd, "list": [odd, {odd: odd}], odd: [u64::MAX] });
        let effects = Effects::from(DatomEffect::assert(
            LookupRef::new("card/id", odd),
            [("card/v", value.clone())],
        ))
        .merge(MessageEffect::new("t", value.clone()).with_key("p\u{1}"));
        let run = run(&effects, &rules).unwrap();
        let texts = [
            &run.datoms[0].identity_value,
            &run.datoms[0].attributes[0].1,
            &run.outbox[0].payload,
        ];
        for text in texts {
            assert!(!text.contains('\0'), "{text}");
            assert!(text.contains("a\\u0000b"), "{text}");
        }
        let back: serde_json::Value = serde_json::from_str(&run.outbox[0].payload).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn lone_surrogates_cannot_be_held_by_a_json_value() {
        for text in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#"{"\ud800":1}"#,
            r#"["a\udfffb"]"#,
        ] {
            assert!(
                serde_json::from_str::<serde_json::Value>(text).is_err(),
                "{text}"
            );
        }
        assert!(serde_json::from_slice::<serde_json::Value>(b"\"\xed\xa0\x80\"").is_err());
    }

    #[test]
    fn keys_and_names_have_a_ceiling_whatever_the_limits() {
        let limits = Limits {
            max_key_bytes: 1 << 20,
            max_name_bytes: 1 << 20,
            ..Limits::default()
        };
        let rules = Rules::new(&limits);
        assert_eq!(limits.key_bytes(), Limits::KEY_BYTES_CEILING);
        assert_eq!(limits.name_bytes(), Limits::NAME_BYTES_CEILING);
        let key = "k".repeat(Limits::KEY_BYTES_CEILING + 1);
        let name = "n".repeat(Limits::NAME_BYTES_CEILING + 1);
        assert_eq!(
            run_with(&key, &Effects::new(), &[], None, &rules).unwrap_err(),
            ValidationError::KeyTooLong {
                len: 2049,
                max: 2048
            }
        );
        let too_long = |effects: Effects| match run(&effects, &rules) {
            Err(ValidationError::FieldTooLong {
                field, bytes, max, ..
            }) => (field, bytes, max),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            too_long(
                MessageEffect::new("t", json!(1))
                    .with_key(key.as_str())
                    .into()
            ),
            ("messages[0] partition key".to_owned(), 2049, 2048)
        );
        // The identity value counts as its JSON text, quotes included.
        assert_eq!(
            too_long(DatomEffect::assert(card(&key[1..]), [("card/s", json!(1))]).into()),
            ("datoms[0] identity value".to_owned(), 2050, 2048)
        );
        assert_eq!(
            too_long(MessageEffect::new(name.as_str(), json!(1)).into()),
            ("messages[0] topic".to_owned(), 513, 512)
        );
        // Up to the ceilings, everything is accepted.
        let fits = MessageEffect::new(&name[1..], json!(1)).with_key(&key[1..]);
        assert!(run_with(&key[1..], &fits.into(), &[], None, &rules).is_ok());
        // Without the rules (the mutant), the limits alone apply.
        let off = Rules {
            values: false,
            ..Rules::new(&limits)
        };
        assert!(run_with(&key, &Effects::new(), &[], None, &off).is_ok());
        let nul = MessageEffect::new("t\0", json!(1)).with_key("a\0b");
        assert!(run(&nul.into(), &off).is_ok());
    }

    #[test]
    fn a_key_with_a_control_character_is_never_looked_up() {
        assert!(storable_key("transfer:t-1"));
        assert!(storable_key("é😀"));
        assert!(!storable_key("transfer:a\0b"));
        assert!(!storable_key("a\nb"));
    }
}
