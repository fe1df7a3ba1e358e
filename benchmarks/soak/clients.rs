//! The soak's clients besides the subscription feeds (feeds.rs): `Conn`, one gateway
//! connection of any front-end (links.rs) shared by a few request tasks and replaced when it
//! is lost; the NATS publisher (numbered messages at a steady rate, for the Unix-socket
//! subscriber); and the direct probe (requests straight to the echo service over NATS, which
//! tell the gateway's latency apart from that of NATS).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::links::{Dial, Link};
use crate::stats::{FEED_UDS, Stats, front_index};
use crate::{ECHO_SUBJECT, EVENTS_SUBJECT, MAX_RESTARTS};

/// One client connection shared by a few request tasks; replaced when it closes.
pub struct Conn {
    pub dial: Dial,
    link: RwLock<Arc<Link>>,
    /// Held while one task replaces a lost connection, so the others do not all reconnect.
    reconnecting: tokio::sync::Mutex<()>,
}

impl Conn {
    pub async fn open(dial: Dial, stats: &Stats) -> Result<Conn, String> {
        let link = dial.connect().await?;
        stats.record_op(dial.frontend(), "connect", "ok");
        Ok(Conn {
            dial,
            link: RwLock::new(Arc::new(link)),
            reconnecting: tokio::sync::Mutex::new(()),
        })
    }

    pub fn current(&self) -> Arc<Link> {
        self.link.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces `old` with a new connection, unless another task already did; the old one's
    /// stray answers are counted first.
    pub async fn reconnect(&self, old: &Arc<Link>, stats: &Stats, stop: &AtomicBool) {
        let _guard = self.reconnecting.lock().await;
        if !Arc::ptr_eq(&self.current(), old) {
            return;
        }
        let front = &stats.fronts[front_index(self.dial.frontend())];
        for _ in 0..50 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match self.dial.connect().await {
                Ok(link) => {
                    stats.record_op(self.dial.frontend(), "connect", "ok");
                    front
                        .stray_answers
                        .fetch_add(old.stray_answers(), Ordering::Relaxed);
                    *self.link.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(link);
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    front.reconnects.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    stats.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// At the end: the current connection's stray answers.
    pub fn count_stray(&self, stats: &Stats) {
        stats.fronts[front_index(self.dial.frontend())]
            .stray_answers
            .fetch_add(self.current().stray_answers(), Ordering::Relaxed);
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
            Ok(Ok(())) => stats.feeds[FEED_UDS]
                .published
                .fetch_add(1, Ordering::Relaxed),
            _ => stats.feeds[FEED_UDS]
                .publish_failed
                .fetch_add(1, Ordering::Relaxed),
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
