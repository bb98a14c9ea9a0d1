//! Step 1 of a run: validation, and turning [`Effects`] into the rows a store writes. Nothing here
//! touches the store, so invalid effects are rejected before any write.

use sha2::{Digest, Sha256};

use crate::effects::{ConflictError, Effects, canonical_json};
use crate::http::{CREDENTIAL_HEADERS, HttpClient};
use crate::message::MessageEffect;
use crate::schema::Kind;
use crate::store::{NewDatom, NewOutboxRow, NewRead, NewRun, OutboxKind, ReadVersion};

/// Size limits checked before anything is written.
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
    /// Bytes in an idempotency key or a message's partition key. Default 512.
    pub max_key_bytes: usize,
    /// Bytes in a name: an attribute (identity, asserted or expected), a topic, an endpoint, a
    /// header name. Default 256.
    pub max_name_bytes: usize,
    /// Bytes in one header value of a message or request. Default 8 KiB.
    pub max_header_value_bytes: usize,
    /// Bytes of the whole run: every value, payload, request and header together. Default
    /// 8 MiB.
    pub max_run_bytes: usize,
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

pub(crate) fn check_key(key: &str, limits: &Limits) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::EmptyKey);
    }
    if key.len() > limits.max_key_bytes {
        return Err(ValidationError::KeyTooLong {
            len: key.len(),
            max: limits.max_key_bytes,
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

fn check_name(
    field: impl FnOnce() -> String,
    name: &str,
    limits: &Limits,
) -> Result<(), ValidationError> {
    check_len(field, name, limits.max_name_bytes, "max_name_bytes")
}

fn check_headers<'a>(
    what: &str,
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    limits: &Limits,
) -> Result<(), ValidationError> {
    for (name, value) in headers {
        check_name(
            || format!("{what} header name `{}…`", prefix(name)),
            name,
            limits,
        )?;
        check_len(
            || format!("{what} header `{}`", prefix(name)),
            value,
            limits.max_header_value_bytes,
            "max_header_value_bytes",
        )?;
    }
    Ok(())
}

/// The start of a long name, for errors.
fn prefix(name: &str) -> &str {
    let mut end = name.len().min(40);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
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
    limits: &Limits,
) -> Result<NewOutboxRow, ValidationError> {
    if message.topic.is_empty() {
        return Err(ValidationError::InvalidMessage {
            index,
            reason: "the topic is empty".to_owned(),
        });
    }
    check_name(
        || format!("messages[{index}] topic"),
        &message.topic,
        limits,
    )?;
    if let Some(key) = &message.key {
        check_len(
            || format!("messages[{index}] partition key"),
            key,
            limits.max_key_bytes,
            "max_key_bytes",
        )?;
    }
    check_headers(&format!("messages[{index}]"), &message.headers, limits)?;
    let payload = canonical_json(&message.payload);
    check_size(Kind::Messages, index, &payload, limits.max_payload_bytes)?;
    Ok(NewOutboxRow {
        seq,
        kind: OutboxKind::Message,
        destination: message.topic.clone(),
        partition_key: message.key.clone(),
        headers: message.headers.clone(),
        payload,
    })
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
    limits: &Limits,
) -> Result<NewRun, ValidationError> {
    check_key(key, limits)?;
    check_count(Kind::Datoms, effects.datoms.len(), limits.max_datoms)?;
    check_count(Kind::Requests, effects.requests.len(), limits.max_requests)?;
    check_count(Kind::Messages, effects.messages.len(), limits.max_messages)?;
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
        check_name(
            || format!("datoms[{index}] identity attribute"),
            &d.entity.attribute,
            limits,
        )?;
        let identity_value = canonical_json(&d.entity.value);
        check_len(
            || format!("datoms[{index}] identity value"),
            &identity_value,
            limits.max_key_bytes,
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
            check_name(
                || format!("datoms[{index}] attribute `{}…`", prefix(name)),
                name,
                limits,
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
            check_name(
                || format!("datoms[{index}] expected attribute `{}…`", prefix(name)),
                name,
                limits,
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
    for read in reads {
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
        check_name(
            || format!("requests[{index}] endpoint"),
            &r.endpoint,
            limits,
        )?;
        check_headers(&format!("requests[{index}]"), &r.headers, limits)?;
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
        let row = message_row(seq, index, m, limits)?;
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
    })
}
