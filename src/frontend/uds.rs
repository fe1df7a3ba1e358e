//! The Unix-socket front-end: owns the socket file (refuse to start over a live one, replace a
//! stale one, remove it on exit), accepts connections up to the limit, and runs each one as a
//! reader (this task: decode and dispatch; the core puts answers into the outbox) plus a
//! writer task that drains the connection's outbox in batches, one write per wakeup.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::core::Gateway;
use crate::protocol::Frontend;
use crate::protocol::{ErrorCode, GatewayError, Id, Outbound, WireDecoder, WireFormat};
use crate::telemetry::metrics::Metrics;

use super::outbox::Outbox;
use super::session::{Flow, Session};

/// Events the writer takes per batch; bounds one batch's buffer together with `FLUSH_AT`.
const MAX_BATCH_EVENTS: usize = 512;
/// Write out once this many bytes are encoded, even mid-batch.
const FLUSH_AT: usize = 64 * 1024;
/// Reads take up to this much at a time (and the buffer is reused), so a pipelining client's
/// requests arrive in few system calls.
const READ_BUFFER: usize = 64 * 1024;
/// Connection-limit refusals that may wait (up to 2 s) to answer in the client's format.
const MAX_POLITE_REFUSALS: usize = 64;

/// The bound socket; removes its file when dropped.
pub struct UdsListener {
    listener: UnixListener,
    path: PathBuf,
}

impl UdsListener {
    /// Binds `path`. Refuses when another process answers on it; replaces a stale socket file;
    /// never deletes something that is not a socket.
    pub async fn bind(path: &Path, mode: u32) -> io::Result<UdsListener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; not replacing it",
                        path.display()
                    ),
                ));
            }
            match UnixStream::connect(path).await {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "another process is listening on {}; stop it or choose another --socket",
                            path.display()
                        ),
                    ));
                }
                Err(_) => {
                    info!(path = %path.display(), "replacing stale socket file");
                    std::fs::remove_file(path)?;
                }
            }
        }
        // Bind under a temporary name, set the mode, then rename into place: the socket is
        // never reachable with the umask's permissions.
        let name = path
            .file_name()
            .map_or_else(Default::default, |n| n.to_string_lossy());
        let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging)?;
        let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::fs::rename(&staging, path));
        if let Err(err) = placed {
            let _ = std::fs::remove_file(&staging);
            return Err(err);
        }
        Ok(UdsListener {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UdsListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts connections until shutdown begins, then waits for every connection to finish.
pub async fn serve(gateway: Gateway, listener: UdsListener) {
    // Refusals that wait to learn the client's format are few at a time; past that, a
    // connection is refused at once in JSON, so a flood cannot hold descriptors.
    let refusals = Arc::new(Semaphore::new(MAX_POLITE_REFUSALS));
    let tracker = TaskTracker::new();
    gateway.set_listener_up(true);
    info!(socket = %listener.path().display(), "listening on the Unix socket");
    loop {
        let accepted = tokio::select! {
            _ = gateway.shutdown().stopped() => break,
            accepted = listener.listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: back off instead of spinning.
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gateway = gateway.clone();
        match gateway.try_connection_slot() {
            Some(permit) => {
                let connection = gateway.connections().track_future(serve_connection(
                    gateway.clone(),
                    stream,
                    permit,
                ));
                tracker.spawn(connection);
            }
            None => match refusals.clone().try_acquire_owned() {
                Ok(refusal) => {
                    tracker.spawn(reject_connection(gateway, stream, Some(refusal)));
                }
                Err(_) => {
                    tracker.spawn(reject_connection(gateway, stream, None));
                }
            },
        }
    }
    gateway.set_listener_up(false);
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Tells a client over the connection limit why, in the format it speaks, then closes.
async fn reject_connection(
    gateway: Gateway,
    mut stream: UnixStream,
    polite: Option<OwnedSemaphorePermit>,
) {
    let max = gateway.config().max_connections;
    gateway.metrics().connection_rejected(Frontend::Uds);
    let mut first = [0u8; 1];
    let format = match &polite {
        Some(_) => {
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut first)).await {
                Ok(Ok(1)) => WireFormat::sniff(first[0]),
                _ => WireFormat::JsonLines,
            }
        }
        None => WireFormat::JsonLines,
    };
    let mut out = BytesMut::new();
    format.encode(
        &Outbound::Error {
            id: Id::Null,
            error: GatewayError::new(
                ErrorCode::Overloaded,
                format!("the gateway serves its maximum of {max} connections; retry later"),
            ),
        },
        &mut out,
    );
    if polite.is_none() {
        let _ = stream.try_write(&out);
        return;
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
    // Read what the client sent (for a second at most) so that it sees our answer and a clean
    // close rather than a reset.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn serve_connection(gateway: Gateway, stream: UnixStream, _slot: OwnedSemaphorePermit) {
    let metrics = gateway.metrics().clone();
    metrics.connection_opened(Frontend::Uds);
    let config = gateway.config();
    let max_inflight = config.max_inflight_per_connection;
    let (read, write) = stream.into_split();
    let outbox = Arc::new(Outbox::new(config.subscription_queue));
    let format = Arc::new(OnceLock::new());
    let peer_gone = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        write,
        outbox.clone(),
        format.clone(),
        peer_gone.clone(),
        metrics.clone(),
        Duration::from_millis(config.slow_client_stall_ms),
    ));
    let mut frames =
        FramedRead::with_capacity(read, WireDecoder::new(config.max_frame_bytes), READ_BUFFER);
    let mut session = Session::new(gateway.clone(), Frontend::Uds, outbox.clone());
    // `reading`: commands are still read (during a drain, only to be refused).
    // `draining`: shutdown began; answer what is in flight, refuse what is new, then close.
    let mut reading = true;
    let mut draining = false;
    let mut fatal = false;
    // The idle timer is re-armed lazily when it fires, not on every command.
    let idle = (config.idle_timeout_ms > 0).then(|| Duration::from_millis(config.idle_timeout_ms));
    let idle_timer = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(idle_timer);
    let mut last_activity = tokio::time::Instant::now();
    loop {
        let done_with_subscriptions = draining || fatal || !session.has_subscriptions();
        if !session.has_unanswered() && (draining || (!reading && done_with_subscriptions)) {
            break;
        }
        if !reading {
            // A client that half-closed but keeps subscriptions open is served until it
            // closes completely.
            tokio::select! {
                biased;
                _ = peer_gone.cancelled() => break,
                _ = gateway.shutdown().stopped(), if !draining => {
                    draining = true;
                    session.close_subscriptions();
                }
                _ = outbox.wait_room(), if session.has_unanswered() => {}
                _ = hung_up(frames.get_ref()), if session.has_subscriptions() => break,
            }
            continue;
        }
        let has_room = outbox.pending() < max_inflight;
        tokio::select! {
            biased;
            _ = peer_gone.cancelled() => break,
            _ = gateway.shutdown().stopped(), if !draining => {
                draining = true;
                session.close_subscriptions();
            }
            // Room to read more, or (draining) a step closer to having answered everything.
            _ = outbox.wait_room(), if !has_room || draining => {}
            _ = &mut idle_timer, if idle.is_some() && !draining => {
                let idle = idle.unwrap_or_default();
                let busy = session.has_subscriptions() || session.has_unanswered();
                if !busy && last_activity.elapsed() >= idle {
                    debug!(idle_ms = idle.as_millis() as u64, "closing an idle connection");
                    metrics.idle_disconnected(Frontend::Uds);
                    break;
                }
                let from = if busy { tokio::time::Instant::now() } else { last_activity };
                idle_timer.as_mut().reset(from + idle);
            }
            item = frames.next(), if has_room => match item {
                Some(Ok(decoded)) => {
                    if idle.is_some() {
                        last_activity = tokio::time::Instant::now();
                    }
                    if format.get().is_none()
                        && let Some(sniffed) = frames.decoder().format()
                    {
                        let _ = format.set(sniffed);
                    }
                    if draining {
                        session.refuse_shutting_down(decoded);
                    } else if session.handle(decoded).await == Flow::Close {
                        reading = false;
                        fatal = true;
                        session.close_subscriptions();
                    }
                }
                Some(Err(err)) => {
                    debug!(error = %err, "read failed");
                    reading = false;
                }
                None => reading = false,
            },
        }
    }
    if draining && reading {
        refuse_buffered(&mut frames, &mut session);
        if let Some(sniffed) = frames.decoder().format() {
            let _ = format.set(sniffed);
        }
    }
    session.close_subscriptions();
    outbox.close();
    drop(frames);
    let _ = writer.await;
    metrics.connection_closed(Frontend::Uds);
}

/// Resolves when the peer has closed the connection completely (not just its write side).
async fn hung_up(read: &OwnedReadHalf) {
    loop {
        match read.ready(Interest::WRITABLE).await {
            Ok(ready) if !ready.is_write_closed() => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            _ => return,
        }
    }
}

/// When a draining connection closes: commands already received but not yet handled get
/// `UNAVAILABLE`, so none is left without an answer.
fn refuse_buffered(frames: &mut FramedRead<OwnedReadHalf, WireDecoder>, session: &mut Session) {
    let mut buffer = std::mem::take(frames.read_buffer_mut());
    // What the kernel already holds for us counts as received too (bounded).
    while buffer.len() < (1 << 20) {
        match frames.get_ref().try_read_buf(&mut buffer) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    while let Ok(Some(item)) = frames.decoder_mut().decode(&mut buffer) {
        session.refuse_shutting_down(item);
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    outbox: Arc<Outbox>,
    format: Arc<OnceLock<WireFormat>>,
    peer_gone: CancellationToken,
    metrics: Arc<Metrics>,
    stall: Duration,
) {
    let mut buf = BytesMut::with_capacity(FLUSH_AT);
    // A write that cannot finish within the stall time means the client stopped reading:
    // the timer only starts when a write has to wait.
    let write_or_stall = async |write: &mut OwnedWriteHalf, bytes: &[u8]| -> Result<(), bool> {
        match tokio::time::timeout(stall, write.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(false),
            Err(_) => Err(true),
        }
    };
    while let Some(batch) = outbox.next_batch(MAX_BATCH_EVENTS).await {
        let wire = format.get().copied().unwrap_or(WireFormat::JsonLines);
        let mut outcome = Ok(());
        for event in &batch.events {
            wire.encode(event, &mut buf);
            if buf.len() >= FLUSH_AT {
                outcome = write_or_stall(&mut write, &buf).await;
                buf.clear();
                if outcome.is_err() {
                    break;
                }
            }
        }
        if outcome.is_ok() && !buf.is_empty() {
            outcome = write_or_stall(&mut write, &buf).await;
        }
        if let Err(stalled) = outcome {
            if stalled {
                debug!(
                    stall_ms = stall.as_millis() as u64,
                    "disconnecting a client that stopped reading"
                );
                metrics.slow_client_disconnected(Frontend::Uds);
            }
            // The client is gone: its unwritten answers, queued or still to come, are lost.
            let lost = batch.control + outbox.abandon();
            metrics.late_replies.increment(lost as u64);
            peer_gone.cancel();
            return;
        }
        if buf.capacity() > 4 * FLUSH_AT {
            buf = BytesMut::with_capacity(FLUSH_AT);
        }
        buf.clear();
        outbox.written(batch.control);
    }
    let _ = write.shutdown().await;
}
