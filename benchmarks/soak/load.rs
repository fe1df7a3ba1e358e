//! The load, on all three front-ends at once: request tasks on Unix-socket connections
//! (binary and JSON), WebSocket connections and one gRPC channel, every task keeping one
//! request outstanding, pacing itself to its share of its front-end's rate and backing off
//! after errors; plus the subscription feeds and their publishers (feeds.rs) and the direct
//! probe (clients.rs). It all runs on one current-thread runtime in its own thread
//! (`run_load`) until the supervisor says stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipc_gateway::client::{ClientError, WireFormat};
use ipc_gateway::protocol::ErrorCode;

use crate::clients::{Conn, direct_probe, publisher};
use crate::common::START_PATIENCE;
use crate::feeds::{gateway_subscriber, grpc_subscriber, ws_publisher};
use crate::links::Dial;
use crate::settings::Settings;
use crate::stats::{FEED_UDS, FEED_WS, Stats, category_of, front_index, outcome_of};
use crate::{ECHO_SUBJECT, END_GRACE, MAX_PAYLOAD, MAX_REQUESTS_PER_TASK, MIN_PAYLOAD};
use crate::{EVENTS_SUBJECT, REQUEST_TIMEOUT, WATCHDOG, WS_EVENTS_SUBJECT};

/// xorshift64*: payload sizes and start offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next() % (high - low + 1) as u64) as usize
    }
}

/// A payload that names its task and sequence number, with filler that varies with both.
fn payload(task: usize, seq: u64, size: usize, filler: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(size);
    data.extend_from_slice(&(task as u32).to_be_bytes());
    data.extend_from_slice(&seq.to_be_bytes());
    data.extend_from_slice(&(size as u32).to_be_bytes());
    let offset = (seq as usize * 7 + task) % 256;
    data.extend_from_slice(&filler[offset..offset + size - 16]);
    data
}

struct LoadEnv {
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    filler: Arc<Vec<u8>>,
    pause: Duration,
}

/// One request task: keeps one request outstanding on `conn`, at most one per `interval`.
async fn request_task(conn: Arc<Conn>, env: Arc<LoadEnv>, task: usize, interval: Duration) {
    let stats = &env.stats;
    let front = conn.dial.frontend();
    let counts = &stats.fronts[front_index(front)];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((task as u64 + 1) * 0x1000_0001));
    // Stagger the tasks over one pacing interval.
    let offset = if interval.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_micros(rng.next() % interval.as_micros().max(1) as u64)
    };
    let mut next = tokio::time::Instant::now() + offset;
    tokio::time::sleep_until(next).await;
    let mut seq = 0u64;
    while !env.stop.load(Ordering::Relaxed) && seq < MAX_REQUESTS_PER_TASK {
        seq += 1;
        let link = conn.current();
        let size = rng.range(MIN_PAYLOAD, MAX_PAYLOAD);
        let data = payload(task, seq, size, &env.filler);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        counts.sent.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(WATCHDOG, link.request(ECHO_SUBJECT, &data, REQUEST_TIMEOUT))
                .await;
        let done = Instant::now();
        let done_ms = stats.ms(done);
        let mut backoff = Duration::ZERO;
        if let Ok(answered) = &answer
            && let Some(outcome) = outcome_of(answered)
        {
            stats.record_op(front, "request", outcome);
        }
        match answer {
            Err(_) => {
                stats.no_answer.fetch_add(1, Ordering::Relaxed);
                counts.no_answer.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(reply)) => {
                if reply.as_ref() != data.as_slice() {
                    stats.wrong_replies.fetch_add(1, Ordering::Relaxed);
                    counts.wrong_replies.fetch_add(1, Ordering::Relaxed);
                }
                let latency = done.saturating_duration_since(sent).as_micros() as u64;
                stats.record_reply(stats.ms(sent), done_ms, latency);
                counts.replies.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                let category = category_of(&error);
                stats.record_error(category, done_ms);
                counts.errors.fetch_add(1, Ordering::Relaxed);
                backoff = match &error {
                    ClientError::Gateway(e) if e.code == ErrorCode::CircuitOpen => {
                        Duration::from_millis(e.retry_after_ms.unwrap_or(50).clamp(10, 1000) as u64)
                    }
                    ClientError::Gateway(_) => Duration::from_millis(50),
                    ClientError::Closed | ClientError::Io(_) => {
                        conn.reconnect(&link, stats, &env.stop).await;
                        Duration::from_millis(100)
                    }
                };
            }
        }
        // Pace without catching up: a slot missed is skipped, never made up with a burst.
        let now = tokio::time::Instant::now();
        next += interval;
        if next < now + env.pause {
            next = now + env.pause;
        }
        if !backoff.is_zero() {
            // Jitter, as a real client should: without it, every task told the same
            // `retry_after_ms` would come back in the same instant and stay in lockstep.
            let jitter_us = rng.next() % (interval.as_micros() as u64).max(20_000);
            let resume = now + backoff + Duration::from_micros(jitter_us);
            if next < resume {
                next = resume;
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

/// What the load thread shares with the supervisor.
pub struct LoadHandles {
    pub stats: Arc<Stats>,
    /// Set by the supervisor: the load ends.
    pub stop: Arc<AtomicBool>,
    /// Set on SIGINT or SIGTERM: the supervisor ends the run early.
    pub interrupted: Arc<AtomicBool>,
}

/// Where the load goes: the gateway's listeners, NATS (for the publisher and the probe), and
/// the tokens of the WebSocket and gRPC identities.
#[derive(Clone)]
pub struct Endpoints {
    pub socket: PathBuf,
    pub nats_url: String,
    pub http_port: u16,
    pub grpc_port: u16,
    pub ws_token: String,
    pub grpc_token: String,
}

/// Runs the whole load on a current-thread runtime until `stop`, then waits (bounded) for
/// outstanding requests. Reports on `started` once every task runs (or why not). Returns how
/// many request tasks had to be abandoned.
pub fn run_load(
    settings: &Settings,
    endpoints: Endpoints,
    handles: LoadHandles,
    started: std::sync::mpsc::Sender<Result<(), String>>,
) -> usize {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = started.send(Err(format!("runtime: {err}")));
            return 0;
        }
    };
    let LoadHandles {
        stats,
        stop,
        interrupted,
    } = handles;
    let env = Arc::new(LoadEnv::new(settings, stats.clone(), stop.clone()));
    let settings = settings.clone();
    runtime.block_on(async move {
        // Ctrl-C or SIGTERM ends the run early, cleanly (children stopped, report written).
        tokio::spawn(watch_signals(interrupted));
        // The subscribers first, then the publishers, then the requests.
        let mut background = Vec::new();
        let subscribed = start_subscribers(&settings, &endpoints, &env, &mut background).await;
        if let Err(err) = subscribed {
            let _ = started.send(Err(err));
            stop.store(true, Ordering::Relaxed);
            for task in background {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
            return 0;
        }
        // Let the subscriptions reach nats-server before the first message.
        tokio::time::sleep(Duration::from_millis(300)).await;
        background.push(tokio::spawn(publisher(
            endpoints.nats_url.clone(),
            settings.publish_rate,
            stats.clone(),
            stop.clone(),
        )));
        background.push(tokio::spawn(ws_publisher(
            Dial::Ws {
                port: endpoints.http_port,
                token: endpoints.ws_token.clone(),
            },
            WS_EVENTS_SUBJECT,
            settings.ws_publish_rate,
            stats.clone(),
            stop.clone(),
        )));
        background.push(tokio::spawn(direct_probe(
            endpoints.nats_url.clone(),
            Duration::from_secs_f64(settings.sample),
            stats.clone(),
            stop.clone(),
        )));
        let (conns, handles) = match start_requests(&settings, &endpoints, &env).await {
            Ok(started) => started,
            Err(err) => {
                let _ = started.send(Err(err));
                stop.store(true, Ordering::Relaxed);
                return 0;
            }
        };
        let _ = started.send(Ok(()));
        // Wait for the end.
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let abandoned = finish_requests(handles).await;
        for conn in &conns {
            conn.count_stray(&stats);
        }
        for task in background {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        abandoned
    })
}

impl LoadEnv {
    fn new(settings: &Settings, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> LoadEnv {
        let filler: Vec<u8> = {
            let mut rng = Rng(0x1234_5678_9ABC_DEF1);
            (0..MAX_PAYLOAD + 256).map(|_| rng.next() as u8).collect()
        };
        LoadEnv {
            stats,
            stop,
            filler: Arc::new(filler),
            pause: settings.pause,
        }
    }
}

/// The pacing interval of each of `tasks` tasks that together send `rate` requests a second
/// (0: no pacing, only the pause).
fn interval(tasks: usize, rate: f64) -> Duration {
    if rate > 0.0 && tasks > 0 {
        Duration::from_secs_f64(tasks as f64 / rate)
    } else {
        Duration::ZERO
    }
}

/// Sets `interrupted` on the first SIGINT or SIGTERM.
async fn watch_signals(interrupted: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    interrupted.store(true, Ordering::Relaxed);
}

/// The Unix-socket subscriber, the WebSocket subscribers and the gRPC Subscribe stream; returns
/// once every one has its first subscription acknowledged.
async fn start_subscribers(
    settings: &Settings,
    endpoints: &Endpoints,
    env: &Arc<LoadEnv>,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), String> {
    let (stats, stop) = (&env.stats, &env.stop);
    let mut ready = Vec::new();
    let mut subscriber = |dial: Dial, subject: &'static str, feed: usize| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        background.push(tokio::spawn(gateway_subscriber(
            dial,
            subject,
            feed,
            stats.clone(),
            stop.clone(),
            tx,
        )));
        ready.push(rx);
    };
    subscriber(
        Dial::Socket(endpoints.socket.clone(), WireFormat::Binary),
        EVENTS_SUBJECT,
        FEED_UDS,
    );
    for _ in 0..settings.ws_subscribers {
        let dial = Dial::Ws {
            port: endpoints.http_port,
            token: endpoints.ws_token.clone(),
        };
        subscriber(dial, WS_EVENTS_SUBJECT, FEED_WS);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    background.push(tokio::spawn(grpc_subscriber(
        endpoints.grpc_port,
        endpoints.grpc_token.clone(),
        WS_EVENTS_SUBJECT,
        stats.clone(),
        stop.clone(),
        tx,
    )));
    ready.push(rx);
    let all = futures_util::future::join_all(ready);
    match tokio::time::timeout(START_PATIENCE * 2, all).await {
        Ok(answers) if answers.iter().all(Result::is_ok) => Ok(()),
        _ => Err("the subscribers could not subscribe".into()),
    }
}

/// Connects every client connection and starts its request tasks: `SOAK_CONNECTIONS` on the
/// Unix socket (binary frames and JSON lines in turn), `SOAK_WS_CONNECTIONS` WebSockets (JSON)
/// with `SOAK_INFLIGHT` tasks each, and `SOAK_GRPC_TASKS` gRPC tasks on one channel.
async fn start_requests(
    settings: &Settings,
    endpoints: &Endpoints,
    env: &Arc<LoadEnv>,
) -> Result<(Vec<Arc<Conn>>, Vec<tokio::task::JoinHandle<()>>), String> {
    let mut groups: Vec<(Dial, usize, Duration)> = Vec::new();
    let uds_interval = interval(settings.tasks(), settings.rate);
    for c in 0..settings.connections {
        let format = if c % 2 == 0 {
            WireFormat::Binary
        } else {
            WireFormat::JsonLines
        };
        let dial = Dial::Socket(endpoints.socket.clone(), format);
        groups.push((dial, settings.inflight, uds_interval));
    }
    let ws_tasks = settings.ws_connections * settings.ws_inflight();
    for _ in 0..settings.ws_connections {
        let dial = Dial::Ws {
            port: endpoints.http_port,
            token: endpoints.ws_token.clone(),
        };
        let every = interval(ws_tasks, settings.ws_rate);
        groups.push((dial, settings.ws_inflight(), every));
    }
    if settings.grpc_tasks > 0 {
        let dial = Dial::Grpc {
            port: endpoints.grpc_port,
            token: endpoints.grpc_token.clone(),
        };
        let every = interval(settings.grpc_tasks, settings.grpc_rate);
        groups.push((dial, settings.grpc_tasks, every));
    }
    let mut conns = Vec::new();
    let mut handles = Vec::new();
    let mut task = 0;
    for (dial, tasks, every) in groups {
        let conn = Arc::new(Conn::open(dial, &env.stats).await?);
        for _ in 0..tasks {
            handles.push(tokio::spawn(request_task(
                conn.clone(),
                env.clone(),
                task,
                every,
            )));
            task += 1;
        }
        conns.push(conn);
    }
    Ok((conns, handles))
}

/// Outstanding requests get END_GRACE to be answered; then they are abandoned (counted).
async fn finish_requests(handles: Vec<tokio::task::JoinHandle<()>>) -> usize {
    let deadline = tokio::time::Instant::now() + END_GRACE;
    let mut abandoned = 0;
    for handle in handles {
        let abort = handle.abort_handle();
        if tokio::time::timeout_at(deadline, handle).await.is_err() {
            abort.abort();
            abandoned += 1;
        }
    }
    abandoned
}
