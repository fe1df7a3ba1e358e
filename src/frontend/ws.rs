//! The WebSocket front-end: `GET /ws` on the HTTP port. It speaks the same envelope as the Unix
//! socket through the same `Session` and `Outbox`: a text message carries one JSON envelope, a
//! binary message carries exactly one binary frame (v1), and the answers come back in the
//! format of the connection's first message, one event per WebSocket message. Browser pages
//! from foreign origins are refused before the upgrade.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::core::Gateway;
use crate::ops::metrics::Frontend;
use crate::protocol::binary::BinaryDecoder;
use crate::protocol::{Decoded, GatewayError, Id, WireFormat, json};

use super::outbox::Outbox;
use super::session::{Flow, Session};

/// Events sent per batch before the writer flushes.
const MAX_BATCH_EVENTS: usize = 256;
/// tungstenite's read buffer starts at 128 KiB per connection by default; idle connections
/// should cost little, and it grows for large messages.
const READ_BUFFER: usize = 4096;

/// `GET /ws`: checks the origin and the connection limit, then upgrades.
pub async fn upgrade(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(origin) = origin_allowed(&gateway, &headers) {
        debug!(%origin, "refusing a WebSocket from a foreign origin");
        return (
            StatusCode::FORBIDDEN,
            format!("origin {origin} may not open /ws (see --ws-allowed-origins)"),
        )
            .into_response();
    }
    let Some(slot) = gateway.try_connection_slot() else {
        gateway.metrics().connection_rejected(Frontend::Ws);
        let max = gateway.config().max_connections;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("OVERLOADED: the gateway serves its maximum of {max} connections; retry later"),
        )
            .into_response();
    };
    let max = gateway.config().ws_max_message();
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| {
            let connections = gateway.connections().clone();
            connections.track_future(serve(gateway, socket, slot))
        })
}

/// Programs send no `Origin`; browsers do, and only the gateway's own origin and the
/// configured ones are let in.
fn origin_allowed(gateway: &Gateway, headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return Ok(());
    };
    let allowed = &gateway.config().ws_allowed_origins;
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let own = origin
        .split_once("://")
        .is_some_and(|(_, authority)| !host.is_empty() && authority.eq_ignore_ascii_case(host));
    if own { Ok(()) } else { Err(origin.to_owned()) }
}

/// Decodes one WebSocket message into one item.
fn decode(message: Message, max: usize) -> Option<(WireFormat, Decoded)> {
    match message {
        Message::Text(text) => Some((WireFormat::JsonLines, json::parse_line(Bytes::from(text)))),
        Message::Binary(data) => {
            let mut buf = BytesMut::from(data);
            let mut decoder = BinaryDecoder::new(max);
            let item = decoder.decode(&mut buf).unwrap_or(Decoded::Invalid {
                id: Id::Null,
                error: GatewayError::bad_request("a binary message must hold one whole frame"),
                fatal: false,
            });
            let item = if buf.is_empty() {
                item
            } else {
                Decoded::Invalid {
                    id: Id::Null,
                    error: GatewayError::bad_request(
                        "a binary message must hold exactly one frame",
                    ),
                    fatal: false,
                }
            };
            Some((WireFormat::Binary, item))
        }
        _ => None,
    }
}

async fn serve(gateway: Gateway, socket: WebSocket, _slot: OwnedSemaphorePermit) {
    let metrics = gateway.metrics().clone();
    metrics.connection_opened(Frontend::Ws);
    let config = gateway.config();
    let max = config.ws_max_message();
    let max_inflight = config.max_inflight_per_connection;
    let (sink, mut stream) = socket.split();
    let outbox = Arc::new(Outbox::new(config.subscription_queue));
    let format = Arc::new(OnceLock::new());
    let peer_gone = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        sink,
        outbox.clone(),
        format.clone(),
        peer_gone.clone(),
        gateway.clone(),
    ));
    let mut session = Session::new(gateway.clone(), Frontend::Ws, outbox.clone());
    let mut reading = true;
    let mut draining = false;
    loop {
        let subscriptions_done = draining || !session.has_subscriptions();
        if !session.has_unanswered() && (draining || (!reading && subscriptions_done)) {
            break;
        }
        let has_room = outbox.pending() < max_inflight;
        tokio::select! {
            biased;
            _ = peer_gone.cancelled() => break,
            _ = gateway.shutdown().stopped(), if !draining => {
                draining = true;
                session.close_subscriptions();
            }
            _ = outbox.wait_room(), if !has_room || draining || !reading => {}
            message = stream.next(), if reading && has_room => match message {
                Some(Ok(message)) => {
                    if matches!(message, Message::Close(_)) {
                        reading = false;
                        continue;
                    }
                    let Some((wire, item)) = decode(message, max) else { continue };
                    let _ = format.set(wire);
                    if draining {
                        session.refuse_shutting_down(item);
                    } else if session.handle(item).await == Flow::Close {
                        reading = false;
                    }
                }
                Some(Err(err)) => {
                    debug!(error = %err, "WebSocket read failed");
                    outbox.set_close_reason(if err.to_string().contains("too long") {
                        (close_code::SIZE, "message too big")
                    } else {
                        (close_code::PROTOCOL, "protocol error")
                    });
                    reading = false;
                }
                None => reading = false,
            },
        }
    }
    if draining {
        outbox.set_close_reason((close_code::AWAY, "the gateway is shutting down"));
    }
    session.close_subscriptions();
    outbox.close();
    let _ = writer.await;
    metrics.connection_closed(Frontend::Ws);
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    format: Arc<OnceLock<WireFormat>>,
    peer_gone: CancellationToken,
    gateway: Gateway,
) {
    let metrics = gateway.metrics().clone();
    let mut buf = BytesMut::new();
    while let Some(batch) = outbox.next_batch(MAX_BATCH_EVENTS).await {
        let wire = format.get().copied().unwrap_or(WireFormat::JsonLines);
        let mut failed = false;
        for event in &batch.events {
            wire.encode(event, &mut buf);
            let message = match wire {
                WireFormat::Binary => Message::Binary(buf.split().freeze()),
                WireFormat::JsonLines => {
                    // One JSON envelope per text message, without the line's newline.
                    let mut line = buf.split();
                    line.truncate(line.len().saturating_sub(1));
                    match Utf8Bytes::try_from(line.freeze()) {
                        Ok(text) => Message::Text(text),
                        Err(_) => continue,
                    }
                }
            };
            if sink.feed(message).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed || sink.flush().await.is_err() {
            let lost = batch.control + outbox.abandon();
            metrics.late_replies.increment(lost as u64);
            peer_gone.cancel();
            return;
        }
        outbox.written(batch.control);
    }
    let (code, reason) = outbox
        .close_reason()
        .unwrap_or((close_code::NORMAL, "goodbye"));
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        })))
        .await;
    let _ = sink.close().await;
}
