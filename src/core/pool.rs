//! The pool of NATS connections. deadpool creates each connection (an `async_nats::Client` that
//! reconnects by itself, with a signal that fires whenever it loses the server); the pool keeps
//! them in a fixed number of slots and hands out clones round-robin, skipping connections that
//! are down. A supervisor checks the slots every second and, through deadpool, replaces a
//! connection that stays down while others are up (it is wedged, NATS is not). No pool guard
//! is ever held across a request: a `Client` clone multiplexes its connection, so in-flight
//! requests are not capped by the pool size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions};
use deadpool::managed::{self, Metrics as PoolMetrics, Object, RecycleResult};
use metrics::Counter;

use super::breaker::Breakers;
use super::connect_failure::ConnectFailures;
use super::credentials::Credentials;
use super::fanout::{Fanout, Loss};
use super::replies::{Pending, ReplyRouter};
use super::shutdown::Shutdown;
use crate::telemetry::metrics::Metrics;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::protocol::{ErrorCode, GatewayError};

/// A connection stays down this long, while another slot is connected, before it is replaced.
pub const REPLACE_AFTER: Duration = Duration::from_secs(10);

/// How often a connection on which the server has sent nothing pings it. async-nats gives a
/// connection up (and reconnects, to another node of a cluster) at the third tick without a
/// word from the server, so a server that hangs, or a host that vanishes without closing its
/// connections, is left within 3 × this. async-nats's default, 60 s, kept requests timing out
/// on a hung node for 3 minutes while `/ready` said 200. A busy connection sends no pings
/// (every message from the server restarts the timer); an idle one a PING every 2 s.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// One pool connection and its loss signal: the value changes each time the connection drops,
/// so requests waiting on it can fail at once instead of waiting out their deadline.
pub struct PoolConn {
    /// Unique for the process's life (a replacement gets a new one).
    pub index: usize,
    pub client: Client,
    /// Matches this connection's replies to its requests.
    pub router: Arc<ReplyRouter>,
    /// The client and router again, behind one `Arc`: what a request takes (see `requester`).
    pub requester: Arc<Requester>,
    pub lost: watch::Receiver<u64>,
    /// Set when the pool retires this connection: subscriptions on it end and move elsewhere.
    pub retired: Arc<watch::Sender<bool>>,
}

/// How one pool connection is made and checked.
pub struct NatsManager {
    servers: Vec<async_nats::ServerAddr>,
    next_index: AtomicUsize,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    retries: mpsc::UnboundedSender<Box<Pending>>,
    /// Told when a connection comes up, so that `NO_RESPONDERS` from services still
    /// reconnecting is not held against them.
    breakers: Arc<Breakers>,
    /// Told which shared subscription the NATS client dropped a message of.
    fanout: Arc<Fanout>,
    subscription_buffer: usize,
    /// The credential and TLS settings every connection starts from.
    credentials: Arc<Credentials>,
    /// Why a connect fails, at most once per `UNREACHABLE_LOG_EVERY`, over every connection.
    failures: Arc<ConnectFailures>,
}

/// How often a NATS that cannot be reached is logged (async-nats retries every 0-2 s per
/// connection, and each failed attempt is an event).
pub const UNREACHABLE_LOG_EVERY: Duration = Duration::from_secs(10);

/// How often a connection logs that its NATS client's subscription buffer overflowed. Under
/// sustained overload that happens on every read (hundreds of times a second); the members get
/// exact `dropped` counts and `ipc_gateway_nats_slow_consumer_total` counts every message, so
/// the log only has to say that it is happening.
pub const BUFFER_FULL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets a log line through at most once per period.
pub struct LogThrottle {
    every: Duration,
    last: std::sync::Mutex<Option<Instant>>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            last: std::sync::Mutex::new(None),
        }
    }

    pub fn every(&self) -> Duration {
        self.every
    }

    /// Whether a line may be logged at `now`; if so, the period starts again.
    pub fn allow(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(at) if now.saturating_duration_since(at) < self.every => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

impl managed::Manager for NatsManager {
    type Type = PoolConn;
    type Error = async_nats::ConnectError;

    async fn create(&self) -> Result<PoolConn, Self::Error> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let (lost_sender, lost) = watch::channel(0u64);
        let client = connect_options(
            self.credentials.options(),
            index,
            self.metrics.nats_slow_consumer.clone(),
            lost_sender,
            (
                self.breakers.clone(),
                self.fanout.clone(),
                self.subscription_buffer,
            ),
            self.failures.clone(),
        )
        .connect(self.servers.clone())
        .await?;
        let router = ReplyRouter::new(
            super::replies::random_inbox(),
            self.metrics.clone(),
            Some(self.retries.clone()),
        );
        let retired = Arc::new(watch::channel(false).0);
        // Queued now, sent when the connection is up (and again after every reconnect).
        let (sink, connection_gone) = router.sink();
        match client.subscribe_with_sink(router.wildcard(), sink).await {
            Ok(subscription) => {
                tokio::spawn(router.clone().run(
                    subscription,
                    connection_gone,
                    lost.clone(),
                    retired.subscribe(),
                    self.shutdown.clone(),
                ));
            }
            Err(err) => {
                // Without its subscription no reply could come: refuse requests at once.
                warn!(connection = index, error = %err, "reply subscription failed");
                router.close("the NATS connection has no reply subscription; retry");
            }
        }
        Ok(PoolConn {
            index,
            requester: Arc::new(Requester {
                client: client.clone(),
                router: router.clone(),
            }),
            client,
            router,
            lost,
            retired,
        })
    }

    /// Never does anything: a connection is taken out of deadpool once and kept in its slot
    /// for life (`replace` detaches it), so nothing is ever handed back to be recycled.
    async fn recycle(&self, _: &mut PoolConn, _: &PoolMetrics) -> RecycleResult<Self::Error> {
        Ok(())
    }
}

/// Options for every pool connection, over `base` (the credentials and TLS): start even when
/// NATS is down (readiness says so), and reconnect for ever with capped exponential backoff and
/// jitter.
fn connect_options(
    base: ConnectOptions,
    index: usize,
    slow_consumer: Counter,
    lost: watch::Sender<u64>,
    (breakers, fanout, subscription_buffer): (Arc<Breakers>, Arc<Fanout>, usize),
    failures: Arc<ConnectFailures>,
) -> ConnectOptions {
    let lost = Arc::new(lost);
    let buffer_full = Arc::new(LogThrottle::new(BUFFER_FULL_LOG_EVERY));
    base.name(format!("ipc-gateway-{index}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(PING_INTERVAL)
        .request_timeout(None)
        // Every subject the gateway publishes to was checked already (`validate_subject`,
        // stricter than async-nats's check) or is one of its own reply subjects.
        .skip_subject_validation(true)
        // Each client's outbox is the drop point for a client that reads slowly; this buffer
        // only has to absorb the moments when a topic's dispatcher is not scheduled. What it
        // drops is counted by topic (see `Fanout::slow_consumer`).
        .subscription_capacity(subscription_buffer)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let slow_consumer = slow_consumer.clone();
            let lost = lost.clone();
            let breakers = breakers.clone();
            let fanout = fanout.clone();
            let failures = failures.clone();
            let buffer_full = buffer_full.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumers(sid, count) => {
                        slow_consumer.increment(count);
                        // The members get the exact count; the log, a line now and then.
                        let loss = fanout.slow_consumer(index, sid, count);
                        let logged = !matches!(loss, Loss::MoreOfBurst)
                            && buffer_full.allow(Instant::now());
                        match loss {
                            Loss::FirstOfBurst(subject) if logged => warn!(
                                connection = index,
                                %subject,
                                dropped = count,
                                "NATS subscription buffer full: messages dropped (see --nats-subscription-buffer; logged at most every {} s, ipc_gateway_nats_slow_consumer_total counts them all)",
                                BUFFER_FULL_LOG_EVERY.as_secs()
                            ),
                            Loss::NotATopic if logged => warn!(
                                connection = index,
                                sid,
                                dropped = count,
                                "NATS subscription buffer full on a subscription that is not a topic: messages dropped (logged at most every {} s)",
                                BUFFER_FULL_LOG_EVERY.as_secs()
                            ),
                            _ => {}
                        }
                    }
                    async_nats::Event::Connected => {
                        breakers.nats_connected();
                        info!(connection = index, "NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        lost.send_modify(|drops| *drops += 1);
                        fanout.disconnected(index);
                        warn!(connection = index, "NATS disconnected");
                    }
                    // Each failed (re)connect attempt: one line per period, naming the URL and
                    // the cause.
                    async_nats::Event::ClientError(async_nats::ClientError::Other(error)) => {
                        failures.report(index, error);
                    }
                    other => info!(connection = index, event = %other, "NATS event"),
                }
            }
        })
}

/// 0 ms for the first retry, then doubling from 50 ms up to 2 s, with up to 25 % jitter so
/// that many gateways do not reconnect in lockstep.
pub fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let base_ms = (50u64 << (attempts - 2).min(6)).min(2000);
    let jitter_ms = nanos_jitter() % (base_ms / 4 + 1);
    Duration::from_millis(base_ms + jitter_ms)
}

fn nanos_jitter() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

/// Whether a slot that has been down for `down_for` should be replaced: only when NATS is
/// evidently reachable (another slot is connected), so an outage does not churn connections.
pub fn should_replace(down_for: Duration, others_connected: usize) -> bool {
    down_for >= REPLACE_AFTER && others_connected > 0
}

/// A client handed out for one operation, with its reply router and the signal that its
/// connection was retired.
pub struct Picked {
    /// The connection's `PoolConn::index`.
    pub index: usize,
    pub client: Client,
    pub router: Arc<ReplyRouter>,
    pub retired: watch::Receiver<bool>,
}

/// What a request needs of its pool connection: the client to publish on and the router its
/// reply comes back through. Handed out as one `Arc` clone (a `Picked` costs a `Client` clone,
/// a dozen atomic operations, and a watch subscription that requests never look at).
pub struct Requester {
    pub client: Client,
    pub router: Arc<ReplyRouter>,
}

/// A pool slot: a connection deadpool manages, or one already detached from deadpool that
/// keeps serving until its successor is connected.
enum Slot {
    Managed(Object<NatsManager>),
    Retiring(PoolConn),
}

impl std::ops::Deref for Slot {
    type Target = PoolConn;

    fn deref(&self) -> &PoolConn {
        match self {
            Slot::Managed(object) => object,
            Slot::Retiring(conn) => conn,
        }
    }
}

/// One pool connection as `/status` shows it.
pub struct ConnectionState {
    pub connected: bool,
    pub server: Option<String>,
    pub server_name: Option<String>,
}

pub struct NatsPool {
    pool: managed::Pool<NatsManager>,
    slots: RwLock<Vec<Slot>>,
    next: AtomicUsize,
    replaced: AtomicUsize,
    /// The configured number of connections.
    target: usize,
}

impl NatsPool {
    /// Creates `size` connections. Returns at once even if NATS is not up yet.
    pub(super) async fn connect(
        servers: Vec<async_nats::ServerAddr>,
        size: usize,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        retries: mpsc::UnboundedSender<Box<Pending>>,
        (breakers, fanout, subscription_buffer): (Arc<Breakers>, Arc<Fanout>, usize),
        credentials: Arc<Credentials>,
    ) -> Result<Arc<NatsPool>, String> {
        let failures = Arc::new(ConnectFailures::new(
            servers.clone(),
            credentials.clone(),
            UNREACHABLE_LOG_EVERY,
        ));
        let manager = NatsManager {
            servers,
            next_index: AtomicUsize::new(0),
            metrics,
            shutdown,
            retries,
            breakers,
            fanout,
            subscription_buffer,
            credentials,
            failures,
        };
        let pool = managed::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|err| format!("NATS pool: {err}"))?;
        let mut slots = Vec::with_capacity(size);
        for _ in 0..size {
            let object = pool
                .get()
                .await
                .map_err(|err| format!("NATS connection: {err}"))?;
            slots.push(Slot::Managed(object));
        }
        Ok(Arc::new(NatsPool {
            pool,
            slots: RwLock::new(slots),
            next: AtomicUsize::new(0),
            replaced: AtomicUsize::new(0),
            target: size,
        }))
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Slot>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A connected connection for a request, round-robin; `UNAVAILABLE` at once when none is
    /// connected.
    pub fn requester(&self) -> Result<Arc<Requester>, GatewayError> {
        self.connected_from(self.next_lane(), |conn| conn.requester.clone())
    }

    /// The next slot in round-robin order.
    pub fn next_lane(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The client in slot `start`, or the next connected one after it.
    pub fn client_on(&self, start: usize) -> Result<Picked, GatewayError> {
        self.connected_from(start, |conn| Picked {
            index: conn.index,
            client: conn.client.clone(),
            router: conn.router.clone(),
            retired: conn.retired.subscribe(),
        })
    }

    /// `take` of the connection in slot `start`, or of the next connected one after it.
    fn connected_from<T>(
        &self,
        start: usize,
        take: impl FnOnce(&PoolConn) -> T,
    ) -> Result<T, GatewayError> {
        let slots = self.slots();
        let n = slots.len();
        for offset in 0..n {
            let conn: &PoolConn = &slots[(start + offset) % n];
            if conn.client.connection_state() == State::Connected {
                return Ok(take(conn));
            }
        }
        Err(GatewayError::new(
            ErrorCode::Unavailable,
            "NATS is not reachable; retry later",
        ))
    }

    /// Waits until at least one connection is up, or `limit` passes (NATS may be down: the
    /// gateway starts anyway and `/ready` says so).
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.connected() == 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    pub fn size(&self) -> usize {
        self.slots().len()
    }

    pub fn connected(&self) -> usize {
        self.slots()
            .iter()
            .filter(|conn| conn.client.connection_state() == State::Connected)
            .count()
    }

    /// Each slot's connection: connected now, and the server it is (or was last) on.
    pub fn connection_states(&self) -> Vec<ConnectionState> {
        self.slots()
            .iter()
            .map(|conn| {
                let info = conn.client.server_info();
                let known = !info.host.is_empty();
                ConnectionState {
                    connected: conn.client.connection_state() == State::Connected,
                    server: known.then(|| format!("{}:{}", info.host, info.port)),
                    server_name: (!info.server_name.is_empty()).then_some(info.server_name),
                }
            })
            .collect()
    }

    /// Requests waiting for replies across the pool.
    pub fn waiting_requests(&self) -> usize {
        self.slots()
            .iter()
            .map(|conn| conn.router.waiting_count())
            .sum()
    }

    /// How many connections the supervisor has replaced so far.
    pub fn replaced(&self) -> usize {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Replaces the connection in `slot` with a new one made by deadpool. The old one keeps
    /// its place until the new one is connected (or 2 s pass), then is retired: subscriptions
    /// on it end and their topics subscribe again elsewhere (see `dispatch_topic`).
    pub async fn replace(&self, slot: usize) -> Result<(), String> {
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            let Some(current) = slots.get_mut(slot) else {
                return Err(format!("no pool slot {slot}"));
            };
            // Detached from deadpool, it frees the place its successor is created in.
            let placeholder = Slot::Retiring(PoolConn {
                index: current.index,
                client: current.client.clone(),
                router: current.router.clone(),
                requester: current.requester.clone(),
                lost: current.lost.clone(),
                retired: current.retired.clone(),
            });
            if let Slot::Managed(object) = std::mem::replace(current, placeholder) {
                drop(Object::take(object));
            }
        }
        let fresh = self
            .pool
            .get()
            .await
            .map_err(|err| format!("creating a NATS connection: {err}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while fresh.client.connection_state() != State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let old = {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut slots[slot], Slot::Managed(fresh))
        };
        old.retired.send_replace(true);
        self.replaced.fetch_add(1, Ordering::Relaxed);
        warn!(slot, "replaced a NATS connection");
        Ok(())
    }

    /// Checks every slot each second and replaces those that `should_replace` says are wedged.
    pub async fn supervise(self: Arc<Self>) {
        let mut down_since: Vec<Option<Instant>> = vec![None; self.target];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let states: Vec<bool> = self
                .slots()
                .iter()
                .map(|conn| conn.client.connection_state() == State::Connected)
                .collect();
            let connected = states.iter().filter(|up| **up).count();
            for (slot, up) in states.into_iter().enumerate() {
                if up {
                    down_since[slot] = None;
                    continue;
                }
                let since = *down_since[slot].get_or_insert_with(Instant::now);
                if should_replace(since.elapsed(), connected) {
                    if let Err(err) = self.replace(slot).await {
                        warn!(slot, error = %err, "could not replace a NATS connection");
                    }
                    down_since[slot] = None;
                }
            }
        }
    }

    /// Flushes every connection so queued publishes reach NATS before exit.
    pub async fn flush_all(&self) {
        let clients: Vec<Client> = self.slots().iter().map(|c| c.client.clone()).collect();
        for client in clients {
            if client.connection_state() == State::Connected {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_throttle_lets_one_line_through_per_period() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert!(throttle.allow(start));
        assert!(!throttle.allow(start + Duration::from_secs(9)));
        assert!(throttle.allow(start + Duration::from_secs(10)));
        assert!(!throttle.allow(start + Duration::from_secs(19)));
        assert!(throttle.allow(start + Duration::from_secs(25)));
    }

    #[test]
    fn reconnect_delay_backs_off_and_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        let second = reconnect_delay(2);
        assert!(second >= Duration::from_millis(50) && second <= Duration::from_millis(63));
        for attempts in 10..20 {
            let delay = reconnect_delay(attempts);
            assert!(delay >= Duration::from_millis(2000) && delay <= Duration::from_millis(2500));
        }
    }

    #[test]
    fn a_connection_is_replaced_only_when_it_stays_down_while_nats_is_reachable() {
        assert!(!should_replace(Duration::from_secs(1), 1));
        assert!(
            !should_replace(REPLACE_AFTER * 3, 0),
            "an outage must not churn connections"
        );
        assert!(should_replace(REPLACE_AFTER, 1));
    }
}
