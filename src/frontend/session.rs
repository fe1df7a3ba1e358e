//! What one client connection asks of the core, whatever its wire: it turns decoded envelopes
//! into core calls, starts the client's requests (pipelined; the core puts each answer into
//! the client's `Outbox` as it comes, in any order), keeps its subscriptions, and answers
//! everything else itself. A front-end only reads its wire into `Decoded` items and writes
//! the outbox back out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::task::AbortHandle;

use crate::core::{Caller, Gateway, Subscription, SubscriptionEvent};
use crate::protocol::{
    Decoded, Envelope, ErrorCode, Frontend, GatewayError, Id, Op, Outbound, Subject,
};

use super::outbox::Outbox;

/// Whether the connection can go on after an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The stream cannot be resynchronised: answer what is in flight, then close.
    Close,
}

pub struct Session {
    gateway: Gateway,
    /// The connection as the core knows it (a gRPC connection's calls share one).
    caller: Caller,
    frontend: Frontend,
    outbox: Arc<Outbox>,
    subscriptions: HashMap<Id, AbortHandle>,
    /// Subscriptions the gateway ended itself (a reloaded policy took them away) and not yet
    /// forgotten here: their pumps count them.
    revoked: Arc<AtomicUsize>,
}

impl Session {
    pub fn new(gateway: Gateway, caller: Caller, outbox: Arc<Outbox>) -> Self {
        Session {
            frontend: caller.frontend(),
            caller,
            gateway,
            outbox,
            subscriptions: HashMap::new(),
            revoked: Arc::default(),
        }
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Whether some command (a request in flight, or an answer not yet written) is still
    /// owed an answer on the wire.
    pub fn has_unanswered(&self) -> bool {
        self.outbox.pending() > 0
    }

    pub fn has_subscriptions(&mut self) -> bool {
        self.forget_revoked();
        !self.subscriptions.is_empty()
    }

    /// Forgets the subscriptions whose pumps ended because the policy took them away.
    fn forget_revoked(&mut self) {
        if self.revoked.load(Ordering::Acquire) > 0 {
            self.revoked.store(0, Ordering::Release);
            self.subscriptions.retain(|_, pump| !pump.is_finished());
        }
    }

    /// The identity the connection acts as.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Handles one decoded item. A request's answer reaches the outbox when it comes.
    pub async fn handle(&mut self, item: Decoded) -> Flow {
        if let Some(refreshed) = self.gateway.refreshed(&self.caller) {
            // The policy was reloaded: act under the new one.
            self.caller = refreshed;
        }
        let envelope = match item {
            Decoded::Envelope(envelope) => envelope,
            Decoded::Invalid { id, error, fatal } => {
                self.gateway.note(&self.caller, None, &id, Err(error.code));
                self.answer(Outbound::Error { id, error });
                return if fatal { Flow::Close } else { Flow::Continue };
            }
        };
        match envelope.op {
            Op::Request => {
                self.outbox.begin_command();
                self.gateway
                    .start_request(&self.caller, envelope, self.outbox.clone())
                    .await;
            }
            Op::Publish => {
                let id = envelope.id.clone();
                match self.gateway.publish(&self.caller, envelope).await {
                    Ok(()) if id.is_null() => {}
                    Ok(()) => self.answer(Outbound::Ack { id }),
                    Err(error) => self.answer(Outbound::Error { id, error }),
                }
            }
            Op::Subscribe => {
                let id = envelope.id.clone();
                // Boxed: a subscribe's state is large and rare; the request path's future
                // (this one) stays small.
                let answer = match Box::pin(self.subscribe(envelope)).await {
                    Ok(()) => Outbound::Ack { id },
                    Err(error) => Outbound::Error { id, error },
                };
                self.answer(answer);
            }
            Op::Unsubscribe => {
                let id = envelope.id.clone();
                let answer = match self.unsubscribe(&id) {
                    Ok(()) => Outbound::Ack { id },
                    Err(error) => Outbound::Error { id, error },
                };
                self.answer(answer);
            }
            Op::Ping => {
                self.gateway
                    .note(&self.caller, Some(Op::Ping), &envelope.id, Ok(()));
                self.answer(Outbound::Pong { id: envelope.id });
            }
            Op::Auth => return self.authenticate(envelope),
            // A grant is not answered (it may come once per message); only a bad one is.
            Op::Credit => {
                let result = self.grant(&envelope);
                self.gateway.note(
                    &self.caller,
                    Some(Op::Credit),
                    &envelope.id,
                    result.as_ref().map_err(|e| e.code).copied(),
                );
                if let Err(error) = result {
                    self.answer(Outbound::Error {
                        id: envelope.id,
                        error,
                    });
                }
            }
        }
        Flow::Continue
    }

    /// A WebSocket connection presents a token: it acts as the token's subject from now on.
    /// A bad token ends the connection (after its answer).
    fn authenticate(&mut self, envelope: Envelope) -> Flow {
        let id = envelope.id.clone();
        let verified = match (self.frontend, envelope.token) {
            (Frontend::Ws, Some(token)) => {
                let addr = self.caller.identity().addr.clone();
                self.gateway.verify_token(&token, Frontend::Ws, addr)
            }
            (Frontend::Ws, None) => Err(GatewayError::bad_request(
                "auth needs \"token\": a bearer JWT",
            )),
            _ => Err(GatewayError::bad_request(
                "auth is for WebSocket connections (the Unix socket identifies its callers by uid; gRPC calls carry authorization metadata)",
            )),
        };
        let verified =
            verified.and_then(|identity| self.gateway.reauthenticate(&self.caller, identity));
        match verified {
            Ok(caller) => {
                self.caller = caller;
                self.gateway.note(&self.caller, Some(Op::Auth), &id, Ok(()));
                self.answer(Outbound::Authenticated { id });
                Flow::Continue
            }
            Err(error) if matches!(error.code, ErrorCode::BadRequest | ErrorCode::Overloaded) => {
                self.gateway
                    .note(&self.caller, Some(Op::Auth), &id, Err(error.code));
                self.answer(Outbound::Error { id, error });
                Flow::Continue
            }
            Err(error) => {
                self.gateway
                    .note(&self.caller, Some(Op::Auth), &id, Err(error.code));
                self.caller.closing("authentication failed");
                self.answer(Outbound::Error { id, error });
                Flow::Close
            }
        }
    }

    /// Answers a command that did not go to the core as a request.
    fn answer(&self, event: Outbound) {
        self.outbox.begin_command();
        self.outbox.push_control(event);
    }

    /// Answers a command with `UNAVAILABLE` because the gateway is shutting down.
    pub fn refuse_shutting_down(&mut self, item: Decoded) {
        let (id, op) = match item {
            Decoded::Envelope(envelope) => (envelope.id, Some(envelope.op)),
            Decoded::Invalid { id, .. } => (id, None),
        };
        self.gateway
            .note(&self.caller, op, &id, Err(ErrorCode::Unavailable));
        self.answer(Outbound::Error {
            id,
            error: GatewayError::new(ErrorCode::Unavailable, "the gateway is shutting down"),
        });
    }

    /// What the session itself checks before a subscription reaches the core.
    fn check_subscription(&self, envelope: &Envelope) -> Result<Subject, GatewayError> {
        if envelope.id.is_null() {
            return Err(GatewayError::bad_request(
                "subscribe needs an \"id\": messages name their subscription by it",
            ));
        }
        if self.subscriptions.contains_key(&envelope.id) {
            return Err(GatewayError::bad_request(format!(
                "subscription id {} is already in use on this connection",
                envelope.id
            )));
        }
        if envelope.credit == Some(0) {
            return Err(GatewayError::bad_request(
                "\"credit\" must be at least 1 (leave it out for no flow control)",
            ));
        }
        envelope.require_subject().cloned()
    }

    fn grant(&self, envelope: &Envelope) -> Result<(), GatewayError> {
        let n = match envelope.credit {
            Some(n) if n > 0 => n,
            _ => {
                return Err(GatewayError::bad_request(
                    "credit needs \"n\": how many more messages, at least 1",
                ));
            }
        };
        if !self.subscriptions.contains_key(&envelope.id) {
            return Err(GatewayError::bad_request(format!(
                "no subscription with id {} on this connection",
                envelope.id
            )));
        }
        if !self.outbox.grant(&envelope.id, n) {
            return Err(GatewayError::bad_request(format!(
                "subscription {} was opened without \"credit\"; it needs no grants",
                envelope.id
            )));
        }
        Ok(())
    }

    /// Opens a subscription whose messages go to the outbox under `envelope.id`. Failures
    /// are counted; the caller answers.
    pub async fn subscribe(&mut self, envelope: Envelope) -> Result<(), GatewayError> {
        let sid = envelope.id.clone();
        let subject = self.check_subscription(&envelope).inspect_err(|error| {
            self.gateway
                .note(&self.caller, Some(Op::Subscribe), &sid, Err(error.code));
        })?;
        self.forget_revoked();
        let subscription = self
            .gateway
            .subscribe(&self.caller, &subject, envelope.queue.as_deref())
            .await?;
        if let Some(credit) = envelope.credit {
            self.outbox.limit_by_credit(sid.clone(), credit);
        }
        let pump = tokio::spawn(pump_messages(
            self.gateway.clone(),
            self.frontend,
            (self.outbox.clone(), self.revoked.clone()),
            sid.clone(),
            subscription,
        ));
        self.gateway.metrics().subscription_opened(self.frontend);
        self.subscriptions.insert(sid, pump.abort_handle());
        Ok(())
    }

    fn unsubscribe(&mut self, sid: &Id) -> Result<(), GatewayError> {
        self.forget_revoked();
        let result = match self.subscriptions.remove(sid) {
            Some(pump) => {
                // Aborting the pump drops its `Subscriber`, which unsubscribes from NATS.
                pump.abort();
                self.outbox.purge(sid);
                self.gateway.metrics().subscription_closed(self.frontend);
                Ok(())
            }
            None => Err(GatewayError::bad_request(format!(
                "no subscription with id {sid} on this connection"
            ))),
        };
        self.gateway.note(
            &self.caller,
            Some(Op::Unsubscribe),
            sid,
            result.as_ref().map(|_| ()).map_err(|e| e.code),
        );
        result
    }

    /// Closes every subscription of this connection.
    pub fn close_subscriptions(&mut self) {
        for (_, pump) in self.subscriptions.drain() {
            pump.abort();
            self.gateway.metrics().subscription_closed(self.frontend);
        }
    }
}

/// Moves one subscription's messages into the client's outbox for as long as the client holds
/// the subscription (this task is aborted on unsubscribe; the core re-opens the subscription
/// itself when its NATS connection is replaced).
async fn pump_messages(
    gateway: Gateway,
    frontend: Frontend,
    (outbox, revoked): (Arc<Outbox>, Arc<AtomicUsize>),
    sid: Id,
    mut subscription: Subscription,
) {
    let metrics = gateway.metrics().clone();
    loop {
        let message = match subscription.next().await {
            SubscriptionEvent::Message(message) => message,
            SubscriptionEvent::Revoked(error) => {
                // The client is told; the notice counts as an answer to write.
                outbox.begin_command();
                outbox.purge(&sid);
                outbox.push_control(Outbound::Unsubscribed { sid, error });
                metrics.subscription_closed(frontend);
                revoked.fetch_add(1, Ordering::AcqRel);
                return;
            }
        };
        metrics.payload_out(frontend, message.payload.len());
        let dropped = outbox.push_stream(sid.clone(), message);
        if dropped > 0 {
            metrics.dropped(frontend, dropped);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close_subscriptions();
    }
}
