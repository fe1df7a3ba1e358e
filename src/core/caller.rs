//! A client connection as the core sees it, and who is calling on it. `Conn` is the
//! connection: which front-end, its place under `max_connections` (and under its identity's
//! `max_connections_per_identity`), its NATS lane (its publishes and subscriptions share one
//! pool connection, which keeps their order), its rate limit, its subscription count and the
//! replies it may send. `Caller` is a connection plus an `Authorized` identity: a Unix socket
//! or WebSocket has one for its life (a WebSocket `auth` message swaps it), a gRPC connection
//! one per call (each call carries its own token). Every core operation takes a `Caller`, so
//! limits, policy, identity headers and audit are decided once for every front-end. Dropping
//! the last `Caller` of a connection gives its slots back.
//!
//! A connection can hold its `Slot` before it is a client: the HTTP port takes one for each
//! connection in its handshake and offers it through a `HeldSlot`; the WebSocket upgrade takes
//! it for its `Caller`, so that a connection counts once, whether HTTP or WebSocket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::Lane;
use super::access::{Authorized, IdentityLease};
use super::ratelimit::RateLimit;
use crate::protocol::{ErrorCode, Frontend, GatewayError, Identity};
use crate::telemetry::audit::{Audit, AuditIdentity, AuditOp, Record};
use crate::telemetry::metrics::Metrics;

/// Reply subjects a connection may answer at once (the oldest is forgotten beyond).
const MAX_RESPONSES: usize = 1024;

/// Connection ids, for logs and the audit log.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

#[derive(Clone)]
pub struct Caller {
    conn: Arc<Conn>,
    who: Arc<Authorized>,
}

struct Conn {
    id: u64,
    frontend: Frontend,
    lane: Lane,
    /// `None` when no rate limit is configured: operations then take no lock. Boxed: inline
    /// it would be 80 bytes of every connection, limited or not.
    limit: Option<Box<Mutex<RateLimit>>>,
    metrics: Arc<Metrics>,
    /// Subscriptions open now (shared with each `SubscriptionSlot`).
    subscriptions: Arc<AtomicUsize>,
    /// Reply subjects of requests this connection received, each answerable once until its
    /// instant (nats-server's `allow_responses`). Boxed and made on the first: most
    /// connections never receive a request, and an empty map inline is 48 bytes of every one.
    responses: Mutex<Option<Box<Responses>>>,
    /// The connection's place under its identity's limit (moves with a WebSocket `auth`).
    lease: Mutex<Option<IdentityLease>>,
    audit: Audit,
    /// The identity the connection opened with (its `disconnect` record names it).
    /// Who the connection was opened as, for its audit records (`None` with the audit log
    /// off).
    opened_as: Option<Arc<AuditIdentity>>,
    /// Why the connection ends, for its `disconnect` record.
    close_reason: Mutex<&'static str>,
    /// Held, never read: dropping the connection frees its place under `max_connections`.
    _slot: Slot,
}

/// Reply subjects a connection may answer, each until its instant.
type Responses = HashMap<Arc<str>, Instant>;

/// One of a connection's `max_subscriptions_per_connection`; given back when dropped.
pub struct SubscriptionSlot(Arc<AtomicUsize>);

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Caller {
    pub(super) fn new(
        (frontend, lane, limit): (Frontend, Lane, RateLimit),
        (metrics, audit): (Arc<Metrics>, Audit),
        (slot, lease): (Slot, Option<IdentityLease>),
        who: Arc<Authorized>,
    ) -> Caller {
        metrics.connection_opened(frontend);
        let conn = Conn {
            opened_as: audit.is_on().then(|| who.audit_identity()),
            audit,
            close_reason: Mutex::new("closed"),
            id: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            frontend,
            lane,
            limit: (!limit.is_off()).then(|| Box::new(Mutex::new(limit))),
            metrics,
            subscriptions: Arc::default(),
            responses: Mutex::default(),
            lease: Mutex::new(lease),
            _slot: slot,
        };
        let caller = Caller {
            conn: Arc::new(conn),
            who,
        };
        if caller.conn.audit.is_on() {
            caller
                .conn
                .audit
                .record(caller.record(AuditOp::Connect).ok());
        }
        caller
    }

    /// The connection now counts against another identity's limit.
    pub(super) fn move_lease(&self, lease: Option<IdentityLease>) {
        *self
            .conn
            .lease
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = lease;
    }

    /// An audit record of `op` by this caller on this connection.
    pub(super) fn record(&self, op: impl Into<AuditOp>) -> Record {
        Record::new(op)
            .frontend(self.conn.frontend)
            .conn(self.conn.id)
            .identity(self.who.audit_identity())
    }

    /// Why the connection is ending (the front-end says: idle, slow client, shutdown, ...).
    pub fn closing(&self, reason: &'static str) {
        *self
            .conn
            .close_reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }

    pub fn frontend(&self) -> Frontend {
        self.conn.frontend
    }

    /// The connection's id (unique in this process).
    pub fn conn_id(&self) -> u64 {
        self.conn.id
    }

    pub fn identity(&self) -> &Identity {
        &self.who.identity
    }

    pub fn authorized(&self) -> &Arc<Authorized> {
        &self.who
    }

    /// The same connection with another caller on it (a gRPC call's token, a WebSocket
    /// `auth`, the same identity under a reloaded policy).
    pub fn with(&self, who: Arc<Authorized>) -> Caller {
        Caller {
            conn: self.conn.clone(),
            who,
        }
    }

    pub(super) fn lane(&self) -> Lane {
        self.conn.lane
    }

    /// Admits one operation carrying `bytes` of payload under the connection's rate limit.
    pub(super) fn admit(&self, bytes: usize) -> Result<(), GatewayError> {
        match &self.conn.limit {
            None => Ok(()),
            Some(limit) => limit
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .admit(bytes, tokio::time::Instant::now()),
        }
    }

    /// A place for one more subscription, or `OVERLOADED` when the connection holds `max`.
    pub(super) fn subscription_slot(&self, max: usize) -> Result<SubscriptionSlot, GatewayError> {
        let subscriptions = &self.conn.subscriptions;
        let taken = subscriptions.fetch_add(1, Ordering::AcqRel);
        let slot = SubscriptionSlot(subscriptions.clone());
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

    /// The connection received a request whose answer goes to `reply_to`: it may publish
    /// there once, until `until`.
    pub(super) fn may_answer(&self, reply_to: &str, until: Instant) {
        let mut responses = self
            .conn
            .responses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let responses = responses.get_or_insert_with(Box::default);
        if responses.len() >= MAX_RESPONSES {
            let now = Instant::now();
            responses.retain(|_, expires| *expires > now);
            if responses.len() >= MAX_RESPONSES
                && let Some(oldest) = responses
                    .iter()
                    .min_by_key(|(_, expires)| **expires)
                    .map(|(subject, _)| subject.clone())
            {
                responses.remove(&oldest);
            }
        }
        responses.insert(Arc::from(reply_to), until);
    }

    /// Whether the connection may answer on `subject` now (and uses that answer up).
    pub(super) fn take_answer(&self, subject: &str) -> bool {
        let mut responses = self
            .conn
            .responses
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(map) = responses.as_mut() else {
            return false;
        };
        let answered = map
            .remove(subject)
            .is_some_and(|expires| expires > Instant::now());
        if map.is_empty() {
            *responses = None;
        }
        answered
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.connection_closed(self.frontend);
        if self.audit.is_on()
            && let Some(opened_as) = &self.opened_as
        {
            let reason = *self
                .close_reason
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let record = Record::new(AuditOp::Disconnect)
                .frontend(self.frontend)
                .conn(self.id)
                .identity(opened_as.clone())
                .reason(reason);
            self.audit.record(record);
        }
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
