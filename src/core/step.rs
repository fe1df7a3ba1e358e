//! `Step`: an operation that finished at once, or the rest of it, which has to wait. Requests
//! and publishes finish at once in the common case (the audit queue and the NATS client's
//! queue have room): no future is built, moved and boxed per message for them. Only one that
//! has to wait for room becomes a boxed future, which the caller awaits before its next command
//! (so a client's commands still reach NATS in the order it sent them).

use std::future::Future;
use std::pin::Pin;

/// The rest of an operation that waits for room.
pub type Later<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[must_use = "a `Later` step does nothing until it is awaited"]
pub enum Step<'a, T> {
    Done(T),
    Later(Later<'a, T>),
}

impl<T> Step<'_, T> {
    /// The operation's outcome, waiting for the rest of it if there is one.
    pub async fn finish(self) -> T {
        match self {
            Step::Done(outcome) => outcome,
            Step::Later(rest) => rest.await,
        }
    }
}
