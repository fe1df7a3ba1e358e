//! The pool of NATS connections. deadpool creates the connections (each an `async_nats::Client`
//! that reconnects by itself); the pool keeps them in a fixed list and hands out clones
//! round-robin, skipping connections that are down. No pool guard is ever held across a
//! request: a `Client` clone multiplexes its connection, so in-flight requests are not capped
//! by the pool size.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions};
use deadpool::managed::{self, Metrics as PoolMetrics, Object, RecycleError, RecycleResult};
use metrics::Counter;
use tracing::{info, warn};

use crate::protocol::{ErrorCode, GatewayError};

/// How one pool connection is made and checked.
pub struct NatsManager {
    url: String,
    next_index: AtomicUsize,
    /// Counts messages async-nats itself dropped because a subscription's buffer was full.
    slow_consumer: Counter,
}

impl managed::Manager for NatsManager {
    type Type = Client;
    type Error = async_nats::ConnectError;

    async fn create(&self) -> Result<Client, Self::Error> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let url = self.url.clone();
        connect_options(index, self.slow_consumer.clone())
            .connect(url)
            .await
    }

    async fn recycle(&self, client: &mut Client, _: &PoolMetrics) -> RecycleResult<Self::Error> {
        match client.connection_state() {
            State::Connected => Ok(()),
            state => Err(RecycleError::Message(
                format!("NATS connection is {state}").into(),
            )),
        }
    }
}

/// Options for every pool connection: start even when NATS is down (readiness says so), and
/// reconnect for ever with capped exponential backoff and jitter.
fn connect_options(index: usize, slow_consumer: Counter) -> ConnectOptions {
    ConnectOptions::new()
        .name(format!("ipc-gateway-{index}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(None)
        // Our outbox is the drop point that clients are told about; this buffer only has to
        // absorb the moments when a subscription's pump task is not scheduled.
        .subscription_capacity(16 * 1024)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let slow_consumer = slow_consumer.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        slow_consumer.increment(1);
                        warn!(
                            connection = index,
                            sid, "NATS subscription buffer full: message dropped"
                        );
                    }
                    async_nats::Event::Connected => info!(connection = index, "NATS connected"),
                    async_nats::Event::Disconnected => {
                        warn!(connection = index, "NATS disconnected")
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

pub struct NatsPool {
    /// The pool that made the connections; its objects are held in `slots` for the gateway's
    /// whole life.
    _pool: managed::Pool<NatsManager>,
    slots: Vec<Object<NatsManager>>,
    next: AtomicUsize,
}

impl NatsPool {
    /// Creates `size` connections. Returns at once even if NATS is not up yet.
    pub async fn connect(
        url: &str,
        size: usize,
        slow_consumer: Counter,
    ) -> Result<Arc<NatsPool>, String> {
        let manager = NatsManager {
            url: url.to_owned(),
            next_index: AtomicUsize::new(0),
            slow_consumer,
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
                .map_err(|err| format!("NATS connection to {url}: {err}"))?;
            slots.push(object);
        }
        Ok(Arc::new(NatsPool {
            _pool: pool,
            slots,
            next: AtomicUsize::new(0),
        }))
    }

    /// A connected client, round-robin; `UNAVAILABLE` at once when none is connected.
    pub fn client(&self) -> Result<Client, GatewayError> {
        self.client_on(self.next_lane())
    }

    /// The next slot in round-robin order.
    pub fn next_lane(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The client in slot `start`, or the next connected one after it.
    pub fn client_on(&self, start: usize) -> Result<Client, GatewayError> {
        let n = self.slots.len();
        for offset in 0..n {
            let client: &Client = &self.slots[(start + offset) % n];
            if client.connection_state() == State::Connected {
                return Ok(client.clone());
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
        self.slots.len()
    }

    pub fn connected(&self) -> usize {
        self.slots
            .iter()
            .filter(|client| client.connection_state() == State::Connected)
            .count()
    }

    /// Flushes and drains every connection so queued publishes reach NATS before exit.
    pub async fn flush_all(&self) {
        for client in &self.slots {
            if client.connection_state() == State::Connected {
                let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reconnect_delay;
    use std::time::Duration;

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
}
