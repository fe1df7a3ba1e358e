//! Request-reply without a future per request. Each pool connection has one `ReplyRouter`:
//! one wildcard subscription on its own inbox prefix receives every reply, and a token map
//! matches replies to requests. The subscription is a sink (`async_nats::MessageSink`): the
//! connection's task matches each reply as it reads it, with no queue between them, so no reply
//! is ever dropped for a full one. A request is a map entry plus a publish with a reply subject;
//! its answer goes straight to the client's `ReplySink` (its outbox), so there is no task,
//! oneshot or timer per request. Deadlines are kept in order (`super::deadlines`), and the
//! router's single timer fires for the earliest. Losing or retiring the connection, or the end
//! of the drain, fails the waiting requests at once: every request gets exactly one answer.
//!
//! Reply subjects are unguessable and taken only whole: the prefix has 128 random bits per
//! connection, and each request's subject carries a random 64-bit nonce beside its token. A
//! message on a guessed or stale subject never answers a request (it is counted in
//! `ipc_gateway_reply_mismatches_total`). The same subscription confirms subscriptions: a
//! message the connection sends to one of its own reply subjects comes back only after
//! nats-server has handled everything the connection sent before it, and nobody else can
//! send to, or guess, that subject.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::{Message, MessageSink, SinkSubscription, Subject};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Reply;
use super::breaker::{Admission, Outcome};
use super::budget::BudgetPermit;
use super::deadlines::Deadlines;
use super::reply_subject;
use super::shutdown::Shutdown;
use crate::protocol::Frontend;
use crate::protocol::{ErrorCode, GatewayError, Id, Op};
use crate::telemetry::audit::{Record, Reservation};
use crate::telemetry::metrics::{Metrics, OpKind};
use crate::telemetry::otlp::{FinishedSpan, Otlp};
use crate::telemetry::trace::{self, TraceContext};

/// Where a request's one answer goes.
pub trait ReplySink: Send + Sync + 'static {
    /// Hands over the answer; `false` when nobody can receive it any more (the client left).
    fn deliver(&self, id: Id, result: Result<Reply, GatewayError>) -> bool;
}

/// A request waiting for its reply.
pub struct Pending {
    pub id: Id,
    pub sink: Arc<dyn ReplySink>,
    pub frontend: Frontend,
    pub started: std::time::Instant,
    pub subject: Subject,
    pub timeout: Duration,
    pub deadline: Instant,
    /// Holds the request's share of the in-flight byte budget until it is answered.
    pub permit: BudgetPermit,
    /// The circuit breaker's permission; told the outcome when the request ends.
    pub admission: Admission,
    /// For an idempotent request: what to send again if its connection is lost.
    pub resend: Option<Resend>,
    /// Times it was sent again. After a lost connection, services come back after the
    /// gateway does, so a re-sent request also tries again on `NO_RESPONDERS`, with backoff.
    pub attempts: u32,
    /// Its audit record, written when it is answered (none when the audit log is off). Boxed:
    /// inline it made up half of this struct, which every request allocates.
    pub audit: Option<Box<AuditTicket>>,
    /// Its trace context: the reply carries the gateway's `traceparent` back.
    pub trace: Option<TraceContext>,
    /// Its OpenTelemetry span, exported when it is answered (none when OTLP is off).
    pub span: Option<Box<SpanStart>>,
}

/// What an operation's OTLP span needs beside its `Pending`.
pub struct SpanStart {
    pub otlp: Otlp,
    pub identity: String,
    pub start: std::time::SystemTime,
}

impl SpanStart {
    /// Exports the span of a finished operation.
    pub fn finish(
        self,
        trace: Option<TraceContext>,
        op: &'static str,
        frontend: Frontend,
        subject: Option<crate::protocol::Subject>,
        outcome: Result<(), ErrorCode>,
    ) {
        let Some(trace) = trace else { return };
        self.otlp.record(FinishedSpan {
            trace,
            op,
            frontend,
            subject,
            outcome,
            identity: self.identity,
            start: self.start,
            end: std::time::SystemTime::now(),
        });
    }
}

/// An operation's audit record in the making, with its place in the audit queue.
pub struct AuditTicket {
    pub reservation: Reservation,
    pub record: Record,
}

impl AuditTicket {
    /// Completes the record with the operation's outcome and writes it.
    pub fn finish<T: Answered>(
        self,
        result: &Result<T, GatewayError>,
        started: std::time::Instant,
    ) {
        let record = self
            .record
            .outcome(result.as_ref().map(|_| ()).map_err(|e| e.code))
            .latency(started.elapsed());
        let record = match result {
            Ok(answer) => record.bytes_out(answer.bytes_out()),
            Err(_) => record,
        };
        self.reservation.write(record);
    }
}

/// What an operation sent back, for its audit record's `bytes_out`.
pub trait Answered {
    fn bytes_out(&self) -> u64;
}

impl Answered for Reply {
    fn bytes_out(&self) -> u64 {
        self.data.len() as u64
    }
}

impl Answered for () {
    fn bytes_out(&self) -> u64 {
        0
    }
}

/// An idempotent request's message, kept to send it again on another connection (its
/// subject is the `Pending`'s).
#[derive(Clone)]
pub struct Resend {
    pub headers: Option<HeaderMap>,
    pub data: Bytes,
}

/// Hashes the router's tokens. They come from the router's own counter, never from a client,
/// so SipHash's protection against chosen keys buys nothing here; a multiply spreads the
/// sequential tokens over the table (hashbrown reads the top bits too).
#[derive(Default)]
struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, token: u64) {
        self.0 = token.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type TokenMap<V> = HashMap<u64, V, BuildHasherDefault<TokenHasher>>;

struct Waiting {
    /// Each request with the nonce its reply subject carries. Boxed: a request moves from
    /// the front-end to this map to its answer as one pointer, not a few hundred bytes.
    requests: TokenMap<(u64, Box<Pending>)>,
    deadlines: Deadlines,
    /// Confirmations in flight (see `sync_point`), by token, with their nonce.
    syncs: TokenMap<(u64, oneshot::Sender<()>)>,
    /// Retired or closed: no new requests, and why (the refusal's message).
    closed: Option<&'static str>,
    /// Nonces: a cryptographic generator seeded by the OS, one per router.
    rng: StdRng,
}

impl Waiting {
    fn new() -> Waiting {
        Waiting {
            requests: TokenMap::default(),
            deadlines: Deadlines::default(),
            syncs: TokenMap::default(),
            closed: None,
            rng: StdRng::from_os_rng(),
        }
    }
}

/// A fresh reply prefix: `_INBOX.` and 128 random bits.
pub fn random_inbox() -> String {
    let mut rng = StdRng::from_os_rng();
    let bits = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    format!("_INBOX.{bits:032x}")
}

pub struct ReplyRouter {
    /// `_INBOX.<unique>.`; replies come to this prefix plus the request's token.
    prefix: String,
    waiting: Mutex<Waiting>,
    next_token: AtomicU64,
    /// Wakes the router when a request gets an earlier deadline than any before it.
    earlier_deadline: Notify,
    metrics: Arc<Metrics>,
    /// Where idempotent requests go when this connection is lost (see `Gateway`'s retry task).
    retries: Option<mpsc::UnboundedSender<Box<Pending>>>,
}

impl ReplyRouter {
    pub fn new(
        inbox: String,
        metrics: Arc<Metrics>,
        retries: Option<mpsc::UnboundedSender<Box<Pending>>>,
    ) -> Arc<ReplyRouter> {
        Arc::new(ReplyRouter {
            prefix: format!("{inbox}."),
            waiting: Mutex::new(Waiting::new()),
            next_token: AtomicU64::new(1),
            earlier_deadline: Notify::new(),
            metrics,
            retries,
        })
    }

    /// The subject the router's one subscription listens on.
    pub fn wildcard(&self) -> String {
        format!("{}*", self.prefix)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request and returns its token and reply subject. When the router takes
    /// no more requests (its connection is being replaced), it answers the request itself
    /// with `UNAVAILABLE` and returns `None`.
    pub fn register(&self, pending: Box<Pending>) -> Option<(u64, Subject)> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let deadline = pending.deadline;
        let mut waiting = self.waiting();
        if let Some(reason) = waiting.closed {
            drop(waiting);
            let error = GatewayError::new(ErrorCode::Unavailable, reason);
            finish(&self.metrics, pending, Err(error));
            return None;
        }
        let Waiting {
            requests,
            deadlines,
            rng,
            ..
        } = &mut *waiting;
        let timeout = pending.timeout;
        let nonce = rng.next_u64();
        requests.insert(token, (nonce, pending));
        let is_waiting = |token| requests.contains_key(&token);
        // Earlier than every deadline already held (this one is not among them yet)?
        let earliest = deadlines
            .earliest(is_waiting)
            .is_none_or(|(first, _)| deadline < first);
        deadlines.add(timeout, deadline, token, requests.len(), is_waiting);
        drop(waiting);
        if earliest {
            self.earlier_deadline.notify_one();
        }
        Some((token, self.reply_subject(token, nonce)))
    }

    fn reply_subject(&self, token: u64, nonce: u64) -> Subject {
        reply_subject::write(&self.prefix, token, nonce)
    }

    /// A subject only this connection receives and nobody can guess, and what resolves when
    /// a message sent to it on this connection has come back: everything the connection
    /// sent before that message has then been handled by nats-server.
    pub fn sync_point(self: &Arc<Self>) -> SyncPoint {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        let mut waiting = self.waiting();
        let nonce = waiting.rng.next_u64();
        waiting.syncs.insert(token, (nonce, sender));
        drop(waiting);
        SyncPoint {
            subject: self.reply_subject(token, nonce),
            came_back: receiver,
            router: self.clone(),
            token,
        }
    }

    /// Takes a request back (its publish failed).
    pub fn take(&self, token: u64) -> Option<Box<Pending>> {
        let mut waiting = self.waiting();
        let (_, pending) = waiting.requests.remove(&token)?;
        waiting.deadlines.remove(pending.deadline, token);
        drop(waiting);
        Some(pending)
    }

    /// Takes the request (or confirmation) a reply subject names, only if its nonce is the
    /// one that subject was made with.
    fn claim(&self, token: u64, nonce: u64) -> Claim {
        let mut waiting = self.waiting();
        if let Some((expected, _)) = waiting.requests.get(&token) {
            if *expected != nonce {
                return Claim::Mismatch;
            }
            let Some((_, pending)) = waiting.requests.remove(&token) else {
                return Claim::Nobody;
            };
            waiting.deadlines.remove(pending.deadline, token);
            return Claim::Request(pending);
        }
        match waiting.syncs.get(&token) {
            Some((expected, _)) if *expected != nonce => Claim::Mismatch,
            Some(_) => match waiting.syncs.remove(&token) {
                Some((_, sender)) => Claim::Sync(sender),
                None => Claim::Nobody,
            },
            None => Claim::Nobody,
        }
    }

    fn on_reply(&self, message: Message) {
        let claim = match reply_subject::read(&self.prefix, &message.subject) {
            Some((token, nonce)) => self.claim(token, nonce),
            None => Claim::Mismatch,
        };
        let pending = match claim {
            Claim::Request(pending) => pending,
            Claim::Sync(sender) => {
                let _ = sender.send(());
                return;
            }
            Claim::Nobody => {
                // After its deadline (or after its connection was given up): nobody waits.
                self.metrics.late_replies.increment(1);
                return;
            }
            Claim::Mismatch => {
                // A guessed, forged or malformed reply subject: it answers nothing.
                self.metrics.reply_mismatches.increment(1);
                return;
            }
        };
        let no_responders = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        if no_responders
            && pending.attempts > 0
            && pending.resend.is_some()
            && Instant::now() < pending.deadline
            && let Some(retries) = &self.retries
        {
            match retries.send(pending) {
                Ok(()) => return,
                Err(mpsc::error::SendError(returned)) => {
                    return self.answer_no_responders(returned);
                }
            }
        }
        let result = if no_responders {
            Err(GatewayError::new(
                ErrorCode::NoResponders,
                format!("no service listens on {}", pending.subject),
            ))
        } else {
            Ok(Reply {
                headers: super::nats::headers(message.headers.as_ref()),
                data: message.payload,
            })
        };
        finish(&self.metrics, pending, result);
    }

    fn answer_no_responders(&self, pending: Box<Pending>) {
        let error = GatewayError::new(
            ErrorCode::NoResponders,
            format!("no service listens on {}", pending.subject),
        );
        finish(&self.metrics, pending, Err(error));
    }

    /// Fails the requests whose deadline has passed; returns the next deadline.
    fn expire(&self, now: Instant) -> Option<Instant> {
        loop {
            let mut waiting = self.waiting();
            let Waiting {
                requests,
                deadlines,
                ..
            } = &mut *waiting;
            let (deadline, token) = deadlines.earliest(|token| requests.contains_key(&token))?;
            if deadline > now {
                return Some(deadline);
            }
            deadlines.pop((deadline, token));
            let pending = waiting.requests.remove(&token).map(|(_, pending)| pending);
            drop(waiting);
            if let Some(pending) = pending {
                let error = GatewayError::new(
                    ErrorCode::Timeout,
                    format!(
                        "no reply on {} within {} ms",
                        pending.subject,
                        pending.timeout.as_millis()
                    ),
                );
                finish(&self.metrics, pending, Err(error));
            }
        }
    }

    /// Fails every waiting request with `error`; with `close`, takes no new ones from now on
    /// (refusing them with that reason).
    fn fail_all(&self, error: &GatewayError, close: Option<&'static str>) {
        self.give_up_all(error, close, false)
    }

    /// Like `fail_all`, but idempotent requests go to the retry task instead, to be sent
    /// again on another connection within their deadline.
    fn fail_or_retry_all(&self, error: &GatewayError, close: Option<&'static str>) {
        self.give_up_all(error, close, true)
    }

    fn give_up_all(&self, error: &GatewayError, close: Option<&'static str>, retry: bool) {
        let drained: Vec<Box<Pending>> = {
            let mut waiting = self.waiting();
            if close.is_some() {
                waiting.closed = close;
            }
            waiting.deadlines.clear();
            // Confirmations waiting on this connection fail too (their senders are dropped).
            waiting.syncs.clear();
            waiting
                .requests
                .drain()
                .map(|(_, (_, pending))| pending)
                .collect()
        };
        for pending in drained {
            let pending = match (&self.retries, retry && pending.resend.is_some()) {
                (Some(retries), true) => match retries.send(pending) {
                    Ok(()) => continue,
                    Err(mpsc::error::SendError(pending)) => pending,
                },
                _ => pending,
            };
            finish(&self.metrics, pending, Err(error.clone()));
        }
    }

    /// Takes no new requests; they are refused with `reason`.
    pub fn close(&self, reason: &'static str) {
        self.waiting().closed.get_or_insert(reason);
    }

    fn is_idle(&self) -> bool {
        self.waiting().requests.is_empty()
    }

    /// Requests waiting for a reply on this connection (read for the in-flight gauge, so the
    /// hot path does not update a gauge per request).
    pub fn waiting_count(&self) -> usize {
        self.waiting().requests.len()
    }

    /// The sink of the connection's reply subscription (`Client::subscribe_with_sink`), and
    /// what resolves when the connection has let go of it (the client is gone).
    pub fn sink(self: &Arc<Self>) -> (Arc<dyn MessageSink>, oneshot::Receiver<()>) {
        let (ended, on_end) = oneshot::channel();
        let sink = RepliesSink {
            router: self.clone(),
            ended: Some(ended),
        };
        (Arc::new(sink), on_end)
    }

    /// The router's task: deadlines, connection loss, retirement and the end of the drain
    /// (replies are handled as they are read, by the connection's task: see `RepliesSink`).
    /// Ends when the connection lets go of the reply subscription, or when it is retired and
    /// nothing waits on it (dropping the subscription then lets the old connection go).
    pub async fn run(
        self: Arc<Self>,
        _replies: SinkSubscription,
        mut connection_gone: oneshot::Receiver<()>,
        mut lost: watch::Receiver<u64>,
        mut retired: watch::Receiver<bool>,
        shutdown: Shutdown,
    ) {
        let far = || Instant::now() + Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let mut retiring = false;
        let mut drained = false;
        loop {
            tokio::select! {
                biased;
                _ = &mut connection_gone => {
                    let error = GatewayError::new(
                        ErrorCode::Unavailable,
                        "the NATS connection closed while waiting for the reply",
                    );
                    self.fail_or_retry_all(&error, Some("the NATS connection closed; retry"));
                    return;
                }
                _ = lost.changed() => {
                    // The replies would have come on the connection that was just lost.
                    let error = GatewayError::new(
                        ErrorCode::Unavailable,
                        "the NATS connection was lost while waiting for the reply; the service may or may not have handled the request",
                    );
                    self.fail_or_retry_all(&error, None);
                }
                _ = retired.wait_for(|retired| *retired), if !retiring => {
                    retiring = true;
                    self.close("the NATS connection is being replaced; retry");
                }
                _ = shutdown.drain_expired(), if !drained => {
                    drained = true;
                    let error = GatewayError::new(
                        ErrorCode::Unavailable,
                        "the gateway is shutting down and the drain time ran out",
                    );
                    self.fail_all(&error, Some("the gateway is shutting down"));
                }
                _ = self.earlier_deadline.notified() => {}
                _ = &mut timer => {}
            }
            let next = self.expire(Instant::now());
            if next != armed {
                timer.as_mut().reset(next.unwrap_or_else(far));
                armed = next;
            }
            if retiring && self.is_idle() {
                return;
            }
        }
    }
}

/// The reply subscription's sink: each reply is matched to its request as the connection
/// reads it, with no queue in between (so none is dropped for a full one). Dropped by the
/// connection when the subscription ends; that tells the router's task.
struct RepliesSink {
    router: Arc<ReplyRouter>,
    ended: Option<oneshot::Sender<()>>,
}

impl MessageSink for RepliesSink {
    fn deliver(&self, message: Message) {
        self.router.on_reply(message);
    }
}

impl Drop for RepliesSink {
    fn drop(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }
}

/// What a reply subject names.
enum Claim {
    Request(Box<Pending>),
    Sync(oneshot::Sender<()>),
    /// Nobody waits any more (answered, expired or given up).
    Nobody,
    /// Not a subject this router made: a guessed or forged one.
    Mismatch,
}

/// A pending confirmation (see `ReplyRouter::sync_point`); dropping it forgets it.
pub struct SyncPoint {
    pub subject: Subject,
    pub came_back: oneshot::Receiver<()>,
    router: Arc<ReplyRouter>,
    token: u64,
}

impl Drop for SyncPoint {
    fn drop(&mut self) {
        self.router.waiting().syncs.remove(&self.token);
    }
}

/// Records a finished request and hands its answer to its sink.
pub fn finish(metrics: &Metrics, mut pending: Box<Pending>, result: Result<Reply, GatewayError>) {
    let result = match (result, &pending.trace) {
        (Ok(mut reply), Some(trace)) => {
            // The client learns the trace its request went out in, whatever the service set
            // (a service that echoes it back costs nothing more here).
            let headers = reply.headers.get_or_insert_with(Default::default);
            let ours = trace.traceparent_bytes();
            if headers.get(trace::TRACEPARENT).map(str::as_bytes) != Some(&ours[..]) {
                headers.replace_trusted(trace::TRACEPARENT, trace.traceparent());
            }
            Ok(reply)
        }
        (result, _) => result,
    };
    // One clock reading for the latency and the breaker.
    let now = Instant::now();
    let latency = now.into_std().saturating_duration_since(pending.started);
    record_latency(metrics, pending.frontend, latency, &result);
    if let Some(audit) = pending.audit.take() {
        audit.finish(&result, pending.started);
    }
    drop(pending.permit);
    let code = result.as_ref().map(|_| ()).map_err(|e| e.code);
    if let Some(span) = pending.span.take() {
        let subject = crate::protocol::Subject::from(pending.subject.as_str());
        span.finish(
            pending.trace,
            "request",
            pending.frontend,
            Some(subject),
            code,
        );
    }
    let outcome = Outcome::of_request(code, pending.timeout, pending.admission.min_timeout());
    pending.admission.record_for(outcome, &pending.subject, now);
    if !pending.sink.deliver(pending.id, result) {
        // The client left before its answer came.
        metrics.late_replies.increment(1);
    }
}

/// The metrics of one finished request.
pub fn record(
    metrics: &Metrics,
    frontend: Frontend,
    started: std::time::Instant,
    result: &Result<Reply, GatewayError>,
) {
    record_latency(metrics, frontend, started.elapsed(), result);
}

fn record_latency(
    metrics: &Metrics,
    frontend: Frontend,
    latency: Duration,
    result: &Result<Reply, GatewayError>,
) {
    metrics.operation_timed(
        frontend,
        OpKind::Op(Op::Request),
        result.as_ref().map(|_| ()).map_err(|e| e.code),
        latency,
    );
    if let Ok(reply) = result {
        metrics.payload_out(frontend, reply.data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::budget::ByteBudget;

    #[derive(Default)]
    struct Collect(Mutex<Vec<(Id, Result<Reply, GatewayError>)>>);

    impl ReplySink for Collect {
        fn deliver(&self, id: Id, result: Result<Reply, GatewayError>) -> bool {
            self.0.lock().unwrap().push((id, result));
            true
        }
    }

    impl Collect {
        fn codes(&self) -> Vec<(Id, Option<ErrorCode>)> {
            let answers = self.0.lock().unwrap();
            answers
                .iter()
                .map(|(id, result)| (id.clone(), result.as_ref().err().map(|e| e.code)))
                .collect()
        }
    }

    fn pending(sink: &Arc<Collect>, id: u64, deadline: Instant) -> Box<Pending> {
        Box::new(Pending {
            id: Id::from(id),
            sink: sink.clone(),
            frontend: Frontend::Uds,
            started: std::time::Instant::now(),
            subject: Subject::from("svc.a"),
            timeout: Duration::from_millis(100),
            deadline,
            permit: ByteBudget::new(10).try_acquire(0).unwrap(),
            admission: crate::core::breaker::Breakers::new(crate::core::breaker::BreakerConfig {
                group_tokens: 2,
                failures: 5,
                cooldown: Duration::from_secs(5),
                failure_rate: 0.0,
                window: Duration::from_secs(10),
                min_requests: 20,
                reconnect_grace: Duration::ZERO,
                min_timeout: Duration::ZERO,
            })
            .admit("svc.a")
            .unwrap(),
            resend: None,
            attempts: 0,
            audit: None,
            trace: None,
            span: None,
        })
    }

    /// Every request allocates its `Pending`. Its size decides its jemalloc size class, and a
    /// class whose slab is one page caches only 20 per thread: at 504 bytes (the 512 class)
    /// 256 requests in flight went through the arena, 220 more instructions per request than
    /// at 520 (callgrind). Boxed, the audit ticket keeps it in the 320 class (64 per slab).
    #[test]
    fn a_pending_request_stays_in_a_small_allocation_class() {
        let size = std::mem::size_of::<Pending>();
        assert!(size <= 320, "Pending is {size} bytes");
    }

    #[test]
    fn requests_time_out_in_deadline_order_and_only_once() {
        let router = ReplyRouter::new("_INBOX.t".into(), Metrics::new(), None);
        let sink = Arc::new(Collect::default());
        let now = Instant::now();
        let (_, late_subject) = router
            .register(pending(&sink, 1, now + Duration::from_millis(300)))
            .unwrap();
        router
            .register(pending(&sink, 2, now + Duration::from_millis(100)))
            .unwrap();
        let (token3, _) = router
            .register(pending(&sink, 3, now + Duration::from_millis(200)))
            .unwrap();
        assert!(late_subject.starts_with("_INBOX.t."));
        assert!(
            router.take(token3).is_some(),
            "a request can be taken back once"
        );
        assert!(router.take(token3).is_none());
        let next = router.expire(now + Duration::from_millis(150));
        assert_eq!(next, Some(now + Duration::from_millis(300)));
        assert_eq!(sink.codes(), [(Id::from(2), Some(ErrorCode::Timeout))]);
        assert_eq!(router.expire(now + Duration::from_secs(1)), None);
        assert_eq!(sink.codes().len(), 2);
        assert_eq!(router.waiting_count(), 0);
    }

    #[test]
    fn failing_all_answers_every_waiting_request_and_closing_refuses_new_ones() {
        let router = ReplyRouter::new("_INBOX.t".into(), Metrics::new(), None);
        let sink = Arc::new(Collect::default());
        let later = Instant::now() + Duration::from_secs(60);
        for id in 1..=3 {
            router.register(pending(&sink, id, later)).unwrap();
        }
        let lost = GatewayError::new(ErrorCode::Unavailable, "lost");
        router.fail_all(&lost, Some("closed for the test"));
        assert_eq!(sink.codes().len(), 3);
        assert!(
            sink.codes()
                .iter()
                .all(|(_, code)| *code == Some(ErrorCode::Unavailable))
        );
        assert!(router.register(pending(&sink, 4, later)).is_none());
        assert_eq!(sink.codes().len(), 4, "a refused request is still answered");
        assert_eq!(router.expire(Instant::now()), None);
    }

    fn reply(subject: &str) -> Message {
        Message {
            subject: subject.into(),
            reply: None,
            payload: "x".into(),
            headers: None,
            status: None,
            description: None,
            length: 1,
        }
    }

    #[test]
    fn a_reply_after_its_request_ended_is_late_and_a_guessed_one_answers_nothing() {
        let metrics = Metrics::new();
        let router = ReplyRouter::new(random_inbox(), metrics.clone(), None);
        let sink = Arc::new(Collect::default());
        let later = Instant::now() + Duration::from_secs(60);
        let (token, subject) = router.register(pending(&sink, 1, later)).unwrap();
        assert!(subject.starts_with("_INBOX."));
        // Forged: the right token with another nonce, a plain token as the old routers made,
        // and garbage. None of them answers the request.
        let (prefix, _) = subject.rsplit_once('_').unwrap();
        router.on_reply(reply(&format!("{prefix}_{:016x}", 7u64)));
        router.on_reply(reply(&format!("{}{token}", router.prefix)));
        router.on_reply(reply(&format!("{}x_y", router.prefix)));
        // Near misses of the shape: a `_` in the token, a multibyte character across the
        // place of the nonce's `_`, a nonce that is not hex.
        let real_nonce = subject.rsplit_once('_').unwrap().1;
        router.on_reply(reply(&format!("{}{token}_1_{real_nonce}", router.prefix)));
        router.on_reply(reply(&format!("{}{token}é{real_nonce}", router.prefix)));
        router.on_reply(reply(&format!(
            "{}{token}_{}",
            router.prefix,
            "g".repeat(16)
        )));
        assert_eq!(sink.codes().len(), 0, "a forged reply answered a request");
        let text = metrics.render();
        assert!(
            text.contains("ipc_gateway_reply_mismatches_total 6"),
            "{text}"
        );
        // The real one answers it, once; the same subject again is late.
        router.on_reply(reply(&subject));
        assert_eq!(sink.codes(), [(Id::from(1), None)]);
        router.on_reply(reply(&subject));
        assert!(
            metrics
                .render()
                .contains("ipc_gateway_late_replies_total 1")
        );
    }

    #[test]
    fn reply_prefixes_and_nonces_are_random() {
        let a = random_inbox();
        let b = random_inbox();
        assert_ne!(a, b);
        assert_eq!(a.len(), "_INBOX.".len() + 32);
        let router = ReplyRouter::new(a, Metrics::new(), None);
        let sink = Arc::new(Collect::default());
        let later = Instant::now() + Duration::from_secs(60);
        let (_, first) = router.register(pending(&sink, 1, later)).unwrap();
        let (_, second) = router.register(pending(&sink, 2, later)).unwrap();
        let nonce = |s: &Subject| s.rsplit_once('_').unwrap().1.to_owned();
        assert_ne!(nonce(&first), nonce(&second));
    }

    #[tokio::test]
    async fn a_sync_point_resolves_only_on_its_own_subject_and_is_forgotten_when_dropped() {
        let router = ReplyRouter::new(random_inbox(), Metrics::new(), None);
        let mut point = router.sync_point();
        let (prefix, _) = point.subject.rsplit_once('_').unwrap();
        router.on_reply(reply(&format!("{prefix}_{:016x}", 1u64)));
        assert!(
            point.came_back.try_recv().is_err(),
            "a guessed subject confirmed"
        );
        router.on_reply(reply(&point.subject));
        assert!(point.came_back.try_recv().is_ok());
        let abandoned = router.sync_point();
        drop(abandoned);
        assert!(router.waiting().syncs.is_empty());
    }
}
