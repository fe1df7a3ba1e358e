//! The policy file parser (`core::policy::Policy::parse`: TOML text to checked grants). Every
//! text is either refused with a one-line error that names where (line and column within the
//! text, the grant counted from 1), or gives a policy that resolves for every identity and never
//! grants a reserved subject ($SYS, $JS, inboxes, ...) unless one of the file's strings is a
//! pattern inside that namespace (the file is read for that with the `toml` crate alone).
#![no_main]

use ipc_gateway::core::policy::{Policy, PolicyError, RESERVED, SubscribeDecision, Who};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Policy::parse(&text) {
        Err(error) => refused(&text, &error),
        Ok(policy) => accepted(&text, &policy),
    }
});

fn refused(text: &str, error: &PolicyError) {
    let shown = error.to_string();
    assert!(!shown.contains('\n'), "a multi-line error: {shown:?}");
    assert!(shown.starts_with("policy"), "{shown:?}");
    match error {
        PolicyError::Syntax { at, grant, .. } => {
            if let Some((line, column)) = at {
                assert!(*line >= 1 && *column >= 1, "{shown}");
                assert!(
                    *line <= text.split('\n').count(),
                    "line {line} past the text"
                );
            }
            assert_ne!(*grant, Some(0));
        }
        PolicyError::Invalid { grant, .. } => assert!(*grant >= 1),
        PolicyError::NoGrants { .. } => {}
        other => panic!("parsing text gave {other:?}"),
    }
}

fn accepted(text: &str, policy: &Policy) {
    assert!(policy.grant_count() >= 1);
    let again = Policy::parse(text).expect("the same text parses again");
    assert_eq!(again.grant_count(), policy.grant_count());
    let strings = strings(text);
    let names = ["root".to_owned(), "ipc-admin".to_owned()];
    let identities = [
        Who {
            anonymous: true,
            ..Who::default()
        },
        Who {
            uid: Some(0),
            gid: Some(0),
            groups: &[0, 1500],
            user: Some("root"),
            group: Some("root"),
            group_names: &names,
            ..Who::default()
        },
        Who {
            uid: Some(990),
            gid: Some(990),
            user: Some("orders"),
            ..Who::default()
        },
        Who {
            sub: Some("dashboard"),
            ..Who::default()
        },
        Who {
            cert: Some("CN=alice,O=Example"),
            sub: Some("alice"),
            ..Who::default()
        },
    ];
    for who in &identities {
        let permissions = policy.resolve(who);
        let twice = again.resolve(who);
        for namespace in RESERVED {
            let first = namespace.trim_end_matches(".>");
            let probe = format!("{first}.fuzz.probe");
            let granted = permissions.may_publish(&probe)
                || permissions.may_request(&probe)
                || permissions.may_receive(&probe)
                || permissions.may_subscribe(&probe) != SubscribeDecision::Denied;
            assert_eq!(granted, {
                twice.may_publish(&probe)
                    || twice.may_request(&probe)
                    || twice.may_receive(&probe)
                    || twice.may_subscribe(&probe) != SubscribeDecision::Denied
            });
            if granted {
                let inside = format!("{first}.");
                assert!(
                    strings.iter().any(|s| s.starts_with(&inside)),
                    "{probe} granted to {who:?} though no pattern names {namespace}"
                );
            }
        }
    }
}

/// Every string value in the TOML document, however deep.
fn strings(text: &str) -> Vec<String> {
    fn walk(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            toml::Value::Table(table) => table.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(table) = text.parse::<toml::Table>() {
        table.values().for_each(|v| walk(v, &mut out));
    }
    out
}
