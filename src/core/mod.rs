//! The core every front-end calls: `request`, `publish` and `subscribe`, implemented once, with
//! the same validation, limits, error codes and metrics whoever the client is. A `Gateway` is
//! cheap to clone (an `Arc` inside); there is one per process.

mod access;
pub mod auth;
pub mod breaker;
pub mod budget;
mod caller;
mod connect_failure;
pub mod credentials;
mod deadlines;
mod durable;
mod fanout;
pub mod live;
mod names;
mod nats;
pub mod policy;
pub mod pool;
mod presence;
pub mod ratelimit;
pub mod replay;
pub mod replies;
mod reply_subject;
pub mod shutdown;
#[cfg(test)]
mod sizes;
mod slots;
pub mod status;
mod step;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::client::traits::Publisher as _;
use async_nats::message::OutboundMessage;
use async_nats::{HeaderMap, Subscriber, TryPublishError};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use crate::config::Config;
use crate::protocol::Frontend;
use crate::protocol::subject::{SubjectUse, validate_queue_group, validate_subject};
use crate::protocol::{
    Delivery, Envelope, ErrorCode, GatewayError, Headers, Id, Identity, Op, Priority, Subject,
};
use crate::telemetry::audit::{Audit, AuditOp, Record};
use crate::telemetry::metrics::{Metrics, OpKind};
use crate::telemetry::trace::{self, Incoming, TraceContext};
pub use access::{Authorized, identity_headers};
use budget::ByteBudget;
pub use caller::{Caller, HeldSlot, Slot};
pub use durable::Stored;
pub use fanout::DeliverySink;
pub use names::{NameSink, PresenceWatch, Registration};
use policy::SubscribeDecision;
use pool::NatsPool;
pub use replay::{Replayed, Subscription};
pub use replies::ReplySink;
use shutdown::Shutdown;
pub use step::{Later, Step};

/// A successful request's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub data: Bytes,
    pub headers: Option<Headers>,
}

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    /// The configuration at start; the settings a reload changes are read from `live`.
    config: Config,
    live: live::Live,
    pool: Arc<NatsPool>,
    budget: Arc<ByteBudget>,
    breakers: Arc<breaker::Breakers>,
    /// `max_connections`, shared by every front-end, resized by a reload.
    connection_slots: slots::ConnectionSlots,
    /// Every client connection's task, so shutdown can wait for them to drain.
    connections: tokio_util::task::TaskTracker,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    default_subject: Option<Subject>,
    listener_up: AtomicBool,
    /// Policy, tokens, local users, per-identity counts.
    access: access::Access,
    audit: Audit,
    fanout: Arc<fanout::Fanout>,
    /// JetStream: one context per pool connection, and the policy reloads replays watch.
    jetstream: durable::JetStream,
    /// Named clients and presence (names.rs, presence.rs).
    names: Arc<names::Names>,
    /// When the gateway started (uptime on `/status`).
    started: Instant,
    /// Start a trace for operations that come without a (valid) `traceparent`.
    trace_requests: bool,
    /// OTLP span export (`otlp_endpoint`), when on.
    otlp: Option<crate::telemetry::otlp::Otlp>,
}

/// What `/ready` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub nats_connected: usize,
    pub nats_pool_size: usize,
    pub listener_up: bool,
    pub shutting_down: bool,
    pub not_ready: Vec<&'static str>,
}

impl Gateway {
    /// Builds the core and starts connecting to NATS; returns at once even if NATS is down.
    pub async fn new(mut config: Config) -> Result<Gateway, String> {
        // Resolved once, so /status, the audit log and the headers name the same gateway.
        config.gateway_id = Some(config.resolved_gateway_id());
        let config_max_replays = config.max_replays;
        // Spans need a trace for every operation; without an exporter, starting traces for
        // clients that sent none is the operator's choice (it costs ~0.8 µs a request).
        let trace_requests = config.trace_requests || config.otlp_endpoint.is_some();
        let access = access::Access::new(&config)?;
        let metrics = Metrics::new();
        let otlp = match &config.otlp_endpoint {
            Some(endpoint) => Some(crate::telemetry::otlp::Otlp::start(
                endpoint,
                &config.resolved_gateway_id(),
                metrics.trace_spans_dropped.clone(),
            )?),
            None => None,
        };
        let audit = Audit::start(config.audit(), metrics.clone())?;
        let shutdown = Shutdown::default();
        let (retries, to_retry) = tokio::sync::mpsc::unbounded_channel();
        let breakers = breaker::Breakers::new(config.breaker());
        let fanout = Arc::new(fanout::Fanout::new(metrics.clone()));
        let pool = NatsPool::connect(
            config.nats_servers()?,
            config.nats_connections,
            metrics.clone(),
            shutdown.clone(),
            retries,
            (
                breakers.clone(),
                fanout.clone(),
                config.nats_subscription_buffer,
            ),
            Arc::new(credentials::Credentials::new(&config)),
        )
        .await?;
        // Bounded in practice: only requests already in flight (each counted against its
        // connection's limit and the byte budget) are ever queued here.
        tokio::spawn(retry_lost_requests(to_retry, pool.clone(), metrics.clone()));
        // Clients that arrive in the first milliseconds should not see UNAVAILABLE just
        // because the first connection is still being made.
        if !pool.wait_connected(Duration::from_secs(2)).await {
            tracing::warn!(url = %crate::config::without_user_info(&config.nats_url), "NATS is not connected yet (unreachable, or refusing the gateway: the line before says which); starting anyway, /ready is 503 until it is");
        }
        metrics.nats_pool_size.set(pool.size() as f64);
        let budget = ByteBudget::new(config.max_inflight_bytes);
        let connection_slots = slots::ConnectionSlots::new(config.max_connections);
        let default_subject = config.default_subject.clone().map(Subject::from);
        let names = Arc::new(names::Names::new(
            config.client_subject_prefix.clone(),
            presence::PresenceStore::new(
                config.presence_bucket.clone(),
                Duration::from_millis(config.presence_ttl_ms),
                pool.clone(),
            ),
            config.resolved_gateway_id().as_str(),
        ));
        let gateway = Gateway {
            inner: Arc::new(Inner {
                live: live::Live::new(&config),
                config,
                pool,
                budget,
                breakers,
                connection_slots,
                connections: tokio_util::task::TaskTracker::new(),
                metrics,
                shutdown,
                default_subject,
                listener_up: AtomicBool::new(false),
                access,
                audit,
                fanout,
                jetstream: durable::JetStream::new(config_max_replays),
                names,
                started: Instant::now(),
                trace_requests,
                otlp,
            }),
        };
        tokio::spawn(names::maintain(Arc::downgrade(&gateway.inner)));
        Ok(gateway)
    }

    /// Admits a new client connection for `identity`: its slot under `max_connections` (and
    /// `max_connections_per_identity`), its lane and its rate limit. Over a limit, the
    /// `OVERLOADED` every front-end answers with, counted.
    pub fn connect(&self, frontend: Frontend, identity: Identity) -> Result<Caller, GatewayError> {
        let connected = self
            .slot()
            .and_then(|slot| self.connect_with(frontend, identity, slot));
        if connected.is_err() {
            self.inner.metrics.connection_rejected(frontend);
        }
        connected
    }

    /// A place under `max_connections` for a connection that is not a client yet (an HTTP
    /// connection in its handshake), to be handed to `connect_with` if it becomes one. Over the
    /// limit, the refusal `connect` gives (not counted: the caller decides what it refuses).
    pub fn slot(&self) -> Result<Slot, GatewayError> {
        match self.inner.connection_slots.try_acquire() {
            Some(permit) => Ok(Slot::new(permit)),
            None => Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "the gateway serves its maximum of {} connections; retry later",
                    self.inner.connection_slots.limit()
                ),
            )),
        }
    }

    /// Admits a client connection that already holds its slot (see `slot`); refused only
    /// when its identity holds `max_connections_per_identity` already.
    pub fn connect_with(
        &self,
        frontend: Frontend,
        identity: Identity,
        slot: Slot,
    ) -> Result<Caller, GatewayError> {
        let lease = match self.inner.access.lease(&identity) {
            Ok(lease) => lease,
            Err(refusal) => {
                self.audit_refused_connection(frontend, identity, refusal.code);
                return Err(refusal);
            }
        };
        let (requests, bytes) = self.inner.live.rate_limits();
        let limit = ratelimit::RateLimit::new(requests, bytes);
        let lane = Lane(self.inner.pool.next_lane());
        let who = self.inner.access.authorize(identity);
        Ok(Caller::new(
            (frontend, lane, limit),
            (self.inner.metrics.clone(), self.inner.audit.clone()),
            (slot, lease),
            who,
        ))
    }

    /// The caller of a connection that authenticated in-band (a WebSocket `auth` message): the
    /// same connection, now counted against the new identity's `max_connections_per_identity`
    /// (`OVERLOADED` when it holds its maximum already).
    pub fn reauthenticate(
        &self,
        caller: &Caller,
        identity: Identity,
    ) -> Result<Caller, GatewayError> {
        let lease = self.inner.access.lease(&identity)?;
        caller.move_lease(lease);
        Ok(caller.with(self.inner.access.authorize(identity)))
    }

    /// What the policy in force lets `identity` do.
    pub fn authorize(&self, identity: Identity) -> Arc<Authorized> {
        self.inner.access.authorize(identity)
    }

    /// `caller` under the policy in force, when it was reloaded since the caller was made.
    pub fn refreshed(&self, caller: &Caller) -> Option<Caller> {
        let who = self.inner.access.refreshed(caller.authorized())?;
        Some(caller.with(who))
    }

    /// A bearer token's identity, or `UNAUTHENTICATED`.
    pub fn verify_token(
        &self,
        token: &str,
        frontend: Frontend,
        addr: Option<String>,
    ) -> Result<Identity, GatewayError> {
        self.inner.access.verify(token, frontend, addr)
    }

    /// The identity of a connection that presents a token: the token's, with what the
    /// connection itself proved (its address, its verified client certificate), so that a
    /// token never drops a certificate identity.
    pub fn verify_token_on(
        &self,
        token: &str,
        connection: &Identity,
    ) -> Result<Identity, GatewayError> {
        let verified = self.verify_token(token, connection.frontend, connection.addr.clone())?;
        Ok(Identity {
            cert: connection.cert.clone(),
            ..verified
        })
    }

    /// Whether callers without a token are refused (WebSocket and gRPC).
    pub fn auth_required(&self) -> bool {
        self.inner.access.auth_required()
    }

    /// A Unix-socket peer's identity from its kernel credentials.
    pub async fn local_identity(&self, uid: u32, gid: u32, pid: Option<i32>) -> Identity {
        self.inner.access.local(uid, gid, pid).await
    }

    /// Reloads what SIGHUP reloads: the policy. A file that does not load keeps the policy in
    /// force; the error says why (it is logged and counted).
    pub async fn reload(&self) -> Result<(), String> {
        let audit = &self.inner.audit;
        if let Err(error) = audit.reopen().await {
            tracing::error!(%error, "the audit log could not be reopened; it goes on in the old file");
        }
        match self.inner.access.reload_policy().await {
            Ok(Some(version)) => {
                tracing::info!(version, "policy reloaded");
                self.recheck_subscriptions();
                self.inner.jetstream.policy_reloaded();
                self.recheck_names();
                self.inner.metrics.policy_reload(true);
                audit.record(Record::policy_reload(Ok(())).message(format!("version {version}")));
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) => {
                tracing::error!(%error, "policy reload failed; the policy in force stays");
                self.inner.metrics.policy_reload(false);
                audit.record(
                    Record::policy_reload(Err(ErrorCode::BadRequest)).message(error.to_string()),
                );
                Err(error.to_string())
            }
        }
    }

    /// Audits a connection refused at accept (over a limit).
    fn audit_refused_connection(&self, frontend: Frontend, identity: Identity, code: ErrorCode) {
        if self.inner.audit.is_on() {
            let who = self.inner.access.authorize(identity);
            let record = Record::new(AuditOp::Connect)
                .frontend(frontend)
                .identity(who.audit_identity())
                .error(code);
            self.inner.audit.record(record);
        }
    }

    /// Whether `identity` may see per-client detail on `/status`.
    pub fn may_see_status(&self, identity: Identity) -> bool {
        self.inner
            .access
            .authorize(identity)
            .permissions
            .may_see_status()
    }

    /// Tracks client connection tasks (front-ends wrap each connection in it).
    pub fn connections(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.connections
    }

    /// This gateway's id (`gateway_id`, resolved at start).
    pub fn id(&self) -> &str {
        self.inner.config.gateway_id.as_deref().unwrap_or_default()
    }

    /// The configuration the gateway started with. The settings a reload changes
    /// (`live::LIVE`) are read from `live()` instead.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The settings a reload changes, as they are now.
    pub fn live(&self) -> &live::Live {
        &self.inner.live
    }

    /// Puts a reloaded configuration's live settings (`live::LIVE`) in force, but `log_filter`
    /// (the logging subscriber's).
    pub fn apply_live(&self, config: &Config) {
        self.inner.live.apply(config);
        self.inner
            .access
            .set_max_per_identity(config.max_connections_per_identity);
        self.inner
            .connection_slots
            .set_limit(config.max_connections);
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    pub fn set_listener_up(&self, up: bool) {
        self.inner.listener_up.store(up, Ordering::Release);
    }

    pub fn readiness(&self) -> Readiness {
        let nats_connected = self.inner.pool.connected();
        let listener_up = self.inner.listener_up.load(Ordering::Acquire);
        let shutting_down = self.inner.shutdown.is_stopping();
        let mut not_ready = Vec::new();
        if nats_connected == 0 {
            not_ready.push("nats");
        }
        if !listener_up {
            not_ready.push("listener");
        }
        if shutting_down {
            not_ready.push("shutting_down");
        }
        Readiness {
            ready: not_ready.is_empty(),
            nats_connected,
            nats_pool_size: self.inner.pool.size(),
            listener_up,
            shutting_down,
            not_ready,
        }
    }

    /// Starts the pool supervisor (checks and replaces connections); runs until aborted.
    pub async fn supervise_pool(&self) {
        self.inner.pool.clone().supervise().await
    }

    /// Replaces pool connection `slot` now (operators and tests; the supervisor does it for
    /// connections that stay down).
    pub async fn replace_connection(&self, slot: usize) -> Result<(), String> {
        self.inner.pool.replace(slot).await
    }

    /// Every circuit breaker group's state, for `/status`.
    pub fn breaker_status(&self) -> Vec<breaker::GroupStatus> {
        self.inner.breakers.status()
    }

    /// Refreshes the gauges that are read from state rather than counted (so the request
    /// path updates none of them).
    pub fn refresh_gauges(&self) {
        let metrics = &self.inner.metrics;
        metrics
            .inflight_requests
            .set(self.inner.pool.waiting_requests() as f64);
        metrics.inflight_bytes.set(self.inner.budget.used() as f64);
        let groups = self.inner.breakers.status();
        for state in [
            breaker::State::Closed,
            breaker::State::Open,
            breaker::State::HalfOpen,
        ] {
            let count = groups.iter().filter(|g| g.state == state).count();
            metrics.breakers_in_state(state.as_str(), count);
        }
        metrics
            .nats_connected
            .set(self.inner.pool.connected() as f64);
        metrics
            .ready
            .set(if self.readiness().ready { 1.0 } else { 0.0 });
        metrics
            .nats_replaced
            .absolute(self.inner.pool.replaced() as u64);
        metrics.run_upkeep();
    }

    /// Starts a request. Its one answer (the reply, or an error no later than the deadline:
    /// the client's `timeout_ms`, capped by the configured ceiling) goes to `sink`, possibly
    /// before this returns. Its `Later` step, when it has one, only waits for room to send (in
    /// the audit queue or the NATS client's), which is how a client that sends faster than
    /// NATS takes its requests is slowed down.
    pub fn start_request<'a>(
        &'a self,
        caller: &'a Caller,
        envelope: Envelope,
        sink: Arc<dyn ReplySink>,
    ) -> Step<'a, ()> {
        // One clock reading for the latency, the breaker and the deadline.
        let now = tokio::time::Instant::now();
        self.begin(
            caller,
            Op::Request,
            envelope,
            move |envelope, traced, audit| {
                self.send_request(caller, envelope, sink, audit, traced, now)
            },
        )
    }

    /// How every request and publish begins: its payload counted, its trace, its audit ticket;
    /// then `then`, at once when the audit queue has room, else once it has.
    fn begin<'a, T: Send + 'a>(
        &'a self,
        caller: &'a Caller,
        op: Op,
        envelope: Envelope,
        then: impl FnOnce(Envelope, Traced, Option<replies::AuditTicket>) -> Step<'a, T> + Send + 'a,
    ) -> Step<'a, T> {
        self.inner
            .metrics
            .payload_in(caller.frontend(), envelope.data.len());
        let traced = self.trace(caller, &envelope);
        let context = traced.context.as_ref();
        match self.try_audit_ticket(caller, op, &envelope, context) {
            Some(audit) => then(envelope, traced, audit),
            None => Step::Later(Box::pin(async move {
                let context = traced.context.as_ref();
                let audit = self.audit_ticket(caller, op, &envelope, context).await;
                then(envelope, traced, audit).finish().await
            })),
        }
    }

    /// `start_request` from its audit ticket on: the checks, then the send.
    fn send_request<'a>(
        &'a self,
        caller: &'a Caller,
        envelope: Envelope,
        sink: Arc<dyn ReplySink>,
        audit: Option<replies::AuditTicket>,
        traced: Traced,
        now: tokio::time::Instant,
    ) -> Step<'a, ()> {
        let span = request_span("request", traced.context.as_ref());
        let metrics = &self.inner.metrics;
        let waiting = span.in_scope(|| {
            let (requester, pending, headers, data) =
                self.prepare_request(caller, envelope, sink, audit, traced, now)?;
            try_dispatch(metrics, requester, pending, headers, data)
        });
        match waiting {
            None => Step::Done(()),
            Some(waiting) => Step::Later(Box::pin(tracing::Instrument::instrument(
                waiting.send(metrics),
                span,
            ))),
        }
    }

    /// An operation's trace context: the client's `traceparent` continued, or a new trace
    /// (see `telemetry::trace`); and its OTLP span when export is on.
    fn trace(&self, caller: &Caller, envelope: &Envelope) -> Traced {
        let (context, incoming) =
            TraceContext::for_headers(envelope.headers.as_ref(), self.inner.trace_requests);
        Traced {
            context,
            incoming,
            span: self.span_start(caller),
        }
    }

    /// The start of an operation's OTLP span (`None` when export is off).
    fn span_start(&self, caller: &Caller) -> Option<Box<replies::SpanStart>> {
        let otlp = self.inner.otlp.as_ref()?;
        Some(Box::new(replies::SpanStart {
            otlp: otlp.clone(),
            identity: caller.authorized().who(),
            start: std::time::SystemTime::now(),
        }))
    }

    /// `start_request` up to the send: the checks, the message's headers, the breaker, the
    /// budget, a pool connection and the request's `Pending`. `None` when it was answered
    /// (refused) already.
    fn prepare_request(
        &self,
        caller: &Caller,
        envelope: Envelope,
        sink: Arc<dyn ReplySink>,
        audit: Option<replies::AuditTicket>,
        traced: Traced,
        now: tokio::time::Instant,
    ) -> Option<PreparedRequest> {
        let started = now.into_std();
        let frontend = caller.frontend();
        let prepared = (|| {
            caller.admit(envelope.data.len())?;
            let subject = self.target_subject(&envelope)?;
            if !caller.authorized().permissions.may_request(&subject) {
                return Err(forbidden(caller, "request", &subject));
            }
            let subject = nats::subject(&subject);
            let headers = self.outgoing_headers(
                caller,
                envelope.headers.as_ref(),
                (traced.context, traced.incoming),
            )?;
            let admission = self.inner.breakers.admit_at(&subject, now)?;
            let permit = self.inner.budget.try_acquire(envelope.data.len())?;
            let requester = self.inner.pool.requester()?;
            Ok((subject, headers, admission, permit, requester))
        })();
        let (subject, headers, admission, permit, requester) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                let result = Err(error);
                replies::record(&self.inner.metrics, frontend, started, &result);
                if let Some(audit) = audit {
                    audit.finish(&result, started);
                }
                if let (Some(span), Err(error)) = (traced.span, &result) {
                    let subject = envelope.subject.clone();
                    span.finish(
                        traced.context,
                        "request",
                        frontend,
                        subject,
                        Err(error.code),
                    );
                }
                sink.deliver(envelope.id, result);
                return None;
            }
        };
        let timeout = self.deadline(envelope.timeout_ms);
        let pending = Box::new(replies::Pending {
            id: envelope.id,
            sink,
            frontend,
            started,
            subject,
            timeout,
            deadline: now + timeout,
            permit,
            admission,
            resend: envelope.flags.retry.then(|| replies::Resend {
                headers: headers.clone(),
                data: envelope.data.clone(),
            }),
            attempts: 0,
            audit: audit.map(Box::new),
            trace: traced.context,
            span: traced.span,
        });
        Some((requester, pending, headers, envelope.data))
    }

    /// Sends a request and waits for its one answer (for callers that want a future).
    pub async fn request(
        &self,
        caller: &Caller,
        envelope: Envelope,
    ) -> Result<Reply, GatewayError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let sink = Arc::new(OneshotSink(std::sync::Mutex::new(Some(sender))));
        self.start_request(caller, envelope, sink).finish().await;
        receiver.await.unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorCode::Internal,
                "a request ended without an answer",
            ))
        })
    }

    /// Publishes a message. Success means NATS's client accepted it for sending. Publishes go
    /// through the caller's lane (one pool connection), so that messages from one client
    /// reach NATS in the order it sent them.
    pub async fn publish(&self, caller: &Caller, envelope: Envelope) -> Result<(), GatewayError> {
        self.start_publish(caller, envelope).finish().await
    }

    /// `publish`, done at once unless it has to wait for room (see `Step`).
    pub fn start_publish<'a>(
        &'a self,
        caller: &'a Caller,
        envelope: Envelope,
    ) -> Step<'a, Result<(), GatewayError>> {
        self.begin(
            caller,
            Op::Publish,
            envelope,
            move |envelope, traced, audit| self.send_publish(caller, envelope, traced, audit),
        )
    }

    /// `start_publish` from its audit ticket on: the checks, the send, and its records.
    fn send_publish<'a>(
        &'a self,
        caller: &'a Caller,
        envelope: Envelope,
        traced: Traced,
        audit: Option<replies::AuditTicket>,
    ) -> Step<'a, Result<(), GatewayError>> {
        let Traced {
            context,
            incoming,
            span: otlp_span,
        } = traced;
        let span = request_span("publish", context.as_ref());
        let done = Published {
            metrics: &self.inner.metrics,
            frontend: caller.frontend(),
            started: Instant::now(),
            context,
            subject: otlp_span.as_ref().and(envelope.subject.clone()),
            otlp_span,
            audit,
        };
        let sent = span.in_scope(|| {
            let (subject, headers, permit) =
                self.check_publish(caller, &envelope, (context, incoming))?;
            let client = self.inner.pool.client_on(caller.lane().0)?.client;
            let message = OutboundMessage {
                subject,
                reply: None,
                headers,
                payload: envelope.data,
            };
            match client.try_publish_message(message) {
                Ok(()) => Ok(None),
                Err(TryPublishError::Full(message)) => Ok(Some((client, message, permit))),
                Err(TryPublishError::Failed(err)) => Err(nats::publish_error(&err)),
            }
        });
        match sent {
            Ok(None) => Step::Done(done.record(Ok(()))),
            Err(error) => Step::Done(done.record(Err(error))),
            Ok(Some((client, message, permit))) => {
                let send = async move {
                    let sent = client.publish_message(message).await;
                    // The bytes are NATS's client's to send now.
                    drop(permit);
                    done.record(sent.map_err(|err| nats::publish_error(&err)))
                };
                Step::Later(Box::pin(tracing::Instrument::instrument(send, span)))
            }
        }
    }

    /// What every publish (plain or durable) passes before it is sent: the rate limit, the
    /// subject and the policy, the message's headers, the byte budget.
    fn check_publish(
        &self,
        caller: &Caller,
        envelope: &Envelope,
        traced: (Option<TraceContext>, Incoming),
    ) -> Result<(async_nats::Subject, Option<HeaderMap>, budget::BudgetPermit), GatewayError> {
        caller.admit(envelope.data.len())?;
        let subject = self.target_subject(envelope)?;
        if !caller.authorized().permissions.may_publish(&subject) && !caller.take_answer(&subject) {
            return Err(forbidden(caller, "publish", &subject));
        }
        let subject = nats::subject(&subject);
        let headers = self.outgoing_headers(caller, envelope.headers.as_ref(), traced)?;
        let permit = self.inner.budget.try_acquire(envelope.data.len())?;
        Ok((subject, headers, permit))
    }

    /// Subscribes `caller` to `subject` (wildcards allowed, optional queue group): its
    /// messages go to `sink` under `sid`. Clients subscribed to the same (subject, queue
    /// group) share one NATS subscription (see `fanout`). Dropping the `Subscription`
    /// unsubscribes.
    pub async fn subscribe(
        &self,
        caller: &Caller,
        subject: &Subject,
        queue: Option<&str>,
        (sid, priority, sink): (Id, Priority, Arc<dyn DeliverySink>),
    ) -> Result<Subscription, GatewayError> {
        let audit = match self.inner.audit.is_on() {
            true => {
                let mut envelope = Envelope::new(Op::Subscribe, Id::Null);
                envelope.subject = Some(subject.clone());
                self.audit_ticket(caller, Op::Subscribe, &envelope, None)
                    .await
            }
            false => None,
        };
        let started = Instant::now();
        let otlp_span = self.span_start(caller);
        let max = self.inner.live.max_subscriptions_per_connection();
        let admitted = caller
            .admit(0)
            .and_then(|()| validate_subject(subject, SubjectUse::Subscribe))
            .and_then(|()| queue.map_or(Ok(()), validate_queue_group))
            .and_then(|()| self.subscribe_decision(caller, subject))
            .and_then(|filter| Ok((filter, caller.subscription_slot(max)?)));
        let result = match admitted {
            Ok((filtered, slot)) => {
                let key = fanout::TopicKey {
                    subject: subject.clone(),
                    queue: queue.map(Arc::from),
                };
                self.join(key, caller, (sid, priority, sink), filtered, slot)
                    .await
            }
            Err(error) => Err(error),
        };
        self.inner.metrics.operation_timed(
            caller.frontend(),
            OpKind::Op(Op::Subscribe),
            result.as_ref().map(|_| ()).map_err(|e| e.code),
            started.elapsed(),
        );
        if let Some(audit) = audit {
            audit.finish(&result.as_ref().map(|_| ()).map_err(Clone::clone), started);
        }
        if let Some(otlp_span) = otlp_span {
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.code);
            let trace = Some(TraceContext::start());
            otlp_span.finish(
                trace,
                "subscribe",
                caller.frontend(),
                Some(subject.clone()),
                outcome,
            );
        }
        result
    }

    /// Joins the topic for `key` (starting its dispatcher when it is new) and waits until
    /// its NATS subscription is confirmed.
    async fn join(
        &self,
        key: fanout::TopicKey,
        caller: &Caller,
        (sid, priority, sink): (Id, Priority, Arc<dyn DeliverySink>),
        filtered: bool,
        slot: caller::SubscriptionSlot,
    ) -> Result<Subscription, GatewayError> {
        let fanout = &self.inner.fanout;
        let member_key = fanout.next_member_key();
        let active = Arc::new(AtomicBool::new(true));
        let member = fanout::Member {
            key: member_key,
            sid,
            priority,
            caller: caller.clone(),
            sink,
            filtered,
            active: active.clone(),
            _slot: slot,
        };
        let (topic, created) = fanout.join(key, member);
        // From here, dropping the handle (an error below, or the client going away while
        // it waits) leaves the topic again.
        let subscription = fanout.handle(topic.clone(), member_key, active);
        if created {
            let dispatcher =
                tokio::spawn(dispatch_topic(self.clone(), topic.clone(), caller.lane()));
            fanout.set_dispatcher(&topic, dispatcher.abort_handle());
        }
        topic.opened().await?;
        Ok(Subscription::shared(subscription))
    }

    /// Makes the NATS subscription for a topic and waits until the server confirms it.
    async fn open_subscription(
        &self,
        lane: Lane,
        key: &fanout::TopicKey,
    ) -> Result<LiveSubscription, GatewayError> {
        let pool::Picked {
            index,
            client,
            retired,
            router,
        } = self.inner.pool.client_on(lane.0)?;
        let subject = nats::subject(&key.subject);
        let subscribe = async {
            match &key.queue {
                Some(queue) => client.queue_subscribe(subject, queue.to_string()).await,
                None => client.subscribe(subject).await,
            }
        };
        // Sending the SUB waits for room in the NATS client's queue: bounded like the rest.
        let subscribed = tokio::time::timeout(self.inner.live.request_timeout(), subscribe)
            .await
            .map_err(|_| {
                GatewayError::new(
                    ErrorCode::Unavailable,
                    "NATS could not take the subscription in time",
                )
            })?;
        let subscriber = subscribed.map_err(|err| nats::subscribe_error(&err))?;
        // The acknowledgement promises that messages published after it are delivered, so
        // wait until the server has processed the SUB. `flush()` only writes the socket;
        // a message this connection sends to one of its own unguessable reply subjects comes
        // back only after the server has handled everything sent before it, and nobody else
        // (a `>` subscriber, say) can disturb that round trip.
        let mut sync = router.sync_point();
        let confirmed = async {
            client
                .publish(sync.subject.clone(), Bytes::new())
                .await
                .map_err(|err| nats::publish_error(&err))?;
            (&mut sync.came_back).await.map_err(|_| {
                GatewayError::new(
                    ErrorCode::Unavailable,
                    "the NATS connection was lost before it confirmed the subscription",
                )
            })
        };
        match tokio::time::timeout(self.inner.live.request_timeout(), confirmed).await {
            Ok(Ok(())) => Ok(LiveSubscription {
                nats_sid: nats::subscriber_sid(&subscriber).map(|sid| (index, sid)),
                subscriber,
                retired,
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(GatewayError::new(
                ErrorCode::Unavailable,
                "NATS did not confirm the subscription in time",
            )),
        }
    }

    /// Hands messages that came for a topic, in order, to its members: each member of a
    /// plain topic gets all of them at once (one lock and one wake-up of its connection per
    /// batch, not per message); in a queue group each message goes to one member in turn.
    fn fan_out(&self, topic: &fanout::Topic, deliveries: &[Arc<Delivery>]) {
        let answer_until = deliveries
            .iter()
            .any(|delivery| delivery.reply_to.is_some())
            .then(|| tokio::time::Instant::now() + self.inner.live.request_timeout());
        // Counted per front-end once per batch, not once per member.
        let mut bytes = [0usize; Frontend::ALL.len()];
        let mut dropped = [0u64; Frontend::ALL.len()];
        let mut offer = |member: &fanout::Member, deliveries: &[Arc<Delivery>]| {
            let allowed: Vec<Arc<Delivery>>;
            let deliveries = if member.filtered {
                allowed = deliveries
                    .iter()
                    .filter(|delivery| self.may_deliver(member, delivery))
                    .cloned()
                    .collect();
                allowed.as_slice()
            } else {
                deliveries
            };
            if deliveries.is_empty() {
                return false;
            }
            if let Some(until) = answer_until {
                for reply_to in deliveries.iter().filter_map(|d| d.reply_to.as_ref()) {
                    member.caller.may_answer(reply_to.as_str(), until);
                }
            }
            let frontend = member.caller.frontend() as usize;
            bytes[frontend] += deliveries.iter().map(|d| d.payload.len()).sum::<usize>();
            dropped[frontend] += member
                .sink
                .deliver(&member.sid, deliveries, member.priority);
            true
        };
        if topic.key.queue.is_some() {
            for delivery in deliveries {
                topic.fan_out(|member| offer(member, std::slice::from_ref(delivery)));
            }
        } else {
            topic.fan_out(|member| offer(member, deliveries));
        }
        let metrics = &self.inner.metrics;
        for frontend in Frontend::ALL {
            let index = frontend as usize;
            if bytes[index] > 0 {
                metrics.payload_out(frontend, bytes[index]);
            }
            if dropped[index] > 0 {
                metrics.dropped(frontend, dropped[index]);
            }
        }
    }

    /// Whether a member whose permissions are narrower than its subscription may have this
    /// message (and it is not a named client's delivery).
    fn may_deliver(&self, member: &fanout::Member, delivery: &Delivery) -> bool {
        member
            .caller
            .authorized()
            .permissions
            .may_receive(delivery.subject.as_str())
            && !self.is_client_subject(delivery.subject.as_str())
    }

    /// After a policy reload: every subscriber's permissions under the new policy; the
    /// subscriptions it no longer allows end (their clients are told).
    fn recheck_subscriptions(&self) {
        let fanout = &self.inner.fanout;
        for topic in fanout.topics() {
            if self.is_client_subject(&topic.key.subject) {
                continue; // a named client's delivery, not a subscription
            }
            fanout.recheck(&topic, |member| {
                let refreshed = self.refreshed(&member.caller);
                let caller = refreshed.as_ref().unwrap_or(&member.caller);
                match self.subscribe_decision(caller, &topic.key.subject) {
                    Ok(filtered) => fanout::Recheck::Keep {
                        caller: refreshed,
                        filtered,
                    },
                    Err(error) => fanout::Recheck::End(error),
                }
            });
        }
    }

    /// Counts (and audits) an operation the front-end answered itself: bad input, pings,
    /// credit, unsubscribe, auth, refusals during the drain.
    pub fn note(&self, caller: &Caller, op: Option<Op>, id: &Id, outcome: Result<(), ErrorCode>) {
        self.inner
            .metrics
            .operation_or_invalid(caller.frontend(), op, outcome);
        let audit = &self.inner.audit;
        if audit.is_on() {
            let record = match op {
                Some(op) => caller.record(op),
                None => caller.record(AuditOp::Invalid),
            };
            audit.record(record.id(id.clone()).outcome(outcome));
        }
    }

    /// The start of an operation's audit record, with its place in the audit queue (with
    /// `audit_overflow = "block"` this is where a client waits for the audit log).
    async fn audit_ticket(
        &self,
        caller: &Caller,
        op: Op,
        envelope: &Envelope,
        trace: Option<&TraceContext>,
    ) -> Option<replies::AuditTicket> {
        let audit = &self.inner.audit;
        if !audit.is_on() {
            return None;
        }
        let reservation = audit.reserve().await;
        Some(audit_ticket(reservation, caller, op, envelope, trace))
    }

    /// `audit_ticket` when its room is there at once; `None` when it would wait.
    fn try_audit_ticket(
        &self,
        caller: &Caller,
        op: Op,
        envelope: &Envelope,
        trace: Option<&TraceContext>,
    ) -> Option<Option<replies::AuditTicket>> {
        let audit = &self.inner.audit;
        if !audit.is_on() {
            return Some(None);
        }
        let reservation = audit.try_reserve()?;
        Some(Some(audit_ticket(reservation, caller, op, envelope, trace)))
    }

    /// Writes what is queued in the audit log and closes it (the end of the drain).
    pub async fn close_audit(&self) {
        if let Err(error) = self.inner.audit.shutdown().await {
            tracing::error!(%error, "the audit log did not close cleanly");
        }
    }

    /// Counts an operation that never reached the core (bad input, acks, pings).
    pub fn count(&self, frontend: Frontend, op: Option<Op>, outcome: Result<(), ErrorCode>) {
        self.inner
            .metrics
            .operation_or_invalid(frontend, op, outcome);
    }

    /// Whether `caller` may subscribe to `pattern`: `Ok(true)` when its messages must be
    /// filtered at delivery (the pattern overlaps a deny or a reserved namespace).
    fn subscribe_decision(&self, caller: &Caller, pattern: &str) -> Result<bool, GatewayError> {
        let filtered = match caller.authorized().permissions.may_subscribe(pattern) {
            SubscribeDecision::Allowed => false,
            SubscribeDecision::Filtered => true,
            SubscribeDecision::Denied => return Err(forbidden(caller, "subscribe", pattern)),
        };
        // Client subjects reach only the names' holders.
        Ok(self.client_subject_rule(caller, pattern)? || filtered)
    }

    /// A message's NATS headers: the client's, then the caller's identity (unless stamping
    /// is off), then the gateway's `traceparent` in place of the client's (whose `tracestate`
    /// goes on only when its trace continues). `None` when there are none.
    fn outgoing_headers(
        &self,
        caller: &Caller,
        headers: Option<&Headers>,
        (trace, incoming): (Option<TraceContext>, Incoming),
    ) -> Result<Option<HeaderMap>, GatewayError> {
        let stamp = caller.authorized().stamp();
        let mut map = match headers {
            // The common case: only the identity, from the map made for the caller.
            None if trace.is_none() => return Ok(stamp.map.clone()),
            None => stamp.map.clone().unwrap_or_default(),
            Some(headers) => {
                let mut map = match trace {
                    None => nats::header_map(headers)?,
                    Some(_) => nats::header_map_without(headers, |name| {
                        name.eq_ignore_ascii_case(trace::TRACEPARENT)
                            || (incoming != Incoming::Continued
                                && name.eq_ignore_ascii_case(trace::TRACESTATE))
                    })?,
                };
                durable::scope_msg_id(&mut map, caller, self.id());
                for (name, value) in &stamp.list {
                    map.insert(name.clone(), value.clone());
                }
                map
            }
        };
        if let Some(trace) = trace {
            map.insert(TRACEPARENT_NAME, trace.traceparent());
        }
        Ok(Some(map))
    }

    /// The subject to send to: the envelope's, validated, or the configured default.
    fn target_subject(&self, envelope: &Envelope) -> Result<Subject, GatewayError> {
        match &envelope.subject {
            Some(subject) => {
                validate_subject(subject, SubjectUse::Publish)?;
                Ok(subject.clone())
            }
            None if envelope.flags.to_default_subject => {
                self.inner.default_subject.clone().ok_or_else(|| {
                    GatewayError::bad_request(
                        "a message needs \"op\" and \"subject\" (this gateway has no default subject for other objects)",
                    )
                })
            }
            None => Err(GatewayError::bad_request("\"subject\" is required")),
        }
    }

    fn deadline(&self, timeout_ms: Option<u32>) -> Duration {
        let ceiling = self.inner.live.request_timeout();
        match timeout_ms {
            Some(ms) if ms > 0 => Duration::from_millis(ms as u64).min(ceiling),
            _ => ceiling,
        }
    }

    /// Flushes NATS connections so that accepted publishes leave before the process exits.
    pub async fn flush(&self) {
        // The presence entries of the names given up as the connections closed go first.
        self.inner.names.settle(Duration::from_secs(2)).await;
        self.inner.pool.flush_all().await;
        if let Some(otlp) = &self.inner.otlp {
            otlp.flush(Duration::from_secs(2)).await;
        }
    }
}

/// The most messages a topic hands its members at once.
const FAN_OUT_BATCH: usize = 64;
/// The most deliveries (messages × members) one turn of a topic's task makes.
const FAN_OUT_WORK: usize = 4096;

/// A topic's dispatcher: makes its NATS subscription, then hands every message to the
/// members and reports what the NATS client dropped. The subscription outlives the NATS
/// connection it was made on: when the pool replaces that connection, it subscribes again on
/// a healthy one, with backoff. Aborted when the topic closes, which unsubscribes.
async fn dispatch_topic(gateway: Gateway, topic: Arc<fanout::Topic>, lane: Lane) {
    let fanout = &gateway.inner.fanout;
    // Opening (and reopening) is boxed: its future is large (~1 KiB) and short-lived, and a
    // topic's task then keeps only the loop's wait for its whole life.
    let opening = Box::pin(gateway.open_subscription(lane, &topic.key));
    let mut live = match opening.await {
        Ok(live) => live,
        Err(error) => return fanout.fail(&topic, error),
    };
    fanout.bind(&topic, live.nats_sid);
    topic.set_live();
    loop {
        let message = tokio::select! {
            biased;
            () = topic.losses().notified() => {
                topic.report_losses();
                continue;
            }
            message = live.next() => message,
        };
        match message {
            Some(message) => {
                // What else has arrived goes out with it, up to a bound on the work of one
                // turn (a topic with many members takes fewer at once).
                let most = (FAN_OUT_WORK / topic.member_count().max(1)).clamp(1, FAN_OUT_BATCH);
                let mut deliveries = vec![Arc::new(nats::delivery(message))];
                while deliveries.len() < most
                    && let Some(message) = live.ready()
                {
                    deliveries.push(Arc::new(nats::delivery(message)));
                }
                gateway.fan_out(&topic, &deliveries);
            }
            None => {
                gateway.inner.metrics.nats_gaps.increment(1);
                topic.interrupted();
                let reopening = Box::pin(reopen(&gateway, &topic, lane));
                live = reopening.await;
                fanout.bind(&topic, live.nats_sid);
                tracing::info!(subject = %topic.key.subject, "subscription restored on another NATS connection");
            }
        }
    }
}

async fn reopen(gateway: &Gateway, topic: &fanout::Topic, lane: Lane) -> LiveSubscription {
    let mut delay = Duration::from_millis(50);
    loop {
        tokio::time::sleep(delay).await;
        match gateway.open_subscription(lane, &topic.key).await {
            Ok(live) => return live,
            Err(_) => delay = (delay * 2).min(Duration::from_secs(2)),
        }
    }
}

/// A subscription on one NATS connection. Its stream ends when NATS ends it or when the pool
/// retires the connection it lives on.
struct LiveSubscription {
    subscriber: Subscriber,
    retired: tokio::sync::watch::Receiver<bool>,
    /// (pool connection index, NATS sid): how the NATS client names it in its events.
    nats_sid: Option<(usize, u64)>,
}

impl LiveSubscription {
    /// A message that has already arrived, without waiting.
    fn ready(&mut self) -> Option<async_nats::Message> {
        self.subscriber.next().now_or_never().flatten()
    }

    async fn next(&mut self) -> Option<async_nats::Message> {
        tokio::select! {
            message = self.subscriber.next() => message,
            _ = self.retired.wait_for(|retired| *retired) => None,
        }
    }
}

/// An operation's trace: its context (none when the client sent no valid `traceparent` and
/// `trace_requests` is off), how the client's headers stood, and its OTLP span.
struct Traced {
    context: Option<TraceContext>,
    incoming: Incoming,
    span: Option<Box<replies::SpanStart>>,
}

/// The header the gateway's trace context goes out under.
const TRACEPARENT_NAME: async_nats::HeaderName =
    async_nats::HeaderName::from_static(trace::TRACEPARENT);

/// The span an operation's log lines carry its trace id in (debug level: a span per request
/// costs time when it is on; `RUST_LOG=ipc_gateway=debug` shows it).
fn request_span(op: &'static str, trace: Option<&TraceContext>) -> tracing::Span {
    match trace {
        Some(trace) => tracing::debug_span!("op", op, trace_id = %trace.trace_id_hex()),
        None => tracing::debug_span!("op", op),
    }
}

/// Which pool connection a client's ordered traffic uses (see `Gateway::publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lane(usize);

/// What `try_dispatch` takes: the pool connection, the request, its headers and its payload.
type PreparedRequest = (
    Arc<pool::Requester>,
    Box<replies::Pending>,
    Option<HeaderMap>,
    Bytes,
);

/// Registers a request with its connection's router and queues it with the reply subject in
/// the NATS client, if its queue has room now. If it has not, the request waits in `Waiting`.
fn try_dispatch(
    metrics: &Metrics,
    requester: Arc<pool::Requester>,
    pending: Box<replies::Pending>,
    headers: Option<HeaderMap>,
    data: Bytes,
) -> Option<Waiting> {
    let subject = pending.subject.clone();
    let (deadline, timeout) = (pending.deadline, pending.timeout);
    // `None`: answered by the router.
    let (token, reply_to) = requester.router.register(pending)?;
    let message = OutboundMessage {
        subject,
        reply: Some(reply_to),
        headers,
        payload: data,
    };
    let error = match requester.client.try_publish_message(message) {
        Ok(()) => return None,
        Err(TryPublishError::Full(message)) => {
            return Some(Waiting {
                requester,
                token,
                message,
                deadline,
                timeout,
            });
        }
        Err(TryPublishError::Failed(err)) => nats::publish_error(&err),
    };
    unsent(metrics, &requester, token, error);
    None
}

/// A registered request whose message the NATS client's queue had no room for.
struct Waiting {
    requester: Arc<pool::Requester>,
    token: u64,
    message: OutboundMessage,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Waiting {
    /// Waits for room in the NATS client's queue, up to the request's deadline.
    async fn send(self, metrics: &Metrics) {
        let client = &self.requester.client;
        let sent = tokio::time::timeout_at(self.deadline, client.publish_message(self.message));
        let error = match sent.await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => nats::publish_error(&err),
            Err(_) => GatewayError::new(
                ErrorCode::Timeout,
                format!(
                    "NATS could not take the request within {} ms",
                    self.timeout.as_millis()
                ),
            ),
        };
        unsent(metrics, &self.requester, self.token, error);
    }
}

/// A registered request that could not be sent gets `error` as its answer.
fn unsent(metrics: &Metrics, requester: &pool::Requester, token: u64, error: GatewayError) {
    if let Some(pending) = requester.router.take(token) {
        replies::finish(metrics, pending, Err(error));
    }
}

/// A publish's records (metrics, audit, OTLP span), made when its outcome is known.
struct Published<'a> {
    metrics: &'a Metrics,
    frontend: Frontend,
    started: Instant,
    context: Option<TraceContext>,
    subject: Option<Subject>,
    otlp_span: Option<Box<replies::SpanStart>>,
    audit: Option<replies::AuditTicket>,
}

impl Published<'_> {
    fn record(self, result: Result<(), GatewayError>) -> Result<(), GatewayError> {
        let outcome = result.as_ref().copied().map_err(|e| e.code);
        if let Some(otlp_span) = self.otlp_span {
            otlp_span.finish(
                self.context,
                "publish",
                self.frontend,
                self.subject,
                outcome,
            );
        }
        if let Some(audit) = self.audit {
            audit.finish(&result, self.started);
        }
        let elapsed = self.started.elapsed();
        let kind = OpKind::Op(Op::Publish);
        self.metrics
            .operation_timed(self.frontend, kind, outcome, elapsed);
        result
    }
}

/// The audit record of an operation, with its room in the audit queue.
fn audit_ticket(
    reservation: crate::telemetry::audit::Reservation,
    caller: &Caller,
    op: Op,
    envelope: &Envelope,
    trace: Option<&TraceContext>,
) -> replies::AuditTicket {
    let mut record = caller
        .record(op)
        .id(envelope.id.clone())
        .bytes_in(envelope.data.len() as u64);
    if let Some(subject) = &envelope.subject {
        record = record.subject(subject.clone());
    }
    if let Some(trace) = trace {
        record = record.trace_id(trace.trace_id_hex());
    }
    replies::AuditTicket {
        reservation,
        record,
    }
}

/// Sends idempotent requests whose connection was lost again, on any connected pool
/// connection, within their own deadline (waiting for NATS to come back if need be).
async fn retry_lost_requests(
    mut lost: tokio::sync::mpsc::UnboundedReceiver<Box<replies::Pending>>,
    pool: Arc<NatsPool>,
    metrics: Arc<Metrics>,
) {
    while let Some(mut pending) = lost.recv().await {
        let pool = pool.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            metrics.retries.increment(1);
            if pending.attempts > 0 {
                // Waiting for its service to come back: back off, 25 ms doubling to 400 ms.
                let backoff = Duration::from_millis(25 << pending.attempts.min(4));
                let left = pending
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                tokio::time::sleep(backoff.min(left)).await;
            }
            pending.attempts += 1;
            let requester = loop {
                if let Ok(requester) = pool.requester() {
                    break requester;
                }
                if tokio::time::Instant::now() >= pending.deadline {
                    let error = GatewayError::new(
                        ErrorCode::Unavailable,
                        "the NATS connection was lost and no other came up before the deadline",
                    );
                    return replies::finish(&metrics, pending, Err(error));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let Some(resend) = pending.resend.clone() else {
                return;
            };
            let sending = try_dispatch(&metrics, requester, pending, resend.headers, resend.data);
            if let Some(waiting) = sending {
                waiting.send(&metrics).await;
            }
        });
    }
}

/// The `FORBIDDEN` a policy refusal is: it names the op, the subject and who asked.
fn forbidden(caller: &Caller, op: &str, subject: &str) -> GatewayError {
    GatewayError::new(
        ErrorCode::Forbidden,
        format!(
            "{} may not {op} {subject:?} (policy)",
            caller.authorized().who()
        ),
    )
}

/// Hands one answer to a waiting future.
struct OneshotSink(
    std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Result<Reply, GatewayError>>>>,
);

impl ReplySink for OneshotSink {
    fn deliver(&self, _id: Id, result: Result<Reply, GatewayError>) -> bool {
        let sender = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        sender.is_some_and(|sender| sender.send(result).is_ok())
    }
}
