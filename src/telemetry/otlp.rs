//! OpenTelemetry span export over OTLP/gRPC (`--otlp-endpoint`): one span per request,
//! publish and subscribe, in the operation's trace (the client's, or the one the gateway
//! started; see `trace`), with its front-end, op, subject, outcome code, the caller's identity
//! and the gateway id.
//!
//! The request path never waits for it: an operation hands its finished span to a bounded
//! queue (`try_send`); when the queue is full the span is dropped and counted in
//! `ipc_gateway_trace_spans_dropped_total`. One exporter task takes what is queued, up to
//! `MAX_BATCH` spans at a time, and sends them with opentelemetry-otlp's tonic exporter (one
//! export in flight; a failed export is logged and its spans counted as dropped too). The SDK's
//! own `BatchSpanProcessor` is not used: it cannot report its drops to our metrics.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::Counter;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::{mpsc, oneshot};

use super::trace::TraceContext;
use crate::protocol::{ErrorCode, Frontend, Subject};

/// Spans queued for export at most; past it they are dropped and counted.
pub const QUEUE: usize = 8192;
/// Spans sent in one export call at most.
pub const MAX_BATCH: usize = 512;
/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// One finished operation, as the request path hands it over: plain data, no formatting.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub trace: TraceContext,
    /// `request`, `publish`, `subscribe`: the span's name and its `ipc_gateway.op`.
    pub op: &'static str,
    pub frontend: Frontend,
    pub subject: Option<Subject>,
    pub outcome: Result<(), ErrorCode>,
    /// The caller's identity in its short form (`uid:1000`, a token's `sub`).
    pub identity: String,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// What the exporter task is handed.
enum Queued {
    Span(FinishedSpan),
    /// Answered once every span queued before it has been exported (or given up on).
    Flush(oneshot::Sender<()>),
}

/// The exporter's handle, cheap to clone.
#[derive(Clone)]
pub struct Otlp {
    queue: mpsc::Sender<Queued>,
    dropped: Counter,
}

impl Otlp {
    /// Starts the exporter task for `endpoint` (`http://host:4317`). Fails only on an
    /// endpoint that is not a URL; a collector that is down makes exports fail (logged,
    /// counted), never the gateway.
    pub fn start(endpoint: &str, gateway: &str, dropped: Counter) -> Result<Otlp, String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|error| format!("otlp_endpoint: {error}"))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name("ipc-gateway")
                .with_attribute(KeyValue::new("service.instance.id", gateway.to_owned()))
                .build(),
        );
        let (queue, spans) = mpsc::channel(QUEUE);
        tokio::spawn(export(spans, exporter, dropped.clone(), Arc::from(gateway)));
        Ok(Otlp { queue, dropped })
    }

    /// Queues a finished span; never waits (a full queue drops it, counted).
    pub fn record(&self, span: FinishedSpan) {
        if self.queue.try_send(Queued::Span(span)).is_err() {
            self.dropped.increment(1);
        }
    }

    /// Waits (at most `within`) until the spans queued so far are exported: the end of the
    /// drain, so that the last operations' spans leave before the process exits.
    pub async fn flush(&self, within: Duration) {
        let (done, exported) = oneshot::channel();
        let flushed = async {
            if self.queue.send(Queued::Flush(done)).await.is_ok() {
                let _ = exported.await;
            }
        };
        if tokio::time::timeout(within, flushed).await.is_err() {
            tracing::warn!("OTLP spans were still being exported when the gateway stopped");
        }
    }
}

/// A finished span as the OTLP exporter takes it.
fn span_data(span: FinishedSpan, scope: &InstrumentationScope, gateway: &Arc<str>) -> SpanData {
    let trace = span.trace;
    let flags = TraceFlags::new(trace.flags);
    let mut attributes = Vec::with_capacity(6);
    attributes.push(KeyValue::new(
        "ipc_gateway.frontend",
        span.frontend.as_str(),
    ));
    attributes.push(KeyValue::new("ipc_gateway.op", span.op));
    if let Some(subject) = &span.subject {
        attributes.push(KeyValue::new(
            "messaging.destination.name",
            subject.as_str().to_owned(),
        ));
    }
    let outcome = match span.outcome {
        Ok(()) => "ok",
        Err(code) => code.as_str(),
    };
    attributes.push(KeyValue::new("ipc_gateway.outcome", outcome));
    attributes.push(KeyValue::new("ipc_gateway.identity", span.identity));
    attributes.push(KeyValue::new("ipc_gateway.gateway", gateway.to_string()));
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace.trace_id),
            SpanId::from_bytes(trace.span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: trace.parent_id.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: trace.parent_id.is_some(),
        span_kind: SpanKind::Server,
        name: Cow::Borrowed(span.op),
        start_time: span.start,
        end_time: span.end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.outcome {
            Ok(()) => Status::Unset,
            Err(code) => Status::error(code.as_str()),
        },
        instrumentation_scope: scope.clone(),
    }
}

/// The exporter task: takes up to `MAX_BATCH` queued spans, exports them, again; ends when
/// every handle is gone and the queue is empty.
async fn export(
    mut queue: mpsc::Receiver<Queued>,
    exporter: opentelemetry_otlp::SpanExporter,
    dropped: Counter,
    gateway: Arc<str>,
) {
    let scope = InstrumentationScope::builder("ipc-gateway")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut flushes = Vec::new();
    let mut failing = false;
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // The queue is in order: a flush's spans are in this batch or an earlier one.
        let data: Vec<SpanData> = batch
            .drain(..)
            .filter_map(|queued| match queued {
                Queued::Span(span) => Some(span_data(span, &scope, &gateway)),
                Queued::Flush(done) => {
                    flushes.push(done);
                    None
                }
            })
            .collect();
        if data.is_empty() {
            answer(&mut flushes);
            continue;
        }
        let count = data.len() as u64;
        match exporter.export(data).await {
            Ok(()) => {
                if failing {
                    tracing::info!("OTLP span export works again");
                    failing = false;
                }
            }
            Err(error) => {
                dropped.increment(count);
                if !failing {
                    tracing::warn!(%error, "OTLP span export failed; spans are dropped (and counted) until it works again");
                    failing = true;
                }
            }
        }
        answer(&mut flushes);
    }
}

/// Tells the flushes waiting that their spans are done with.
fn answer(flushes: &mut Vec<oneshot::Sender<()>>) {
    for done in flushes.drain(..) {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn span(op: &'static str) -> FinishedSpan {
        FinishedSpan {
            trace: TraceContext::start(),
            op,
            frontend: Frontend::Uds,
            subject: Some(Subject::from("svc.a")),
            outcome: Err(ErrorCode::Timeout),
            identity: "uid=1000".into(),
            start: SystemTime::now(),
            end: SystemTime::now(),
        }
    }

    fn dropped(metrics: &Metrics) -> String {
        metrics
            .render()
            .lines()
            .find(|line| line.starts_with("ipc_gateway_trace_spans_dropped_total"))
            .unwrap_or_default()
            .to_owned()
    }

    /// The exporter task cannot run while this single-threaded test fills the queue, so the
    /// spans past `QUEUE` find it full: they are dropped at once, counted, and nothing waits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_spans_without_waiting_and_counts_them() {
        let metrics = Metrics::new();
        let otlp = Otlp::start(
            "http://127.0.0.1:9",
            "gw-1",
            metrics.trace_spans_dropped.clone(),
        )
        .unwrap();
        for _ in 0..QUEUE + 3 {
            otlp.record(span("request"));
        }
        assert_eq!(dropped(&metrics), "ipc_gateway_trace_spans_dropped_total 3");
    }

    /// A flush returns only once the spans queued before it were exported or given up on:
    /// here the collector is not there, so by then every one of them is counted as dropped.
    #[tokio::test(flavor = "current_thread")]
    async fn a_flush_waits_for_the_spans_queued_before_it() {
        let metrics = Metrics::new();
        let otlp = Otlp::start(
            "http://127.0.0.1:9",
            "gw-1",
            metrics.trace_spans_dropped.clone(),
        )
        .unwrap();
        for _ in 0..5 {
            otlp.record(span("publish"));
        }
        assert_eq!(dropped(&metrics), "ipc_gateway_trace_spans_dropped_total 0");
        otlp.flush(Duration::from_secs(60)).await;
        assert_eq!(dropped(&metrics), "ipc_gateway_trace_spans_dropped_total 5");
    }

    #[test]
    fn a_span_carries_the_trace_and_the_operation() {
        let finished = span("request");
        let trace = finished.trace;
        let scope = InstrumentationScope::builder("ipc-gateway").build();
        let data = span_data(finished, &scope, &Arc::from("gw-1"));
        assert_eq!(data.span_context.trace_id().to_bytes(), trace.trace_id);
        assert_eq!(data.span_context.span_id().to_bytes(), trace.span_id);
        assert_eq!(data.parent_span_id, SpanId::INVALID, "a trace started here");
        assert_eq!(data.status, Status::error("TIMEOUT"));
        let attribute = |key: &str| {
            data.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(attribute("ipc_gateway.frontend").as_deref(), Some("uds"));
        assert_eq!(attribute("ipc_gateway.outcome").as_deref(), Some("TIMEOUT"));
        assert_eq!(
            attribute("messaging.destination.name").as_deref(),
            Some("svc.a")
        );
        assert_eq!(
            attribute("ipc_gateway.identity").as_deref(),
            Some("uid=1000")
        );
        assert_eq!(attribute("ipc_gateway.gateway").as_deref(), Some("gw-1"));
    }
}
