//! One transport conformance suite: every case is written once, as a generic function over a
//! [`Harness`] (a transport plus what the case needs to inspect it), and run unchanged against
//! the embedded [`SqliteLog`] and, with the `nats` feature, the NATS JetStream transport on the
//! machine's server (127.0.0.1:4222, or `EFFECTS_NATS_URL`; each test on a stream of its own).
//!
//! Where the two legitimately differ the harness says so and the case asserts each side's
//! behaviour: how long ids are deduplicated ([`Dedup`]), which keys wait for each other
//! ([`Harness::same_lane`]), whether the broker reports duplicates, and whether a delivery can
//! be settled through another connection.
//!
//! Every wait is bounded; a missing NATS server fails the NATS half with a message saying how
//! to start one.

mod support;

#[cfg(feature = "nats")]
mod nats_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use effects_core::transport::{
    Delivery, FetchRequest, OutgoingMessage, SqliteLog, Transport, TransportError,
};

/// How long a broker remembers a message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dedup {
    /// For as long as the message is kept (the SQLite log).
    Forever,
    /// For a window after the first publish (JetStream's duplicate window).
    Window(Duration),
}

/// A transport under test and what the cases need to look at it.
pub trait Harness {
    /// The transport.
    type T: Transport + Clone;

    /// The transport every case starts with.
    fn transport(&self) -> Self::T;

    /// Another connection to the same broker and topics, as another process would have.
    fn another_connection(&self) -> impl std::future::Future<Output = Self::T>;

    /// The dead letters of `consumer`: (message id, reason, deliveries).
    fn dead_letters(
        &self,
        transport: &Self::T,
        consumer: &str,
    ) -> impl std::future::Future<Output = Vec<(String, String, u32)>>;

    /// How many publishes the broker reported as duplicates, if it reports them.
    fn duplicates_reported(&self, transport: &Self::T) -> Option<u64>;

    /// How long ids are deduplicated.
    fn dedup(&self) -> Dedup;

    /// Whether messages with partition keys `a` and `b` are handed out one after another
    /// (the same key always is; on NATS so are keys in the same partition).
    fn same_lane(&self, a: &str, b: &str) -> bool;

    /// Whether a delivery can be acknowledged through another connection than the one that
    /// fetched it.
    fn settles_anywhere(&self) -> bool;
}

// ---------------------------------------------------------------------------------------------
// The SQLite log.

struct SqliteHarness {
    path: std::path::PathBuf,
    log: SqliteLog,
}

impl SqliteHarness {
    async fn new() -> SqliteHarness {
        let dir = support::temp_dir("conformance");
        let path = dir.join("log.db");
        let log = SqliteLog::open(&path)
            .expect("open the log")
            .with_poll_interval(Duration::from_millis(10));
        SqliteHarness { path, log }
    }
}

impl Harness for SqliteHarness {
    type T = SqliteLog;

    fn transport(&self) -> SqliteLog {
        self.log.clone()
    }

    async fn another_connection(&self) -> SqliteLog {
        SqliteLog::open(&self.path)
            .expect("open the log again")
            .with_poll_interval(Duration::from_millis(10))
    }

    async fn dead_letters(&self, log: &SqliteLog, consumer: &str) -> Vec<(String, String, u32)> {
        log.dead_letters(consumer)
            .await
            .expect("read dead letters")
            .into_iter()
            .map(|d| (d.message_id, d.reason, d.deliveries))
            .collect()
    }

    fn duplicates_reported(&self, _: &SqliteLog) -> Option<u64> {
        None
    }

    fn dedup(&self) -> Dedup {
        Dedup::Forever
    }

    fn same_lane(&self, a: &str, b: &str) -> bool {
        a == b
    }

    fn settles_anywhere(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream.

#[cfg(feature = "nats")]
mod nats_harness {
    use super::*;
    use effects_core::nats::NatsTransport;
    use nats_support::TestStream;

    pub(super) struct NatsHarness {
        stream: TestStream,
    }

    impl NatsHarness {
        pub(super) async fn new() -> NatsHarness {
            NatsHarness {
                stream: TestStream::new("conformance", |_| {}).await,
            }
        }

        pub(super) async fn with_short_dedup_window() -> NatsHarness {
            NatsHarness {
                stream: TestStream::new("conformance", |c| {
                    c.duplicate_window = Duration::from_millis(800);
                })
                .await,
            }
        }
    }

    impl Harness for NatsHarness {
        type T = NatsTransport;

        fn transport(&self) -> NatsTransport {
            self.stream.transport.clone()
        }

        async fn another_connection(&self) -> NatsTransport {
            self.stream.connect_again().await
        }

        async fn dead_letters(
            &self,
            t: &NatsTransport,
            consumer: &str,
        ) -> Vec<(String, String, u32)> {
            t.dead_letters(consumer)
                .await
                .expect("read dead letters")
                .into_iter()
                .map(|d| (d.message_id, d.reason, d.deliveries))
                .collect()
        }

        fn duplicates_reported(&self, t: &NatsTransport) -> Option<u64> {
            Some(t.stats().duplicates)
        }

        fn dedup(&self) -> Dedup {
            Dedup::Window(self.stream.config.duplicate_window)
        }

        fn same_lane(&self, a: &str, b: &str) -> bool {
            let t = &self.stream.transport;
            t.partition_of(a) == t.partition_of(b)
        }

        fn settles_anywhere(&self) -> bool {
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

const TOPIC: &str = "card status.changed";

fn message(id: &str, key: Option<&str>, payload: &str) -> OutgoingMessage {
    OutgoingMessage {
        id: id.to_owned(),
        topic: TOPIC.to_owned(),
        partition_key: key.map(str::to_owned),
        headers: BTreeMap::from([("effects-key".to_owned(), id.to_owned())]),
        payload: payload.as_bytes().to_vec(),
    }
}

fn request(consumer: &str, max: usize, visibility: Duration, wait: Duration) -> FetchRequest {
    FetchRequest {
        consumer: consumer.to_owned(),
        topic: TOPIC.to_owned(),
        max,
        visibility,
        wait,
    }
}

const LONG: Duration = Duration::from_secs(60);

async fn publish_all<T: Transport>(t: &T, messages: impl IntoIterator<Item = OutgoingMessage>) {
    for m in messages {
        t.publish(m).await.expect("publish");
    }
}

/// Fetches (bounded) until `n` deliveries arrived or `timeout` passed.
async fn fetch_n<T: Transport>(
    t: &T,
    consumer: &str,
    n: usize,
    visibility: Duration,
    timeout: Duration,
) -> Vec<Delivery> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        let batch = t
            .fetch(request(consumer, n - got.len(), visibility, wait))
            .await
            .expect("fetch");
        got.extend(batch);
    }
    got
}

async fn nothing_more<T: Transport>(t: &T, consumer: &str, visibility: Duration, wait: Duration) {
    let extra = t
        .fetch(request(consumer, 10, visibility, wait))
        .await
        .expect("fetch");
    let ids: Vec<&str> = extra.iter().map(|d| d.message_id.as_str()).collect();
    assert!(ids.is_empty(), "nothing should be delivered, got {ids:?}");
}

fn ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.message_id.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// Published messages come back with their id, headers, payload and a delivery count of 1, in
/// publish order; once acknowledged they are gone.
async fn publish_fetch_ack<H: Harness>(h: &H) {
    let t = h.transport();
    publish_all(
        &t,
        (0..3).map(|i| message(&format!("run:{i}#0"), None, &format!("{{\"n\":{i}}}"))),
    )
    .await;
    let got = fetch_n(&t, "g", 3, LONG, Duration::from_secs(10)).await;
    assert_eq!(ids(&got), ["run:0#0", "run:1#0", "run:2#0"]);
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.consumer, "g");
        assert_eq!(d.topic, TOPIC);
        assert_eq!(d.payload, format!("{{\"n\":{i}}}").into_bytes());
        assert_eq!(d.deliveries, 1);
        assert_eq!(d.partition_key, None);
        assert_eq!(
            d.headers,
            BTreeMap::from([("effects-key".to_owned(), d.message_id.clone())])
        );
    }
    assert!(
        got.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "sequences follow publish order"
    );
    for d in &got {
        t.ack(d).await.expect("ack");
    }
    nothing_more(&t, "g", LONG, Duration::from_millis(300)).await;
}

/// Partition keys and header values that are awkward on the wire come back unchanged.
async fn keys_and_headers_round_trip<H: Harness>(h: &H) {
    let t = h.transport();
    let key = " card 1\r\n100% ~.*> é ";
    let headers = BTreeMap::from([
        ("effects-key".to_owned(), "block:in 1#0".to_owned()),
        ("effects-tx".to_owned(), "42".to_owned()),
        ("x-odd".to_owned(), "  two\nlines %41 ".to_owned()),
        ("x-empty".to_owned(), String::new()),
    ]);
    t.publish(OutgoingMessage {
        id: "block:in 1\n#0".to_owned(),
        topic: TOPIC.to_owned(),
        partition_key: Some(key.to_owned()),
        headers: headers.clone(),
        payload: b"\x00\xffbinary".to_vec(),
    })
    .await
    .expect("publish");
    let got = fetch_n(&t, "g", 1, LONG, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.message_id, "block:in 1\n#0");
    assert_eq!(d.partition_key.as_deref(), Some(key));
    assert_eq!(d.headers, headers);
    assert_eq!(d.payload, b"\x00\xffbinary");
    t.ack(d).await.expect("ack");
}

/// The same id published twice is delivered once, with the first payload. NATS reports the
/// second publish as a duplicate; the SQLite log does not report it.
async fn dedup_by_id<H: Harness>(h: &H) {
    let t = h.transport();
    t.publish(message("k#0", None, "first"))
        .await
        .expect("publish");
    t.publish(message("k#0", None, "second"))
        .await
        .expect("a duplicate is not an error");
    t.publish(message("k#1", None, "other"))
        .await
        .expect("publish");
    let got = fetch_n(&t, "g", 3, LONG, Duration::from_secs(2)).await;
    assert_eq!(ids(&got), ["k#0", "k#1"]);
    assert_eq!(got[0].payload, b"first");
    if let Some(reported) = h.duplicates_reported(&t) {
        assert_eq!(reported, 1, "the broker reported the duplicate");
    }
}

/// How long ids are remembered: forever on the SQLite log; on NATS for the duplicate window,
/// after which the same id is stored (and delivered) again.
async fn dedup_scope<H: Harness>(h: &H) {
    let t = h.transport();
    t.publish(message("k#0", None, "first"))
        .await
        .expect("publish");
    let pause = match h.dedup() {
        Dedup::Forever => Duration::from_millis(1200),
        Dedup::Window(window) => window + Duration::from_millis(700),
    };
    tokio::time::sleep(pause).await;
    t.publish(message("k#0", None, "again"))
        .await
        .expect("publish");
    let got = fetch_n(&t, "g", 2, LONG, Duration::from_secs(2)).await;
    match h.dedup() {
        Dedup::Forever => assert_eq!(ids(&got), ["k#0"]),
        Dedup::Window(_) => {
            assert_eq!(ids(&got), ["k#0", "k#0"]);
            assert_eq!(got[1].payload, b"again");
        }
    }
}

/// A fetched message that is not acknowledged is invisible until its visibility passes, then
/// delivered again with a higher delivery count.
async fn visibility_timeout_redelivers<H: Harness>(h: &H) {
    let t = h.transport();
    t.publish(message("v#0", None, "v")).await.expect("publish");
    let visibility = Duration::from_secs(1);
    let first = fetch_n(&t, "g", 1, visibility, Duration::from_secs(10)).await;
    let leased_at = Instant::now();
    assert_eq!(ids(&first), ["v#0"]);
    assert_eq!(first[0].deliveries, 1);
    let early = t
        .fetch(request("g", 10, visibility, Duration::ZERO))
        .await
        .expect("fetch");
    assert!(early.is_empty(), "invisible while leased");
    let again = fetch_n(&t, "g", 1, visibility, Duration::from_secs(10)).await;
    assert_eq!(ids(&again), ["v#0"], "delivered again after the visibility");
    assert!(
        leased_at.elapsed() >= Duration::from_millis(800),
        "not before the visibility passed ({:?})",
        leased_at.elapsed()
    );
    assert_eq!(again[0].deliveries, 2);
    assert_eq!(again[0].sequence, first[0].sequence);
    t.ack(&again[0]).await.expect("ack");
    nothing_more(&t, "g", visibility, Duration::from_millis(300)).await;
}

/// A message given back with a delay comes back after the delay; with no delay, at once.
async fn nack_with_delay<H: Harness>(h: &H) {
    let t = h.transport();
    t.publish(message("n#0", None, "n")).await.expect("publish");
    let first = fetch_n(&t, "g", 1, LONG, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    t.nack(&first[0], Duration::from_secs(1))
        .await
        .expect("nack");
    let nacked_at = Instant::now();
    let early = t
        .fetch(request("g", 10, LONG, Duration::from_millis(200)))
        .await
        .expect("fetch");
    assert!(early.is_empty(), "not visible during the delay");
    let second = fetch_n(&t, "g", 1, LONG, Duration::from_secs(10)).await;
    assert_eq!(ids(&second), ["n#0"]);
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(800),
        "not before the delay ({:?})",
        nacked_at.elapsed()
    );
    assert_eq!(second[0].deliveries, 2);
    t.nack(&second[0], Duration::ZERO).await.expect("nack");
    let third = fetch_n(&t, "g", 1, LONG, Duration::from_secs(2)).await;
    assert_eq!(ids(&third), ["n#0"], "a zero delay gives it back at once");
    assert_eq!(third[0].deliveries, 3);
    t.ack(&third[0]).await.expect("ack");
}

/// Opens the group (the first fetch of a group may find nothing yet), publishes, and lets the
/// broker's read-ahead settle, so that the next fetch sees everything published.
async fn publish_settled<T: Transport>(
    t: &T,
    visibility: Duration,
    messages: impl IntoIterator<Item = OutgoingMessage>,
) {
    let warm = t
        .fetch(request("g", 10, visibility, Duration::from_millis(50)))
        .await
        .expect("fetch");
    assert!(warm.is_empty(), "nothing was published yet");
    publish_all(t, messages).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A keyed message given back keeps its place. Given back with its key's later messages (in
/// order, as the contract asks of callers), they come back from it, in order. Given back with a
/// delay, nothing of its key is handed out before the delay passed, even what was given back
/// without one; then all of them, in order.
async fn nack_keeps_the_place_of_a_keyed_message<H: Harness>(h: &H) {
    let t = h.transport();
    publish_settled(
        &t,
        LONG,
        [
            message("a#0", Some("a"), "0"),
            message("a#1", Some("a"), "1"),
            message("a#2", Some("a"), "2"),
        ],
    )
    .await;
    let first = t
        .fetch(request("g", 10, LONG, Duration::from_secs(2)))
        .await
        .expect("fetch");
    assert_eq!(
        ids(&first),
        ["a#0", "a#1", "a#2"],
        "one fetch takes several messages of a key, in order"
    );
    for d in &first {
        t.nack(d, Duration::ZERO).await.expect("nack");
    }
    let again = fetch_n(&t, "g", 3, LONG, Duration::from_secs(5)).await;
    assert_eq!(
        ids(&again),
        ["a#0", "a#1", "a#2"],
        "given back, they come back in order"
    );
    assert!(again.iter().all(|d| d.deliveries == 2), "{again:?}");

    t.nack(&again[0], Duration::from_secs(1))
        .await
        .expect("nack with a delay");
    let nacked_at = Instant::now();
    for d in &again[1..] {
        t.nack(d, Duration::ZERO).await.expect("nack");
    }
    let early = t
        .fetch(request("g", 10, LONG, Duration::from_millis(600)))
        .await
        .expect("fetch");
    assert!(
        early.is_empty(),
        "nothing of the key during the first one's delay, got {:?}",
        ids(&early)
    );
    let last = fetch_n(&t, "g", 3, LONG, Duration::from_secs(5)).await;
    assert_eq!(
        ids(&last),
        ["a#0", "a#1", "a#2"],
        "after the delay, in order"
    );
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(800),
        "not before the delay ({:?})",
        nacked_at.elapsed()
    );
    assert!(last.iter().all(|d| d.deliveries == 3), "{last:?}");
    for d in &last {
        t.ack(d).await.expect("ack");
    }
    nothing_more(&t, "g", LONG, Duration::from_millis(300)).await;
}

/// Several messages of a key go to one fetch, in order; while they are leased another
/// connection gets none of that key (on NATS none of its partition), and nothing of the key is
/// lost or handed out twice after they are acknowledged.
async fn a_key_has_one_holder<H: Harness>(h: &H) {
    let t = h.transport();
    let other = h.another_connection().await;
    let a = "key-a";
    publish_settled(
        &t,
        LONG,
        (0..4).map(|i| message(&format!("a#{i}"), Some(a), &i.to_string())),
    )
    .await;
    let got = t
        .fetch(request("g", 10, LONG, Duration::from_secs(2)))
        .await
        .expect("fetch");
    assert_eq!(
        ids(&got),
        ["a#0", "a#1", "a#2", "a#3"],
        "in one fetch, in order"
    );
    let same = (0..1000)
        .map(|i| format!("key-{i}"))
        .find(|k| k != a && h.same_lane(a, k));
    t.publish(message("a#4", Some(a), "4"))
        .await
        .expect("publish");
    if let Some(same) = &same {
        t.publish(message("same#0", Some(same), "0"))
            .await
            .expect("publish");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let elsewhere = other
            .fetch(request("g", 10, LONG, Duration::from_millis(200)))
            .await
            .expect("fetch");
        assert!(
            elsewhere.iter().all(|d| d
                .partition_key
                .as_deref()
                .is_none_or(|k| !h.same_lane(a, k))),
            "another connection got {:?} while a's messages are leased (a key sharing a's lane: \
             {same:?})",
            ids(&elsewhere)
        );
        for d in &elsewhere {
            other.ack(d).await.expect("ack");
        }
    }
    for r in t.ack_many(&got).await {
        r.expect("ack");
    }
    let mut rest = Vec::new();
    let expected = 1 + usize::from(same.is_some());
    let deadline = Instant::now() + Duration::from_secs(20);
    while rest.len() < expected && Instant::now() < deadline {
        for c in [&t, &other] {
            let batch = c
                .fetch(request("g", 10, LONG, Duration::from_millis(200)))
                .await
                .expect("fetch");
            for d in &batch {
                c.ack(d).await.expect("ack");
            }
            rest.extend(batch);
        }
    }
    let mut rest_ids = ids(&rest);
    rest_ids.sort();
    let mut want = vec!["a#4".to_owned()];
    if same.is_some() {
        want.push("same#0".to_owned());
    }
    assert_eq!(
        rest_ids, want,
        "each handed out once after the others were acknowledged"
    );
}

/// A heartbeat keeps a delivery invisible past its visibility, to every connection; once the
/// delivery is acknowledged or given back, a heartbeat is refused.
async fn extend_keeps_a_delivery_invisible<H: Harness>(h: &H) {
    let t = h.transport();
    let other = h.another_connection().await;
    let visibility = Duration::from_secs(1);
    t.publish(message("e#0", None, "e")).await.expect("publish");
    let got = fetch_n(&t, "g", 1, visibility, Duration::from_secs(10)).await;
    assert_eq!(ids(&got), ["e#0"]);
    let leased_at = Instant::now();
    let mut beats = 0;
    while leased_at.elapsed() < visibility * 5 / 2 {
        t.extend(&got[0], visibility).await.expect("a heartbeat");
        beats += 1;
        for c in [&t, &other] {
            let extra = c
                .fetch(request("g", 10, visibility, Duration::from_millis(100)))
                .await
                .expect("fetch");
            assert!(
                extra.is_empty(),
                "heartbeated, it stays invisible ({:?} after the fetch): got {:?}",
                leased_at.elapsed(),
                ids(&extra)
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(beats >= 4, "{beats} heartbeats");
    t.ack(&got[0]).await.expect("ack");
    let late = t.extend(&got[0], visibility).await;
    assert!(
        matches!(late, Err(TransportError::Refused { .. })),
        "a heartbeat after the acknowledgement is refused: {late:?}"
    );

    // A keyed one (on NATS its partition may be with either connection by now).
    t.publish(message("e#1", Some("k"), "e"))
        .await
        .expect("publish");
    let mut holder = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder.is_none() && Instant::now() < deadline {
        for c in [&t, &other] {
            let mut batch = c
                .fetch(request("g", 10, visibility, Duration::from_millis(200)))
                .await
                .expect("fetch");
            if let Some(d) = batch.pop() {
                holder = Some((c.clone(), d));
                break;
            }
        }
    }
    let (c, d) = holder.expect("e#1 was handed out");
    assert_eq!(d.message_id, "e#1");
    c.nack(&d, Duration::from_secs(5)).await.expect("nack");
    let after_nack = c.extend(&d, visibility).await;
    assert!(
        matches!(after_nack, Err(TransportError::Refused { .. })),
        "a heartbeat after a give-back is refused: {after_nack:?}"
    );
}

/// `ack_many` acknowledges a batch: one result per delivery, and nothing comes back.
async fn ack_many_acknowledges_a_batch<H: Harness>(h: &H) {
    let t = h.transport();
    publish_all(
        &t,
        (0..6).map(|i| {
            let key = format!("key-{}", i % 3);
            message(&format!("m{i}"), Some(&key), &i.to_string())
        }),
    )
    .await;
    let got = fetch_n(&t, "g", 6, LONG, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 6);
    let results = t.ack_many(&got).await;
    assert_eq!(results.len(), 6);
    for r in results {
        r.expect("ack");
    }
    assert!(t.ack_many(&[]).await.is_empty());
    nothing_more(&t, "g", LONG, Duration::from_millis(500)).await;
}

/// A dead-lettered message is recorded with its reason and delivery count and never delivered
/// again; other groups are not affected.
async fn dead_letter_with_reason<H: Harness>(h: &H) {
    let t = h.transport();
    publish_all(
        &t,
        [message("bad#0", None, "{"), message("good#0", None, "{}")],
    )
    .await;
    let got = fetch_n(&t, "g", 2, LONG, Duration::from_secs(10)).await;
    assert_eq!(ids(&got), ["bad#0", "good#0"]);
    let reason = "cannot decode `Card`: EOF while parsing an object at line 1 column 1";
    t.dead_letter(&got[0], reason).await.expect("dead-letter");
    t.ack(&got[1]).await.expect("ack");
    nothing_more(&t, "g", LONG, Duration::from_millis(300)).await;
    assert_eq!(
        h.dead_letters(&t, "g").await,
        [("bad#0".to_owned(), reason.to_owned(), 1)]
    );
    assert!(h.dead_letters(&t, "other").await.is_empty());
    let other = fetch_n(&t, "other", 2, LONG, Duration::from_secs(10)).await;
    assert_eq!(
        ids(&other),
        ["bad#0", "good#0"],
        "another group still sees both"
    );
}

/// One key's messages, handled by three consumers on three connections, each handling the keys
/// it fetched at once (one key's deliveries one after another, in the order handed out): per
/// key, each message starts only after the previous one finished, in publish order.
async fn partition_key_order_across_consumers<H: Harness>(h: &H) {
    const KEYS: usize = 6;
    const PER_KEY: usize = 12;
    let t = h.transport();
    let mut messages = Vec::new();
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            messages.push(message(
                &format!("k{k}-{i}"),
                Some(&format!("account-{k}")),
                &i.to_string(),
            ));
        }
    }
    publish_all(&t, messages).await;
    let events = run_consumers(h, "g", 3, KEYS * PER_KEY, 4).await;
    check_key_order(&events, KEYS, PER_KEY).expect("per-key order");
}

/// The order check fails against a broken transport: the same messages published without
/// their partition keys (what a transport dropping keys would do), fetched together and
/// handled at once, come out of order.
async fn order_check_catches_a_transport_without_keys<H: Harness>(h: &H) {
    let t = h.transport();
    let mut broken = Vec::new();
    for i in 0..5 {
        let mut m = message(&format!("k0-{i}"), None, &i.to_string());
        m.headers.insert("x-key".into(), "account-0".into());
        broken.push(m);
    }
    publish_all(&t, broken).await;
    let got = fetch_n(&t, "g", 5, LONG, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 5, "without keys all five are leased at once");
    let events = handle_all_at_once(&got, "account-0");
    assert!(
        check_key_order(&events, 1, 5).is_err(),
        "the order check must fail when one key's messages are handled together"
    );
}

/// Three consumers in one group share the messages: each is handled once, and each consumer
/// handles some.
async fn consumers_in_a_group_share_work<H: Harness>(h: &H) {
    const N: usize = 60;
    let t = h.transport();
    publish_all(
        &t,
        (0..N).map(|i| message(&format!("m{i}"), None, &i.to_string())),
    )
    .await;
    let events = run_consumers(h, "g", 3, N, 5).await;
    let mut per_message: HashMap<String, usize> = HashMap::new();
    let mut per_consumer: HashMap<usize, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.end) {
        *per_message.entry(e.id.clone()).or_default() += 1;
        *per_consumer.entry(e.consumer).or_default() += 1;
    }
    assert_eq!(per_message.len(), N, "every message handled");
    assert!(
        per_message.values().all(|&n| n == 1),
        "each handled once: {per_message:?}"
    );
    assert_eq!(
        per_consumer.len(),
        3,
        "every consumer took a share: {per_consumer:?}"
    );
}

/// Two groups each see every message.
async fn two_groups_each_see_all<H: Harness>(h: &H) {
    const N: usize = 20;
    let t = h.transport();
    publish_all(
        &t,
        (0..N).map(|i| {
            let key = (i % 2 == 0).then(|| format!("key-{}", i % 5));
            message(&format!("m{i}"), key.as_deref(), &i.to_string())
        }),
    )
    .await;
    let expected: HashSet<String> = (0..N).map(|i| format!("m{i}")).collect();
    for group in ["billing", "audit"] {
        let mut seen = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < N && Instant::now() < deadline {
            let batch = t
                .fetch(request(group, 8, LONG, Duration::from_millis(200)))
                .await
                .expect("fetch");
            for d in batch {
                t.ack(&d).await.expect("ack");
                assert!(seen.insert(d.message_id.clone()), "{} twice", d.message_id);
            }
        }
        assert_eq!(seen, expected, "group {group} saw every message");
    }
}

/// Settling through another connection: the SQLite log accepts it (one database); NATS refuses
/// it (the acknowledgement goes to the delivery's reply subject, known to the connection that
/// fetched it), and the fetching connection can still settle.
async fn settling_through_another_connection<H: Harness>(h: &H) {
    let t = h.transport();
    let other = h.another_connection().await;
    t.publish(message("s#0", None, "s")).await.expect("publish");
    let got = fetch_n(&t, "g", 1, LONG, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let result = other.ack(&got[0]).await;
    if h.settles_anywhere() {
        result.expect("ack through another connection");
    } else {
        assert!(
            matches!(result, Err(TransportError::Refused { .. })),
            "refused: {result:?}"
        );
        t.ack(&got[0])
            .await
            .expect("ack through the fetching connection");
    }
    nothing_more(&t, "g", LONG, Duration::from_millis(300)).await;
}

// ---------------------------------------------------------------------------------------------
// Consumers and the order check.

#[derive(Clone, Debug)]
struct Event {
    consumer: usize,
    key: String,
    id: String,
    index: usize,
    end: bool,
}

fn event(consumer: usize, d: &Delivery, end: bool) -> Event {
    let index = String::from_utf8_lossy(&d.payload)
        .parse()
        .unwrap_or(usize::MAX);
    Event {
        consumer,
        key: d.partition_key.clone().unwrap_or_default(),
        id: d.message_id.clone(),
        index,
        end,
    }
}

fn handle_all_at_once(deliveries: &[Delivery], key: &str) -> Vec<Event> {
    // All started, then finished in reverse: what concurrent handling may do.
    let mut events: Vec<Event> = deliveries
        .iter()
        .map(|d| Event {
            key: key.to_owned(),
            ..event(0, d, false)
        })
        .collect();
    events.extend(deliveries.iter().rev().map(|d| Event {
        key: key.to_owned(),
        ..event(0, d, true)
    }));
    events
}

/// `consumers` tasks, each on its own connection, fetching up to `max` and handling what it
/// fetched (5 to 8 ms each) as the order contract asks: different keys at once, one key's
/// deliveries one after another in the order handed out, each fetch's before the next fetch;
/// recording start and end; until `total` messages have ended (bounded by 60 s).
async fn run_consumers<H: Harness>(
    h: &H,
    group: &str,
    consumers: usize,
    total: usize,
    max: usize,
) -> Vec<Event> {
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let mut connections = Vec::with_capacity(consumers);
    for _ in 0..consumers {
        connections.push(h.another_connection().await);
    }
    // All start together, so that the first one does not drain the topic alone.
    let start = Arc::new(tokio::sync::Barrier::new(consumers));
    let mut tasks = tokio::task::JoinSet::new();
    for (c, t) in connections.into_iter().enumerate() {
        let events = Arc::clone(&events);
        let group = group.to_owned();
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            start.wait().await;
            let deadline = Instant::now() + Duration::from_secs(60);
            let done = |events: &Mutex<Vec<Event>>| {
                events
                    .lock()
                    .map_or(0, |e| e.iter().filter(|e| e.end).count())
                    >= total
            };
            while !done(&events) && Instant::now() < deadline {
                let batch = t
                    .fetch(request(&group, max, LONG, Duration::from_millis(100)))
                    .await
                    .expect("fetch");
                // Per key, in the order handed out; without a key, each on its own.
                let mut queues: Vec<(Option<String>, Vec<Delivery>)> = Vec::new();
                for d in batch {
                    match queues
                        .iter_mut()
                        .find(|(k, _)| k.is_some() && *k == d.partition_key)
                    {
                        Some((_, queue)) => queue.push(d),
                        None => queues.push((d.partition_key.clone(), vec![d])),
                    }
                }
                let handled = queues.into_iter().map(|(_, queue)| {
                    let t = t.clone();
                    let events = Arc::clone(&events);
                    async move {
                        for d in queue {
                            events.lock().expect("events").push(event(c, &d, false));
                            let ms = 5 + (d.sequence % 4);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            events.lock().expect("events").push(event(c, &d, true));
                            t.ack(&d).await.expect("ack");
                        }
                    }
                });
                futures_join_all(handled).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("consumer task");
    }
    events.lock().expect("events").clone()
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while let Some(done) = set.join_next().await {
        done.expect("handling task");
    }
}

/// Per key: start(0) end(0) start(1) end(1) ... with every message ending once, in order.
fn check_key_order(events: &[Event], keys: usize, per_key: usize) -> Result<(), String> {
    let mut per_key_events: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        per_key_events.entry(e.key.as_str()).or_default().push(e);
    }
    if per_key_events.len() != keys {
        return Err(format!(
            "expected {keys} keys, saw {}",
            per_key_events.len()
        ));
    }
    for (key, list) in per_key_events {
        let mut expected = Vec::with_capacity(per_key * 2);
        for i in 0..per_key {
            expected.push((i, false));
            expected.push((i, true));
        }
        let seen: Vec<(usize, bool)> = list.iter().map(|e| (e.index, e.end)).collect();
        if seen != expected {
            return Err(format!(
                "key {key}: (index, ended) went {seen:?}, expected one at a time in order"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The suite, once per transport.

macro_rules! conformance {
    ($backend:ident, $harness:expr, $short_window:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn publish_fetch_ack() {
                super::publish_fetch_ack(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keys_and_headers_round_trip() {
                super::keys_and_headers_round_trip(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_by_id() {
                super::dedup_by_id(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_scope() {
                super::dedup_scope(&$short_window).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn visibility_timeout_redelivers() {
                super::visibility_timeout_redelivers(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nack_with_delay() {
                super::nack_with_delay(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nack_keeps_the_place_of_a_keyed_message() {
                super::nack_keeps_the_place_of_a_keyed_message(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_letter_with_reason() {
                super::dead_letter_with_reason(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_key_has_one_holder() {
                super::a_key_has_one_holder(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn extend_keeps_a_delivery_invisible() {
                super::extend_keeps_a_delivery_invisible(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ack_many_acknowledges_a_batch() {
                super::ack_many_acknowledges_a_batch(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn partition_key_order_across_consumers() {
                super::partition_key_order_across_consumers(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn order_check_catches_a_transport_without_keys() {
                super::order_check_catches_a_transport_without_keys(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn consumers_in_a_group_share_work() {
                super::consumers_in_a_group_share_work(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_groups_each_see_all() {
                super::two_groups_each_see_all(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn settling_through_another_connection() {
                super::settling_through_another_connection(&$harness).await;
            }
        }
    };
}

conformance!(
    sqlite_log,
    SqliteHarness::new().await,
    SqliteHarness::new().await
);

#[cfg(feature = "nats")]
conformance!(
    nats,
    nats_harness::NatsHarness::new().await,
    nats_harness::NatsHarness::with_short_dedup_window().await
);
