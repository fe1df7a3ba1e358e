//! The `ipcgateway.v1.Gateway` rpcs: each turns its message into an `Envelope` and calls the
//! core, so gRPC clients get the same validation, limits, breakers, error codes and metrics as
//! every other front-end. Subscribe and Exchange answer through an `Outbox`, like a socket
//! connection; `stream.rs` writes it out.

use std::sync::Arc;

use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

use crate::core::{Caller, Gateway, Replayed, auth};
use crate::frontend::lifecycle::{Broken, Lifecycle};
use crate::frontend::outbox::Outbox;
use crate::frontend::session::{Flow, Session};
use crate::protocol::{
    Decoded, Delivery, Envelope, ErrorCode, Frontend, GatewayError, Headers, Id, Op, Outbound,
    Since, Subject, json,
};

use super::conn::state_of;
use super::metadata::{listed, reply_metadata, request_deadline_ms, request_headers};
use super::pb::gateway_server::Gateway as GatewayRpc;
use super::pb::{self, exchange_reply};
use super::status::{input_failure, to_message, to_status};
use super::stream::{self, CarriedDrops, Ended, ResponseStream};

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

    /// What every call checks first: its connection is served, the gateway is not draining,
    /// the message is within the frame limit, and who calls: the token in the call's
    /// `authorization: Bearer` metadata, else the connection's anonymous peer (refused when
    /// tokens are required). Returns the call's caller.
    fn admit<T>(&self, request: &Request<T>, op: Op, encoded_len: usize) -> Result<Caller, Status> {
        let checked = state_of(request).and_then(|conn| {
            let caller = conn.caller()?;
            if self.gateway.shutdown().is_stopping() {
                return Err(shutting_down());
            }
            check_size(self.gateway.config().max_frame_bytes, encoded_len)?;
            self.identify(caller, request.metadata())
        });
        checked.map_err(|error| self.refuse(op, error))
    }

    fn identify(&self, caller: &Caller, metadata: &MetadataMap) -> Result<Caller, GatewayError> {
        let Some(value) = metadata.get("authorization") else {
            // A verified client certificate is credentials enough.
            if self.gateway.auth_required() && caller.identity().cert.is_none() {
                return Err(GatewayError::new(
                    ErrorCode::Unauthenticated,
                    "this gateway requires a token: authorization: Bearer <jwt> metadata",
                ));
            }
            return Ok(caller.clone());
        };
        let token = value
            .to_str()
            .ok()
            .and_then(auth::bearer_from_header)
            .ok_or_else(|| {
                GatewayError::new(
                    ErrorCode::Unauthenticated,
                    "authorization metadata must be \"Bearer <jwt>\"",
                )
            })?;
        let identity = self.gateway.verify_token_on(token, caller.identity())?;
        Ok(caller.with(self.gateway.authorize(identity)))
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

/// A request's envelope; its deadline is the tighter of the call's and the message's.
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
    envelope.timeout_ms = request_deadline_ms(metadata, timeout_ms);
    Ok(envelope)
}

/// A Subscribe call's `since_seq` / `since_time` (one of them at most).
fn since(seq: Option<u64>, time: Option<String>) -> Result<Option<Box<Since>>, GatewayError> {
    let since = match (seq, time) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(GatewayError::bad_request(
                "give since_seq or since_time, not both",
            ));
        }
        (Some(seq), None) => Since::Seq(seq),
        (None, Some(text)) => {
            Since::Time(json::parse_time(&text).map_err(GatewayError::bad_request)?)
        }
    };
    Ok(Some(Box::new(since)))
}

/// Where a replaying Subscribe starts, in its response metadata.
fn replay_metadata(replayed: &Replayed, metadata: &mut MetadataMap) {
    if let Ok(stream) = replayed.stream.parse() {
        metadata.insert("ipc-gateway-stream", stream);
    }
    if let Some(first) = replayed.truncated {
        metadata.insert("ipc-gateway-truncated", MetadataValue::from_static("true"));
        metadata.insert("ipc-gateway-first-seq", MetadataValue::from(first));
    }
}

fn reply_message(data: bytes::Bytes, headers: Option<&Headers>) -> pb::ReplyMessage {
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
        let caller = self.admit(&request, Op::Request, request.get_ref().encoded_len())?;
        let (metadata, _, message) = request.into_parts();
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
            .request(&caller, envelope)
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
        let caller = self.admit(&request, Op::Publish, request.get_ref().encoded_len())?;
        let (metadata, _, message) = request.into_parts();
        let mut envelope = Envelope::new(Op::Publish, Id::Null);
        envelope.headers =
            request_headers(&metadata, message.headers).map_err(|e| self.refuse(Op::Publish, e))?;
        envelope.subject = subject(message.subject);
        envelope.data = message.payload;
        if message.durable {
            envelope.flags.durable = true;
            envelope.id = match message.msg_id {
                id if id.is_empty() => Id::Null,
                id => Id::Text(id.into()),
            };
            envelope.timeout_ms = request_deadline_ms(&metadata, message.timeout_ms);
            let stored = self.gateway.publish_durable(&caller, envelope).await;
            let stored = stored.await.map_err(|e| to_status(&e))?;
            return Ok(Response::new(pb::PublishAck {
                stream: stored.stream.to_string(),
                seq: stored.seq,
            }));
        }
        self.gateway
            .publish(&caller, envelope)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::PublishAck::default()))
    }

    type SubscribeStream = ResponseStream<pb::SubscriptionMessage>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.admit(&request, Op::Subscribe, request.get_ref().encoded_len())?;
        let message = request.into_inner();
        let outbox = Arc::new(Outbox::new(self.gateway.config().subscription_queue));
        // The stream is a session of one subscription, opened the way every front-end opens
        // one: the session keeps it (the core re-opens it if its NATS connection is replaced)
        // and closes it when dropped.
        let mut session = Session::new(self.gateway.clone(), caller, outbox);
        let mut envelope = Envelope::new(Op::Subscribe, Id::from(1));
        envelope.subject = subject(message.subject);
        envelope.queue = message.queue;
        envelope.since = since(message.since_seq, message.since_time)
            .map_err(|e| self.refuse(Op::Subscribe, e))?;
        let replayed = session
            .subscribe(envelope)
            .await
            .map_err(|e| to_status(&e))?;
        let (sender, response) = stream::channel();
        tokio::spawn(serve_subscription(self.gateway.clone(), session, sender));
        let mut response = Response::new(response);
        if let Some(replayed) = replayed {
            replay_metadata(&replayed, response.metadata_mut());
        }
        Ok(response)
    }

    type RegisterStream = ResponseStream<pb::NamedMessage>;

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<Self::RegisterStream>, Status> {
        let caller = self.admit(&request, Op::Register, request.get_ref().encoded_len())?;
        let name = request.into_inner().name;
        super::named::register(&self.gateway, caller, name)
            .await
            .map(Response::new)
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceReply>, Status> {
        let caller = self.admit(&request, Op::Presence, request.get_ref().encoded_len())?;
        let name = request.into_inner().name;
        super::named::presence(&self.gateway, caller, name)
            .await
            .map(Response::new)
    }

    type WatchPresenceStream = ResponseStream<pb::PresenceReply>;

    async fn watch_presence(
        &self,
        request: Request<pb::WatchPresenceRequest>,
    ) -> Result<Response<Self::WatchPresenceStream>, Status> {
        let caller = self.admit(&request, Op::PresenceWatch, request.get_ref().encoded_len())?;
        let pattern = request.into_inner().pattern;
        super::named::watch(&self.gateway, caller, pattern)
            .await
            .map(Response::new)
    }

    type ExchangeStream = ResponseStream<pb::ExchangeReply>;

    async fn exchange(
        &self,
        request: Request<Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let caller = self.admit(&request, Op::Request, 0)?;
        let (metadata, _, inbound) = request.into_parts();
        let outbox = Arc::new(Outbox::new(self.gateway.config().subscription_queue));
        let session = Session::new(self.gateway.clone(), caller, outbox);
        let (sender, response) = stream::channel();
        tokio::spawn(serve_exchange(
            self.gateway.clone(),
            session,
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
    sender: stream::Sender<pb::SubscriptionMessage>,
) {
    let life = Lifecycle::new(&gateway, FRONTEND);
    let outbox = session.outbox().clone();
    // Drop notices come before the messages that follow the gap: `dropped` carries the count
    // onto the next message. A reloaded policy that took the subscription away ends the
    // stream with that refusal (PERMISSION_DENIED).
    let mut drops = CarriedDrops::default();
    let mut revoked = None;
    let convert = |event: Outbound| match event {
        Outbound::Unsubscribed { error, .. } => {
            revoked = Some(error);
            outbox.close();
            None
        }
        Outbound::Dropped { count, gap, .. } => {
            drops.add(count, gap);
            None
        }
        Outbound::Msg { message, .. } => Some(subscription_message(&message, &mut drops)),
        _ => None,
    };
    let ended = tokio::select! {
        ended = sender.write_outbox(&outbox, life.writes(), convert) => Some(ended),
        _ = gateway.shutdown().stopped() => None,
    };
    drop(session);
    outbox.abandon();
    let status = match ended {
        _ if revoked.is_some() => revoked.as_ref().map(to_status),
        None => Some(to_status(&shutting_down())),
        Some(Ended::Broken(Broken::Stalled)) => Some(stalled_status(life.writes().stall())),
        Some(Ended::Broken(Broken::Gone)) | Some(Ended::Done) => None,
    };
    sender.finish(status);
}

/// A delivered message as a stream sends it, carrying the drop notices since the last one.
pub(super) fn subscription_message(
    message: &Delivery,
    drops: &mut CarriedDrops,
) -> pb::SubscriptionMessage {
    let (dropped, gap) = drops.take();
    pb::SubscriptionMessage {
        subject: message.subject.to_string(),
        headers: listed(message.headers.as_ref()),
        payload: message.payload.clone(),
        reply_to: message
            .reply_to
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default(),
        dropped,
        gap,
        seq: message.seq.unwrap_or(0),
    }
}

fn stalled_status(stall: std::time::Duration) -> Status {
    to_status(&GatewayError::new(
        ErrorCode::Overloaded,
        format!(
            "the client read nothing for {} ms (--slow-client-stall-ms); the stream is closed",
            stall.as_millis()
        ),
    ))
}

/// Serves one Exchange stream: its input and its answers, in one task. The stream ends OK
/// when the client's input ended and everything was answered; UNAVAILABLE when the gateway
/// shut down (requests without an answer were not sent); RESOURCE_EXHAUSTED when the client
/// stopped reading.
async fn serve_exchange(
    gateway: Gateway,
    session: Session,
    metadata: MetadataMap,
    inbound: Streaming<pb::ExchangeRequest>,
    sender: stream::Sender<pb::ExchangeReply>,
) {
    let mut life = Lifecycle::new(&gateway, FRONTEND);
    let outbox = session.outbox().clone();
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
    let writes = life.writes().clone();
    let write = async {
        let written = sender.write_outbox(&outbox, &writes, convert).await;
        gone.cancel();
        written
    };
    let read = read_exchange(&gateway, &mut life, session, &metadata, inbound, &gone);
    let (input_failed, ended) = tokio::join!(read, write);
    let status = match ended {
        Ended::Broken(Broken::Stalled) => Some(stalled_status(writes.stall())),
        Ended::Broken(Broken::Gone) => None,
        Ended::Done if life.is_draining() => Some(to_status(&shutting_down())),
        Ended::Done => input_failed.map(input_failure),
    };
    sender.finish(status);
}

/// Reads an Exchange stream into its session: each request starts at once and its answer,
/// tagged with its id, reaches the outbox whenever it comes. With
/// `max_inflight_per_connection` requests unanswered, reading pauses until answers go out.
/// On shutdown it stops reading. Returns once the input ended and every request read was
/// answered (then the outbox is closed), with the status that broke the input, if one did.
async fn read_exchange(
    gateway: &Gateway,
    life: &mut Lifecycle,
    mut session: Session,
    metadata: &MetadataMap,
    mut inbound: Streaming<pb::ExchangeRequest>,
    gone: &CancellationToken,
) -> Option<Status> {
    let config = gateway.config();
    let max_inflight = config.max_inflight_per_connection;
    let max_frame = config.max_frame_bytes;
    let outbox = session.outbox().clone();
    let mut failed = None;
    // An Exchange stream's input is never read just to be refused: a drain stops reading.
    let reads = |life: &Lifecycle| life.reads() && !life.is_draining();
    while !life.finished(session.has_unanswered(), false) {
        let has_room = outbox.pending() < max_inflight;
        tokio::select! {
            biased;
            _ = gone.cancelled() => break,
            // A drain that finds the input still open ends the stream with UNAVAILABLE.
            _ = gateway.shutdown().stopped(), if reads(life) => {
                life.begin_drain();
            }
            _ = outbox.wait_room(), if !has_room || !reads(life) => {}
            item = inbound.message(), if has_room && reads(life) => match item {
                Ok(Some(item)) => {
                    let id = Id::from(item.id);
                    let decoded = check_size(max_frame, item.encoded_len())
                        .and_then(|()| {
                            request_envelope(
                                id.clone(),
                                metadata,
                                item.subject,
                                item.headers,
                                item.payload,
                                item.timeout_ms,
                            )
                        })
                        .map_or_else(
                            |error| Decoded::Invalid { id, error, fatal: false },
                            Decoded::Envelope,
                        );
                    if session.handle(decoded).await == Flow::Close {
                        life.input_broke();
                    }
                }
                Ok(None) => life.input_ended(),
                Err(status) => {
                    tracing::debug!(%status, "an Exchange stream's input failed");
                    failed = Some(status);
                    life.input_broke();
                }
            },
        }
    }
    outbox.close();
    failed
}
