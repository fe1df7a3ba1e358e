//! What `/status` reports: one snapshot of the gateway's state, read from the state the core
//! keeps anyway (no bookkeeping on the request path). `full` carries what names subjects or
//! servers (breaker groups, NATS server addresses); the HTTP module shows it only to callers
//! the policy grants `status`, and counts to everyone.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Gateway, Readiness, breaker};
use crate::protocol::Frontend;

/// A snapshot for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub gateway_id: String,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub readiness: Readiness,
    /// The policy in force: 1 at start, one more for every reload that loaded.
    pub policy_version: u64,
    /// Client connections open now, by front-end.
    pub connections: BTreeMap<&'static str, u64>,
    pub subscriptions: SubscriptionCounts,
    pub nats: NatsStatus,
    /// How many breaker groups are in each state.
    pub breakers_by_state: BTreeMap<&'static str, usize>,
    pub audit: AuditStatus,
    /// Names this gateway's clients hold (named clients).
    pub names_held: usize,
    /// Only for callers granted `status`.
    #[serde(skip)]
    pub full: Detail,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionCounts {
    /// Shared NATS subscriptions: one per subject pattern and queue group with a client on it.
    pub nats_shared: u64,
    /// Client subscriptions open now, by front-end.
    pub clients: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatsStatus {
    pub connected: usize,
    pub pool_size: usize,
    /// Each pool connection, in slot order.
    pub connections: Vec<NatsConnection>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatsConnection {
    pub slot: usize,
    pub connected: bool,
    /// The server it is (or was last) connected to, `host:port`, and its name; only for
    /// callers granted `status` (`None` otherwise, and before the first connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditStatus {
    pub enabled: bool,
    /// Queue slots in use now (queued records and reservations).
    pub queue: u64,
    /// Records lost since start (`ipc_gateway_audit_records_lost_total`).
    pub lost: u64,
}

/// The parts that name subjects or servers.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    pub breakers: Vec<breaker::GroupStatus>,
    /// `(server, server_name)` per pool slot.
    pub servers: Vec<(Option<String>, Option<String>)>,
}

impl StatusReport {
    /// The report with its detail filled in (`breakers`, servers), for a caller granted
    /// `status`.
    pub fn with_detail(mut self) -> StatusReport {
        for (connection, (server, name)) in self.nats.connections.iter_mut().zip(&self.full.servers)
        {
            connection.server = server.clone();
            connection.server_name = name.clone();
        }
        self
    }
}

impl Gateway {
    /// The state `/status` shows.
    pub fn status_report(&self) -> StatusReport {
        let inner = &self.inner;
        let metrics = &inner.metrics;
        let breakers = inner.breakers.status();
        let mut breakers_by_state = BTreeMap::new();
        for group in &breakers {
            *breakers_by_state.entry(group.state.as_str()).or_default() += 1;
        }
        let pool = inner.pool.connection_states();
        StatusReport {
            gateway_id: self.id().to_owned(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: inner.started.elapsed().as_secs(),
            readiness: self.readiness(),
            policy_version: inner.access.version(),
            connections: Frontend::ALL
                .iter()
                .map(|f| (f.as_str(), metrics.connections_open(*f)))
                .collect(),
            subscriptions: SubscriptionCounts {
                nats_shared: metrics.nats_subscriptions.get().max(0.0) as u64,
                clients: Frontend::ALL
                    .iter()
                    .map(|f| (f.as_str(), metrics.subscriptions_open(*f)))
                    .collect(),
            },
            nats: NatsStatus {
                connected: pool.iter().filter(|c| c.connected).count(),
                pool_size: pool.len(),
                connections: pool
                    .iter()
                    .enumerate()
                    .map(|(slot, c)| NatsConnection {
                        slot,
                        connected: c.connected,
                        server: None,
                        server_name: None,
                    })
                    .collect(),
            },
            breakers_by_state,
            audit: AuditStatus {
                enabled: inner.audit.is_on(),
                queue: inner.audit.queued(),
                lost: metrics.audit_lost.get(),
            },
            names_held: inner.names.held_count(),
            full: Detail {
                breakers,
                servers: pool
                    .into_iter()
                    .map(|c| (c.server, c.server_name))
                    .collect(),
            },
        }
    }
}
