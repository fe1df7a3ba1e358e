//! Replay after reconnect: a subscription with `since_seq` (or `since_time`) on a subject that a
//! JetStream stream captures. Its one source, for its whole life, is an ordered push consumer
//! on that stream (filtered by the subscribe subject, delivering from the sequence after the
//! client's last one, or from the time): first what the stream holds, then what it stores
//! next, so there is no gap and no duplicate between the replay and the live messages. Every
//! message carries its stream sequence; a client that reconnects subscribes again with the last
//! one it saw.
//!
//! It is a client subscription like any other (not a shared fan-out topic): its messages go to
//! the connection's sink with the same queue bound, credit, drop-oldest and `dropped` counts;
//! it holds one of the connection's `max_subscriptions_per_connection`; unsubscribing (or the
//! connection closing) stops its consumer; a policy reload that takes the subject away ends it
//! with `unsubscribed`, as it ends shared subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::push::{Ordered, OrderedConfig};
use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, Context};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::caller::SubscriptionSlot;
use super::durable::{jetstream_absent, no_stream};
use super::{Caller, DeliverySink, Gateway, fanout, nats};
use crate::protocol::subject::{SubjectUse, validate_subject};
use crate::protocol::{Envelope, ErrorCode, GatewayError, Id, Op, Priority, Since, Subject};
use crate::telemetry::metrics::OpKind;

/// A client's subscription: a member of a shared topic, or a replaying one of its own.
/// Dropping it unsubscribes.
pub struct Subscription(Held);

enum Held {
    Shared(fanout::Subscription),
    Replay(ReplayHandle),
}

impl Subscription {
    pub(super) fn shared(subscription: fanout::Subscription) -> Subscription {
        Subscription(Held::Shared(subscription))
    }

    /// False once the gateway ended the subscription itself (a policy reload took it away).
    pub fn is_active(&self) -> bool {
        match &self.0 {
            Held::Shared(subscription) => subscription.is_active(),
            Held::Replay(replay) => replay.active.load(Ordering::Acquire),
        }
    }
}

/// A replaying subscription's task; aborted (which drops its consumer) when dropped.
struct ReplayHandle {
    task: AbortHandle,
    active: Arc<AtomicBool>,
}

impl Drop for ReplayHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where a replay starts, for the subscribe's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The stream that captures the subject.
    pub stream: Arc<str>,
    /// The stream's first sequence, when it no longer holds the one after `since_seq`.
    pub truncated: Option<u64>,
}

/// What a replay needs from its subscribe.
struct Member {
    sid: Id,
    priority: Priority,
    sink: Arc<dyn DeliverySink>,
    caller: Caller,
    subject: Subject,
    filtered: bool,
    active: Arc<AtomicBool>,
    _slot: SubscriptionSlot,
    /// Its place under `max_replays`.
    _replay: tokio::sync::OwnedSemaphorePermit,
}

/// The next message a replay delivers: after this sequence, and (until the first one) not
/// older than this time. The ordered consumer may start again from the stream's beginning when
/// it is recreated before its first message; these keep what the client saw from coming twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    after: u64,
    not_before: Option<time::OffsetDateTime>,
}

impl Position {
    fn new(since: Since) -> Position {
        match since {
            Since::Seq(seq) => Position {
                after: seq,
                not_before: None,
            },
            Since::Time(time) => Position {
                after: 0,
                not_before: Some(time),
            },
        }
    }

    /// Whether a message is new to the client; moves past it if so.
    fn take(&mut self, seq: u64, published: time::OffsetDateTime) -> bool {
        if seq <= self.after || self.not_before.is_some_and(|time| published < time) {
            return false;
        }
        self.after = seq;
        self.not_before = None;
        true
    }

    fn deliver_policy(&self) -> DeliverPolicy {
        match self.not_before {
            Some(start_time) if self.after == 0 => DeliverPolicy::ByStartTime { start_time },
            _ => DeliverPolicy::ByStartSequence {
                start_sequence: self.after.saturating_add(1),
            },
        }
    }
}

impl Gateway {
    /// Subscribes `caller` to `subject` from a point in the stream that captures it (see the
    /// module doc). Checked, counted and audited as a subscribe.
    pub async fn subscribe_replay(
        &self,
        caller: &Caller,
        subject: &Subject,
        queue: Option<&str>,
        since: Since,
        (sid, priority, sink): (Id, Priority, Arc<dyn DeliverySink>),
    ) -> Result<(Subscription, Replayed), GatewayError> {
        let audit = match self.inner.audit.is_on() {
            true => {
                let mut envelope = Envelope::new(Op::Subscribe, sid.clone());
                envelope.subject = Some(subject.clone());
                self.audit_ticket(caller, Op::Subscribe, &envelope, None)
                    .await
            }
            false => None,
        };
        let started = Instant::now();
        let max = self.inner.live.max_subscriptions_per_connection();
        let admitted = caller
            .admit(0)
            .and_then(|()| validate_subject(subject, SubjectUse::Subscribe))
            .and_then(|()| match queue {
                Some(_) => Err(GatewayError::bad_request(
                    "\"since_seq\" and \"since_time\" cannot be used with a queue group",
                )),
                None => Ok(()),
            })
            .and_then(|()| self.subscribe_decision(caller, subject))
            .and_then(|filtered| Ok((filtered, caller.subscription_slot(max)?)))
            .and_then(|(filtered, slot)| Ok((filtered, slot, self.replay_place()?)));
        let result = match admitted {
            Ok((filtered, slot, replay)) => {
                let member = Member {
                    sid,
                    priority,
                    sink,
                    caller: caller.clone(),
                    subject: subject.clone(),
                    filtered,
                    active: Arc::new(AtomicBool::new(true)),
                    _slot: slot,
                    _replay: replay,
                };
                Box::pin(self.start_replay(member, since)).await
            }
            Err(error) => Err(error),
        };
        self.inner.metrics.operation_timed(
            caller.frontend(),
            OpKind::SubscribeReplay,
            result.as_ref().map(|_| ()).map_err(|e| e.code),
            started.elapsed(),
        );
        if let Some(mut audit) = audit {
            if let Ok((_, replayed)) = &result {
                audit.record = audit.record.message(format!(
                    "replay stream={} since={}{}",
                    replayed.stream,
                    match since {
                        Since::Seq(seq) => format!("seq {seq}"),
                        Since::Time(time) => format!("time {}", time.unix_timestamp()),
                    },
                    match replayed.truncated {
                        Some(first) => format!(" truncated first_seq={first}"),
                        None => String::new(),
                    }
                ));
            }
            audit.finish(&result.as_ref().map(|_| ()).map_err(Clone::clone), started);
        }
        result
    }

    /// A place under `max_replays`, or `OVERLOADED`.
    fn replay_place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        self.inner
            .jetstream
            .replays
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                GatewayError::new(
                    ErrorCode::Overloaded,
                    format!(
                        "the gateway holds max-replays ({}) replaying subscriptions; retry later or subscribe without since_seq/since_time",
                        self.inner.config.max_replays
                    ),
                )
            })
    }

    /// Finds the stream, makes the consumer and starts the task that delivers its messages.
    async fn start_replay(
        &self,
        member: Member,
        since: Since,
    ) -> Result<(Subscription, Replayed), GatewayError> {
        let timeout = self.inner.live.request_timeout();
        let picked = self.inner.pool.client_on(member.caller.lane().0)?;
        let context = self.jetstream_context(&picked);
        let lookup = context.stream_by_subject(member.subject.to_string());
        let name = match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(name)) => name,
            Ok(Err(error))
                if error.kind() == GetStreamByNameErrorKind::NotFound
                    || jetstream_absent(&error) =>
            {
                return Err(no_stream(&member.subject));
            }
            Ok(Err(error)) => return Err(jetstream_unavailable(error)),
            Err(_) => return Err(jetstream_unavailable("no answer in time")),
        };
        let stream = tokio::time::timeout(timeout, context.get_stream(&name))
            .await
            .map_err(|_| jetstream_unavailable("no answer in time"))?
            .map_err(jetstream_unavailable)?;
        let info = stream.cached_info();
        // Only what the stream captures can be replayed and then delivered live: a wider
        // subject would silently miss the rest.
        let subjects = &info.config.subjects;
        if !subjects
            .iter()
            .any(|captured| super::policy::is_subset(&member.subject, captured))
        {
            return Err(GatewayError::bad_request(format!(
                "stream {name} captures only part of {:?} (its subjects: {}): replay a subject within one of them",
                member.subject.as_str(),
                subjects.join(", ")
            )));
        }
        let state = &info.state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        if let Since::Seq(seq) = since
            && seq > last
        {
            // Sequences only grow: the client saw this one in another stream of that name.
            return Err(GatewayError::bad_request(format!(
                "since_seq {seq} is past the last sequence of stream {name} ({last}); was the stream made again? Subscribe with since_seq 0 or since_time"
            )));
        }
        // From a time: the stream has removed messages (its first is not 1) and the oldest
        // it holds was stored after the asked time, so some removed ones may have been stored
        // after it too. (Removed messages' times are not kept: this may say truncated when
        // every removed message was older; it never stays silent when one was newer.)
        let truncated = match since {
            Since::Seq(seq) if seq.saturating_add(1) < first => Some(first),
            Since::Time(time) if first > 1 && time < state.first_timestamp => Some(first),
            _ => None,
        };
        let position = Position::new(since);
        let (messages, consumer) = open(&context, &name, &member.subject, position).await?;
        let replayed = Replayed {
            stream: Arc::from(name.as_str()),
            truncated,
        };
        let active = member.active.clone();
        let frontend = member.caller.frontend();
        self.inner.metrics.subscription_opened(frontend);
        let tidy = Tidy {
            gateway: self.clone(),
            lane: member.caller.lane(),
            stream: name,
            consumer,
        };
        let task = tokio::spawn(replay(
            self.clone(),
            member,
            (tidy, position),
            (messages, picked.retired),
        ));
        let handle = ReplayHandle {
            task: task.abort_handle(),
            active,
        };
        Ok((Subscription(Held::Replay(handle)), replayed))
    }

    /// Hands one stream message to the replay's client, if it is new to it and the client may
    /// see it.
    fn deliver_replayed(
        &self,
        member: &Member,
        position: &mut Position,
        message: jetstream::Message,
    ) {
        let Ok(info) = message.info() else {
            return;
        };
        let (seq, published) = (info.stream_sequence, info.published);
        if !position.take(seq, published) {
            return;
        }
        let mut delivery = nats::delivery(message.message);
        // The reply subject is JetStream's own (acks): nothing for the client.
        delivery.reply_to = None;
        delivery.seq = Some(seq);
        if member.filtered
            && !member
                .caller
                .authorized()
                .permissions
                .may_receive(delivery.subject.as_str())
        {
            return;
        }
        let metrics = &self.inner.metrics;
        let frontend = member.caller.frontend();
        metrics.payload_out(frontend, delivery.payload.len());
        let dropped = member
            .sink
            .deliver(&member.sid, &[Arc::new(delivery)], member.priority);
        if dropped > 0 {
            metrics.dropped(frontend, dropped);
        }
    }

    /// After a policy reload: whether the replay's caller may still subscribe to its subject.
    fn recheck_replay(&self, member: &mut Member) -> Result<(), GatewayError> {
        if let Some(refreshed) = self.refreshed(&member.caller) {
            member.caller = refreshed;
        }
        member.filtered = self.subscribe_decision(&member.caller, &member.subject)?;
        Ok(())
    }
}

/// An ordered consumer on `stream` for `subject`, from `position`, and its name.
async fn open(
    context: &Context,
    stream: &str,
    subject: &Subject,
    position: Position,
) -> Result<(Ordered, String), GatewayError> {
    let config = OrderedConfig {
        deliver_subject: context.client().new_inbox(),
        filter_subject: subject.to_string(),
        deliver_policy: position.deliver_policy(),
        ..Default::default()
    };
    let consumer = context
        .create_consumer_on_stream(config, stream)
        .await
        .map_err(|error| match error.kind() {
            ConsumerErrorKind::JetStream(cause)
                if cause.error_code() == jetstream::ErrorCode::CONSUMER_FILTER_NOT_SUBSET =>
            {
                GatewayError::bad_request(format!(
                    "stream {stream} captures only part of {subject:?}: subscribe to subjects within the stream's"
                ))
            }
            _ => GatewayError::new(
                ErrorCode::Unavailable,
                format!("JetStream could not start the replay of {subject:?}: {error}"),
            ),
        })?;
    let name = consumer.cached_info().name.clone();
    let messages = consumer.messages().await.map_err(|error| {
        GatewayError::new(
            ErrorCode::Unavailable,
            format!("the replay of {subject:?} could not subscribe: {error}"),
        )
    })?;
    Ok((messages, name))
}

/// Deletes a replay's consumer when the replay ends (unsubscribed, the connection gone, the
/// policy took it away), rather than leaving it to JetStream's 30 s inactivity cleanup.
struct Tidy {
    gateway: Gateway,
    lane: super::Lane,
    stream: String,
    /// The consumer now serving the replay (the ordered consumer makes a new one, with a new
    /// name, after a gap; each message names the one that delivered it).
    consumer: String,
}

impl Tidy {
    fn serving(&mut self, consumer: &str) {
        if self.consumer != consumer {
            self.consumer = consumer.to_owned();
        }
    }
}

impl Drop for Tidy {
    fn drop(&mut self) {
        let (Ok(runtime), Ok(picked)) = (
            tokio::runtime::Handle::try_current(),
            self.gateway.inner.pool.client_on(self.lane.0),
        ) else {
            return;
        };
        let context = self.gateway.jetstream_context(&picked);
        let (consumer, stream) = (
            std::mem::take(&mut self.consumer),
            std::mem::take(&mut self.stream),
        );
        runtime.spawn(async move {
            let _ = context.delete_consumer_from_stream(consumer, stream).await;
        });
    }
}

fn jetstream_unavailable(error: impl std::fmt::Display) -> GatewayError {
    GatewayError::new(
        ErrorCode::Unavailable,
        format!("JetStream did not answer: {error}"),
    )
}

/// Counts a replay as closed when its task ends (or is aborted).
struct Closed(
    Arc<crate::telemetry::metrics::Metrics>,
    crate::protocol::Frontend,
);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.subscription_closed(self.1);
    }
}

/// A replay's life: the consumer's messages to the client, until the subscription is dropped
/// (which aborts this) or a policy reload ends it. When its NATS connection goes (the pool
/// retired it, or the consumer's stream ended), it starts again after the last sequence
/// delivered, on a connected pool connection.
async fn replay(
    gateway: Gateway,
    mut member: Member,
    (mut tidy, mut position): (Tidy, Position),
    (mut messages, mut retired): (Ordered, watch::Receiver<bool>),
) {
    let _closed = Closed(gateway.inner.metrics.clone(), member.caller.frontend());
    let mut policy = gateway.inner.jetstream.policy_changes();
    loop {
        let message = tokio::select! {
            biased;
            Ok(()) = policy.changed() => {
                if let Err(error) = gateway.recheck_replay(&mut member) {
                    return end(member, error);
                }
                continue;
            }
            _ = retired.wait_for(|retired| *retired) => None,
            message = messages.next() => message,
        };
        match message {
            Some(Ok(message)) => {
                if let Ok(info) = message.info() {
                    tidy.serving(info.consumer);
                }
                gateway.deliver_replayed(&member, &mut position, message);
            }
            // The ordered consumer recreates itself after these (a missed heartbeat, a gap).
            Some(Err(error)) => {
                tracing::debug!(%error, subject = %member.subject, "replay consumer error");
            }
            None => {
                let (reopened, consumer, now_retired) =
                    reopen(&gateway, &member, &tidy.stream, position).await;
                (messages, retired) = (reopened, now_retired);
                tidy.serving(&consumer);
            }
        }
    }
}

/// Ends a replay the policy no longer allows: its place under the connection's subscription
/// limit is free before the client hears of it.
fn end(member: Member, error: GatewayError) {
    member.active.store(false, Ordering::Release);
    let Member {
        sid, sink, _slot, ..
    } = member;
    drop(_slot);
    sink.ended(&sid, error);
}

/// A new consumer from `position`, on a connected pool connection, with backoff.
async fn reopen(
    gateway: &Gateway,
    member: &Member,
    stream: &str,
    position: Position,
) -> (Ordered, String, watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(50);
    loop {
        tokio::time::sleep(delay).await;
        if let Ok(picked) = gateway.inner.pool.client_on(member.caller.lane().0) {
            let context = gateway.jetstream_context(&picked);
            if let Ok((messages, consumer)) =
                open(&context, stream, &member.subject, position).await
            {
                return (messages, consumer, picked.retired);
            }
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(seconds).unwrap()
    }

    #[test]
    fn a_replay_never_delivers_a_sequence_twice_or_one_the_client_had() {
        let mut position = Position::new(Since::Seq(5));
        assert_eq!(
            position.deliver_policy(),
            DeliverPolicy::ByStartSequence { start_sequence: 6 }
        );
        // A consumer recreated before its first message starts from the beginning.
        assert!(!position.take(1, at(0)));
        assert!(!position.take(5, at(0)));
        assert!(position.take(6, at(0)));
        assert!(!position.take(6, at(0)));
        assert!(position.take(9, at(0)));
        assert_eq!(
            position.deliver_policy(),
            DeliverPolicy::ByStartSequence { start_sequence: 10 }
        );
    }

    #[test]
    fn a_replay_from_a_time_skips_older_messages_until_its_first() {
        let mut position = Position::new(Since::Time(at(100)));
        assert_eq!(
            position.deliver_policy(),
            DeliverPolicy::ByStartTime {
                start_time: at(100)
            }
        );
        assert!(!position.take(1, at(99)));
        assert!(position.take(2, at(100)));
        // From then on, only the sequence counts (clocks may disagree).
        assert!(position.take(3, at(50)));
        assert_eq!(
            position.deliver_policy(),
            DeliverPolicy::ByStartSequence { start_sequence: 4 }
        );
    }
}
