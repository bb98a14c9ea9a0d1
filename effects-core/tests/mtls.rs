//! Mutual TLS: an endpoint with a client certificate and a private CA, against a rustls server on
//! loopback that requires a client certificate signed by that CA. Certificates are generated
//! for each run (rcgen).

#![cfg(feature = "http")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use effects_core::http::{Endpoint, HttpClient, HttpConfig, HttpError, ReqwestClient, RetryPolicy};
use effects_core::{Method, RequestEffect};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

/// No test may run longer than this.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, all PEM.
struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
    client_pem: String,
    client_der: CertificateDer<'static>,
    client_key_pem: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "effects test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "effects test client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca).unwrap();

    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        server_der: server.der().clone(),
        server_key_der: server_key.serialize_der(),
        client_pem: client.pem(),
        client_der: client.der().clone(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// What the server saw of one connection.
#[derive(Debug)]
enum Seen {
    /// A request over a verified connection: the client's certificate and the request head.
    Request {
        client_certificate: Vec<u8>,
        head: String,
    },
    /// The handshake or the request failed.
    Failed(String),
}

/// A TLS server on a loopback port that requires a client certificate signed by the CA and
/// answers every request with `200 {"mtls": true}`. It stops when dropped.
struct TlsServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TlsServer {
    fn start(pki: &Pki) -> TlsServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![pki.server_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key_der.clone())),
            )
            .unwrap();
        let config = Arc::new(config);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || {
                let deadline = Instant::now() + TEST_TIMEOUT;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((tcp, _)) => {
                            let outcome = serve(tcp, Arc::clone(&config));
                            seen.lock().unwrap().push(outcome);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        TlsServer {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits (bounded) until the server finished with `n` connections, then what it saw.
    async fn settled(&self, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.seen.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        format!("{:?}", self.seen.lock().unwrap())
    }

    fn requests(&self) -> Vec<(Vec<u8>, String)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| match s {
                Seen::Request {
                    client_certificate,
                    head,
                } => Some((client_certificate.clone(), head.clone())),
                Seen::Failed(_) => None,
            })
            .collect()
    }

    /// Why connections failed, in order.
    fn failures(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|s| match s {
                Seen::Failed(reason) => Some(reason.clone()),
                Seen::Request { .. } => None,
            })
            .collect()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One connection: handshake, read the request head, answer, close.
fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> Seen {
    let result = (|| -> Result<Seen, String> {
        tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tls.read(&mut byte).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the client closed the connection".to_owned());
            }
            head.push(byte[0]);
            if head.len() > 64 * 1024 {
                return Err("the request head is too long".to_owned());
            }
        }
        let client_certificate = tls
            .conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or("no client certificate")?;
        let body = json!({"mtls": true}).to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(response.as_bytes())
            .map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        Ok(Seen::Request {
            client_certificate,
            head: String::from_utf8_lossy(&head).into_owned(),
        })
    })();
    result.unwrap_or_else(Seen::Failed)
}

fn client(endpoint: Endpoint) -> ReqwestClient {
    let config = HttpConfig::new()
        .add_endpoint(endpoint)
        .unwrap()
        .with_attempt_timeout(Duration::from_secs(5))
        .with_retry(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .unwrap();
    ReqwestClient::new(config).unwrap()
}

async fn bounded<T>(test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

#[tokio::test]
async fn a_client_certificate_and_a_private_ca_make_a_mutual_tls_request() {
    bounded(async {
        let pki = pki();
        let server = TlsServer::start(&pki);
        let endpoint = Endpoint::new("ledger", &server.url())
            .unwrap()
            .with_client_certificate(pki.client_pem.as_bytes(), pki.client_key_pem.as_bytes())
            .unwrap()
            .with_ca_certificate(pki.ca_pem.as_bytes())
            .unwrap();
        let shown = format!("{endpoint:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");

        let response = client(endpoint)
            .send(
                "k#0",
                &RequestEffect::new(Method::Get, "ledger", "/balance"),
            )
            .await
            .expect("the mutual TLS request succeeds");

        assert_eq!(response.status, 200);
        assert_eq!(response.body, json!({"mtls": true}));
        let seen = server.settled(1).await;
        let requests = server.requests();
        assert_eq!(requests.len(), 1, "{seen}");
        let (certificate, head) = &requests[0];
        assert_eq!(certificate.as_slice(), pki.client_der.as_ref());
        assert!(head.starts_with("GET /balance HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("idempotency-key: k#0\r\n"),
            "{head}"
        );
    })
    .await;
}

/// The same request without the client certificate: the server refuses the handshake, so the
/// check above cannot pass without mutual TLS.
#[tokio::test]
async fn mutant_without_the_client_certificate_the_handshake_fails() {
    bounded(async {
        let pki = pki();
        let server = TlsServer::start(&pki);
        let endpoint = Endpoint::new("ledger", &server.url())
            .unwrap()
            .with_ca_certificate(pki.ca_pem.as_bytes())
            .unwrap();
        let error = client(endpoint)
            .send(
                "k#0",
                &RequestEffect::new(Method::Get, "ledger", "/balance"),
            )
            .await
            .expect_err("no client certificate, no request");
        assert!(matches!(error, HttpError::Exhausted { .. }), "{error:?}");
        let seen = server.settled(1).await;
        assert!(server.requests().is_empty(), "{seen}");
        let failures = server.failures();
        assert_eq!(failures.len(), 1, "{seen}");
        assert!(failures[0].contains("certificate"), "{seen}");
    })
    .await;
}

/// Without the private CA the server's certificate is not trusted: the custom CA is what makes
/// the request above work.
#[tokio::test]
async fn mutant_without_the_private_ca_the_server_is_not_trusted() {
    bounded(async {
        let pki = pki();
        let server = TlsServer::start(&pki);
        let endpoint = Endpoint::new("ledger", &server.url())
            .unwrap()
            .with_client_certificate(pki.client_pem.as_bytes(), pki.client_key_pem.as_bytes())
            .unwrap();
        let error = client(endpoint)
            .send(
                "k#0",
                &RequestEffect::new(Method::Get, "ledger", "/balance"),
            )
            .await
            .expect_err("an unknown CA is not trusted");
        match &error {
            HttpError::Exhausted { last, .. } => {
                assert!(last.to_ascii_lowercase().contains("certificate"), "{last}");
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
        // The client gave up on the handshake; the server saw it fail.
        let seen = server.settled(1).await;
        assert!(server.requests().is_empty(), "{seen}");
        assert_eq!(server.failures().len(), 1, "{seen}");
    })
    .await;
}

#[test]
fn a_key_that_does_not_belong_to_the_certificate_is_refused() {
    let pki = pki();
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    let error = Endpoint::new("ledger", "https://127.0.0.1:1")
        .unwrap()
        .with_client_certificate(pki.client_pem.as_bytes(), other_key.as_bytes())
        .unwrap_err();
    assert!(
        matches!(error, effects_core::http::HttpConfigError::Tls { .. }),
        "{error:?}"
    );
    assert!(!error.to_string().contains("PRIVATE KEY"), "{error}");
    // TLS settings on an `http` URL make no sense.
    let plain = Endpoint::new("ledger", "http://127.0.0.1:1")
        .unwrap()
        .with_ca_certificate(pki.ca_pem.as_bytes())
        .unwrap();
    assert!(HttpConfig::new().add_endpoint(plain).is_err());
}
