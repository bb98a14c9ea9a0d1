//! NATS helpers of the NATS test suites: a uniquely named stream per test on the machine's server
//! (deleted when the test ends), and a private `nats-server` on a free loopback port that a
//! test can kill and restart on the same store directory.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use effects_core::nats::{NatsConfig, NatsTransport, Reconnect};

/// The server the tests use: `EFFECTS_NATS_URL`, or the machine's NATS on 127.0.0.1:4222.
pub fn nats_url() -> String {
    std::env::var("EFFECTS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A stream name and subject prefix no other test run uses: `T<name>_<pid>_<time>_<n>`.
pub fn unique_names(name: &str) -> (String, String) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(24)
        .collect();
    let id = format!(
        "{clean}_{}_{nanos}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    (format!("T{id}"), format!("t{}", id.to_ascii_lowercase()))
}

/// Settings for a test: unique stream and prefix on `url`, quick reconnects.
pub fn test_config(url: &str, name: &str) -> NatsConfig {
    let (stream, prefix) = unique_names(name);
    let mut config = NatsConfig::new(url).with_stream(stream, prefix);
    config.connect_timeout = Duration::from_secs(3);
    config.reconnect = Reconnect {
        max_attempts: None,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(250),
    };
    config
}

/// Connects, or fails the test saying that NATS is needed and how to start it.
pub async fn connect_or_explain(config: NatsConfig) -> NatsTransport {
    let url = config.url.clone();
    match NatsTransport::connect(config).await {
        Ok(t) => t,
        Err(e) => panic!(
            "this test needs NATS with JetStream at {url}, which is not usable: {e}\n\
             start one with `nats-server -js -p 4222 -sd <dir>` (or point EFFECTS_NATS_URL at \
             one); the NATS suites run with `--features nats` or `--all-features`"
        ),
    }
}

/// A uniquely named stream (and its holds stream) on the test server, deleted when dropped.
pub struct TestStream {
    pub config: NatsConfig,
    pub transport: NatsTransport,
}

impl TestStream {
    /// A new stream named after `name`, with settings changed by `tweak`.
    pub async fn new(name: &str, tweak: impl FnOnce(&mut NatsConfig)) -> TestStream {
        let mut config = test_config(&nats_url(), name);
        tweak(&mut config);
        let transport = connect_or_explain(config.clone()).await;
        TestStream { config, transport }
    }

    /// Another connection to the same stream (another "process" as far as the server sees).
    pub async fn connect_again(&self) -> NatsTransport {
        connect_or_explain(self.config.clone()).await
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let transport = self.transport.clone();
        let stream = self.config.stream.clone();
        // The test's runtime may be shutting down: delete on a runtime of our own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                for name in [stream.clone(), transport.holds_stream_name()] {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        transport.jetstream().delete_stream(&name),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

/// A private `nats-server -js` on a loopback port with its store in `dir`, for tests that kill
/// and restart the server. Killed when dropped.
pub struct PrivateNats {
    pub port: u16,
    pub dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl PrivateNats {
    /// Starts it and waits (bounded) until it accepts connections.
    pub fn start(dir: &Path) -> PrivateNats {
        PrivateNats::start_with(dir, Vec::new())
    }

    /// Starts it with more command-line arguments (TLS, ...).
    pub fn start_with(dir: &Path, extra_args: Vec<String>) -> PrivateNats {
        let mut server = PrivateNats {
            port: free_port(),
            dir: dir.to_owned(),
            extra_args,
            child: None,
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let store = self.dir.join("jetstream");
        let log = self.dir.join(format!("nats-{}.log", self.port));
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test starts its own `nats-server` and could not run it: {e}\n\
                     install it (Debian: `apt-get install nats-server`) so that `nats-server` is \
                     on the PATH"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the private nats-server on port {} did not start within 10 s (log: {})",
                self.port,
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, no flush beyond what the server already wrote.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}
