//! A small client for the gateway's Unix socket, speaking binary frames: pipelined requests
//! matched to replies by id, publish with ack, and subscriptions. The command line, the tests
//! and the benchmarks all use it.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::Headers;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::protocol::binary::{self, FrameHeader, FrameParts, HEADER_LEN, frame_type};
use crate::protocol::{ErrorCode, GatewayError};

/// The largest frame this client accepts from the gateway.
const MAX_INBOUND_FRAME: usize = 64 << 20;

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
}

/// A message delivered on a subscription, or a notice that some were dropped.
#[derive(Debug, Clone)]
pub enum SubscriptionEvent {
    Message {
        subject: String,
        reply_to: Option<String>,
        headers: Option<Headers>,
        data: Bytes,
    },
    Dropped(u64),
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
    frames: mpsc::Sender<BytesMut>,
    shared: Arc<Mutex<Shared>>,
    next_id: AtomicU64,
}

/// A subscription's messages; dropping it does not unsubscribe (call `unsubscribe`).
pub struct Subscription {
    pub sid: u64,
    pub events: mpsc::UnboundedReceiver<SubscriptionEvent>,
}

impl Client {
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Client> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (frames, queued) = mpsc::channel(1024);
        tokio::spawn(write_frames(write, queued));
        tokio::spawn(read_frames(read, shared.clone()));
        Ok(Client {
            frames,
            shared,
            next_id: AtomicU64::new(1),
        })
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
        binary::put_frame(parts, &mut frame);
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
        let timeout_ms = timeout.map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32);
        self.call(FrameParts {
            frame_type: frame_type::REQUEST,
            id: self.new_id(),
            param: timeout_ms,
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

    pub async fn subscribe(
        &self,
        subject: &str,
        queue: Option<&str>,
    ) -> Result<Subscription, ClientError> {
        let sid = self.new_id();
        let (sender, events) = mpsc::unbounded_channel();
        self.shared().subscriptions.insert(sid, sender);
        let result = self
            .call(FrameParts {
                frame_type: frame_type::SUBSCRIBE,
                id: sid,
                subject: subject.as_bytes(),
                aux: queue.unwrap_or("").as_bytes(),
                ..FrameParts::default()
            })
            .await;
        if let Err(err) = result {
            self.shared().subscriptions.remove(&sid);
            return Err(err);
        }
        Ok(Subscription { sid, events })
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

/// Writes queued frames, as many as are ready in one write.
async fn write_frames(mut write: OwnedWriteHalf, mut queued: mpsc::Receiver<BytesMut>) {
    let mut batch = BytesMut::new();
    while let Some(frame) = queued.recv().await {
        batch.unsplit(frame);
        while batch.len() < 64 * 1024 {
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

/// Reads frames from the gateway and routes each to whoever waits for its id.
async fn read_frames(mut read: OwnedReadHalf, shared: Arc<Mutex<Shared>>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    'read: loop {
        while buf.len() >= HEADER_LEN {
            let header = FrameHeader::parse(&buf);
            if buf[0] != binary::MAGIC || header.body_len as usize > MAX_INBOUND_FRAME {
                break 'read;
            }
            let total = HEADER_LEN + header.body_len as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                break;
            }
            let mut frame = buf.split_to(total).freeze();
            frame.advance(HEADER_LEN);
            let Ok(body) = binary::decode_body(frame) else {
                break 'read;
            };
            dispatch(&shared, header, body);
        }
        match read.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    shared.closed = true;
    shared.waiting.clear();
    shared.subscriptions.clear();
}

fn dispatch(shared: &Mutex<Shared>, header: FrameHeader, body: binary::FrameBody) {
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    let answer = match header.frame_type {
        frame_type::REPLY | frame_type::ACK | frame_type::PONG => Ok(ClientReply {
            data: body.payload,
            headers: body.headers,
        }),
        frame_type::ERROR => {
            let code = std::str::from_utf8(&body.aux)
                .ok()
                .and_then(ErrorCode::parse)
                .unwrap_or(ErrorCode::Internal);
            let mut error = GatewayError::new(code, String::from_utf8_lossy(&body.payload));
            error.retry_after_ms = (header.param != 0).then_some(header.param);
            Err(error)
        }
        frame_type::MSG | frame_type::DROPPED => {
            if let Some(events) = shared.subscriptions.get(&header.id) {
                let event = if header.frame_type == frame_type::MSG {
                    SubscriptionEvent::Message {
                        subject: String::from_utf8_lossy(&body.subject).into_owned(),
                        reply_to: (!body.aux.is_empty())
                            .then(|| String::from_utf8_lossy(&body.aux).into_owned()),
                        headers: body.headers,
                        data: body.payload,
                    }
                } else {
                    SubscriptionEvent::Dropped(header.param as u64)
                };
                let _ = events.send(event);
            }
            return;
        }
        _ => return,
    };
    if let Some(waiter) = shared.waiting.remove(&header.id) {
        let _ = waiter.send(answer);
    } else if let Err(error) = answer {
        // An error with no request behind it (id 0): the connection-level complaint.
        tracing::warn!(%error, "gateway reported an error");
    }
}
