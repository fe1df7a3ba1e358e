//! Request-reply without a future per request. Each pool connection has one `ReplyRouter`:
//! one wildcard subscription on its own inbox prefix receives every reply, and a token map
//! matches replies to requests. A request is a map entry plus a publish with a reply subject;
//! its answer goes straight to the client's `ReplySink` (its outbox), so there is no task,
//! oneshot or timer per request. Deadlines are kept in order in one set, and the router's
//! single timer fires for the earliest. Losing or retiring the connection, or the end of the
//! drain, fails the waiting requests at once: every request gets exactly one answer.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Message, Subject, Subscriber};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::Reply;
use super::budget::BudgetPermit;
use super::shutdown::Shutdown;
use crate::ops::metrics::{Frontend, Metrics};
use crate::protocol::{ErrorCode, GatewayError, Id, Op};

/// Where a request's one answer goes.
pub trait ReplySink: Send + Sync + 'static {
    fn deliver(&self, id: Id, result: Result<Reply, GatewayError>);
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
}

#[derive(Default)]
struct Waiting {
    requests: HashMap<u64, Pending>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// Retired or closed: no new requests.
    closed: bool,
}

pub struct ReplyRouter {
    /// `_INBOX.<unique>.`; replies come to this prefix plus the request's token.
    prefix: String,
    waiting: Mutex<Waiting>,
    next_token: AtomicU64,
    /// Wakes the router when a request gets an earlier deadline than any before it.
    earlier_deadline: Notify,
    metrics: Arc<Metrics>,
}

/// Replies handled per wakeup before the router looks at its deadlines again.
const REPLY_BATCH: usize = 256;

impl ReplyRouter {
    pub fn new(inbox: String, metrics: Arc<Metrics>) -> Arc<ReplyRouter> {
        Arc::new(ReplyRouter {
            prefix: format!("{inbox}."),
            waiting: Mutex::new(Waiting::default()),
            next_token: AtomicU64::new(1),
            earlier_deadline: Notify::new(),
            metrics,
        })
    }

    /// The subject the router's one subscription listens on.
    pub fn wildcard(&self) -> String {
        format!("{}*", self.prefix)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request; returns its token and reply subject, or gives it back when the
    /// router takes no more requests.
    pub fn register(&self, pending: Pending) -> Result<(u64, Subject), Pending> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let deadline = pending.deadline;
        let mut waiting = self.waiting();
        if waiting.closed {
            return Err(pending);
        }
        let earliest = waiting
            .deadlines
            .first()
            .is_none_or(|(first, _)| deadline < *first);
        waiting.deadlines.insert((deadline, token));
        waiting.requests.insert(token, pending);
        drop(waiting);
        if earliest {
            self.earlier_deadline.notify_one();
        }
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        reply.push_str(itoa::Buffer::new().format(token));
        Ok((token, Subject::from(reply)))
    }

    /// Takes a request back (its publish failed).
    pub fn take(&self, token: u64) -> Option<Pending> {
        let mut waiting = self.waiting();
        let pending = waiting.requests.remove(&token)?;
        waiting.deadlines.remove(&(pending.deadline, token));
        drop(waiting);
        Some(pending)
    }

    fn on_reply(&self, message: Message) {
        let token = message
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|token| token.parse::<u64>().ok());
        let Some(pending) = token.and_then(|token| self.take(token)) else {
            // After its deadline, or for a client that is gone: nobody waits for it.
            self.metrics.late_replies.increment(1);
            return;
        };
        let result = if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            Err(GatewayError::new(
                ErrorCode::NoResponders,
                format!("no service listens on {}", pending.subject),
            ))
        } else {
            Ok(Reply {
                data: message.payload,
                headers: message.headers,
            })
        };
        finish(&self.metrics, pending, result);
    }

    /// Fails the requests whose deadline has passed; returns the next deadline.
    fn expire(&self, now: Instant) -> Option<Instant> {
        loop {
            let mut waiting = self.waiting();
            let Some(&(deadline, token)) = waiting.deadlines.first() else {
                return None;
            };
            if deadline > now {
                return Some(deadline);
            }
            waiting.deadlines.pop_first();
            let pending = waiting.requests.remove(&token);
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

    /// Fails every waiting request with `error`; with `close`, takes no new ones.
    fn fail_all(&self, error: &GatewayError, close: bool) {
        let drained: Vec<Pending> = {
            let mut waiting = self.waiting();
            waiting.closed |= close;
            waiting.deadlines.clear();
            waiting
                .requests
                .drain()
                .map(|(_, pending)| pending)
                .collect()
        };
        for pending in drained {
            finish(&self.metrics, pending, Err(error.clone()));
        }
    }

    fn close(&self) {
        self.waiting().closed = true;
    }

    fn is_idle(&self) -> bool {
        self.waiting().requests.is_empty()
    }

    /// Requests waiting for a reply on this connection (read for the in-flight gauge, so the
    /// hot path does not update a gauge per request).
    pub fn waiting_count(&self) -> usize {
        self.waiting().requests.len()
    }

    /// The router's task: replies, deadlines, connection loss, retirement and the end of the
    /// drain. Ends when the connection closes, or when it is retired and nothing waits on it
    /// (dropping the subscription then lets the old connection go).
    pub async fn run(
        self: Arc<Self>,
        mut replies: Subscriber,
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
                message = replies.next() => {
                    let Some(message) = message else {
                        let error = GatewayError::new(
                            ErrorCode::Unavailable,
                            "the NATS connection closed while waiting for the reply",
                        );
                        self.fail_all(&error, true);
                        return;
                    };
                    self.on_reply(message);
                    // Take what else is ready now, then look at the deadlines once.
                    for _ in 0..REPLY_BATCH {
                        match replies.next().now_or_never() {
                            Some(Some(message)) => self.on_reply(message),
                            _ => break,
                        }
                    }
                }
                _ = lost.changed() => {
                    // The replies would have come on the connection that was just lost.
                    let error = GatewayError::new(
                        ErrorCode::Unavailable,
                        "the NATS connection was lost while waiting for the reply; the service may or may not have handled the request",
                    );
                    self.fail_all(&error, false);
                }
                _ = retired.wait_for(|retired| *retired), if !retiring => {
                    retiring = true;
                    self.close();
                }
                _ = shutdown.drain_expired(), if !drained => {
                    drained = true;
                    let error = GatewayError::new(
                        ErrorCode::Unavailable,
                        "the gateway is shutting down and the drain time ran out",
                    );
                    self.fail_all(&error, true);
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

/// Records a finished request and hands its answer to its sink.
pub fn finish(metrics: &Metrics, pending: Pending, result: Result<Reply, GatewayError>) {
    record(metrics, pending.frontend, pending.started, &result);
    drop(pending.permit);
    pending.sink.deliver(pending.id, result);
}

/// The metrics of one finished request.
pub fn record(
    metrics: &Metrics,
    frontend: Frontend,
    started: std::time::Instant,
    result: &Result<Reply, GatewayError>,
) {
    metrics.operation(
        frontend,
        Op::Request,
        result.as_ref().map(|_| ()).map_err(|e| e.code),
    );
    metrics.request_latency(frontend, started.elapsed().as_secs_f64());
    if let Ok(reply) = result {
        metrics.payload_out(frontend, reply.data.len());
    }
}
