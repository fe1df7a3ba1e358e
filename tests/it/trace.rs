//! W3C trace context end to end, with the real gateway binary, a real nats-server and a
//! service that is a plain NATS subscriber: a client's `traceparent` on every front-end (JSON
//! lines and binary frames on the Unix socket, JSON over WebSocket, gRPC metadata) reaches the
//! service with the same trace id and the gateway's span as parent, comes back with the reply,
//! and is in the audit record; without one (or with an invalid one) the gateway starts a trace.
//! With `--otlp-endpoint`, a real OTLP/gRPC receiver (the collector's `TraceService`, generated
//! for tonic by opentelemetry-proto) gets one span per operation in the client's trace.

use std::collections::HashMap;

use crate::common::ws;
use crate::common::*;
use ipc_gateway::frontend::grpc::pb;
use ipc_gateway::protocol::Headers;
use ipc_gateway::protocol::binary::{FrameParts, frame_type};
use ipc_gateway::telemetry::trace::parse_traceparent;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;

/// An OTLP/gRPC collector on a free loopback port: every span it is sent goes to the test.
struct Receiver {
    url: String,
    spans: mpsc::UnboundedReceiver<(Span, Vec<(String, String)>)>,
    /// Spans received while waiting for another.
    seen: Vec<(Span, Vec<(String, String)>)>,
    _server: tokio::task::JoinHandle<()>,
}

struct Collect(mpsc::UnboundedSender<(Span, Vec<(String, String)>)>);

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            let attributes = resource
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((span, attributes.clone()));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attributes(list: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<(String, String)> {
    list.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (sender, spans) = mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collect(sender)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Receiver {
            url,
            spans,
            seen: Vec::new(),
            _server: server,
        }
    }

    /// The span of trace `trace_id` (hex) and op `op`, with its attributes and its
    /// resource's; waits for it if it has not come yet (others are kept for later calls).
    async fn span_of(&mut self, trace_id: &str, op: &str) -> (Span, HashMap<String, String>) {
        let matches = |span: &Span| hex(&span.trace_id) == trace_id && span.name == op;
        let (span, resource) = match self.seen.iter().position(|(span, _)| matches(span)) {
            Some(at) => self.seen.swap_remove(at),
            None => loop {
                let received = tokio::time::timeout(PATIENCE, self.spans.recv())
                    .await
                    .unwrap_or_else(|_| panic!("no {op} span of trace {trace_id} in time"))
                    .expect("the receiver runs");
                if matches(&received.0) {
                    break received;
                }
                self.seen.push(received);
            },
        };
        let mut all: HashMap<String, String> = resource.into_iter().collect();
        all.extend(attributes(&span.attributes));
        (span, all)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The client's span id in every given traceparent.
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-{CLIENT_SPAN}-01")
}

/// The `traceparent` the service got: its trace id, and the parent (the gateway's span).
fn seen_by_service(message: &async_nats::Message) -> (String, String) {
    let headers = message.headers.as_ref().expect("the message has headers");
    let values: Vec<_> = headers.get_all("traceparent").collect();
    assert_eq!(values.len(), 1, "exactly one traceparent: {headers:?}");
    let value = values[0].as_str();
    let parsed = parse_traceparent(value).unwrap_or_else(|| panic!("valid: {value:?}"));
    assert_eq!(parsed.flags, 1, "{value}");
    (value[3..35].to_owned(), value[36..52].to_owned())
}

fn tracestate(message: &async_nats::Message) -> Option<String> {
    let headers = message.headers.as_ref()?;
    headers.get("tracestate").map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn a_client_traceparent_crosses_every_front_end_with_the_gateway_span_as_parent() {
    let nats = NatsServer::start();
    let mut service = RecordingService::start(&nats, "svc.traced").await;
    let mut receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--audit-file",
            audit.to_str().unwrap(),
            "--otlp-endpoint",
            &receiver.url,
            "--gateway-id",
            "gw-trace-test",
        ],
    );
    // One trace id per front-end; each request answered and checked before the next.
    let ids: HashMap<&str, &str> = [
        ("uds-json", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("uds-binary", "5bf92f3577b34da6a3ce929d0e0e4736"),
        ("ws", "6bf92f3577b34da6a3ce929d0e0e4736"),
        ("grpc", "7bf92f3577b34da6a3ce929d0e0e4736"),
    ]
    .into();
    let mut returned = HashMap::new();

    // Unix socket, JSON lines.
    let mut conn = gateway.json().await;
    let reply = conn
        .call(&format!(
            r#"{{"id":1,"subject":"svc.traced","data":"a","headers":{{"traceparent":"{}","tracestate":"vendor=x"}}}}"#,
            traceparent(ids["uds-json"])
        ))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let message = service.next().await;
    returned.insert(
        "uds-json",
        (
            message.clone(),
            reply["headers"]["traceparent"].as_str().map(str::to_owned),
        ),
    );
    assert_eq!(
        tracestate(&message).as_deref(),
        Some("vendor=x"),
        "tracestate goes on with its trace"
    );

    // Unix socket, binary frames.
    let mut raw = RawConn::connect(&gateway.socket).await;
    let mut headers = Headers::new();
    headers
        .append("traceparent", traceparent(ids["uds-binary"]))
        .unwrap();
    raw.send(&frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 2,
        subject: b"svc.traced",
        headers: Some(&headers),
        payload: b"b",
        ..FrameParts::default()
    }))
    .await;
    let reply = raw.recv().await;
    assert_eq!(reply.header.frame_type, frame_type::REPLY, "{reply:?}");
    let message = service.next().await;
    let back = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(str::to_owned);
    returned.insert("uds-binary", (message, back));

    // WebSocket, the same JSON envelope.
    let mut socket = ws::connect(&gateway, None).await.unwrap();
    let reply = ws::call(
        &mut socket,
        &format!(
            r#"{{"id":3,"subject":"svc.traced","data":"c","headers":{{"TraceParent":"{}"}}}}"#,
            traceparent(ids["ws"])
        ),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let message = service.next().await;
    returned.insert(
        "ws",
        (
            message,
            reply["headers"]["traceparent"].as_str().map(str::to_owned),
        ),
    );

    // gRPC metadata.
    let mut client = gateway.grpc().await;
    let mut request = tonic::Request::new(pb::RequestMessage {
        subject: "svc.traced".into(),
        payload: b"d".to_vec().into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(traceparent(ids["grpc"])).unwrap(),
    );
    let response = client.request(request).await.unwrap();
    let in_metadata = response
        .metadata()
        .get("traceparent")
        .map(|v| v.to_str().unwrap().to_owned());
    let reply = response.into_inner();
    let in_message = reply
        .headers
        .iter()
        .find(|h| h.name == "traceparent")
        .map(|h| h.value.clone());
    assert_eq!(
        in_metadata, in_message,
        "metadata and message headers agree"
    );
    let message = service.next().await;
    returned.insert("grpc", (message, in_metadata));

    for (frontend, (message, back)) in &returned {
        let (trace_id, parent) = seen_by_service(message);
        assert_eq!(trace_id, ids[frontend], "{frontend}: the client's trace");
        assert_ne!(
            parent, CLIENT_SPAN,
            "{frontend}: the gateway's own span is the parent"
        );
        assert_eq!(
            back.as_deref(),
            Some(format!("00-{trace_id}-{parent}-01").as_str()),
            "{frontend}: the client gets the traceparent the service saw"
        );
        // The collector gets the gateway's span: the same ids, the client's span as parent.
        let (span, attributes) = receiver.span_of(&trace_id, "request").await;
        assert_eq!(hex(&span.span_id), parent, "{frontend}");
        assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN, "{frontend}");
        let expected_frontend = match *frontend {
            "uds-json" | "uds-binary" => "uds",
            other => other,
        };
        for (key, value) in [
            ("ipc_gateway.frontend", expected_frontend),
            ("ipc_gateway.op", "request"),
            ("messaging.destination.name", "svc.traced"),
            ("ipc_gateway.outcome", "ok"),
            ("ipc_gateway.gateway", "gw-trace-test"),
            ("service.name", "ipc-gateway"),
        ] {
            assert_eq!(
                attributes.get(key).map(String::as_str),
                Some(value),
                "{frontend} {key}: {attributes:?}"
            );
        }
        assert!(
            attributes
                .get("ipc_gateway.identity")
                .is_some_and(|who| !who.is_empty()),
            "{attributes:?}"
        );
    }

    drop((conn, raw, socket, client));
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let records = audit_records(&audit);
    for (frontend, trace_id) in &ids {
        assert!(
            records.iter().any(|r| r["op"] == "request"
                && r["outcome"] == "ok"
                && r["trace_id"] == *trace_id),
            "{frontend}: no request record with trace_id {trace_id} in {records:#?}"
        );
    }
}

#[tokio::test]
async fn without_a_valid_traceparent_the_gateway_starts_a_trace_end_to_end() {
    let nats = NatsServer::start();
    let mut service = RecordingService::start(&nats, "svc.traced").await;
    let mut receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--audit-file",
            audit.to_str().unwrap(),
            "--otlp-endpoint",
            &receiver.url,
        ],
    );
    let mut conn = gateway.json().await;

    let reply = conn
        .call(r#"{"id":1,"subject":"svc.traced","data":"a"}"#)
        .await;
    let first = service.next().await;
    let (trace_id, parent) = seen_by_service(&first);
    assert_eq!(
        reply["headers"]["traceparent"],
        format!("00-{trace_id}-{parent}-01"),
        "{reply}"
    );

    // Invalid (upper-case hex): the trace restarts and its tracestate is dropped.
    let reply = conn
        .call(r#"{"id":2,"subject":"svc.traced","data":"b","headers":{"traceparent":"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01","tracestate":"vendor=x","X-Other":"kept"}}"#)
        .await;
    assert_eq!(
        reply["ok"], true,
        "an invalid traceparent is not an error: {reply}"
    );
    let second = service.next().await;
    let (restarted, _) = seen_by_service(&second);
    assert_ne!(restarted, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(restarted, trace_id, "each new trace has its own id");
    assert_eq!(
        tracestate(&second),
        None,
        "tracestate is dropped with its trace"
    );
    assert_eq!(
        second
            .headers
            .as_ref()
            .and_then(|h| h.get("X-Other"))
            .map(|v| v.as_str()),
        Some("kept")
    );

    // A publish carries a new trace too.
    let ack = conn
        .call(r#"{"op":"publish","id":3,"subject":"svc.traced","data":"c"}"#)
        .await;
    assert_eq!(ack["ok"], true);
    let published = service.next().await;
    let (published_trace, _) = seen_by_service(&published);

    // The collector gets each in its new trace, as a root span (no parent).
    let (span, _) = receiver.span_of(&trace_id, "request").await;
    assert_eq!(hex(&span.span_id), parent);
    assert!(span.parent_span_id.is_empty(), "{span:?}");
    let (span, attributes) = receiver.span_of(&published_trace, "publish").await;
    assert!(span.parent_span_id.is_empty(), "{span:?}");
    assert_eq!(attributes["ipc_gateway.outcome"], "ok");

    drop(conn);
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let records = audit_records(&audit);
    for (op, id) in [
        ("request", &trace_id),
        ("request", &restarted),
        ("publish", &published_trace),
    ] {
        assert!(
            records
                .iter()
                .any(|r| r["op"] == op && r["trace_id"] == id.as_str()),
            "no {op} record with trace_id {id} in {records:#?}"
        );
    }
}

/// Without `--trace-requests` or an exporter, a client's trace is continued and a request
/// without one is left as it came: no `traceparent` to the service, none on the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_only_a_clients_own_trace_is_carried() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut service = RecordingService::start(&nats, "trace.default").await;
    let mut client = gateway.json().await;

    let plain = client
        .call(r#"{"id":1,"subject":"trace.default","data":"a"}"#)
        .await;
    assert_eq!(plain["ok"], true, "{plain}");
    assert!(plain.get("headers").is_none(), "{plain}");
    let seen = service.next().await;
    assert!(
        seen.headers
            .as_ref()
            .and_then(|headers| headers.get("traceparent"))
            .is_none(),
        "no trace was started"
    );

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = client
        .call(&format!(
            r#"{{"id":2,"subject":"trace.default","data":"b","headers":{{"traceparent":"{given}"}}}}"#
        ))
        .await;
    assert_eq!(traced["ok"], true, "{traced}");
    let seen = service.next().await;
    let sent = seen
        .headers
        .as_ref()
        .and_then(|headers| headers.get("traceparent"))
        .map(|value| value.as_str().to_owned())
        .expect("the client's trace reaches the service");
    let (trace_id, parent) = (&sent[3..35], &sent[36..52]);
    assert_eq!(trace_id, &given[3..35], "the same trace");
    assert_ne!(
        parent,
        &given[36..52],
        "the gateway's own span is the parent"
    );
    assert_eq!(traced["headers"]["traceparent"], sent, "{traced}");
}
