//! A small client for the gateway: pipelined requests matched to replies by id, publish with
//! ack, and subscriptions. It speaks either wire format ([`WireFormat`]): binary v1 frames (the
//! default, `Client::connect`) or JSON lines (`Client::connect_with`). It runs over the Unix
//! socket, or over any message transport that carries one frame or JSON envelope per message,
//! such as a WebSocket (`Client::over_messages`). The command line, the tests and the
//! benchmarks all use it.
//!
//! One writer task sends every queued request in as few writes as it can; one reader task
//! hands each answer to the caller waiting for its id, so many tasks can share one `Client`
//! and keep many requests in flight on one connection.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::Headers;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::protocol::binary::{self, FrameHeader, FrameParts, HEADER_LEN, frame_type};
use crate::protocol::{ErrorCode, GatewayError};

/// The wire format a `Client` speaks; the gateway tells them apart by the first byte.
pub use crate::protocol::WireFormat;

/// The largest frame or line this client accepts from the gateway.
const MAX_INBOUND_FRAME: usize = 64 << 20;
/// How many bytes the writer gathers into one write, and the reader asks for at least.
const BATCH_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Gateway(GatewayError),
    #[error("connection to the gateway failed: {0}")]
    Io(#[from] io::Error),
    #[error("the gateway closed the connection")]
    Closed,
}

impl ClientError {
    /// The gateway's error code, if the gateway answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Gateway(error) => Some(error.code),
            _ => None,
        }
    }
}

/// A reply's payload and headers.
#[derive(Debug, Clone)]
pub struct ClientReply {
    pub data: Bytes,
    pub headers: Option<Headers>,
    /// On the answer to a durable publish or a replaying subscribe: the JetStream stream.
    pub stream: Option<StreamAnswer>,
}

/// What a JetStream stream said in an answer (docs/protocol.md, "Durable publish" and
/// "Replay after reconnect").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAnswer {
    /// The stream's name.
    pub stream: String,
    /// A durable publish: the sequence the message was stored at.
    pub seq: Option<u64>,
    /// A replay the stream could not give whole (its limits removed the oldest messages):
    /// the first sequence it still holds.
    pub first_seq: Option<u64>,
}

/// Where a replaying subscription starts: after a sequence, or at a time (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// After this stream sequence (the last one the client saw; 0 for everything).
    Seq(u64),
    /// Messages stored at or after this RFC 3339 time, e.g. `2026-12-06T05:00:00Z`.
    Time(String),
}

/// A message delivered on a subscription, or a notice that some were dropped.
#[derive(Debug, Clone)]
pub enum SubscriptionEvent {
    Message {
        subject: String,
        reply_to: Option<String>,
        headers: Option<Headers>,
        data: Bytes,
        /// On a replaying subscription: the message's stream sequence.
        seq: Option<u64>,
    },
    /// `count` messages were dropped; with `gap`, an unknown number more were lost (the
    /// gateway's NATS connection was cut).
    Dropped { count: u64, gap: bool },
}

type Answer = Result<ClientReply, GatewayError>;

#[derive(Default)]
struct Shared {
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
    subscriptions: HashMap<u64, mpsc::UnboundedSender<SubscriptionEvent>>,
    closed: bool,
}

/// One connection to the gateway; cheap to share behind an `Arc` across tasks.
pub struct Client {
    /// Encoded requests, to the writer task.
    frames: mpsc::Sender<BytesMut>,
    shared: Arc<Mutex<Shared>>,
    next_id: AtomicU64,
    /// How requests are encoded (and answers decoded, by the reader task).
    format: WireFormat,
}

/// A subscription's messages; dropping it does not unsubscribe (call `unsubscribe`).
pub struct Subscription {
    pub sid: u64,
    pub events: mpsc::UnboundedReceiver<SubscriptionEvent>,
}

impl Client {
    /// Connects to the gateway's Unix socket and speaks binary frames.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        Client::connect_with(path, WireFormat::Binary).await
    }

    /// Connects to the gateway's Unix socket and speaks `format`.
    pub async fn connect_with(path: impl AsRef<Path>, format: WireFormat) -> io::Result<Client> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        let (client, queued) = Client::new(format);
        tokio::spawn(write_frames(write, queued));
        tokio::spawn(read_stream(read, format, client.shared.clone()));
        Ok(client)
    }

    /// A client over a message transport that is already connected, e.g. a WebSocket: each
    /// request goes into `sink` as one message (a binary frame, or a JSON envelope without its
    /// newline), and each message from `stream` is one answer. The client's end of the
    /// transport closes when the stream ends or a message cannot be decoded.
    pub fn over_messages<Si, St>(format: WireFormat, sink: Si, stream: St) -> Client
    where
        Si: Sink<Bytes> + Send + Unpin + 'static,
        St: Stream<Item = Bytes> + Send + Unpin + 'static,
    {
        let (client, queued) = Client::new(format);
        tokio::spawn(write_messages(sink, queued, format));
        tokio::spawn(read_messages(stream, format, client.shared.clone()));
        client
    }

    fn new(format: WireFormat) -> (Client, mpsc::Receiver<BytesMut>) {
        let (frames, queued) = mpsc::channel(1024);
        let client = Client {
            frames,
            shared: Arc::new(Mutex::new(Shared::default())),
            next_id: AtomicU64::new(1),
            format,
        };
        (client, queued)
    }

    /// The wire format this client speaks.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a frame and waits for the answer with its id.
    async fn call(&self, parts: FrameParts<'_>) -> Result<ClientReply, ClientError> {
        let (sender, receiver) = oneshot::channel();
        {
            let mut shared = self.shared();
            if shared.closed {
                return Err(ClientError::Closed);
            }
            shared.waiting.insert(parts.id, sender);
        }
        let mut frame = BytesMut::new();
        match self.format {
            WireFormat::Binary => binary::put_frame(parts, &mut frame),
            WireFormat::JsonLines => put_json_line(&parts, &mut frame),
        }
        if self.frames.send(frame).await.is_err() {
            return Err(ClientError::Closed);
        }
        match receiver.await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => Err(ClientError::Gateway(error)),
            Err(_) => Err(ClientError::Closed),
        }
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn request(
        &self,
        subject: &str,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ClientReply, ClientError> {
        self.request_with(subject, None, data, timeout).await
    }

    pub async fn request_with(
        &self,
        subject: &str,
        headers: Option<&Headers>,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<ClientReply, ClientError> {
        self.call(FrameParts {
            frame_type: frame_type::REQUEST,
            id: self.new_id(),
            param: timeout_ms(timeout),
            subject: subject.as_bytes(),
            headers,
            payload: data,
            ..FrameParts::default()
        })
        .await
    }

    /// Publishes and waits for the gateway's acknowledgement.
    pub async fn publish(&self, subject: &str, data: &[u8]) -> Result<(), ClientError> {
        self.call(FrameParts {
            frame_type: frame_type::PUBLISH,
            id: self.new_id(),
            subject: subject.as_bytes(),
            payload: data,
            ..FrameParts::default()
        })
        .await
        .map(|_| ())
    }

    /// Publishes into the JetStream stream that captures `subject` and waits for the stream's
    /// acknowledgement: the stream's name and the message's sequence. `msg_id` is the
    /// deduplication id (`Nats-Msg-Id`, which the gateway scopes by the caller's identity):
    /// the same id sent again within the stream's duplicate window is stored once, so a retry
    /// must reuse it and a new message needs a new one ([`unique_msg_id`] makes one). The
    /// frame's own id would not do: it restarts at 1 on every connection. `timeout` bounds the
    /// wait (the gateway's request timeout when `None`).
    pub async fn publish_durable(
        &self,
        subject: &str,
        data: &[u8],
        msg_id: &str,
        timeout: Option<Duration>,
    ) -> Result<StreamAnswer, ClientError> {
        let mut headers = Headers::new();
        headers
            .append(MSG_ID_HEADER, msg_id)
            .map_err(ClientError::Gateway)?;
        let reply = self
            .call(FrameParts {
                frame_type: frame_type::PUBLISH,
                flags: binary::flag::STREAM,
                id: self.new_id(),
                param: timeout_ms(timeout),
                subject: subject.as_bytes(),
                headers: Some(&headers),
                payload: data,
                ..FrameParts::default()
            })
            .await?;
        reply
            .stream
            .filter(|answer| answer.seq.is_some())
            .ok_or_else(|| {
                ClientError::Gateway(GatewayError::new(
                    ErrorCode::Internal,
                    "the gateway acknowledged a durable publish without a stream sequence",
                ))
            })
    }

    pub async fn subscribe(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> Result<Subscription, ClientError> {
        self.open_subscription(FrameParts {
            frame_type: frame_type::SUBSCRIBE,
            subject: subject.as_bytes(),
            aux: queue.unwrap_or("").as_bytes(),
            ..FrameParts::default()
        })
        .await
        .map(|(subscription, _)| subscription)
    }

    /// Subscribes to `subject` after first replaying what the JetStream stream that captures
    /// it holds from `from`; each message carries its stream sequence. The answer names the
    /// stream, and `first_seq` when the stream no longer held all that was asked for.
    pub async fn subscribe_since(
        &self,
        subject: &str,
        from: &ReplayFrom,
    ) -> Result<(Subscription, StreamAnswer), ClientError> {
        let seq;
        let (flags, payload) = match from {
            ReplayFrom::Seq(after) => {
                seq = after.to_be_bytes();
                (binary::flag::STREAM, &seq[..])
            }
            ReplayFrom::Time(time) => (
                binary::flag::STREAM | binary::flag::SINCE_TIME,
                time.as_bytes(),
            ),
        };
        let (subscription, reply) = self
            .open_subscription(FrameParts {
                frame_type: frame_type::SUBSCRIBE,
                flags,
                subject: subject.as_bytes(),
                payload,
                ..FrameParts::default()
            })
            .await?;
        let answer = reply.stream.ok_or_else(|| {
            ClientError::Gateway(GatewayError::new(
                ErrorCode::Internal,
                "the gateway acknowledged a replaying subscribe without naming the stream",
            ))
        })?;
        Ok((subscription, answer))
    }

    /// Sends a SUBSCRIBE (`parts` without its id) with the events' channel in place before the
    /// first message can arrive.
    async fn open_subscription(
        &self,
        parts: FrameParts<'_>,
    ) -> Result<(Subscription, ClientReply), ClientError> {
        let sid = self.new_id();
        let (sender, events) = mpsc::unbounded_channel();
        self.shared().subscriptions.insert(sid, sender);
        match self.call(FrameParts { id: sid, ..parts }).await {
            Ok(reply) => Ok((Subscription { sid, events }, reply)),
            Err(err) => {
                self.shared().subscriptions.remove(&sid);
                Err(err)
            }
        }
    }

    pub async fn unsubscribe(&self, sid: u64) -> Result<(), ClientError> {
        let result = self
            .call(FrameParts {
                frame_type: frame_type::UNSUBSCRIBE,
                id: sid,
                ..FrameParts::default()
            })
            .await;
        self.shared().subscriptions.remove(&sid);
        result.map(|_| ())
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(FrameParts {
            frame_type: frame_type::PING,
            id: self.new_id(),
            ..FrameParts::default()
        })
        .await
        .map(|_| ())
    }
}

/// The JetStream deduplication header.
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A deduplication id for a new durable message: 128 random bits from the OS, in hex.
pub fn unique_msg_id() -> String {
    use rand::{RngCore, SeedableRng};
    let mut bits = [0u8; 16];
    rand::rngs::StdRng::from_os_rng().fill_bytes(&mut bits);
    bits.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A timeout as a frame's `param`: milliseconds, at least 1; 0 (the gateway's default) for none.
fn timeout_ms(timeout: Option<Duration>) -> u32 {
    timeout.map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
}

/// Writes queued frames, as many as are ready in one write.
async fn write_frames(mut write: OwnedWriteHalf, mut queued: mpsc::Receiver<BytesMut>) {
    let mut batch = BytesMut::new();
    while let Some(frame) = queued.recv().await {
        batch.unsplit(frame);
        while batch.len() < BATCH_BYTES {
            match queued.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if write.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// Sends queued frames one message each, and flushes once nothing more is queued.
async fn write_messages<Si>(mut sink: Si, mut queued: mpsc::Receiver<BytesMut>, format: WireFormat)
where
    Si: Sink<Bytes> + Unpin,
{
    while let Some(frame) = queued.recv().await {
        let mut next = Some(frame);
        while let Some(mut frame) = next {
            if format == WireFormat::JsonLines {
                // A message holds one envelope: the line without its newline.
                frame.truncate(frame.len().saturating_sub(1));
            }
            if sink.feed(frame.freeze()).await.is_err() {
                return;
            }
            next = queued.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// What the reader found at the front of its buffer.
enum Split {
    /// One whole frame or line.
    Item(Bytes),
    /// Not enough bytes yet: at least this many more are needed.
    Incomplete(usize),
    /// The stream cannot be read on: out of sync, or over the size limit.
    Broken,
}

/// Reads frames or lines from the gateway and routes each to whoever waits for its id.
async fn read_stream(mut read: OwnedReadHalf, format: WireFormat, shared: Arc<Mutex<Shared>>) {
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    // JSON lines: how far `buf` was already searched for a newline.
    let mut scanned = 0;
    'read: loop {
        // How many more bytes the frame or line at the front of `buf` needs, at least.
        let wanted = loop {
            let split = match format {
                WireFormat::Binary => split_frame(&mut buf),
                WireFormat::JsonLines => split_line(&mut buf, &mut scanned),
            };
            let item = match split {
                Split::Item(item) => item,
                Split::Incomplete(more) => break more,
                Split::Broken => break 'read,
            };
            match decode(format, item) {
                Some(incoming) => dispatch(&shared, incoming),
                None => break 'read,
            }
        };
        if buf.capacity() - buf.len() < wanted.max(4096) {
            // The payloads handed out are slices of this buffer. Let the tasks they were
            // handed to run first: once they have dropped them, `reserve` reuses the buffer
            // instead of allocating (and page-faulting) a new one for every 64 KiB read.
            tokio::task::yield_now().await;
            buf.reserve(wanted.max(BATCH_BYTES));
        }
        match read.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    close(&shared);
}

/// Reads one answer per message until the transport ends.
async fn read_messages<St>(mut stream: St, format: WireFormat, shared: Arc<Mutex<Shared>>)
where
    St: Stream<Item = Bytes> + Unpin,
{
    while let Some(message) = stream.next().await {
        match decode(format, message) {
            Some(incoming) => dispatch(&shared, incoming),
            None => break,
        }
    }
    close(&shared);
}

/// The connection is gone: every waiting call and subscription ends.
fn close(shared: &Mutex<Shared>) {
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    shared.closed = true;
    shared.waiting.clear();
    shared.subscriptions.clear();
}

/// Takes one whole binary frame off the front of `buf`.
fn split_frame(buf: &mut BytesMut) -> Split {
    if buf.len() < HEADER_LEN {
        return Split::Incomplete(HEADER_LEN - buf.len());
    }
    let header = FrameHeader::parse(buf);
    if buf[0] != binary::MAGIC || header.body_len as usize > MAX_INBOUND_FRAME {
        return Split::Broken;
    }
    let total = HEADER_LEN + header.body_len as usize;
    if buf.len() < total {
        return Split::Incomplete(total - buf.len());
    }
    Split::Item(buf.split_to(total).freeze())
}

/// Takes one whole line (without its newline) off the front of `buf`.
fn split_line(buf: &mut BytesMut, scanned: &mut usize) -> Split {
    let Some(offset) = memchr::memchr(b'\n', &buf[*scanned..]) else {
        if buf.len() > MAX_INBOUND_FRAME {
            return Split::Broken;
        }
        *scanned = buf.len();
        return Split::Incomplete(1);
    };
    let end = *scanned + offset;
    *scanned = 0;
    let line = buf.split_to(end + 1).freeze();
    Split::Item(line.slice(..end))
}

/// What one frame or line from the gateway means to this client.
enum Incoming {
    /// The answer to the call with this id (id 0: a complaint about the connection).
    Answer(u64, Answer),
    /// An event on the subscription with this id.
    Event(u64, SubscriptionEvent),
    /// Nothing this client asked for (a blank line, a frame type it does not know).
    Ignored,
}

/// Decodes one whole frame or line; `None` when it is malformed (the stream is then given up).
fn decode(format: WireFormat, item: Bytes) -> Option<Incoming> {
    match format {
        WireFormat::Binary => decode_frame(item),
        WireFormat::JsonLines => decode_json(&item),
    }
}

fn decode_frame(frame: Bytes) -> Option<Incoming> {
    if frame.len() < HEADER_LEN || frame[0] != binary::MAGIC {
        return None;
    }
    let header = FrameHeader::parse(&frame);
    if frame.len() != HEADER_LEN + header.body_len as usize {
        return None;
    }
    let body = binary::decode_body(frame.slice(HEADER_LEN..)).ok()?;
    let streamed = header.flags & binary::flag::STREAM != 0;
    Some(match header.frame_type {
        frame_type::ACK if streamed => {
            let number = <[u8; 8]>::try_from(&body.payload[..])
                .ok()
                .map(u64::from_be_bytes);
            let truncated = header.flags & binary::flag::TRUNCATED != 0;
            let stream = StreamAnswer {
                stream: String::from_utf8_lossy(&body.aux).into_owned(),
                seq: number.filter(|_| !truncated),
                first_seq: number.filter(|_| truncated),
            };
            Incoming::Answer(
                header.id,
                Ok(ClientReply {
                    data: Bytes::new(),
                    headers: None,
                    stream: Some(stream),
                }),
            )
        }
        frame_type::REPLY | frame_type::ACK | frame_type::PONG => Incoming::Answer(
            header.id,
            Ok(ClientReply {
                data: body.payload,
                headers: body.headers,
                stream: None,
            }),
        ),
        frame_type::ERROR => {
            let code = std::str::from_utf8(&body.aux)
                .ok()
                .and_then(ErrorCode::parse)
                .unwrap_or(ErrorCode::Internal);
            let mut error = GatewayError::new(code, String::from_utf8_lossy(&body.payload));
            error.retry_after_ms = (header.param != 0).then_some(header.param);
            Incoming::Answer(header.id, Err(error))
        }
        // A stream message's aux is its sequence; it has no reply subject.
        frame_type::MSG if streamed => Incoming::Event(
            header.id,
            SubscriptionEvent::Message {
                subject: String::from_utf8_lossy(&body.subject).into_owned(),
                reply_to: None,
                headers: body.headers,
                data: body.payload,
                seq: Some(u64::from_be_bytes(<[u8; 8]>::try_from(&body.aux[..]).ok()?)),
            },
        ),
        frame_type::MSG => Incoming::Event(
            header.id,
            SubscriptionEvent::Message {
                subject: String::from_utf8_lossy(&body.subject).into_owned(),
                reply_to: (!body.aux.is_empty())
                    .then(|| String::from_utf8_lossy(&body.aux).into_owned()),
                headers: body.headers,
                data: body.payload,
                seq: None,
            },
        ),
        frame_type::DROPPED => {
            let dropped = SubscriptionEvent::Dropped {
                count: header.param as u64,
                gap: header.flags & crate::protocol::binary::flag::GAP != 0,
            };
            Incoming::Event(header.id, dropped)
        }
        _ => Incoming::Ignored,
    })
}

fn dispatch(shared: &Mutex<Shared>, incoming: Incoming) {
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    match incoming {
        Incoming::Answer(id, answer) => {
            if let Some(waiter) = shared.waiting.remove(&id) {
                let _ = waiter.send(answer);
            } else if let Err(error) = answer {
                // An error with no request behind it (id 0): the connection-level complaint.
                tracing::warn!(%error, "gateway reported an error");
            }
        }
        Incoming::Event(sid, event) => {
            if let Some(events) = shared.subscriptions.get(&sid) {
                let _ = events.send(event);
            }
        }
        Incoming::Ignored => {}
    }
}

// ---------------------------------------------------------------------------------------------
// JSON lines, the client's side: requests out, answers in (docs/protocol.md). The gateway's
// codec in `protocol::json` reads requests and writes answers; this is its mirror image.

/// Appends the JSON line for one call: the same parts a binary frame would carry.
fn put_json_line(parts: &FrameParts<'_>, out: &mut BytesMut) {
    let op: &[u8] = match parts.frame_type {
        frame_type::REQUEST => b"request",
        frame_type::PUBLISH => b"publish",
        frame_type::SUBSCRIBE => b"subscribe",
        frame_type::UNSUBSCRIBE => b"unsubscribe",
        frame_type::CREDIT => b"credit",
        // The client sends no other frame type.
        _ => b"ping",
    };
    out.reserve(96 + parts.subject.len() + parts.aux.len() + parts.payload.len());
    out.put_slice(b"{\"op\":\"");
    out.put_slice(op);
    out.put_slice(b"\",\"id\":");
    out.put_slice(itoa::Buffer::new().format(parts.id).as_bytes());
    if !parts.subject.is_empty() {
        out.put_slice(b",\"subject\":");
        put_json_str(out, &String::from_utf8_lossy(parts.subject));
    }
    let streamed = parts.flags & binary::flag::STREAM != 0;
    let timed = parts.frame_type == frame_type::REQUEST
        || (parts.frame_type == frame_type::PUBLISH && streamed);
    if timed && parts.param != 0 {
        out.put_slice(b",\"timeout_ms\":");
        out.put_slice(itoa::Buffer::new().format(parts.param).as_bytes());
    }
    let mut payload = parts.payload;
    if streamed && parts.frame_type == frame_type::PUBLISH {
        out.put_slice(b",\"durable\":true");
    } else if streamed && parts.frame_type == frame_type::SUBSCRIBE {
        // The replay's start travels in the frame's payload; in JSON it has its own field.
        if parts.flags & binary::flag::SINCE_TIME != 0 {
            out.put_slice(b",\"since_time\":");
            put_json_str(out, &String::from_utf8_lossy(payload));
        } else {
            let after = <[u8; 8]>::try_from(payload).map_or(0, u64::from_be_bytes);
            out.put_slice(b",\"since_seq\":");
            out.put_slice(itoa::Buffer::new().format(after).as_bytes());
        }
        payload = &[];
    }
    if !parts.aux.is_empty() {
        out.put_slice(b",\"queue\":");
        put_json_str(out, &String::from_utf8_lossy(parts.aux));
    }
    if let Some(headers) = parts.headers.filter(|h| !h.is_empty()) {
        put_json_headers(out, headers);
    }
    if !payload.is_empty() {
        // Plain ASCII (the common case) is checked in one pass and copied as it is.
        if is_plain_ascii(payload) {
            out.put_slice(b",\"data\":\"");
            out.put_slice(payload);
            out.put_u8(b'"');
        } else if let Ok(text) = std::str::from_utf8(payload) {
            out.put_slice(b",\"data\":");
            put_json_str(out, text);
        } else {
            out.put_slice(b",\"data_b64\":\"");
            out.put_slice(BASE64.encode(payload).as_bytes());
            out.put_slice(b"\"");
        }
    }
    out.put_slice(b"}\n");
}

/// Whether a JSON string needs escapes for these bytes: a control character, `"` or `\`.
/// Checked a chunk at a time without stopping early, so that the compiler can vectorise it.
fn needs_escape(bytes: &[u8]) -> bool {
    bytes.chunks(64).any(|chunk| {
        chunk.iter().fold(false, |bad, &b| {
            bad | (b < 0x20) | (b == b'"') | (b == b'\\')
        })
    })
}

/// Printable ASCII without `"` or `\`: valid UTF-8 that goes into a JSON string unchanged.
fn is_plain_ascii(bytes: &[u8]) -> bool {
    !bytes.chunks(64).any(|chunk| {
        chunk.iter().fold(false, |bad, &b| {
            bad | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
        })
    })
}

/// A JSON string. Text that needs no escaping (the usual case) is copied as it is.
fn put_json_str(out: &mut BytesMut, text: &str) {
    if !needs_escape(text.as_bytes()) {
        out.put_u8(b'"');
        out.put_slice(text.as_bytes());
        out.put_u8(b'"');
    } else {
        // Serializing a string into memory cannot fail.
        let _ = serde_json::to_writer(out.writer(), text);
    }
}

/// `"headers":{"Name":"value"}`, or a list when a name has several values.
fn put_json_headers(out: &mut BytesMut, headers: &Headers) {
    out.put_slice(b",\"headers\":{");
    for (index, (name, values)) in headers.iter().enumerate() {
        if index > 0 {
            out.put_u8(b',');
        }
        put_json_str(out, name);
        out.put_u8(b':');
        if let [one] = values {
            put_json_str(out, one.as_str());
        } else {
            out.put_u8(b'[');
            for (i, value) in values.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                put_json_str(out, value.as_str());
            }
            out.put_u8(b']');
        }
    }
    out.put_u8(b'}');
}

/// Any line the gateway writes: a reply, ack or error (`id`, `ok`), a pong, or a subscription's
/// `msg` or `dropped` (`sid`).
#[derive(Deserialize)]
struct JsonAnswer<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    /// This client's ids are numbers; `null` on a complaint about the connection.
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    ok: bool,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data_b64: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    headers: Option<BTreeMap<Cow<'a, str>, JsonHeaderValues<'a>>>,
    #[serde(default)]
    error: Option<JsonError>,
    #[serde(default)]
    sid: Option<u64>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    count: u64,
    /// A durable publish's or replaying subscribe's stream, and a stream message's sequence.
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    first_seq: Option<u64>,
    #[serde(default)]
    gap: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonHeaderValues<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

#[derive(Deserialize)]
struct JsonError {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retry_after_ms: Option<u32>,
}

fn decode_json(line: &Bytes) -> Option<Incoming> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Some(Incoming::Ignored);
    }
    let answer: JsonAnswer<'_> = serde_json::from_slice(line).ok()?;
    let headers = match answer.headers {
        Some(headers) => Some(json_header_map(headers)?),
        None => None,
    };
    let data = json_data(line, answer.data, answer.data_b64.as_deref())?;
    Some(match answer.op.as_deref() {
        Some("msg") => Incoming::Event(
            answer.sid?,
            SubscriptionEvent::Message {
                subject: answer.subject.unwrap_or_default(),
                reply_to: answer.reply_to,
                headers,
                data,
                seq: answer.seq,
            },
        ),
        Some("dropped") => Incoming::Event(
            answer.sid?,
            SubscriptionEvent::Dropped {
                count: answer.count,
                gap: answer.gap,
            },
        ),
        Some("pong") => Incoming::Answer(
            answer.id.unwrap_or(0),
            Ok(ClientReply {
                data,
                headers: None,
                stream: None,
            }),
        ),
        Some(_) => Incoming::Ignored,
        None if answer.ok => {
            let stream = answer.stream.map(|stream| StreamAnswer {
                stream,
                seq: answer.seq,
                first_seq: answer.first_seq,
            });
            Incoming::Answer(
                answer.id.unwrap_or(0),
                Ok(ClientReply {
                    data,
                    headers,
                    stream,
                }),
            )
        }
        None => {
            let error = answer.error.map_or_else(
                || GatewayError::new(ErrorCode::Internal, "an error without a code"),
                |e| {
                    let code = ErrorCode::parse(&e.code).unwrap_or(ErrorCode::Internal);
                    let mut error = GatewayError::new(code, e.message);
                    error.retry_after_ms = e.retry_after_ms;
                    error
                },
            );
            Incoming::Answer(answer.id.unwrap_or(0), Err(error))
        }
    })
}

/// The payload of a line: `data` text (a slice of the line when it has no escapes, so the
/// payload is not copied), `data_b64` bytes, or any other JSON value as its text.
fn json_data(line: &Bytes, data: Option<&RawValue>, data_b64: Option<&str>) -> Option<Bytes> {
    if let Some(encoded) = data_b64 {
        return BASE64.decode(encoded.as_bytes()).ok().map(Bytes::from);
    }
    let Some(raw) = data else {
        return Some(Bytes::new());
    };
    let text = raw.get();
    if text == "null" {
        Some(Bytes::new())
    } else if !text.starts_with('"') {
        Some(line.slice_ref(text.as_bytes()))
    } else if memchr::memchr(b'\\', text.as_bytes()).is_none() && text.len() >= 2 {
        Some(line.slice_ref(&text.as_bytes()[1..text.len() - 1]))
    } else {
        serde_json::from_str::<String>(text).ok().map(Bytes::from)
    }
}

fn json_header_map(headers: BTreeMap<Cow<'_, str>, JsonHeaderValues<'_>>) -> Option<Headers> {
    let mut map = Headers::new();
    for (name, values) in headers {
        let values = match values {
            JsonHeaderValues::One(value) => vec![value],
            JsonHeaderValues::Many(values) => values,
        };
        for value in values {
            // From the gateway: its own Ipc-Gateway-* names are allowed here.
            map.append_from_gateway(name.as_ref(), value).ok()?;
        }
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_line(parts: FrameParts<'_>) -> serde_json::Value {
        let mut out = BytesMut::new();
        put_json_line(&parts, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out[..out.len() - 1]).unwrap()
    }

    fn answer(line: &str) -> (u64, Answer) {
        match decode_json(&Bytes::copy_from_slice(line.as_bytes())) {
            Some(Incoming::Answer(id, answer)) => (id, answer),
            _ => panic!("not an answer: {line}"),
        }
    }

    #[test]
    fn json_requests_carry_the_same_parts_as_binary_frames() {
        let request = json_line(FrameParts {
            frame_type: frame_type::REQUEST,
            id: 7,
            param: 2000,
            subject: b"demo.echo",
            payload: b"say \"hi\"\n",
            ..FrameParts::default()
        });
        assert_eq!(
            request,
            serde_json::json!({"op":"request","id":7,"subject":"demo.echo","timeout_ms":2000,"data":"say \"hi\"\n"})
        );
        let subscribe = json_line(FrameParts {
            frame_type: frame_type::SUBSCRIBE,
            id: 3,
            subject: b"events.>",
            aux: b"workers",
            ..FrameParts::default()
        });
        assert_eq!(
            subscribe,
            serde_json::json!({"op":"subscribe","id":3,"subject":"events.>","queue":"workers"})
        );
        let mut headers = Headers::new();
        headers.append("X-A", "1").unwrap();
        headers.append("X-B", "2").unwrap();
        headers.append("X-B", "3").unwrap();
        let publish = json_line(FrameParts {
            frame_type: frame_type::PUBLISH,
            id: 4,
            subject: b"a",
            headers: Some(&headers),
            payload: &[0xff, 0],
            ..FrameParts::default()
        });
        assert_eq!(publish["data_b64"], "/wA=");
        assert_eq!(
            publish["headers"],
            serde_json::json!({"X-A":"1","X-B":["2","3"]})
        );
        assert_eq!(
            json_line(FrameParts {
                frame_type: frame_type::PING,
                id: 5,
                ..FrameParts::default()
            }),
            serde_json::json!({"op":"ping","id":5})
        );
    }

    #[test]
    fn json_reply_data_is_a_slice_of_the_line() {
        let line = Bytes::from_static(br#"{"id":9,"ok":true,"data":"hello"}"#);
        let Some(Incoming::Answer(9, Ok(reply))) = decode_json(&line) else {
            panic!("not a reply");
        };
        assert_eq!(&reply.data[..], b"hello");
        let at = reply.data.as_ptr() as usize - line.as_ptr() as usize;
        assert!(at < line.len(), "the payload was copied");
    }

    #[test]
    fn json_answers_decode_errors_pongs_escapes_and_base64() {
        let (id, error) = answer(
            r#"{"id":2,"ok":false,"error":{"code":"CIRCUIT_OPEN","message":"open","retry_after_ms":250}}"#,
        );
        let error = error.unwrap_err();
        assert_eq!((id, error.code), (2, ErrorCode::CircuitOpen));
        assert_eq!(error.retry_after_ms, Some(250));
        assert_eq!(answer(r#"{"op":"pong","id":5}"#).0, 5);
        let (_, escaped) = answer(r#"{"id":1,"ok":true,"data":"a\nb"}"#);
        assert_eq!(&escaped.unwrap().data[..], b"a\nb");
        let (_, bytes) = answer(r#"{"id":1,"ok":true,"data_b64":"/wA=","headers":{"X":"1"}}"#);
        let bytes = bytes.unwrap();
        assert_eq!(&bytes.data[..], &[0xff, 0]);
        assert_eq!(bytes.headers.unwrap().get("X"), Some("1"));
        let (id, unknown) = answer(r#"{"id":null,"ok":false,"error":{"code":"NEW_CODE"}}"#);
        assert_eq!((id, unknown.unwrap_err().code), (0, ErrorCode::Internal));
    }

    #[test]
    fn json_subscription_events_go_by_sid() {
        let line = Bytes::from_static(
            br#"{"op":"msg","sid":4,"subject":"events.a","reply_to":"r","data":"x"}"#,
        );
        match decode_json(&line) {
            Some(Incoming::Event(
                4,
                SubscriptionEvent::Message {
                    subject,
                    reply_to,
                    data,
                    ..
                },
            )) => {
                assert_eq!(subject, "events.a");
                assert_eq!(reply_to.as_deref(), Some("r"));
                assert_eq!(&data[..], b"x");
            }
            _ => panic!("not a message"),
        }
        let dropped = Bytes::from_static(br#"{"op":"dropped","sid":4,"count":12}"#);
        assert!(matches!(
            decode_json(&dropped),
            Some(Incoming::Event(
                4,
                SubscriptionEvent::Dropped {
                    count: 12,
                    gap: false
                }
            ))
        ));
        assert!(decode_json(&Bytes::from_static(b"{nope")).is_none());
    }

    #[test]
    fn lines_and_frames_are_split_only_when_whole() {
        let mut buf = BytesMut::from(&b"{\"id\":1,\"ok\":true}\n{\"id\":2"[..]);
        let mut scanned = 0;
        assert!(
            matches!(split_line(&mut buf, &mut scanned), Split::Item(line) if &line[..] == b"{\"id\":1,\"ok\":true}")
        );
        assert!(matches!(
            split_line(&mut buf, &mut scanned),
            Split::Incomplete(_)
        ));
        assert_eq!(scanned, buf.len());

        let mut frame = BytesMut::new();
        binary::put_frame(
            FrameParts {
                frame_type: frame_type::REPLY,
                id: 8,
                payload: b"pong",
                ..FrameParts::default()
            },
            &mut frame,
        );
        let whole = frame.len();
        let mut buf = BytesMut::from(&frame[..whole - 1]);
        assert!(matches!(split_frame(&mut buf), Split::Incomplete(1)));
        buf.extend_from_slice(&frame[whole - 1..]);
        let Split::Item(item) = split_frame(&mut buf) else {
            panic!("the frame is whole");
        };
        assert!(matches!(
            decode_frame(item),
            Some(Incoming::Answer(8, Ok(reply))) if &reply.data[..] == b"pong"
        ));
    }
}
