//! The load: `SOAK_CONNECTIONS` gateway connections with `SOAK_INFLIGHT` request tasks each,
//! every task keeping one request outstanding, pacing itself to its share of `SOAK_RATE` and
//! backing off after errors; plus the subscriber, the publisher and the direct probe
//! (clients.rs). It all runs on one current-thread runtime in its own thread (`run_load`)
//! until the supervisor says stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipc_gateway::client::{Client, ClientError};
use ipc_gateway::protocol::ErrorCode;

use crate::clients::{Conn, direct_probe, publisher, subscriber};
use crate::common::START_PATIENCE;
use crate::settings::Settings;
use crate::stats::{Stats, category_of};
use crate::{ECHO_SUBJECT, END_GRACE, MAX_PAYLOAD, MAX_REQUESTS_PER_TASK, MIN_PAYLOAD};
use crate::{REQUEST_TIMEOUT, WATCHDOG};

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
    interval: Duration,
    pause: Duration,
}

async fn request_task(conn: Arc<Conn>, env: Arc<LoadEnv>, task: usize) {
    let stats = &env.stats;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((task as u64 + 1) * 0x1000_0001));
    // Stagger the tasks over one pacing interval.
    let offset = if env.interval.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_micros(rng.next() % env.interval.as_micros().max(1) as u64)
    };
    let mut next = tokio::time::Instant::now() + offset;
    tokio::time::sleep_until(next).await;
    let mut seq = 0u64;
    while !env.stop.load(Ordering::Relaxed) && seq < MAX_REQUESTS_PER_TASK {
        seq += 1;
        let client = conn.current();
        let size = rng.range(MIN_PAYLOAD, MAX_PAYLOAD);
        let data = payload(task, seq, size, &env.filler);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            WATCHDOG,
            client.request(ECHO_SUBJECT, &data, Some(REQUEST_TIMEOUT)),
        )
        .await;
        let done = Instant::now();
        let done_ms = stats.ms(done);
        let mut backoff = Duration::ZERO;
        match answer {
            Err(_) => {
                stats.no_answer.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(reply)) => {
                if reply.data.as_ref() != data.as_slice() {
                    stats.wrong_replies.fetch_add(1, Ordering::Relaxed);
                }
                let latency = done.saturating_duration_since(sent).as_micros() as u64;
                stats.record_reply(stats.ms(sent), done_ms, latency);
            }
            Ok(Err(error)) => {
                let category = category_of(&error);
                stats.record_error(category, done_ms);
                backoff = match &error {
                    ClientError::Gateway(e) if e.code == ErrorCode::CircuitOpen => {
                        Duration::from_millis(e.retry_after_ms.unwrap_or(50).clamp(10, 1000) as u64)
                    }
                    ClientError::Gateway(_) => Duration::from_millis(50),
                    ClientError::Closed | ClientError::Io(_) => {
                        conn.reconnect(&client, stats, &env.stop).await;
                        Duration::from_millis(100)
                    }
                };
            }
        }
        // Pace without catching up: a slot missed is skipped, never made up with a burst.
        let now = tokio::time::Instant::now();
        next += env.interval;
        if next < now + env.pause {
            next = now + env.pause;
        }
        if !backoff.is_zero() {
            // Jitter, as a real client should: without it, every task told the same
            // `retry_after_ms` would come back in the same instant and stay in lockstep.
            let jitter_us = rng.next() % (env.interval.as_micros() as u64).max(20_000);
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

/// Runs the whole load on a current-thread runtime until `stop`, then waits (bounded) for
/// outstanding requests. Reports on `started` once every task runs (or why not). Returns how
/// many request tasks had to be abandoned.
pub fn run_load(
    settings: &Settings,
    socket: PathBuf,
    nats_url: String,
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
    let (connections, inflight) = (settings.connections, settings.inflight);
    let publish_rate = settings.publish_rate;
    let sample_every = Duration::from_secs_f64(settings.sample);
    runtime.block_on(async move {
        // Ctrl-C or SIGTERM ends the run early, cleanly (children stopped, report written).
        tokio::spawn(watch_signals(interrupted));
        // The subscriber first, then the publisher, then the requests.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sub = tokio::spawn(subscriber(
            socket.clone(),
            stats.clone(),
            stop.clone(),
            ready_tx,
        ));
        if tokio::time::timeout(START_PATIENCE, ready_rx)
            .await
            .is_err()
        {
            let _ = started.send(Err("the subscriber could not subscribe".into()));
            stop.store(true, Ordering::Relaxed);
            let _ = sub.await;
            return 0;
        }
        // Let the subscription reach nats-server before the first message.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let publish = tokio::spawn(publisher(
            nats_url.clone(),
            publish_rate,
            stats.clone(),
            stop.clone(),
        ));
        let direct = tokio::spawn(direct_probe(
            nats_url,
            sample_every,
            stats.clone(),
            stop.clone(),
        ));
        let handles = match start_requests(&socket, connections, inflight, &env).await {
            Ok(handles) => handles,
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
        let _ = tokio::time::timeout(Duration::from_secs(5), publish).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), direct).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), sub).await;
        abandoned
    })
}

impl LoadEnv {
    fn new(settings: &Settings, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> LoadEnv {
        let interval = if settings.rate > 0.0 {
            Duration::from_secs_f64(settings.tasks() as f64 / settings.rate)
        } else {
            Duration::ZERO
        };
        let filler: Vec<u8> = {
            let mut rng = Rng(0x1234_5678_9ABC_DEF1);
            (0..MAX_PAYLOAD + 256).map(|_| rng.next() as u8).collect()
        };
        LoadEnv {
            stats,
            stop,
            filler: Arc::new(filler),
            interval,
            pause: settings.pause,
        }
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

/// Connects every client connection and starts its request tasks.
async fn start_requests(
    socket: &PathBuf,
    connections: usize,
    inflight: usize,
    env: &Arc<LoadEnv>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let mut handles = Vec::with_capacity(connections * inflight);
    for c in 0..connections {
        let client = Client::connect(socket)
            .await
            .map_err(|err| format!("connect {}: {err}", socket.display()))?;
        let conn = Arc::new(Conn::new(socket.clone(), client));
        for i in 0..inflight {
            handles.push(tokio::spawn(request_task(
                conn.clone(),
                env.clone(),
                c * inflight + i,
            )));
        }
    }
    Ok(handles)
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
