//! One client's outbound queue, shared by every front-end. Two traffic classes:
//! - control (replies, errors, acks, pongs, drop notices) is never dropped. It is bounded
//!   because the reader takes a new command only while `pending` (commands accepted whose
//!   answer is not yet written) is under the connection's in-flight limit. The reply to a
//!   high-priority request goes ahead of the other control answers still queued.
//! - stream (subscription messages) is bounded by `stream_limit` messages in all, in three
//!   lanes by the subscription's priority: high is written before normal, normal before low.
//!   When full, the oldest low message is dropped, else the oldest normal, and a high one only
//!   when nothing but high is queued; every drop is counted per subscription, and the client
//!   is told with a `dropped` notice ahead of the next messages.
//! - A subscription opened with credit (flow control for video-like streams) keeps its
//!   messages in a queue of its own, bounded and dropping the oldest the same way, and the
//!   writer takes only as many of them as the client has granted (in its priority's turn).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::core::{DeliverySink, Reply, ReplySink};
use crate::protocol::{Delivery, GatewayError, Id, Outbound, Priority};

type Lane = VecDeque<(Id, Arc<Delivery>)>;

#[derive(Default)]
struct Queues {
    control: VecDeque<Outbound>,
    /// Normal-priority subscription messages (the lane every subscription uses by default).
    stream: Lane,
    /// The queues of the other classes, boxed: a connection that never uses them (most) pays
    /// 8 bytes for them, and an idle one no heap (freed with the others when all are empty).
    lanes: Option<Box<Lanes>>,
    /// Drops not yet reported, per subscription id, in order of first drop.
    dropped: Vec<Loss>,
    /// Subscriptions under credit flow control (few per connection: a list beats a map).
    credited: Vec<Credited>,
    /// Messages the stream lanes hold at most, together (kept here, where it fits in padding).
    stream_limit: u32,
    closed: bool,
}

#[derive(Default)]
struct Lanes {
    /// Replies to high-priority requests: written before `control`.
    control_high: VecDeque<Outbound>,
    stream_high: Lane,
    stream_low: Lane,
}

impl Lanes {
    fn is_empty(&self) -> bool {
        self.control_high.is_empty() && self.stream_high.is_empty() && self.stream_low.is_empty()
    }
}

/// Losses of one subscription not yet reported.
struct Loss {
    sid: Id,
    count: u64,
    /// An unknown number more were lost (its NATS connection was cut).
    gap: bool,
}

struct Credited {
    sid: Id,
    /// Messages the client still accepts.
    credit: u64,
    /// The subscription's class (as its messages were pushed).
    priority: Priority,
    /// Messages waiting for credit, oldest first.
    held: VecDeque<Arc<Delivery>>,
}

impl Queues {
    fn count_drop(&mut self, sid: Id) {
        self.loss(sid).count += 1;
    }

    /// The report pending for `sid`, new if there is none.
    fn loss(&mut self, sid: Id) -> &mut Loss {
        let index = match self.dropped.iter().position(|loss| loss.sid == sid) {
            Some(index) => index,
            None => {
                self.dropped.push(Loss {
                    sid,
                    count: 0,
                    gap: false,
                });
                self.dropped.len() - 1
            }
        };
        &mut self.dropped[index]
    }

    fn lanes(&mut self) -> &mut Lanes {
        self.lanes.get_or_insert_with(Box::default)
    }

    fn lane(&mut self, priority: Priority) -> &mut Lane {
        match priority {
            Priority::Normal => &mut self.stream,
            Priority::High => &mut self.lanes().stream_high,
            Priority::Low => &mut self.lanes().stream_low,
        }
    }

    /// The lane of `priority` if it exists, without allocating one.
    fn existing_lane(&mut self, priority: Priority) -> Option<&mut Lane> {
        Some(match priority {
            Priority::Normal => &mut self.stream,
            Priority::High => &mut self.lanes.as_mut()?.stream_high,
            Priority::Low => &mut self.lanes.as_mut()?.stream_low,
        })
    }

    fn stream_len(&self) -> usize {
        self.stream.len()
            + self
                .lanes
                .as_ref()
                .map_or(0, |l| l.stream_high.len() + l.stream_low.len())
    }

    /// Drops one message because the stream lanes are over their bound: the oldest low one,
    /// else the oldest normal, else the oldest high. Counted for its subscription.
    fn drop_one(&mut self) -> bool {
        for priority in [Priority::Low, Priority::Normal, Priority::High] {
            if let Some((sid, _)) = self.existing_lane(priority).and_then(VecDeque::pop_front) {
                self.count_drop(sid);
                return true;
            }
        }
        false
    }

    fn release_memory_if_empty(&mut self) {
        if self.control.is_empty() && self.control.capacity() > 0 {
            self.control = VecDeque::new();
        }
        if self.stream.is_empty() && self.stream.capacity() > 0 {
            self.stream = VecDeque::new();
        }
        if self.lanes.as_ref().is_some_and(|lanes| lanes.is_empty()) {
            self.lanes = None;
        }
        if self.dropped.is_empty() && self.dropped.capacity() > 0 {
            self.dropped = Vec::new();
        }
        for credited in &mut self.credited {
            if credited.held.is_empty() && credited.held.capacity() > 0 {
                credited.held = VecDeque::new();
            }
        }
    }
}

pub struct Outbox {
    queues: Mutex<Queues>,
    pending: AtomicUsize,
    /// Wakes the writer (one per outbox) when there is something to write or the outbox
    /// closed. A waker slot, not a `Notify`: the writer then waits without a waiter node in
    /// its future, which every idle connection would carry.
    writable: AtomicWaker,
    /// Wakes the reader when `pending` fell (there is room for more commands).
    room: Notify,
}

/// What the writer takes in one go.
#[derive(Default)]
pub struct Batch {
    pub events: Vec<Outbound>,
    /// Control events in `events`: pass to `written` once they are on the wire.
    pub control: usize,
    /// Subscription messages dropped since the last batch.
    pub dropped: u64,
    pub closed: bool,
}

impl Outbox {
    pub fn new(stream_limit: usize) -> Self {
        Outbox {
            queues: Mutex::new(Queues {
                stream_limit: stream_limit.try_into().unwrap_or(u32::MAX),
                ..Queues::default()
            }),
            pending: AtomicUsize::new(0),
            writable: AtomicWaker::new(),
            room: Notify::new(),
        }
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        // A panic while holding this lock leaves plain queues behind: still usable.
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a command whose answer will come through `push_control`.
    pub fn begin_command(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// Commands accepted whose answers are not yet written.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Queues an answer; it is never dropped while the connection is open. Returns `false`
    /// when the connection is gone and nobody can read it.
    pub fn push_control(&self, event: Outbound) -> bool {
        self.push_answer(event, Priority::Normal)
    }

    /// Queues an answer of a class: a high one goes ahead of the normal answers still queued
    /// (after the high ones before it); low answers are not held back (control is never
    /// dropped, so there is nothing to gain), they queue as normal ones.
    pub fn push_answer(&self, event: Outbound, priority: Priority) -> bool {
        let mut queues = self.queues();
        if queues.closed {
            return false;
        }
        match priority {
            Priority::High => queues.lanes().control_high.push_back(event),
            Priority::Normal | Priority::Low => queues.control.push_back(event),
        }
        drop(queues);
        self.writable.wake();
        true
    }

    /// Where the core puts the answer of a request of class `priority`.
    pub fn replies(self: &Arc<Self>, priority: Priority) -> Arc<dyn ReplySink> {
        match priority {
            Priority::High => Arc::new(HighReplies(self.clone())),
            Priority::Normal | Priority::Low => self.clone(),
        }
    }

    /// Queues a message of subscription `sid`, whose class is `priority`. When the stream
    /// lanes are full, one message is dropped (the oldest of the lowest class queued, which
    /// may be this one) and counted for its subscription. Returns how many were dropped (0 or
    /// 1), for the metric.
    pub fn push_stream(&self, sid: Id, message: Arc<Delivery>, priority: Priority) -> u64 {
        self.push_streams(&sid, std::slice::from_ref(&message), priority)
    }

    /// Queues messages of subscription `sid` in order, as `push_stream` would one by one, but
    /// under one lock and with one wake-up: a topic hands each member what it has at once.
    /// Returns how many were dropped.
    pub fn push_streams(&self, sid: &Id, messages: &[Arc<Delivery>], priority: Priority) -> u64 {
        let mut queues = self.queues();
        if queues.closed || messages.is_empty() {
            return 0;
        }
        let limit = queues.stream_limit as usize;
        if let Some(credited) = queues.credited.iter_mut().find(|c| c.sid == *sid) {
            let mut dropped = 0;
            for message in messages {
                if credited.held.len() >= limit {
                    credited.held.pop_front();
                    dropped += 1;
                }
                credited.held.push_back(message.clone());
            }
            credited.priority = priority;
            let sendable = credited.credit > 0;
            if dropped > 0 {
                queues.loss(sid.clone()).count += dropped;
            }
            drop(queues);
            if sendable || dropped > 0 {
                self.writable.wake();
            }
            return dropped;
        }
        let mut dropped = 0;
        for message in messages {
            queues
                .lane(priority)
                .push_back((sid.clone(), message.clone()));
            if queues.stream_len() > limit && queues.drop_one() {
                dropped += 1;
            }
        }
        drop(queues);
        self.writable.wake();
        dropped
    }

    /// Puts a new subscription under credit flow control: the client gets at most `credit`
    /// of its messages until it grants more.
    pub fn limit_by_credit(&self, sid: Id, credit: u32) {
        let mut queues = self.queues();
        queues.credited.retain(|c| c.sid != sid);
        queues.credited.push(Credited {
            sid,
            credit: credit.into(),
            priority: Priority::Normal,
            held: VecDeque::new(),
        });
    }

    /// The client grants `n` more messages; `false` when `sid` is not under credit control.
    pub fn grant(&self, sid: &Id, n: u32) -> bool {
        let mut queues = self.queues();
        let Some(credited) = queues.credited.iter_mut().find(|c| c.sid == *sid) else {
            return false;
        };
        credited.credit = credited.credit.saturating_add(n.into());
        let sendable = !credited.held.is_empty();
        drop(queues);
        if sendable {
            self.writable.wake();
        }
        true
    }

    /// Forgets queued messages of a subscription that was closed.
    pub fn purge(&self, sid: &Id) {
        let mut queues = self.queues();
        queues.stream.retain(|(s, _)| s != sid);
        if let Some(lanes) = &mut queues.lanes {
            lanes.stream_high.retain(|(s, _)| s != sid);
            lanes.stream_low.retain(|(s, _)| s != sid);
        }
        queues.dropped.retain(|loss| loss.sid != *sid);
        queues.credited.retain(|c| c.sid != *sid);
    }

    /// Takes up to `max` events: control first (high replies ahead), then drop notices, then
    /// subscription messages, high before normal before low.
    pub fn take_batch(&self, max: usize) -> Batch {
        let mut queues = self.queues();
        let queues = &mut *queues;
        let mut batch = Batch {
            closed: queues.closed,
            ..Batch::default()
        };
        while batch.events.len() < max {
            let high = queues
                .lanes
                .as_mut()
                .and_then(|lanes| lanes.control_high.pop_front());
            let Some(event) = high.or_else(|| queues.control.pop_front()) else {
                break;
            };
            batch.events.push(event);
            batch.control += 1;
        }
        for Loss { sid, count, gap } in queues.dropped.drain(..) {
            batch.dropped += count;
            batch.events.push(Outbound::Dropped { sid, count, gap });
        }
        for priority in Priority::ALL {
            // Credited subscriptions first within their class: their credit bounds them, so
            // they cannot starve the others.
            for credited in queues
                .credited
                .iter_mut()
                .filter(|c| c.priority == priority)
            {
                while batch.events.len() < max && credited.credit > 0 {
                    let Some(message) = credited.held.pop_front() else {
                        break;
                    };
                    credited.credit -= 1;
                    batch.events.push(Outbound::Msg {
                        sid: credited.sid.clone(),
                        message,
                        priority,
                    });
                }
            }
            while batch.events.len() < max {
                let Some((sid, message)) =
                    queues.existing_lane(priority).and_then(VecDeque::pop_front)
                else {
                    break;
                };
                batch.events.push(Outbound::Msg {
                    sid,
                    message,
                    priority,
                });
            }
        }
        batch
    }

    /// The writer wrote `control` answers: make room for that many new commands.
    pub fn written(&self, control: usize) {
        if control > 0 {
            self.pending.fetch_sub(control, Ordering::AcqRel);
            self.room.notify_one();
        }
    }

    /// The client is gone: drop everything queued, accept nothing more, and return how many
    /// answers (control events) were dropped.
    pub fn abandon(&self) -> usize {
        let mut queues = self.queues();
        queues.closed = true;
        queues.stream.clear();
        queues.dropped.clear();
        queues.credited.clear();
        let answers = queues.control.len()
            + queues
                .lanes
                .take()
                .map_or(0, |lanes| lanes.control_high.len());
        queues.control.clear();
        answers
    }

    /// No more events will come: the writer flushes what is queued, then ends.
    pub fn close(&self) {
        self.queues().closed = true;
        self.writable.wake();
    }

    /// The writer's next batch: waits until there is something to write, and returns `None`
    /// once the outbox is closed and everything queued was taken.
    pub async fn next_batch(&self, max: usize) -> Option<Batch> {
        std::future::poll_fn(|cx| self.poll_batch(cx, max)).await
    }

    /// `next_batch` as a poll: registers the writer's waker before it looks, so a push in
    /// between still wakes it.
    pub fn poll_batch(&self, cx: &mut Context<'_>, max: usize) -> Poll<Option<Batch>> {
        self.writable.register(cx.waker());
        let batch = self.take_batch(max);
        if !batch.events.is_empty() {
            return Poll::Ready(Some(batch));
        }
        if batch.closed {
            return Poll::Ready(None);
        }
        // Nothing to write: an idle connection keeps no queue memory (an `Outbound` is
        // 208 bytes, and the queues keep what a burst grew them to).
        self.queues().release_memory_if_empty();
        Poll::Pending
    }

    pub async fn wait_room(&self) {
        self.room.notified().await
    }
}

/// The core hands subscription messages straight to the outbox.
impl DeliverySink for Outbox {
    fn deliver(&self, sid: &Id, messages: &[Arc<Delivery>], priority: Priority) -> u64 {
        self.push_streams(sid, messages, priority)
    }

    fn lost(&self, sid: &Id, count: u64, gap: bool) {
        let mut queues = self.queues();
        if queues.closed {
            return;
        }
        let loss = queues.loss(sid.clone());
        loss.count += count;
        loss.gap |= gap;
        drop(queues);
        self.writable.wake();
    }

    fn ended(&self, sid: &Id, error: GatewayError) {
        // The client is told; the notice counts as an answer to write.
        self.begin_command();
        self.purge(sid);
        self.push_control(Outbound::Unsubscribed {
            sid: sid.clone(),
            error,
        });
    }
}

fn answer(id: Id, result: Result<Reply, GatewayError>) -> Outbound {
    match result {
        Ok(reply) => Outbound::Reply {
            id,
            data: reply.data,
            headers: reply.headers,
        },
        Err(error) => Outbound::Error { id, error },
    }
}

/// The core delivers request answers straight into the outbox.
impl ReplySink for Outbox {
    fn deliver(&self, id: Id, result: Result<Reply, GatewayError>) -> bool {
        self.push_control(answer(id, result))
    }
}

/// The sink of a high-priority request: its answer goes ahead of the queued ones.
struct HighReplies(Arc<Outbox>);

impl ReplySink for HighReplies {
    fn deliver(&self, id: Id, result: Result<Reply, GatewayError>) -> bool {
        self.0.push_answer(answer(id, result), Priority::High)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> Arc<Delivery> {
        Arc::new(Delivery {
            subject: "s".into(),
            reply_to: None,
            headers: None,
            payload: vec![n].into(),
            seq: None,
            json_tail: Default::default(),
        })
    }

    #[test]
    fn stream_drops_oldest_and_reports_counts_per_subscription() {
        let outbox = Outbox::new(2);
        let a = Id::Text("a".into());
        let b = Id::Text("b".into());
        assert_eq!(
            outbox.push_stream(a.clone(), message(1), Priority::Normal),
            0
        );
        assert_eq!(
            outbox.push_stream(b.clone(), message(2), Priority::Normal),
            0
        );
        assert_eq!(
            outbox.push_stream(a.clone(), message(3), Priority::Normal),
            1
        );
        assert_eq!(
            outbox.push_stream(a.clone(), message(4), Priority::Normal),
            1
        );
        outbox.push_control(Outbound::Ack { id: Id::from(9) });
        let batch = outbox.take_batch(100);
        assert_eq!(batch.control, 1);
        assert_eq!(batch.dropped, 2);
        let kinds: Vec<String> = batch
            .events
            .iter()
            .map(|event| match event {
                Outbound::Ack { .. } => "ack".into(),
                Outbound::Dropped { sid, count, .. } => format!("dropped {sid} {count}"),
                Outbound::Msg { sid, message, .. } => format!("msg {sid} {}", message.payload[0]),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "ack",
                "dropped \"a\" 1",
                "dropped \"b\" 1",
                "msg \"a\" 3",
                "msg \"a\" 4"
            ]
        );
    }

    /// A topic hands a member several messages at once; the queue must end as if they had
    /// come one by one: the same messages kept, the same drops counted, with and without
    /// credit.
    #[test]
    fn several_messages_at_once_queue_as_one_by_one() {
        let a = Id::Text("a".into());
        let b = Id::Text("b".into());
        for credit in [None, Some(2)] {
            let (one_by_one, at_once) = (Outbox::new(3), Outbox::new(3));
            for outbox in [&one_by_one, &at_once] {
                if let Some(credit) = credit {
                    outbox.limit_by_credit(a.clone(), credit);
                }
                outbox.push_stream(b.clone(), message(100), Priority::Normal);
            }
            let burst: Vec<_> = (1..=5).map(message).collect();
            let dropped: u64 = burst
                .iter()
                .map(|m| one_by_one.push_stream(a.clone(), m.clone(), Priority::Normal))
                .sum();
            assert_eq!(at_once.push_streams(&a, &burst, Priority::Normal), dropped);
            assert!(dropped > 0, "the burst overflows the queue");
            assert_eq!(
                payloads(&one_by_one.take_batch(100)),
                payloads(&at_once.take_batch(100)),
                "credit {credit:?}"
            );
        }
    }

    fn payloads(batch: &Batch) -> Vec<String> {
        batch
            .events
            .iter()
            .map(|event| match event {
                Outbound::Dropped { sid, count, .. } => format!("dropped {sid} {count}"),
                Outbound::Msg { sid, message, .. } => format!("{sid} {}", message.payload[0]),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn a_credited_subscription_gets_only_what_was_granted_and_drops_the_oldest_beyond() {
        let outbox = Outbox::new(3);
        let video = Id::Text("v".into());
        let other = Id::Text("o".into());
        outbox.limit_by_credit(video.clone(), 2);
        for n in 1..=6 {
            outbox.push_stream(video.clone(), message(n), Priority::Normal);
        }
        outbox.push_stream(other.clone(), message(9), Priority::Normal);
        // Six arrived, the bound is three: 1–3 dropped (the oldest), 4 and 5 sent on credit.
        assert_eq!(
            payloads(&outbox.take_batch(100)),
            ["dropped \"v\" 3", "\"v\" 4", "\"v\" 5", "\"o\" 9"]
        );
        assert!(outbox.take_batch(100).events.is_empty(), "no credit left");
        assert!(!outbox.grant(&other, 1), "o is not under credit control");
        assert!(outbox.grant(&video, 5));
        assert_eq!(payloads(&outbox.take_batch(100)), ["\"v\" 6"]);
        // Four credits are left over for what comes next; the queue's bound still holds
        // while the writer has not taken anything.
        for n in 10..15 {
            outbox.push_stream(video.clone(), message(n), Priority::Normal);
        }
        assert_eq!(
            payloads(&outbox.take_batch(100)),
            ["dropped \"v\" 2", "\"v\" 12", "\"v\" 13", "\"v\" 14"]
        );
        outbox.push_stream(video.clone(), message(20), Priority::Normal);
        outbox.push_stream(video.clone(), message(21), Priority::Normal);
        assert_eq!(
            payloads(&outbox.take_batch(100)),
            ["\"v\" 20"],
            "one credit left"
        );
        outbox.purge(&video);
        assert!(!outbox.grant(&video, 1), "purged with its subscription");
        assert!(outbox.take_batch(100).events.is_empty());
    }

    #[test]
    fn control_is_never_dropped_and_pending_tracks_answers() {
        let outbox = Outbox::new(1);
        for n in 0..1000u64 {
            outbox.begin_command();
            outbox.push_control(Outbound::Error {
                id: Id::from(n),
                error: GatewayError::bad_request("x"),
            });
        }
        assert_eq!(outbox.pending(), 1000);
        let batch = outbox.take_batch(600);
        assert_eq!(batch.events.len(), 600);
        outbox.written(batch.control);
        assert_eq!(outbox.pending(), 400);
        assert_eq!(outbox.take_batch(usize::MAX).control, 400);
    }

    fn sid(name: &str) -> Id {
        Id::Text(name.into())
    }

    /// What a batch shows, one word per event: `sid payload` for messages.
    fn shown(batch: &Batch) -> Vec<String> {
        batch
            .events
            .iter()
            .map(|event| match event {
                Outbound::Msg {
                    sid: Id::Text(sid),
                    message,
                    ..
                } => format!("{sid}{}", message.payload[0]),
                Outbound::Dropped {
                    sid: Id::Text(sid),
                    count,
                    ..
                } => format!("dropped {sid} {count}"),
                Outbound::Reply { id, .. } => format!("reply {id}"),
                Outbound::Ack { id } => format!("ack {id}"),
                Outbound::Pong { id } => format!("pong {id}"),
                Outbound::Error { id, .. } => format!("error {id}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn high_messages_are_written_before_normal_ones_and_normal_before_low() {
        let outbox = Outbox::new(100);
        for n in 1..=3 {
            outbox.push_stream(sid("l"), message(n), Priority::Low);
            outbox.push_stream(sid("n"), message(n), Priority::Normal);
            outbox.push_stream(sid("h"), message(n), Priority::High);
        }
        let batch = outbox.take_batch(100);
        assert_eq!(
            shown(&batch),
            ["h1", "h2", "h3", "n1", "n2", "n3", "l1", "l2", "l3"]
        );
        assert_eq!(batch.dropped, 0);
        let classes: Vec<Priority> = batch
            .events
            .iter()
            .map(|event| match event {
                Outbound::Msg { priority, .. } => *priority,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(classes[0], Priority::High, "messages carry their class");
        assert_eq!(classes[3], Priority::Normal);
        assert_eq!(classes[8], Priority::Low);
        // A batch cut short takes the higher classes first; the rest waits its turn.
        outbox.push_stream(sid("l"), message(4), Priority::Low);
        outbox.push_stream(sid("n"), message(4), Priority::Normal);
        outbox.push_stream(sid("h"), message(4), Priority::High);
        assert_eq!(shown(&outbox.take_batch(2)), ["h4", "n4"]);
        outbox.push_stream(sid("h"), message(5), Priority::High);
        assert_eq!(shown(&outbox.take_batch(2)), ["h5", "l4"]);
    }

    #[test]
    fn when_full_the_oldest_low_message_goes_first_then_the_oldest_normal() {
        let outbox = Outbox::new(4);
        let push =
            |name: &str, n: u8, priority| outbox.push_stream(sid(name), message(n), priority);
        assert_eq!(push("l", 1, Priority::Low), 0);
        assert_eq!(push("n", 1, Priority::Normal), 0);
        assert_eq!(push("l", 2, Priority::Low), 0);
        assert_eq!(push("h", 1, Priority::High), 0);
        assert_eq!(push("n", 2, Priority::Normal), 1, "l1 goes");
        assert_eq!(push("h", 2, Priority::High), 1, "l2 goes");
        assert_eq!(
            push("l", 3, Priority::Low),
            1,
            "the newest low is the only low: it goes"
        );
        assert_eq!(push("n", 3, Priority::Normal), 1, "no low left: n1 goes");
        let batch = outbox.take_batch(100);
        assert_eq!(batch.dropped, 4);
        assert_eq!(
            shown(&batch),
            ["dropped l 3", "dropped n 1", "h1", "h2", "n2", "n3"]
        );
    }

    #[test]
    fn high_messages_are_dropped_only_when_nothing_else_is_queued() {
        let outbox = Outbox::new(3);
        let push =
            |name: &str, n: u8, priority| outbox.push_stream(sid(name), message(n), priority);
        for n in 1..=3 {
            assert_eq!(push("h", n, Priority::High), 0);
        }
        assert_eq!(push("n", 1, Priority::Normal), 1, "n1 goes, not a high one");
        assert_eq!(push("l", 1, Priority::Low), 1, "l1 goes, not a high one");
        assert_eq!(
            push("h", 4, Priority::High),
            1,
            "only high left: the oldest, h1, goes"
        );
        assert_eq!(push("g", 1, Priority::High), 1, "h2 goes");
        assert_eq!(
            shown(&outbox.take_batch(100)),
            [
                "dropped n 1",
                "dropped l 1",
                "dropped h 2",
                "h3",
                "h4",
                "g1"
            ]
        );
    }

    #[test]
    fn control_is_never_dropped_whatever_the_stream_pressure() {
        let outbox = Arc::new(Outbox::new(2));
        for n in 0..50u8 {
            outbox.push_stream(sid("h"), message(n), Priority::High);
            outbox.push_stream(sid("l"), message(n), Priority::Low);
            outbox.begin_command();
            outbox.push_control(Outbound::Ack {
                id: Id::from(n as u64),
            });
            outbox.begin_command();
            outbox.replies(Priority::High).deliver(
                Id::from(1000 + n as u64),
                Err(GatewayError::bad_request("x")),
            );
        }
        let mut outbox_events = Vec::new();
        loop {
            let batch = outbox.take_batch(7);
            if batch.events.is_empty() {
                break;
            }
            outbox.written(batch.control);
            outbox_events.extend(shown(&batch));
        }
        let (answers, others): (Vec<String>, Vec<String>) = outbox_events
            .into_iter()
            .partition(|e| e.starts_with("ack") || e.starts_with("error"));
        let expected: Vec<String> = (1000..1050)
            .map(|n| format!("error {n}"))
            .chain((0..50).map(|n| format!("ack {n}")))
            .collect();
        assert_eq!(answers, expected, "every answer, high replies first");
        assert_eq!(outbox.pending(), 0);
        assert_eq!(others, ["dropped l 50", "dropped h 48", "h48", "h49"]);
    }

    #[test]
    fn a_high_priority_reply_goes_ahead_of_the_answers_already_queued() {
        let outbox = Arc::new(Outbox::new(8));
        let reply = || {
            Ok(Reply {
                data: bytes::Bytes::from_static(b"r"),
                headers: None,
            })
        };
        for _ in 0..5 {
            outbox.begin_command();
        }
        outbox.push_control(Outbound::Ack { id: Id::from(1) });
        outbox.push_control(Outbound::Pong { id: Id::from(2) });
        outbox.push_stream(sid("h"), message(1), Priority::High);
        assert!(
            outbox
                .replies(Priority::Normal)
                .deliver(Id::from(3), reply())
        );
        assert!(outbox.replies(Priority::High).deliver(Id::from(4), reply()));
        assert!(outbox.replies(Priority::High).deliver(Id::from(5), reply()));
        let batch = outbox.take_batch(100);
        assert_eq!(
            shown(&batch),
            ["reply 4", "reply 5", "ack 1", "pong 2", "reply 3", "h1"]
        );
        assert_eq!(batch.control, 5);
        outbox.written(batch.control);
        assert_eq!(outbox.pending(), 0);
        outbox.abandon();
        assert!(
            !outbox.replies(Priority::High).deliver(Id::from(6), reply()),
            "nobody reads a closed outbox"
        );
    }

    #[test]
    fn unsubscribing_purges_every_lane_and_an_idle_outbox_keeps_no_lanes() {
        let outbox = Outbox::new(8);
        outbox.push_stream(sid("h"), message(1), Priority::High);
        outbox.push_stream(sid("l"), message(1), Priority::Low);
        outbox.push_stream(sid("l"), message(2), Priority::Low);
        outbox.purge(&sid("l"));
        assert_eq!(shown(&outbox.take_batch(100)), ["h1"]);
        assert!(outbox.queues().lanes.is_some());
        outbox.queues().release_memory_if_empty();
        assert!(outbox.queues().lanes.is_none(), "freed once empty");
    }

    #[test]
    fn a_credited_subscription_is_written_in_its_class_turn() {
        let outbox = Outbox::new(8);
        outbox.limit_by_credit(sid("c"), 10);
        outbox.push_stream(sid("n"), message(1), Priority::Normal);
        outbox.push_stream(sid("c"), message(1), Priority::Low);
        outbox.push_stream(sid("l"), message(1), Priority::Low);
        outbox.push_stream(sid("h"), message(1), Priority::High);
        assert_eq!(shown(&outbox.take_batch(100)), ["h1", "n1", "c1", "l1"]);
    }

    #[test]
    fn priority_lanes_do_not_make_an_outbox_bigger() {
        // Memory per idle connection is measured (artifacts/ws-idle): the lanes live behind
        // one pointer that is `None` unless a high or low class has something queued, and the
        // limit moved into the queues' padding to make room for it. 208 bytes on x86-64, as
        // before the lanes.
        assert!(size_of::<Outbox>() <= 208, "{} bytes", size_of::<Outbox>());
    }
}
