//! One client's outbound queue, shared by every front-end. Two traffic classes:
//! - control (replies, errors, acks, pongs, drop notices) is never dropped. It is bounded
//!   because the reader takes a new command only while `pending` (commands accepted whose
//!   answer is not yet written) is under the connection's in-flight limit.
//! - stream (subscription messages) is bounded by `stream_limit`; when full, the oldest
//!   message is dropped and counted per subscription, and the client is told with a
//!   `dropped` notice ahead of the next messages.
//! - A subscription opened with credit (flow control for video-like streams) keeps its
//!   messages in a queue of its own, bounded and dropping the oldest the same way, and the
//!   writer takes only as many of them as the client has granted.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::core::{DeliverySink, Reply, ReplySink};
use crate::protocol::{Delivery, GatewayError, Id, Outbound};

#[derive(Default)]
struct Queues {
    control: VecDeque<Outbound>,
    stream: VecDeque<(Id, Arc<Delivery>)>,
    /// Drops not yet reported, per subscription id, in order of first drop.
    dropped: Vec<(Id, u64)>,
    /// Subscriptions under credit flow control (few per connection: a list beats a map).
    credited: Vec<Credited>,
    closed: bool,
}

struct Credited {
    sid: Id,
    /// Messages the client still accepts.
    credit: u64,
    /// Messages waiting for credit, oldest first.
    held: VecDeque<Arc<Delivery>>,
}

impl Queues {
    fn count_drop(&mut self, sid: Id) {
        self.count_drops(sid, 1);
    }

    fn count_drops(&mut self, sid: Id, n: u64) {
        match self.dropped.iter_mut().find(|(s, _)| *s == sid) {
            Some((_, count)) => *count += n,
            None => self.dropped.push((sid, n)),
        }
    }

    fn release_memory_if_empty(&mut self) {
        if self.control.is_empty() && self.control.capacity() > 0 {
            self.control = VecDeque::new();
        }
        if self.stream.is_empty() && self.stream.capacity() > 0 {
            self.stream = VecDeque::new();
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
    stream_limit: usize,
    pending: AtomicUsize,
    /// Wakes the writer when there is something to write or the outbox closed.
    writable: Notify,
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
            queues: Mutex::new(Queues::default()),
            stream_limit,
            pending: AtomicUsize::new(0),
            writable: Notify::new(),
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
        let mut queues = self.queues();
        if queues.closed {
            return false;
        }
        queues.control.push_back(event);
        drop(queues);
        self.writable.notify_one();
        true
    }

    /// Queues a subscription message, dropping the oldest one when the stream class is full.
    /// Returns how many were dropped (0 or 1), for the metric.
    pub fn push_stream(&self, sid: Id, message: Arc<Delivery>) -> u64 {
        let mut queues = self.queues();
        if queues.closed {
            return 0;
        }
        let mut dropped = 0;
        if let Some(credited) = queues.credited.iter_mut().find(|c| c.sid == sid) {
            if credited.held.len() >= self.stream_limit {
                credited.held.pop_front();
                dropped = 1;
            }
            credited.held.push_back(message);
            let sendable = credited.credit > 0;
            if dropped > 0 {
                queues.count_drop(sid);
            }
            drop(queues);
            if sendable || dropped > 0 {
                self.writable.notify_one();
            }
            return dropped;
        }
        if queues.stream.len() >= self.stream_limit
            && let Some((old_sid, _)) = queues.stream.pop_front()
        {
            dropped = 1;
            queues.count_drop(old_sid);
        }
        queues.stream.push_back((sid, message));
        drop(queues);
        self.writable.notify_one();
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
            self.writable.notify_one();
        }
        true
    }

    /// Forgets queued messages of a subscription that was closed.
    pub fn purge(&self, sid: &Id) {
        let mut queues = self.queues();
        queues.stream.retain(|(s, _)| s != sid);
        queues.dropped.retain(|(s, _)| s != sid);
        queues.credited.retain(|c| c.sid != *sid);
    }

    /// Takes up to `max` events: control first, then drop notices, then stream messages.
    pub fn take_batch(&self, max: usize) -> Batch {
        let mut queues = self.queues();
        let mut batch = Batch {
            closed: queues.closed,
            ..Batch::default()
        };
        while batch.events.len() < max {
            let Some(event) = queues.control.pop_front() else {
                break;
            };
            batch.events.push(event);
            batch.control += 1;
        }
        for (sid, count) in queues.dropped.drain(..) {
            batch.dropped += count;
            batch.events.push(Outbound::Dropped { sid, count });
        }
        // Credited subscriptions first: their credit bounds them, so they cannot starve the
        // others.
        for credited in &mut queues.credited {
            while batch.events.len() < max && credited.credit > 0 {
                let Some(message) = credited.held.pop_front() else {
                    break;
                };
                credited.credit -= 1;
                batch.events.push(Outbound::Msg {
                    sid: credited.sid.clone(),
                    message,
                });
            }
        }
        while batch.events.len() < max {
            let Some((sid, message)) = queues.stream.pop_front() else {
                break;
            };
            batch.events.push(Outbound::Msg { sid, message });
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
        let answers = queues.control.len();
        queues.control.clear();
        answers
    }

    /// No more events will come: the writer flushes what is queued, then ends.
    pub fn close(&self) {
        self.queues().closed = true;
        self.writable.notify_one();
    }

    /// The writer's next batch: waits until there is something to write, and returns `None`
    /// once the outbox is closed and everything queued was taken.
    pub async fn next_batch(&self, max: usize) -> Option<Batch> {
        loop {
            let batch = self.take_batch(max);
            if !batch.events.is_empty() {
                return Some(batch);
            }
            if batch.closed {
                return None;
            }
            // Nothing to write: an idle connection keeps no queue memory (an `Outbound` is
            // 208 bytes, and the queues keep what a burst grew them to).
            self.queues().release_memory_if_empty();
            self.writable.notified().await;
        }
    }

    pub async fn wait_room(&self) {
        self.room.notified().await
    }
}

/// The core hands subscription messages straight to the outbox.
impl DeliverySink for Outbox {
    fn deliver(&self, sid: &Id, message: Arc<Delivery>) -> u64 {
        self.push_stream(sid.clone(), message)
    }

    fn lost(&self, sid: &Id, count: u64) {
        let mut queues = self.queues();
        if queues.closed {
            return;
        }
        queues.count_drops(sid.clone(), count);
        drop(queues);
        self.writable.notify_one();
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

/// The core delivers request answers straight into the outbox.
impl ReplySink for Outbox {
    fn deliver(&self, id: Id, result: Result<Reply, GatewayError>) -> bool {
        self.push_control(match result {
            Ok(reply) => Outbound::Reply {
                id,
                data: reply.data,
                headers: reply.headers,
            },
            Err(error) => Outbound::Error { id, error },
        })
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
        })
    }

    #[test]
    fn stream_drops_oldest_and_reports_counts_per_subscription() {
        let outbox = Outbox::new(2);
        let a = Id::Text("a".into());
        let b = Id::Text("b".into());
        assert_eq!(outbox.push_stream(a.clone(), message(1)), 0);
        assert_eq!(outbox.push_stream(b.clone(), message(2)), 0);
        assert_eq!(outbox.push_stream(a.clone(), message(3)), 1);
        assert_eq!(outbox.push_stream(a.clone(), message(4)), 1);
        outbox.push_control(Outbound::Ack { id: Id::from(9) });
        let batch = outbox.take_batch(100);
        assert_eq!(batch.control, 1);
        assert_eq!(batch.dropped, 2);
        let kinds: Vec<String> = batch
            .events
            .iter()
            .map(|event| match event {
                Outbound::Ack { .. } => "ack".into(),
                Outbound::Dropped { sid, count } => format!("dropped {sid} {count}"),
                Outbound::Msg { sid, message } => format!("msg {sid} {}", message.payload[0]),
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

    fn payloads(batch: &Batch) -> Vec<String> {
        batch
            .events
            .iter()
            .map(|event| match event {
                Outbound::Dropped { sid, count } => format!("dropped {sid} {count}"),
                Outbound::Msg { sid, message } => format!("{sid} {}", message.payload[0]),
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
            outbox.push_stream(video.clone(), message(n));
        }
        outbox.push_stream(other.clone(), message(9));
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
            outbox.push_stream(video.clone(), message(n));
        }
        assert_eq!(
            payloads(&outbox.take_batch(100)),
            ["dropped \"v\" 2", "\"v\" 12", "\"v\" 13", "\"v\" 14"]
        );
        outbox.push_stream(video.clone(), message(20));
        outbox.push_stream(video.clone(), message(21));
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
}
