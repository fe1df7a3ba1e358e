//! systemd without systemd as PID 1: listeners handed over by socket activation (by
//! `systemd-socket-activate`, and by this test itself through `LISTEN_FDS` so the feature is
//! tested when the tool is missing), `sd_notify` notices read from a `NOTIFY_SOCKET` the test
//! binds, and the unit files checked by `systemd-analyze verify`; and what SIGHUP reloads.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipc_gateway::frontend::grpc::pb;
use ipc_gateway::frontend::grpc::pb::gateway_client::GatewayClient;

use crate::common::{JsonConn, NatsServer, PATIENCE, free_port, http_get, spawn_echo};

const GATEWAY: &str = env!("CARGO_BIN_EXE_ipc-gateway");

fn which(tool: &str) -> bool {
    Command::new("which")
        .arg(tool)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The service manager's end of `NOTIFY_SOCKET`: a datagram socket the test binds.
struct Manager {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    heard: Vec<String>,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify");
        Manager {
            socket: tokio::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET"),
            path,
            heard: Vec::new(),
        }
    }

    /// Reads notices until one has the line `line`; fails the test after `PATIENCE`.
    async fn expect(&mut self, line: &str) -> String {
        if let Some(notice) = self.heard.iter().find(|n| n.lines().any(|l| l == line)) {
            return notice.clone();
        }
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {line} in time; heard {:?}", self.heard))
                .expect("recv");
            let notice = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.heard.push(notice.clone());
            if notice.lines().any(|l| l == line) {
                return notice;
            }
        }
    }
}

/// A gateway process started by the test; killed when dropped.
struct Activated {
    child: Option<Child>,
}

impl Activated {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn terminate(&self) {
        gateway_signal(self, libc::SIGTERM);
    }

    /// Exit code and standard error.
    fn wait(&mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + PATIENCE;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the gateway did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("output");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `serve` arguments whose own socket mode, HTTP and gRPC ports are NOT what the listeners
/// handed over have: whatever answers there answers on a listener the gateway was given.
fn serve_args(nats_url: &str, socket: &Path) -> Vec<String> {
    vec![
        "serve".into(),
        "--nats-url".into(),
        nats_url.into(),
        "--socket".into(),
        socket.display().to_string(),
        "--socket-mode".into(),
        "0600".into(),
        "--http".into(),
        format!("127.0.0.1:{}", free_port()),
        "--grpc".into(),
        format!("127.0.0.1:{}", free_port()),
    ]
}

/// Starts the gateway with `fds` as its fds 3, 4, … and `LISTEN_PID` set to its own pid (a
/// shell sets it to `$$` and execs the gateway, which keeps the pid).
fn spawn_with_fds(fds: &[RawFd], env: &[(&str, String)], args: &[String]) -> Activated {
    assert!(fds.len() <= 3);
    let mut passed = [-1 as RawFd; 3];
    passed[..fds.len()].copy_from_slice(fds);
    let count = fds.len();
    let mut command = Command::new("sh");
    command
        .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", GATEWAY])
        .args(args)
        .env("LISTEN_FDS", count.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    // SAFETY: only async-signal-safe calls (fcntl, dup2) on fixed arrays, no allocation.
    unsafe {
        command.pre_exec(move || {
            // Out of the way first (a passed fd may be 3, 4 or 5 already), then into place;
            // dup2 clears close-on-exec on the copy.
            let mut high = [-1 as RawFd; 3];
            for index in 0..count {
                high[index] = libc::fcntl(passed[index], libc::F_DUPFD_CLOEXEC, 100);
                if high[index] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (index, fd) in high.iter().take(count).enumerate() {
                if libc::dup2(*fd, 3 + index as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Activated {
        child: Some(command.spawn().expect("start the gateway")),
    }
}

/// A request through the socket, the HTTP port's /health and a gRPC request, each on the
/// listener that was handed over.
async fn round_trips(socket: &Path, http_port: u16, grpc_port: u16) {
    let mut conn = JsonConn::connect(socket).await;
    let reply = conn
        .call(r#"{"op":"request","id":1,"subject":"demo.echo","data":"through systemd"}"#)
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"], "through systemd");
    let (status, body) = http_get(http_port, "/health").await;
    assert_eq!(status, 200, "{body}");
    let mut grpc = GatewayClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .expect("gRPC on the handed-over port");
    let reply = grpc
        .request(pb::RequestMessage {
            subject: "demo.echo".into(),
            payload: b"grpc".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("gRPC request")
        .into_inner();
    assert_eq!(&reply.payload[..], b"grpc");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("socket file")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn systemd_socket_activate_hands_over_every_listener_and_hears_ready_watchdog_stopping() {
    if !which("systemd-socket-activate") {
        eprintln!(
            "SKIPPED: systemd-socket-activate is not installed (Debian's systemd package; scripts/install-deps installs it)"
        );
        return;
    }
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manager = Manager::bind(dir.path());
    let socket = dir.path().join("gw.sock");
    let (http_port, grpc_port) = (free_port(), free_port());
    let args = serve_args(&nats.url(), &socket);
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .args(["-l", &format!("127.0.0.1:{http_port}")])
        .args(["-l", &format!("127.0.0.1:{grpc_port}")])
        .arg("--fdname=uds:http:grpc")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", manager.path.display()))
        .arg("--setenv=WATCHDOG_USEC=400000")
        .arg("--setenv=RUST_LOG=warn")
        .arg(GATEWAY)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start systemd-socket-activate");
    let mut gateway = Activated { child: Some(child) };

    // systemd-socket-activate starts the gateway at the first connection, which waits in the
    // backlog meanwhile (as under a .socket unit); first its listeners must be there.
    let deadline = Instant::now() + PATIENCE;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    round_trips(&socket, http_port, grpc_port).await;
    let ready = manager.expect("READY=1").await;
    assert!(
        ready.contains("STATUS=serving; NATS connections"),
        "{ready}"
    );
    assert_ne!(
        mode(&socket),
        0o600,
        "the socket file keeps the mode it was made with, not socket_mode"
    );
    manager.expect("WATCHDOG=1").await;

    gateway.terminate();
    manager.expect("STOPPING=1").await;
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        socket.exists(),
        "the socket file belongs to the socket unit and stays"
    );
}

#[tokio::test]
async fn listeners_passed_in_listen_fds_are_served_and_their_socket_file_left_alone() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manager = Manager::bind(dir.path());
    let socket = dir.path().join("gw.sock");
    let uds = std::os::unix::net::UnixListener::bind(&socket).expect("bind socket");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind http");
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind grpc");
    let (http_port, grpc_port) = (
        http.local_addr().unwrap().port(),
        grpc.local_addr().unwrap().port(),
    );
    let args = serve_args(&nats.url(), &socket);
    let mut gateway = spawn_with_fds(
        &[grpc.as_raw_fd(), uds.as_raw_fd(), http.as_raw_fd()],
        &[
            ("LISTEN_FDNAMES", "grpc:uds:http".into()),
            ("NOTIFY_SOCKET", manager.path.display().to_string()),
        ],
        &args,
    );
    manager.expect("READY=1").await;
    round_trips(&socket, http_port, grpc_port).await;
    assert_eq!(mode(&socket), 0o640, "not chmod-ed to socket_mode 0600");
    gateway.terminate();
    manager.expect("STOPPING=1").await;
    let (code, stderr) = gateway.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(socket.exists(), "the passed socket's file is not removed");
    assert!(
        !manager.heard.iter().any(|n| n.contains("WATCHDOG=1")),
        "no WATCHDOG_USEC, no pings: {:?}",
        manager.heard
    );
}

#[tokio::test]
async fn a_listener_of_the_wrong_kind_or_name_is_a_start_up_error_that_says_which() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("gw.sock");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let args = serve_args("nats://127.0.0.1:1", &socket);
    let cases: [(&[RawFd], &str, &str); 4] = [
        (
            &[tcp.as_raw_fd()],
            "uds",
            "fd 3 (uds) is an IP socket; uds needs a listening Unix stream socket",
        ),
        (
            &[udp.as_raw_fd()],
            "http",
            "fd 3 (http) is not a stream socket",
        ),
        (&[tcp.as_raw_fd()], "web", "fd 3 named \"web\""),
        (
            &[tcp.as_raw_fd()],
            "http:grpc",
            "LISTEN_FDS=1 but LISTEN_FDNAMES has 2 names",
        ),
    ];
    for (fds, names, expected) in cases {
        let mut gateway = spawn_with_fds(fds, &[("LISTEN_FDNAMES", names.into())], &args);
        let (code, stderr) = gateway.wait();
        assert_eq!(code, Some(2), "{names}: {stderr}");
        assert!(stderr.contains(expected), "{names}: {stderr}");
        assert!(!socket.exists(), "nothing bound: {names}");
    }
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    if !which("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian's systemd package)");
        return;
    }
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let dir = tempfile::tempdir().expect("temp dir");
    // verify checks that ExecStart= exists: point it at the binary just built.
    for unit in ["ipc-gateway.service", "ipc-gateway.socket"] {
        let text = std::fs::read_to_string(dist.join(unit)).expect("unit file");
        let text = text.replace("/usr/bin/ipc-gateway", GATEWAY);
        std::fs::write(dir.path().join(unit), text).expect("write unit");
    }
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("ipc-gateway.socket"))
        .arg(dir.path().join("ipc-gateway.service"))
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
}

/// Reads the gateway's log file until a line has every one of `words`; fails after `PATIENCE`.
async fn log_line(log: &Path, words: &[&str]) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|line| words.iter().all(|word| line.contains(word)))
        {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {words:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_applies_a_changed_live_limit_and_names_the_settings_that_need_a_restart() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manager = Manager::bind(dir.path());
    let socket = dir.path().join("gw.sock");
    let config = dir.path().join("gateway.toml");
    let log = dir.path().join("gateway.log");
    std::fs::write(&config, "max_subscriptions_per_connection = 1\n").expect("config");
    let mut args = serve_args(&nats.url(), &socket);
    args.extend(["--config".into(), config.display().to_string()]);
    let child = Command::new(GATEWAY)
        .args(&args)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &manager.path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the gateway");
    let mut gateway = Activated { child: Some(child) };
    manager.expect("READY=1").await;
    let mut conn = JsonConn::connect(&socket).await;
    let subscribe = |id: u32| format!(r#"{{"op":"subscribe","id":{id},"subject":"events.{id}"}}"#);
    assert_eq!(conn.call(&subscribe(1)).await["ok"], true);
    let refused = conn.call(&subscribe(2)).await;
    assert_eq!(refused["error"]["code"], "OVERLOADED", "{refused}");
    let big = format!(
        r#"{{"op":"request","id":3,"subject":"demo.echo","data":"{}"}}"#,
        "x".repeat(5000)
    );
    assert_eq!(conn.call(&big).await["ok"], true);

    // A file that does not validate changes nothing.
    std::fs::write(&config, "max_subscriptions_per_connection = 0\n").expect("config");
    manager.heard.clear();
    gateway_signal(&gateway, libc::SIGHUP);
    manager.expect("RELOADING=1").await;
    manager.expect("READY=1").await;
    log_line(
        &log,
        &[
            "configuration reload failed",
            "max_subscriptions_per_connection",
        ],
    )
    .await;
    let refused = conn.call(&subscribe(4)).await;
    assert_eq!(refused["error"]["code"], "OVERLOADED", "{refused}");

    // A live limit and a restart-only setting change.
    std::fs::write(
        &config,
        "max_subscriptions_per_connection = 3\nmax_connections = 1\nmax_frame_bytes = 4096\nlog_filter = \"warn\"\n",
    )
    .expect("config");
    manager.heard.clear();
    gateway_signal(&gateway, libc::SIGHUP);
    manager.expect("RELOADING=1").await;
    manager.expect("READY=1").await;
    let line = log_line(&log, &["need a restart", "max_frame_bytes"]).await;
    assert!(!line.contains("max_subscriptions_per_connection"), "{line}");
    assert!(!line.contains("max_connections"), "{line}");
    log_line(
        &log,
        &[
            "configuration reloaded; applied",
            "max_subscriptions_per_connection",
        ],
    )
    .await;
    assert_eq!(
        conn.call(&subscribe(5)).await["ok"],
        true,
        "the new limit, on the same connection"
    );
    assert_eq!(conn.call(&subscribe(6)).await["ok"], true);
    let refused = conn.call(&subscribe(7)).await;
    assert_eq!(
        refused["error"]["code"], "OVERLOADED",
        "3 is the limit now: {refused}"
    );
    let big = big.replace(r#""id":3"#, r#""id":8"#);
    let reply = conn.call(&big).await;
    assert_eq!(
        reply["ok"], true,
        "max_frame_bytes is not applied live: {reply}"
    );

    gateway.terminate();
    let (code, _) = gateway.wait();
    assert_eq!(code, Some(0));
}

fn gateway_signal(gateway: &Activated, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(gateway.pid() as libc::pid_t, signal) };
}

#[tokio::test]
async fn listen_fds_for_another_process_are_ignored_and_the_configured_socket_bound() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manager = Manager::bind(dir.path());
    let socket = dir.path().join("gw.sock");
    let log = dir.path().join("gateway.log");
    // fd 3 of the gateway is whatever it inherits, if anything: LISTEN_PID says it is not
    // the gateway's to take.
    let child = Command::new(GATEWAY)
        .args(serve_args("nats://127.0.0.1:1", &socket))
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "uds")
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &manager.path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the gateway");
    let mut gateway = Activated { child: Some(child) };
    manager.expect("READY=1").await;
    log_line(&log, &["LISTEN_FDS is set for process 1, not this one"]).await;
    assert_eq!(
        mode(&socket),
        0o600,
        "bound by the gateway, with socket_mode"
    );
    let mut conn = JsonConn::connect(&socket).await;
    assert_eq!(conn.call(r#"{"op":"ping"}"#).await["op"], "pong");
    gateway.terminate();
    let (code, _) = gateway.wait();
    assert_eq!(code, Some(0));
    assert!(!socket.exists(), "the gateway's own socket file is removed");
}
