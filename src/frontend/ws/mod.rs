//! The WebSocket front-end: `GET /ws` on the HTTP port. It speaks the same envelope as the Unix
//! socket through the same `Session` and `Outbox`: a text message carries one JSON envelope, a
//! binary message carries exactly one binary frame (v1), and the answers come back in the
//! format of the connection's first message, one event per WebSocket message. Browser pages
//! from foreign origins are refused before the upgrade.
//!
//! One task serves a connection, reading and writing: an idle connection is then one small
//! future and its socket (no split halves, writer task, channel or buffers: `frame.rs` says
//! why the WebSocket protocol is our own), which is what keeps ten thousand idle browsers
//! cheap. The same task pings (the heartbeat), enforces the
//! idle timeout, and disconnects a client whose socket stays full past the stall time.

pub mod frame;
mod handshake;
mod socket;

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::task::Poll;
use tokio::time::Instant;
use tracing::debug;

use crate::config::Config;
use crate::core::auth;
use crate::core::{Caller, Gateway, HeldSlot};
use crate::protocol::Frontend;
use crate::protocol::binary::BinaryDecoder;
use crate::protocol::{Decoded, ErrorCode, GatewayError, Id, Identity, Outbound, WireFormat, json};
use crate::tls::PeerCert;

use super::lifecycle::{Broken, Idle, Lifecycle};
use super::outbox::{Batch, Outbox};
use super::session::{Flow, Session};
use frame::{Control, Kind, control_frame, put_message};
pub use frame::{Message, ReadError};
use handshake::Handshake;
use socket::{Broken as ReadBroken, Limits, WsSocket};

/// Events sent per batch before the writer flushes.
const MAX_BATCH_EVENTS: usize = 256;
/// How long the closing handshake may take once the gateway has said goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Close codes the gateway ends a WebSocket with. The 4000s are this gateway's own (RFC 6455
/// leaves them to applications); the reason text says more.
pub mod close {
    /// Done: the gateway or the client said goodbye.
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down.
    pub const AWAY: u16 = 1001;
    /// The client broke RFC 6455.
    pub const PROTOCOL: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID: u16 = 1007;
    /// A rule of the gateway's (idle time, heartbeat, unrecoverable input).
    pub const POLICY: u16 = 1008;
    /// A message far over the limit.
    pub const SIZE: u16 = 1009;
    /// The client did not read its messages for longer than the stall time.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// `GET /ws`: checks the origin and the connection limit, then upgrades. On the HTTP port the
/// connection already holds a place under `max_connections` (a `HeldSlot` in the request's
/// extensions): the WebSocket takes it over, so the connection is counted once.
pub async fn upgrade(
    State(gateway): State<Gateway>,
    held: Option<Extension<HeldSlot>>,
    cert: Option<Extension<PeerCert>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    handshake: Handshake,
) -> Response {
    let batched = match wants_batches(query.as_deref()) {
        Ok(batched) => batched,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    if let Err(origin) = origin_allowed(gateway.config(), &headers) {
        debug!(%origin, "refusing a WebSocket from a foreign origin");
        return (
            StatusCode::FORBIDDEN,
            format!(
                "origin {origin} may not open /ws (see --public-origins and --ws-allowed-origins)"
            ),
        )
            .into_response();
    }
    let cert = cert.map(|Extension(PeerCert(subject))| subject.to_string());
    let (identity, wants_v1) = match identify(&gateway, &headers, cert) {
        Ok(identified) => identified,
        Err(refusal) => {
            debug!(error = %refusal, "refusing a WebSocket without valid credentials");
            return (StatusCode::UNAUTHORIZED, refusal.to_string()).into_response();
        }
    };
    let slot = held.and_then(|Extension(held)| held.take());
    let connected = match slot {
        Some(slot) => gateway.connect_with(Frontend::Ws, identity, slot),
        None => gateway.connect(Frontend::Ws, identity),
    };
    let caller = match connected {
        Ok(caller) => caller,
        Err(refusal) => {
            return (StatusCode::SERVICE_UNAVAILABLE, refusal.to_string()).into_response();
        }
    };
    // A browser that offered subprotocols needs one selected: `ipc-gateway.v1`, never the
    // bearer entry (the token is not echoed).
    let response = handshake.accept(wants_v1.then_some(auth::SUBPROTOCOL_V1));
    let on_upgrade = handshake.on_upgrade;
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            debug!("a WebSocket upgrade did not complete");
            return;
        };
        let connections = gateway.connections().clone();
        let connection = Connection::new(gateway, TokioIo::new(upgraded), caller, batched);
        // A task of its own, so that this one (which holds the upgrade's future) ends now.
        // The task holds the connection itself: one allocation per connection, not a task
        // and a box.
        tokio::spawn(connections.track_future(connection.serve()));
    });
    response
}

/// Whether the client asked for batches (`GET /ws?batch=true`): then one WebSocket message
/// may carry several events, each a JSON line ending in a newline, or whole binary frames one
/// after the other. Fewer, larger messages cost both ends far less per event.
fn wants_batches(query: Option<&str>) -> Result<bool, String> {
    let mut batched = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        batched = match pair {
            "batch" | "batch=true" | "batch=1" => true,
            "batch=false" | "batch=0" => false,
            other => {
                return Err(format!(
                    "unknown /ws parameter {other:?}: the only one is batch=true|false"
                ));
            }
        };
    }
    Ok(batched)
}

/// Who opens the WebSocket: a bearer JWT from `Authorization: Bearer`, or (browsers cannot set
/// headers on a WebSocket) from a `bearer.<jwt>` entry in the subprotocol list; anonymous
/// without one, unless tokens are required. A verified client certificate (`cert`, over TLS) is
/// part of the identity either way, and credentials enough when tokens are required. A bad
/// token is always refused. Also whether the client offered the `ipc-gateway.v1` subprotocol.
fn identify(
    gateway: &Gateway,
    headers: &HeaderMap,
    cert: Option<String>,
) -> Result<(Identity, bool), GatewayError> {
    let offered = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|list| list.to_str().ok())
        .map_or((None, false), auth::bearer_from_subprotocols);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(auth::bearer_from_header)
        .or(offered.0);
    let connection = Identity {
        cert,
        ..Identity::anonymous(Frontend::Ws, None)
    };
    let identity = match token {
        Some(token) => gateway.verify_token_on(token, &connection)?,
        None if gateway.auth_required() && connection.cert.is_none() => {
            return Err(GatewayError::new(
                ErrorCode::Unauthenticated,
                "this gateway requires a token: Authorization: Bearer <jwt>, or a \"bearer.<jwt>\" subprotocol",
            ));
        }
        None => connection,
    };
    Ok((identity, offered.1))
}

/// Programs send no `Origin`; browsers do, and only pages from the gateway's own origins and
/// the configured ones are let in (see `Config::allows_origin`; the Host header plays no
/// part). `Err` names the origin refused.
fn origin_allowed(config: &Config, headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    match origin.to_str() {
        Ok(origin) if config.allows_origin(origin) => Ok(()),
        Ok(origin) => Err(origin.to_owned()),
        Err(_) => Err(String::from_utf8_lossy(origin.as_bytes()).into_owned()),
    }
}

/// Decodes one WebSocket message into one item: a text message is one JSON envelope, a binary
/// message exactly one frame; `None` for control messages. Public for the `ws_envelope` fuzz
/// target (fuzz/), which checks it against the stream decoders.
pub fn decode(message: Message, max: usize) -> Option<(WireFormat, Decoded)> {
    match message {
        Message::Text(text) => Some((WireFormat::JsonLines, json::parse_line(text))),
        Message::Binary(mut buf) => {
            let mut decoder = BinaryDecoder::new(max);
            let item = decoder.decode(&mut buf).unwrap_or(Decoded::Invalid {
                id: Id::Null,
                error: GatewayError::bad_request("a binary message must hold one whole frame"),
                fatal: false,
            });
            let item = match item {
                // Message boundaries keep the wire in step: no bad frame is fatal here.
                Decoded::Invalid { id, error, .. } => Decoded::Invalid {
                    id,
                    error,
                    fatal: false,
                },
                Decoded::Envelope(envelope) if !buf.is_empty() => Decoded::Invalid {
                    id: envelope.id,
                    error: GatewayError::bad_request(
                        "a binary message must hold exactly one frame",
                    ),
                    fatal: false,
                },
                item => item,
            };
            Some((WireFormat::Binary, item))
        }
        _ => None,
    }
}

/// What ended a connection's wait.
enum Wake {
    /// The gateway is shutting down.
    Stop,
    /// Something to write (`None`: the outbox closed).
    Batch(Option<Batch>),
    /// The heartbeat or the idle check is due.
    Timer,
    /// The client sent something (`None`: its socket ended).
    Message(Option<Result<Message, ReadBroken>>),
}

/// How a connection ends.
enum Ending {
    /// Say goodbye with this close code and reason, after the answers still owed.
    Close(u16, &'static str),
    /// The client is gone (or will never read again): nothing more can be written.
    Gone,
    /// The client sent its close frame (with this code, if any). It is answered at once, and
    /// answers still owed are lost: a WebSocket, unlike a half-closed Unix socket, says
    /// nothing more after its close frame, and the client reads nothing after its answer.
    ClientClosed(Option<u16>),
}

/// The upgraded HTTP connection a WebSocket speaks over.
type Io = TokioIo<Upgraded>;

struct Connection {
    gateway: Gateway,
    socket: WsSocket<Io>,
    outbox: Arc<Outbox>,
    session: Session,
    life: Lifecycle,
    /// The wire of the first message; answers use it.
    format: Option<WireFormat>,
    /// Several events per WebSocket message (`?batch=true`).
    batched: bool,
    /// The input broke at the WebSocket level: it can no longer be read, even for the
    /// client's close frame.
    read_failed: bool,
    /// Close code to end with once everything owed is written.
    closing: Option<(u16, &'static str)>,
    ping_interval: Option<Duration>,
    next_ping: Option<Instant>,
    /// Pings sent since the client last showed a sign of life.
    unanswered_pings: u8,
}

impl Connection {
    fn new(gateway: Gateway, io: Io, caller: Caller, batched: bool) -> Self {
        let config = gateway.config();
        let outbox = Arc::new(Outbox::new(config.subscription_queue));
        let ping_interval = config.ws_ping_interval();
        Connection {
            session: Session::new(gateway.clone(), caller, outbox.clone()),
            life: Lifecycle::new(&gateway, Frontend::Ws),
            gateway,
            socket: WsSocket::new(io),
            outbox,
            format: None,
            batched,
            read_failed: false,
            closing: None,
            next_ping: ping_interval.map(|interval| Instant::now() + interval),
            ping_interval,
            unanswered_pings: 0,
        }
    }

    /// The connection's task. An `async move` block that uses the connection where it was
    /// captured, not an `async fn`: that would keep its argument twice in its future
    /// (rust-lang/rust#62958), and the connection is most of an idle connection's memory.
    #[allow(clippy::manual_async_fn)] // the `async fn` form is the one to avoid here
    fn serve(mut self) -> impl Future<Output = ()> + Send {
        async move {
            let ending = self.run().await;
            let reason = match ending {
                Ending::Gone => "client gone",
                Ending::ClientClosed(_) => "client closed",
                Ending::Close(close::SLOW_CONSUMER, _) => "slow client",
                Ending::Close(_, reason) if self.life.reason() == "closed" => reason,
                Ending::Close(..) => self.life.reason(),
            };
            self.session.caller().closing(reason);
            // Boxed, like every step that is not waiting: an idle connection is then only as
            // big as `run`'s wait, not as big as its largest step. (Each box is made in a
            // statement of its own: a temporary in the awaiting statement would be laid out in
            // this future.)
            let end = Box::pin(self.end(ending));
            end.await;
        }
    }

    /// Serves the connection until it should end: reads commands, writes what the outbox
    /// holds, and keeps the timers.
    ///
    /// The wait is one `poll_fn` over the four sources, with the shutdown signal and the timer
    /// made once and kept: an idle connection's task then holds little besides the
    /// `Connection` (a `select!` of fresh futures held about twice as much, and registered a
    /// new timer on every turn).
    async fn run(&mut self) -> Ending {
        let config = self.gateway.config();
        let max_inflight = config.max_inflight_per_connection;
        let max_message = config.ws_max_message();
        let limits = read_limits(config);
        let shutdown = self.gateway.shutdown().clone();
        let stopped = shutdown.stopped();
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(stopped, timer);
        // Polled until it fires once: a finished `async fn` must not be polled again.
        let mut stop_seen = false;
        loop {
            let owed = self.session.has_unanswered();
            if self.life.finished(owed, self.session.has_subscriptions()) {
                return match self.closing {
                    Some((code, reason)) => Ending::Close(code, reason),
                    None if self.life.is_draining() => {
                        Ending::Close(close::AWAY, "the gateway is shutting down")
                    }
                    None => Ending::Close(close::NORMAL, "goodbye"),
                };
            }
            let has_room = self.outbox.pending() < max_inflight;
            let due = self.next_timer();
            if let Some(due) = due
                && due != timer.deadline()
            {
                timer.as_mut().reset(due);
            }
            let reads = self.life.reads() && (has_room || self.life.is_draining());
            let (outbox, socket) = (&self.outbox, &mut self.socket);
            // In this order when several are ready (as a biased `select!`).
            let wake = std::future::poll_fn(|cx| {
                if !stop_seen && stopped.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Stop);
                }
                if let Poll::Ready(batch) = outbox.poll_batch(cx, MAX_BATCH_EVENTS) {
                    return Poll::Ready(Wake::Batch(batch));
                }
                if due.is_some() && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Timer);
                }
                if reads && let Poll::Ready(message) = socket.poll_next(cx, limits) {
                    return Poll::Ready(Wake::Message(message));
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Stop => {
                    stop_seen = true;
                    if self.life.begin_drain() {
                        self.session.close_subscriptions();
                    }
                }
                Wake::Batch(None) => return Ending::Gone,
                Wake::Batch(Some(batch)) => {
                    let write = Box::pin(self.write(batch));
                    if let Err(ending) = write.await {
                        return ending;
                    }
                }
                Wake::Timer => {
                    let on_timer = Box::pin(self.on_timer());
                    if let Err(ending) = on_timer.await {
                        return ending;
                    }
                }
                Wake::Message(Some(Ok(Message::Close(frame)))) => {
                    self.life.writes().lose(&self.outbox, 0);
                    return Ending::ClientClosed(frame.map(|(code, _)| code));
                }
                Wake::Message(Some(Ok(Message::Ping(payload)))) => {
                    self.unanswered_pings = 0;
                    let pong = Box::pin(self.send_control(Control::Pong(&payload)));
                    if let Err(ending) = pong.await {
                        return ending;
                    }
                }
                Wake::Message(Some(Err(ReadBroken::Io(err)))) => {
                    debug!(error = %err, "WebSocket read failed");
                    return Ending::Gone;
                }
                Wake::Message(Some(Err(ReadBroken::Frame(err)))) => {
                    self.on_read_error(err, max_message);
                }
                Wake::Message(Some(Ok(message))) => {
                    // Most commands finish at once; only the rest of one that has to wait is
                    // a (boxed) future, so that this one, an idle connection's, stays small.
                    let Some(item) = self.take_message(message, max_message) else {
                        continue;
                    };
                    let flow = match self.session.handle_at_once(item) {
                        Ok(flow) => flow,
                        Err(rest) => rest.await,
                    };
                    self.after_command(flow);
                }
                Wake::Message(None) => return Ending::Gone,
            }
        }
    }

    /// The heartbeat's next ping or the idle check, whichever comes first.
    fn next_timer(&self) -> Option<Instant> {
        match (self.next_ping, self.life.idle_deadline()) {
            (Some(ping), Some(idle)) => Some(ping.min(idle)),
            (ping, idle) => ping.or(idle),
        }
    }

    async fn on_timer(&mut self) -> Result<(), Ending> {
        let now = Instant::now();
        if self.life.idle_deadline().is_some_and(|due| now >= due) {
            let busy = self.session.has_subscriptions() || self.session.has_unanswered();
            if self.life.on_idle_timer(busy) == Idle::Close {
                return Err(Ending::Close(close::POLICY, "idle timeout"));
            }
        }
        if let (Some(interval), Some(due)) = (self.ping_interval, self.next_ping)
            && now >= due
        {
            if self.unanswered_pings >= 2 {
                debug!("closing a WebSocket that missed two pongs");
                self.gateway.metrics().heartbeat_disconnected(Frontend::Ws);
                // Nobody answers: the close frame is a courtesy, the connection is gone, and
                // so are the answers it was owed.
                self.life.writes().lose(&self.outbox, 0);
                return Err(Ending::Close(close::POLICY, "heartbeat timeout: no pong"));
            }
            self.unanswered_pings += 1;
            self.next_ping = Some(now + interval);
            self.send_control(Control::Ping).await?;
        }
        Ok(())
    }

    /// A client's message: the command it holds, if it holds one that is to be carried out
    /// (control frames do not; a message over the limit, or any during a drain, is answered
    /// here).
    fn take_message(&mut self, message: Message, max_message: usize) -> Option<Decoded> {
        // Any message is a sign of life; pings and pongs are not activity for the idle timer.
        self.unanswered_pings = 0;
        let (wire, item) = match message {
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => return None,
            Message::Text(text) if text.len() > max_message => {
                self.refuse_too_large(text.len(), max_message);
                return None;
            }
            Message::Binary(data) if data.len() > max_message => {
                self.refuse_too_large(data.len(), max_message);
                return None;
            }
            message => decode(message, max_message)?,
        };
        self.life.touch();
        self.format.get_or_insert(wire);
        if self.life.is_draining() {
            self.session.refuse_shutting_down(item);
            return None;
        }
        Some(item)
    }

    /// What a command's outcome means for the connection: input it cannot recover from ends
    /// its reading.
    fn after_command(&mut self, flow: Flow) {
        if flow == Flow::Close {
            self.life.input_broke();
            self.session.close_subscriptions();
            self.closing
                .get_or_insert((close::POLICY, "unrecoverable input"));
        }
    }

    fn refuse_too_large(&mut self, len: usize, max_message: usize) {
        self.life.touch();
        let error = GatewayError::new(
            ErrorCode::TooLarge,
            format!("a message of {len} bytes is over the limit of {max_message} bytes"),
        );
        self.session.refuse(error);
    }

    /// The WebSocket itself broke, so the connection ends once its answers are out (its
    /// subscriptions would keep it open): a message far over the limit, which cannot be
    /// skipped (TOO_LARGE, then 1009), text that is not UTF-8 (1007, as RFC 6455 asks), or
    /// another protocol error (1002).
    fn on_read_error(&mut self, err: ReadError, max_message: usize) {
        debug!(error = ?err, "WebSocket input broke");
        self.life.input_broke();
        self.read_failed = true;
        self.session.close_subscriptions();
        let (error, code, reason) = match err {
            ReadError::TooLong => (
                Some(GatewayError::new(
                    ErrorCode::TooLarge,
                    format!("message is far over the limit of {max_message} bytes"),
                )),
                close::SIZE,
                "message too big",
            ),
            ReadError::NotUtf8 => (
                Some(GatewayError::bad_request(
                    "a text message is not valid UTF-8 (send bytes in a binary message)",
                )),
                close::INVALID,
                "text message is not UTF-8",
            ),
            ReadError::Protocol(what) => (None, close::PROTOCOL, what),
        };
        if let Some(error) = error {
            self.session.refuse(error);
        }
        self.closing = Some((code, reason));
    }

    /// Writes one batch, framed into buffers of up to `CHUNK_BYTES` that each go out in one
    /// write and are then freed; a socket that stays full past the stall time ends the
    /// connection.
    async fn write(&mut self, batch: Batch) -> Result<(), Ending> {
        let wire = self.format.unwrap_or(WireFormat::JsonLines);
        let (socket, batched) = (&mut self.socket, self.batched);
        let sent = self
            .life
            .writes()
            .send(async {
                let mut left = encoded_estimate(&batch.events);
                let mut events = batch.events.iter().peekable();
                while events.peek().is_some() {
                    let frames = frame_events(wire, batched, &mut events, left);
                    left = left.saturating_sub(frames.len());
                    socket.write(&frames).await?;
                }
                socket.flush().await
            })
            .await;
        self.settle(sent, batch.control)?;
        self.outbox.written(batch.control);
        Ok(())
    }

    async fn send_control(&mut self, control: Control<'_>) -> Result<(), Ending> {
        let frame = control_frame(control);
        let sent = self.life.writes().send(self.socket.send(&frame)).await;
        self.settle(sent, 0)
    }

    /// What a send given the stall time means: done, the client gone, or a client that
    /// stopped reading. In the last two cases `unwritten_answers` (and everything still
    /// queued) are lost.
    fn settle(&self, sent: Result<(), Broken>, unwritten_answers: usize) -> Result<(), Ending> {
        let Err(broken) = sent else { return Ok(()) };
        self.life.writes().lose(&self.outbox, unwritten_answers);
        Err(match broken {
            Broken::Gone => Ending::Gone,
            Broken::Stalled => {
                Ending::Close(close::SLOW_CONSUMER, "slow consumer: stopped reading")
            }
        })
    }

    /// Ends the connection: closes the subscriptions, writes the answers still owed (unless
    /// the client is gone), then the close frame, and waits briefly for the client's.
    async fn end(&mut self, ending: Ending) {
        self.session.close_subscriptions();
        let (code, reason) = match ending {
            Ending::Gone => return,
            Ending::ClientClosed(code) => {
                // The answer to the client's close frame echoes its code.
                let frame = control_frame(Control::Close(code.unwrap_or(close::NORMAL), ""));
                let _ = tokio::time::timeout(CLOSE_GRACE, self.socket.send(&frame)).await;
                return;
            }
            Ending::Close(code, reason) => (code, reason),
        };
        self.outbox.close();
        while let Some(batch) = self.outbox.next_batch(MAX_BATCH_EVENTS).await {
            if self.write(batch).await.is_err() {
                return;
            }
        }
        let goodbye = control_frame(Control::Close(code, reason));
        let limits = read_limits(self.gateway.config());
        let writes = self.life.writes().clone();
        let socket = &mut self.socket;
        let read_failed = self.read_failed;
        let closing = tokio::time::timeout(CLOSE_GRACE, async {
            if socket.send(&goodbye).await.is_err() {
                return;
            }
            // Wait for the client's close frame: closing the socket with its input unread
            // would reset the connection and could destroy our last messages in flight. After
            // a read error the input cannot be read, so give the client the grace time.
            if read_failed {
                std::future::pending::<()>().await;
            }
            while let Some(Ok(message)) = socket.next(limits).await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        });
        // Not past shutdown's cut either: the gateway is about to exit.
        tokio::select! {
            _ = closing => {}
            () = writes.cut() => {}
        }
    }
}

/// What the socket reads. A message a little over the limit is read whole and answered with
/// TOO_LARGE, and the connection goes on; one over twice the limit is refused from its header
/// and ends the connection (1009): skipping it would mean reading it all.
fn read_limits(config: &Config) -> Limits {
    Limits {
        message: config.ws_max_message().saturating_mul(2),
        read: config.ws_read_buffer_bytes,
    }
}

/// Room for a typical event's encoding beside its payload (a larger one grows its buffer).
const ENCODE_CAPACITY: usize = 256;
/// A batched message takes events until it is this big (browsers handle big messages less
/// well than many medium ones).
const BATCH_BYTES: usize = 64 * 1024;

/// What one write takes: events are framed until their frames are this big.
const CHUNK_BYTES: usize = 64 * 1024;

/// About what `events` take framed: their payloads (a third more, for JSON's escapes or
/// base64) plus `ENCODE_CAPACITY` each. A write allocates its buffer at this size (up to a
/// chunk): grown from a small start, it was copied eight times for a batch of 256 replies,
/// about 3 % of a WebSocket request's instructions (callgrind).
fn encoded_estimate(events: &[Outbound]) -> usize {
    events
        .iter()
        .map(|event| {
            let payload = match event {
                Outbound::Reply { data, .. } => data.len(),
                Outbound::Msg { message, .. } => message.payload.len(),
                _ => 0,
            };
            payload + payload / 3 + ENCODE_CAPACITY
        })
        .sum()
}

/// Events framed as WebSocket messages in the connection's wire format, until the frames
/// reach `CHUNK_BYTES`: one message per event (a JSON envelope without its line's newline, or
/// one binary frame), or with `?batch=true` as few messages as `BATCH_BYTES` allows, each
/// holding events one after the other (JSON lines with their newlines, or binary frames).
/// `capacity`: what is left of the batch's `encoded_estimate`.
fn frame_events<'a>(
    wire: WireFormat,
    batched: bool,
    events: &mut std::iter::Peekable<impl Iterator<Item = &'a Outbound>>,
    capacity: usize,
) -> BytesMut {
    let kind = match wire {
        // The JSON encoder writes only UTF-8: ASCII punctuation, serde_json's escaping of
        // `&str`s, and payloads either checked to be UTF-8 or base64.
        WireFormat::JsonLines => Kind::Text,
        WireFormat::Binary => Kind::Binary,
    };
    let mut out =
        BytesMut::with_capacity(capacity.clamp(ENCODE_CAPACITY, CHUNK_BYTES + BATCH_BYTES));
    if batched {
        while events.peek().is_some() && out.len() < CHUNK_BYTES {
            put_message(&mut out, kind, |buf, start| {
                while let Some(event) = events.next_if(|_| buf.len() - start < BATCH_BYTES) {
                    wire.encode(event, buf);
                }
            });
        }
    } else {
        while let Some(event) = events.next_if(|_| out.len() < CHUNK_BYTES) {
            put_message(&mut out, kind, |buf, _| {
                wire.encode(event, buf);
                if wire == WireFormat::JsonLines {
                    // One JSON envelope per text message, without the line's newline.
                    buf.truncate(buf.len() - 1);
                }
            });
        }
    }
    out
}

#[cfg(test)]
mod sizes {
    use super::*;

    fn future_size<A, F: Future>(_: fn(A) -> F) -> usize {
        size_of::<F>()
    }

    /// An idle connection is its task (this future, which holds the `Connection`, in a tokio
    /// cell, in steps of 128 bytes) and a few shared parts; it keeps no buffer
    /// (artifacts/ws-idle/profile-*.md). Sizes here are of the test build; a release build's
    /// are smaller. Under 800 bytes the cell stays within 896 (tokio adds about 100).
    #[test]
    fn an_idle_connection_stays_small() {
        let serve = future_size(Connection::serve);
        let connection = size_of::<Connection>();
        eprintln!("serve future {serve} B, Connection {connection} B");
        assert!(connection <= 320, "a Connection is {connection} bytes");
        assert!(serve <= 800, "the connection's future is {serve} bytes");
    }
}
