//! What only the NATS transport has (feature `nats`): per-key order across worker *processes*
//! with one of them dying mid-message, `max_deliver`, the stream layout checks, refused headers,
//! the consumers' ack wait following the fetch's visibility, and the subject mapping.
//!
//! The order test runs this test binary again as child processes (`order_child`, which does
//! nothing unless started that way), each with its own connection; they record when they start
//! and finish each message in one SQLite file, whose row order is the global order.

mod nats_support;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use effects_core::nats::async_nats::jetstream::consumer::PullConsumer;
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::transport::{FetchRequest, OutgoingMessage, Transport, TransportError};
use nats_support::{TestStream, connect_or_explain};
use serde_json::json;

const TOPIC: &str = "ledger.postings";
const CHILD_ENV: &str = "EFFECTS_NATS_ORDER_CHILD";

fn message(id: &str, key: Option<&str>, payload: Vec<u8>) -> OutgoingMessage {
    OutgoingMessage {
        id: id.to_owned(),
        topic: TOPIC.to_owned(),
        partition_key: key.map(str::to_owned),
        headers: BTreeMap::new(),
        payload,
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

// ---------------------------------------------------------------------------------------------
// Order across processes.

#[derive(serde::Serialize, serde::Deserialize)]
struct ChildSpec {
    url: String,
    stream: String,
    prefix: String,
    partitions: u16,
    db: String,
    child: usize,
    total: usize,
    die_after: Option<usize>,
    visibility_ms: u64,
}

/// The child process's body (does nothing unless started by `order_across_processes`).
#[test]
fn order_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: ChildSpec = serde_json::from_str(&spec).expect("child spec");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(child_main(spec));
}

fn open_events(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open the events file");
    conn.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    conn.execute_batch("PRAGMA journal_mode = WAL;")
        .expect("WAL");
    conn
}

async fn child_main(spec: ChildSpec) {
    let mut config = NatsConfig::new(&spec.url).with_stream(&spec.stream, &spec.prefix);
    config.partitions = spec.partitions;
    let t = connect_or_explain(config).await;
    let events = Arc::new(Mutex::new(open_events(Path::new(&spec.db))));
    let started = Arc::new(Mutex::new(0_usize));
    let deadline = Instant::now() + Duration::from_secs(90);
    let ended = |events: &Mutex<rusqlite::Connection>| -> usize {
        let conn = events.lock().expect("events");
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(DISTINCT key || ':' || idx) FROM events WHERE phase = 'end'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        usize::try_from(n).unwrap_or(0)
    };
    while ended(&events) < spec.total && Instant::now() < deadline {
        let batch = t
            .fetch(request(
                "ledger",
                3,
                Duration::from_millis(spec.visibility_ms),
                Duration::from_millis(100),
            ))
            .await
            .expect("fetch");
        let mut tasks = tokio::task::JoinSet::new();
        for d in batch {
            let (t, events, started) = (t.clone(), Arc::clone(&events), Arc::clone(&started));
            let (child, die_after) = (spec.child, spec.die_after);
            tasks.spawn(async move {
                let body: serde_json::Value = serde_json::from_slice(&d.payload).expect("payload");
                let key = body["key"].as_str().expect("key").to_owned();
                let idx = body["idx"].as_i64().expect("idx");
                let record = |phase: &str| {
                    events
                        .lock()
                        .expect("events")
                        .execute(
                            "INSERT INTO events (key, idx, phase, child, deliveries) \
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                            rusqlite::params![key, idx, phase, child as i64, d.deliveries],
                        )
                        .expect("record");
                };
                record("start");
                let n = {
                    let mut s = started.lock().expect("started");
                    *s += 1;
                    *s
                };
                if die_after.is_some_and(|limit| n >= limit) {
                    // Dies holding the message: no end, no acknowledgement, no goodbye.
                    std::process::abort();
                }
                tokio::time::sleep(Duration::from_millis(3 + (d.sequence % 4))).await;
                record("end");
                t.ack(&d).await.expect("ack");
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("handling task");
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    key: String,
    idx: i64,
    end: bool,
    child: i64,
    deliveries: i64,
}

/// Per key: start(i) end(i) for i = 0, 1, ... one at a time, each message ending once. A start
/// by `dead` that never ended (the message it held when it died) is left out.
fn check_process_order(events: &[Event], dead: Option<i64>, per_key: i64) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    for (key, list) in by_key {
        let abandoned = |pos: usize, e: &Event| {
            Some(e.child) == dead
                && !e.end
                && !list[pos + 1..]
                    .iter()
                    .any(|later| later.end && later.child == e.child && later.idx == e.idx)
        };
        let kept: Vec<&Event> = list
            .iter()
            .enumerate()
            .filter(|(pos, e)| !abandoned(*pos, e))
            .map(|(_, e)| *e)
            .collect();
        let seen: Vec<(i64, bool)> = kept.iter().map(|e| (e.idx, e.end)).collect();
        let expected: Vec<(i64, bool)> =
            (0..per_key).flat_map(|i| [(i, false), (i, true)]).collect();
        if seen != expected {
            return Err(format!("key {key}: went {seen:?}"));
        }
    }
    Ok(())
}

struct OrderRun {
    events: Vec<Event>,
    statuses: Vec<ExitStatus>,
}

async fn run_order_processes(keyed: bool, die_after: Option<usize>) -> OrderRun {
    const KEYS: usize = 6;
    const PER_KEY: usize = 20;
    let stream = TestStream::new("order-processes", |c| c.partitions = 4).await;
    let t = stream.transport.clone();
    for round in 0..PER_KEY {
        for k in 0..KEYS {
            // Keyed: interleaved, as traffic arrives. Without keys (the mutant): one key's
            // messages back to back, so that fetches take several of them at once.
            let (key, idx) = if keyed {
                (k, round)
            } else {
                let n = round * KEYS + k;
                (n / PER_KEY, n % PER_KEY)
            };
            let key = format!("account-{key}");
            let payload = json!({"key": key, "idx": idx}).to_string().into_bytes();
            t.publish(message(
                &format!("{key}:{idx}"),
                keyed.then_some(key.as_str()),
                payload,
            ))
            .await
            .expect("publish");
        }
    }
    let dir = support::temp_dir("nats-order");
    let db = dir.join("events.db");
    open_events(&db)
        .execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, \
             idx INTEGER NOT NULL, phase TEXT NOT NULL, child INTEGER NOT NULL, \
             deliveries INTEGER NOT NULL)",
        )
        .expect("create the events table");
    let exe = std::env::current_exe().expect("this test binary");
    let mut children = Vec::new();
    for child in 0..3 {
        let spec = ChildSpec {
            url: stream.config.url.clone(),
            stream: stream.config.stream.clone(),
            prefix: stream.config.subject_prefix.clone(),
            partitions: stream.config.partitions,
            db: db.display().to_string(),
            child,
            total: KEYS * PER_KEY,
            die_after: if child == 0 { die_after } else { None },
            // Long enough that a loaded machine (three processes writing one events file) acks
            // inside it: a message acknowledged after its ack wait comes back, and the check
            // would count a late acknowledgement as an order failure. The dead child's message
            // is handed over after it.
            visibility_ms: 5_000,
        };
        children.push(
            Command::new(&exe)
                .args([
                    "--exact",
                    "order_child",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, serde_json::to_string(&spec).expect("spec"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start a child process"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut statuses = Vec::new();
    for mut child in children {
        let status = loop {
            if let Some(status) = child.try_wait().expect("child status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("child status");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        statuses.push(status);
    }
    let conn = open_events(&db);
    let mut stmt = conn
        .prepare("SELECT key, idx, phase, child, deliveries FROM events ORDER BY seq")
        .expect("read events");
    let events = stmt
        .query_map([], |r| {
            Ok(Event {
                key: r.get(0)?,
                idx: r.get(1)?,
                end: r.get::<_, String>(2)? == "end",
                child: r.get(3)?,
                deliveries: r.get(4)?,
            })
        })
        .expect("read events")
        .collect::<Result<Vec<_>, _>>()
        .expect("read events");
    OrderRun { events, statuses }
}

/// Three worker processes share a group on a topic with four partitions; one dies (abort)
/// holding a message. Per key, messages are handled one at a time in publish order, the dead
/// process's message is handed over after the ack wait, and every message finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_across_processes() {
    let run = run_order_processes(true, Some(12)).await;
    assert!(
        !run.statuses[0].success(),
        "child 0 died: {:?}",
        run.statuses[0]
    );
    assert!(
        run.statuses[1..].iter().all(ExitStatus::success),
        "the others finished: {:?}",
        run.statuses
    );
    let handed_over = run
        .events
        .iter()
        .filter(|e| !e.end && e.deliveries >= 2)
        .count();
    println!(
        "FIGURE nats_order_processes: events={} handed_over={handed_over} per_child={:?}",
        run.events.len(),
        (0..3)
            .map(|c| run.events.iter().filter(|e| e.end && e.child == c).count())
            .collect::<Vec<_>>()
    );
    assert!(
        handed_over >= 1,
        "the dead child's message was delivered again"
    );
    check_process_order(&run.events, Some(0), 20).expect("per-key order across processes");
}

/// The same processes on messages published without partition keys (a transport that drops
/// them): the order check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_order_check_catches_messages_without_keys() {
    let run = run_order_processes(false, None).await;
    assert!(
        run.statuses.iter().all(ExitStatus::success),
        "{:?}",
        run.statuses
    );
    assert!(
        check_process_order(&run.events, None, 20).is_err(),
        "one key's messages were handled together, and the check must say so"
    );
}

// ---------------------------------------------------------------------------------------------
// The rest.

/// A message given back more than `max_deliver` times is dead-lettered by the transport with
/// the reason, and not handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_dead_letters_with_the_reason() {
    let stream = TestStream::new("max-deliver", |c| c.max_deliver = Some(2)).await;
    let t = stream.transport.clone();
    t.publish(message("poison#0", Some("k"), b"x".to_vec()))
        .await
        .expect("publish");
    t.publish(message("next#0", Some("k"), b"y".to_vec()))
        .await
        .expect("publish");
    for attempt in 1..=2 {
        let got = t
            .fetch(request(
                "g",
                5,
                Duration::from_secs(30),
                Duration::from_secs(5),
            ))
            .await
            .expect("fetch");
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].message_id.as_str(), got[0].deliveries),
            ("poison#0", attempt)
        );
        t.nack(&got[0], Duration::ZERO).await.expect("nack");
    }
    let got = t
        .fetch(request(
            "g",
            5,
            Duration::from_secs(30),
            Duration::from_secs(5),
        ))
        .await
        .expect("fetch");
    assert_eq!(
        got.iter()
            .map(|d| d.message_id.as_str())
            .collect::<Vec<_>>(),
        ["next#0"],
        "the third delivery of the poison message was dead-lettered, and the key moved on"
    );
    let dead = t.dead_letters("g").await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "poison#0");
    assert_eq!(dead[0].deliveries, 3);
    assert_eq!(dead[0].partition_key.as_deref(), Some("k"));
    assert!(
        dead[0].reason.contains("max_deliver 2"),
        "{}",
        dead[0].reason
    );
    assert_eq!(t.stats().dead_lettered, 1);
}

/// A stream is only used with the layout it was created with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_layout_is_checked() {
    let stream = TestStream::new("layout", |c| c.partitions = 8).await;
    let mut other = stream.config.clone();
    other.partitions = 16;
    let error = NatsTransport::connect(other)
        .await
        .expect_err("16 partitions on an 8 one");
    assert!(error.to_string().contains("8 partitions"), "{error}");

    let mut other = stream.config.clone();
    other.subject_prefix = format!("{}x", stream.config.subject_prefix);
    let error = NatsTransport::connect(other)
        .await
        .expect_err("another prefix");
    assert!(error.to_string().contains("subject"), "{error}");

    let mut changed = stream.config.clone();
    changed.duplicate_window = Duration::from_secs(30);
    NatsTransport::connect(changed)
        .await
        .expect("a new duplicate window is applied");
    let info = stream
        .transport
        .jetstream()
        .get_stream(&stream.config.stream)
        .await
        .expect("stream")
        .cached_info()
        .clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(30));

    let mut bad = stream.config.clone();
    bad.stream = "has.dots".into();
    let error = NatsTransport::connect(bad).await.expect_err("invalid name");
    assert!(error.to_string().contains("stream"), "{error}");
}

/// Header names NATS cannot carry, and reserved ones, are refused with the reason; nothing is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_headers_are_refused() {
    let stream = TestStream::new("headers", |_| {}).await;
    let t = stream.transport.clone();
    for name in [
        "has space",
        "colon:name",
        "Nats-Expected-Stream",
        "effects-partition-key",
    ] {
        let mut m = message("h#0", None, b"{}".to_vec());
        m.headers.insert(name.to_owned(), "v".to_owned());
        let result = t.publish(m).await;
        match result {
            Err(TransportError::Refused { reason }) => {
                assert!(reason.contains(name), "{reason}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(t.stats().published, 0);
}

/// The consumers' ack wait follows the visibility a fetch asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_sets_the_ack_wait() {
    let stream = TestStream::new("ack-wait", |c| c.partitions = 2).await;
    let t = stream.transport.clone();
    for visibility in [Duration::from_secs(7), Duration::from_secs(42)] {
        t.fetch(request("g", 1, visibility, Duration::ZERO))
            .await
            .expect("fetch");
        for name in t.consumer_names("g", TOPIC) {
            let mut consumer: PullConsumer = t
                .jetstream()
                .get_consumer_from_stream(&name, &stream.config.stream)
                .await
                .expect("consumer");
            let info = consumer.info().await.expect("info");
            assert_eq!(info.config.ack_wait, visibility, "{name}");
        }
    }
    assert_eq!(
        t.consumer_names("g", TOPIC).len(),
        3,
        "two partitions and `u`"
    );
}

/// The subjects of the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_follow_the_documented_mapping() {
    let stream = TestStream::new("subjects", |_| {}).await;
    let t = stream.transport.clone();
    let p = &stream.config.subject_prefix;
    let part = t.partition_of("card 7");
    assert_eq!(
        t.subject_for("orders.eu placed", Some("card 7")),
        format!("{p}.msg.orders~2Eeu~20placed.p{part}")
    );
    assert_eq!(
        t.subject_for("card-status-changed", None),
        format!("{p}.msg.card-status-changed.u")
    );
    assert_eq!(t.subject_for("", None), format!("{p}.msg.~.u"));
    assert_eq!(
        t.dead_letter_subject("block", "a.b"),
        format!("{p}.dead.block.a~2Eb")
    );
    t.publish(OutgoingMessage {
        topic: "orders.eu placed".into(),
        ..message("s#0", Some("card 7"), b"{}".to_vec())
    })
    .await
    .expect("publish");
    let stored = t
        .jetstream()
        .get_stream(&stream.config.stream)
        .await
        .expect("stream")
        .get_raw_message(1)
        .await
        .expect("the stored message");
    assert_eq!(
        stored.subject.as_str(),
        t.subject_for("orders.eu placed", Some("card 7"))
    );
}

// ---------------------------------------------------------------------------------------------
// TLS.

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in
/// `dir`: (ca, server cert, server key, client cert, client key).
fn write_pki(dir: &Path) -> [std::path::PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "effects NATS test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let server_key = KeyPair::generate().expect("key");
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    let client_key = KeyPair::generate().expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    client_params
        .distinguished_name
        .push(DnType::CommonName, "effects worker");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &ca)
        .expect("client certificate");
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server-key.pem", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client-key.pem", client_key.serialize_pem()),
    ];
    files.map(|(name, pem)| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    })
}

/// Against a private `nats-server` that requires TLS and client certificates: the transport
/// connects with the private CA and its client certificate and works; without the client
/// certificate, or without trusting the CA, it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca() {
    use effects_core::nats::TlsConfig;
    let dir = support::temp_dir("nats-tls");
    let [ca, cert, key, client, client_key] = write_pki(&dir);
    let arg = |p: &std::path::PathBuf| p.display().to_string();
    let server = nats_support::PrivateNats::start_with(
        &dir,
        vec![
            "--tlsverify".into(),
            "--tlscert".into(),
            arg(&cert),
            "--tlskey".into(),
            arg(&key),
            "--tlscacert".into(),
            arg(&ca),
        ],
    );
    let config = |tls: TlsConfig| {
        let mut c = nats_support::test_config(&server.url(), "tls");
        c.connect_timeout = Duration::from_secs(2);
        c.tls = Some(tls);
        c
    };

    let full = TlsConfig::required()
        .with_root_certificates(&ca)
        .with_client_certificate(&client, &client_key);
    let t = NatsTransport::connect(config(full))
        .await
        .expect("mutual TLS with the private CA");
    t.publish(message("tls#0", Some("k"), b"{}".to_vec()))
        .await
        .expect("publish over TLS");
    let got = t
        .fetch(request(
            "g",
            1,
            Duration::from_secs(30),
            Duration::from_secs(5),
        ))
        .await
        .expect("fetch over TLS");
    assert_eq!(got.len(), 1);
    t.ack(&got[0]).await.expect("ack over TLS");

    let no_client_cert = TlsConfig::required().with_root_certificates(&ca);
    assert!(
        NatsTransport::connect(config(no_client_cert))
            .await
            .is_err(),
        "a client without a certificate is refused"
    );
    let platform_roots_only = TlsConfig::required().with_client_certificate(&client, &client_key);
    assert!(
        NatsTransport::connect(config(platform_roots_only))
            .await
            .is_err(),
        "a server certificate from an unknown CA is refused"
    );
}
