//! Runs the daemon: binds the socket, the HTTP port and the gRPC port (failing start-up clearly
//! if any is taken), composes the HTTP routes (the operator routes and the WebSocket
//! front-end), serves until the first stop request, then drains: stop accepting, let in-flight
//! requests finish up to the drain timeout, answer the rest with `UNAVAILABLE`, remove the
//! socket file. A later stop request cuts the drain short.
//!
//! Where stop requests come from is the caller's business: `main` turns SIGTERM and SIGINT
//! into them; a test can run the whole server in-process and stop it through a channel.
//!
//! With TLS (`tls_cert`, `grpc_tls_cert`), the certificates are read before anything starts (a
//! file that does not load stops start-up), and again on each reload.
//!
//! Under systemd (`run_with`), listeners handed over by socket activation replace the ones the
//! configuration names, and the manager is told `READY=1` once the gateway serves (NATS
//! connected, or the start-up wait for it over: what `/ready` waits for besides NATS),
//! `RELOADING=1` … `READY=1` around each reload, `STOPPING=1` when the drain starts, and
//! `WATCHDOG=1` at half of `WATCHDOG_USEC` for as long as the runtime runs its tasks.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::core::Gateway;
use crate::frontend::uds::{self, UdsListener};
use crate::frontend::{grpc, ws};
use crate::ops::http;
use crate::ops::reload::{self, LoadConfig};
use crate::ops::systemd::{Notifier, Systemd};
use crate::tls::TlsPorts;

/// How long connections cut at the end of the drain have to be dropped.
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Serves until `stop` yields, then drains. Each item of `stop` is a stop request naming its
/// cause for the log (`"SIGTERM"`): the first starts the graceful drain, and any later one
/// during the drain answers what is still waiting with `UNAVAILABLE` at once. A stream that
/// ends asks for nothing more (the server then runs until its gRPC server fails).
pub async fn run(
    config: Config,
    stop: impl Stream<Item = &'static str> + Unpin,
    reloads: impl Stream<Item = ()> + Unpin + Send + 'static,
) -> Result<(), String> {
    let tls = TlsPorts::load(&config)?;
    run_with(config, tls, Systemd::default(), None, stop, reloads).await
}

/// `run`, with the ports' TLS as loaded from the configuration (`TlsPorts::load`, which `main`
/// calls first so that a bad certificate is a configuration error), with what systemd handed
/// over (`Systemd::from_env`): its listeners, its notification socket and its watchdog; and
/// with `load`, each reload also reads the configuration again and applies what can change
/// live (`ops::reload`).
pub async fn run_with(
    config: Config,
    tls: TlsPorts,
    systemd: Systemd,
    load: Option<LoadConfig>,
    mut stop: impl Stream<Item = &'static str> + Unpin,
    reloads: impl Stream<Item = ()> + Unpin + Send + 'static,
) -> Result<(), String> {
    let Systemd {
        listeners: handed,
        notifier,
        watchdog,
        notes,
    } = systemd;
    for note in notes {
        tracing::warn!("{note}");
    }
    for open in config.secret_files_open_to_others() {
        tracing::warn!(
            "{} {}: every user of this host may read it (mode {:o}); make it readable by the gateway's user only (chmod 600, or 640 with a group of its own)",
            open.setting,
            open.path.display(),
            open.mode
        );
    }
    let gateway = Gateway::new(config.clone()).await?;
    let listener = match handed.uds {
        Some(listener) => UdsListener::activated(listener)
            .map_err(|e| format!("socket handed over by systemd: {e}"))?,
        None => UdsListener::bind(&config.socket, config.socket_mode)
            .await
            .map_err(|e| socket_error(&config.socket, &e))?,
    };
    if listener.path() != config.socket {
        tracing::warn!(
            socket = %listener.path().display(),
            configured = %config.socket.display(),
            "the socket handed over by systemd is not the configured socket; clients of the configured path will not find it"
        );
    }
    let http_listener = match handed.http {
        Some(listener) => tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("HTTP port handed over by systemd: {e}"))?,
        None => http::bind(config.http)
            .await
            .map_err(|e| port_error("--http", config.http, &e))?,
    };
    let grpc_listener = match handed.grpc {
        Some(listener) => tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("gRPC port handed over by systemd: {e}"))?,
        None => grpc::bind(config.grpc)
            .await
            .map_err(|e| port_error("--grpc", config.grpc, &e))?,
    };
    let address = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string());
    info!(
        socket = %listener.path().display(),
        http = %address(&http_listener).unwrap_or_default(),
        grpc = %address(&grpc_listener).unwrap_or_default(),
        https = tls.http.is_some(),
        grpc_tls = tls.grpc.is_some(),
        nats = %config.nats_url,
        "ipc-gateway started"
    );
    if config.http.ip().is_unspecified() && config.public_origins.is_empty() {
        tracing::warn!(
            http = %config.http,
            "only pages loaded from loopback may open /ws: list the origins browsers use for this gateway in public_origins"
        );
    }
    for port in tls.each() {
        port.report_expiry(gateway.metrics());
    }
    let tls = std::sync::Arc::new(tls);
    let notifier = std::sync::Arc::new(notifier);
    let upkeep = tokio::spawn(refresh_gauges(gateway.clone(), notifier.clone()));
    let reloader = tokio::spawn(reload_on_request(
        gateway.clone(),
        (config.clone(), load),
        tls.clone(),
        reloads,
        notifier.clone(),
    ));
    let pinger = watchdog.map(|every| tokio::spawn(ping_watchdog(notifier.clone(), every)));
    let supervisor = {
        let gateway = gateway.clone();
        tokio::spawn(async move { gateway.supervise_pool().await })
    };
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        gateway.clone(),
        (http_listener, tls.http.clone()),
        http_routes(gateway.clone()),
        http_stop.clone().cancelled_owned(),
    ));
    let mut uds_task = tokio::spawn(uds::serve(gateway.clone(), listener));
    let mut grpc_task = tokio::spawn(grpc::serve(
        gateway.clone(),
        grpc_listener,
        tls.grpc.clone(),
    ));
    let mut failure = None;
    // Gateway::new waited for NATS (or gave up waiting) and the listeners accept: what a
    // client can expect from here is what /ready says.
    notifier.ready(&serving_status(&gateway));

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
    notifier.stopping();
    let drain = gateway.live().drain_timeout();
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
    // Connections the drain could not end are closed now, and dropped before the audit log
    // closes (their disconnect records with it).
    if !gateway.connections().is_empty() {
        gateway.shutdown().cut_remaining();
        let _ = tokio::time::timeout(CUT_WAIT, gateway.connections().wait()).await;
    }
    gateway.flush().await;
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), http_task).await;
    upkeep.abort();
    reloader.abort();
    if let Some(pinger) = pinger {
        pinger.abort();
    }
    // A gRPC server still running past the deadline is dropped now, before the audit log
    // closes: its connections' disconnect records come as they drop.
    if !grpc_task.is_finished() {
        grpc_task.abort();
        let _ = (&mut grpc_task).await;
    }
    let still_open = gateway.connections().len();
    if still_open > 0 {
        warn!(
            still_open,
            "connections still open at exit; their disconnect records are lost"
        );
    }
    // Last: every operation answered before now has its record on disk.
    gateway.close_audit().await;
    supervisor.abort();
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

/// Each reload request (SIGHUP) reloads the configuration's live settings (with a loader),
/// the policy, the audit file and the TLS certificates and client CAs; what does not load
/// keeps what is in force (the gateway logs why). systemd hears `RELOADING=1` before and `READY=1` after, whether or not it loaded.
async fn reload_on_request(
    gateway: Gateway,
    (mut current, load): (Config, Option<LoadConfig>),
    tls: std::sync::Arc<TlsPorts>,
    mut reloads: impl Stream<Item = ()> + Unpin,
    notifier: std::sync::Arc<Notifier>,
) {
    while reloads.next().await.is_some() {
        info!("SIGHUP: reloading");
        notifier.reloading();
        reload::reload(&gateway, &mut current, load.as_ref()).await;
        reload_tls(&gateway, &tls).await;
        notifier.ready(&serving_status(&gateway));
    }
}

/// Reads the certificates again, off the runtime's threads (file I/O).
async fn reload_tls(gateway: &Gateway, tls: &std::sync::Arc<TlsPorts>) {
    let (tls, metrics) = (tls.clone(), gateway.metrics().clone());
    let _ = tokio::task::spawn_blocking(move || {
        for port in tls.each() {
            port.reload(&metrics);
        }
    })
    .await;
}

/// `STATUS=` for systemctl status: whether NATS is connected.
fn serving_status(gateway: &Gateway) -> String {
    let ready = gateway.readiness();
    format!(
        "serving; NATS connections {}/{}",
        ready.nats_connected, ready.nats_pool_size
    )
}

/// `WATCHDOG=1` at half the interval systemd asked for. A task of the runtime: a runtime that
/// no longer runs its tasks (blocked, deadlocked) stops pinging, and systemd restarts it.
async fn ping_watchdog(notifier: std::sync::Arc<Notifier>, every: Duration) {
    let mut tick = tokio::time::interval(every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notifier.watchdog();
    }
}

/// Every 5 s: the gauges, and systemd's `STATUS=` when NATS connections came or went.
async fn refresh_gauges(gateway: Gateway, notifier: std::sync::Arc<Notifier>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut status = String::new();
    loop {
        tick.tick().await;
        gateway.refresh_gauges();
        // During the drain the status stays "draining".
        if notifier.is_on() && !gateway.readiness().shutting_down {
            let now = serving_status(&gateway);
            if now != status {
                notifier.notify(&format!("STATUS={now}"));
                status = now;
            }
        }
    }
}
