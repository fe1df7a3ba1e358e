//! The life of a client connection, the same for every front-end (a Unix-socket connection, a
//! WebSocket, a gRPC stream): the phase it is in, when it is finished, when it is idle, when a
//! client that stopped reading is cut off, how a refusal over the connection limit is
//! budgeted, and how the answers a departed client never got are counted. A front-end's loop
//! asks this type instead of keeping flags of its own.
//!
//! - **Reading**: commands are read and handled.
//! - **HalfClosed**: the client finished sending (EOF, end of its gRPC stream); it still gets
//!   every answer, and its subscriptions go on until it goes away completely.
//! - **Draining**: the gateway is shutting down; what is in flight is answered, new commands
//!   are refused with `UNAVAILABLE` while the input is still open, subscriptions are closed.
//! - **Closing**: the input broke (a frame that cannot be resynchronised, a protocol error);
//!   the answers owed are written, then the connection closes.
//!
//! The connection is finished when nothing is owed and it is draining or closing, or it is
//! half-closed with no subscription left.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::Gateway;
use crate::protocol::Frontend;
use crate::telemetry::metrics::Metrics;

use super::outbox::Outbox;

/// Connection-limit refusals answered politely at once (each may wait briefly to answer in
/// the client's own format); past that, a refused connection is closed at once, so a flood
/// cannot hold file descriptors.
const MAX_POLITE_REFUSALS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Reading,
    HalfClosed,
    Draining,
    Closing,
}

/// Why a write did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The client went away (the socket failed or the call was cancelled).
    Gone,
    /// The client did not read for longer than the stall time.
    Stalled,
}

/// What the idle timer decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Close the connection: no traffic, nothing owed, no subscription, for the idle time.
    Close,
    /// Not idle yet: check again at this instant.
    CheckAt(Instant),
}

/// The phase machine and the idle rule of one connection (or gRPC stream).
pub struct Lifecycle {
    phase: Phase,
    /// Whether commands can still be read (the input may end while draining).
    input_open: bool,
    idle: Option<Duration>,
    last_activity: Instant,
    writes: WriteRules,
    /// Why it ends, for the audit log's `disconnect` record.
    reason: &'static str,
}

impl Lifecycle {
    /// Why the connection ended (as far as this lifecycle saw; a front-end may say more).
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// Records why the connection ends, when the front-end knows better (a failed write).
    pub fn ends_because(&mut self, reason: &'static str) {
        self.reason = reason;
    }

    pub fn new(gateway: &Gateway, frontend: Frontend) -> Lifecycle {
        Lifecycle {
            phase: Phase::Reading,
            input_open: true,
            idle: gateway.live().idle_timeout(),
            last_activity: Instant::now(),
            writes: WriteRules::new(gateway, frontend),
            reason: "closed",
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether to read the next command: while reading, and while draining (to refuse it).
    pub fn reads(&self) -> bool {
        self.input_open && matches!(self.phase, Phase::Reading | Phase::Draining)
    }

    pub fn is_draining(&self) -> bool {
        self.phase == Phase::Draining
    }

    /// The connection has nothing more to do: close it.
    pub fn finished(&self, unanswered: bool, has_subscriptions: bool) -> bool {
        !unanswered
            && match self.phase {
                Phase::Reading => false,
                Phase::HalfClosed => !has_subscriptions,
                Phase::Draining | Phase::Closing => true,
            }
    }

    /// The client sent its last command (a clean end of input).
    pub fn input_ended(&mut self) {
        self.input_open = false;
        if self.phase == Phase::Reading {
            self.phase = Phase::HalfClosed;
            self.reason = "client closed";
        }
    }

    /// The input cannot be read any more: answer what is owed, then close. The caller closes
    /// the subscriptions (they would keep the connection open).
    pub fn input_broke(&mut self) {
        self.input_open = false;
        if self.phase != Phase::Draining {
            self.phase = Phase::Closing;
            self.reason = "unrecoverable input";
        }
    }

    /// Shutdown began. Returns `true` the first time, when the caller closes the
    /// subscriptions.
    pub fn begin_drain(&mut self) -> bool {
        if matches!(self.phase, Phase::Draining | Phase::Closing) {
            return false;
        }
        self.phase = Phase::Draining;
        self.reason = "shutdown";
        true
    }

    /// A command arrived (the idle timer starts again).
    pub fn touch(&mut self) {
        if self.idle.is_some() {
            self.last_activity = Instant::now();
        }
    }

    /// When the idle rule next needs a look; `None` when idle closing is off or draining.
    pub fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.idle.filter(|_| self.phase != Phase::Draining)?;
        Some(self.last_activity + idle)
    }

    /// The idle timer fired. A connection that is busy (answers owed, or subscriptions,
    /// which are traffic the client waits for) is not idle.
    pub fn on_idle_timer(&mut self, busy: bool) -> Idle {
        let Some(idle) = self.idle else {
            return Idle::CheckAt(Instant::now() + Duration::from_secs(86_400));
        };
        let now = Instant::now();
        if busy {
            self.last_activity = now;
        } else if now >= self.last_activity + idle {
            tracing::debug!(
                idle_ms = idle.as_millis() as u64,
                "closing an idle connection"
            );
            self.writes.metrics.idle_disconnected(self.writes.frontend);
            self.reason = "idle";
            return Idle::Close;
        }
        Idle::CheckAt(self.last_activity + idle)
    }

    /// The rules for writing to this client, for a writer that runs apart from the reader.
    pub fn writes(&self) -> &WriteRules {
        &self.writes
    }
}

/// How answers are written: a write that cannot finish within the stall time means the client
/// stopped reading; either way a client that goes away loses what it was owed, and that is
/// counted.
#[derive(Clone)]
pub struct WriteRules {
    frontend: Frontend,
    stall: Duration,
    metrics: Arc<Metrics>,
    /// Shutdown's cut at the end of the drain: a write still waiting then ends as if the
    /// client were gone, so that its connection ends (and is audited) before the gateway
    /// exits, whatever the stall time.
    cut: CancellationToken,
}

impl WriteRules {
    pub fn new(gateway: &Gateway, frontend: Frontend) -> WriteRules {
        WriteRules {
            frontend,
            stall: gateway.live().slow_client_stall(),
            metrics: gateway.metrics().clone(),
            cut: gateway.shutdown().cut_token(),
        }
    }

    /// Resolves at shutdown's cut (see `cut` above).
    pub async fn cut(&self) {
        self.cut.cancelled().await
    }

    pub fn stall(&self) -> Duration {
        self.stall
    }

    /// Runs one write with the stall time as its limit (the timer only matters when the
    /// write has to wait). A stalled client is counted.
    pub async fn send<T, E>(&self, write: impl Future<Output = Result<T, E>>) -> Result<T, Broken> {
        let mut write = std::pin::pin!(write);
        // Most writes complete at once: only a write that waits needs the timer.
        let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
        let outcome = match first {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => tokio::select! {
                outcome = tokio::time::timeout(self.stall, write) => outcome,
                () = self.cut.cancelled() => {
                    tracing::debug!(
                        frontend = self.frontend.as_str(),
                        "a write still waiting at the end of the drain: the connection is cut"
                    );
                    return Err(Broken::Gone);
                }
            },
        };
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(Broken::Gone),
            Err(_) => {
                tracing::debug!(
                    stall_ms = self.stall.as_millis() as u64,
                    frontend = self.frontend.as_str(),
                    "disconnecting a client that stopped reading"
                );
                self.metrics.slow_client_disconnected(self.frontend);
                Err(Broken::Stalled)
            }
        }
    }

    /// The client will never read what is queued: `unwritten` answers taken from the outbox
    /// but not written, and everything still in it (or still to come), are lost. Counted.
    pub fn lose(&self, outbox: &Outbox, unwritten: usize) {
        let lost = unwritten + outbox.abandon();
        self.metrics.late_replies.increment(lost as u64);
    }
}

/// Refused connections that may be answered politely at once (see `MAX_POLITE_REFUSALS`).
#[derive(Clone)]
pub struct RefusalBudget(Arc<Semaphore>);

impl Default for RefusalBudget {
    fn default() -> Self {
        RefusalBudget(Arc::new(Semaphore::new(MAX_POLITE_REFUSALS)))
    }
}

impl RefusalBudget {
    /// A permit to refuse politely, held while the refusal is answered; `None` when the
    /// budget is spent (close at once).
    pub fn polite(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(idle: Option<Duration>) -> Lifecycle {
        Lifecycle {
            phase: Phase::Reading,
            input_open: true,
            idle,
            last_activity: Instant::now(),
            writes: WriteRules {
                frontend: Frontend::Uds,
                stall: Duration::from_millis(50),
                metrics: Metrics::new(),
                cut: CancellationToken::new(),
            },
            reason: "closed",
        }
    }

    #[test]
    fn a_half_closed_connection_lives_while_it_has_subscriptions_or_answers_owed() {
        let mut life = lifecycle(None);
        assert!(!life.finished(false, false), "reading is never finished");
        life.input_ended();
        assert_eq!(life.phase(), Phase::HalfClosed);
        assert!(!life.reads());
        assert!(!life.finished(true, false), "answers still owed");
        assert!(!life.finished(false, true), "subscriptions still served");
        assert!(life.finished(false, false));
    }

    #[test]
    fn draining_reads_only_to_refuse_and_ends_when_nothing_is_owed() {
        let mut life = lifecycle(None);
        assert!(life.begin_drain());
        assert!(
            !life.begin_drain(),
            "the first drain closes subscriptions, once"
        );
        assert!(life.reads(), "commands are read to be refused");
        assert!(!life.finished(true, true));
        assert!(
            life.finished(false, true),
            "subscriptions do not hold a drain"
        );
        life.input_ended();
        assert_eq!(life.phase(), Phase::Draining);
        assert!(!life.reads());
    }

    #[test]
    fn broken_input_closes_once_the_answers_are_out() {
        let mut life = lifecycle(None);
        life.input_broke();
        assert_eq!(life.phase(), Phase::Closing);
        assert!(!life.reads());
        assert!(!life.finished(true, false));
        assert!(life.finished(false, false));
        assert!(!life.begin_drain(), "closing already");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_closes_only_a_connection_with_nothing_going_on() {
        let idle = Duration::from_secs(10);
        let mut life = lifecycle(Some(idle));
        let first = life.idle_deadline().unwrap();
        tokio::time::advance(idle).await;
        assert_eq!(
            life.on_idle_timer(true),
            Idle::CheckAt(Instant::now() + idle),
            "a busy connection is not idle"
        );
        tokio::time::advance(idle / 2).await;
        life.touch();
        assert!(life.idle_deadline().unwrap() > first + idle);
        tokio::time::advance(idle).await;
        assert_eq!(life.on_idle_timer(false), Idle::Close);
        life.begin_drain();
        assert_eq!(life.idle_deadline(), None, "no idle closing during a drain");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_stall_time_is_a_stalled_client() {
        let life = lifecycle(None);
        let never = std::future::pending::<Result<(), ()>>();
        assert_eq!(life.writes().send(never).await, Err(Broken::Stalled));
        assert_eq!(
            life.writes().send(async { Err::<(), _>(()) }).await,
            Err(Broken::Gone)
        );
        assert_eq!(life.writes().send(async { Ok::<_, ()>(7) }).await, Ok(7));
        let outbox = Outbox::new(4);
        outbox.push_control(crate::protocol::Outbound::Pong {
            id: crate::protocol::Id::Null,
        });
        life.writes().lose(&outbox, 2);
        let text = life.writes().metrics.render();
        assert!(text.contains("ipc_gateway_late_replies_total 3"), "{text}");
    }
}
