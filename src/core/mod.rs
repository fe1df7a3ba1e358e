//! The core every front-end calls: `request`, `publish` and `subscribe`, implemented once, with
//! the same validation, limits, error codes and metrics whoever the client is. A `Gateway` is
//! cheap to clone (an `Arc` inside); there is one per process.

pub mod budget;
pub mod pool;
pub mod shutdown;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, Subject, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::Config;
use crate::ops::metrics::{Frontend, Metrics};
use crate::protocol::subject::{SubjectUse, validate_queue_group, validate_subject};
use crate::protocol::{Envelope, ErrorCode, GatewayError, Op};
use budget::ByteBudget;
use pool::NatsPool;
use shutdown::Shutdown;

/// A subject no service listens on; requests to it make a cheap round trip to the server.
const SYNC_SUBJECT: &str = "_IPC_GATEWAY.sync";

/// A successful request's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub data: Bytes,
    pub headers: Option<HeaderMap>,
}

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    pool: Arc<NatsPool>,
    budget: Arc<ByteBudget>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    default_subject: Option<Subject>,
    listener_up: AtomicBool,
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
    pub async fn new(config: Config) -> Result<Gateway, String> {
        let metrics = Metrics::new();
        let pool = NatsPool::connect(
            config.nats_servers()?,
            config.nats_connections,
            metrics.nats_slow_consumer.clone(),
        )
        .await?;
        // Clients that arrive in the first milliseconds should not see UNAVAILABLE just
        // because the first connection is still being made.
        if !pool.wait_connected(Duration::from_secs(2)).await {
            tracing::warn!(url = %config.nats_url, "NATS is not reachable yet; starting anyway, /ready is 503 until it is");
        }
        metrics.nats_pool_size.set(pool.size() as f64);
        let budget = ByteBudget::new(config.max_inflight_bytes, metrics.inflight_bytes.clone());
        let default_subject = config.default_subject.clone().map(Subject::from);
        Ok(Gateway {
            inner: Arc::new(Inner {
                config,
                pool,
                budget,
                metrics,
                shutdown: Shutdown::default(),
                default_subject,
                listener_up: AtomicBool::new(false),
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
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

    /// Refreshes the gauges that are read from state rather than counted.
    pub fn refresh_gauges(&self) {
        let metrics = &self.inner.metrics;
        metrics
            .nats_connected
            .set(self.inner.pool.connected() as f64);
        metrics
            .nats_replaced
            .absolute(self.inner.pool.replaced() as u64);
        metrics.run_upkeep();
    }

    /// Sends a request and waits for exactly one answer: the reply, or an error no later than
    /// the request's deadline (the client's `timeout_ms`, capped by the configured ceiling).
    pub async fn request(
        &self,
        frontend: Frontend,
        envelope: Envelope,
    ) -> Result<Reply, GatewayError> {
        let started = Instant::now();
        let metrics = &self.inner.metrics;
        metrics.payload_in(frontend, envelope.data.len());
        let result = self.send_request(envelope).await;
        metrics.operation(
            frontend,
            Op::Request,
            result.as_ref().map(|_| ()).map_err(|e| e.code),
        );
        metrics.request_latency(frontend, started.elapsed().as_secs_f64());
        if let Ok(reply) = &result {
            metrics.payload_out(frontend, reply.data.len());
        }
        result
    }

    async fn send_request(&self, envelope: Envelope) -> Result<Reply, GatewayError> {
        let subject = self.target_subject(&envelope)?;
        let timeout = self.deadline(envelope.timeout_ms);
        let _permit = self.inner.budget.try_acquire(envelope.data.len())?;
        let pool::Picked {
            client, mut lost, ..
        } = self.inner.pool.client()?;
        let _inflight = InflightGuard::new(&self.inner.metrics);
        // The deadline is ours, not async-nats's: it also covers the wait for room in the
        // client's command queue, so no request outlives it.
        let mut request = async_nats::Request::new()
            .payload(envelope.data)
            .timeout(None);
        if let Some(headers) = envelope.headers {
            request = request.headers(headers);
        }
        let answer = tokio::select! {
            biased;
            answer = client.send_request(subject.clone(), request) => answer,
            _ = tokio::time::sleep(timeout) => {
                return Err(GatewayError::new(
                    ErrorCode::Timeout,
                    format!("no reply on {subject} within {} ms", timeout.as_millis()),
                ));
            }
            // The reply would have come on the connection that was just lost.
            _ = lost.changed() => {
                return Err(GatewayError::new(
                    ErrorCode::Unavailable,
                    "the NATS connection was lost while waiting for the reply; the service may or may not have handled the request",
                ));
            }
            _ = self.inner.shutdown.drain_expired() => {
                return Err(GatewayError::new(
                    ErrorCode::Unavailable,
                    "the gateway is shutting down and the drain time ran out",
                ));
            }
        };
        match answer {
            Ok(message) => Ok(Reply {
                data: message.payload,
                headers: message.headers,
            }),
            Err(err) => Err(match err.kind() {
                RequestErrorKind::TimedOut => GatewayError::new(
                    ErrorCode::Timeout,
                    format!("no reply on {subject} within {} ms", timeout.as_millis()),
                ),
                RequestErrorKind::NoResponders => GatewayError::new(
                    ErrorCode::NoResponders,
                    format!("no service listens on {subject}"),
                ),
                RequestErrorKind::InvalidSubject => {
                    GatewayError::bad_request(format!("NATS refused subject {subject}"))
                }
                RequestErrorKind::MaxPayloadExceeded => GatewayError::new(
                    ErrorCode::TooLarge,
                    format!("NATS refused the payload: {err}"),
                ),
                RequestErrorKind::Other => GatewayError::new(
                    ErrorCode::Unavailable,
                    format!("NATS connection failed: {err}"),
                ),
            }),
        }
    }

    /// Publishes a message. Success means NATS's client accepted it for sending. Publishes go
    /// through the client's `lane` (one pool connection), so that messages from one client
    /// reach NATS in the order it sent them.
    pub async fn publish(
        &self,
        frontend: Frontend,
        lane: Lane,
        envelope: Envelope,
    ) -> Result<(), GatewayError> {
        let metrics = &self.inner.metrics;
        metrics.payload_in(frontend, envelope.data.len());
        let result = self.send_publish(lane, envelope).await;
        metrics.operation(
            frontend,
            Op::Publish,
            result.as_ref().copied().map_err(|e| e.code),
        );
        result
    }

    async fn send_publish(&self, lane: Lane, envelope: Envelope) -> Result<(), GatewayError> {
        let subject = self.target_subject(&envelope)?;
        let _permit = self.inner.budget.try_acquire(envelope.data.len())?;
        let client = self.inner.pool.client_on(lane.0)?.client;
        let sent = match envelope.headers {
            Some(headers) => {
                client
                    .publish_with_headers(subject, headers, envelope.data)
                    .await
            }
            None => client.publish(subject, envelope.data).await,
        };
        sent.map_err(|err| match err.kind() {
            async_nats::client::PublishErrorKind::MaxPayloadExceeded => GatewayError::new(
                ErrorCode::TooLarge,
                format!("NATS refused the payload: {err}"),
            ),
            _ => GatewayError::new(
                ErrorCode::Unavailable,
                format!("NATS publish failed: {err}"),
            ),
        })
    }

    /// Opens a NATS subscription (wildcards allowed, optional queue group). The caller owns
    /// the `Subscriber`: dropping it unsubscribes.
    pub async fn subscribe(
        &self,
        frontend: Frontend,
        lane: Lane,
        subject: &Subject,
        queue: Option<&str>,
    ) -> Result<Subscription, GatewayError> {
        let result = self.open_subscription(lane, subject, queue).await;
        self.inner.metrics.operation(
            frontend,
            Op::Subscribe,
            result.as_ref().map(|_| ()).map_err(|e| e.code),
        );
        result
    }

    async fn open_subscription(
        &self,
        lane: Lane,
        subject: &Subject,
        queue: Option<&str>,
    ) -> Result<Subscription, GatewayError> {
        validate_subject(subject, SubjectUse::Subscribe)?;
        if let Some(queue) = queue {
            validate_queue_group(queue)?;
        }
        let pool::Picked {
            client, retired, ..
        } = self.inner.pool.client_on(lane.0)?;
        let subscribed = match queue {
            Some(queue) => {
                client
                    .queue_subscribe(subject.clone(), queue.to_owned())
                    .await
            }
            None => client.subscribe(subject.clone()).await,
        };
        let subscriber = subscribed.map_err(|err| {
            GatewayError::new(
                ErrorCode::Unavailable,
                format!("NATS subscribe failed: {err}"),
            )
        })?;
        // The acknowledgement promises that messages published after it are delivered, so
        // wait until the server has processed the SUB. `flush()` only writes the socket; a
        // request on the same connection to a subject nobody serves comes back (as "no
        // responders") only after the server has handled everything sent before it.
        let sync = async_nats::Request::new().timeout(None);
        let confirmed = tokio::time::timeout(
            self.inner.config.request_timeout(),
            client.send_request(SYNC_SUBJECT, sync),
        );
        let Ok(confirmed) = confirmed.await else {
            return Err(GatewayError::new(
                ErrorCode::Unavailable,
                "NATS did not confirm the subscription in time",
            ));
        };
        match confirmed {
            Ok(_) => Ok(Subscription {
                subscriber,
                retired,
            }),
            Err(err) if err.kind() == RequestErrorKind::NoResponders => Ok(Subscription {
                subscriber,
                retired,
            }),
            Err(err) => Err(GatewayError::new(
                ErrorCode::Unavailable,
                format!("NATS did not confirm the subscription: {err}"),
            )),
        }
    }

    /// Opens a subscription again after its NATS connection went away (not counted as a new
    /// client operation).
    pub async fn resubscribe(
        &self,
        lane: Lane,
        subject: &Subject,
        queue: Option<&str>,
    ) -> Result<Subscription, GatewayError> {
        self.open_subscription(lane, subject, queue).await
    }

    /// A lane for a new client: its publishes and subscriptions share one pool connection.
    pub fn new_lane(&self) -> Lane {
        Lane(self.inner.pool.next_lane())
    }

    /// Counts an operation that never reached the core (bad input, acks, pings).
    pub fn count(&self, frontend: Frontend, op: Option<Op>, outcome: Result<(), ErrorCode>) {
        self.inner
            .metrics
            .operation_or_invalid(frontend, op, outcome);
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
        let ceiling = self.inner.config.request_timeout();
        match timeout_ms {
            Some(ms) if ms > 0 => Duration::from_millis(ms as u64).min(ceiling),
            _ => ceiling,
        }
    }

    /// Flushes NATS connections so that accepted publishes leave before the process exits.
    pub async fn flush(&self) {
        self.inner.pool.flush_all().await;
    }
}

/// An open NATS subscription. Its stream ends when NATS ends it or when the pool retires the
/// connection it lives on; dropping it unsubscribes.
pub struct Subscription {
    subscriber: Subscriber,
    retired: tokio::sync::watch::Receiver<bool>,
}

impl Subscription {
    pub async fn next(&mut self) -> Option<async_nats::Message> {
        tokio::select! {
            message = self.subscriber.next() => message,
            _ = self.retired.wait_for(|retired| *retired) => None,
        }
    }
}

/// Which pool connection a client's ordered traffic uses (see `Gateway::publish`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane(usize);

/// Keeps the in-flight gauge right whether a request finishes or is cancelled.
struct InflightGuard<'a>(&'a Metrics);

impl<'a> InflightGuard<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.inflight_requests.increment(1.0);
        InflightGuard(metrics)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight_requests.decrement(1.0);
    }
}
