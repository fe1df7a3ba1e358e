//! The HTTP port: `GET /health` (the process is alive), `GET /ready` (200 only when NATS is
//! connected and the listener is up; 503 with a JSON body naming what is not), and
//! `GET /metrics` (Prometheus text), `GET /status`, the WebSocket at `GET /ws`, and the browser
//! page at `GET /` (see `page`).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::core::Gateway;

pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/ws", get(crate::frontend::ws::upgrade))
        .merge(super::page::routes())
        .with_state(gateway)
}

/// Binds the HTTP port now (so a taken port fails start-up) and serves it until shutdown.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves until `stop` resolves. The daemon stops it after the drain, so that `/ready`
/// answers 503 `shutting_down` while in-flight requests finish.
pub async fn serve(
    gateway: Gateway,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // WebSocket answers are small writes: without NODELAY, Nagle's algorithm can hold one
    // back until the client's delayed ACK (40 ms).
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, router(gateway))
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
