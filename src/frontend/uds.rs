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
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::core::{Caller, Gateway, Slot};
use crate::protocol::{Frontend, GatewayError, Id, Identity, Outbound, WireDecoder, WireFormat};

use super::lifecycle::{Idle, Lifecycle, RefusalBudget, WriteRules};
use super::outbox::Outbox;
use super::session::{Flow, Session};

/// Events the writer takes per batch; bounds one batch's buffer together with `FLUSH_AT`.
const MAX_BATCH_EVENTS: usize = 512;
/// Write out once this many bytes are encoded, even mid-batch.
const FLUSH_AT: usize = 64 * 1024;
/// Reads take up to this much at a time (and the buffer is reused), so a pipelining client's
/// requests arrive in few system calls.
const READ_BUFFER: usize = 64 * 1024;
/// Commands handled per wakeup of the reader: after the first, those already read are taken
/// without another trip through the reader's `select!` (whose futures cost a few locks each).
const COMMANDS_PER_WAKEUP: usize = 64;

/// The bound socket; removes its file when dropped, unless it was handed over (socket
/// activation: the file belongs to systemd's `.socket` unit).
pub struct UdsListener {
    listener: UnixListener,
    path: PathBuf,
    owns_file: bool,
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
            owns_file: true,
        })
    }

    /// A listener handed over by socket activation: its file's owner and mode are the
    /// `.socket` unit's, and the file stays when the gateway exits (systemd owns it).
    pub fn activated(listener: std::os::unix::net::UnixListener) -> io::Result<UdsListener> {
        let path = listener
            .local_addr()?
            .as_pathname()
            .map(Path::to_owned)
            .unwrap_or_default();
        Ok(UdsListener {
            listener: UnixListener::from_std(listener)?,
            path,
            owns_file: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UdsListener {
    fn drop(&mut self) {
        if self.owns_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Accepts connections until shutdown begins, then waits for every connection to finish.
pub async fn serve(gateway: Gateway, listener: UdsListener) {
    let refusals = RefusalBudget::default();
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
        // The place under max_connections is taken at accept, before the identity is looked
        // up, so that connections count in the order they came.
        match gateway.slot() {
            Ok(slot) => {
                let connection = accept_connection(gateway.clone(), stream, slot, refusals.clone());
                tracker.spawn(gateway.connections().track_future(connection));
            }
            Err(refusal) => {
                gateway.metrics().connection_rejected(Frontend::Uds);
                tracker.spawn(reject_connection(stream, refusal, refusals.polite()));
            }
        }
    }
    gateway.set_listener_up(false);
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Takes the caller's identity from the kernel (SO_PEERCRED: uid, gid, pid; the names once
/// per user), then serves the connection, or refuses it when a limit is reached.
async fn accept_connection(
    gateway: Gateway,
    stream: UnixStream,
    slot: Slot,
    refusals: RefusalBudget,
) {
    let identity = match stream.peer_cred() {
        Ok(cred) => {
            gateway
                .local_identity(cred.uid(), cred.gid(), cred.pid())
                .await
        }
        Err(err) => {
            warn!(error = %err, "no peer credentials on a Unix-socket connection");
            Identity::anonymous(Frontend::Uds, None)
        }
    };
    match gateway.connect_with(Frontend::Uds, identity, slot) {
        Ok(caller) => serve_connection(gateway, stream, caller).await,
        Err(refusal) => {
            gateway.metrics().connection_rejected(Frontend::Uds);
            reject_connection(stream, refusal, refusals.polite()).await
        }
    }
}

/// Tells a client over the connection limit why, in the format it speaks (when the refusal
/// budget allows waiting to learn it), then closes.
async fn reject_connection(
    mut stream: UnixStream,
    refusal: GatewayError,
    polite: Option<OwnedSemaphorePermit>,
) {
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
            error: refusal,
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

async fn serve_connection(gateway: Gateway, stream: UnixStream, caller: Caller) {
    let config = gateway.config();
    let max_inflight = config.max_inflight_per_connection;
    let (read, write) = stream.into_split();
    let outbox = Arc::new(Outbox::new(config.subscription_queue));
    let format = Arc::new(OnceLock::new());
    let peer_gone = CancellationToken::new();
    let mut life = Lifecycle::new(&gateway, Frontend::Uds);
    let writer = tokio::spawn(write_loop(
        write,
        outbox.clone(),
        format.clone(),
        peer_gone.clone(),
        life.writes().clone(),
    ));
    let mut frames =
        FramedRead::with_capacity(read, WireDecoder::new(config.max_frame_bytes), READ_BUFFER);
    let mut session = Session::new(gateway.clone(), caller, outbox.clone());
    // The idle timer is re-armed lazily when it fires, not on every command.
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let idle_timer = tokio::time::sleep_until(life.idle_deadline().unwrap_or_else(far));
    tokio::pin!(idle_timer);
    let idle_on = life.idle_deadline().is_some();
    loop {
        if life.finished(session.has_unanswered(), session.has_subscriptions()) {
            break;
        }
        if !life.reads() {
            // A client that half-closed but keeps subscriptions open is served until it
            // closes completely.
            tokio::select! {
                biased;
                _ = peer_gone.cancelled() => break,
                _ = gateway.shutdown().stopped(), if !life.is_draining() => {
                    if life.begin_drain() {
                        session.close_subscriptions();
                    }
                }
                _ = outbox.wait_room(), if session.has_unanswered() => {}
                _ = hung_up(frames.get_ref()), if session.has_subscriptions() => break,
            }
            continue;
        }
        let has_room = outbox.pending() < max_inflight;
        let mut item = tokio::select! {
            biased;
            _ = peer_gone.cancelled() => {
                life.ends_because("client gone or stopped reading");
                break;
            }
            _ = gateway.shutdown().stopped(), if !life.is_draining() => {
                if life.begin_drain() {
                    session.close_subscriptions();
                }
                continue;
            }
            // Room to read more, or (draining) a step closer to having answered everything.
            _ = outbox.wait_room(), if !has_room || life.is_draining() => continue,
            _ = &mut idle_timer, if idle_on && !life.is_draining() => {
                let busy = session.has_subscriptions() || session.has_unanswered();
                match life.on_idle_timer(busy) {
                    Idle::Close => break,
                    Idle::CheckAt(at) => idle_timer.as_mut().reset(at),
                }
                continue;
            }
            item = frames.next(), if has_room => item,
        };
        // This item, then (up to a bound) those already read, while nothing else needs a look:
        // the checks the `select!` above makes first, made here cheaply.
        let mut handled = 0;
        loop {
            handled += 1;
            match item {
                Some(Ok(decoded)) => {
                    life.touch();
                    if format.get().is_none()
                        && let Some(sniffed) = frames.decoder().format()
                    {
                        let _ = format.set(sniffed);
                    }
                    if life.is_draining() {
                        session.refuse_shutting_down(decoded);
                    } else if session.handle(decoded).await == Flow::Close {
                        life.input_broke();
                        session.close_subscriptions();
                    }
                }
                Some(Err(err)) => {
                    debug!(error = %err, "read failed");
                    life.input_ended();
                }
                None => life.input_ended(),
            }
            let go_on = handled < COMMANDS_PER_WAKEUP
                && life.reads()
                && outbox.pending() < max_inflight
                && life.is_draining() == gateway.shutdown().is_stopping();
            if !go_on {
                break;
            }
            match frames.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
    }
    if life.reads() && life.is_draining() {
        refuse_buffered(&mut frames, &mut session);
        if let Some(sniffed) = frames.decoder().format() {
            let _ = format.set(sniffed);
        }
    }
    session.close_subscriptions();
    session.caller().closing(life.reason());
    outbox.close();
    drop(frames);
    let _ = writer.await;
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
    rules: WriteRules,
) {
    let mut buf = BytesMut::with_capacity(FLUSH_AT);
    while let Some(batch) = outbox.next_batch(MAX_BATCH_EVENTS).await {
        let wire = format.get().copied().unwrap_or(WireFormat::JsonLines);
        let mut outcome = Ok(());
        for event in &batch.events {
            wire.encode(event, &mut buf);
            if buf.len() >= FLUSH_AT {
                outcome = rules.send(write.write_all(&buf)).await;
                buf.clear();
                if outcome.is_err() {
                    break;
                }
            }
        }
        if outcome.is_ok() && !buf.is_empty() {
            outcome = rules.send(write.write_all(&buf)).await;
        }
        if outcome.is_err() {
            // The client is gone: its unwritten answers, queued or still to come, are lost.
            rules.lose(&outbox, batch.control);
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
