//! Durable publish: a publish that a JetStream stream stores, answered with the stream's name
//! and the message's sequence once the stream has acknowledged it. It passes the same checks as
//! a plain publish (`Gateway::check_publish`: rate limit, subject, policy, identity headers,
//! byte budget), goes out on the caller's lane (so one client's messages keep their order),
//! and is audited and counted as a publish.
//!
//! Deduplication: the client's request id becomes the message's `Nats-Msg-Id`, scoped by the
//! caller's identity (`uid=1001:7`, `sub=bob:7`), so a retry within the stream's duplicate
//! window is stored once and no identity can suppress another's messages by reusing its ids. A
//! `Nats-Msg-Id` header a client sends itself is scoped the same way, on every message. Callers
//! nothing vouches for (anonymous) are scoped by their connection.
//!
//! Errors: no stream captures the subject → `NO_STREAM`; no ack before the deadline (the
//! client's `timeout_ms`, capped by `request_timeout_ms`; a stream without a leader is retried
//! until then) → `TIMEOUT`; NATS down or the connection lost → `UNAVAILABLE`; the stream
//! refusing the message (a limit with `discard: new`) → `OVERLOADED`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream::context::{
    GetStreamByNameErrorKind, PublishAckFuture, PublishError, PublishErrorKind, RequestError,
    RequestErrorKind,
};
use async_nats::jetstream::{self, Context};
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant as Deadline;

use super::pool::Picked;
use super::replies::Answered;
use super::{Caller, Gateway};
use crate::protocol::{Envelope, ErrorCode, GatewayError, Id, Op};
use crate::telemetry::metrics::OpKind;
use crate::telemetry::trace::{Incoming, TraceContext};

/// The header JetStream deduplicates on.
pub(super) const MSG_ID: &str = "Nats-Msg-Id";

/// How long to wait before sending again to a stream that has no leader.
const LEADERLESS_RETRY: Duration = Duration::from_millis(100);

/// Where a durable publish was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub stream: Arc<str>,
    pub seq: u64,
    /// The stream had it already (a retry within its duplicate window): `seq` is the first's.
    pub duplicate: bool,
}

impl Answered for Stored {
    fn bytes_out(&self) -> u64 {
        0
    }
}

impl Gateway {
    /// Sends a durable publish and returns the wait for its answer: the checks and the send
    /// happen here (in the caller's order); the returned future waits for the stream's ack,
    /// before the deadline, and then writes the audit record and counts the publish.
    pub async fn publish_durable(
        &self,
        caller: &Caller,
        envelope: Envelope,
    ) -> BoxFuture<'static, Result<Stored, GatewayError>> {
        let frontend = caller.frontend();
        let metrics = self.inner.metrics.clone();
        metrics.payload_in(frontend, envelope.data.len());
        let traced = self.trace(caller, &envelope);
        let audit = self
            .audit_ticket(caller, Op::Publish, &envelope, traced.context.as_ref())
            .await;
        // The span of a durable publish ends when the stream's ack (or the error) is known.
        let otlp_span = traced
            .span
            .map(|span| (span, traced.context, envelope.subject.clone()));
        let started = Instant::now();
        let timeout = self.deadline(envelope.timeout_ms);
        let deadline = Deadline::now() + timeout;
        let traced = (traced.context, traced.incoming);
        let sent = Box::pin(self.send_durable(caller, envelope, traced, (timeout, deadline))).await;
        Box::pin(async move {
            let result = match sent {
                Ok(sent) => sent.stored(deadline, timeout).await,
                Err(error) => Err(error),
            };
            if let Some(mut audit) = audit {
                if let Ok(stored) = &result {
                    audit.record = audit.record.message(format!(
                        "durable stream={} seq={}{}",
                        stored.stream,
                        stored.seq,
                        if stored.duplicate { " duplicate" } else { "" }
                    ));
                }
                audit.finish(&result, started);
            }
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.code);
            metrics.operation_timed(frontend, OpKind::PublishDurable, outcome, started.elapsed());
            if let Some((span, context, subject)) = otlp_span {
                span.finish(context, "publish", frontend, subject, outcome);
            }
            result
        })
    }

    async fn send_durable(
        &self,
        caller: &Caller,
        envelope: Envelope,
        traced: (Option<TraceContext>, Incoming),
        (timeout, deadline): (Duration, Deadline),
    ) -> Result<Sent, GatewayError> {
        let (subject, headers, _permit) = self.check_publish(caller, &envelope, traced)?;
        let mut headers = headers.unwrap_or_default();
        if !has_msg_id(&headers)
            && let Some(id) = msg_id(caller, self.id(), &envelope.id)?
        {
            headers.insert(MSG_ID, id);
        }
        let context = self.jetstream_context(&self.inner.pool.client_on(caller.lane().0)?);
        let message = Message {
            subject,
            headers,
            payload: envelope.data,
        };
        let ack = message.send(&context, deadline, timeout).await?;
        Ok(Sent {
            context,
            message,
            ack,
        })
    }
}

/// The gateway's JetStream state: a context per pool connection (each context runs a task
/// that collects abandoned acks, and bounds the acks awaited), and the signal that tells
/// replaying subscriptions the policy was reloaded.
pub(super) struct JetStream {
    /// By pool connection index.
    contexts: Mutex<Vec<Option<PoolContext>>>,
    policy: watch::Sender<u64>,
    /// Places for replaying subscriptions (`max_replays`): each holds a JetStream consumer,
    /// which costs nats-server far more than a plain subscription.
    pub(super) replays: Arc<tokio::sync::Semaphore>,
}

/// A pool connection's context, and whether that connection was retired.
type PoolContext = (watch::Receiver<bool>, Context);

impl JetStream {
    pub(super) fn new(max_replays: usize) -> Self {
        JetStream {
            contexts: Mutex::default(),
            policy: watch::Sender::new(0),
            replays: Arc::new(tokio::sync::Semaphore::new(max_replays)),
        }
    }
}

impl JetStream {
    pub fn policy_reloaded(&self) {
        self.policy.send_modify(|version| *version += 1);
    }

    pub fn policy_changes(&self) -> watch::Receiver<u64> {
        self.policy.subscribe()
    }
}

impl Gateway {
    /// The JetStream context of a pool connection, made on first use and again after the
    /// pool replaced the connection. Its timeout is the ceiling; each call has its own
    /// deadline on top.
    pub(super) fn jetstream_context(&self, picked: &Picked) -> Context {
        let mut contexts = self
            .inner
            .jetstream
            .contexts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if contexts.len() <= picked.index {
            contexts.resize_with(picked.index + 1, || None);
        }
        let slot = &mut contexts[picked.index];
        match slot {
            Some((retired, context)) if !*retired.borrow() => context.clone(),
            _ => {
                let mut context = jetstream::new(picked.client.clone());
                context.set_timeout(self.inner.live.request_timeout());
                *slot = Some((picked.retired.clone(), context.clone()));
                context
            }
        }
    }
}

/// A durable message, kept until its ack to send it again to a stream that had no leader.
struct Message {
    subject: async_nats::Subject,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

impl Message {
    async fn send(
        &self,
        context: &Context,
        deadline: Deadline,
        timeout: Duration,
    ) -> Result<PublishAckFuture, GatewayError> {
        let send = context.publish_with_headers(
            self.subject.clone(),
            self.headers.clone(),
            self.payload.clone(),
        );
        match tokio::time::timeout_at(deadline, send).await {
            Ok(Ok(ack)) => Ok(ack),
            Ok(Err(error)) if error.kind() == PublishErrorKind::Other => Err(GatewayError::new(
                ErrorCode::Unavailable,
                format!("NATS could not take the message: {error}"),
            )),
            Ok(Err(error)) => Err(ack_error(&error, timeout)),
            Err(_) => Err(too_late(timeout)),
        }
    }
}

/// A durable message on its way: the wait for its ack.
struct Sent {
    context: Context,
    message: Message,
    ack: PublishAckFuture,
}

impl Sent {
    async fn stored(self, deadline: Deadline, timeout: Duration) -> Result<Stored, GatewayError> {
        let Sent {
            context,
            message,
            mut ack,
        } = self;
        let mut looked_up = false;
        loop {
            let error = match tokio::time::timeout_at(deadline, ack).await {
                Ok(Ok(ack)) => {
                    return Ok(Stored {
                        stream: Arc::from(ack.stream),
                        seq: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Ok(Err(error)) => error,
                Err(_) => return Err(too_late(timeout)),
            };
            if error.kind() != PublishErrorKind::StreamNotFound {
                return Err(ack_error(&error, timeout));
            }
            // Nobody took the message: either no stream captures the subject, or the one
            // that does has no leader right now (an election, or no quorum). Only JetStream
            // itself can tell the two apart.
            if !looked_up {
                looked_up = true;
                let lookup = context.stream_by_subject(message.subject.to_string());
                match tokio::time::timeout_at(deadline, lookup).await {
                    Ok(Err(error))
                        if error.kind() == GetStreamByNameErrorKind::NotFound
                            || jetstream_absent(&error) =>
                    {
                        return Err(no_stream(&message.subject));
                    }
                    Ok(_) => {}
                    Err(_) => return Err(too_late(timeout)),
                }
            }
            if tokio::time::timeout_at(deadline, tokio::time::sleep(LEADERLESS_RETRY))
                .await
                .is_err()
            {
                return Err(too_late(timeout));
            }
            ack = message.send(&context, deadline, timeout).await?;
        }
    }
}

/// Whether a JetStream API call failed because nothing answers the API: NATS has no
/// JetStream (a server without it, or an account without it), so no stream captures anything.
pub(super) fn jetstream_absent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(request) = error.downcast_ref::<RequestError>()
            && request.kind() == RequestErrorKind::NoResponders
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The `NO_STREAM` a durable publish or a replay on an uncaptured subject gets.
pub(super) fn no_stream(subject: &str) -> GatewayError {
    GatewayError::new(
        ErrorCode::NoStream,
        format!("no JetStream stream captures {subject:?}"),
    )
}

fn too_late(timeout: Duration) -> GatewayError {
    GatewayError::new(
        ErrorCode::Timeout,
        format!(
            "the stream did not acknowledge the message within {} ms",
            timeout.as_millis()
        ),
    )
}

/// What a failed send or ack (other than "nobody took it") means to the client.
fn ack_error(error: &PublishError, timeout: Duration) -> GatewayError {
    match error.kind() {
        PublishErrorKind::TimedOut => too_late(timeout),
        PublishErrorKind::BrokenPipe => GatewayError::new(
            ErrorCode::Unavailable,
            "the NATS connection was lost before the stream acknowledged the message",
        ),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            GatewayError::bad_request(format!("the stream refused the message: {error}"))
        }
        PublishErrorKind::MaxPayloadExceeded => GatewayError::new(
            ErrorCode::TooLarge,
            format!("NATS refused the payload: {error}"),
        ),
        PublishErrorKind::MaxAckPending => GatewayError::new(
            ErrorCode::Overloaded,
            format!("too many durable publishes wait for their acks: {error}"),
        ),
        PublishErrorKind::StreamNotFound | PublishErrorKind::Other => GatewayError::new(
            ErrorCode::Overloaded,
            format!("the stream refused the message: {error}"),
        ),
    }
}

/// Whether the message carries a `Nats-Msg-Id` (in any case) already.
fn has_msg_id(headers: &HeaderMap) -> bool {
    headers
        .iter()
        .any(|(name, _)| AsRef::<str>::as_ref(name).eq_ignore_ascii_case(MSG_ID))
}

/// The caller's deduplication scope: its uid, else its token's subject, else its certificate's
/// subject, else (nothing vouches for it) its connection on this gateway. Escaped so that no two scopes are alike.
pub(super) fn scope(caller: &Caller, gateway_id: &str) -> String {
    let identity = caller.identity();
    match (identity.uid, &identity.sub, &identity.cert) {
        (Some(uid), _, _) => format!("uid={uid}"),
        (None, Some(sub), _) => format!("sub={}", escape(sub)),
        (None, None, Some(cert)) => format!("cert={}", escape(cert)),
        (None, None, None) => format!("conn={}/{}", escape(gateway_id), caller.conn_id()),
    }
}

/// The scoped `Nats-Msg-Id` for request id `id` (none for a null id).
fn msg_id(caller: &Caller, gateway_id: &str, id: &Id) -> Result<Option<HeaderValue>, GatewayError> {
    let id = match id {
        Id::Null => return Ok(None),
        Id::Number(number) => number.to_string(),
        Id::Text(text) => escape(text),
    };
    scoped(&scope(caller, gateway_id), &id).map(Some)
}

fn scoped(scope: &str, id: &str) -> Result<HeaderValue, GatewayError> {
    format!("{scope}:{id}")
        .parse()
        .map_err(|_| GatewayError::bad_request(format!("{id:?} cannot be a Nats-Msg-Id")))
}

/// Scopes every `Nats-Msg-Id` a client put on a message by its identity (see the module doc).
pub(super) fn scope_msg_id(map: &mut HeaderMap, caller: &Caller, gateway_id: &str) {
    let names: Vec<HeaderName> = map
        .iter()
        .filter(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(MSG_ID))
        .map(|(name, _)| name.clone())
        .collect();
    if names.is_empty() {
        return;
    }
    let scope = scope(caller, gateway_id);
    for name in names {
        let values: Vec<HeaderValue> = map
            .get_all(name.clone())
            .filter_map(|value| scoped(&scope, &escape(value.as_str())).ok())
            .collect();
        let mut values = values.into_iter();
        if let Some(first) = values.next() {
            map.insert(name.clone(), first);
        }
        for value in values {
            map.append(name.clone(), value);
        }
    }
}

/// Percent-escapes all but a plain set of characters, so that `:` and `/` only ever separate.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~@+=".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_scopes_apart() {
        assert_eq!(escape("bob"), "bob");
        assert_eq!(escape("x:1"), "x%3A1");
        assert_eq!(escape("a%3A"), "a%253A");
        assert_eq!(escape("é /"), "%C3%A9%20%2F");
        // `sub=x` with id "1:7" and `sub=x:1` with id 7 must not meet.
        assert_ne!(
            format!("sub={}:{}", escape("x"), escape("1:7")),
            format!("sub={}:{}", escape("x:1"), escape("7"))
        );
    }

    #[test]
    fn an_id_that_cannot_be_a_header_is_refused() {
        assert!(scoped("uid=1", "7").is_ok());
        assert_eq!(scoped("uid=1", "7").unwrap().as_str(), "uid=1:7");
    }
}
