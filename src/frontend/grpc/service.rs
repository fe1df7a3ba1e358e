//! The `ipcgateway.v1.Gateway` rpcs: each turns its message into an `Envelope` and calls the
//! core, so gRPC clients get the same validation, limits, breakers, error codes and metrics as
//! every other front-end. Subscribe and Exchange answer through an `Outbox`, like a socket
//! connection; `stream.rs` writes it out.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::core::Gateway;
use crate::frontend::outbox::Outbox;
use crate::frontend::session::Session;
use crate::protocol::Frontend;
use crate::protocol::{Decoded, Envelope, ErrorCode, GatewayError, Id, Op, Outbound};

use super::conn::{ConnState, state_of};
use super::metadata::{deadline_ms, listed, reply_metadata, request_headers};
use super::pb::gateway_server::Gateway as GatewayRpc;
use super::pb::{self, exchange_reply};
use super::status::{to_message, to_status};
use super::stream::{self, Ended, ResponseStream};

const FRONTEND: Frontend = Frontend::Grpc;

pub struct GatewayService {
    gateway: Gateway,
}

impl GatewayService {
    pub fn new(gateway: Gateway) -> Self {
        GatewayService { gateway }
    }

    /// Counts a call refused before it reached the core, and makes its status.
    fn refuse(&self, op: Op, error: GatewayError) -> Status {
        self.gateway.count(FRONTEND, Some(op), Err(error.code));
        to_status(&error)
    }

    /// What every call checks first: the gateway is not draining, the message is within the
    /// frame limit, and the connection is within its rate limit.
    fn admit(
        &self,
        conn: &ConnState,
        encoded_len: usize,
        payload: usize,
    ) -> Result<(), GatewayError> {
        conn.check_served()?;
        if self.gateway.shutdown().is_stopping() {
            return Err(shutting_down());
        }
        check_size(self.gateway.config().max_frame_bytes, encoded_len)?;
        conn.admit(payload)
    }
}

fn shutting_down() -> GatewayError {
    GatewayError::new(ErrorCode::Unavailable, "the gateway is shutting down")
}

fn check_size(max: usize, encoded_len: usize) -> Result<(), GatewayError> {
    if encoded_len > max {
        return Err(GatewayError::new(
            ErrorCode::TooLarge,
            format!("the message is {encoded_len} bytes, the limit is {max} (--max-frame-bytes)"),
        ));
    }
    Ok(())
}

/// A subject as the envelope carries it: absent when empty, so the core's "subject is
/// required" applies.
fn subject(text: String) -> Option<Subject> {
    (!text.is_empty()).then(|| Subject::from(text))
}

/// A request's envelope. The deadline is the call's (less a margin), else the message's.
fn request_envelope(
    id: Id,
    metadata: &MetadataMap,
    subject_text: String,
    headers: Vec<pb::Header>,
    payload: bytes::Bytes,
    timeout_ms: Option<u32>,
) -> Result<Envelope, GatewayError> {
    let mut envelope = Envelope::new(Op::Request, id);
    envelope.headers = request_headers(metadata, headers)?;
    envelope.subject = subject(subject_text);
    envelope.data = payload;
    envelope.timeout_ms = deadline_ms(metadata).or(timeout_ms);
    Ok(envelope)
}

fn reply_message(data: bytes::Bytes, headers: Option<&async_nats::HeaderMap>) -> pb::ReplyMessage {
    pb::ReplyMessage {
        payload: data,
        headers: listed(headers),
    }
}

#[tonic::async_trait]
impl GatewayRpc for GatewayService {
    async fn request(
        &self,
        request: Request<pb::RequestMessage>,
    ) -> Result<Response<pb::ReplyMessage>, Status> {
        let conn = state_of(&request).map_err(|e| self.refuse(Op::Request, e))?;
        let (metadata, _, message) = request.into_parts();
        self.admit(&conn, message.encoded_len(), message.payload.len())
            .map_err(|e| self.refuse(Op::Request, e))?;
        let envelope = request_envelope(
            Id::Null,
            &metadata,
            message.subject,
            message.headers,
            message.payload,
            message.timeout_ms,
        )
        .map_err(|e| self.refuse(Op::Request, e))?;
        // The core counts the request from here on, whatever its outcome.
        let reply = self
            .gateway
            .request(FRONTEND, envelope)
            .await
            .map_err(|e| to_status(&e))?;
        let mut response = Response::new(reply_message(reply.data, reply.headers.as_ref()));
        reply_metadata(reply.headers.as_ref(), response.metadata_mut());
        Ok(response)
    }

    async fn publish(
        &self,
        request: Request<pb::PublishMessage>,
    ) -> Result<Response<pb::PublishAck>, Status> {
        let conn = state_of(&request).map_err(|e| self.refuse(Op::Publish, e))?;
        let (metadata, _, message) = request.into_parts();
        self.admit(&conn, message.encoded_len(), message.payload.len())
            .map_err(|e| self.refuse(Op::Publish, e))?;
        let mut envelope = Envelope::new(Op::Publish, Id::Null);
        envelope.headers =
            request_headers(&metadata, message.headers).map_err(|e| self.refuse(Op::Publish, e))?;
        envelope.subject = subject(message.subject);
        envelope.data = message.payload;
        self.gateway
            .publish(FRONTEND, conn.lane, envelope)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::PublishAck {}))
    }

    type SubscribeStream = ResponseStream<pb::SubscriptionMessage>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let conn = state_of(&request).map_err(|e| self.refuse(Op::Subscribe, e))?;
        let message = request.into_inner();
        self.admit(&conn, message.encoded_len(), 0)
            .map_err(|e| self.refuse(Op::Subscribe, e))?;
        let config = self.gateway.config();
        let outbox = Arc::new(Outbox::new(config.subscription_queue));
        // A session of one subscription: it keeps the NATS subscription (re-opening it if its
        // pool connection is replaced), counts it, and unsubscribes when dropped.
        let mut session = Session::new(self.gateway.clone(), FRONTEND, outbox.clone());
        let mut envelope = Envelope::new(Op::Subscribe, Id::from(1));
        envelope.subject = subject(message.subject);
        envelope.queue = message.queue;
        session.handle(Decoded::Envelope(envelope)).await;
        // The session's answer is the first control event (drop notices, should messages have
        // overflowed the queue already, come with it).
        let answer = outbox.take_batch(1);
        outbox.written(answer.control);
        let mut dropped = 0;
        for event in answer.events {
            match event {
                Outbound::Error { error, .. } => return Err(to_status(&error)),
                Outbound::Dropped { count, .. } => dropped += count,
                _ => {}
            }
        }
        let (sender, response) = stream::channel();
        tokio::spawn(serve_subscription(
            self.gateway.clone(),
            session,
            outbox,
            sender,
            dropped,
        ));
        Ok(Response::new(response))
    }

    type ExchangeStream = ResponseStream<pb::ExchangeReply>;

    async fn exchange(
        &self,
        request: Request<Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let conn = state_of(&request).map_err(|e| self.refuse(Op::Request, e))?;
        conn.check_served()
            .map_err(|e| self.refuse(Op::Request, e))?;
        if self.gateway.shutdown().is_stopping() {
            return Err(self.refuse(Op::Request, shutting_down()));
        }
        let (metadata, _, inbound) = request.into_parts();
        let (sender, response) = stream::channel();
        tokio::spawn(serve_exchange(
            self.gateway.clone(),
            conn,
            metadata,
            inbound,
            sender,
        ));
        Ok(Response::new(response))
    }
}

/// Streams one subscription's messages until the client cancels, stops reading, or the
/// gateway shuts down. Dropping the session (at the end) unsubscribes from NATS.
async fn serve_subscription(
    gateway: Gateway,
    session: Session,
    outbox: Arc<Outbox>,
    sender: stream::Sender<pb::SubscriptionMessage>,
    mut dropped: u64,
) {
    let stall = Duration::from_millis(gateway.config().slow_client_stall_ms);
    // Drop notices come before the messages that follow the gap: `dropped` carries the count
    // onto the next message.
    let convert = |event: Outbound| match event {
        Outbound::Dropped { count, .. } => {
            dropped += count;
            None
        }
        Outbound::Msg { message, .. } => Some(pb::SubscriptionMessage {
            subject: message.subject.to_string(),
            headers: listed(message.headers.as_ref()),
            payload: message.payload,
            reply_to: message.reply.map(|r| r.to_string()).unwrap_or_default(),
            dropped: std::mem::take(&mut dropped),
        }),
        _ => None,
    };
    let ended = tokio::select! {
        (ended, _) = sender.write_outbox(&outbox, stall, convert) => Some(ended),
        _ = gateway.shutdown().stopped() => None,
    };
    drop(session);
    outbox.abandon();
    let status = match ended {
        None => Some(to_status(&shutting_down())),
        Some(Ended::Stalled) => {
            debug!("ending a subscription whose client stopped reading");
            gateway.metrics().slow_client_disconnected(FRONTEND);
            Some(stalled_status(stall))
        }
        Some(Ended::Gone) | Some(Ended::Done) => None,
    };
    sender.finish(status);
}

fn stalled_status(stall: Duration) -> Status {
    to_status(&GatewayError::new(
        ErrorCode::Overloaded,
        format!(
            "the client read nothing for {} ms (--slow-client-stall-ms); the stream is closed",
            stall.as_millis()
        ),
    ))
}

/// How an Exchange stream's input ended.
enum InputEnd {
    /// The client closed its side (or cancelled the call).
    Finished,
    /// The gateway began shutting down and stopped reading.
    Draining,
    /// The input broke: a message over gRPC's size limit, say.
    Failed(Status),
}

/// Serves one Exchange stream: its input and its answers, in one task. The stream ends OK
/// when the client's input ended and everything was answered; UNAVAILABLE when the gateway
/// shut down (requests without an answer were not sent); RESOURCE_EXHAUSTED when the client
/// stopped reading.
async fn serve_exchange(
    gateway: Gateway,
    conn: Arc<ConnState>,
    metadata: MetadataMap,
    inbound: Streaming<pb::ExchangeRequest>,
    sender: stream::Sender<pb::ExchangeReply>,
) {
    let outbox = Arc::new(Outbox::new(gateway.config().subscription_queue));
    let stall = Duration::from_millis(gateway.config().slow_client_stall_ms);
    let gone = CancellationToken::new();
    let convert = |event: Outbound| match event {
        Outbound::Reply { id, data, headers } => Some(pb::ExchangeReply {
            id: id.as_u64(),
            result: Some(exchange_reply::Result::Reply(reply_message(
                data,
                headers.as_ref(),
            ))),
        }),
        Outbound::Error { id, error } => Some(pb::ExchangeReply {
            id: id.as_u64(),
            result: Some(exchange_reply::Result::Error(to_message(error))),
        }),
        _ => None,
    };
    let write = async {
        let written = sender.write_outbox(&outbox, stall, convert).await;
        gone.cancel();
        written
    };
    let read = read_exchange(&gateway, &conn, &metadata, inbound, &outbox, &gone);
    let (input, (ended, lost)) = tokio::join!(read, write);
    if lost > 0 {
        gateway.metrics().late_replies.increment(lost as u64);
    }
    let status = match (ended, input) {
        (Ended::Stalled, _) => {
            gateway.metrics().slow_client_disconnected(FRONTEND);
            Some(stalled_status(stall))
        }
        (Ended::Gone, _) | (Ended::Done, InputEnd::Finished) => None,
        (Ended::Done, InputEnd::Draining) => Some(to_status(&shutting_down())),
        (Ended::Done, InputEnd::Failed(status)) => Some(input_failure(status)),
    };
    sender.finish(status);
}

/// tonic refuses a message over its decoding limit with OUT_OF_RANGE; the gateway calls that
/// TOO_LARGE everywhere.
fn input_failure(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        return to_status(&GatewayError::new(ErrorCode::TooLarge, status.message()));
    }
    status
}

/// Reads an Exchange stream: each request starts at once and its answer, tagged with its id,
/// reaches the outbox whenever it comes. With `max_inflight_per_connection` requests
/// unanswered, reading pauses until answers go out. On shutdown it stops reading. Returns
/// once the input ended and every request read was answered (then the outbox is closed).
async fn read_exchange(
    gateway: &Gateway,
    conn: &ConnState,
    metadata: &MetadataMap,
    mut inbound: Streaming<pb::ExchangeRequest>,
    outbox: &Arc<Outbox>,
    gone: &CancellationToken,
) -> InputEnd {
    let config = gateway.config();
    let max_inflight = config.max_inflight_per_connection;
    let max_frame = config.max_frame_bytes;
    let mut end = None;
    loop {
        if outbox.pending() == 0 && end.is_some() {
            break;
        }
        let has_room = outbox.pending() < max_inflight;
        tokio::select! {
            biased;
            _ = gone.cancelled() => break,
            _ = gateway.shutdown().stopped(), if end.is_none() => end = Some(InputEnd::Draining),
            _ = outbox.wait_room(), if !has_room || end.is_some() => {}
            item = inbound.message(), if has_room && end.is_none() => match item {
                Ok(Some(item)) => {
                    let id = Id::from(item.id);
                    let started = check_size(max_frame, item.encoded_len())
                        .and_then(|()| conn.admit(item.payload.len()))
                        .and_then(|()| {
                            request_envelope(
                                id.clone(),
                                metadata,
                                item.subject,
                                item.headers,
                                item.payload,
                                item.timeout_ms,
                            )
                        });
                    outbox.begin_command();
                    match started {
                        Ok(envelope) => {
                            gateway.start_request(FRONTEND, envelope, outbox.clone()).await;
                        }
                        Err(error) => {
                            gateway.count(FRONTEND, Some(Op::Request), Err(error.code));
                            outbox.push_control(Outbound::Error { id, error });
                        }
                    }
                }
                Ok(None) => end = Some(InputEnd::Finished),
                Err(status) => {
                    debug!(%status, "an Exchange stream's input failed");
                    end = Some(InputEnd::Failed(status));
                }
            },
        }
    }
    outbox.close();
    end.unwrap_or(InputEnd::Finished)
}
