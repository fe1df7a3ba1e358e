//! The HTTP port's operator routes: `GET /health` (the process is alive), `GET /ready` (200 only
//! when NATS is connected and the listener is up; 503 with a JSON body naming what is not),
//! `GET /metrics` (Prometheus text), `GET /status`, and the browser page at `GET /` (see
//! `page`). The server merges the front-ends' routes (the WebSocket at `/ws`) into this router
//! before serving it; this module names no front-end.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::core::Gateway;

/// The operator routes, still waiting for their `Gateway` state so that the server can merge
/// more routes before it calls `with_state`.
pub fn router() -> Router<Gateway> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .merge(super::page::routes())
}

/// Binds the HTTP port now (so a taken port fails start-up) and serves it until shutdown.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves `app` (the operator routes with whatever the server merged in) until `stop`
/// resolves. The daemon stops it after the drain, so that `/ready` answers 503
/// `shutting_down` while in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Long-lived connections upgraded here (the WebSocket) carry small writes: without NODELAY,
    // Nagle's algorithm can hold one back until the client's delayed ACK (40 ms).
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
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

/// Readiness and every circuit breaker group, for operators.
async fn status(State(gateway): State<Gateway>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "readiness": gateway.readiness(),
        "breakers": gateway.breaker_status(),
    }))
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
