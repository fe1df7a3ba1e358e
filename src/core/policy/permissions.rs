//! What one identity may do, resolved once from the grants that match it (per connection, and
//! again after a reload) and then asked on every operation and every delivered message. Each
//! operation's rules are the union of the matching grants' allows and denies, with patterns a
//! broader one of the same list already covers dropped, and, per reserved namespace, the allows
//! that lie inside it (the only ones that grant reserved subjects).

use std::sync::Arc;

use super::grant::{NameRules, OpRules};
use super::subjects::{
    RESERVED, intersection, is_concrete, is_subset, matches, overlaps, reserved_namespace,
    validate_pattern,
};

/// The answer to a subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// Refused (`FORBIDDEN`): no single allow pattern covers the requested pattern, or every
    /// subject it matches is denied (it lies inside a deny pattern, or inside a reserved
    /// namespace that no allow names).
    Denied,
    /// Every message the subscription can receive may be delivered: no delivery check needed.
    Allowed,
    /// Allowed, but some subjects it matches are denied or reserved: deliver a message only if
    /// `Permissions::may_receive` says so.
    Filtered,
}

/// One operation's resolved rules. Boxed slices: a connection holds three of these, and most
/// hold no explicit allow at all.
#[derive(Debug, Clone, Default)]
struct Rules {
    /// Allows, none a subset of another.
    allow: Box<[Arc<str>]>,
    /// Denies, none a subset of another.
    deny: Box<[Arc<str>]>,
    /// The allows that lie inside a reserved namespace, each with the namespace's index in
    /// `RESERVED`; none a subset of another.
    explicit: Box<[(usize, Arc<str>)]>,
}

impl Rules {
    fn new(allow: Vec<Arc<str>>, deny: Vec<Arc<str>>) -> Rules {
        let allow = sorted_unique(allow);
        let explicit = without_covered_by_others(
            allow
                .iter()
                .filter(|pattern| RESERVED.iter().any(|ns| is_subset(pattern, ns)))
                .cloned()
                .collect(),
        )
        .into_iter()
        .filter_map(|pattern| {
            let namespace = RESERVED.iter().position(|ns| is_subset(&pattern, ns))?;
            Some((namespace, pattern))
        })
        .collect();
        Rules {
            // An explicit allow that a broader one also covers stays in `explicit`; `allow`
            // needs only the broadest.
            allow: without_covered_by_others(allow).into(),
            deny: without_covered_by_others(sorted_unique(deny)).into(),
            explicit,
        }
    }

    /// The explicit allows of one reserved namespace.
    fn explicit(&self, namespace: usize) -> impl Iterator<Item = &str> {
        self.explicit
            .iter()
            .filter(move |(of, _)| *of == namespace)
            .map(|(_, pattern)| &**pattern)
    }

    /// Whether a wildcard-free subject is allowed: an allow matches it (an explicit one if it is
    /// reserved) and no deny does.
    fn permits(&self, subject: &str) -> bool {
        let allowed = match reserved_namespace(subject) {
            Some(namespace) => self
                .explicit(namespace)
                .any(|pattern| matches(pattern, subject)),
            None => self.allow.iter().any(|pattern| matches(pattern, subject)),
        };
        allowed && !self.deny.iter().any(|pattern| matches(pattern, subject))
    }

    fn subscribe(&self, pattern: &str) -> SubscribeDecision {
        if validate_pattern(pattern).is_err()
            || !self.allow.iter().any(|allow| is_subset(pattern, allow))
            || self.deny.iter().any(|deny| is_subset(pattern, deny))
        {
            return SubscribeDecision::Denied;
        }
        let mut filtered = self.deny.iter().any(|deny| overlaps(pattern, deny));
        for (index, namespace) in RESERVED.iter().enumerate() {
            let Some(inside) = intersection(pattern, namespace) else {
                continue;
            };
            if self.explicit(index).any(|allow| is_subset(&inside, allow)) {
                // Whatever it matches in this namespace is granted by name.
                continue;
            }
            if is_subset(pattern, namespace)
                && !self.explicit(index).any(|allow| overlaps(pattern, allow))
            {
                // Wholly inside a namespace that no allow names: nothing could be delivered.
                return SubscribeDecision::Denied;
            }
            filtered = true;
        }
        if filtered {
            SubscribeDecision::Filtered
        } else {
            SubscribeDecision::Allowed
        }
    }
}

/// Sorted, without duplicates.
fn sorted_unique(mut patterns: Vec<Arc<str>>) -> Vec<Arc<str>> {
    patterns.sort();
    patterns.dedup();
    patterns
}

/// Drops every pattern another of the (distinct) patterns covers. Two distinct well-formed
/// patterns never cover each other, so exactly the redundant ones go.
fn without_covered_by_others(patterns: Vec<Arc<str>>) -> Vec<Arc<str>> {
    patterns
        .iter()
        .filter(|pattern| {
            !patterns
                .iter()
                .any(|other| other != *pattern && is_subset(pattern, other))
        })
        .cloned()
        .collect()
}

#[derive(Debug)]
struct Resolved {
    publish: Rules,
    subscribe: Rules,
    request: Rules,
    status: bool,
    /// Names it may register besides its own (patterns), and whose presence it may see.
    names: Box<[Arc<str>]>,
    presence: Box<[Arc<str>]>,
}

/// What one identity may do. Cheap to clone (an `Arc` inside), `Send + Sync`. Patterns are
/// matched in place: no check allocates, except `may_subscribe`'s (once per subscribe).
#[derive(Debug, Clone)]
pub struct Permissions(Arc<Resolved>);

impl Permissions {
    /// Unions the given grants' rules (the grants that match one identity).
    pub(super) fn union<'a>(
        grants: impl IntoIterator<Item = (&'a OpRules, &'a OpRules, &'a OpRules, bool, &'a NameRules)>,
    ) -> Permissions {
        let mut publish = OpRules::default();
        let mut subscribe = OpRules::default();
        let mut request = OpRules::default();
        let mut status = false;
        let mut named = NameRules::default();
        for (p, s, r, may_see_status, n) in grants {
            for (into, from) in [(&mut publish, p), (&mut subscribe, s), (&mut request, r)] {
                into.allow.extend(from.allow.iter().cloned());
                into.deny.extend(from.deny.iter().cloned());
            }
            status |= may_see_status;
            named.names.extend(n.names.iter().cloned());
            named.presence.extend(n.presence.iter().cloned());
        }
        Permissions(Arc::new(Resolved {
            publish: Rules::new(publish.allow, publish.deny),
            subscribe: Rules::new(subscribe.allow, subscribe.deny),
            request: Rules::new(request.allow, request.deny),
            status,
            names: without_covered_by_others(sorted_unique(named.names)).into(),
            presence: without_covered_by_others(sorted_unique(named.presence)).into(),
        }))
    }

    /// Everything except the reserved namespaces; no `/status` detail.
    pub(super) fn allow_all() -> Permissions {
        let everything = OpRules {
            allow: vec![Arc::from(">")],
            deny: Vec::new(),
        };
        Permissions::union([(
            &everything,
            &everything,
            &everything,
            false,
            &NameRules::default(),
        )])
    }

    /// Whether this identity may publish to `subject` (wildcard-free; a subject with a wildcard
    /// or an empty token is never allowed).
    pub fn may_publish(&self, subject: &str) -> bool {
        is_concrete(subject) && self.0.publish.permits(subject)
    }

    /// Whether this identity may send a request to `subject` (as `may_publish`, under the
    /// grants' `request` rules). Answering a request it received is not a request: see
    /// docs/policy.md.
    pub fn may_request(&self, subject: &str) -> bool {
        is_concrete(subject) && self.0.request.permits(subject)
    }

    /// Whether this identity may subscribe to `pattern` (wildcards allowed), and whether its
    /// deliveries must then be filtered. A malformed pattern is `Denied`.
    pub fn may_subscribe(&self, pattern: &str) -> SubscribeDecision {
        self.0.subscribe.subscribe(pattern)
    }

    /// The delivery filter of a `Filtered` subscription: whether a message on `subject` (as
    /// NATS delivered it, so wildcard-free) may reach this identity. An `Allowed` subscription
    /// needs no check. Allocates nothing; a subject that starts with neither `$` nor `_` costs a
    /// token comparison or two per pattern.
    pub fn may_receive(&self, subject: &str) -> bool {
        self.0.subscribe.permits(subject)
    }

    /// Whether this identity may see per-client detail on `/status`.
    pub fn may_see_status(&self) -> bool {
        self.0.status
    }

    /// Whether this identity may register `name` (wildcard-free): its own name (`own`: a local
    /// user's user name, a token's `sub`; none for anonymous callers), or one a `names` pattern
    /// of a matching grant covers.
    pub fn may_take_name(&self, name: &str, own: Option<&str>) -> bool {
        own == Some(name) || self.0.names.iter().any(|pattern| matches(pattern, name))
    }

    /// Whether this identity may see the presence of every name `pattern` matches (a name, or
    /// a pattern for a watch): one `presence` pattern covers it, or it is the caller's own name.
    pub fn may_see_presence(&self, pattern: &str, own: Option<&str>) -> bool {
        own == Some(pattern)
            || self
                .0
                .presence
                .iter()
                .any(|allow| is_subset(pattern, allow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        Rules::new(
            allow.iter().map(|p| Arc::from(*p)).collect(),
            deny.iter().map(|p| Arc::from(*p)).collect(),
        )
    }

    #[test]
    fn redundant_patterns_are_dropped_but_explicit_ones_kept() {
        let rules = rules(
            &["orders.*", ">", "orders.>", "$JS.API.INFO", "$JS.>", ">"],
            &["a.b", "a.*", "a.*"],
        );
        assert_eq!(&*rules.allow, [Arc::from(">")]);
        assert_eq!(&*rules.deny, [Arc::from("a.*")]);
        assert_eq!(&*rules.explicit, [(1, Arc::from("$JS.>"))]);
        assert_eq!(rules.explicit(1).collect::<Vec<_>>(), ["$JS.>"]);
        assert_eq!(rules.explicit(0).count(), 0);
    }

    /// Every connection holds its own (unless the integrator shares them per identity).
    #[test]
    fn resolved_permissions_stay_small() {
        assert!(size_of::<Rules>() <= 48, "{}", size_of::<Rules>());
        assert!(size_of::<Resolved>() <= 184, "{}", size_of::<Resolved>());
    }

    #[test]
    fn own_name_and_names_patterns_may_be_taken() {
        let named = NameRules {
            names: vec![Arc::from("team.*"), Arc::from("bob")],
            presence: vec![Arc::from("team.>")],
        };
        let none = OpRules::default();
        let permissions = Permissions::union([(&none, &none, &none, false, &named)]);
        assert!(permissions.may_take_name("bob", None));
        assert!(permissions.may_take_name("team.x", None));
        assert!(!permissions.may_take_name("team.x.y", None));
        assert!(permissions.may_take_name("alice", Some("alice")));
        assert!(!permissions.may_take_name("carol", Some("alice")));
        assert!(permissions.may_see_presence("team.x", None));
        assert!(permissions.may_see_presence("team.>", None));
        assert!(!permissions.may_see_presence(">", None));
        assert!(!permissions.may_see_presence("bob", None));
        assert!(permissions.may_see_presence("alice", Some("alice")));
        let nobody = Permissions::allow_all();
        assert!(!nobody.may_take_name("bob", None));
        assert!(!nobody.may_see_presence("bob", None));
    }

    #[test]
    fn permissions_are_send_and_sync() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Permissions>();
    }
}
