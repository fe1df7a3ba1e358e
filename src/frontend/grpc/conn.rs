//! gRPC connections: accepts TCP connections within the gateway's shared `max_connections`
//! and gives each one its state: the core's `Caller` (slot, lane, rate limit) and its place
//! among the connections the drain waits for.
//! tonic hands that state to every call on the connection as a request extension. A connection
//! over the limit is served briefly so that its calls get OVERLOADED (rather than a reset that
//! clients report as UNKNOWN), then closed; past a few such at once, it is closed at once.
//! With TLS (`tls.rs`), the handshake comes between taking the place and admitting the
//! connection. Every open connection's socket is listed (`OpenSockets`), so that the shutdown's
//! cut (`Shutdown::cut`) can shut down the ones the drain could not end (a client that stopped
//! answering HTTP/2's goodbye): hyper then reads end-of-stream and drops the connection, and its
//! disconnect record is written before the audit log closes. The list is touched when a
//! connection opens and closes, never per read or write.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
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
use crate::tls::{MaybeTls, PeerCert, Tls};

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

/// The sockets of the open connections. A descriptor number names one socket while it is open,
/// and a connection leaves the list before its socket closes, so the number is the key.
#[derive(Default)]
struct OpenSockets {
    sockets: Mutex<HashSet<RawFd>>,
}

impl OpenSockets {
    fn sockets(&self) -> MutexGuard<'_, HashSet<RawFd>> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn list(self: &Arc<Self>, stream: &MaybeTls) -> Listed {
        let fd = stream.tcp().as_raw_fd();
        self.sockets().insert(fd);
        Listed {
            open: self.clone(),
            fd,
        }
    }

    /// Shuts down every listed socket, both ways. Under the lock: a connection leaves the list
    /// (`Listed`'s drop) before its socket is closed, so every descriptor here is still its own.
    fn shut_down_all(&self) {
        for fd in self.sockets().iter() {
            // SAFETY: `shutdown(2)` on a descriptor that is open (see above); it closes nothing.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
    }
}

/// A connection's place in `OpenSockets`; dropped before the socket (field order).
struct Listed {
    open: Arc<OpenSockets>,
    fd: RawFd,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.open.sockets().remove(&self.fd);
    }
}

/// An accepted connection: the socket plus its state.
pub struct GrpcConn {
    /// Before `stream`: fields drop in order, so the socket leaves the list before it closes.
    _listed: Listed,
    stream: MaybeTls,
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
/// of spinning. With TLS, each accepted connection takes its place first and then shakes hands
/// in a task of its own (within the handshake timeout), so a slow or silent client never holds
/// up the accept loop; it is served once its handshake is done, and its verified client
/// certificate is part of its identity.
pub fn incoming(
    gateway: Gateway,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
) -> impl Stream<Item = Result<GrpcConn, io::Error>> {
    let open = Arc::new(OpenSockets::default());
    let (shutdown, to_cut) = (gateway.shutdown().clone(), open.clone());
    tokio::spawn(async move {
        shutdown.cut().await;
        to_cut.shut_down_all();
    });
    let accepting = Accepting {
        gateway,
        listener,
        refusals: RefusalBudget::default(),
        tls,
        handshakes: FuturesUnordered::new(),
        open,
    };
    futures_util::stream::unfold(accepting, |mut accepting| async move {
        loop {
            let stream = tokio::select! {
                Some(shaken) = accepting.handshakes.next(), if !accepting.handshakes.is_empty() => {
                    match shaken {
                        Ok(Some(conn)) => return Some((Ok(conn), accepting)),
                        _ => continue,
                    }
                }
                accepted = accepting.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        warn!(error = %err, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Replies are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            let Some(tls) = accepting.tls.clone() else {
                let connected = accepting
                    .gateway
                    .connect(Frontend::Grpc, peer(&stream, None));
                match admit(&accepting, connected, MaybeTls::Plain(stream)) {
                    Some(conn) => return Some((Ok(conn), accepting)),
                    None => continue,
                }
            };
            let slot = accepting.gateway.slot();
            // A refusal shakes hands only while the polite budget lasts: past it, closed now.
            let polite = match &slot {
                Ok(_) => None,
                Err(_) => {
                    accepting
                        .gateway
                        .metrics()
                        .connection_rejected(Frontend::Grpc);
                    match accepting.refusals.polite() {
                        Some(polite) => Some(polite),
                        None => continue,
                    }
                }
            };
            let (gateway, refusals) = (accepting.gateway.clone(), accepting.refusals.clone());
            let open = accepting.open.clone();
            accepting.handshakes.push(tokio::spawn(async move {
                let (stream, cert) = match tls.accept(stream).await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        debug!(error = %err, "gRPC TLS handshake failed");
                        return None;
                    }
                };
                let identity = peer(stream.tcp(), cert);
                let connected = slot.and_then(|slot| {
                    let connected = gateway.connect_with(Frontend::Grpc, identity, slot);
                    if connected.is_err() {
                        // Held its maximum per identity: counted like `Gateway::connect` does.
                        gateway.metrics().connection_rejected(Frontend::Grpc);
                    }
                    connected
                });
                admit_with(&gateway, (&refusals, polite), &open, connected, stream)
            }));
        }
    })
}

/// What the accept loop keeps between connections.
struct Accepting {
    gateway: Gateway,
    listener: TcpListener,
    refusals: RefusalBudget,
    tls: Option<Arc<Tls>>,
    /// Handshakes under way, each in its own task.
    handshakes: FuturesUnordered<tokio::task::JoinHandle<Option<GrpcConn>>>,
    open: Arc<OpenSockets>,
}

/// Until a call shows a token, its caller is the peer at this address, with its verified
/// client certificate if it showed one.
fn peer(stream: &TcpStream, cert: Option<PeerCert>) -> Identity {
    let addr = stream.peer_addr().ok().map(|addr| addr.to_string());
    Identity {
        cert: cert.map(|PeerCert(subject)| subject.to_string()),
        ..Identity::anonymous(Frontend::Grpc, addr)
    }
}

fn admit(
    accepting: &Accepting,
    connected: Result<Caller, GatewayError>,
    stream: MaybeTls,
) -> Option<GrpcConn> {
    admit_with(
        &accepting.gateway,
        (&accepting.refusals, None),
        &accepting.open,
        connected,
        stream,
    )
}

/// The connection served, or refused politely while the budget lasts (`None`: closed now).
/// `polite` is a permit of the budget taken already, if any.
fn admit_with(
    gateway: &Gateway,
    (refusals, polite): (&RefusalBudget, Option<OwnedSemaphorePermit>),
    open: &Arc<OpenSockets>,
    connected: Result<Caller, GatewayError>,
    stream: MaybeTls,
) -> Option<GrpcConn> {
    let (admitted, close_at) = match connected {
        Ok(caller) => (Admitted::Served(caller), None),
        Err(refusal) => {
            debug!("refusing a gRPC connection: {refusal}");
            let polite = polite.or_else(|| refusals.polite())?;
            let close_at = Box::pin(tokio::time::sleep(REFUSAL_GRACE));
            (Admitted::Refused(refusal, polite), Some(close_at))
        }
    };
    let state = Arc::new(ConnState {
        admitted,
        _tracked: gateway.connections().token(),
    });
    Some(GrpcConn {
        _listed: open.list(&stream),
        stream,
        state,
        close_at,
    })
}
