//! The gRPC front-end: service `ipcgateway.v1.Gateway` (proto/gateway.proto) on its own port,
//! beside `grpc.health.v1.Health` (SERVING only while the gateway is ready) and server
//! reflection in both versions clients use (v1, and v1alpha for grpcurl and Python's
//! grpcio-reflection). This file sets the server up and runs it until the drain; the rpcs are
//! in `service.rs`.

pub mod codec;
pub mod conn;
pub mod metadata;
mod named;
pub mod service;
pub mod status;
pub mod stream;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::info;

use crate::core::Gateway;

/// The code generated from proto/gateway.proto, client included (tests, benchmarks, and
/// programs written in Rust use it).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ipcgateway.v1");

    /// The encoded descriptors of gateway.proto, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("gateway_descriptor");
}

/// The fully qualified service name, as health checks and reflection name it.
pub const SERVICE_NAME: &str = "ipcgateway.v1.Gateway";

/// How often the health service looks at the gateway's readiness.
const HEALTH_POLL: Duration = Duration::from_millis(200);
/// Room beyond `max_frame_bytes` that tonic lets a message have, so that the gateway itself
/// refuses a message just over the limit, and an Exchange stream goes on after it (a message
/// over tonic's limit ends the stream; `status::too_large_refusal` names it TOO_LARGE too).
const DECODE_SLACK: usize = 64 * 1024;

/// Binds the gRPC port now, so a taken port fails start-up.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves gRPC until shutdown begins, then lets calls in flight finish (Subscribe and
/// Exchange streams end themselves on shutdown) and returns when every connection is closed.
pub async fn serve(
    gateway: Gateway,
    listener: TcpListener,
    tls: Option<std::sync::Arc<crate::tls::Tls>>,
) -> Result<(), String> {
    let config = gateway.config().clone();
    let (reporter, health) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(gateway.clone(), reporter));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let service =
        pb::gateway_server::GatewayServer::new(service::GatewayService::new(gateway.clone()))
            .max_decoding_message_size(config.max_frame_bytes.saturating_add(DECODE_SLACK));
    let keepalive =
        (config.grpc_keepalive_ms > 0).then(|| Duration::from_millis(config.grpc_keepalive_ms));
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    info!(grpc = %address, tls = tls.is_some(), "listening for gRPC");
    let stop = {
        let gateway = gateway.clone();
        async move { gateway.shutdown().stopped().await }
    };
    let served = Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive)
        .max_concurrent_streams(config.grpc_max_concurrent_streams)
        .tcp_nodelay(true)
        .layer(tower::util::MapResponseLayer::new(
            status::too_large_refusal::<tonic::body::Body>,
        ))
        .add_service(service)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(conn::incoming(gateway.clone(), listener, tls), stop)
        .await;
    health_task.abort();
    served.map_err(|e| format!("gRPC server: {e}"))
}

/// Keeps the health service in step with `/ready`: SERVING while the gateway is ready (NATS
/// connected, not shutting down), NOT_SERVING otherwise, for the whole server ("") and for
/// the Gateway service.
async fn report_health(gateway: Gateway, reporter: HealthReporter) {
    let mut reported = None;
    loop {
        let ready = gateway.readiness().ready;
        if reported != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            reported = Some(ready);
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}
