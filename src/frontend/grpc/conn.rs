//! gRPC connections: accepts TCP connections within the gateway's shared `max_connections`
//! and gives each one its state: the core's `Caller` (slot, lane, rate limit) and its place
//! among the connections the drain waits for.
//! tonic hands that state to every call on the connection as a request extension. A connection
//! over the limit is served briefly so that its calls get OVERLOADED (rather than a reset that
//! clients report as UNKNOWN), then closed; past a few such at once, it is closed at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::core::{Caller, Gateway};
use crate::frontend::lifecycle::RefusalBudget;
use crate::protocol::{ErrorCode, Frontend, GatewayError, Identity};

/// How long a refused connection stays open for its calls to get their answer.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// Whether the connection was admitted under `max_connections`.
enum Admitted {
    Served(Caller),
    /// Over the limit: every call gets this refusal. The permit (held, never read) is the
    /// connection's share of the polite-refusal budget.
    Refused(GatewayError, #[allow(dead_code)] OwnedSemaphorePermit),
}

/// What every call on one HTTP/2 connection shares.
pub struct ConnState {
    admitted: Admitted,
    /// Keeps the drain waiting until the connection is gone.
    _tracked: TaskTrackerToken,
}

impl ConnState {
    /// The connection as the core knows it, or the refusal of a connection over the limit.
    pub fn caller(&self) -> Result<&Caller, GatewayError> {
        match &self.admitted {
            Admitted::Served(caller) => Ok(caller),
            Admitted::Refused(refusal, _) => Err(refusal.clone()),
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
    let state = (gateway, listener, RefusalBudget::default());
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
            // Until a call shows a token, its caller is the anonymous peer at this address.
            let addr = stream.peer_addr().ok().map(|addr| addr.to_string());
            let anonymous = Identity::anonymous(Frontend::Grpc, addr);
            let (admitted, close_at) = match gateway.connect(Frontend::Grpc, anonymous) {
                Ok(caller) => (Admitted::Served(caller), None),
                Err(refusal) => {
                    debug!("refusing a gRPC connection: the connection limit is reached");
                    let Some(polite) = refusals.polite() else {
                        continue;
                    };
                    let close_at = Box::pin(tokio::time::sleep(REFUSAL_GRACE));
                    (Admitted::Refused(refusal, polite), Some(close_at))
                }
            };
            // Replies are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            let state = Arc::new(ConnState {
                admitted,
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
