//! A client connection as the core sees it: which front-end it came through, its place under
//! `max_connections`, its NATS lane (its publishes and subscriptions share one pool
//! connection, which keeps their order) and its rate limit. Made once, at accept, by
//! `Gateway::connect`; every core operation takes it, so what the core decides per client
//! (limits now; identity, policy and audit next) is decided in one place for every front-end.
//! Dropping it gives the connection slot back.
//!
//! A connection can hold its `Slot` before it is a client: the HTTP port takes one for each
//! connection in its handshake and offers it through a `HeldSlot`; the WebSocket upgrade takes
//! it for its `Caller`, so that a connection counts once, whether HTTP or WebSocket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

use super::Lane;
use super::ratelimit::RateLimit;
use crate::protocol::{ErrorCode, Frontend, GatewayError};
use crate::telemetry::metrics::Metrics;

pub struct Caller {
    frontend: Frontend,
    lane: Lane,
    /// `None` when no rate limit is configured: operations then take no lock.
    limit: Option<Mutex<RateLimit>>,
    metrics: Arc<Metrics>,
    /// Subscriptions open now (shared with each `SubscriptionSlot`).
    subscriptions: Arc<AtomicUsize>,
    /// Held, never read: dropping the caller frees its connection slot.
    _slot: Slot,
}

/// One of a connection's `max_subscriptions_per_connection`; given back when dropped.
pub struct SubscriptionSlot(Arc<AtomicUsize>);

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Caller {
    pub(super) fn new(
        frontend: Frontend,
        lane: Lane,
        limit: RateLimit,
        metrics: Arc<Metrics>,
        slot: Slot,
    ) -> Caller {
        metrics.connection_opened(frontend);
        Caller {
            frontend,
            lane,
            limit: (!limit.is_off()).then(|| Mutex::new(limit)),
            metrics,
            subscriptions: Arc::default(),
            _slot: slot,
        }
    }

    pub fn frontend(&self) -> Frontend {
        self.frontend
    }

    pub(super) fn lane(&self) -> Lane {
        self.lane
    }

    /// Admits one operation carrying `bytes` of payload under the connection's rate limit.
    pub(super) fn admit(&self, bytes: usize) -> Result<(), GatewayError> {
        match &self.limit {
            None => Ok(()),
            Some(limit) => limit
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .admit(bytes, tokio::time::Instant::now()),
        }
    }
}

impl Caller {
    /// A place for one more subscription, or `OVERLOADED` when the connection holds `max`.
    pub(super) fn subscription_slot(&self, max: usize) -> Result<SubscriptionSlot, GatewayError> {
        let taken = self.subscriptions.fetch_add(1, Ordering::AcqRel);
        let slot = SubscriptionSlot(self.subscriptions.clone());
        if taken >= max {
            return Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "this connection holds its maximum of {max} subscriptions (--max-subscriptions-per-connection); unsubscribe first"
                ),
            ));
        }
        Ok(slot)
    }
}

/// A place under `max_connections`. Dropping it gives the place back.
pub struct Slot {
    /// Held, never read.
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    pub(super) fn new(permit: OwnedSemaphorePermit) -> Slot {
        Slot { _permit: permit }
    }
}

/// A connection's slot, held for the client the connection may become: the HTTP port keeps one
/// per connection in its handshake (and puts a clone of this in each request's extensions);
/// the WebSocket upgrade takes the slot for its `Caller`. Whoever holds the last clone and
/// has not taken the slot frees it by dropping.
#[derive(Clone)]
pub struct HeldSlot(Arc<Mutex<Option<Slot>>>);

impl HeldSlot {
    pub fn new(slot: Slot) -> HeldSlot {
        HeldSlot(Arc::new(Mutex::new(Some(slot))))
    }

    /// The slot, once: `None` if it was taken already.
    pub fn take(&self) -> Option<Slot> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.metrics.connection_closed(self.frontend);
    }
}
