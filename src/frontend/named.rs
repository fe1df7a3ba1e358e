//! A connection's names and presence watches (docs/protocol.md, "Named clients"): the ops
//! `register`, `unregister`, `presence` and `presence_watch`, answered here for every wire, and
//! the outbox as the place the core puts `name_lost` notices and presence events.

use std::sync::Arc;

use crate::core::{Caller, Gateway, NameSink, PresenceWatch, Registration};
use crate::protocol::{Envelope, GatewayError, Id, Op, Outbound, PresenceInfo};

use super::outbox::Outbox;

/// Presence events queued for a connection beyond this many unwritten answers are dropped
/// and counted in a `dropped` notice for their watch (a watcher that stops reading cannot
/// make the gateway hold an unbounded queue).
const MAX_QUEUED_EVENTS: usize = 1024;

impl NameSink for Outbox {
    fn name_lost(&self, sid: &Id, name: &str) {
        self.begin_command();
        self.purge(sid);
        self.push_control(Outbound::NameLost {
            sid: sid.clone(),
            name: name.into(),
        });
    }

    fn presence(&self, sid: &Id, info: Arc<PresenceInfo>) {
        if self.pending() >= MAX_QUEUED_EVENTS {
            crate::core::DeliverySink::lost(self, sid, 1, false);
            return;
        }
        self.begin_command();
        self.push_control(Outbound::Presence {
            id: sid.clone(),
            watch: true,
            info,
        });
    }

    fn watch_ended(&self, sid: &Id, error: GatewayError) {
        crate::core::DeliverySink::ended(self, sid, error);
    }
}

/// The names a connection holds and its presence watches; dropping it gives them all up.
/// Boxed, and made on first use: every connection has one, few use it (8 bytes when unused).
#[derive(Default)]
pub struct Named(Option<Box<Held>>);

/// What `Named` holds once used (its fields are private to this module).
#[derive(Default)]
pub struct Held {
    names: Vec<(Id, Registration)>,
    watches: Vec<(Id, PresenceWatch)>,
}

impl std::ops::Deref for Named {
    type Target = Held;

    fn deref(&self) -> &Held {
        static NONE: Held = Held {
            names: Vec::new(),
            watches: Vec::new(),
        };
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl std::ops::DerefMut for Named {
    fn deref_mut(&mut self) -> &mut Held {
        self.0.get_or_insert_with(Box::default)
    }
}

impl Named {
    /// Whether the connection holds a name or a watch (it then stays open like one with
    /// subscriptions).
    pub fn is_active(&mut self) -> bool {
        let Some(held) = self.0.as_deref_mut() else {
            return false;
        };
        held.names
            .retain(|(_, registration)| registration.is_active());
        held.watches.retain(|(_, watch)| watch.is_active());
        !held.names.is_empty() || !held.watches.is_empty()
    }

    /// Whether `id` names one of its registrations or watches still in force.
    pub fn uses(&self, id: &Id) -> bool {
        self.names
            .iter()
            .any(|(sid, registration)| sid == id && registration.is_active())
            || self
                .watches
                .iter()
                .any(|(sid, watch)| sid == id && watch.is_active())
    }

    /// Ends watch `id` (an `unsubscribe`); false when there is none.
    pub fn unwatch(&mut self, id: &Id) -> bool {
        if self.0.is_none() {
            return false;
        }
        let before = self.watches.len();
        self.watches.retain(|(sid, _)| sid != id);
        before != self.watches.len()
    }

    /// Carries out one named-client op; `id_taken` says whether its id is a subscription's.
    pub async fn handle(
        &mut self,
        gateway: &Gateway,
        caller: &Caller,
        outbox: &Arc<Outbox>,
        envelope: Envelope,
        id_taken: bool,
    ) -> Outbound {
        let op = envelope.op;
        let id = envelope.id.clone();
        let target = envelope.subject.clone();
        let result = self
            .carry_out(gateway, caller, outbox, envelope, id_taken)
            .await;
        gateway.note_named(
            caller,
            op,
            &id,
            target.as_ref(),
            result.as_ref().map(|_| ()).map_err(|e| e.code),
        );
        match result {
            Ok(Some(info)) => Outbound::Presence {
                id,
                watch: false,
                info: Arc::new(info),
            },
            Ok(None) => Outbound::Ack { id },
            Err(error) => Outbound::Error { id, error },
        }
    }

    async fn carry_out(
        &mut self,
        gateway: &Gateway,
        caller: &Caller,
        outbox: &Arc<Outbox>,
        envelope: Envelope,
        id_taken: bool,
    ) -> Result<Option<PresenceInfo>, GatewayError> {
        let what = match envelope.op {
            Op::PresenceWatch => "\"pattern\"",
            _ => "\"name\"",
        };
        let Some(target) = envelope.subject.clone() else {
            return Err(GatewayError::bad_request(format!(
                "{} needs {what}",
                envelope.op.as_str()
            )));
        };
        let id = envelope.id;
        let fresh_id = |named: &Named| -> Result<(), GatewayError> {
            if id.is_null() {
                return Err(GatewayError::bad_request(format!(
                    "{} needs an \"id\": its events name it by that id",
                    envelope.op.as_str()
                )));
            }
            if id_taken || named.uses(&id) {
                return Err(GatewayError::bad_request(format!(
                    "id {id} is already in use on this connection"
                )));
            }
            Ok(())
        };
        match envelope.op {
            Op::Register => {
                self.is_active(); // forgets names lost since (their ids are free again)
                fresh_id(self)?;
                if self.names.iter().any(|(_, r)| r.name() == target.as_str()) {
                    return Err(GatewayError::bad_request(format!(
                        "this connection holds the name {:?} already",
                        target.as_str()
                    )));
                }
                let sinks = (id.clone(), outbox.clone() as _, outbox.clone() as _);
                let registration = Box::pin(gateway.register(caller, &target, sinks)).await?;
                self.names.push((id, registration));
                Ok(None)
            }
            Op::Unregister => {
                self.is_active();
                let before = self.names.len();
                self.names.retain(|(_, r)| r.name() != target.as_str());
                if before == self.names.len() {
                    return Err(GatewayError::bad_request(format!(
                        "this connection does not hold the name {:?}",
                        target.as_str()
                    )));
                }
                Ok(None)
            }
            Op::Presence => Ok(Some(Box::pin(gateway.presence(caller, &target)).await?)),
            Op::PresenceWatch => {
                fresh_id(self)?;
                let watch =
                    gateway.presence_watch(caller, &target, (id.clone(), outbox.clone() as _))?;
                self.watches.push((id, watch));
                Ok(None)
            }
            _ => Err(GatewayError::bad_request("not a named-client op")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's session carries one.
    #[test]
    fn an_unused_named_costs_one_pointer_and_no_allocation() {
        assert_eq!(size_of::<Named>(), size_of::<usize>());
        let mut named = Named::default();
        assert!(!named.is_active());
        assert!(!named.uses(&Id::from(1)));
        assert!(!named.unwatch(&Id::from(1)));
        assert!(named.0.is_none());
    }
}
