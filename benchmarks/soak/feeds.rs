//! The subscription feeds: subscribers that count every numbered message (gaps, duplicates and
//! the `dropped` notices that announced them, per subscriber, through `SeqTracker`) and the
//! WebSocket publisher that numbers the messages of the WebSocket and gRPC feeds. A subscriber
//! whose connection or subscription ends subscribes again on a new connection, keeping its
//! count, so messages lost in between show as a gap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ipc_gateway::client::SubscriptionEvent;
use ipc_gateway::frontend::grpc::pb;
use ipc_gateway::protocol::Frontend;
use tokio::sync::oneshot;

use crate::links::{Dial, Link, authorize};
use crate::stats::{FEED_GRPC, FEED_WS, SeqTracker, Stats, outcome_of};

/// A message's sequence number: its first 8 bytes, big-endian.
fn seq_of(data: &[u8]) -> Option<u64> {
    data.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// How long a subscriber waits before subscribing again, and how often at most.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(200);
const MAX_ATTEMPTS: u32 = 10_000;

/// One subscriber over the Unix socket or the WebSocket (`dial`), on `subject`, counted into
/// feed `feed`. `ready` is told once the first subscription is acknowledged.
pub async fn gateway_subscriber(
    dial: Dial,
    subject: &'static str,
    feed: usize,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    ready: oneshot::Sender<()>,
) {
    let front = dial.frontend();
    let mut ready = Some(ready);
    let mut tracker = SeqTracker::default();
    stats.feeds[feed]
        .subscribers
        .fetch_add(1, Ordering::Relaxed);
    for attempt in 0..MAX_ATTEMPTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if attempt > 0 {
            stats.feeds[feed]
                .resubscribes
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
        let Ok(link) = dial.connect().await else {
            continue;
        };
        stats.record_op(front, "connect", "ok");
        let Some(client) = link.client() else {
            return;
        };
        let subscribed = client.subscribe(subject, None).await;
        if let Some(outcome) = outcome_of(&subscribed) {
            stats.record_op(front, "subscribe", outcome);
        }
        let Ok(mut subscription) = subscribed else {
            count_stray(&stats, front, &link);
            continue;
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        while !stop.load(Ordering::Relaxed) {
            let event =
                match tokio::time::timeout(Duration::from_millis(250), subscription.events.recv())
                    .await
                {
                    Err(_) => continue,
                    Ok(None) => break,
                    Ok(Some(event)) => event,
                };
            match event {
                SubscriptionEvent::Message { data, .. } => {
                    if let Some(seq) = seq_of(&data) {
                        tracker.message(&stats, feed, seq);
                    }
                }
                SubscriptionEvent::Dropped { count, gap } => {
                    tracker.dropped(&stats, feed, count, gap);
                }
            }
        }
        count_stray(&stats, front, &link);
    }
}

fn count_stray(stats: &Stats, front: Frontend, link: &Link) {
    stats.fronts[crate::stats::front_index(front)]
        .stray_answers
        .fetch_add(link.stray_answers(), Ordering::Relaxed);
}

/// One gRPC Subscribe stream on `subject` (bearer `token`), counted into the gRPC feed; each
/// message's `dropped` and `gap` fields announce what was lost before it.
pub async fn grpc_subscriber(
    port: u16,
    token: String,
    subject: &'static str,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    ready: oneshot::Sender<()>,
) {
    let dial = Dial::Grpc { port, token };
    let mut ready = Some(ready);
    let mut tracker = SeqTracker::default();
    let feed = &stats.feeds[FEED_GRPC];
    feed.subscribers.fetch_add(1, Ordering::Relaxed);
    for attempt in 0..MAX_ATTEMPTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if attempt > 0 {
            feed.resubscribes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
        let Ok(Link::Grpc(mut client, bearer)) = dial.connect().await else {
            continue;
        };
        // One channel, one HTTP/2 connection: the gateway records it as a connection.
        stats.record_op(Frontend::Grpc, "connect", "ok");
        let mut request = tonic::Request::new(pb::SubscribeRequest {
            subject: subject.into(),
            ..Default::default()
        });
        authorize(request.metadata_mut(), &bearer);
        let mut stream = match client.subscribe(request).await {
            Ok(response) => {
                stats.record_op(Frontend::Grpc, "subscribe", "ok");
                response.into_inner()
            }
            Err(status) => {
                let error = crate::links::status_error(&status);
                if let Some(outcome) = outcome_of::<()>(&Err(error)) {
                    stats.record_op(Frontend::Grpc, "subscribe", outcome);
                }
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        while !stop.load(Ordering::Relaxed) {
            let message =
                match tokio::time::timeout(Duration::from_millis(250), stream.message()).await {
                    Err(_) => continue,
                    Ok(Ok(Some(message))) => message,
                    Ok(_) => break,
                };
            if message.dropped > 0 || message.gap {
                tracker.dropped(&stats, FEED_GRPC, message.dropped, message.gap);
            }
            if let Some(seq) = seq_of(&message.payload) {
                tracker.message(&stats, FEED_GRPC, seq);
            }
        }
    }
}

/// Publishes numbered messages on `subject` through the gateway's WebSocket at `rate` per
/// second, each acknowledged; a refused publish is sent again with the same number, so a
/// number the subscribers never see was accepted and lost.
pub async fn ws_publisher(
    dial: Dial,
    subject: &'static str,
    rate: f64,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    if rate <= 0.0 {
        return;
    }
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let filler = [b'w'; 56];
    let mut seq = 1u64;
    let mut link: Option<Link> = None;
    while !stop.load(Ordering::Relaxed) && seq < u64::MAX / 2 {
        ticks.tick().await;
        if link.is_none() {
            link = dial.connect().await.ok();
            if link.is_some() {
                stats.record_op(Frontend::Ws, "connect", "ok");
            }
        }
        let Some(client) = link.as_ref().and_then(Link::client) else {
            continue;
        };
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&seq.to_be_bytes());
        data.extend_from_slice(&filler);
        let published = client.publish(subject, &data).await;
        if let Some(outcome) = outcome_of(&published) {
            stats.record_op(Frontend::Ws, "publish", outcome);
        }
        let fed = [&stats.feeds[FEED_WS], &stats.feeds[FEED_GRPC]];
        match published {
            Ok(()) => {
                seq += 1;
                fed.iter()
                    .for_each(|f| _ = f.published.fetch_add(1, Ordering::Relaxed));
            }
            Err(error) => {
                fed.iter()
                    .for_each(|f| _ = f.publish_failed.fetch_add(1, Ordering::Relaxed));
                // The connection is gone (no gateway code): a new one at the next tick.
                if error.code().is_none()
                    && let Some(old) = link.take()
                {
                    count_stray(&stats, Frontend::Ws, &old);
                }
            }
        }
    }
    if let Some(old) = link {
        count_stray(&stats, Frontend::Ws, &old);
    }
}
