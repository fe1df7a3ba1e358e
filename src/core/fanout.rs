//! Shared subscriptions: one NATS subscription per distinct (subject pattern, queue group) on
//! this gateway, fanned out to every client subscription on it. NATS sends the gateway one
//! copy of each message, whatever the number of local subscribers; each one still has its own
//! queue, credit and `dropped` counts in its connection's sink, and the one `Delivery` is
//! shared by all of them.
//!
//! A topic's NATS subscription is made on first interest (every client subscribing while it is
//! being made waits for the same confirmation) and removed on last. A queue-group topic hands
//! each message to one local member in turn, so the group keeps its meaning across gateways.
//! Messages the NATS client drops because a topic's dispatcher fell behind are counted per
//! topic (from the client's slow-consumer events) and reported to the members as `dropped`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::caller::{Caller, SubscriptionSlot};
use crate::protocol::{Delivery, GatewayError, Id, Priority, Subject};
use crate::telemetry::metrics::Metrics;

/// Where a client subscription's messages go: its connection's outbox.
pub trait DeliverySink: Send + Sync {
    /// Queues messages for subscription `sid` of class `priority`, in order; returns how many
    /// queued ones were dropped to make room (for the metric; the client is told by the sink).
    fn deliver(&self, sid: &Id, messages: &[Arc<Delivery>], priority: Priority) -> u64;
    /// `count` messages for `sid` were lost before they reached the gateway's queues; with
    /// `gap`, an unknown number more (its NATS connection was cut).
    fn lost(&self, sid: &Id, count: u64, gap: bool);
    /// The gateway ended subscription `sid` (a reloaded policy took it away).
    fn ended(&self, sid: &Id, error: GatewayError);
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct TopicKey {
    pub subject: Subject,
    pub queue: Option<Arc<str>>,
}

/// Every shared subscription of the gateway.
pub(super) struct Fanout {
    metrics: Arc<Metrics>,
    topics: Mutex<HashMap<TopicKey, Arc<Topic>>>,
    /// The topic each live NATS subscription carries, by (pool connection index, NATS sid):
    /// where the NATS client's slow-consumer events are counted.
    by_nats_sid: Mutex<HashMap<(usize, u64), Weak<Topic>>>,
    next_member: AtomicU64,
}

pub(super) struct Topic {
    pub key: TopicKey,
    members: Mutex<Members>,
    /// Whether the NATS subscription is made; `phase_changed` wakes the members waiting for
    /// it. (A `watch` channel did the same for 376 bytes more per topic.)
    phase: Mutex<Phase>,
    phase_changed: Notify,
    /// Messages the NATS client dropped for this topic, not yet reported to its members.
    lost: AtomicU64,
    /// The NATS connection was cut since the members were last told: what was published
    /// until it came back is lost, in unknown number.
    gap: AtomicBool,
    lost_signal: Notify,
    dispatcher: Mutex<Option<AbortHandle>>,
    nats_sid: Mutex<Option<(usize, u64)>>,
}

#[derive(Clone)]
pub(super) enum Phase {
    Opening,
    Live,
    Failed(GatewayError),
}

#[derive(Default)]
struct Members {
    list: Vec<Member>,
    /// The next member a queue-group topic hands a message to.
    turn: usize,
}

pub(super) struct Member {
    pub key: u64,
    pub sid: Id,
    pub priority: Priority,
    pub caller: Caller,
    pub sink: Arc<dyn DeliverySink>,
    /// Deliveries are checked against the caller's permissions (see `subscribe_decision`).
    pub filtered: bool,
    pub active: Arc<AtomicBool>,
    pub _slot: SubscriptionSlot,
}

/// Where a message the NATS client dropped belonged.
pub enum Loss {
    /// A topic whose members had been told of every earlier loss.
    FirstOfBurst(Subject),
    /// A topic whose members have not yet been told of an earlier loss.
    MoreOfBurst,
    /// Not a shared subscription (the connection's reply subscription).
    NotATopic,
}

/// What a policy recheck decides for one member.
pub(super) enum Recheck {
    Keep {
        caller: Option<Caller>,
        filtered: bool,
    },
    End(GatewayError),
}

/// A client's hold on a topic. Dropping it leaves the topic (and unsubscribes from NATS when
/// it was the last member).
pub struct Subscription {
    fanout: Arc<Fanout>,
    topic: Arc<Topic>,
    key: u64,
    active: Arc<AtomicBool>,
}

impl Subscription {
    /// False once the gateway ended the subscription itself (see `DeliverySink::ended`).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.fanout.leave(&self.topic, self.key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind these locks: still consistent after a panic elsewhere.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Fanout {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Fanout {
            metrics,
            topics: Mutex::default(),
            by_nats_sid: Mutex::default(),
            next_member: AtomicU64::new(0),
        }
    }

    pub fn next_member_key(&self) -> u64 {
        self.next_member.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `member` to the topic for `key`, creating it when it is new. Returns the topic
    /// and whether this call created it (then the caller starts its dispatcher).
    pub fn join(&self, key: TopicKey, member: Member) -> (Arc<Topic>, bool) {
        let mut topics = lock(&self.topics);
        let mut created = false;
        let topic = match topics.get(&key) {
            Some(topic) => topic.clone(),
            None => {
                created = true;
                self.metrics.nats_subscriptions.increment(1.0);
                // A client's subject is a slice of the message it came in, which shares the
                // buffer of the read that brought it (up to `ws_read_buffer_bytes`, with
                // whatever else that read brought): kept for the topic's life, it would keep
                // that whole buffer.
                let key = TopicKey {
                    subject: key.subject.detached(),
                    queue: key.queue,
                };
                let topic = Arc::new(Topic {
                    key: key.clone(),
                    members: Mutex::default(),
                    phase: Mutex::new(Phase::Opening),
                    phase_changed: Notify::new(),
                    lost: AtomicU64::new(0),
                    gap: AtomicBool::new(false),
                    lost_signal: Notify::new(),
                    dispatcher: Mutex::new(None),
                    nats_sid: Mutex::new(None),
                });
                topics.insert(key, topic.clone());
                topic
            }
        };
        self.metrics.subscription_opened(member.caller.frontend());
        let mut members = lock(&topic.members);
        if members.list.len() == members.list.capacity() {
            // Grown by doubling from one: most topics have one member (a subject of a client's
            // own), and a Vec's first push would make room for four (88 bytes each).
            let len = members.list.len();
            members.list.reserve_exact(len.max(1));
        }
        members.list.push(member);
        drop(members);
        (topic, created)
    }

    pub fn handle(
        self: &Arc<Self>,
        topic: Arc<Topic>,
        key: u64,
        active: Arc<AtomicBool>,
    ) -> Subscription {
        Subscription {
            fanout: self.clone(),
            topic,
            key,
            active,
        }
    }

    /// Removes member `key` (unless the gateway ended it already); the last member out
    /// closes the topic.
    fn leave(&self, topic: &Arc<Topic>, key: u64) {
        let mut topics = lock(&self.topics);
        let mut members = lock(&topic.members);
        let Some(index) = members.list.iter().position(|m| m.key == key) else {
            return;
        };
        let member = members.list.swap_remove(index);
        self.metrics.subscription_closed(member.caller.frontend());
        if members.list.is_empty() {
            drop(members);
            self.close(&mut topics, topic);
        }
    }

    /// Forgets a topic that has no member left (or could not be opened) and stops its
    /// dispatcher, which unsubscribes from NATS.
    fn close(&self, topics: &mut HashMap<TopicKey, Arc<Topic>>, topic: &Arc<Topic>) {
        if topics
            .get(&topic.key)
            .is_some_and(|current| Arc::ptr_eq(current, topic))
        {
            topics.remove(&topic.key);
            self.metrics.nats_subscriptions.decrement(1.0);
        }
        if let Some(dispatcher) = lock(&topic.dispatcher).take() {
            dispatcher.abort();
        }
        self.forget_nats_sid(topic);
    }

    /// The topic's NATS subscription could not be made: every member waiting is told.
    pub fn fail(&self, topic: &Arc<Topic>, error: GatewayError) {
        let mut topics = lock(&self.topics);
        self.close(&mut topics, topic);
        topic.set_phase(Phase::Failed(error));
    }

    pub fn set_dispatcher(&self, topic: &Topic, dispatcher: AbortHandle) {
        *lock(&topic.dispatcher) = Some(dispatcher);
    }

    /// Records which NATS subscription carries `topic` now.
    pub fn bind(&self, topic: &Arc<Topic>, nats_sid: Option<(usize, u64)>) {
        self.forget_nats_sid(topic);
        if let Some(nats_sid) = nats_sid {
            lock(&self.by_nats_sid).insert(nats_sid, Arc::downgrade(topic));
        }
        *lock(&topic.nats_sid) = nats_sid;
    }

    fn forget_nats_sid(&self, topic: &Topic) {
        if let Some(old) = lock(&topic.nats_sid).take() {
            lock(&self.by_nats_sid).remove(&old);
        }
    }

    /// The NATS client on pool connection `connection` dropped `count` messages for its
    /// subscription `nats_sid`: counted on its topic. Says whether it is worth a log line.
    pub fn slow_consumer(&self, connection: usize, nats_sid: u64, count: u64) -> Loss {
        let topic = lock(&self.by_nats_sid)
            .get(&(connection, nats_sid))
            .and_then(Weak::upgrade);
        let Some(topic) = topic else {
            return Loss::NotATopic;
        };
        let before = topic.lost.fetch_add(count, Ordering::AcqRel);
        topic.lost_signal.notify_one();
        match before {
            0 => Loss::FirstOfBurst(topic.key.subject.clone()),
            _ => Loss::MoreOfBurst,
        }
    }

    /// Pool connection `connection` lost its server: every topic on it has a gap.
    pub fn disconnected(&self, connection: usize) {
        let topics: Vec<Arc<Topic>> = lock(&self.by_nats_sid)
            .iter()
            .filter(|((on, _), _)| *on == connection)
            .filter_map(|(_, topic)| topic.upgrade())
            .collect();
        for topic in topics {
            self.metrics.nats_gaps.increment(1);
            topic.interrupted();
        }
    }

    /// Every topic, for a policy recheck.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        lock(&self.topics).values().cloned().collect()
    }

    /// Applies `decide` to every member of `topic`, ending the members it refuses.
    pub fn recheck(&self, topic: &Arc<Topic>, decide: impl Fn(&Member) -> Recheck) {
        let mut topics = lock(&self.topics);
        let mut members = lock(&topic.members);
        let mut index = 0;
        while index < members.list.len() {
            let member = &mut members.list[index];
            match decide(member) {
                Recheck::Keep { caller, filtered } => {
                    if let Some(caller) = caller {
                        member.caller = caller;
                    }
                    member.filtered = filtered;
                    index += 1;
                }
                Recheck::End(error) => {
                    let Member {
                        sid,
                        caller,
                        sink,
                        active,
                        _slot,
                        ..
                    } = members.list.swap_remove(index);
                    active.store(false, Ordering::Release);
                    // The place under max_subscriptions_per_connection is free before the
                    // client hears of the end: a subscribe sent on hearing it must fit.
                    drop(_slot);
                    sink.ended(&sid, error);
                    self.metrics.subscription_closed(caller.frontend());
                }
            }
        }
        if members.list.is_empty() {
            drop(members);
            self.close(&mut topics, topic);
        }
    }
}

impl Topic {
    /// Waits until the topic's NATS subscription is confirmed (or failed).
    pub async fn opened(&self) -> Result<(), GatewayError> {
        loop {
            // Registered before the phase is read, so a change in between still wakes it.
            let changed = self.phase_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match &*lock(&self.phase) {
                Phase::Opening => {}
                Phase::Live => return Ok(()),
                Phase::Failed(error) => return Err(error.clone()),
            }
            changed.await;
        }
    }

    pub fn set_live(&self) {
        self.set_phase(Phase::Live);
    }

    fn set_phase(&self, phase: Phase) {
        *lock(&self.phase) = phase;
        self.phase_changed.notify_waiters();
    }

    /// The topic's NATS subscription was cut off for a while (its connection lost the server
    /// or was replaced): the members are told there is a gap.
    pub fn interrupted(&self) {
        self.gap.store(true, Ordering::Release);
        self.lost_signal.notify_one();
    }

    /// Signalled when the NATS client dropped messages for this topic.
    pub fn losses(&self) -> &Notify {
        &self.lost_signal
    }

    pub fn member_count(&self) -> usize {
        lock(&self.members).list.len()
    }

    /// Hands one message (or one batch) to the members that may see it: every member, or for
    /// a queue group the next one in turn. `offer` returns false when the member may not see
    /// it.
    pub fn fan_out(&self, mut offer: impl FnMut(&Member) -> bool) {
        let mut members = lock(&self.members);
        if self.key.queue.is_none() {
            for member in &members.list {
                offer(member);
            }
            return;
        }
        let count = members.list.len();
        for step in 0..count {
            let index = (members.turn + step) % count;
            if offer(&members.list[index]) {
                members.turn = (index + 1) % count;
                return;
            }
        }
    }

    /// Tells the members about the messages lost since the last report: each member of a
    /// plain topic lost them all; in a queue group they would have gone one each to the
    /// members in turn. A gap (an unknown number lost) concerns every member.
    pub fn report_losses(&self) {
        let gap = self.gap.swap(false, Ordering::AcqRel);
        let lost = self.lost.swap(0, Ordering::AcqRel);
        if lost == 0 && !gap {
            return;
        }
        let mut members = lock(&self.members);
        let count = members.list.len() as u64;
        if count == 0 {
            return;
        }
        if self.key.queue.is_none() {
            for member in &members.list {
                member.sink.lost(&member.sid, lost, gap);
            }
            return;
        }
        let turn = members.turn as u64;
        for (index, member) in members.list.iter().enumerate() {
            // Member `index` is `(index - turn) mod count` places from the next turn.
            let place = (index as u64 + count - turn % count) % count;
            let share = lost / count + u64::from(place < lost % count);
            if share > 0 || gap {
                member.sink.lost(&member.sid, share, gap);
            }
        }
        members.turn = ((turn + lost) % count) as usize;
    }
}
