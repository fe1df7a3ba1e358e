//! What one client connection asks of the core, whatever its wire: it turns decoded envelopes
//! into core calls, starts the client's requests (pipelined; the core puts each answer into
//! the client's `Outbox` as it comes, in any order), keeps its subscriptions, and answers
//! everything else itself. A front-end only reads its wire into `Decoded` items and writes
//! the outbox back out.

use std::sync::Arc;

use crate::core::{Caller, Gateway, Later, Replayed, Step, Subscription};
use crate::protocol::{
    Decoded, Envelope, ErrorCode, Frontend, GatewayError, Id, Identity, Op, Outbound, Subject,
};

use super::named::Named;
use super::outbox::Outbox;

/// Answers a command that did not go to the core as a request.
fn answer(outbox: &Outbox, event: Outbound) {
    outbox.begin_command();
    outbox.push_control(event);
}

/// A publish is acked when it has an id, and answered with its error whatever its id.
fn answer_publish(outbox: &Outbox, id: Id, published: Result<(), GatewayError>) {
    match published {
        Ok(()) if id.is_null() => {}
        Ok(()) => answer(outbox, Outbound::Ack { id }),
        Err(error) => answer(outbox, Outbound::Error { id, error }),
    }
}

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
    outbox: Arc<Outbox>,
    /// Dropping one unsubscribes. A list, not a map: most connections hold one or a few,
    /// and a one-entry map takes 244 bytes where this takes 56.
    subscriptions: Vec<(Id, Subscription)>,
    /// Names held and presence watches (named.rs).
    named: Named,
}

impl Session {
    pub fn new(gateway: Gateway, caller: Caller, outbox: Arc<Outbox>) -> Self {
        Session {
            caller,
            gateway,
            outbox,
            subscriptions: Vec::new(),
            named: Named::default(),
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
        !self.subscriptions.is_empty() || self.named.is_active()
    }

    /// Forgets the subscriptions the gateway ended because the policy took them away.
    fn forget_revoked(&mut self) {
        self.subscriptions
            .retain(|(_, subscription)| subscription.is_active());
    }

    /// The identity the connection acts as.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Handles one decoded item. A request's answer reaches the outbox when it comes.
    pub async fn handle(&mut self, item: Decoded) -> Flow {
        match self.handle_at_once(item) {
            Ok(flow) => flow,
            Err(rest) => rest.await,
        }
    }

    /// Handles one decoded item when nothing in it has to wait, which is the common case: a
    /// request or a publish that the NATS client's queue took at once, a ping, a credit grant,
    /// bad input. Otherwise gives back the rest as a boxed future, to be awaited before the
    /// connection's next command (so that commands reach NATS in order): a subscribe, a
    /// durable publish, a named-client op, or a request or publish waiting for room in the NATS
    /// client's queue. The WebSocket, whose per-connection future must stay small, calls this
    /// and boxes nothing in the common case; `handle` is both steps.
    pub fn handle_at_once(&mut self, item: Decoded) -> Result<Flow, Later<'_, Flow>> {
        if let Some(refreshed) = self.gateway.refreshed(&self.caller) {
            // The policy was reloaded: act under the new one.
            self.caller = refreshed;
        }
        let envelope = match item {
            Decoded::Envelope(envelope) => envelope,
            Decoded::Invalid { id, error, fatal } => {
                self.answer_invalid(id, error);
                return Ok(if fatal { Flow::Close } else { Flow::Continue });
            }
        };
        match envelope.op {
            Op::Request => {
                self.outbox.begin_command();
                let sink = self.outbox.replies(envelope.priority);
                // Matched here rather than with `Step::finish`, whose future costs the common
                // case about 0.6 % of a request's instructions (callgrind).
                match self.gateway.start_request(&self.caller, envelope, sink) {
                    Step::Done(()) => {}
                    Step::Later(rest) => {
                        return Err(Box::pin(async move {
                            rest.await;
                            Flow::Continue
                        }));
                    }
                }
            }
            Op::Publish if !envelope.flags.durable => {
                let id = envelope.id.clone();
                // As for requests: no future unless it has to wait.
                match self.gateway.start_publish(&self.caller, envelope) {
                    Step::Done(published) => answer_publish(&self.outbox, id, published),
                    Step::Later(rest) => {
                        let outbox = &self.outbox;
                        return Err(Box::pin(async move {
                            answer_publish(outbox, id, rest.await);
                            Flow::Continue
                        }));
                    }
                }
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
            Op::Auth => return Ok(self.authenticate(envelope)),
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
            Op::Publish
            | Op::Subscribe
            | Op::Register
            | Op::Unregister
            | Op::Presence
            | Op::PresenceWatch => return Err(Box::pin(self.handle_waiting(envelope))),
        }
        Ok(Flow::Continue)
    }

    /// Carries out a command that waits for its work (see `handle_at_once`).
    async fn handle_waiting(&mut self, envelope: Envelope) -> Flow {
        match envelope.op {
            Op::Publish if envelope.flags.durable => {
                // Always answered, when the stream's ack comes; later publishes go on meanwhile.
                self.outbox.begin_command();
                let id = envelope.id.clone();
                // Boxed for the reason subscribe is: rare, and its state is large.
                let stored = Box::pin(self.gateway.publish_durable(&self.caller, envelope)).await;
                let outbox = self.outbox.clone();
                tokio::spawn(async move {
                    outbox.push_control(match stored.await {
                        Ok(stored) => Outbound::Stored {
                            id,
                            stream: stored.stream,
                            seq: stored.seq,
                        },
                        Err(error) => Outbound::Error { id, error },
                    });
                });
            }
            Op::Subscribe => {
                let id = envelope.id.clone();
                // Boxed: a subscribe's state is large and rare; the request path's future
                // (this one) stays small.
                let answer = match Box::pin(self.subscribe(envelope)).await {
                    Ok(None) => Outbound::Ack { id },
                    Ok(Some(replayed)) => Outbound::Replaying {
                        id,
                        stream: replayed.stream,
                        truncated: replayed.truncated,
                    },
                    Err(error) => Outbound::Error { id, error },
                };
                self.answer(answer);
            }
            Op::Register | Op::Unregister | Op::Presence | Op::PresenceWatch => {
                let answer = Box::pin(self.named_op(envelope)).await;
                self.answer(answer);
            }
            // `handle_at_once` finishes the others.
            _ => return Box::pin(self.handle(Decoded::Envelope(envelope))).await,
        }
        Flow::Continue
    }

    /// Carries out a named-client op (register, unregister, presence, presence_watch) and
    /// returns its answer, not yet queued (gRPC turns it into the call's outcome).
    pub async fn named_op(&mut self, envelope: Envelope) -> Outbound {
        let taken = self.position(&envelope.id).is_some();
        let (gateway, caller, outbox) = (&self.gateway, &self.caller, &self.outbox);
        self.named
            .handle(gateway, caller, outbox, envelope, taken)
            .await
    }

    /// A WebSocket connection presents a token: it acts as the token's subject from now on.
    /// A bad token ends the connection (after its answer).
    fn authenticate(&mut self, envelope: Envelope) -> Flow {
        let id = envelope.id.clone();
        let verified = match (self.caller.frontend(), envelope.token) {
            (Frontend::Ws, Some(token)) => {
                self.gateway.verify_token_on(&token, self.caller.identity())
            }
            (Frontend::Ws, None) => Err(GatewayError::bad_request(
                "auth needs \"token\": a bearer JWT",
            )),
            _ => Err(GatewayError::bad_request(
                "auth is for WebSocket connections (the Unix socket identifies its callers by uid; gRPC calls carry authorization metadata)",
            )),
        };
        let verified = verified
            .and_then(|identity| self.keeps_what_it_holds(identity))
            .and_then(|identity| self.gateway.reauthenticate(&self.caller, identity));
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

    /// An `auth` may change who the connection is only while it holds nothing: its
    /// subscriptions, names and presence watches were checked (and names recorded) as the
    /// identity it had, and would otherwise go on as that one under the new name. A token for
    /// the subject it already has (a refresh before the old token expires) changes nothing
    /// the policy sees, so it is accepted whatever the connection holds.
    fn keeps_what_it_holds(&mut self, identity: Identity) -> Result<Identity, GatewayError> {
        let current = self.caller.identity();
        let same = !current.is_anonymous() && current.sub == identity.sub;
        if same || !self.has_subscriptions() {
            return Ok(identity);
        }
        Err(GatewayError::bad_request(format!(
            "this connection holds subscriptions, names or presence watches as {}; to act as {}, unsubscribe and unregister first or open a new connection",
            self.caller.identity().short_form(),
            identity.short_form()
        )))
    }

    /// Answers a command that did not go to the core as a request.
    fn answer(&self, event: Outbound) {
        answer(&self.outbox, event);
    }

    /// Answers input that was not a command with an error (the connection goes on).
    pub fn refuse(&mut self, error: GatewayError) {
        self.answer_invalid(Id::Null, error);
    }

    /// Input that was not a command: noted (metrics, audit) and answered with its error.
    fn answer_invalid(&self, id: Id, error: GatewayError) {
        self.gateway.note(&self.caller, None, &id, Err(error.code));
        self.answer(Outbound::Error { id, error });
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
        if self.position(&envelope.id).is_some() || self.named.uses(&envelope.id) {
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
        if self.position(&envelope.id).is_none() {
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

    /// Opens a subscription whose messages go to the outbox under `envelope.id` (with
    /// `since`, replaying a stream first: then where it starts). Failures are counted; the
    /// caller answers.
    pub async fn subscribe(
        &mut self,
        envelope: Envelope,
    ) -> Result<Option<Replayed>, GatewayError> {
        let sid = envelope.id.clone();
        let subject = self.check_subscription(&envelope).inspect_err(|error| {
            self.gateway
                .note(&self.caller, Some(Op::Subscribe), &sid, Err(error.code));
        })?;
        self.forget_revoked();
        if let Some(credit) = envelope.credit {
            // Before the first message can arrive.
            self.outbox.limit_by_credit(sid.clone(), credit);
        }
        let sink = (sid.clone(), envelope.priority, self.outbox.clone() as _);
        let queue = envelope.queue.as_deref();
        let subscribed = match envelope.since.as_deref() {
            None => self
                .gateway
                .subscribe(&self.caller, &subject, queue, sink)
                .await
                .map(|subscription| (subscription, None)),
            Some(since) => self
                .gateway
                .subscribe_replay(&self.caller, &subject, queue, *since, sink)
                .await
                .map(|(subscription, replayed)| (subscription, Some(replayed))),
        };
        match subscribed {
            Ok((subscription, replayed)) => {
                if self.subscriptions.len() == self.subscriptions.capacity() {
                    // Grown by doubling from one (a Vec's first push would make room for 4).
                    self.subscriptions
                        .reserve_exact(self.subscriptions.len().max(1));
                }
                self.subscriptions.push((sid, subscription));
                Ok(replayed)
            }
            Err(error) => {
                self.outbox.purge(&sid);
                Err(error)
            }
        }
    }

    fn unsubscribe(&mut self, sid: &Id) -> Result<(), GatewayError> {
        self.forget_revoked();
        let result = match self.position(sid) {
            Some(index) => {
                drop(self.subscriptions.swap_remove(index));
                if self.subscriptions.is_empty() {
                    self.subscriptions = Vec::new();
                }
                self.outbox.purge(sid);
                Ok(())
            }
            None if self.named.unwatch(sid) => Ok(()),
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

    /// Where subscription `sid` is in the list.
    fn position(&self, sid: &Id) -> Option<usize> {
        self.subscriptions.iter().position(|(id, _)| id == sid)
    }

    /// Closes every subscription of this connection (and frees the list).
    pub fn close_subscriptions(&mut self) {
        self.subscriptions = Vec::new();
        self.named = Named::default();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close_subscriptions();
    }
}
