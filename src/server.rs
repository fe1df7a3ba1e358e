//! Runs the daemon: binds the socket, the HTTP port and the gRPC port (failing start-up clearly
//! if any is taken), composes the HTTP routes (the operator routes and the WebSocket
//! front-end), serves until the first stop request, then drains: stop accepting, let in-flight
//! requests finish up to the drain timeout, answer the rest with `UNAVAILABLE`, remove the
//! socket file. A later stop request cuts the drain short.
//!
//! Where stop requests come from is the caller's business: `main` turns SIGTERM and SIGINT
//! into them; a test can run the whole server in-process and stop it through a channel.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::core::Gateway;
use crate::frontend::uds::{self, UdsListener};
use crate::frontend::{grpc, ws};
use crate::ops::http;

/// Serves until `stop` yields, then drains. Each item of `stop` is a stop request naming its
/// cause for the log (`"SIGTERM"`): the first starts the graceful drain, and any later one
/// during the drain answers what is still waiting with `UNAVAILABLE` at once. A stream that
/// ends asks for nothing more (the server then runs until its gRPC server fails).
pub async fn run(
    config: Config,
    mut stop: impl Stream<Item = &'static str> + Unpin,
    reloads: impl Stream<Item = ()> + Unpin + Send + 'static,
) -> Result<(), String> {
    let gateway = Gateway::new(config.clone()).await?;
    let listener = UdsListener::bind(&config.socket, config.socket_mode)
        .await
        .map_err(|e| socket_error(&config.socket, &e))?;
    let http_listener = http::bind(config.http)
        .await
        .map_err(|e| port_error("--http", config.http, &e))?;
    let grpc_listener = grpc::bind(config.grpc)
        .await
        .map_err(|e| port_error("--grpc", config.grpc, &e))?;
    info!(
        socket = %config.socket.display(),
        http = %config.http,
        grpc = %config.grpc,
        nats = %config.nats_url,
        "ipc-gateway started"
    );
    if config.http.ip().is_unspecified() && config.public_origins.is_empty() {
        tracing::warn!(
            http = %config.http,
            "only pages loaded from loopback may open /ws: list the origins browsers use for this gateway in public_origins"
        );
    }
    let upkeep = tokio::spawn(refresh_gauges(gateway.clone()));
    let reloader = tokio::spawn(reload_on_request(gateway.clone(), reloads));
    let supervisor = {
        let gateway = gateway.clone();
        tokio::spawn(async move { gateway.supervise_pool().await })
    };
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        gateway.clone(),
        http_listener,
        http_routes(gateway.clone()),
        http_stop.clone().cancelled_owned(),
    ));
    let mut uds_task = tokio::spawn(uds::serve(gateway.clone(), listener));
    let mut grpc_task = tokio::spawn(grpc::serve(gateway.clone(), grpc_listener));
    let mut failure = None;

    tokio::select! {
        Some(cause) = stop.next() => info!("{cause}: shutting down"),
        ended = &mut grpc_task => {
            let why = match ended {
                Ok(Err(err)) => err,
                _ => "the gRPC server stopped".to_owned(),
            };
            tracing::error!(error = %why, "shutting down");
            failure = Some(why);
        }
    }
    let drain = config.drain_timeout();
    info!(
        drain_ms = drain.as_millis() as u64,
        "draining in-flight requests"
    );
    gateway.shutdown().begin(drain);
    // In-flight requests end by the drain deadline; the margin covers writing the answers.
    // A second stop request cuts the drain short.
    let deadline = tokio::time::sleep(drain + Duration::from_secs(2));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut uds_task => break,
            _ = &mut deadline => break,
            Some(cause) = stop.next() => {
                info!(%cause, "second signal: answering what is left with UNAVAILABLE");
                gateway.shutdown().expire_drain_now();
            }
        }
    }
    // gRPC stops accepting at once and ends its streams; its unary calls end with the drain.
    if !grpc_task.is_finished() {
        let _ = tokio::time::timeout_at(deadline.deadline(), &mut grpc_task).await;
    }
    // WebSocket (and gRPC) connections live outside the listeners' tasks: wait for them too.
    gateway.connections().close();
    let _ = tokio::time::timeout_at(deadline.deadline(), gateway.connections().wait()).await;
    gateway.flush().await;
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), http_task).await;
    upkeep.abort();
    reloader.abort();
    // Last: every operation answered before now has its record on disk.
    gateway.close_audit().await;
    supervisor.abort();
    grpc_task.abort();
    info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// A listen port that cannot be bound, named by its flag (also the TOML key without dashes).
fn port_error(flag: &str, address: std::net::SocketAddr, err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "{flag} {address}: address already in use (another gateway or program listens there); stop it or choose another {flag}"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "{flag} {address}: no network interface of this host has that address; choose another {flag}"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "{flag} {address}: permission denied (ports below 1024 need privileges); choose another {flag}"
        ),
        _ => format!("{flag} {address}: {err}"),
    }
}

/// The Unix socket that cannot be made; a missing directory is named as such.
fn socket_error(path: &std::path::Path, err: &std::io::Error) -> String {
    match path.parent() {
        Some(dir)
            if err.kind() == std::io::ErrorKind::NotFound
                && !dir.as_os_str().is_empty()
                && !dir.exists() =>
        {
            format!(
                "--socket {}: the directory {} does not exist; create it or choose another --socket",
                path.display(),
                dir.display()
            )
        }
        _ => format!("--socket {}: {err}", path.display()),
    }
}

/// The HTTP port: the operator routes, and the WebSocket front-end at `/ws`.
fn http_routes(gateway: Gateway) -> Router {
    http::router()
        .route("/ws", get(ws::upgrade))
        .with_state(gateway)
}

/// Each reload request (SIGHUP) reloads the policy; a file that does not load keeps the
/// policy in force (the gateway logs why and counts it).
async fn reload_on_request(gateway: Gateway, mut reloads: impl Stream<Item = ()> + Unpin) {
    while reloads.next().await.is_some() {
        info!("SIGHUP: reloading");
        let _ = gateway.reload().await;
    }
}

async fn refresh_gauges(gateway: Gateway) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        gateway.refresh_gauges();
    }
}
