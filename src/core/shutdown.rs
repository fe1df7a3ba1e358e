//! Graceful shutdown as three signals: `stop` (stop accepting and reading; answer what is in
//! flight), `drain_expired` (the drain time is over; whatever is still waiting gets
//! `UNAVAILABLE` now) and `cut` (the drain and its margin are over: a connection still open,
//! say a client that stopped answering HTTP/2's goodbye, is closed, so that its disconnect
//! record is written before the audit log closes). One small type so every front-end follows
//! the same sequence.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    /// `stop`, readable without a lock (front-ends ask between the commands of one read).
    stopping: Arc<AtomicBool>,
    drain_expired: CancellationToken,
    cut: CancellationToken,
}

impl Shutdown {
    /// Starts shutdown: stop now, expire the drain after `drain`.
    pub fn begin(&self, drain: Duration) {
        if self.stop.is_cancelled() {
            return;
        }
        self.stopping.store(true, Ordering::Release);
        self.stop.cancel();
        let expired = self.drain_expired.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            expired.cancel();
        });
    }

    /// Ends the drain now (a second signal): whatever still waits gets `UNAVAILABLE`.
    pub fn expire_drain_now(&self) {
        self.drain_expired.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    pub async fn drain_expired(&self) {
        self.drain_expired.cancelled().await
    }

    /// Closes the connections still open after the drain (see the top of the file).
    pub fn cut_remaining(&self) {
        self.cut.cancel();
    }

    /// Resolves when the connections still open are to be closed.
    pub async fn cut(&self) {
        self.cut.cancelled().await
    }

    /// The same signal as `cut`, to keep where a whole `Shutdown` would be too big (one per
    /// connection).
    pub fn cut_token(&self) -> CancellationToken {
        self.cut.clone()
    }
}
