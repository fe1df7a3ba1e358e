//! gRPC connections: accepts TCP connections within the gateway's shared `max_connections`
//! and gives each one its state: its slot, its NATS lane (so the connection's publishes reach
//! NATS in order), its rate limit, and its place among the connections the drain waits for.
//! tonic hands that state to every call on the connection as a request extension.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::core::ratelimit::RateLimit;
use crate::core::{Gateway, Lane};
use crate::ops::metrics::{Frontend, Metrics};
use crate::protocol::{ErrorCode, GatewayError};

/// What every call on one HTTP/2 connection shares.
pub struct ConnState {
    pub lane: Lane,
    /// `None` when no rate limit is configured: calls then take no lock.
    limit: Option<Mutex<RateLimit>>,
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
    /// Keeps the drain waiting until the connection is gone.
    _tracked: TaskTrackerToken,
}

impl ConnState {
    /// Admits one call carrying `bytes` of payload against the connection's rate limit.
    pub fn admit(&self, bytes: usize) -> Result<(), GatewayError> {
        match &self.limit {
            None => Ok(()),
            Some(limit) => limit
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .admit(bytes, tokio::time::Instant::now()),
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.metrics.connection_closed(Frontend::Grpc);
    }
}

/// The state of the connection a call came on.
pub fn state_of<T>(request: &tonic::Request<T>) -> Result<Arc<ConnState>, GatewayError> {
    request
        .extensions()
        .get::<Arc<ConnState>>()
        .cloned()
        .ok_or_else(|| GatewayError::new(ErrorCode::Internal, "a call without its connection"))
}

/// An accepted connection: the socket plus its state.
pub struct GrpcConn {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl Connected for GrpcConn {
    type ConnectInfo = Arc<ConnState>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.state.clone()
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections tonic serves. One over the connection limit is counted and closed at once
/// (its client sees UNAVAILABLE and may retry); an accept error backs off instead of spinning.
pub fn incoming(
    gateway: Gateway,
    listener: TcpListener,
) -> impl Stream<Item = Result<GrpcConn, io::Error>> {
    futures_util::stream::unfold((gateway, listener), |(gateway, listener)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    warn!(error = %err, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = gateway.try_connection_slot() else {
                debug!("refusing a gRPC connection: the connection limit is reached");
                gateway.metrics().connection_rejected(Frontend::Grpc);
                continue;
            };
            // Replies are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            let config = gateway.config();
            let limit = RateLimit::new(
                config.rate_limit_requests_per_sec,
                config.rate_limit_bytes_per_sec,
            );
            let metrics = gateway.metrics().clone();
            metrics.connection_opened(Frontend::Grpc);
            let state = Arc::new(ConnState {
                lane: gateway.new_lane(),
                limit: (!limit.is_off()).then(|| Mutex::new(limit)),
                metrics,
                _slot: slot,
                _tracked: gateway.connections().token(),
            });
            return Some((Ok(GrpcConn { stream, state }), (gateway, listener)));
        }
    })
}
