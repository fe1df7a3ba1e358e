//! Prometheus metrics for one gateway. Each gateway owns its recorder (no process-global
//! state, so tests in one process do not mix their numbers), and hot paths hold pre-registered
//! handles: recording is an atomic add, never a registry lookup.
//!
//! Every label value is one of a fixed set (front-ends, ops, error codes, reasons, states):
//! nothing a client sends (a subject, a name, an identity) ever becomes a label, so the number
//! of series is bounded whatever the traffic. `docs/operations.md` lists every family, and
//! `tests/it/ops_metrics.rs` checks the list against a real gateway's `/metrics`.
//!
//! Operations are counted and timed per front-end, op and outcome: one slot per combination,
//! its counter and histogram registered on first use (so `/metrics` shows only what happened)
//! and then kept, so the hot path indexes an array and does atomic adds, with no label
//! allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::protocol::{ErrorCode, Frontend, Op};

const OPS: [Op; 11] = Op::ALL;
const OUTCOMES: usize = ErrorCode::ALL.len() + 1;
/// The `op` label values beyond the protocol's ops (see `OpKind`).
const EXTRA_OPS: [&str; 3] = ["publish_durable", "subscribe_replay", "invalid"];
const OP_KINDS: usize = OPS.len() + EXTRA_OPS.len();

/// What an operation is counted and timed as: the `op` label. A durable publish and a
/// replaying subscribe are ops of their own here (they cost a JetStream round trip, not a
/// NATS one), and input that decoded into no op is `invalid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Op(Op),
    PublishDurable,
    SubscribeReplay,
    Invalid,
}

impl OpKind {
    fn index(self) -> usize {
        match self {
            OpKind::Op(op) => OPS.iter().position(|o| *o == op).unwrap_or(OPS.len() + 2),
            OpKind::PublishDurable => OPS.len(),
            OpKind::SubscribeReplay => OPS.len() + 1,
            OpKind::Invalid => OPS.len() + 2,
        }
    }
}

fn op_label(index: usize) -> &'static str {
    match OPS.get(index) {
        Some(op) => op.as_str(),
        None => EXTRA_OPS[index - OPS.len()],
    }
}

impl From<Option<Op>> for OpKind {
    fn from(op: Option<Op>) -> OpKind {
        op.map_or(OpKind::Invalid, OpKind::Op)
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

/// A counter whose total can also be read back (for `/status`): one more atomic add.
pub struct Tally {
    counter: Counter,
    total: AtomicU64,
}

impl Tally {
    fn new(counter: Counter) -> Tally {
        Tally {
            counter,
            total: AtomicU64::new(0),
        }
    }

    pub fn increment(&self, n: u64) {
        self.counter.increment(n);
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// A gauge whose value can also be read back (for `/status`).
pub struct Level {
    gauge: Gauge,
    /// The value as `f64` bits.
    value: AtomicU64,
}

impl Level {
    fn new(gauge: Gauge) -> Level {
        Level {
            gauge,
            value: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn set(&self, value: f64) {
        self.gauge.set(value);
        self.value.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn increment(&self, by: f64) {
        self.add(by);
    }

    pub fn decrement(&self, by: f64) {
        self.add(-by);
    }

    fn add(&self, by: f64) {
        let mut current = self.value.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + by).to_bits();
            match self.value.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.gauge.increment(by);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.value.load(Ordering::Relaxed))
    }
}

/// One (front-end, op, outcome) combination's series, each registered on first use.
#[derive(Default)]
struct OperationSeries {
    count: OnceLock<Counter>,
    seconds: OnceLock<Histogram>,
}

/// Handles for one front-end's labelled series.
struct FrontendMetrics {
    connections: Level,
    connections_total: Counter,
    connections_rejected: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    dropped: Counter,
    subscriptions: Level,
    slow_disconnects: Counter,
    idle_disconnects: Counter,
    heartbeat_disconnects: Counter,
}

/// All metrics of one gateway.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    frontends: [FrontendMetrics; 3],
    /// `requests_total` and `request_duration_seconds` by `{frontend,op,outcome}`, indexed by
    /// `operation_index`.
    operations: Vec<OperationSeries>,
    pub inflight_requests: Gauge,
    pub inflight_bytes: Gauge,
    pub nats_connected: Gauge,
    pub nats_pool_size: Gauge,
    /// Shared NATS subscriptions (one per subject and queue group with a client on it).
    pub nats_subscriptions: Level,
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
    /// 1 while the last policy reload loaded (or none was tried), 0 after one that failed.
    policy_reload_ok: Gauge,
    /// 1 when `/ready` would answer 200; refreshed with the other state gauges.
    pub ready: Gauge,
    /// Audit log (telemetry::audit): records written, records lost (queue full in drop mode,
    /// or unwritable at shutdown), failed writes, and queue slots in use.
    pub audit_records: Counter,
    pub audit_lost: Tally,
    pub audit_write_errors: Counter,
    pub audit_queue: Level,
}

const METADATA: Metadata<'static> = Metadata::new("ipc_gateway", metrics::Level::INFO, None);

/// Operation latency buckets in seconds: 50 µs to 10 s (slower lands in `+Inf`).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
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
                connections: Level::new(gauge(&recorder, "ipc_gateway_connections", labels())),
                connections_total: counter(&recorder, "ipc_gateway_connections_total", labels()),
                connections_rejected: counter(
                    &recorder,
                    "ipc_gateway_connections_rejected_total",
                    labels(),
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
                subscriptions: Level::new(gauge(&recorder, "ipc_gateway_subscriptions", labels())),
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
            "ipc_gateway_tls_cert_expiry_timestamp_seconds",
            "Not-after of the TLS certificate each port serves, in seconds since the Unix epoch.",
        );
        describe_gauge(
            "ipc_gateway_ready",
            "1 when /ready answers 200 (NATS connected, listener up, not shutting down), else 0.",
        );
        describe_gauge(
            "ipc_gateway_policy_last_reload_successful",
            "1 unless the last policy reload failed (the policy in force then is the older one).",
        );
        describe_gauge(
            "ipc_gateway_breakers",
            "Circuit breaker groups in each state (closed, open, half_open).",
        );
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
            "Operation latency inside the gateway's core by front-end, op and outcome, from the decoded command to its answer."
                .into(),
        );
        Arc::new(Metrics {
            inflight_requests: gauge(&recorder, "ipc_gateway_inflight_requests", vec![]),
            inflight_bytes: gauge(&recorder, "ipc_gateway_inflight_bytes", vec![]),
            nats_connected: gauge(&recorder, "ipc_gateway_nats_connected", vec![]),
            nats_pool_size: gauge(&recorder, "ipc_gateway_nats_pool_size", vec![]),
            nats_subscriptions: Level::new(gauge(
                &recorder,
                "ipc_gateway_nats_subscriptions",
                vec![],
            )),
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
            audit_lost: Tally::new(counter(
                &recorder,
                "ipc_gateway_audit_records_lost_total",
                vec![],
            )),
            audit_write_errors: counter(&recorder, "ipc_gateway_audit_write_errors_total", vec![]),
            audit_queue: Level::new(gauge(&recorder, "ipc_gateway_audit_queue", vec![])),
            policy_reload_ok: {
                let ok = gauge(
                    &recorder,
                    "ipc_gateway_policy_last_reload_successful",
                    vec![],
                );
                ok.set(1.0);
                ok
            },
            ready: gauge(&recorder, "ipc_gateway_ready", vec![]),
            operations: (0..Frontend::ALL.len() * OP_KINDS * OUTCOMES)
                .map(|_| OperationSeries::default())
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

    /// Counts an operation; `None` is input that could not be decoded into any op. Used for
    /// what the front-end answers itself (pings, credit, bad input): nothing to time.
    pub fn operation_or_invalid(
        &self,
        frontend: Frontend,
        op: Option<Op>,
        outcome: Result<(), ErrorCode>,
    ) {
        self.series(frontend, op.into(), outcome).0.increment(1);
    }

    /// Counts one finished operation and records how long it took in the core.
    pub fn operation_timed(
        &self,
        frontend: Frontend,
        op: OpKind,
        outcome: Result<(), ErrorCode>,
        took: Duration,
    ) {
        let (count, index) = self.series(frontend, op, outcome);
        count.increment(1);
        self.operations[index]
            .seconds
            .get_or_init(|| {
                let (frontend, op, outcome) = operation_labels(index);
                self.recorder.register_histogram(
                    &Key::from_parts(
                        "ipc_gateway_request_duration_seconds",
                        vec![
                            Label::new("frontend", frontend),
                            Label::new("op", op),
                            Label::new("outcome", outcome),
                        ],
                    ),
                    &METADATA,
                )
            })
            .record(took.as_secs_f64());
    }

    /// The counter of one combination (registered on first use), and its index.
    fn series(
        &self,
        frontend: Frontend,
        op: OpKind,
        outcome: Result<(), ErrorCode>,
    ) -> (&Counter, usize) {
        let index = (frontend as usize * OP_KINDS + op.index()) * OUTCOMES + outcome_index(outcome);
        let count = self.operations[index].count.get_or_init(|| {
            let (frontend, op, outcome) = operation_labels(index);
            counter(
                &self.recorder,
                "ipc_gateway_requests_total",
                vec![
                    Label::new("frontend", frontend),
                    Label::new("op", op),
                    Label::new("outcome", outcome),
                ],
            )
        });
        (count, index)
    }

    /// Client connections open now on `frontend`.
    pub fn connections_open(&self, frontend: Frontend) -> u64 {
        self.frontend(frontend).connections.get().max(0.0) as u64
    }

    /// Client subscriptions open now on `frontend`.
    pub fn subscriptions_open(&self, frontend: Frontend) -> u64 {
        self.frontend(frontend).subscriptions.get().max(0.0) as u64
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

    /// The not-after of the TLS certificate a port serves (`port` is `http` or `grpc`), in
    /// seconds since the Unix epoch: alert well before it passes.
    pub fn tls_cert_expiry(&self, port: &'static str, not_after: u64) {
        let key = Key::from_parts(
            "ipc_gateway_tls_cert_expiry_timestamp_seconds",
            vec![Label::new("port", port)],
        );
        self.recorder
            .register_gauge(&key, &METADATA)
            .set(not_after as f64);
    }

    /// Counts a policy reload that loaded (`true`) or kept the old policy (`false`).
    pub fn policy_reload(&self, loaded: bool) {
        self.policy_reloads[usize::from(!loaded)].increment(1);
        self.policy_reload_ok.set(if loaded { 1.0 } else { 0.0 });
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

/// The label values of slot `index` of `Metrics::operations`.
fn operation_labels(index: usize) -> (&'static str, &'static str, &'static str) {
    let outcome = index % OUTCOMES;
    let op = (index / OUTCOMES) % OP_KINDS;
    let frontend = index / OUTCOMES / OP_KINDS;
    (
        Frontend::ALL[frontend].as_str(),
        op_label(op),
        outcome_name(outcome),
    )
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
        let text = metrics.render();
        assert!(text.contains(
            "ipc_gateway_requests_total{frontend=\"uds\",op=\"request\",outcome=\"NO_RESPONDERS\"} 2"
        ), "{text}");
        assert!(text.contains(
            "ipc_gateway_requests_total{frontend=\"uds\",op=\"request\",outcome=\"ok\"} 1"
        ));
        assert!(
            !text.contains("ipc_gateway_request_duration_seconds_bucket"),
            "untimed operations record no latency: {text}"
        );
    }

    #[test]
    fn timed_operations_are_counted_and_timed_by_frontend_op_and_outcome() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(1);
        metrics.operation_timed(Frontend::Ws, OpKind::PublishDurable, Ok(()), ms);
        metrics.operation_timed(Frontend::Ws, OpKind::PublishDurable, Ok(()), ms * 30);
        metrics.operation_timed(
            Frontend::Grpc,
            OpKind::Op(Op::Subscribe),
            Err(ErrorCode::Forbidden),
            ms,
        );
        let text = metrics.render();
        let labels = "frontend=\"ws\",op=\"publish_durable\",outcome=\"ok\"";
        for line in [
            format!("ipc_gateway_requests_total{{{labels}}} 2"),
            format!("ipc_gateway_request_duration_seconds_bucket{{{labels},le=\"0.001\"}} 1"),
            format!("ipc_gateway_request_duration_seconds_bucket{{{labels},le=\"0.05\"}} 2"),
            format!("ipc_gateway_request_duration_seconds_count{{{labels}}} 2"),
            "ipc_gateway_request_duration_seconds_count{frontend=\"grpc\",op=\"subscribe\",outcome=\"FORBIDDEN\"} 1".to_string(),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("le=\"0.00005\""), "the first bucket is 50 µs");
        assert!(text.contains("le=\"10\""), "the last bucket is 10 s");
        assert!(!text.contains("le=\"30\""), "no bucket past 10 s");
    }

    #[test]
    fn every_slot_names_its_own_combination() {
        // The index arithmetic and the labels agree for every combination.
        let mut seen = std::collections::HashSet::new();
        for frontend in Frontend::ALL {
            for op in (0..OPS.len()).map(|i| OpKind::Op(OPS[i])).chain([
                OpKind::PublishDurable,
                OpKind::SubscribeReplay,
                OpKind::Invalid,
            ]) {
                for outcome in
                    std::iter::once(Ok(())).chain(ErrorCode::ALL.iter().map(|code| Err(*code)))
                {
                    let index = (frontend as usize * OP_KINDS + op.index()) * OUTCOMES
                        + outcome_index(outcome);
                    let (f, o, out) = operation_labels(index);
                    assert_eq!(f, frontend.as_str());
                    assert_eq!(out, outcome.map_or_else(|c| c.as_str(), |()| "ok"));
                    match op {
                        OpKind::Op(op) => assert_eq!(o, op.as_str()),
                        OpKind::PublishDurable => assert_eq!(o, "publish_durable"),
                        OpKind::SubscribeReplay => assert_eq!(o, "subscribe_replay"),
                        OpKind::Invalid => assert_eq!(o, "invalid"),
                    }
                    assert!(seen.insert(index), "slot {index} used twice");
                }
            }
        }
        assert_eq!(seen.len(), Frontend::ALL.len() * OP_KINDS * OUTCOMES);
    }

    #[test]
    fn levels_and_tallies_read_back_what_they_export() {
        let metrics = Metrics::new();
        metrics.connection_opened(Frontend::Uds);
        metrics.connection_opened(Frontend::Uds);
        metrics.connection_closed(Frontend::Uds);
        metrics.audit_lost.increment(3);
        assert_eq!(metrics.connections_open(Frontend::Uds), 1);
        assert_eq!(metrics.connections_open(Frontend::Ws), 0);
        assert_eq!(metrics.audit_lost.get(), 3);
        let text = metrics.render();
        assert!(
            text.contains("ipc_gateway_connections{frontend=\"uds\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ipc_gateway_audit_records_lost_total 3"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_policy_reload_shows_until_one_loads() {
        let metrics = Metrics::new();
        let gauge = "ipc_gateway_policy_last_reload_successful";
        assert!(metrics.render().contains(&format!("{gauge} 1")));
        metrics.policy_reload(false);
        assert!(metrics.render().contains(&format!("{gauge} 0")));
        metrics.policy_reload(true);
        assert!(metrics.render().contains(&format!("{gauge} 1")));
    }
}
