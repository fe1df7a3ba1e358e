//! The response side of a streaming call. The call's answers and messages wait in its
//! `Outbox` (the same bounded queue, classes and drop policy as every other front-end); a task
//! moves them into a small channel that tonic drains as fast as the client reads. A send into
//! that channel that waits longer than the stall time means the client stopped reading (the
//! connection lifecycle's stall rule): the stream then ends with RESOURCE_EXHAUSTED. The status a stream ends with comes after the
//! last item, once the client has read what was sent before it.

use futures_util::Stream;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Status;

use crate::frontend::lifecycle::{Broken, WriteRules};
use crate::frontend::outbox::Outbox;
use crate::protocol::Outbound;

/// Items between the outbox and tonic: enough to keep HTTP/2 busy, small enough that the
/// outbox (whose drop policy applies) holds the backlog.
const CHANNEL: usize = 64;
/// Events taken from the outbox per wakeup.
const MAX_BATCH_EVENTS: usize = 256;

type Slot = Arc<Mutex<Option<Status>>>;

/// Drop notices waiting for a stream's next message: a gRPC stream has no message of its own
/// for them, so `dropped` and `gap` ride on the message that follows the loss.
#[derive(Debug, Default)]
pub struct CarriedDrops {
    count: u64,
    gap: bool,
}

impl CarriedDrops {
    pub fn add(&mut self, count: u64, gap: bool) {
        self.count += count;
        self.gap |= gap;
    }

    /// The notices so far, for the message being sent; none are left.
    pub fn take(&mut self) -> (u64, bool) {
        (
            std::mem::take(&mut self.count),
            std::mem::take(&mut self.gap),
        )
    }
}

/// The stream tonic sends: the items, then the final status if there is one.
pub struct ResponseStream<T> {
    items: mpsc::Receiver<T>,
    end: Slot,
}

impl<T> Stream for ResponseStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.items.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) => {
                let end = self.end.lock().unwrap_or_else(|p| p.into_inner()).take();
                Poll::Ready(end.map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The task's end of a response stream.
pub struct Sender<T> {
    items: mpsc::Sender<T>,
    end: Slot,
}

pub fn channel<T>() -> (Sender<T>, ResponseStream<T>) {
    let (items, receiver) = mpsc::channel(CHANNEL);
    let end = Slot::default();
    (
        Sender {
            items,
            end: end.clone(),
        },
        ResponseStream {
            items: receiver,
            end,
        },
    )
}

/// Why the outbox stopped being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The outbox was closed and everything in it was sent.
    Done,
    /// The client cancelled the call (or the connection went away), or stopped reading.
    Broken(Broken),
}

impl<T> Sender<T> {
    /// Resolves when the client cancelled the call.
    pub async fn closed(&self) {
        self.items.closed().await
    }

    /// Ends the stream: with `status` after the items already sent, or OK when `None`.
    pub fn finish(self, status: Option<Status>) {
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    async fn send(&self, item: T, rules: &WriteRules) -> Result<(), Broken> {
        let item = match self.items.try_send(item) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Broken::Gone),
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        // The timer only starts when the client is behind.
        rules.send(self.items.send(item)).await
    }

    /// Moves the outbox into the stream until it is closed and empty, the client goes, or the
    /// client stops reading. `convert` turns each event into an item (or into nothing). When
    /// the client is gone, the outbox is abandoned and the answers lost with it are counted.
    pub async fn write_outbox(
        &self,
        outbox: &Outbox,
        rules: &WriteRules,
        mut convert: impl FnMut(Outbound) -> Option<T>,
    ) -> Ended {
        loop {
            let batch = tokio::select! {
                batch = outbox.next_batch(MAX_BATCH_EVENTS) => batch,
                _ = self.closed() => {
                    rules.lose(outbox, 0);
                    return Ended::Broken(Broken::Gone);
                }
            };
            let Some(batch) = batch else {
                return Ended::Done;
            };
            // Control events come first in a batch: those from `index` on were not sent.
            for (index, event) in batch.events.into_iter().enumerate() {
                if let Some(item) = convert(event)
                    && let Err(broken) = self.send(item, rules).await
                {
                    rules.lose(outbox, batch.control.saturating_sub(index));
                    return Ended::Broken(broken);
                }
            }
            outbox.written(batch.control);
        }
    }
}
