//! Child processes the benchmarks start (nats-server, the echo service, gateways), stopped when
//! dropped; loopback ports; the private directory for sockets and logs; the gateway binary.
//! `start_nats` is a bare nats-server; `start_nats_server` one from a config file with a
//! monitoring port and, when asked, nats-server's own WebSocket listener.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::http::{http_get, http_status};

/// How long start-up waits (nats-server, echo service, gateway) before giving up.
pub const START_PATIENCE: Duration = Duration::from_secs(20);

/// A child process that is stopped when dropped: SIGTERM, a bounded wait, then SIGKILL.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command) -> Result<Proc, String> {
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start {name} ({command:?}): {err}"))?;
        Ok(Proc {
            name,
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status);
        }
        self.exited
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(format!("{} exited early: {status}", self.name)),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
    }

    /// SIGTERM, up to `patience` for it to exit, then SIGKILL. The exit status, and whether
    /// it exited by itself (false: it had to be killed).
    pub fn stop_within(&mut self, patience: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.exited() {
            return (Some(status), true);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return (Some(status), true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        (self.exited, false)
    }

    /// SIGTERM, up to 8 s, then SIGKILL.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(8));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client process a bench starts (the bench binary again, told its role in the
/// environment): commands go to its stdin one per line, and the lines it prints come back
/// through a channel that a thread fills.
pub struct LineProc {
    pub proc: Proc,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl LineProc {
    /// Starts `command` with its stdin and stdout piped to this process (stderr inherited).
    pub fn spawn(name: &'static str, command: &mut Command) -> Result<LineProc, String> {
        let mut proc = Proc::spawn(
            name,
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )?;
        let stdin = proc.child.stdin.take().ok_or("client stdin")?;
        let stdout = proc.child.stdout.take().ok_or("client stdout")?;
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineProc { proc, stdin, lines })
    }

    /// Sends one command line.
    pub fn send(&mut self, command: &str) -> Result<(), String> {
        use std::io::Write as _;
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .map_err(|err| format!("client process: {err}"))
    }

    /// The next line it printed, or `None` when none came within `patience`.
    pub fn recv(&self, patience: Duration) -> Option<String> {
        self.lines.recv_timeout(patience).ok()
    }
}

pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|err| format!("no free loopback port: {err}"))
}

pub fn wait_for_tcp(port: u16, proc: &mut Proc) -> Result<(), String> {
    let deadline = Instant::now() + START_PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.check_alive()?;
        if Instant::now() >= deadline {
            return Err(format!("{} did not listen on port {port}", proc.name));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// One nats-server on a free loopback port, logging into `dir`; returns it and its URL.
pub fn start_nats(dir: &Path) -> Result<(Proc, String), String> {
    let port = free_port()?;
    let mut nats = Proc::spawn(
        "nats-server",
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, "nats-server.log")?),
    )?;
    wait_for_tcp(port, &mut nats)?;
    Ok((nats, format!("nats://127.0.0.1:{port}")))
}

/// A nats-server started from a config file in `dir`: a client port, a monitoring port and,
/// when asked, its own WebSocket listener (`websocket { no_tls: true }`); it logs into
/// `dir/<name>.log`.
pub struct NatsServer {
    pub proc: Proc,
    pub url: String,
    pub monitor: u16,
    pub ws_port: Option<u16>,
    pub log: PathBuf,
    /// The config file's text, for reports.
    pub config: String,
}

pub fn start_nats_server(dir: &Path, name: &str, websocket: bool) -> Result<NatsServer, String> {
    let port = free_port()?;
    let monitor = free_port()?;
    let ws_port = if websocket { Some(free_port()?) } else { None };
    let mut config = format!("listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\n");
    if let Some(ws) = ws_port {
        config += &format!("websocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n");
    }
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, &config).map_err(|err| format!("{}: {err}", path.display()))?;
    let log = dir.join(format!("{name}.log"));
    let mut proc = Proc::spawn(
        "nats-server",
        Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("{name}.log"))?),
    )?;
    wait_for_tcp(port, &mut proc)?;
    wait_for_tcp(monitor, &mut proc)?;
    if let Some(ws) = ws_port {
        wait_for_tcp(ws, &mut proc)?;
    }
    Ok(NatsServer {
        proc,
        url: format!("nats://127.0.0.1:{port}"),
        monitor,
        ws_port,
        log,
        config,
    })
}

impl NatsServer {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A number from the monitoring port's `/varz` (e.g. `slow_consumers`, `connections`,
    /// `subscriptions`, `mem`).
    pub fn varz(&self, field: &str) -> Option<f64> {
        let (status, body) = http_get(self.monitor, "/varz")?;
        if status != 200 {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        value.get(field)?.as_f64()
    }

    /// Lines of its log that contain `needle` (e.g. "Slow Consumer").
    pub fn log_lines(&self, needle: &str) -> usize {
        log_matches(&self.log, needle, 0).0
    }
}

/// How many lines of a log file contain `needle`, and the first `keep` of them.
pub fn log_matches(log: &Path, needle: &str, keep: usize) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut matching = text.lines().filter(|line| line.contains(needle));
    let first: Vec<String> = matching.by_ref().take(keep).map(strip_ansi).collect();
    (first.len() + matching.count(), first)
}

/// A log line without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A gateway (`ipc-gateway serve`) with its Unix socket in `dir`, its HTTP port (/ws, /ready,
/// /metrics) on a free loopback port, gRPC on any free port, room for `max_connections`, and
/// `extra` flags last; it logs warnings into `dir/<log>`. Returns it once /ready says 200, with
/// its arguments and HTTP port. The cap on HTTP connections still in their handshake is raised
/// to `max_connections` too: by default it is half of that, and clients that open up to 128
/// WebSockets at once (two processes of 64) would otherwise be refused (503) at K = 100 on a
/// busy machine, which is not what a benchmark measures.
pub fn start_gateway(
    bin: &Path,
    nats_url: &str,
    dir: &Path,
    max_connections: usize,
    extra: &[String],
    log: &str,
) -> Result<(Proc, Vec<String>, u16), String> {
    let http = free_port()?;
    let mut args: Vec<String> = [
        "serve",
        "--nats-url",
        nats_url,
        "--socket",
        &dir.join(format!("{log}.sock")).display().to_string(),
        "--http",
        &format!("127.0.0.1:{http}"),
        "--grpc",
        "127.0.0.1:0",
        "--max-connections",
        &max_connections.to_string(),
        "--http-max-handshakes",
        &max_connections.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let mut gateway = Proc::spawn(
        "ipc-gateway serve",
        Command::new(bin)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("{log}.log"))?),
    )?;
    wait_ready(http, &mut gateway, "the gateway did not become ready")?;
    Ok((gateway, args, http))
}

/// The demo echo service (`ipc-gateway demo-echo`) answering `subject`, logging warnings
/// into `dir`.
pub fn start_echo(bin: &Path, nats_url: &str, subject: &str, dir: &Path) -> Result<Proc, String> {
    Proc::spawn(
        "ipc-gateway demo-echo",
        Command::new(bin)
            .args(["demo-echo", "--nats-url", nats_url, "--subject", subject])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, "echo.log")?),
    )
}

pub fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, String> {
    std::fs::File::create(dir.join(name)).map_err(|err| format!("{name}: {err}"))
}

/// A private directory for sockets and logs, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/<prefix>-<pid>`, e.g. prefix `ipc-gw-bench`.
    pub fn new(prefix: &str) -> Result<TempDir, String> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `/ready` on the gateway's HTTP port answers 200. Fails with `timeout_message`
/// after START_PATIENCE, or at once if the gateway exits.
pub fn wait_ready(http: u16, gateway: &mut Proc, timeout_message: &str) -> Result<(), String> {
    let deadline = Instant::now() + START_PATIENCE;
    while http_status(http, "/ready") != Some(200) {
        gateway.check_alive()?;
        if Instant::now() >= deadline {
            return Err(timeout_message.to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The gateway binary: IPC_GATEWAY_BIN, else target/release/ipc-gateway (honouring
/// CARGO_TARGET_DIR). `script` names what builds it, for the error message.
pub fn gateway_binary(manifest: &Path, script: &str) -> Result<PathBuf, String> {
    let bin = match std::env::var_os("IPC_GATEWAY_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("target"));
            let target = if target.is_relative() {
                manifest.join(target)
            } else {
                target
            };
            target.join("release").join("ipc-gateway")
        }
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "the gateway binary {} is missing: run `cargo build --release` first ({script} does)",
            bin.display()
        ))
    }
}
