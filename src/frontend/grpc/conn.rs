//! gRPC connections: accepts TCP connections within the gateway's shared `max_connections`
//! and gives each one its state: its slot, its NATS lane (so the connection's publishes reach
//! NATS in order), its rate limit, and its place among the connections the drain waits for.
//! tonic hands that state to every call on the connection as a request extension. A connection
//! over the limit is served briefly so that its calls get OVERLOADED (rather than a reset that
//! clients report as UNKNOWN), then closed; past a few such at once, it is closed at once.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::core::ratelimit::RateLimit;
use crate::core::{Gateway, Lane};
use crate::protocol::Frontend;
use crate::protocol::{ErrorCode, GatewayError};
use crate::telemetry::metrics::Metrics;

/// Connections over the limit that may be answered OVERLOADED at once.
const MAX_POLITE_REFUSALS: usize = 64;
/// How long a refused connection stays open for its calls to get their answer.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// Whether the connection holds one of the gateway's connection slots. The permits are never
/// read: holding them is the point, and dropping the state gives them back.
#[allow(dead_code)]
enum Slot {
    Served(OwnedSemaphorePermit),
    /// Over `max_connections`: every call is refused; holds a polite-refusal permit.
    Refused(OwnedSemaphorePermit),
}

/// What every call on one HTTP/2 connection shares.
pub struct ConnState {
    pub lane: Lane,
    /// `None` when no rate limit is configured: calls then take no lock.
    limit: Option<Mutex<RateLimit>>,
    metrics: Arc<Metrics>,
    slot: Slot,
    max_connections: usize,
    /// Keeps the drain waiting until the connection is gone.
    _tracked: TaskTrackerToken,
}

impl ConnState {
    /// Refuses every call of a connection over the connection limit.
    pub fn check_served(&self) -> Result<(), GatewayError> {
        match self.slot {
            Slot::Served(_) => Ok(()),
            Slot::Refused(_) => Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "the gateway serves its maximum of {} connections; retry later",
                    self.max_connections
                ),
            )),
        }
    }

    /// Admits one call carrying `bytes` of payload: the connection is served and within its
    /// rate limit.
    pub fn admit(&self, bytes: usize) -> Result<(), GatewayError> {
        self.check_served()?;
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
        if let Slot::Served(_) = self.slot {
            self.metrics.connection_closed(Frontend::Grpc);
        }
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
    /// For a refused connection: when reading ends (hyper then closes the connection).
    close_at: Option<Pin<Box<tokio::time::Sleep>>>,
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
        if let Some(close_at) = &mut self.close_at
            && close_at.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(()));
        }
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

/// The connections tonic serves. One over the connection limit is counted, and refused
/// politely or closed at once (see the top of the file); an accept error backs off instead
/// of spinning.
pub fn incoming(
    gateway: Gateway,
    listener: TcpListener,
) -> impl Stream<Item = Result<GrpcConn, io::Error>> {
    let refusals = Arc::new(Semaphore::new(MAX_POLITE_REFUSALS));
    let state = (gateway, listener, refusals);
    futures_util::stream::unfold(state, |(gateway, listener, refusals)| async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    warn!(error = %err, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (slot, close_at) = match gateway.try_connection_slot() {
                Some(slot) => (Slot::Served(slot), None),
                None => {
                    debug!("refusing a gRPC connection: the connection limit is reached");
                    gateway.metrics().connection_rejected(Frontend::Grpc);
                    let Ok(polite) = refusals.clone().try_acquire_owned() else {
                        continue;
                    };
                    let close_at = Box::pin(tokio::time::sleep(REFUSAL_GRACE));
                    (Slot::Refused(polite), Some(close_at))
                }
            };
            // Replies are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            let config = gateway.config();
            let limit = RateLimit::new(
                config.rate_limit_requests_per_sec,
                config.rate_limit_bytes_per_sec,
            );
            let metrics = gateway.metrics().clone();
            if let Slot::Served(_) = slot {
                metrics.connection_opened(Frontend::Grpc);
            }
            let state = Arc::new(ConnState {
                lane: gateway.new_lane(),
                limit: (!limit.is_off()).then(|| Mutex::new(limit)),
                metrics,
                slot,
                max_connections: config.max_connections,
                _tracked: gateway.connections().token(),
            });
            let conn = GrpcConn {
                stream,
                state,
                close_at,
            };
            return Some((Ok(conn), (gateway, listener, refusals)));
        }
    })
}
