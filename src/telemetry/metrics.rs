//! Prometheus metrics for one gateway. Each gateway owns its recorder (no process-global
//! state, so tests in one process do not mix their numbers), and hot paths hold pre-registered
//! handles: recording is an atomic add, never a registry lookup.

use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::protocol::{ErrorCode, Frontend, Op};

const OPS: [Op; 11] = [
    Op::Request,
    Op::Publish,
    Op::Subscribe,
    Op::Unsubscribe,
    Op::Ping,
    Op::Credit,
    Op::Auth,
    Op::Register,
    Op::Unregister,
    Op::Presence,
    Op::PresenceWatch,
];
const OUTCOMES: usize = ErrorCode::ALL.len() + 1;

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Request => "request",
        Op::Publish => "publish",
        Op::Subscribe => "subscribe",
        Op::Unsubscribe => "unsubscribe",
        Op::Ping => "ping",
        Op::Credit => "credit",
        Op::Auth => "auth",
        Op::Register => "register",
        Op::Unregister => "unregister",
        Op::Presence => "presence",
        Op::PresenceWatch => "presence_watch",
    }
}

fn outcome_index(outcome: Result<(), ErrorCode>) -> usize {
    match outcome {
        Ok(()) => 0,
        Err(code) => code as usize,
    }
}

fn outcome_name(index: usize) -> &'static str {
    if index == 0 {
        "ok"
    } else {
        ErrorCode::ALL[index - 1].as_str()
    }
}

/// Handles for one front-end's labelled series.
struct FrontendMetrics {
    connections: Gauge,
    connections_total: Counter,
    connections_rejected: Counter,
    request_seconds: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    dropped: Counter,
    subscriptions: Gauge,
    slow_disconnects: Counter,
    idle_disconnects: Counter,
    heartbeat_disconnects: Counter,
}

/// All metrics of one gateway.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    frontends: [FrontendMetrics; 3],
    /// `requests_total{frontend,op,outcome}`, registered on first use so that /metrics lists
    /// only the series that happened.
    operations: Vec<OnceLock<Counter>>,
    pub inflight_requests: Gauge,
    pub inflight_bytes: Gauge,
    pub nats_connected: Gauge,
    pub nats_pool_size: Gauge,
    /// Shared NATS subscriptions (one per subject and queue group with a client on it).
    pub nats_subscriptions: Gauge,
    /// Times a shared subscription's NATS connection was cut and its clients told of a gap.
    pub nats_gaps: Counter,
    pub nats_slow_consumer: Counter,
    pub nats_replaced: Counter,
    pub late_replies: Counter,
    pub reply_mismatches: Counter,
    /// OTLP spans dropped: the export queue was full, or the export failed.
    pub trace_spans_dropped: Counter,
    pub retries: Counter,
    policy_reloads: [Counter; 2],
    /// Audit log (telemetry::audit): records written, records lost (queue full in drop mode,
    /// or unwritable at shutdown), failed writes, and queue slots in use.
    pub audit_records: Counter,
    pub audit_lost: Counter,
    pub audit_write_errors: Counter,
    pub audit_queue: Gauge,
}

const METADATA: Metadata<'static> = Metadata::new("ipc_gateway", metrics::Level::INFO, None);

/// Request latency buckets in seconds: 50 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("ipc_gateway_request_duration_seconds".into()),
                LATENCY_BUCKETS,
            )
            .expect("latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let frontends = Frontend::ALL.map(|frontend| {
            let labels = || vec![Label::new("frontend", frontend.as_str())];
            let with = |extra: (&'static str, &'static str)| {
                let mut l = labels();
                l.push(Label::new(extra.0, extra.1));
                l
            };
            FrontendMetrics {
                connections: gauge(&recorder, "ipc_gateway_connections", labels()),
                connections_total: counter(&recorder, "ipc_gateway_connections_total", labels()),
                connections_rejected: counter(
                    &recorder,
                    "ipc_gateway_connections_rejected_total",
                    labels(),
                ),
                request_seconds: recorder.register_histogram(
                    &Key::from_parts("ipc_gateway_request_duration_seconds", labels()),
                    &METADATA,
                ),
                bytes_in: counter(
                    &recorder,
                    "ipc_gateway_payload_bytes_total",
                    with(("direction", "in")),
                ),
                bytes_out: counter(
                    &recorder,
                    "ipc_gateway_payload_bytes_total",
                    with(("direction", "out")),
                ),
                dropped: counter(&recorder, "ipc_gateway_dropped_messages_total", labels()),
                subscriptions: gauge(&recorder, "ipc_gateway_subscriptions", labels()),
                slow_disconnects: counter(
                    &recorder,
                    "ipc_gateway_disconnects_total",
                    with(("reason", "slow_client")),
                ),
                idle_disconnects: counter(
                    &recorder,
                    "ipc_gateway_disconnects_total",
                    with(("reason", "idle")),
                ),
                heartbeat_disconnects: counter(
                    &recorder,
                    "ipc_gateway_disconnects_total",
                    with(("reason", "heartbeat")),
                ),
            }
        });
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(name.into(), None, help.into());
        };
        describe(
            "ipc_gateway_requests_total",
            "Client operations by front-end, op and outcome code.",
        );
        describe(
            "ipc_gateway_connections_total",
            "Client connections accepted.",
        );
        describe(
            "ipc_gateway_connections_rejected_total",
            "Client connections refused at the connection limit.",
        );
        describe(
            "ipc_gateway_payload_bytes_total",
            "Payload bytes from clients (in) and to clients (out).",
        );
        describe(
            "ipc_gateway_dropped_messages_total",
            "Subscription messages dropped because a client read too slowly.",
        );
        describe(
            "ipc_gateway_nats_slow_consumer_total",
            "Subscription messages the NATS client dropped before the gateway queued them (at least this many).",
        );
        describe(
            "ipc_gateway_nats_gaps_total",
            "Times a shared subscription's NATS connection was cut and its clients were told that messages may be lost (dropped notices with gap).",
        );
        describe(
            "ipc_gateway_disconnects_total",
            "Connections the gateway closed: slow_client (stopped reading past the stall time), idle, or heartbeat (a WebSocket that missed two pongs).",
        );
        describe(
            "ipc_gateway_retries_total",
            "Idempotent requests sent again because their NATS connection was lost.",
        );
        describe(
            "ipc_gateway_late_replies_total",
            "Answers discarded because nobody waited for them: replies after their request's deadline, and answers for a client that had gone.",
        );
        describe(
            "ipc_gateway_policy_reloads_total",
            "Policy reloads (SIGHUP) by outcome: ok, or failed (the file did not load; the policy in force stayed).",
        );
        describe(
            "ipc_gateway_reply_mismatches_total",
            "Messages on the gateway's reply subjects that no request was sent with (guessed, forged or malformed subjects): they answer nothing.",
        );
        describe(
            "ipc_gateway_trace_spans_dropped_total",
            "OpenTelemetry spans not exported: the export queue was full, or the collector did not take them.",
        );
        describe(
            "ipc_gateway_nats_replaced_total",
            "Pool connections replaced because they stayed down while NATS was reachable.",
        );
        describe(
            "ipc_gateway_audit_records_total",
            "Audit records written to the audit log (audit_lost notices not included).",
        );
        describe(
            "ipc_gateway_audit_records_lost_total",
            "Audit records lost: the queue was full (overflow drop), or they could not be written at shutdown.",
        );
        describe(
            "ipc_gateway_audit_write_errors_total",
            "Failed attempts to write, rotate or reopen the audit log (writing is retried).",
        );
        let describe_gauge = |name: &'static str, help: &'static str| {
            recorder.describe_gauge(name.into(), None, help.into());
        };
        describe_gauge("ipc_gateway_connections", "Client connections open now.");
        describe_gauge(
            "ipc_gateway_subscriptions",
            "Client subscriptions open now.",
        );
        describe_gauge(
            "ipc_gateway_inflight_requests",
            "Requests waiting for NATS now.",
        );
        describe_gauge(
            "ipc_gateway_inflight_bytes",
            "Payload bytes held by in-flight requests and publishes.",
        );
        describe_gauge(
            "ipc_gateway_nats_connected",
            "Pool connections to NATS that are connected.",
        );
        describe_gauge(
            "ipc_gateway_nats_pool_size",
            "Pool connections to NATS configured.",
        );
        describe_gauge(
            "ipc_gateway_nats_subscriptions",
            "Shared NATS subscriptions: one per subject pattern and queue group that some client subscribes to.",
        );
        describe_gauge(
            "ipc_gateway_audit_queue",
            "Audit queue slots in use: records waiting for the writer, and reservations (overflow block) not yet written.",
        );
        recorder.describe_histogram(
            "ipc_gateway_request_duration_seconds".into(),
            Some(metrics::Unit::Seconds),
            "Request latency inside the gateway's core, from the decoded request to its answer."
                .into(),
        );
        Arc::new(Metrics {
            inflight_requests: gauge(&recorder, "ipc_gateway_inflight_requests", vec![]),
            inflight_bytes: gauge(&recorder, "ipc_gateway_inflight_bytes", vec![]),
            nats_connected: gauge(&recorder, "ipc_gateway_nats_connected", vec![]),
            nats_pool_size: gauge(&recorder, "ipc_gateway_nats_pool_size", vec![]),
            nats_subscriptions: gauge(&recorder, "ipc_gateway_nats_subscriptions", vec![]),
            nats_gaps: counter(&recorder, "ipc_gateway_nats_gaps_total", vec![]),
            nats_slow_consumer: counter(&recorder, "ipc_gateway_nats_slow_consumer_total", vec![]),
            nats_replaced: counter(&recorder, "ipc_gateway_nats_replaced_total", vec![]),
            late_replies: counter(&recorder, "ipc_gateway_late_replies_total", vec![]),
            reply_mismatches: counter(&recorder, "ipc_gateway_reply_mismatches_total", vec![]),
            trace_spans_dropped: counter(
                &recorder,
                "ipc_gateway_trace_spans_dropped_total",
                vec![],
            ),
            retries: counter(&recorder, "ipc_gateway_retries_total", vec![]),
            policy_reloads: ["ok", "failed"].map(|outcome| {
                counter(
                    &recorder,
                    "ipc_gateway_policy_reloads_total",
                    vec![Label::new("outcome", outcome)],
                )
            }),
            audit_records: counter(&recorder, "ipc_gateway_audit_records_total", vec![]),
            audit_lost: counter(&recorder, "ipc_gateway_audit_records_lost_total", vec![]),
            audit_write_errors: counter(&recorder, "ipc_gateway_audit_write_errors_total", vec![]),
            audit_queue: gauge(&recorder, "ipc_gateway_audit_queue", vec![]),
            operations: (0..Frontend::ALL.len() * (OPS.len() + 1) * OUTCOMES)
                .map(|_| OnceLock::new())
                .collect(),
            recorder,
            handle,
            frontends,
        })
    }

    fn frontend(&self, frontend: Frontend) -> &FrontendMetrics {
        &self.frontends[frontend as usize]
    }

    /// Counts one finished operation by its outcome.
    pub fn operation(&self, frontend: Frontend, op: Op, outcome: Result<(), ErrorCode>) {
        self.operation_or_invalid(frontend, Some(op), outcome);
    }

    /// Counts an operation; `None` is input that could not be decoded into any op.
    pub fn operation_or_invalid(
        &self,
        frontend: Frontend,
        op: Option<Op>,
        outcome: Result<(), ErrorCode>,
    ) {
        let op_index = op
            .and_then(|op| OPS.iter().position(|o| *o == op))
            .unwrap_or(OPS.len());
        let outcome = outcome_index(outcome);
        let index = (frontend as usize * (OPS.len() + 1) + op_index) * OUTCOMES + outcome;
        self.operations[index]
            .get_or_init(|| {
                counter(
                    &self.recorder,
                    "ipc_gateway_requests_total",
                    vec![
                        Label::new("frontend", frontend.as_str()),
                        Label::new("op", op.map_or("invalid", op_name)),
                        Label::new("outcome", outcome_name(outcome)),
                    ],
                )
            })
            .increment(1);
    }

    pub fn request_latency(&self, frontend: Frontend, seconds: f64) {
        self.frontend(frontend).request_seconds.record(seconds);
    }

    pub fn connection_opened(&self, frontend: Frontend) {
        let m = self.frontend(frontend);
        m.connections.increment(1.0);
        m.connections_total.increment(1);
    }

    pub fn connection_closed(&self, frontend: Frontend) {
        self.frontend(frontend).connections.decrement(1.0);
    }

    pub fn connection_rejected(&self, frontend: Frontend) {
        self.frontend(frontend).connections_rejected.increment(1);
    }

    pub fn payload_in(&self, frontend: Frontend, bytes: usize) {
        self.frontend(frontend).bytes_in.increment(bytes as u64);
    }

    pub fn payload_out(&self, frontend: Frontend, bytes: usize) {
        self.frontend(frontend).bytes_out.increment(bytes as u64);
    }

    pub fn dropped(&self, frontend: Frontend, count: u64) {
        self.frontend(frontend).dropped.increment(count);
    }

    /// A client that stopped reading was disconnected after the stall time.
    pub fn slow_client_disconnected(&self, frontend: Frontend) {
        self.frontend(frontend).slow_disconnects.increment(1);
    }

    /// An idle connection was closed after the idle timeout.
    pub fn idle_disconnected(&self, frontend: Frontend) {
        self.frontend(frontend).idle_disconnects.increment(1);
    }

    /// A WebSocket that answered none of two pings was closed.
    pub fn heartbeat_disconnected(&self, frontend: Frontend) {
        self.frontend(frontend).heartbeat_disconnects.increment(1);
    }

    pub fn subscription_opened(&self, frontend: Frontend) {
        self.frontend(frontend).subscriptions.increment(1.0);
    }

    pub fn subscription_closed(&self, frontend: Frontend) {
        self.frontend(frontend).subscriptions.decrement(1.0);
    }

    /// How many circuit breaker groups are in the state named `state` (per-group detail is
    /// on `/status`; a series per group would grow with every subject clients use).
    pub fn breakers_in_state(&self, state: &'static str, count: usize) {
        let key = Key::from_parts("ipc_gateway_breakers", vec![Label::new("state", state)]);
        self.recorder
            .register_gauge(&key, &METADATA)
            .set(count as f64);
    }

    /// Counts a policy reload that loaded (`true`) or kept the old policy (`false`).
    pub fn policy_reload(&self, loaded: bool) {
        self.policy_reloads[usize::from(!loaded)].increment(1);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples; call every few seconds so they do not pile up.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn counter(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Counter {
    recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
}

fn gauge(recorder: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Gauge {
    recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_render_with_their_labels() {
        let metrics = Metrics::new();
        metrics.operation(Frontend::Uds, Op::Request, Ok(()));
        metrics.operation(Frontend::Uds, Op::Request, Err(ErrorCode::NoResponders));
        metrics.operation(Frontend::Uds, Op::Request, Err(ErrorCode::NoResponders));
        metrics.request_latency(Frontend::Uds, 0.001);
        let text = metrics.render();
        assert!(text.contains(
            "ipc_gateway_requests_total{frontend=\"uds\",op=\"request\",outcome=\"NO_RESPONDERS\"} 2"
        ), "{text}");
        assert!(text.contains(
            "ipc_gateway_requests_total{frontend=\"uds\",op=\"request\",outcome=\"ok\"} 1"
        ));
        assert!(text.contains("ipc_gateway_request_duration_seconds_bucket"));
    }
}
