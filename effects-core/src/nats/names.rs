//! Names on the wire: subject tokens from topics and group names, consumer names, the partition
//! of a key, and header values that survive NATS's header syntax.
//!
//! Every mapping here is deterministic and documented in the [module docs](super), because
//! publishers and consumers in other processes (or other languages) must compute the same
//! names.

use sha2::{Digest, Sha256};

/// A topic (or group name) as one NATS subject token.
///
/// ASCII letters, digits, `-` and `_` are kept; every other byte of the UTF-8 text (`.`, `*`,
/// `>`, whitespace, `~`, non-ASCII, ...) becomes `~` followed by two upper-case hex digits. The
/// empty string becomes a lone `~`, which no other text produces. The mapping is injective, so
/// two topics never share a subject.
pub(crate) fn subject_token(text: &str) -> String {
    if text.is_empty() {
        return "~".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            push_hex(&mut out, '~', b);
        }
    }
    out
}

fn push_hex(out: &mut String, marker: char, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(marker);
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0f)]));
}

/// The partition of a partition key among `partitions`: FNV-1a (64 bit) of the key's UTF-8
/// bytes, modulo the partition count.
pub(crate) fn partition_of(key: &str, partitions: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for &b in key.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(PRIME);
    }
    let n = u64::from(partitions.max(1));
    // The remainder is below `partitions`, so it fits.
    u16::try_from(hash % n).unwrap_or(0)
}

/// The durable consumer name of one lane (`p<i>` or `u`) of a group on a topic:
/// `<group>_<topic>_<hash>_<lane>`, where group and topic are shortened to letters, digits and
/// `-` (for people reading `nats consumer ls`) and `<hash>` is the first 16 hex digits of
/// SHA-256 over both names, length-prefixed, which makes the name unique per (group, topic).
pub(crate) fn consumer_name(group: &str, topic: &str, lane: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update((group.len() as u64).to_be_bytes());
    hasher.update(group.as_bytes());
    hasher.update(topic.as_bytes());
    let digest = hasher.finalize();
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}_{}_{hash}_{lane}",
        readable(group, 32),
        readable(topic, 48)
    )
}

/// The stream that holds the lane holds and the group members of the stream `stream`:
/// `<stream>_HOLDS`.
pub(crate) fn holds_stream(stream: &str) -> String {
    format!("{stream}_HOLDS")
}

/// The subject of the hold of one keyed lane of a group on a topic:
/// `<prefix>.hold.<group>.<topic>.<lane>` (group and topic as [`subject_token`]s).
pub(crate) fn hold_subject(prefix: &str, group: &str, topic: &str, lane: &str) -> String {
    format!(
        "{prefix}.hold.{}.{}.{lane}",
        subject_token(group),
        subject_token(topic)
    )
}

/// The subject of one member's presence in a group on a topic:
/// `<prefix>.member.<group>.<topic>.<member>`.
pub(crate) fn member_subject(prefix: &str, group: &str, topic: &str, member: &str) -> String {
    format!("{}.{member}", members_filter_base(prefix, group, topic))
}

/// The filter matching every member of a group on a topic.
pub(crate) fn members_filter(prefix: &str, group: &str, topic: &str) -> String {
    format!("{}.*", members_filter_base(prefix, group, topic))
}

fn members_filter_base(prefix: &str, group: &str, topic: &str) -> String {
    format!(
        "{prefix}.member.{}.{}",
        subject_token(group),
        subject_token(topic)
    )
}

/// A name for this connection among a group's members, different for every transport ever
/// connected (process id, time and a counter, hashed): 16 hex digits.
pub(crate) fn member_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hasher = Sha256::new();
    hasher.update(std::process::id().to_be_bytes());
    hasher.update(nanos.to_be_bytes());
    hasher.update(NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    // The address of a stack value adds what the clock and the pid may share across hosts.
    let here = 0_u8;
    hasher.update((std::ptr::addr_of!(here) as usize).to_be_bytes());
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn readable(text: &str, max: usize) -> String {
    let kept: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(max)
        .collect();
    if kept.is_empty() {
        "x".to_owned()
    } else {
        kept
    }
}

/// A header value (or message id, or partition key) in a form NATS carries unchanged: `%`,
/// control characters (CR and LF among them) and whitespace at either end (which NATS trims)
/// become `%XX`, one per UTF-8 byte. Everything else, non-ASCII included, is kept, so ordinary
/// values read the same to any NATS client.
pub(crate) fn encode_value(value: &str) -> String {
    let last = value.char_indices().last().map_or(0, |(i, _)| i);
    let escaped = |i: usize, c: char| {
        c == '%' || c.is_control() || (c.is_whitespace() && (i == 0 || i == last))
    };
    if !value.char_indices().any(|(i, c)| escaped(i, c)) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 8);
    let mut buf = [0_u8; 4];
    for (i, c) in value.char_indices() {
        if escaped(i, c) {
            for &b in c.encode_utf8(&mut buf).as_bytes() {
                push_hex(&mut out, '%', b);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`encode_value`]. A `%` not followed by two hex digits is kept as it is, so a
/// value written by another NATS client decodes to itself. Escapes that decode to bytes that
/// are not UTF-8 (possible only in a value another client wrote) are replaced with U+FFFD; see
/// [`try_decode_value`] to refuse them instead.
pub(crate) fn decode_value(value: &str) -> String {
    try_decode_value(value).unwrap_or_else(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

/// [`decode_value`], or the decoded bytes when they are not UTF-8.
pub(crate) fn try_decode_value(value: &str) -> Result<String, Vec<u8>> {
    if !value.contains('%') {
        return Ok(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h << 4) | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(std::string::FromUtf8Error::into_bytes)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Whether `name` can be a NATS header name: printable ASCII without `:` or spaces.
pub(crate) fn valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// Whether `token` can be one token of a subject: not empty, no `.`, no wildcards, no
/// whitespace or control characters.
pub(crate) fn valid_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token != "*"
        && token != ">"
        && token
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '.' && c != '*' && c != '>')
}

/// Whether `name` can name a stream or consumer: not empty, printable, without whitespace, `.`,
/// `*`, `>`, `/` or `\`.
pub(crate) fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.chars().all(|c| {
            !c.is_whitespace() && !c.is_control() && !matches!(c, '.' | '*' | '>' | '/' | '\\')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_topics_read_as_themselves() {
        assert_eq!(subject_token("card-status-changed"), "card-status-changed");
        assert_eq!(subject_token("cards_to_block"), "cards_to_block");
        assert_eq!(subject_token("a.b"), "a~2Eb");
        assert_eq!(subject_token("a*>"), "a~2A~3E");
        assert_eq!(subject_token("~"), "~7E");
        assert_eq!(subject_token(""), "~");
        assert_eq!(subject_token("é"), "~C3~A9");
    }

    #[test]
    fn partitions_are_stable() {
        // FNV-1a 64 of "" is the offset basis; of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition_of("", 16),
            (0xcbf2_9ce4_8422_2325_u64 % 16) as u16
        );
        assert_eq!(
            partition_of("a", 16),
            (0xaf63_dc4c_8601_ec8c_u64 % 16) as u16
        );
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn consumer_names_are_valid_and_distinct() {
        let a = consumer_name("block", "cards.x", "p3");
        let b = consumer_name("block", "cards-x", "p3");
        let c = consumer_name("block.cards", "x", "p3");
        assert!(valid_stream_name(&a), "{a}");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("block_cardsx_") && a.ends_with("_p3"), "{a}");
        assert!(valid_stream_name(&consumer_name("", "", "u")));
    }

    #[test]
    fn hold_and_member_subjects() {
        assert_eq!(
            hold_subject("effects", "block", "cards.x", "p3"),
            "effects.hold.block.cards~2Ex.p3"
        );
        assert_eq!(
            member_subject("effects", "block", "t", "ab12"),
            "effects.member.block.t.ab12"
        );
        assert_eq!(members_filter("effects", "g", "t"), "effects.member.g.t.*");
        let (a, b) = (member_id(), member_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(valid_subject_token(&a));
    }

    #[test]
    fn values_keep_ordinary_text() {
        assert_eq!(encode_value("block:in-1#0"), "block:in-1#0");
        assert_eq!(encode_value("a b"), "a b");
        assert_eq!(encode_value(" a "), "%20a%20");
        assert_eq!(encode_value("50%"), "50%25");
        assert_eq!(encode_value("x\r\ny"), "x%0D%0Ay");
        assert_eq!(decode_value("100%"), "100%");
        assert_eq!(decode_value("%zz"), "%zz");
    }

    #[test]
    fn escapes_that_are_not_utf8_are_told() {
        assert_eq!(try_decode_value("a%C3%A9"), Ok("a\u{e9}".to_owned()));
        assert_eq!(try_decode_value("%FF%FE"), Err(vec![0xff, 0xfe]));
        assert_eq!(decode_value("%FF"), "\u{fffd}");
    }

    proptest! {
        #[test]
        fn subject_tokens_are_valid_and_injective(a in ".*", b in ".*") {
            let (ta, tb) = (subject_token(&a), subject_token(&b));
            prop_assert!(valid_subject_token(&ta));
            prop_assert_eq!(a == b, ta == tb);
        }

        #[test]
        fn values_round_trip(v in ".*") {
            let encoded = encode_value(&v);
            prop_assert!(!encoded.contains(['\r', '\n']));
            prop_assert_eq!(encoded.trim(), encoded.as_str());
            prop_assert_eq!(decode_value(&encoded), v);
        }
    }
}
