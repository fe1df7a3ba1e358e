//! One `[[grant]]` of a policy once it has been checked: whom it matches (`Match`) and which
//! subject patterns it allows and denies for each operation.

use std::sync::Arc;

use super::Who;

/// Whom a grant applies to. Every key that is set must match (AND); a `Match` with none set
/// (the file's `any = true`) matches every identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Match {
    pub user: Option<Box<str>>,
    pub uid: Option<u32>,
    /// The identity's primary gid or any of its supplementary gids.
    pub gid: Option<u32>,
    /// The identity's primary group name or any of its supplementary group names.
    pub group: Option<Box<str>>,
    /// A verified token's `sub` claim. Never compared with `user`: a token whose subject is
    /// `root` is not the local user root.
    pub sub: Option<Box<str>>,
    /// A verified client certificate's subject, compared whole and exactly with the identity's
    /// RFC 4514 form (`CN=alice,O=Example`): no CN-only or case-folded shorthand, so a grant
    /// never matches a certificate its author did not name.
    pub cert: Option<Box<str>>,
    pub anonymous: Option<bool>,
}

impl Match {
    pub fn matches(&self, who: &Who<'_>) -> bool {
        let name = |want: &Option<Box<str>>, have: Option<&str>| {
            want.as_deref().is_none_or(|want| have == Some(want))
        };
        name(&self.user, who.user)
            && name(&self.sub, who.sub)
            && name(&self.cert, who.cert)
            && self.uid.is_none_or(|uid| who.uid == Some(uid))
            && self
                .gid
                .is_none_or(|gid| who.gid == Some(gid) || who.groups.contains(&gid))
            && self.group.as_deref().is_none_or(|group| {
                who.group == Some(group) || who.group_names.iter().any(|name| name == group)
            })
            && self
                .anonymous
                .is_none_or(|anonymous| who.anonymous == anonymous)
    }
}

/// The patterns one grant allows and denies for one operation (checked, in file order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct OpRules {
    pub allow: Vec<Arc<str>>,
    pub deny: Vec<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Grant {
    pub to: Match,
    pub publish: OpRules,
    pub subscribe: OpRules,
    pub request: OpRules,
    /// May see per-client detail on `/status`.
    pub status: bool,
    /// Named clients: which names it may register, whose presence it may see.
    pub named: NameRules,
}

/// A grant's `names` and `presence` patterns (docs/policy.md, "Named clients").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct NameRules {
    pub names: Vec<Arc<str>>,
    pub presence: Vec<Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Who<'static> {
        Who {
            uid: Some(1001),
            gid: Some(100),
            groups: &[27, 998],
            user: Some("alice"),
            group: Some("users"),
            group_names: &[],
            sub: None,
            cert: None,
            anonymous: false,
        }
    }

    #[test]
    fn an_empty_match_matches_everyone() {
        assert!(Match::default().matches(&alice()));
        assert!(Match::default().matches(&Who::default()));
    }

    #[test]
    fn every_key_must_match() {
        let both = Match {
            user: Some("alice".into()),
            uid: Some(1001),
            ..Match::default()
        };
        assert!(both.matches(&alice()));
        let wrong_uid = Match {
            uid: Some(1002),
            ..both.clone()
        };
        assert!(!wrong_uid.matches(&alice()));
    }

    #[test]
    fn gid_matches_primary_and_supplementary_groups() {
        for gid in [100, 27, 998] {
            let by_gid = Match {
                gid: Some(gid),
                ..Match::default()
            };
            assert!(by_gid.matches(&alice()), "{gid}");
        }
        let other = Match {
            gid: Some(5),
            ..Match::default()
        };
        assert!(!other.matches(&alice()));
    }

    #[test]
    fn group_matches_primary_and_supplementary_names() {
        let names = ["sudo".to_string(), "svc".to_string()];
        let who = Who {
            group_names: &names,
            ..alice()
        };
        for group in ["users", "sudo", "svc"] {
            let by_name = Match {
                group: Some(group.into()),
                ..Match::default()
            };
            assert!(by_name.matches(&who), "{group}");
        }
        let other = Match {
            group: Some("wheel".into()),
            ..Match::default()
        };
        assert!(!other.matches(&who));
    }

    #[test]
    fn sub_and_user_are_different_names() {
        let token_root = Who {
            sub: Some("root"),
            ..Who::default()
        };
        let user_root = Match {
            user: Some("root".into()),
            ..Match::default()
        };
        assert!(!user_root.matches(&token_root));
        let sub_root = Match {
            sub: Some("root".into()),
            ..Match::default()
        };
        assert!(sub_root.matches(&token_root));
        assert!(!sub_root.matches(&alice()));
    }

    #[test]
    fn cert_matches_the_whole_subject_exactly() {
        let carol = Who {
            cert: Some("CN=carol,O=Example"),
            ..Who::default()
        };
        let whole = Match {
            cert: Some("CN=carol,O=Example".into()),
            ..Match::default()
        };
        assert!(whole.matches(&carol));
        for other in ["CN=carol", "cn=carol,o=example", "CN=carol,O=Example,C=DE"] {
            let other = Match {
                cert: Some(other.into()),
                ..Match::default()
            };
            assert!(!other.matches(&carol));
        }
        let token_carol = Who {
            sub: Some("CN=carol,O=Example"),
            ..Who::default()
        };
        assert!(
            !whole.matches(&token_carol),
            "a token subject is not a certificate"
        );
    }

    #[test]
    fn anonymous_true_and_false() {
        let anonymous = Who {
            anonymous: true,
            ..Who::default()
        };
        let yes = Match {
            anonymous: Some(true),
            ..Match::default()
        };
        let no = Match {
            anonymous: Some(false),
            ..Match::default()
        };
        assert!(yes.matches(&anonymous));
        assert!(!yes.matches(&alice()));
        assert!(no.matches(&alice()));
        assert!(!no.matches(&anonymous));
    }

    #[test]
    fn a_key_the_identity_lacks_does_not_match() {
        let by_uid = Match {
            uid: Some(0),
            ..Match::default()
        };
        let token = Who {
            sub: Some("bob"),
            ..Who::default()
        };
        assert!(!by_uid.matches(&token));
    }
}
