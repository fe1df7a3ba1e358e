//! Who may do what: the policy in force (reloaded atomically), the JWT verifier, the cache of
//! local users, per-identity connection counts, and `Authorized`: an identity with the
//! permissions the policy gives it and the identity headers every message it sends carries.
//! The core asks this module before anything reaches NATS.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};

use super::auth::{JwtVerifier, LocalIdentities};
use super::policy::{Permissions, Policy, PolicyError, Who};
use crate::config::{Config, IdentityHeaders};
use crate::protocol::identity::GATEWAY_ID_HEADER;
use crate::protocol::{ErrorCode, Frontend, GatewayError, Identity};
use crate::telemetry::audit::AuditIdentity;

/// How long a local user's names and groups are remembered.
const LOCAL_NAMES_TTL: Duration = Duration::from_secs(60);

/// An identity and what the policy in force (`version`) lets it do.
pub struct Authorized {
    pub identity: Identity,
    pub permissions: Permissions,
    pub version: u64,
    /// Which `Ipc-Gateway-*` headers its messages carry (`identity_headers`).
    stamps: Stamping,
    /// Those headers, made on the first message that needs them: a connection that never
    /// sends (an idle or subscribe-only one) keeps none of them.
    stamp: std::sync::OnceLock<Stamp>,
    /// The identity as audit records show it, made on the first record (never when the
    /// audit log is off).
    audit: std::sync::OnceLock<Arc<AuditIdentity>>,
}

/// The `Ipc-Gateway-*` headers that `form` (`identity_headers`) stamps on the messages of
/// `identity`, as names and values; `gateway_id` goes in `Ipc-Gateway-Id` (`full` only).
pub fn identity_headers(
    identity: &Identity,
    form: IdentityHeaders,
    gateway_id: &str,
) -> Vec<(&'static str, String)> {
    match form {
        IdentityHeaders::Full => {
            let mut all = identity.headers();
            all.push((GATEWAY_ID_HEADER, gateway_id.to_owned()));
            all
        }
        IdentityHeaders::Minimal => identity.minimal_headers(),
        IdentityHeaders::Off => Vec::new(),
    }
}

/// `identity_headers` and this gateway's id, as `Authorized::stamp` needs them.
#[derive(Clone)]
struct Stamping {
    form: IdentityHeaders,
    gateway_id: Arc<str>,
}

impl Stamping {
    fn new(config: &Config) -> Stamping {
        Stamping {
            form: config.identity_headers,
            gateway_id: config.resolved_gateway_id().into(),
        }
    }
}

/// The `Ipc-Gateway-*` headers of one identity.
pub(super) struct Stamp {
    /// Empty when nothing is stamped (`off`, or `minimal` for an anonymous caller).
    pub list: Vec<(HeaderName, HeaderValue)>,
    /// The same headers as a ready map (`None` when it is empty): a message without
    /// headers of its own is sent with a clone of it, which (with the vendored async-nats's
    /// shared map) is a reference count.
    pub map: Option<HeaderMap>,
}

impl Authorized {
    /// The identity as audit records show it, made once.
    pub(super) fn audit_identity(&self) -> Arc<AuditIdentity> {
        let identity = &self.identity;
        self.audit
            .get_or_init(|| {
                Arc::new(AuditIdentity {
                    uid: identity.uid,
                    gid: identity.gid,
                    pid: identity.pid,
                    user: identity.user.clone(),
                    group: identity.group.clone(),
                    sub: identity.sub.clone(),
                    cert: identity.cert.clone(),
                    addr: identity.addr.clone(),
                })
            })
            .clone()
    }

    /// The identity headers its messages carry, made once.
    pub(super) fn stamp(&self) -> &Stamp {
        self.stamp.get_or_init(|| {
            let Stamping { form, gateway_id } = &self.stamps;
            let list: Vec<(HeaderName, HeaderValue)> =
                identity_headers(&self.identity, *form, gateway_id)
                    .into_iter()
                    .filter_map(|(name, value)| Some((name.parse().ok()?, value.parse().ok()?)))
                    .collect();
            let map = (!list.is_empty()).then(|| list.iter().cloned().collect());
            Stamp { list, map }
        })
    }

    /// The short form for messages and logs.
    pub fn who(&self) -> String {
        self.identity.short_form()
    }
}

/// The policy in force and its version (bumped by every successful reload).
struct PolicyState {
    policy: Policy,
    version: u64,
}

pub struct Access {
    policy_file: Option<PathBuf>,
    state: RwLock<Arc<PolicyState>>,
    /// `state`'s version, read on every command (`refreshed`) without taking the lock.
    version: AtomicU64,
    jwt: Option<JwtVerifier>,
    locals: Arc<LocalIdentities>,
    /// Which identity headers messages carry.
    stamping: Stamping,
    auth_required: bool,
    /// `max_connections_per_identity`, changed by a reload (connections made while it was 0
    /// are not counted under a new limit).
    max_per_identity: std::sync::atomic::AtomicUsize,
    /// Connections per identified caller (only counted when `max_per_identity` is set).
    per_identity: Arc<Mutex<HashMap<String, usize>>>,
    /// The last `Authorized` made for an anonymous caller of each front-end (index: the
    /// front-end): browsers without a token are all the same caller, and share one instead of
    /// holding about 350 bytes each.
    anonymous: Mutex<[Option<Arc<Authorized>>; Frontend::ALL.len()]>,
}

impl Access {
    /// Loads the policy and the JWT keys; an error names the file and what is wrong.
    pub fn new(config: &Config) -> Result<Access, String> {
        let policy = match &config.policy {
            Some(path) => Policy::load(path).map_err(|e| e.to_string())?,
            None => Policy::allow_all(),
        };
        let jwt = JwtVerifier::from_files(
            config.auth_jwt_secret_file.as_deref(),
            config.auth_jwt_public_key_file.as_deref(),
            config.auth_jwt_audience.clone(),
        )?;
        if config.auth_required && jwt.is_none() {
            return Err(
                "auth_required needs auth_jwt_secret_file or auth_jwt_public_key_file to verify tokens with"
                    .into(),
            );
        }
        Ok(Access {
            policy_file: config.policy.clone(),
            state: RwLock::new(Arc::new(PolicyState { policy, version: 1 })),
            version: AtomicU64::new(1),
            jwt,
            locals: Arc::new(LocalIdentities::new(LOCAL_NAMES_TTL)),
            stamping: Stamping::new(config),
            auth_required: config.auth_required,
            max_per_identity: config.max_connections_per_identity.into(),
            per_identity: Arc::default(),
            anonymous: Mutex::default(),
        })
    }

    fn state(&self) -> Arc<PolicyState> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Resolves what `identity` may do under the policy in force.
    pub fn authorize(&self, identity: Identity) -> Arc<Authorized> {
        let state = self.state();
        let shared = identity
            .is_anonymous()
            .then_some(identity.frontend as usize);
        if let Some(index) = shared
            && let Some(last) = &self.last_anonymous()[index]
            && last.version == state.version
            && last.identity == identity
        {
            return last.clone();
        }
        let permissions = state.policy.resolve(&who(&identity));
        let authorized = Arc::new(Authorized {
            audit: std::sync::OnceLock::new(),
            identity,
            permissions,
            version: state.version,
            stamps: self.stamping.clone(),
            stamp: std::sync::OnceLock::new(),
        });
        if let Some(index) = shared {
            self.last_anonymous()[index] = Some(authorized.clone());
        }
        authorized
    }

    fn last_anonymous(
        &self,
    ) -> std::sync::MutexGuard<'_, [Option<Arc<Authorized>>; Frontend::ALL.len()]> {
        self.anonymous
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The same identity under the policy in force now, when it changed since `who` was made.
    pub fn refreshed(&self, who: &Arc<Authorized>) -> Option<Arc<Authorized>> {
        (who.version != self.version()).then(|| self.authorize(who.identity.clone()))
    }

    /// A bearer token's identity, or `UNAUTHENTICATED`.
    pub fn verify(
        &self,
        token: &str,
        frontend: Frontend,
        addr: Option<String>,
    ) -> Result<Identity, GatewayError> {
        let Some(jwt) = &self.jwt else {
            return Err(GatewayError::new(
                ErrorCode::Unauthenticated,
                "this gateway accepts no tokens (no --auth-jwt-secret-file or --auth-jwt-public-key-file)",
            ));
        };
        Ok(jwt.verify(token)?.identity(frontend, addr))
    }

    pub fn auth_required(&self) -> bool {
        self.auth_required
    }

    /// A Unix-socket peer's identity (names looked up at most once a minute per user, off the
    /// async threads: the name service may be slow).
    pub async fn local(&self, uid: u32, gid: u32, pid: Option<i32>) -> Identity {
        let locals = self.locals.clone();
        let resolve = move || locals.resolve(uid, gid, pid, std::time::Instant::now());
        match tokio::task::spawn_blocking(resolve).await {
            Ok(identity) => identity,
            // The lookup panicked: the kernel's numbers are still the identity.
            Err(_) => Identity {
                uid: Some(uid),
                gid: Some(gid),
                pid,
                ..Identity::anonymous(Frontend::Uds, None)
            },
        }
    }

    /// A reload's `max_connections_per_identity`.
    pub fn set_max_per_identity(&self, max: usize) {
        self.max_per_identity
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a new connection of an identified caller against `max_connections_per_identity`.
    pub fn lease(&self, identity: &Identity) -> Result<Option<IdentityLease>, GatewayError> {
        let max = self
            .max_per_identity
            .load(std::sync::atomic::Ordering::Relaxed);
        if max == 0 || identity.is_anonymous() {
            return Ok(None);
        }
        let key = identity_key(identity);
        let mut counts = self
            .per_identity
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            return Err(GatewayError::new(
                ErrorCode::Overloaded,
                format!(
                    "{key} holds its maximum of {max} connections (--max-connections-per-identity); retry later"
                ),
            ));
        }
        *count += 1;
        Ok(Some(IdentityLease {
            counts: self.per_identity.clone(),
            key,
        }))
    }

    /// Reads the policy file again. A file that does not load keeps the policy in force.
    pub async fn reload_policy(&self) -> Result<Option<u64>, PolicyError> {
        let Some(path) = self.policy_file.clone() else {
            return Ok(None);
        };
        let loaded = tokio::task::spawn_blocking(move || Policy::load(&path))
            .await
            .map_err(|join| PolicyError::Read {
                path: PathBuf::new(),
                source: std::io::Error::other(join.to_string()),
            })??;
        let version = {
            let mut state = self
                .state
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let version = state.version + 1;
            *state = Arc::new(PolicyState {
                policy: loaded,
                version,
            });
            self.version.store(version, Ordering::Release);
            version
        };
        Ok(Some(version))
    }
}

/// What the policy matches an identity by.
fn who(identity: &Identity) -> Who<'_> {
    Who {
        uid: identity.uid,
        gid: identity.gid,
        groups: &identity.groups,
        user: identity.user.as_deref(),
        group: identity.group.as_deref(),
        group_names: &identity.group_names,
        sub: identity.sub.as_deref(),
        cert: identity.cert.as_deref(),
        anonymous: identity.is_anonymous(),
    }
}

/// The name connections are counted under: the uid for local users, else the token's subject,
/// else the certificate's subject.
fn identity_key(identity: &Identity) -> String {
    match (identity.uid, &identity.sub, &identity.cert) {
        (Some(uid), _, _) => format!("uid={uid}"),
        (None, Some(sub), _) => format!("sub={sub}"),
        (None, None, Some(cert)) => format!("cert={cert}"),
        (None, None, None) => "anonymous".into(),
    }
}

/// One connection counted against its identity; given back when dropped.
pub struct IdentityLease {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for IdentityLease {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn anonymous_callers_of_a_front_end_share_one_authorized_until_a_reload() {
        let dir = std::env::temp_dir().join(format!("access-anon-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            "[[grant]]\nmatch = { user = \"orders\" }\npublish = { allow = [\"orders.>\"] }\n",
        )
        .unwrap();
        let config = Config {
            policy: Some(policy),
            ..Config::default()
        };
        let access = Access::new(&config).unwrap();
        let ws = || Identity::anonymous(Frontend::Ws, None);
        let first = access.authorize(ws());
        assert!(Arc::ptr_eq(&first, &access.authorize(ws())), "shared");
        let grpc = access.authorize(Identity::anonymous(
            Frontend::Grpc,
            Some("10.0.0.1:5".into()),
        ));
        assert!(!Arc::ptr_eq(&first, &grpc));
        assert_eq!(grpc.identity.addr.as_deref(), Some("10.0.0.1:5"));
        let mut named = ws();
        named.sub = Some("alice".into());
        let alice = access.authorize(named.clone());
        assert!(
            !Arc::ptr_eq(&alice, &access.authorize(named)),
            "identified: one each"
        );
        // A reload makes a new one under the new policy.
        access.reload_policy().await.unwrap();
        let after = access.authorize(ws());
        assert!(!Arc::ptr_eq(&first, &after));
        assert_eq!(after.version, access.version());
        assert!(Arc::ptr_eq(&after, &access.authorize(ws())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
