//! The policy file (TOML, described in docs/policy.md) read into checked `Grant`s, and the
//! errors that say what is wrong with it: which file, which `[[grant]]` (counting from 1), which
//! field, and why. Unknown keys are errors, so a misspelt key never silently grants or denies
//! less than its author meant.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::grant::{Grant, Match, NameRules, OpRules};
use super::subjects::validate_pattern;

/// Why a policy could not be read. `Display` gives one line that names the file (when there is
/// one), the grant and the field, and what is wrong.
#[derive(Debug)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    Read { path: PathBuf, source: io::Error },
    /// Not TOML, or not the policy's shape: an unknown key, a value of the wrong type. `at` is
    /// the line and column (from 1); `grant` the `[[grant]]` it is in, when that is known.
    Syntax {
        file: Option<PathBuf>,
        at: Option<(usize, usize)>,
        grant: Option<usize>,
        message: String,
    },
    /// A grant whose content is wrong: a missing or empty `match`, a malformed pattern.
    /// `grant` counts from 1; `field` is e.g. `match` or `subscribe.deny`.
    Invalid {
        file: Option<PathBuf>,
        grant: usize,
        field: String,
        message: String,
    },
    /// The file has no `[[grant]]` at all, which would allow nothing to anyone: more likely a
    /// truncated or wrong file than the intent (which a grant with `any = true` and no allows
    /// states).
    NoGrants { file: Option<PathBuf> },
}

impl PolicyError {
    /// Sets the file the text came from (`Policy::load` does).
    pub(super) fn in_file(mut self, path: &Path) -> PolicyError {
        match &mut self {
            PolicyError::Read { .. } => {}
            PolicyError::Syntax { file, .. }
            | PolicyError::Invalid { file, .. }
            | PolicyError::NoGrants { file } => *file = Some(path.to_path_buf()),
        }
        self
    }
}

struct Origin<'a>(&'a Option<PathBuf>);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(path) => write!(f, "policy file {}", path.display()),
            None => f.write_str("policy"),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::Read { path, source } => {
                write!(f, "cannot read policy file {}: {source}", path.display())
            }
            PolicyError::Syntax {
                file,
                at,
                grant,
                message,
            } => {
                write!(f, "{}", Origin(file))?;
                if let Some((line, column)) = at {
                    write!(f, ", line {line}, column {column}")?;
                }
                if let Some(grant) = grant {
                    write!(f, " ([[grant]] #{grant})")?;
                }
                write!(f, ": {message}")
            }
            PolicyError::Invalid {
                file,
                grant,
                field,
                message,
            } => write!(
                f,
                "{}, [[grant]] #{grant}, {field}: {message}",
                Origin(file)
            ),
            PolicyError::NoGrants { file } => write!(
                f,
                "{}: no [[grant]], so nothing would be allowed to anyone; to mean that, \
                 write a grant with match = {{ any = true }} and no allow",
                Origin(file)
            ),
        }
    }
}

impl std::error::Error for PolicyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PolicyError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    grant: Vec<GrantDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantDoc {
    /// Optional here so that its absence is reported with the grant's number.
    #[serde(rename = "match")]
    to: Option<MatchDoc>,
    publish: Option<RulesDoc>,
    subscribe: Option<RulesDoc>,
    request: Option<RulesDoc>,
    #[serde(default)]
    status: bool,
    /// Names it may register (patterns); see docs/policy.md.
    #[serde(default)]
    names: Vec<String>,
    /// Names whose presence it may query and watch (patterns).
    #[serde(default)]
    presence: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchDoc {
    user: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    group: Option<String>,
    sub: Option<String>,
    cert: Option<String>,
    anonymous: Option<bool>,
    any: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesDoc {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// Reads a policy file's text into its grants, in file order.
pub(super) fn parse(text: &str) -> Result<Vec<Grant>, PolicyError> {
    let doc: FileDoc = toml::from_str(text).map_err(|error| syntax_error(text, &error))?;
    if doc.grant.is_empty() {
        return Err(PolicyError::NoGrants { file: None });
    }
    doc.grant
        .into_iter()
        .enumerate()
        .map(|(index, grant)| check_grant(index + 1, grant))
        .collect()
}

fn check_grant(number: usize, doc: GrantDoc) -> Result<Grant, PolicyError> {
    let invalid = |field: &str, message: String| PolicyError::Invalid {
        file: None,
        grant: number,
        field: field.to_string(),
        message,
    };
    let Some(to) = doc.to else {
        return Err(invalid(
            "match",
            "missing: every grant says whom it applies to, e.g. match = { user = \"alice\" } \
             (match = { any = true } for everyone)"
                .into(),
        ));
    };
    let to = check_match(to).map_err(|(field, message)| invalid(field, message))?;
    let rules = |op: &str, doc: Option<RulesDoc>| -> Result<OpRules, PolicyError> {
        let Some(doc) = doc else {
            return Ok(OpRules::default());
        };
        let checked = |kind: &str, patterns: Vec<String>| {
            patterns
                .into_iter()
                .map(|pattern| match validate_pattern(&pattern) {
                    Ok(()) => Ok(Arc::from(pattern)),
                    Err(why) => Err(invalid(
                        &format!("{op}.{kind}"),
                        format!("{pattern:?} {why}"),
                    )),
                })
                .collect::<Result<Vec<Arc<str>>, PolicyError>>()
        };
        Ok(OpRules {
            allow: checked("allow", doc.allow)?,
            deny: checked("deny", doc.deny)?,
        })
    };
    let patterns = |field: &str, list: Vec<String>| {
        list.into_iter()
            .map(|pattern| match validate_pattern(&pattern) {
                Ok(()) => Ok(Arc::from(pattern)),
                Err(why) => Err(invalid(field, format!("{pattern:?} {why}"))),
            })
            .collect::<Result<Vec<Arc<str>>, PolicyError>>()
    };
    Ok(Grant {
        to,
        publish: rules("publish", doc.publish)?,
        subscribe: rules("subscribe", doc.subscribe)?,
        request: rules("request", doc.request)?,
        status: doc.status,
        named: NameRules {
            names: patterns("names", doc.names)?,
            presence: patterns("presence", doc.presence)?,
        },
    })
}

fn check_match(doc: MatchDoc) -> Result<Match, (&'static str, String)> {
    let name = |field: &'static str, value: Option<String>| match value {
        Some(value) if value.is_empty() => Err((field, "is empty".to_string())),
        value => Ok(value.map(String::into_boxed_str)),
    };
    let to = Match {
        user: name("match.user", doc.user)?,
        uid: doc.uid,
        gid: doc.gid,
        group: name("match.group", doc.group)?,
        sub: name("match.sub", doc.sub)?,
        cert: name("match.cert", doc.cert)?,
        anonymous: doc.anonymous,
    };
    match doc.any {
        Some(false) => Err((
            "match.any",
            "any = false matches nobody; leave `any` out, or write true".into(),
        )),
        Some(true) if to != Match::default() => Err((
            "match.any",
            "any = true matches every identity and cannot be combined with other keys \
             (the keys of a match must all match; they are not alternatives)"
                .into(),
        )),
        Some(true) => Ok(to),
        None if to == Match::default() => Err((
            "match",
            "names no key; write match = { any = true } to match every identity".into(),
        )),
        None => Ok(to),
    }
}

/// A TOML or shape error, on one line, with its line and column and the grant it is in.
fn syntax_error(text: &str, error: &toml::de::Error) -> PolicyError {
    let message = error.message().trim().replace('\n', " ");
    let Some(start) = error.span().map(|span| span.start.min(text.len())) else {
        return PolicyError::Syntax {
            file: None,
            at: None,
            grant: None,
            message,
        };
    };
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = text[line_start..start].chars().count() + 1;
    // `[[grant]]` headers up to and including the error's line: the grant it is in.
    let line_end = text[start..].find('\n').map_or(text.len(), |at| start + at);
    let grants = text[..line_end]
        .lines()
        .filter(|line| is_grant_header(line))
        .count();
    PolicyError::Syntax {
        file: None,
        at: Some((line, column)),
        grant: (grants > 0).then_some(grants),
        message,
    }
}

fn is_grant_header(line: &str) -> bool {
    line.trim_start()
        .strip_prefix("[[")
        .map(str::trim_start)
        .and_then(|rest| rest.strip_prefix("grant"))
        .is_some_and(|rest| rest.trim_start().starts_with("]]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn parses_every_field() {
        let grants = parse(
            r#"
            [[grant]]
            match = { user = "alice", uid = 1001, gid = 100, group = "svc", sub = "bob", cert = "CN=bob,O=Example", anonymous = false }
            publish   = { allow = ["orders.>"] }
            subscribe = { allow = ["events.>"], deny = ["events.internal.>"] }
            request   = { allow = ["svc.>"], deny = ["svc.admin.>"] }
            status = true

            [[grant]]
            match = { any = true }
            "#,
        )
        .unwrap();
        assert_eq!(grants.len(), 2);
        let first = &grants[0];
        assert_eq!(
            first.to,
            Match {
                user: Some("alice".into()),
                uid: Some(1001),
                gid: Some(100),
                group: Some("svc".into()),
                sub: Some("bob".into()),
                cert: Some("CN=bob,O=Example".into()),
                anonymous: Some(false),
            }
        );
        assert_eq!(first.publish.allow, vec![Arc::from("orders.>")]);
        assert!(first.publish.deny.is_empty());
        assert_eq!(first.subscribe.deny, vec![Arc::from("events.internal.>")]);
        assert_eq!(first.request.allow, vec![Arc::from("svc.>")]);
        assert!(first.status);
        assert_eq!(grants[1].to, Match::default());
        assert!(!grants[1].status);
        assert_eq!(grants[1].subscribe, OpRules::default());
    }

    #[test]
    fn the_table_form_parses_like_the_inline_form() {
        let grants = parse(
            "[[grant]]\n[grant.match]\nuser = \"alice\"\n[grant.subscribe]\nallow = [\"a.>\"]\n",
        )
        .unwrap();
        assert_eq!(grants[0].to.user.as_deref(), Some("alice"));
        assert_eq!(grants[0].subscribe.allow, vec![Arc::from("a.>")]);
    }

    #[test]
    fn unknown_keys_are_errors_that_say_where() {
        let message = error(
            "[[grant]]\nmatch = { any = true }\n\n[[grant]]\nmatch = { any = true }\npublsh = { allow = [\"a\"] }\n",
        );
        assert!(message.contains("line 6, column 1"), "{message}");
        assert!(message.contains("[[grant]] #2"), "{message}");
        assert!(message.contains("unknown field `publsh`"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");

        let message = error("[[grant]]\nmatch = { usr = \"alice\" }\n");
        assert!(message.contains("unknown field `usr`"), "{message}");
        let message = error(
            "[[grant]]\nmatch = { any = true }\npublish = { allow = [\"a\"], except = [\"b\"] }\n",
        );
        assert!(message.contains("unknown field `except`"), "{message}");
        let message = error("[[grants]]\nmatch = { any = true }\n");
        assert!(message.contains("unknown field `grants`"), "{message}");
    }

    #[test]
    fn wrong_types_are_errors() {
        let message = error("[[grant]]\nmatch = { uid = -1 }\n");
        assert!(message.contains("[[grant]] #1"), "{message}");
        let message = error("[[grant]]\nmatch = { any = true }\npublish = { allow = \"a.>\" }\n");
        assert!(message.contains("line 3"), "{message}");
        assert!(error("not toml at all").contains("policy, line 1"));
    }

    #[test]
    fn a_grant_without_match_is_an_error_naming_the_grant() {
        let message =
            error("[[grant]]\nmatch = { any = true }\n[[grant]]\npublish = { allow = [\"a\"] }\n");
        assert!(
            message.starts_with("policy, [[grant]] #2, match: missing"),
            "{message}"
        );
    }

    #[test]
    fn empty_or_ambiguous_matches_are_errors() {
        assert!(error("[[grant]]\nmatch = {}\n").contains("match: names no key"));
        assert!(error("[[grant]]\nmatch = { any = false }\n").contains("match.any"));
        assert!(
            error("[[grant]]\nmatch = { any = true, user = \"alice\" }\n")
                .contains("cannot be combined")
        );
        assert!(error("[[grant]]\nmatch = { user = \"\" }\n").contains("match.user: is empty"));
    }

    #[test]
    fn malformed_patterns_are_errors_naming_them() {
        for (pattern, why) in [
            ("", "is empty"),
            ("a.>.b", "has '>' before its last token"),
            ("a..b", "has an empty token"),
            ("a b", "contains white space"),
            ("a*", "has a wildcard inside a token"),
        ] {
            let text = format!(
                "[[grant]]\nmatch = {{ any = true }}\nsubscribe = {{ allow = [\"x\"], deny = [\"{pattern}\"] }}\n"
            );
            let message = error(&text);
            assert!(
                message.starts_with(&format!(
                    "policy, [[grant]] #1, subscribe.deny: {pattern:?} {why}"
                )),
                "{message}"
            );
        }
    }

    #[test]
    fn names_and_presence_are_checked_patterns() {
        let grants = parse(
            "[[grant]]\nmatch = { any = true }\nnames = [\"bob\", \"team.*\"]\npresence = [\"team.>\"]\n",
        )
        .unwrap();
        assert_eq!(
            grants[0].named.names,
            vec![Arc::from("bob"), Arc::from("team.*")]
        );
        assert_eq!(grants[0].named.presence, vec![Arc::from("team.>")]);
        let message = error("[[grant]]\nmatch = { any = true }\nnames = [\"a..b\"]\n");
        assert!(
            message.starts_with("policy, [[grant]] #1, names: \"a..b\" has an empty token"),
            "{message}"
        );
        let message = error("[[grant]]\nmatch = { any = true }\npresence = \"x\"\n");
        assert!(message.contains("line 3"), "{message}");
        assert!(
            parse("[[grant]]\nmatch = { any = true }\n").unwrap()[0].named == NameRules::default()
        );
    }

    #[test]
    fn a_file_without_grants_is_an_error() {
        assert!(matches!(
            parse("# nothing yet\n"),
            Err(PolicyError::NoGrants { .. })
        ));
    }

    #[test]
    fn errors_name_the_file_once_it_is_known() {
        let error = parse("[[grant]]\nmatch = {}\n")
            .unwrap_err()
            .in_file(Path::new("/etc/ipc-gateway/policy.toml"));
        assert!(
            error
                .to_string()
                .starts_with("policy file /etc/ipc-gateway/policy.toml, [[grant]] #1, match:"),
            "{error}"
        );
    }

    #[test]
    fn grant_headers_are_recognised_with_spaces() {
        assert!(is_grant_header("[[grant]]"));
        assert!(is_grant_header("  [[ grant ]] # comment"));
        assert!(!is_grant_header("[grant.match]"));
        assert!(!is_grant_header("[[grants]]"));
    }
}
