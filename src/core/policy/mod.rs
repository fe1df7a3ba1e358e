//! The subject policy: who may publish, request and subscribe to which subjects. A `Policy` is
//! the parsed `--policy` file (docs/policy.md has the format), or `Policy::allow_all()` when
//! there is none; `resolve` turns it into one identity's `Permissions`, once per connection and
//! again after a reload, and the core asks those on every operation and, for a filtered
//! subscription, every delivered message.
//!
//! The rules, in short:
//! - An identity's permissions for an operation are the union of the allows of every grant whose
//!   `match` it satisfies (all of that match's keys), minus the union of their denies: deny
//!   wins. No matching grant: nothing is allowed.
//! - Reserved namespaces (`subjects::RESERVED`: `$SYS.>`, `$JS.>`, `$KV.>`, `$O.>`, `_INBOX.>`,
//!   `_IPC_GATEWAY.>`) are granted only by an allow pattern that lies inside the namespace (is a
//!   subset of it: `$JS.API.INFO`, `$JS.>`); a pattern that also covers other subjects (`>`,
//!   `*.>`, `*.API.INFO`) grants nothing there.
//! - A subscription is allowed when one allow pattern covers it; it is refused when it lies
//!   inside a deny or wholly inside an ungranted reserved namespace; when it overlaps denied or
//!   reserved subjects it is `Filtered`, and each delivery is checked with `may_receive`.
//! - Without a policy, everything but the reserved namespaces is allowed to everyone.
//!
//! Pure logic, apart from `Policy::load` reading the file.

mod file;
mod grant;
mod permissions;
pub mod subjects;

use std::path::Path;
use std::sync::Arc;

pub use file::PolicyError;
pub use permissions::{Permissions, SubscribeDecision};
pub use subjects::{RESERVED, intersection, is_subset, matches, overlaps, validate_pattern};

use grant::Grant;

/// Who is asking, as the front-end established it at connection time. A field that is not known
/// for this identity is `None` (or empty) and a grant that matches on it does not match.
#[derive(Debug, Clone, Copy, Default)]
pub struct Who<'a> {
    /// The peer's uid (Unix socket: SO_PEERCRED).
    pub uid: Option<u32>,
    /// The peer's primary gid.
    pub gid: Option<u32>,
    /// Supplementary gids.
    pub groups: &'a [u32],
    /// The uid's user name.
    pub user: Option<&'a str>,
    /// The primary gid's group name.
    pub group: Option<&'a str>,
    /// Supplementary group names.
    pub group_names: &'a [String],
    /// A verified token's `sub` claim.
    pub sub: Option<&'a str>,
    /// A verified client certificate's subject (`Identity::cert`'s RFC 4514 form).
    pub cert: Option<&'a str>,
    /// No credentials were presented (WebSocket or gRPC without a token).
    pub anonymous: bool,
}

/// A parsed policy file, or the policy in force without one. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Rules,
}

#[derive(Debug, Clone)]
enum Rules {
    /// No `--policy`: the same permissions for everyone, made once.
    AllowAll(Permissions),
    /// The file's grants, in file order.
    Grants(Arc<[Grant]>),
}

impl Policy {
    /// The policy without a `--policy` file: every identity may publish, request and subscribe
    /// to every subject except the reserved ones, and nobody sees `/status` detail.
    pub fn allow_all() -> Policy {
        Policy {
            rules: Rules::AllowAll(Permissions::allow_all()),
        }
    }

    /// Reads a policy from its TOML text; errors name the grant and field (not the file: see
    /// `load`).
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        Ok(Policy {
            rules: Rules::Grants(file::parse(text)?.into()),
        })
    }

    /// Reads the policy file at `path` (blocking file I/O: at start-up, or off the runtime's
    /// threads on reload). Errors name the file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::parse(&text).map_err(|error| error.in_file(path))
    }

    /// This identity's permissions: the union of every matching grant.
    pub fn resolve(&self, who: &Who<'_>) -> Permissions {
        match &self.rules {
            Rules::AllowAll(permissions) => permissions.clone(),
            Rules::Grants(grants) => {
                Permissions::union(grants.iter().filter(|grant| grant.to.matches(who)).map(
                    |grant| {
                        (
                            &grant.publish,
                            &grant.subscribe,
                            &grant.request,
                            grant.status,
                            &grant.named,
                        )
                    },
                ))
            }
        }
    }

    /// Whether this is `allow_all()` (no policy file).
    pub fn is_allow_all(&self) -> bool {
        matches!(self.rules, Rules::AllowAll(_))
    }

    /// How many grants the file has (0 for `allow_all()`), for logs.
    pub fn grant_count(&self) -> usize {
        match &self.rules {
            Rules::AllowAll(_) => 0,
            Rules::Grants(grants) => grants.len(),
        }
    }
}

#[cfg(test)]
mod tests;
