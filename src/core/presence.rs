//! Presence in JetStream KV: the bucket `presence_bucket` maps a client name to where its holder
//! is connected (`PresenceValue`). Every write checks a revision, so that the newest holder's
//! entry is never overwritten by a gateway that lost the name:
//!
//! - `claim` (register): create, or replace whatever entry is there with `update(revision)`:
//!   the newer registration wins (a client that reconnects elsewhere replaces its stale entry);
//! - `refresh` (every `presence_ttl_ms / 3`): `update(revision)` with the revision this gateway
//!   wrote last; when that fails, the entry is read: another holder's entry means the name was
//!   lost, a deleted or expired one is created again;
//! - `release` (clean close, unregister): delete with the expected revision.
//!
//! The bucket's `max_age` is `presence_ttl_ms` and it keeps limit markers, so an entry whose
//! gateway died (killed -9) expires after the TTL and watchers see a delete marker.
//!
//! The bucket handle is made (and the bucket created if missing) on first use and kept; an
//! error forgets it, so the next use makes it again on a connected pool connection.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, Store};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::pool::NatsPool;
use crate::protocol::{ErrorCode, GatewayError, PresenceInfo};

/// A presence entry's value (JSON in the bucket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceValue {
    pub gateway: String,
    pub frontend: String,
    /// RFC 3339, UTC.
    pub connected_at: String,
    /// The holder's identity, short form.
    pub identity: String,
    /// Which registration wrote it (`<gateway>#<start ms>#<n>`): how a gateway tells its own
    /// entry from a newer holder's.
    pub holder: String,
}

impl PresenceValue {
    pub fn info(&self, name: &str) -> PresenceInfo {
        PresenceInfo {
            name: name.to_owned(),
            online: true,
            gateway: Some(self.gateway.clone()),
            frontend: Some(self.frontend.clone()),
            connected_at: Some(self.connected_at.clone()),
            identity: Some(self.identity.clone()),
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8]) -> Option<PresenceValue> {
        serde_json::from_slice(bytes).ok()
    }
}

/// What a refresh found.
#[derive(Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// Still ours, at this revision.
    Held(u64),
    /// Another holder's entry is there: the name was lost.
    Lost,
    /// JetStream could not be asked; try again at the next refresh.
    Failed,
}

pub struct PresenceStore {
    bucket: String,
    ttl: Duration,
    pool: Arc<NatsPool>,
    store: tokio::sync::Mutex<Option<Store>>,
}

/// How many times a claim re-reads the entry when another writer got in between.
const CLAIM_ATTEMPTS: usize = 5;

impl PresenceStore {
    pub fn new(bucket: String, ttl: Duration, pool: Arc<NatsPool>) -> PresenceStore {
        PresenceStore {
            bucket,
            ttl,
            pool,
            store: tokio::sync::Mutex::new(None),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The bucket, made (and created if missing) when there is none yet. `UNAVAILABLE` with
    /// the reason when JetStream cannot be used.
    pub async fn store(&self) -> Result<Store, GatewayError> {
        let mut cached = self.store.lock().await;
        if let Some(store) = &*cached {
            return Ok(store.clone());
        }
        let client = self.pool.client_on(0)?.client;
        let js = async_nats::jetstream::new(client);
        let made = match js.get_key_value(&self.bucket).await {
            Ok(store) => Ok(store),
            // Three replicas on a cluster (presence survives a node), one on a single server.
            Err(_) => match js.create_key_value(self.config(3)).await {
                Ok(store) => Ok(store),
                Err(_) => match js.create_key_value(self.config(1)).await {
                    Ok(store) => Ok(store),
                    // Another gateway created it in between (perhaps with another TTL).
                    Err(create) => js
                        .get_key_value(&self.bucket)
                        .await
                        .map_err(|_| create.to_string()),
                },
            },
        };
        let store = made.map_err(|why| {
            GatewayError::new(
                ErrorCode::Unavailable,
                format!(
                    "named clients need JetStream, and the presence bucket {:?} cannot be used: {why}",
                    self.bucket
                ),
            )
        })?;
        *cached = Some(store.clone());
        Ok(store)
    }

    fn config(&self, replicas: usize) -> kv::Config {
        kv::Config {
            num_replicas: replicas,
            bucket: self.bucket.clone(),
            description: "ipc-gateway presence: where each named client is connected".into(),
            history: 1,
            max_age: self.ttl,
            // Expiry leaves a delete marker that watchers see (nats-server 2.11 or newer);
            // the marker itself is kept for one TTL (at least a second, the server's minimum).
            limit_markers: Some(self.ttl.max(Duration::from_secs(1))),
            ..kv::Config::default()
        }
    }

    /// After an error: the next use makes the handle again (its connection may be gone).
    pub async fn forget(&self) {
        *self.store.lock().await = None;
    }

    fn unavailable(&self, what: &str, error: impl std::fmt::Display) -> GatewayError {
        GatewayError::new(
            ErrorCode::Unavailable,
            format!("the presence bucket could not {what}: {error}"),
        )
    }

    /// Writes `value` for `name` whatever entry is there (create, or update at the revision
    /// read); returns the revision written.
    pub async fn claim(&self, name: &str, value: &PresenceValue) -> Result<u64, GatewayError> {
        let store = self.store().await?;
        let bytes = value.encode();
        let mut last = None;
        for _ in 0..CLAIM_ATTEMPTS {
            match store.create(name, bytes.clone()).await {
                Ok(revision) => return Ok(revision),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(error) => {
                    self.forget().await;
                    return Err(self.unavailable("be written", error));
                }
            }
            let entry = store
                .entry(name)
                .await
                .map_err(|error| self.unavailable("be read", error))?;
            let Some(entry) = entry else { continue };
            match store.update(name, bytes.clone(), entry.revision).await {
                Ok(revision) => return Ok(revision),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    last = Some(error.to_string());
                }
                Err(error) => {
                    self.forget().await;
                    return Err(self.unavailable("be written", error));
                }
            }
        }
        Err(GatewayError::new(
            ErrorCode::Unavailable,
            format!(
                "the presence of {name:?} changed {CLAIM_ATTEMPTS} times while it was being written; retry ({})",
                last.unwrap_or_default()
            ),
        ))
    }

    /// Rewrites our entry at `revision` (which keeps it from expiring).
    pub async fn refresh(&self, name: &str, value: &PresenceValue, revision: u64) -> Refreshed {
        let Ok(store) = self.store().await else {
            return Refreshed::Failed;
        };
        let bytes = value.encode();
        match store.update(name, bytes.clone(), revision).await {
            Ok(revision) => return Refreshed::Held(revision),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(_) => {
                self.forget().await;
                return Refreshed::Failed;
            }
        }
        // Someone wrote or removed the entry since our last write.
        let entry = match store.entry(name).await {
            Ok(entry) => entry,
            Err(_) => return Refreshed::Failed,
        };
        match entry {
            Some(entry) if entry.operation == Operation::Put => {
                match PresenceValue::decode(&entry.value) {
                    Some(theirs) if theirs.holder == value.holder => {
                        match store.update(name, bytes, entry.revision).await {
                            Ok(revision) => Refreshed::Held(revision),
                            Err(_) => Refreshed::Failed,
                        }
                    }
                    _ => Refreshed::Lost,
                }
            }
            // Deleted or expired (our refreshes could not get through for a TTL): nobody
            // else holds it, so the entry is made again.
            _ => match store.create(name, bytes).await {
                Ok(revision) => Refreshed::Held(revision),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Refreshed::Lost,
                Err(_) => Refreshed::Failed,
            },
        }
    }

    /// Deletes our entry, only if it is still at `revision` (a newer holder's stays).
    pub async fn release(&self, name: &str, revision: u64) {
        let Ok(store) = self.store().await else {
            return;
        };
        if let Err(error) = store.delete_expect_revision(name, Some(revision)).await {
            tracing::debug!(name, %error, "presence entry not deleted (a newer holder's, or JetStream is away)");
        }
    }

    /// Where `name` is held, if anywhere.
    pub async fn lookup(&self, name: &str) -> Result<PresenceInfo, GatewayError> {
        let store = self.store().await?;
        let entry = match store.entry(name).await {
            Ok(entry) => entry,
            Err(error) => {
                self.forget().await;
                return Err(self.unavailable("be read", error));
            }
        };
        Ok(entry
            .filter(|entry| entry.operation == Operation::Put)
            .and_then(|entry| PresenceValue::decode(&entry.value))
            .map_or_else(|| PresenceInfo::offline(name), |value| value.info(name)))
    }
}
