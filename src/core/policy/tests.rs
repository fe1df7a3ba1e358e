//! The policy's rules, checked through its public API: resolution (which grants apply, union
//! and deny), reserved namespaces and what names them explicitly, subscribe decisions and the
//! delivery filter, the file format, and the example file in dist/.

use std::path::{Path, PathBuf};

use super::SubscribeDecision::{Allowed, Denied, Filtered};
use super::*;

fn policy(text: &str) -> Policy {
    Policy::parse(text).unwrap_or_else(|error| panic!("{error}"))
}

/// A policy with one grant for everyone.
fn everyone(rules: &str) -> Permissions {
    policy(&format!("[[grant]]\nmatch = {{ any = true }}\n{rules}\n")).resolve(&Who::default())
}

fn uid(uid: u32) -> Who<'static> {
    Who {
        uid: Some(uid),
        ..Who::default()
    }
}

fn anonymous() -> Who<'static> {
    Who {
        anonymous: true,
        ..Who::default()
    }
}

// ---- the issue's examples ----

#[test]
fn a_full_subscription_does_not_receive_system_events_or_inboxes() {
    let alice = everyone(r#"subscribe = { allow = [">"] }"#);
    assert_eq!(alice.may_subscribe(">"), Filtered);
    assert!(alice.may_receive("orders.created"));
    assert!(alice.may_receive("a"));
    for reserved in [
        "$SYS.x",
        "_INBOX.x",
        "$SYS.ACCOUNT.x.CONNECT",
        "$JS.API.INFO",
        "$KV.bucket.key",
        "$O.store.chunk",
        "_INBOX.abc.1",
        "_IPC_GATEWAY.sync",
    ] {
        assert!(!alice.may_receive(reserved), "{reserved}");
    }
}

#[test]
fn jetstream_api_is_refused_by_default_and_allowed_when_named() {
    let default = Policy::allow_all().resolve(&Who::default());
    assert!(!default.may_request("$JS.API.INFO"));
    assert!(!default.may_publish("$JS.API.INFO"));
    assert_eq!(default.may_subscribe("$JS.API.>"), Denied);

    let wide = everyone(r#"request = { allow = [">"] }"#);
    assert!(wide.may_request("orders.get"));
    assert!(!wide.may_request("$JS.API.INFO"));

    for named in ["$JS.API.INFO", "$JS.API.>", "$JS.>", "$JS.*.INFO"] {
        let granted = everyone(&format!("request = {{ allow = [\">\", \"{named}\"] }}"));
        assert!(granted.may_request("$JS.API.INFO"), "{named}");
        assert!(!granted.may_request("$SYS.REQ.USER.INFO"), "{named}");
        assert!(
            !granted.may_publish("$JS.API.INFO"),
            "{named}: request only"
        );
    }
    let only_info = everyone(r#"request = { allow = ["$JS.API.INFO"] }"#);
    assert!(!only_info.may_request("$JS.API.STREAM.LIST"));
    assert!(!only_info.may_request("orders.get"));
}

#[test]
fn deny_wins_over_an_allow_from_another_grant() {
    let policy = policy(
        r#"
        [[grant]]
        match = { uid = 1001 }
        request = { allow = ["svc.>"] }
        [[grant]]
        match = { any = true }
        request = { deny = ["svc.admin.>"] }
        "#,
    );
    let alice = policy.resolve(&uid(1001));
    assert!(alice.may_request("svc.orders.get"));
    assert!(!alice.may_request("svc.admin.shutdown"));
}

#[test]
fn an_identity_no_grant_matches_may_do_nothing() {
    let policy = policy(
        r#"
        [[grant]]
        match = { user = "alice" }
        publish = { allow = [">"] }
        subscribe = { allow = [">"] }
        request = { allow = [">"] }
        status = true
        "#,
    );
    let stranger = policy.resolve(&Who {
        user: Some("mallory"),
        ..uid(1002)
    });
    assert!(!stranger.may_publish("orders.created"));
    assert!(!stranger.may_request("orders.get"));
    assert_eq!(stranger.may_subscribe("orders.>"), Denied);
    assert_eq!(stranger.may_subscribe(">"), Denied);
    assert!(!stranger.may_receive("orders.created"));
    assert!(!stranger.may_see_status());
}

#[test]
fn each_match_key_selects_its_identities() {
    let policy = policy(
        r#"
        [[grant]]
        match = { uid = 1001 }
        publish = { allow = ["by.uid"] }
        [[grant]]
        match = { gid = 100 }
        publish = { allow = ["by.gid"] }
        [[grant]]
        match = { group = "svc" }
        publish = { allow = ["by.group"] }
        [[grant]]
        match = { user = "alice" }
        publish = { allow = ["by.user"] }
        [[grant]]
        match = { sub = "bob" }
        publish = { allow = ["by.sub"] }
        [[grant]]
        match = { anonymous = true }
        publish = { allow = ["by.anonymous"] }
        [[grant]]
        match = { any = true }
        publish = { allow = ["by.any"] }
        "#,
    );
    let allowed = |who: &Who<'_>| -> Vec<&'static str> {
        let permissions = policy.resolve(who);
        [
            "by.uid",
            "by.gid",
            "by.group",
            "by.user",
            "by.sub",
            "by.anonymous",
            "by.any",
        ]
        .into_iter()
        .filter(|subject| permissions.may_publish(subject))
        .collect()
    };
    assert_eq!(allowed(&uid(1001)), ["by.uid", "by.any"]);
    assert_eq!(
        allowed(&Who {
            gid: Some(100),
            ..uid(5)
        }),
        ["by.gid", "by.any"]
    );
    assert_eq!(
        allowed(&Who {
            groups: &[7, 100],
            ..uid(5)
        }),
        ["by.gid", "by.any"],
        "a supplementary gid"
    );
    assert_eq!(
        allowed(&Who {
            group: Some("svc"),
            ..uid(5)
        }),
        ["by.group", "by.any"]
    );
    let names = ["wheel".to_string(), "svc".to_string()];
    assert_eq!(
        allowed(&Who {
            group_names: &names,
            ..uid(5)
        }),
        ["by.group", "by.any"],
        "a supplementary group name"
    );
    assert_eq!(
        allowed(&Who {
            user: Some("alice"),
            ..uid(5)
        }),
        ["by.user", "by.any"]
    );
    assert_eq!(
        allowed(&Who {
            sub: Some("bob"),
            ..Who::default()
        }),
        ["by.sub", "by.any"]
    );
    assert_eq!(
        allowed(&Who {
            user: Some("bob"),
            ..uid(5)
        }),
        ["by.any"],
        "a local user named bob is not the token subject bob"
    );
    assert_eq!(allowed(&anonymous()), ["by.anonymous", "by.any"]);
}

#[test]
fn a_match_with_several_keys_needs_all_of_them() {
    let policy = policy(
        r#"
        [[grant]]
        match = { user = "alice", gid = 100 }
        publish = { allow = ["x"] }
        "#,
    );
    let alice = Who {
        user: Some("alice"),
        ..uid(1001)
    };
    assert!(!policy.resolve(&alice).may_publish("x"));
    assert!(
        policy
            .resolve(&Who {
                gid: Some(100),
                ..alice
            })
            .may_publish("x")
    );
}

// ---- union, deny, operations ----

#[test]
fn allows_of_every_matching_grant_add_up() {
    let policy = policy(
        r#"
        [[grant]]
        match = { gid = 100 }
        subscribe = { allow = ["events.>"] }
        [[grant]]
        match = { uid = 1001 }
        subscribe = { allow = ["orders.>"] }
        "#,
    );
    let both = policy.resolve(&Who {
        gid: Some(100),
        ..uid(1001)
    });
    assert_eq!(both.may_subscribe("events.a"), Allowed);
    assert_eq!(both.may_subscribe("orders.a"), Allowed);
    assert_eq!(both.may_subscribe("other.a"), Denied);
    let one = policy.resolve(&uid(1001));
    assert_eq!(one.may_subscribe("events.a"), Denied);
}

#[test]
fn operations_are_granted_separately() {
    let only_publish = everyone(r#"publish = { allow = ["orders.>"] }"#);
    assert!(only_publish.may_publish("orders.created"));
    assert!(!only_publish.may_request("orders.created"));
    assert_eq!(only_publish.may_subscribe("orders.>"), Denied);

    let deny_in_publish_only = everyone(
        r#"
        publish = { allow = [">"], deny = ["orders.>"] }
        request = { allow = [">"] }
        "#,
    );
    assert!(!deny_in_publish_only.may_publish("orders.get"));
    assert!(deny_in_publish_only.may_request("orders.get"));
}

#[test]
fn wildcard_patterns_in_allow_and_deny() {
    let permissions = everyone(
        r#"publish = { allow = ["orders.*.created", "logs.>"], deny = ["logs.*.debug"] }"#,
    );
    assert!(permissions.may_publish("orders.eu.created"));
    assert!(!permissions.may_publish("orders.eu.deleted"));
    assert!(!permissions.may_publish("orders.created"));
    assert!(permissions.may_publish("logs.api.info"));
    assert!(!permissions.may_publish("logs.api.debug"));
    assert!(permissions.may_publish("logs.api.debug.extra"));
}

#[test]
fn a_subject_with_a_wildcard_is_never_published() {
    let permissions = everyone(r#"publish = { allow = [">"] }"#);
    assert!(permissions.may_publish("a.b"));
    for subject in ["a.*", "a.>", ">", "*", "", "a..b"] {
        assert!(!permissions.may_publish(subject), "{subject:?}");
        assert!(!permissions.may_request(subject), "{subject:?}");
    }
}

#[test]
fn status_is_granted_by_any_matching_grant() {
    let policy = policy(
        r#"
        [[grant]]
        match = { any = true }
        [[grant]]
        match = { uid = 0 }
        status = true
        "#,
    );
    assert!(policy.resolve(&uid(0)).may_see_status());
    assert!(!policy.resolve(&uid(1)).may_see_status());
}

// ---- no policy ----

#[test]
fn without_a_policy_everything_but_reserved_subjects_is_allowed() {
    let policy = Policy::allow_all();
    assert!(policy.is_allow_all());
    assert_eq!(policy.grant_count(), 0);
    for who in [uid(0), uid(1001), anonymous(), Who::default()] {
        let permissions = policy.resolve(&who);
        assert!(permissions.may_publish("orders.created"));
        assert!(permissions.may_request("svc.admin.shutdown"));
        assert_eq!(permissions.may_subscribe("orders.>"), Allowed);
        assert_eq!(permissions.may_subscribe(">"), Filtered);
        assert!(permissions.may_receive("orders.created"));
        assert!(!permissions.may_see_status());
        for namespace in RESERVED {
            let subject = namespace.replace('>', "x");
            assert!(!permissions.may_publish(&subject), "{subject}");
            assert!(!permissions.may_request(&subject), "{subject}");
            assert!(!permissions.may_receive(&subject), "{subject}");
            assert_eq!(permissions.may_subscribe(namespace), Denied, "{namespace}");
        }
    }
}

// ---- what names a reserved namespace explicitly ----

#[test]
fn only_a_pattern_inside_a_reserved_namespace_grants_it() {
    for covering in [">", "*.>", "*.API.INFO", "*.API.>", "*.*.*"] {
        let permissions = everyone(&format!("request = {{ allow = [\"{covering}\"] }}"));
        assert!(!permissions.may_request("$JS.API.INFO"), "{covering}");
    }
    for inside in ["$JS.API.INFO", "$JS.API.*", "$JS.*.INFO", "$JS.>"] {
        let permissions = everyone(&format!("request = {{ allow = [\"{inside}\"] }}"));
        assert!(permissions.may_request("$JS.API.INFO"), "{inside}");
    }
}

#[test]
fn a_partial_wildcard_token_is_not_a_pattern() {
    let error =
        Policy::parse("[[grant]]\nmatch = { any = true }\nrequest = { allow = [\"$*.>\"] }")
            .unwrap_err()
            .to_string();
    assert!(error.contains("request.allow: \"$*.>\""), "{error}");
}

#[test]
fn a_named_reserved_namespace_is_still_subject_to_denies() {
    let deploy =
        everyone(r#"request = { allow = ["$JS.API.>"], deny = ["$JS.API.STREAM.DELETE.>"] }"#);
    assert!(deploy.may_request("$JS.API.STREAM.CREATE.orders"));
    assert!(!deploy.may_request("$JS.API.STREAM.DELETE.orders"));
}

#[test]
fn an_explicit_grant_opens_only_its_own_namespace() {
    let permissions = everyone(r#"subscribe = { allow = [">", "$SYS.>"] }"#);
    assert_eq!(permissions.may_subscribe(">"), Filtered);
    assert!(permissions.may_receive("$SYS.ACCOUNT.x.CONNECT"));
    assert!(permissions.may_receive("orders.created"));
    assert!(!permissions.may_receive("_INBOX.x"));
    assert!(!permissions.may_receive("$JS.EVENT.x"));
    assert_eq!(permissions.may_subscribe("$SYS.>"), Allowed);
}

// ---- subscribe ----

#[test]
fn a_subscription_needs_one_allow_that_covers_it() {
    let permissions = everyone(r#"subscribe = { allow = ["events.a.>", "events.b.>"] }"#);
    assert_eq!(permissions.may_subscribe("events.a.x"), Allowed);
    assert_eq!(permissions.may_subscribe("events.a.>"), Allowed);
    assert_eq!(permissions.may_subscribe("events.a.*"), Allowed);
    assert_eq!(
        permissions.may_subscribe("events.*.x"),
        Denied,
        "covered by the union of the allows, not by one (as in nats-server)"
    );
    assert_eq!(permissions.may_subscribe("events.>"), Denied);
    assert_eq!(permissions.may_subscribe(">"), Denied);
}

#[test]
fn a_subscription_inside_a_deny_is_refused() {
    let permissions =
        everyone(r#"subscribe = { allow = ["events.>"], deny = ["events.internal.>"] }"#);
    assert_eq!(permissions.may_subscribe("events.internal.>"), Denied);
    assert_eq!(permissions.may_subscribe("events.internal.x"), Denied);
    assert_eq!(permissions.may_subscribe("events.public.>"), Allowed);
}

#[test]
fn a_subscription_overlapping_a_deny_is_filtered() {
    let permissions =
        everyone(r#"subscribe = { allow = ["events.>"], deny = ["events.internal.>"] }"#);
    assert_eq!(permissions.may_subscribe("events.>"), Filtered);
    assert_eq!(permissions.may_subscribe("events.*.x"), Filtered);
    assert!(permissions.may_receive("events.public.x"));
    assert!(!permissions.may_receive("events.internal.x"));
    assert!(
        permissions.may_receive("events.internal"),
        "'>' needs a token"
    );
}

#[test]
fn a_subscription_overlapping_a_reserved_namespace_is_filtered() {
    let permissions = everyone(r#"subscribe = { allow = [">"] }"#);
    assert_eq!(permissions.may_subscribe("*.x"), Filtered);
    assert!(permissions.may_receive("orders.x"));
    assert!(!permissions.may_receive("$SYS.x"));
    assert_eq!(
        permissions.may_subscribe("*"),
        Allowed,
        "one token: no namespace"
    );
    assert_eq!(permissions.may_subscribe("orders.*"), Allowed);
}

#[test]
fn a_subscription_inside_an_ungranted_reserved_namespace_is_refused() {
    let permissions = everyone(r#"subscribe = { allow = [">"] }"#);
    for pattern in [
        "_INBOX.>",
        "_INBOX.*",
        "_INBOX.abc.*",
        "$SYS.>",
        "$JS.API.INFO",
    ] {
        assert_eq!(permissions.may_subscribe(pattern), Denied, "{pattern}");
    }
}

#[test]
fn a_subscription_partly_granted_in_a_reserved_namespace_is_filtered() {
    let permissions = everyone(r#"subscribe = { allow = [">", "$JS.EVENT.ADVISORY.>"] }"#);
    assert_eq!(permissions.may_subscribe("$JS.>"), Filtered);
    assert!(permissions.may_receive("$JS.EVENT.ADVISORY.STREAM.CREATED.orders"));
    assert!(!permissions.may_receive("$JS.API.INFO"));
    assert_eq!(permissions.may_subscribe("$JS.EVENT.ADVISORY.>"), Allowed);
}

#[test]
fn a_malformed_subscription_is_refused() {
    let permissions = everyone(r#"subscribe = { allow = [">"] }"#);
    for pattern in ["", "a..b", "a.>.b", "a b", "a*"] {
        assert_eq!(permissions.may_subscribe(pattern), Denied, "{pattern:?}");
    }
}

/// Random small policies over a few tokens (among them a reserved namespace's) against every
/// subscription pattern and every subject of the same tokens: `may_receive` is the rule as
/// stated (checked on the patterns as written, not as resolved), `Allowed` means every
/// subject the subscription matches may be received, and `Denied` means no single allow covers
/// the subscription or none of its subjects may be received.
#[test]
fn subscribe_decisions_agree_with_the_delivery_filter() {
    fn words(alphabet: &[&str], max: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut out = Vec::new();
        for _ in 0..max {
            all = all
                .iter()
                .flat_map(|word| {
                    alphabet.iter().map(move |token| {
                        if word.is_empty() {
                            token.to_string()
                        } else {
                            format!("{word}.{token}")
                        }
                    })
                })
                .collect();
            out.extend(all.iter().cloned());
        }
        out
    }
    let patterns: Vec<String> = words(&["a", "$JS", "_INBOX", "*", ">"], 3)
        .into_iter()
        .filter(|pattern| validate_pattern(pattern).is_ok())
        .collect();
    let subjects = words(&["a", "$JS", "_INBOX", "c"], 4);
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    for _ in 0..150 {
        let allow: Vec<&str> = (0..1 + next(3))
            .map(|_| patterns[next(patterns.len())].as_str())
            .collect();
        let deny: Vec<&str> = (0..next(3))
            .map(|_| patterns[next(patterns.len())].as_str())
            .collect();
        let quoted = |list: &[&str]| {
            list.iter()
                .map(|pattern| format!("{pattern:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "subscribe = {{ allow = [{}], deny = [{}] }}",
            quoted(&allow),
            quoted(&deny)
        );
        let permissions = everyone(&text);
        let receivable = |subject: &str| {
            let granted = allow.iter().any(|allow| {
                matches(allow, subject)
                    && RESERVED
                        .iter()
                        .all(|ns| !matches(ns, subject) || is_subset(allow, ns))
            });
            granted && !deny.iter().any(|deny| matches(deny, subject))
        };
        for subject in &subjects {
            assert_eq!(
                permissions.may_receive(subject),
                receivable(subject),
                "{text}: may_receive({subject})"
            );
        }
        for pattern in &patterns {
            let covered = allow.iter().any(|allow| is_subset(pattern, allow));
            let mut delivered = subjects.iter().filter(|subject| matches(pattern, subject));
            match permissions.may_subscribe(pattern) {
                Allowed => assert!(
                    covered && delivered.all(|subject| receivable(subject)),
                    "{text}: subscribe {pattern} Allowed"
                ),
                Filtered => assert!(covered, "{text}: subscribe {pattern} Filtered"),
                Denied => assert!(
                    !covered || !delivered.any(|subject| receivable(subject)),
                    "{text}: subscribe {pattern} Denied"
                ),
            }
        }
    }
}

#[test]
fn publish_and_request_follow_the_stated_rule() {
    // The same rule as `may_receive`, through the publish and request rules.
    let permissions = everyone(
        r#"
        publish = { allow = [">", "_INBOX.a.*"], deny = ["*.b.*", "_INBOX.a.b"] }
        request = { allow = ["*.>", "$JS.>"], deny = ["$JS.API.STREAM.DELETE.*"] }
        "#,
    );
    assert!(permissions.may_publish("x"));
    assert!(permissions.may_publish("_INBOX.a.x"));
    assert!(
        !permissions.may_publish("_INBOX.a.b"),
        "deny wins over explicit"
    );
    assert!(!permissions.may_publish("_INBOX.c.x"));
    assert!(!permissions.may_publish("x.b.y"));
    assert!(!permissions.may_request("x"), "'*.>' needs two tokens");
    assert!(permissions.may_request("x.y"));
    assert!(permissions.may_request("$JS.API.STREAM.DELETE"));
    assert!(!permissions.may_request("$JS.API.STREAM.DELETE.orders"));
    assert!(!permissions.may_request("_INBOX.a.x"));
}

// ---- files ----

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/policy.example.toml")
}

#[test]
fn the_example_policy_loads_and_means_what_its_comments_say() {
    let policy = Policy::load(&example_path()).unwrap_or_else(|error| panic!("{error}"));
    assert!(!policy.is_allow_all());
    assert_eq!(policy.grant_count(), 9);

    let admin_groups = ["ipc-admin".to_string()];
    let admin = policy.resolve(&Who {
        group_names: &admin_groups,
        user: Some("carol"),
        ..uid(1003)
    });
    assert_eq!(admin.may_subscribe(">"), Filtered);
    assert!(admin.may_receive("$SYS.ACCOUNT.x.CONNECT"));
    assert!(admin.may_receive("orders.events.created"));
    assert!(!admin.may_receive("_INBOX.x.1"));
    assert!(!admin.may_receive("events.internal.x"), "everyone's deny");
    assert!(admin.may_request("$JS.API.INFO"));
    assert!(!admin.may_request("$JS.API.STREAM.LIST"));
    assert!(admin.may_see_status());

    let orders = policy.resolve(&Who {
        user: Some("orders"),
        ..uid(1004)
    });
    assert_eq!(orders.may_subscribe("orders.requests.*"), Allowed);
    assert_eq!(orders.may_subscribe("orders.>"), Denied);
    assert!(orders.may_publish("orders.events.created"));
    assert!(!orders.may_publish("audit.orders"));
    assert!(orders.may_request("payments.charge"));
    assert!(
        orders.may_request("demo.echo"),
        "every identity with credentials"
    );
    assert!(!orders.may_request("payments.refund"));
    assert!(!orders.may_see_status());

    let deploy = policy.resolve(&uid(990));
    assert!(deploy.may_request("$JS.API.STREAM.CREATE.orders"));
    assert!(!deploy.may_request("$JS.API.STREAM.DELETE.orders"));
    assert!(!deploy.may_request("$KV.config.x"));

    let service = policy.resolve(&Who {
        gid: Some(100),
        groups: &[1500],
        ..uid(1005)
    });
    assert!(service.may_request("svc.billing.get"));
    assert!(!service.may_request("svc.admin.restart"));
    assert_eq!(service.may_subscribe("events.>"), Filtered);
    assert!(service.may_receive("events.svc.started"));
    assert!(!service.may_receive("events.internal.x"));

    let dashboard = policy.resolve(&Who {
        sub: Some("dashboard"),
        ..Who::default()
    });
    assert_eq!(dashboard.may_subscribe("metrics.cpu"), Allowed);
    assert!(dashboard.may_request("dashboard.query.top"));
    assert!(!dashboard.may_publish("events.public.x"));

    let dispatcher = policy.resolve(&Who {
        sub: Some("dispatcher"),
        ..Who::default()
    });
    assert!(dispatcher.may_take_name("dispatch", Some("dispatcher")));
    assert!(dispatcher.may_take_name("dispatcher", Some("dispatcher")));
    assert!(!dispatcher.may_take_name("desk.1", Some("dispatcher")));
    assert!(dispatcher.may_see_presence("desk.1", Some("dispatcher")));
    assert!(dispatcher.may_see_presence("desk.*", Some("dispatcher")));
    assert!(!dispatcher.may_see_presence("orders", Some("dispatcher")));
    assert!(dispatcher.may_publish("client.desk.1"));
    let desk = policy.resolve(&Who {
        sub: Some("desk.1"),
        ..Who::default()
    });
    assert!(desk.may_take_name("desk.1", Some("desk.1")));
    assert!(!desk.may_take_name("dispatch", Some("desk.1")));
    assert!(!desk.may_see_presence("desk.2", Some("desk.1")));

    let stranger = policy.resolve(&anonymous());
    assert_eq!(stranger.may_subscribe("events.public.>"), Allowed);
    assert_eq!(stranger.may_subscribe("events.>"), Denied);
    assert!(!stranger.may_request("demo.echo"));
}

#[test]
fn the_example_policy_in_the_docs_is_the_file_in_dist() {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policy.md"))
            .unwrap();
    let example = std::fs::read_to_string(example_path()).unwrap();
    assert!(
        docs.contains(&example),
        "docs/policy.md quotes dist/policy.example.toml whole"
    );
}

#[test]
fn load_names_the_file_it_cannot_read_or_parse() {
    let missing = Path::new("/nonexistent/policy.toml");
    let error = Policy::load(missing).unwrap_err();
    assert!(matches!(error, PolicyError::Read { .. }));
    assert!(
        error
            .to_string()
            .starts_with("cannot read policy file /nonexistent/policy.toml:"),
        "{error}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "[[grant]]\nmatch = { any = true }\n\n[[grant]]\nmatch = { uid = 1 }\npublish = { allow = [\"a..b\"] }\n",
    )
    .unwrap();
    let error = Policy::load(&path).unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "policy file {}, [[grant]] #2, publish.allow: \"a..b\" has an empty token (a leading, trailing or doubled '.')",
            path.display()
        )
    );
}
