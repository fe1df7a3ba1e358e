//! The HTTP port's operator routes: `GET /health` (the process is alive), `GET /ready` (200 only
//! when NATS is connected and the listener is up; 503 with a JSON body naming what is not),
//! `GET /metrics` (Prometheus text), `GET /status` (JSON or HTML, see `status`), and the
//! browser page at `GET /` (see `page`). The server merges the front-ends' routes (the
//! WebSocket at `/ws`) into this router before serving it; this module names no front-end.
//!
//! The port is served by this module's own accept loop over hyper's HTTP/1.1 server (it speaks
//! HTTP/1.1 and WebSocket upgrades), so that no client holds a connection for free:
//!
//! - Every connection takes a place under `max_connections` (a core `Slot`, shared with the
//!   other front-ends) and one of `http_max_handshakes` (so that a flood of HTTP connections
//!   leaves places for the others). The slot goes into each request's extensions as a
//!   `HeldSlot`: a WebSocket upgrade takes it over for its client, so an upgraded connection
//!   counts once; the handshake place is given back when the connection ends or upgrades.
//! - When every place under `max_connections` is taken, up to `OPERATOR_RESERVE` more
//!   connections are served from a reserve, so that `/health`, `/ready` and `/metrics` still
//!   answer on a full gateway; such a connection cannot become a WebSocket (its upgrade asks
//!   the core for a place like any new client, and is refused while there is none).
//! - Request headers must arrive within `http_header_timeout_ms`, and a kept-alive connection
//!   waiting for its next request is closed after as long (hyper's header read timeout, which
//!   starts again each time the connection waits for a request).
//! - A connection that is still HTTP after `MAX_HTTP_LIFE` is closed, after the answer in
//!   progress (for at most the header timeout more): that bounds a client that never reads.
//! - With TLS (`tls_cert`), the handshake runs in the connection's task, after its places are
//!   taken and within the header timeout (`tls::Tls::accept`); a verified client certificate's
//!   subject goes into each request's extensions as a `tls::PeerCert`, for the WebSocket
//!   upgrade to make it part of the client's identity.
//! - A connection over either limit is answered `503` with the `OVERLOADED` text and closed.
//!   The first `MAX_POLITE_REFUSALS` at a time are closed cleanly (the gateway reads what the
//!   client sent, for up to a second, so that it sees the answer rather than a reset); past
//!   that, the answer is written and the socket closed at once, after reading only what has
//!   already arrived. Either way a refusal holds no file descriptor for long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};

use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::core::{Gateway, HeldSlot};
use crate::protocol::{ErrorCode, Frontend, GatewayError};
use crate::tls::{MaybeTls, Tls};

/// HTTP connections served beyond `max_connections` when every place is taken (see the top).
const OPERATOR_RESERVE: usize = 16;
/// Refusals answered cleanly at once; past that, answered without waiting and closed at once.
const MAX_POLITE_REFUSALS: usize = 64;
/// How long a polite refusal waits for the client to finish sending and close.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);
/// How long a connection may stay HTTP (not upgraded): far longer than any request here takes,
/// and kept-alive connections are closed after the header timeout between requests anyway.
const MAX_HTTP_LIFE: Duration = Duration::from_secs(60);
/// The most a connection may buffer: request headers up to this size (browsers send a few KiB).
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// After an accept error other than a failed handshake (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The operator routes, still waiting for their `Gateway` state so that the server can merge
/// more routes before it calls `with_state`.
pub fn router() -> Router<Gateway> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(super::status::status))
        .route("/presence", get(presence))
        .merge(super::page::routes())
}

/// Binds the HTTP port now (so a taken port fails start-up) and serves it until shutdown.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `app` (the operator routes with whatever the server merged in) until `stop`
/// resolves: then the port closes, connections finish the request in progress and close, and
/// this returns when they are gone. The daemon stops it after the drain, so that `/ready`
/// answers 503 `shutting_down` while in-flight requests finish.
pub async fn serve(
    gateway: Gateway,
    (listener, tls): (TcpListener, Option<Arc<Tls>>),
    app: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let config = gateway.config();
    let limits = Limits {
        handshakes: Arc::new(Semaphore::new(config.http_handshake_limit())),
        handshake_limit: config.http_handshake_limit(),
        reserve: Arc::new(Semaphore::new(OPERATOR_RESERVE)),
        polite: Arc::new(Semaphore::new(MAX_POLITE_REFUSALS)),
    };
    let mut http = http1::Builder::new();
    // The timer drives the header read timeout (hyper panics without one). The size limits
    // bound what a connection still sending its headers makes the gateway hold (hyper's
    // buffer limit is 400 KiB by default, and a read may overshoot it): longer headers get 431.
    http.timer(TokioTimer::new())
        .header_read_timeout(config.http_header_timeout())
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES);
    let grace = config.http_header_timeout();
    let stopping = CancellationToken::new();
    let tasks = TaskTracker::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Out of file descriptors, say: back off instead of spinning.
                warn!(error = %err, "HTTP accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match limits.admit(&gateway) {
            Ok(admitted) => {
                // Long-lived connections upgraded here (the WebSocket) carry small writes:
                // without NODELAY, Nagle's algorithm can hold one back until the client's
                // delayed ACK (40 ms).
                let _ = stream.set_nodelay(true);
                let connection = Connection {
                    http: http.clone(),
                    app: app.clone(),
                    admitted,
                    stopping: stopping.clone(),
                    grace,
                    tls: tls.clone(),
                };
                tasks.spawn(connection.serve(stream));
            }
            Err(refusal) => {
                debug!("refusing an HTTP connection: {refusal}");
                let answer = refusal_answer(&refusal);
                match limits.polite.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(refuse_politely(stream, answer, permit));
                    }
                    Err(_) => refuse_at_once(stream, &answer),
                }
            }
        }
    }
    drop(listener);
    stopping.cancel();
    tasks.close();
    tasks.wait().await;
}

/// The HTTP port's own limits (besides the core's `max_connections`).
struct Limits {
    /// `http_max_handshakes`: connections that are HTTP, not (yet) WebSocket.
    handshakes: Arc<Semaphore>,
    handshake_limit: usize,
    /// Connections served while every place under `max_connections` is taken.
    reserve: Arc<Semaphore>,
    /// Refusals being answered cleanly at once.
    polite: Arc<Semaphore>,
}

/// What an admitted connection holds while it is HTTP.
struct Admitted {
    /// Its place among the connections that are HTTP, given back when the connection ends
    /// (an upgrade ends it here: hyper hands the socket over).
    _handshake: OwnedSemaphorePermit,
    place: Place,
}

enum Place {
    /// A place under `max_connections`, until the WebSocket upgrade takes it over.
    Slot(HeldSlot),
    /// A place in the operator reserve, given back when the connection ends.
    Reserve(OwnedSemaphorePermit),
}

impl Limits {
    /// A handshake place, then a connection slot or, on a full gateway, a place in the
    /// reserve; past them, the `OVERLOADED` refusal, counted in
    /// `connections_rejected_total{frontend="ws"}`.
    fn admit(&self, gateway: &Gateway) -> Result<Admitted, GatewayError> {
        let refuse = |refusal: GatewayError| {
            gateway.metrics().connection_rejected(Frontend::Ws);
            Err(refusal)
        };
        let Ok(handshake) = self.handshakes.clone().try_acquire_owned() else {
            return refuse(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "the gateway serves its maximum of {} HTTP connections; retry later",
                    self.handshake_limit
                ),
            ));
        };
        let place = match gateway.slot() {
            Ok(slot) => Place::Slot(HeldSlot::new(slot)),
            Err(full) => match self.reserve.clone().try_acquire_owned() {
                Ok(reserve) => Place::Reserve(reserve),
                Err(_) => return refuse(full),
            },
        };
        Ok(Admitted {
            _handshake: handshake,
            place,
        })
    }
}

/// One admitted connection, served by hyper until it ends, upgrades or is cut off.
struct Connection {
    http: http1::Builder,
    app: Router,
    admitted: Admitted,
    stopping: CancellationToken,
    /// How long the answer in progress may take once the connection is told to close.
    grace: Duration,
    tls: Option<Arc<Tls>>,
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        let Connection {
            http,
            app,
            admitted: Admitted { _handshake, place },
            stopping,
            grace,
            tls,
        } = self;
        let (stream, cert) = match tls {
            None => (MaybeTls::Plain(stream), None),
            Some(tls) => {
                let accepted = tokio::select! {
                    accepted = tls.accept(stream) => accepted,
                    // Shutting down: nothing to answer yet, so nothing to wait for.
                    _ = stopping.cancelled() => return,
                };
                match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        debug!(error = %err, "HTTPS handshake failed");
                        return;
                    }
                }
            }
        };
        // Every request carries the connection's slot, for a WebSocket upgrade to take over.
        // The service holds one clone for the connection's life: whoever drops the last one
        // without taking the slot gives it back.
        let (held, _reserve) = match place {
            Place::Slot(held) => (Some(held), None),
            Place::Reserve(reserve) => (None, Some(reserve)),
        };
        let app = app.map_request(move |mut request: Request<Incoming>| {
            if let Some(held) = &held {
                request.extensions_mut().insert(held.clone());
            }
            if let Some(cert) = &cert {
                request.extensions_mut().insert(cert.clone());
            }
            request
        });
        let connection = http
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
            .with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            // Ended, failed (a header timeout, say), or upgraded.
            _ = connection.as_mut() => return,
            _ = stopping.cancelled() => {}
            _ = tokio::time::sleep(MAX_HTTP_LIFE) => {}
        }
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(grace, connection).await;
    }
}

/// A minimal HTTP/1.1 `503` carrying the refusal, which closes the connection.
fn refusal_answer(refusal: &GatewayError) -> Vec<u8> {
    let body = refusal.to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers, closes the sending side, and reads what the client sent until it closes too (for
/// up to `REFUSAL_GRACE`), so that it sees the answer and a clean close rather than a reset.
async fn refuse_politely(mut stream: TcpStream, answer: Vec<u8>, _permit: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_GRACE, async {
        if stream.write_all(&answer).await.is_err() {
            return;
        }
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Writes the answer and closes at once, never waiting. What the client already sent is read
/// first (without waiting for more): closing a socket with unread input resets the connection,
/// and some clients drop an answer that a reset follows. A fresh socket's send buffer always has
/// room for the answer.
fn refuse_at_once(stream: TcpStream, answer: &[u8]) {
    use std::io::{Read, Write};
    // Through the standard library: tokio's `try_write` on a socket the reactor has not yet
    // seen writable would give up without trying.
    let Ok(mut stream) = stream.into_std() else {
        return;
    };
    let _ = stream.write(answer);
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        // The socket is non-blocking: this ends at `WouldBlock`, at EOF, or after 16 KiB.
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// A connection that failed before it was accepted: nothing to back off from.
fn is_connection_error(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(gateway): State<Gateway>) -> Response {
    let readiness = gateway.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// Where a named client is connected (`?name=bob`), for operators: like `/status`'s detail,
/// only for a caller (bearer token, client certificate) the policy grants `status` (403
/// otherwise, 401 for a bad token). 400 for a missing or invalid name, 503 without JetStream.
async fn presence(
    State(gateway): State<Gateway>,
    cert: Option<axum::Extension<crate::tls::PeerCert>>,
    headers: axum::http::HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let identity = match super::status::operator(&gateway, &headers, cert) {
        Ok(identity) => identity,
        Err(error) => return (StatusCode::UNAUTHORIZED, error.to_string()).into_response(),
    };
    if !gateway.may_see_status(identity) {
        return (
            StatusCode::FORBIDDEN,
            Json(serde_json::json!({
                "error": {"code": "FORBIDDEN", "message": "presence is shown to callers the policy grants status (docs/policy.md)"}
            })),
        )
            .into_response();
    }
    let name = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("name="))
        .map(percent_decoded);
    let result = match name {
        Some(name) => gateway.presence_of(&name).await,
        None => Err(crate::protocol::GatewayError::bad_request(
            "give the name: /presence?name=bob",
        )),
    };
    match result {
        Ok(info) => Json(info).into_response(),
        Err(error) => {
            let status = match error.code {
                crate::protocol::ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (
                status,
                Json(serde_json::json!({
                    "error": {"code": error.code.as_str(), "message": error.message}
                })),
            )
                .into_response()
        }
    }
}

/// A query value with its `%XX` escapes decoded (`a%2Fb` is `a/b`); a malformed escape is
/// kept as it is (the name check then refuses it).
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escape = (bytes[at] == b'%')
            .then(|| Some((hex(*bytes.get(at + 1)?)?, hex(*bytes.get(at + 2)?)?)))
            .flatten();
        match escape {
            Some((high, low)) => {
                out.push((high * 16 + low) as u8);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn metrics(State(gateway): State<Gateway>) -> Response {
    gateway.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gateway.metrics().render(),
    )
        .into_response()
}

#[cfg(test)]
mod presence_query_tests {
    #[test]
    fn percent_escapes_are_decoded_and_bad_ones_kept() {
        assert_eq!(super::percent_decoded("a%2Fb%3dc"), "a/b=c");
        assert_eq!(super::percent_decoded("bob"), "bob");
        assert_eq!(super::percent_decoded("a%2"), "a%2");
        assert_eq!(super::percent_decoded("a%zzb"), "a%zzb");
    }
}
