//! Named clients: a connection registers a name (`bob`); messages published to
//! `<client_subject_prefix>.bob` then reach it on whichever gateway it is connected to, with no
//! subscription of its own. The gateway holding the name joins the shared fan-out topic of
//! `client.bob` on the holder's behalf and delivers into its outbox under the register's id.
//!
//! This module keeps the local side: which names this gateway's connections hold (`Holder`),
//! the presence watches of its clients, and the one task per gateway (`maintain`) that
//! refreshes the presence entries of the names held here and watches the whole bucket:
//!
//! - **The newer registration wins.** A second connection taking a held name (on this gateway
//!   or another) replaces the first: the first is told `name_lost` and its delivery ends. On
//!   this gateway that happens at once; across gateways, when the bucket watch shows an entry
//!   for a name held here that another holder wrote (a later revision than ours), or when a
//!   refresh finds another holder's entry.
//! - Client subjects are for the names' holders only: a plain subscription inside
//!   `<prefix>.>` is refused, and one that merely overlaps it (`>`) never receives them
//!   (`Gateway::client_subject_rule`).
//!
//! The bucket's side (revision checks, expiry) is `presence.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::Operation;
use futures_util::StreamExt;

use super::presence::{PresenceStore, PresenceValue, Refreshed};
use super::{Caller, DeliverySink, Gateway, Inner, Subscription, fanout};
use crate::protocol::subject::{SubjectUse, validate_subject};
use crate::protocol::{ErrorCode, GatewayError, Id, Identity, PresenceInfo, Priority, Subject};

/// The longest name (a KV key; NATS itself allows longer subjects).
pub const MAX_NAME_BYTES: usize = 256;

/// How many presence entries a gateway rewrites at once when it refreshes them.
const REFRESHES_AT_ONCE: usize = 64;

/// Where a connection's name events go (its outbox).
pub trait NameSink: Send + Sync {
    /// Another connection took `name`, registered under `sid`.
    fn name_lost(&self, sid: &Id, name: &str);
    /// A change of presence for watch `sid`.
    fn presence(&self, sid: &Id, info: Arc<PresenceInfo>);
    /// Watch `sid` was ended by the gateway (a reloaded policy no longer allows it).
    fn watch_ended(&self, sid: &Id, error: GatewayError);
}

/// A connection's hold on a name; dropping it gives the name up (and deletes its presence
/// entry, if it is still this holder's).
pub struct Registration {
    names: Arc<Names>,
    name: Arc<str>,
    holder: Arc<str>,
}

impl Registration {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// False once another connection took the name.
    pub fn is_active(&self) -> bool {
        lock(&self.names.held)
            .get(&self.name)
            .is_some_and(|held| held.holder == self.holder)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.names.release(&self.name, &self.holder);
    }
}

/// A client's presence watch; dropping it ends the watch.
pub struct PresenceWatch {
    names: Arc<Names>,
    key: u64,
}

impl PresenceWatch {
    /// False once the gateway ended the watch.
    pub fn is_active(&self) -> bool {
        lock(&self.names.watchers)
            .iter()
            .any(|watcher| watcher.key == self.key)
    }
}

impl Drop for PresenceWatch {
    fn drop(&mut self) {
        lock(&self.names.watchers).retain(|watcher| watcher.key != self.key);
    }
}

struct Holder {
    holder: Arc<str>,
    /// Who holds it, as the policy saw it at registration (rechecked after a reload).
    caller: Caller,
    sid: Id,
    sink: Arc<dyn NameSink>,
    /// The delivery of `<prefix>.<name>`; dropped when the name is lost or given up.
    _delivery: Subscription,
    value: PresenceValue,
    /// The revision of our entry in the bucket.
    revision: u64,
}

struct Watcher {
    key: u64,
    sid: Id,
    pattern: Arc<str>,
    sink: Arc<dyn NameSink>,
    /// Who watches, as the policy saw it when the watch began (rechecked after a reload).
    caller: Caller,
}

pub(super) struct Names {
    prefix: String,
    pub store: PresenceStore,
    held: Mutex<HashMap<Arc<str>, Holder>>,
    watchers: Mutex<Vec<Watcher>>,
    next: AtomicU64,
    /// `<gateway>#<start ms>`: what this gateway's holder ids start with.
    holder_prefix: String,
    /// The bucket watch is running (presence watches need it).
    watching: AtomicBool,
    /// Presence entries being deleted (names given up): a stopping gateway waits for them.
    releases: tokio_util::task::TaskTracker,
    /// A registration found the bucket usable: `maintain` stops waiting for JetStream.
    usable: tokio::sync::Notify,
    /// Every name online in the bucket, with its holder, as the bucket watch showed it: what
    /// tells a change from a refresh. One entry per online name of the cluster.
    known: Mutex<HashMap<String, String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks a name: a subject tail without wildcards whose characters a KV key allows
/// (letters, digits, `-`, `_`, `=`, `/`, and `.` between tokens), at most 256 bytes.
pub fn validate_name(name: &str) -> Result<(), GatewayError> {
    validate_subject(name, SubjectUse::Publish)
        .map_err(|error| GatewayError::bad_request(format!("name {name:?}: {}", error.message)))?;
    if name.len() > MAX_NAME_BYTES {
        return Err(GatewayError::bad_request(format!(
            "a name is at most {MAX_NAME_BYTES} bytes"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=' | '/' | '.')))
    {
        return Err(GatewayError::bad_request(format!(
            "name {name:?} has {bad:?}; a name uses letters, digits, '-', '_', '=', '/' and '.' between tokens"
        )));
    }
    Ok(())
}

/// The name an identity may always take: a local user's user name, a token's `sub` (none for
/// anonymous callers, or when that name is not a valid name).
pub fn own_name(identity: &Identity) -> Option<&str> {
    let own = match (&identity.user, &identity.sub) {
        (Some(user), _) if identity.uid.is_some() => Some(user.as_str()),
        (_, Some(sub)) => Some(sub.as_str()),
        _ => None,
    };
    own.filter(|name| validate_name(name).is_ok())
}

impl Names {
    pub fn new(prefix: String, store: PresenceStore, gateway: &str) -> Names {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        Names {
            prefix,
            store,
            held: Mutex::default(),
            watchers: Mutex::default(),
            next: AtomicU64::new(1),
            holder_prefix: format!("{gateway}#{start}"),
            watching: AtomicBool::new(false),
            releases: tokio_util::task::TaskTracker::new(),
            usable: tokio::sync::Notify::new(),
            known: Mutex::default(),
        }
    }

    /// Whether `subject` is a client subject (`<prefix>.<name>`).
    /// How many names this gateway's clients hold now (for `/status`).
    pub fn held_count(&self) -> usize {
        lock(&self.held).len()
    }

    pub fn is_client_subject(&self, subject: &str) -> bool {
        client_subject(&self.prefix, subject)
    }

    /// The client namespace as a pattern: `<prefix>.>`.
    fn namespace(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// Gives up `name` if `holder` still holds it: delivery ends at once, the presence entry
    /// is deleted (if it is still ours) in the background.
    fn release(self: &Arc<Self>, name: &str, holder: &str) {
        let removed = {
            let mut held = lock(&self.held);
            match held.get(name) {
                Some(current) if &*current.holder == holder => held.remove(name),
                _ => None,
            }
        };
        let Some(removed) = removed else { return };
        let revision = removed.revision;
        drop(removed);
        self.delete_entry(name.to_owned(), revision);
    }

    /// Deletes our presence entry of `name` (if still at `revision`) in the background.
    fn delete_entry(self: &Arc<Self>, name: String, revision: u64) {
        let names = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.releases.spawn_on(
                async move { names.store.release(&name, revision).await },
                &runtime,
            );
        }
    }

    /// Waits (at most `limit`) for the presence entries being deleted: at shutdown, so that
    /// the names this gateway's clients gave up do not linger until they expire.
    pub async fn settle(&self, limit: Duration) {
        self.releases.close();
        let _ = tokio::time::timeout(limit, self.releases.wait()).await;
    }

    /// `name`'s holder `holder` lost it to a newer registration: told, and its delivery ends.
    fn lose(&self, name: &str, holder: &str) {
        let removed = {
            let mut held = lock(&self.held);
            match held.get(name) {
                Some(current) if &*current.holder == holder => held.remove(name),
                _ => None,
            }
        };
        if let Some(lost) = removed {
            tracing::info!(name, "name taken by a newer registration");
            lost.sink.name_lost(&lost.sid, name);
        }
    }

    /// One change seen on the bucket: a name held here that a newer holder wrote is lost;
    /// the watches whose pattern matches are told.
    fn on_entry(&self, key: &str, revision: u64, operation: Operation, value: &[u8]) {
        let value = match operation {
            Operation::Put => PresenceValue::decode(value),
            Operation::Delete | Operation::Purge => None,
        };
        if let Some(value) = &value {
            let loser = lock(&self.held).get(key).and_then(|held| {
                taken_by_another(held.revision, &held.holder, revision, &value.holder)
                    .then(|| held.holder.clone())
            });
            if let Some(loser) = loser {
                self.lose(key, &loser);
            }
        }
        // Watchers see changes only: a refresh (the same holder again) and a second offline
        // (a deletion's marker expiring) are not changes.
        let changed = {
            let mut known = lock(&self.known);
            match &value {
                Some(value) => {
                    known.insert(key.to_owned(), value.holder.clone()).as_ref()
                        != Some(&value.holder)
                }
                None => known.remove(key).is_some(),
            }
        };
        if !changed {
            return;
        }
        let info = Arc::new(match &value {
            Some(value) => value.info(key),
            None => PresenceInfo::offline(key),
        });
        for watcher in lock(&self.watchers).iter() {
            if super::policy::matches(&watcher.pattern, key) {
                watcher.sink.presence(&watcher.sid, info.clone());
            }
        }
    }

    /// After the first pass of a new bucket watch: the names known online before (the watch
    /// was cut) that the bucket no longer has went offline meanwhile; watchers are told.
    fn forget_gone(&self, seen: &std::collections::HashSet<String>) {
        let gone: Vec<String> = {
            let mut known = lock(&self.known);
            let gone = known
                .keys()
                .filter(|key| !seen.contains(*key))
                .cloned()
                .collect::<Vec<_>>();
            for key in &gone {
                known.remove(key);
            }
            gone
        };
        for key in gone {
            let info = Arc::new(PresenceInfo::offline(&key));
            for watcher in lock(&self.watchers).iter() {
                if super::policy::matches(&watcher.pattern, &key) {
                    watcher.sink.presence(&watcher.sid, info.clone());
                }
            }
        }
    }

    /// Refreshes the entry of every name held here.
    async fn refresh_all(self: &Arc<Self>) {
        let held: Vec<(Arc<str>, Arc<str>, PresenceValue, u64)> = lock(&self.held)
            .iter()
            .map(|(name, held)| {
                (
                    name.clone(),
                    held.holder.clone(),
                    held.value.clone(),
                    held.revision,
                )
            })
            .collect();
        let refreshes = held
            .into_iter()
            .map(|(name, holder, value, revision)| async move {
                let outcome = self.store.refresh(&name, &value, revision).await;
                (name, holder, outcome)
            });
        // A bounded number at a time: a gateway may hold many names.
        let outcomes: Vec<_> = futures_util::stream::iter(refreshes)
            .buffer_unordered(REFRESHES_AT_ONCE)
            .collect()
            .await;
        for (name, holder, outcome) in outcomes {
            match outcome {
                Refreshed::Held(revision) => {
                    let still_held = match lock(&self.held).get_mut(&name) {
                        Some(held) if held.holder == holder => {
                            held.revision = held.revision.max(revision);
                            true
                        }
                        _ => false,
                    };
                    if !still_held {
                        // Given up while the refresh was out: its delete (at the revision
                        // before) missed this write, or this write made the entry again.
                        self.delete_entry(name.to_string(), revision);
                    }
                }
                Refreshed::Lost => self.lose(&name, &holder),
                Refreshed::Failed => {
                    tracing::warn!(name = %name, "presence entry not refreshed; retrying at the next refresh");
                }
            }
        }
    }
}

/// Whether `subject` is `<prefix>.<something>`.
fn client_subject(prefix: &str, subject: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// Whether an entry seen on the bucket means our holder (whose last write was `our_revision`)
/// lost the name: a later revision written by another holder. Our own writes, and entries
/// older than ours that arrive late, do not.
fn taken_by_another(our_revision: u64, ours: &str, revision: u64, writer: &str) -> bool {
    revision > our_revision && writer != ours
}

/// Refreshes this gateway's presence entries every TTL/3 and watches the bucket, for as long
/// as the gateway lives. Creates the bucket at start if it is missing; while JetStream cannot
/// be used it retries, backing off from 1 s to 30 s (register answers `UNAVAILABLE`
/// meanwhile, and makes the bucket itself once JetStream is back).
pub(super) async fn maintain(inner: Weak<Inner>) {
    let mut warned = false;
    // Between attempts while JetStream cannot be used: 1 s, doubling to 30 s.
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(names) = inner.upgrade().map(|inner| inner.names.clone()) else {
            return;
        };
        let store = match names.store.store().await {
            Ok(store) => store,
            Err(error) => {
                if !warned {
                    tracing::info!(%error, "named clients and presence wait for JetStream (this NATS has none, or it cannot be reached)");
                    warned = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = names.usable.notified() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        // From the last entry of every key: `known` is brought up to the bucket's state.
        let mut watch = match store.watch_with_history(">").await {
            Ok(watch) => watch,
            Err(error) => {
                tracing::warn!(%error, "presence bucket watch failed; retrying");
                names.store.forget().await;
                drop(names);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        warned = false;
        backoff = Duration::from_secs(1);
        names.watching.store(true, Ordering::Release);
        let mut refresh =
            tokio::time::interval((names.store.ttl() / 3).max(Duration::from_millis(100)));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        drop(names);
        // The keys of the watch's first pass over the bucket (its last entry per key), until
        // it is caught up: then names known from before a cut that are gone are offline.
        let mut first_pass = Some(std::collections::HashSet::new());
        loop {
            tokio::select! {
                _ = refresh.tick() => {
                    let Some(inner) = inner.upgrade() else { return };
                    let names = inner.names.clone();
                    drop(inner);
                    names.refresh_all().await;
                }
                entry = watch.next() => {
                    let Some(inner) = inner.upgrade() else { return };
                    match entry {
                        Some(Ok(entry)) => {
                            inner.names.on_entry(
                                &entry.key,
                                entry.revision,
                                entry.operation,
                                &entry.value,
                            );
                            if let Some(seen) = &mut first_pass {
                                seen.insert(entry.key);
                                if entry.delta == 0 || entry.seen_current {
                                    inner.names.forget_gone(seen);
                                    first_pass = None;
                                }
                            }
                        }
                        _ => {
                            inner.names.watching.store(false, Ordering::Release);
                            inner.names.store.forget().await;
                            tracing::warn!("presence bucket watch ended; starting it again");
                            break;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Gateway {
    fn names(&self) -> &Arc<Names> {
        &self.inner.names
    }

    /// The policy rule for client subjects, applied to plain subscriptions: a pattern inside
    /// `<prefix>.>` is refused (the names' holders receive those messages), one that overlaps
    /// it must be filtered (`Ok(true)`). `Ok(false)`: nothing to add.
    pub(super) fn client_subject_rule(
        &self,
        caller: &Caller,
        pattern: &str,
    ) -> Result<bool, GatewayError> {
        let namespace = self.names().namespace();
        if super::policy::is_subset(pattern, &namespace) {
            return Err(GatewayError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not subscribe {pattern:?}: messages to client names reach only the name's holder (register the name)",
                    caller.authorized().who()
                ),
            ));
        }
        Ok(super::policy::overlaps(pattern, &namespace))
    }

    /// Whether `subject` is a client subject (for the delivery filter).
    pub(super) fn is_client_subject(&self, subject: &str) -> bool {
        self.names().is_client_subject(subject)
    }

    /// Takes `name` for `caller`: messages to `<prefix>.<name>` go to `sink` under `sid`, and
    /// its presence entry says where it is. A holder elsewhere (or on this gateway) loses the
    /// name. `BAD_REQUEST` for an invalid name, `FORBIDDEN` when the policy does not give it,
    /// `OVERLOADED` when the connection holds `max_subscriptions_per_connection` (names and
    /// subscriptions together), `UNAVAILABLE` without JetStream.
    pub async fn register(
        &self,
        caller: &Caller,
        name: &Subject,
        (sid, sink, names_sink): (Id, Arc<dyn DeliverySink>, Arc<dyn NameSink>),
    ) -> Result<Registration, GatewayError> {
        let name = name.as_str();
        validate_name(name)?;
        let identity = caller.identity();
        if !caller
            .authorized()
            .permissions
            .may_take_name(name, own_name(identity))
        {
            return Err(GatewayError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} may not register the name {name:?} (policy: its own name, or a grant's names)",
                    caller.authorized().who()
                ),
            ));
        }
        caller.admit(0)?;
        let slot = caller.subscription_slot(self.inner.live.max_subscriptions_per_connection())?;
        let names = self.names().clone();
        // JetStream first: without it there is no registration.
        names.store.store().await?;
        if !names.watching.load(Ordering::Acquire) {
            // JetStream came back while `maintain` waits: its refreshes are needed now.
            names.usable.notify_one();
        }
        let subject = Subject::from(format!("{}.{name}", names.prefix).as_str());
        let key = fanout::TopicKey {
            subject,
            queue: None,
        };
        let delivery = self
            .join(
                key,
                caller,
                (sid.clone(), Priority::Normal, sink),
                false,
                slot,
            )
            .await?;
        let holder: Arc<str> = format!(
            "{}#{}",
            names.holder_prefix,
            names.next.fetch_add(1, Ordering::Relaxed)
        )
        .into();
        let connected_at = String::from_utf8_lossy(
            &crate::telemetry::audit::format_rfc3339_micros(SystemTime::now()),
        )
        .into_owned();
        let value = PresenceValue {
            gateway: self.id().to_owned(),
            frontend: caller.frontend().as_str().to_owned(),
            connected_at,
            identity: identity.short_form(),
            holder: holder.to_string(),
        };
        let revision = names.store.claim(name, &value).await?;
        let name: Arc<str> = name.into();
        let replaced = lock(&names.held).insert(
            name.clone(),
            Holder {
                holder: holder.clone(),
                caller: caller.clone(),
                sid,
                sink: names_sink,
                _delivery: delivery,
                value,
                revision,
            },
        );
        if let Some(replaced) = replaced {
            replaced.sink.name_lost(&replaced.sid, &name);
        }
        Ok(Registration {
            names,
            name,
            holder,
        })
    }

    /// Counts a named-client op and audits it with its name or pattern as the record's
    /// subject (who took, gave up or asked about which name).
    pub fn note_named(
        &self,
        caller: &Caller,
        op: crate::protocol::Op,
        id: &Id,
        target: Option<&Subject>,
        outcome: Result<(), ErrorCode>,
    ) {
        self.inner
            .metrics
            .operation_or_invalid(caller.frontend(), Some(op), outcome);
        let audit = &self.inner.audit;
        if audit.is_on() {
            let mut record = caller.record(op).id(id.clone()).outcome(outcome);
            if let Some(target) = target {
                record = record.subject(target.clone());
            }
            audit.record(record);
        }
    }

    /// After a policy reload: every name held here whose holder the new policy no longer
    /// gives it is lost (its client is told `name_lost`; its entry is deleted).
    pub(super) fn recheck_names(&self) {
        let names = self.names();
        let held: Vec<(Arc<str>, Arc<str>, Caller)> = lock(&names.held)
            .iter()
            .map(|(name, held)| (name.clone(), held.holder.clone(), held.caller.clone()))
            .collect();
        for (name, holder, caller) in held {
            let caller = self.refreshed(&caller).unwrap_or(caller);
            let permissions = &caller.authorized().permissions;
            if !permissions.may_take_name(&name, own_name(caller.identity())) {
                let revision = lock(&names.held).get(&name).map(|held| held.revision);
                names.lose(&name, &holder);
                if let Some(revision) = revision {
                    names.delete_entry(name.to_string(), revision);
                }
            }
        }
        let mut ended = Vec::new();
        lock(&names.watchers).retain(|watcher| {
            let caller = self.refreshed(&watcher.caller);
            let caller = caller.as_ref().unwrap_or(&watcher.caller);
            match self.check_presence(caller, &watcher.pattern) {
                Ok(()) => true,
                Err(error) => {
                    ended.push((watcher.sid.clone(), watcher.sink.clone(), error));
                    false
                }
            }
        });
        // Told outside the lock: a sink may take it (a dropped watch removes itself).
        for (sid, sink, error) in ended {
            sink.watch_ended(&sid, error);
        }
    }

    /// Where `name` is: online with its gateway, or offline. The caller must be allowed to see
    /// it (`FORBIDDEN` otherwise).
    pub async fn presence(
        &self,
        caller: &Caller,
        name: &Subject,
    ) -> Result<PresenceInfo, GatewayError> {
        let name = name.as_str();
        validate_name(name)?;
        self.check_presence(caller, name)?;
        caller.admit(0)?;
        self.names().store.lookup(name).await
    }

    /// `presence` for operators (`GET /presence`), whose access the HTTP route checked.
    pub async fn presence_of(&self, name: &str) -> Result<PresenceInfo, GatewayError> {
        validate_name(name)?;
        self.names().store.lookup(name).await
    }

    fn check_presence(&self, caller: &Caller, pattern: &str) -> Result<(), GatewayError> {
        if caller
            .authorized()
            .permissions
            .may_see_presence(pattern, own_name(caller.identity()))
        {
            return Ok(());
        }
        Err(GatewayError::new(
            ErrorCode::Forbidden,
            format!(
                "{} may not see the presence of {pattern:?} (policy: a grant's presence)",
                caller.authorized().who()
            ),
        ))
    }

    /// Streams presence changes of the names `pattern` matches to `sink` under `sid`, until
    /// the returned watch is dropped.
    pub fn presence_watch(
        &self,
        caller: &Caller,
        pattern: &Subject,
        (sid, sink): (Id, Arc<dyn NameSink>),
    ) -> Result<PresenceWatch, GatewayError> {
        let pattern = pattern.as_str();
        validate_subject(pattern, SubjectUse::Subscribe)?;
        self.check_presence(caller, pattern)?;
        caller.admit(0)?;
        let names = self.names().clone();
        if !names.watching.load(Ordering::Acquire) {
            return Err(GatewayError::new(
                ErrorCode::Unavailable,
                "presence watches need JetStream, and the presence bucket is not being watched yet; retry",
            ));
        }
        let key = names.next.fetch_add(1, Ordering::Relaxed);
        lock(&names.watchers).push(Watcher {
            key,
            sid,
            pattern: pattern.into(),
            sink,
            caller: caller.clone(),
        });
        Ok(PresenceWatch { names, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Frontend;

    #[test]
    fn only_a_later_entry_of_another_holder_takes_a_name() {
        assert!(taken_by_another(5, "gw-1#1#1", 6, "gw-2#1#1"));
        assert!(
            !taken_by_another(5, "gw-1#1#1", 6, "gw-1#1#1"),
            "our refresh"
        );
        assert!(
            !taken_by_another(7, "gw-1#1#2", 6, "gw-2#1#1"),
            "an older entry, late"
        );
        assert!(
            !taken_by_another(7, "gw-1#1#2", 7, "gw-1#1#2"),
            "our own write"
        );
    }

    #[test]
    fn client_subjects_are_the_prefix_and_a_dot() {
        assert!(client_subject("client", "client.bob"));
        assert!(client_subject("client", "client.team.x"));
        assert!(!client_subject("client", "client"));
        assert!(!client_subject("client", "clients.bob"));
        assert!(!client_subject("client", "other.client.bob"));
    }

    #[test]
    fn names_are_subject_tails_that_a_kv_key_allows() {
        for good in ["bob", "team.x", "a-b_c=d/e", "B0b"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "a..b", "team.*", "team.>", "a b", "bob@host", ".a", "a.",
        ] {
            let error = validate_name(bad).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest, "{bad}");
        }
        assert!(validate_name(&"a".repeat(257)).is_err());
    }

    #[test]
    fn own_name_is_the_user_name_or_the_token_subject() {
        let local = Identity {
            uid: Some(1000),
            user: Some("alice".into()),
            ..Identity::anonymous(Frontend::Uds, None)
        };
        assert_eq!(own_name(&local), Some("alice"));
        let token = Identity {
            sub: Some("bob".into()),
            ..Identity::anonymous(Frontend::Ws, None)
        };
        assert_eq!(own_name(&token), Some("bob"));
        assert_eq!(own_name(&Identity::anonymous(Frontend::Ws, None)), None);
        let odd = Identity {
            sub: Some("bob smith".into()),
            ..Identity::anonymous(Frontend::Ws, None)
        };
        assert_eq!(own_name(&odd), None);
    }
}
