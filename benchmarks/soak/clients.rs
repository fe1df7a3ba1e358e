//! The soak's clients besides the request tasks' load: `Conn`, one gateway connection
//! (`ipc_gateway::client::Client`, binary frames) shared by a connection's request tasks and
//! replaced when it is lost; the subscriber (one more gateway connection on the events
//! subject, counting deliveries by sequence number); the publisher (a NATS client publishing
//! numbered messages at a steady rate); and the direct probe (requests straight to the echo
//! service over NATS, which tell the gateway's latency apart from that of NATS).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipc_gateway::client::{Client, SubscriptionEvent};

use crate::stats::Stats;
use crate::{ECHO_SUBJECT, EVENTS_SUBJECT, MAX_GAP_EVENTS, MAX_RESTARTS};

/// One client connection shared by `SOAK_INFLIGHT` tasks; replaced when it closes.
pub struct Conn {
    socket: PathBuf,
    client: RwLock<Arc<Client>>,
    /// Held while one task replaces a lost connection, so the others do not all reconnect.
    reconnecting: tokio::sync::Mutex<()>,
}

impl Conn {
    pub fn new(socket: PathBuf, client: Client) -> Conn {
        Conn {
            socket,
            client: RwLock::new(Arc::new(client)),
            reconnecting: tokio::sync::Mutex::new(()),
        }
    }

    pub fn current(&self) -> Arc<Client> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `old` with a new connection, unless another task already did.
    pub async fn reconnect(&self, old: &Arc<Client>, stats: &Stats, stop: &AtomicBool) {
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

/// One gateway connection subscribed to the events subject; counts deliveries by sequence.
pub async fn subscriber(
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
                SubscriptionEvent::Dropped { count, .. } => {
                    stats.dropped_notices.fetch_add(1, Ordering::Relaxed);
                    stats.dropped_messages.fetch_add(count, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Publishes numbered messages on the events subject at a steady rate, straight to NATS.
pub async fn publisher(nats_url: String, rate: f64, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
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
pub async fn direct_probe(
    nats_url: String,
    every: Duration,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
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
