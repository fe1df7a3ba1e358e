//! The counters the load tasks, the subscribers and the probes share with the supervisor and
//! the report: requests sent and answered (in all and per front-end), errors by category and
//! by second, a latency histogram, the moments around each NATS restart (first error, first
//! success, ...), each subscription feed's sequence accounting, and the operations the gateway
//! answered (what the audit log must hold). Atomics, so that recording never blocks a task,
//! except the small map of operations.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use ipc_gateway::client::ClientError;
use ipc_gateway::protocol::{ErrorCode, Frontend};

use crate::{MAX_GAP_EVENTS, MAX_RESTARTS};

/// Error categories: the gateway's codes, then what the client itself can see.
pub const CATEGORIES: usize = ErrorCode::ALL.len() + 2;
const CAT_CLOSED: usize = ErrorCode::ALL.len();
const CAT_IO: usize = ErrorCode::ALL.len() + 1;

pub fn category_name(index: usize) -> &'static str {
    match index {
        CAT_CLOSED => "CONNECTION_CLOSED",
        CAT_IO => "CONNECTION_IO",
        i => ErrorCode::ALL[i].as_str(),
    }
}

fn category_code(index: usize) -> Option<ErrorCode> {
    ErrorCode::ALL.get(index).copied()
}

/// The outcome an audit record carries for an answer: `ok` or the gateway's code; `None` when
/// the client saw no answer from the gateway (the connection was lost).
pub fn outcome_of<T>(answer: &Result<T, ClientError>) -> Option<&'static str> {
    match answer {
        Ok(_) => Some("ok"),
        Err(ClientError::Gateway(e)) => Some(e.code.as_str()),
        Err(_) => None,
    }
}

pub fn category_of(error: &ClientError) -> usize {
    match error {
        ClientError::Gateway(e) => ErrorCode::ALL
            .iter()
            .position(|code| *code == e.code)
            .unwrap_or(CAT_CLOSED),
        ClientError::Closed => CAT_CLOSED,
        ClientError::Io(_) => CAT_IO,
    }
}

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

pub struct Stats {
    pub t0: Instant,
    pub sent: AtomicU64,
    pub replies: AtomicU64,
    pub wrong_replies: AtomicU64,
    pub no_answer: AtomicU64,
    pub errors: Vec<AtomicU64>,
    /// Errors per second of the run, per category: index `second * CATEGORIES + category`.
    pub errors_per_second: Vec<AtomicU64>,
    pub reconnects: AtomicU64,
    pub reconnect_failures: AtomicU64,
    pub latency: Vec<AtomicU64>,
    pub latency_sum_us: AtomicU64,
    pub latency_max_us: AtomicU64,
    /// Median of the last direct-NATS probe, µs (u64::MAX: none answered).
    pub direct_probe_us: AtomicU64,
    /// The restart (index) whose recovery is being watched, usize::MAX for none.
    pub watching: AtomicUsize,
    pub kill_ms: Vec<AtomicU64>,
    pub restart_ms: Vec<AtomicU64>,
    /// First successful reply to a request sent after the restart (ms since t0).
    pub recovered_ms: Vec<AtomicU64>,
    /// First UNAVAILABLE answer after the kill.
    pub first_unavailable_ms: Vec<AtomicU64>,
    /// The last error of any kind after the kill (until the next kill or the end); 0: none.
    pub last_error_ms: Vec<AtomicU64>,
    /// The first and last CIRCUIT_OPEN after the kill (the breaker refusing).
    pub first_circuit_open_ms: Vec<AtomicU64>,
    pub last_circuit_open_ms: Vec<AtomicU64>,
    /// First direct NATS request to the echo service answered after the restart.
    pub direct_recovered_ms: Vec<AtomicU64>,
    /// The same counts per front-end (`FRONTS` order).
    pub fronts: [FrontCounts; 3],
    /// The subscription feeds (`FEEDS` order): what was published and what each subscriber saw.
    pub feeds: [Feed; 3],
    /// Operations the gateway answered, by front-end, op and outcome: what the audit log
    /// must hold.
    pub ops: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
}

/// The front-ends in the order of `Stats::fronts`.
pub const FRONTS: [Frontend; 3] = Frontend::ALL;

pub fn front_index(front: Frontend) -> usize {
    FRONTS.iter().position(|f| *f == front).unwrap_or(0)
}

/// One front-end's requests.
#[derive(Default)]
pub struct FrontCounts {
    pub sent: AtomicU64,
    pub replies: AtomicU64,
    pub wrong_replies: AtomicU64,
    pub errors: AtomicU64,
    pub no_answer: AtomicU64,
    /// Answers with an id nobody waited for (`Client::stray_answers`): answered twice.
    pub stray_answers: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The subscription feeds: the Unix-socket subscriber fed straight from NATS, the WebSocket
/// subscribers and the gRPC Subscribe streams fed by WebSocket publishers.
pub const FEEDS: [&str; 3] = ["uds", "ws", "grpc"];
pub const FEED_UDS: usize = 0;
pub const FEED_WS: usize = 1;
pub const FEED_GRPC: usize = 2;

/// One feed: messages published to it and, summed over its subscribers, what they saw.
pub struct Feed {
    pub subscribers: AtomicU64,
    pub published: AtomicU64,
    pub publish_failed: AtomicU64,
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    pub missing: AtomicU64,
    /// Missing messages that a `dropped` notice (a count that covers them, or the gap flag)
    /// announced before the next message.
    pub missing_announced: AtomicU64,
    pub dropped_notices: AtomicU64,
    pub dropped_messages: AtomicU64,
    pub gap_flags: AtomicU64,
    pub resubscribes: AtomicU64,
    /// Each gap a subscriber saw.
    pub gap_events: Mutex<Vec<GapEvent>>,
    /// First message received after each restart.
    pub recovered_ms: Vec<AtomicU64>,
}

#[derive(Clone, Copy)]
pub struct GapEvent {
    pub at_ms: u64,
    pub missing: u64,
    pub announced: bool,
}

impl Feed {
    fn new() -> Feed {
        Feed {
            subscribers: AtomicU64::new(0),
            published: AtomicU64::new(0),
            publish_failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            missing_announced: AtomicU64::new(0),
            dropped_notices: AtomicU64::new(0),
            dropped_messages: AtomicU64::new(0),
            gap_flags: AtomicU64::new(0),
            resubscribes: AtomicU64::new(0),
            gap_events: Mutex::new(Vec::new()),
            recovered_ms: atomics(MAX_RESTARTS, u64::MAX),
        }
    }
}

/// One subscriber's sequence numbers: gaps, duplicates and the notices that announced them.
#[derive(Default)]
pub struct SeqTracker {
    highest: u64,
    announced: u64,
    gap_flag: bool,
}

impl SeqTracker {
    /// A `dropped` notice (or a gRPC message's `dropped`/`gap` fields): it announces what the
    /// next message's gap will be.
    pub fn dropped(&mut self, stats: &Stats, feed: usize, count: u64, gap: bool) {
        let feed = &stats.feeds[feed];
        feed.dropped_notices.fetch_add(1, Ordering::Relaxed);
        feed.dropped_messages.fetch_add(count, Ordering::Relaxed);
        if gap {
            feed.gap_flags.fetch_add(1, Ordering::Relaxed);
        }
        self.announced += count;
        self.gap_flag |= gap;
    }

    /// A delivered message with its sequence number.
    pub fn message(&mut self, stats: &Stats, index: usize, seq: u64) {
        let feed = &stats.feeds[index];
        feed.received.fetch_add(1, Ordering::Relaxed);
        let now_ms = stats.now_ms();
        let watching = stats.watching.load(Ordering::Relaxed);
        if watching < MAX_RESTARTS && now_ms >= stats.restart_ms[watching].load(Ordering::Relaxed) {
            feed.recovered_ms[watching].fetch_min(now_ms, Ordering::Relaxed);
        }
        if seq <= self.highest {
            feed.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Every subscriber is subscribed before its feed's first message: numbering starts at 1.
        if seq > self.highest + 1 {
            let missing = seq - self.highest - 1;
            let announced = self.gap_flag || self.announced >= missing;
            feed.missing.fetch_add(missing, Ordering::Relaxed);
            if announced {
                feed.missing_announced.fetch_add(missing, Ordering::Relaxed);
            }
            let mut events = feed.gap_events.lock().unwrap_or_else(|p| p.into_inner());
            if events.len() < MAX_GAP_EVENTS {
                events.push(GapEvent {
                    at_ms: now_ms,
                    missing,
                    announced,
                });
            }
        }
        self.highest = seq;
        self.announced = 0;
        self.gap_flag = false;
    }
}

fn atomics(n: usize, value: u64) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(value)).collect()
}

impl Stats {
    pub fn new(seconds: f64) -> Stats {
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
            direct_recovered_ms: atomics(MAX_RESTARTS, u64::MAX),
            fronts: Default::default(),
            feeds: [Feed::new(), Feed::new(), Feed::new()],
            ops: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.t0).as_millis() as u64
    }

    pub fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    pub fn record_error(&self, category: usize, at_ms: u64) {
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

    pub fn record_reply(&self, sent_ms: u64, done_ms: u64, latency_us: u64) {
        self.replies.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket_of(latency_us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(latency_us, Ordering::Relaxed);
        let watching = self.watching.load(Ordering::Relaxed);
        if watching < MAX_RESTARTS && sent_ms >= self.restart_ms[watching].load(Ordering::Relaxed) {
            self.recovered_ms[watching].fetch_min(done_ms, Ordering::Relaxed);
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    pub fn errors_in(&self, from_ms: u64, to_ms: u64) -> Vec<u64> {
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

    pub fn quantile_us(&self, q: f64) -> Option<u64> {
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

    /// One operation the gateway answered, for the audit comparison.
    pub fn record_op(&self, front: Frontend, op: &'static str, outcome: &'static str) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        *ops.entry((front.as_str(), op, outcome)).or_insert(0) += 1;
    }

    /// Errors so far, by category.
    pub fn error_counts(&self) -> Vec<u64> {
        self.errors
            .iter()
            .map(|e| e.load(Ordering::Relaxed))
            .collect()
    }
}
