//! Where each setting's value came from (default, file, environment variable or flag), so that
//! an error names the setting as the operator wrote it (`--http localhost:x`,
//! `IPC_GATEWAY_HTTP=x`, `http = "x"` in the file) and `ipc-gateway check-config` can show
//! every effective value with its source. The layers are read again here in the order
//! `Config::load` merges them: the last one that holds a key is the one its value came from.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{ENV_PREFIX, KEYS, REDACTED, SECRET_KEYS};

/// The layer a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// The configuration file, and the key's value as TOML spells it.
    File(PathBuf, String),
    /// The environment variable's name and value.
    Env(String, String),
    /// The flag (`--http`) and its value(s) as given.
    Flag(String, String),
}

impl fmt::Display for Source {
    /// As check-config shows it: `default`, `file /etc/…`, `env IPC_GATEWAY_HTTP`, `flag --http`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path, _) => write!(f, "file {}", path.display()),
            Source::Env(name, _) => write!(f, "env {name}"),
            Source::Flag(flag, _) => write!(f, "flag {flag}"),
        }
    }
}

/// The file's keys, the environment and the flags given, read once.
pub struct Sources {
    file: Option<(PathBuf, toml::Table)>,
    env: Vec<(String, String)>,
    flags: serde_json::Map<String, serde_json::Value>,
}

impl Sources {
    /// Reads the layers as `Config::load` sees them. A file that does not parse counts as
    /// holding nothing (figment reports its syntax error).
    pub fn read<T: Serialize>(file: Option<&Path>, flags: &T) -> Sources {
        let file = file.map(|path| {
            let table = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
                .unwrap_or_default();
            (path.to_owned(), table)
        });
        let flags = match serde_json::to_value(flags) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        Sources {
            file,
            env: std::env::vars().collect(),
            flags,
        }
    }

    /// The layer that gave `key` its value: a flag over `NATS_URL` (for `nats_url`) over the
    /// `IPC_GATEWAY_` variable over the file over the default. A secret's value is `***`.
    pub fn of(&self, key: &str) -> Source {
        let source = self.of_as_given(key);
        let shown = |value: String| {
            if SECRET_KEYS.contains(&key) {
                REDACTED.to_owned()
            } else if key == "nats_url" {
                without_user_info(&value)
            } else {
                value
            }
        };
        match source {
            Source::File(path, value) => Source::File(path, shown(value)),
            Source::Env(name, value) => Source::Env(name, shown(value)),
            Source::Flag(flag, value) => Source::Flag(flag, shown(value)),
            Source::Default => Source::Default,
        }
    }

    fn of_as_given(&self, key: &str) -> Source {
        if let Some(value) = self.flags.get(key) {
            let shown = match value {
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(plain)
                    .collect::<Vec<_>>()
                    .join(&format!(" --{}", key.replace('_', "-"))),
                other => plain(other),
            };
            return Source::Flag(format!("--{}", key.replace('_', "-")), shown);
        }
        let env = |wanted: &str| {
            self.env
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
                .map(|(name, value)| Source::Env(name.clone(), value.clone()))
        };
        let raw = if key == "nats_url" {
            self.env
                .iter()
                .find(|(name, _)| name == "NATS_URL")
                .map(|(name, value)| Source::Env(name.clone(), value.clone()))
        } else {
            None
        };
        if let Some(source) = raw.or_else(|| env(&format!("{ENV_PREFIX}{key}"))) {
            return source;
        }
        if let Some((path, table)) = &self.file
            && let Some(value) = table.get(key)
        {
            let shown = serde_json::to_string(value).unwrap_or_default();
            return Source::File(path.clone(), shown);
        }
        Source::Default
    }

    /// The setting as the operator wrote it, for an error: `--http localhost:x`,
    /// `IPC_GATEWAY_HTTP=x`, `http = "x" in gw.toml`, or `http (the default)`.
    pub fn describe(&self, key: &str) -> String {
        match self.of(key) {
            Source::Default => format!("{key} (the default)"),
            Source::File(path, value) => format!("{key} = {value} in {}", path.display()),
            Source::Env(name, value) => format!("{name}={value}"),
            Source::Flag(flag, value) => format!("{flag} {value}"),
        }
    }

    /// The setting as the operator wrote it, without its value, for a log line:
    /// `--nats-token`, `IPC_GATEWAY_NATS_TOKEN`, `nats_token in gw.toml`, or `nats_token`.
    pub fn written(&self, key: &str) -> String {
        match self.of(key) {
            Source::Default => key.to_owned(),
            Source::File(path, _) => format!("{key} in {}", path.display()),
            Source::Env(name, _) => name,
            Source::Flag(flag, _) => flag,
        }
    }

    /// The configuration file, when one was given.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_ref().map(|(path, _)| path.as_path())
    }
}

/// NATS URLs with any user information (`nats://user:password@host`) shown as `***@`.
pub fn without_user_info(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            // `user:password@host:4222` without a scheme is a URL to the NATS client too.
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (format!("{scheme}://"), rest),
                None => (String::new(), url),
            };
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}{REDACTED}{}", &rest[at..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A JSON value as a flag's text: a string without quotes.
fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The known key closest to an unknown one (at most a third of its letters off), for "did
/// you mean".
pub fn closest_key(unknown: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|key| (edit_distance(unknown, key), *key))
        .filter(|(distance, _)| *distance <= unknown.len().max(3) / 3)
        .min()
        .map(|(_, key)| key)
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Rewrites a figment error for the operator: the setting as written and what is wrong with
/// it, never figment's `default.key` path or a source location.
pub fn explain(err: &figment::Error, sources: &Sources) -> String {
    use figment::error::Kind;
    let key = err
        .path
        .last()
        .map(|key| key.to_ascii_lowercase())
        .unwrap_or_default();
    match &err.kind {
        Kind::UnknownField(found, _) => {
            let file = sources
                .file()
                .map_or_else(String::new, |path| format!(" in {}", path.display()));
            match closest_key(found) {
                Some(known) => format!("unknown key {found:?}{file}: did you mean {known:?}?"),
                None => format!(
                    "unknown key {found:?}{file} (docs/operations.md and dist/ipc-gateway.toml list every key)"
                ),
            }
        }
        kind if KEYS.contains(&key.as_str()) => format!("{}: {kind}", sources.describe(&key)),
        _ => err.to_string(),
    }
}

/// Rewrites a validation error (`key: why`) to name the setting as written, and each other
/// setting the reason names as `` `key` `` too.
pub fn explain_invalid(message: &str, sources: &Sources) -> String {
    match message.split_once(": ") {
        Some((key, why)) if KEYS.contains(&key) => {
            let why = KEYS.iter().fold(why.to_owned(), |why, other| {
                let named = match sources.of(other) {
                    Source::Default => (*other).to_owned(),
                    _ => sources.describe(other),
                };
                why.replace(&format!("`{other}`"), &named)
            });
            format!("{}: {why}", sources.describe(key))
        }
        _ => message.to_owned(),
    }
}

#[cfg(test)]
// figment's `Jail` closures return its (large) error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::config::Config;
    use figment::Jail;

    fn load(file: Option<&str>, flags: serde_json::Value) -> Result<Config, String> {
        Config::load(file.map(Path::new), &flags).map_err(|err| err.to_string())
    }

    #[test]
    fn errors_name_the_setting_as_written_and_its_value_never_figment_s_path() {
        Jail::expect_with(|jail| {
            let none = serde_json::json!({});
            jail.create_file("gw.toml", "max_frame_byte = 1\n")?;
            let err = load(Some("gw.toml"), none.clone()).unwrap_err();
            assert!(
                err.contains(
                    r#"unknown key "max_frame_byte" in gw.toml: did you mean "max_frame_bytes"?"#
                ),
                "{err}"
            );
            assert!(!err.contains("gateway_id"), "no list of every key: {err}");
            jail.create_file("gw.toml", "http = \"nowhere:port\"\n")?;
            let err = load(Some("gw.toml"), none.clone()).unwrap_err();
            assert!(err.contains(r#"http = "nowhere:port" in gw.toml"#), "{err}");
            assert!(err.contains("IP:PORT") || err.contains("port"), "{err}");
            jail.set_env("IPC_GATEWAY_MAX_FRAME_BYTES", "lots");
            let err = load(None, none.clone()).unwrap_err();
            assert!(err.contains("IPC_GATEWAY_MAX_FRAME_BYTES=lots"), "{err}");
            jail.set_env("IPC_GATEWAY_MAX_FRAME_BYTES", "10");
            let err = load(None, none.clone()).unwrap_err();
            assert!(
                err.contains("IPC_GATEWAY_MAX_FRAME_BYTES=10: must be between"),
                "{err}"
            );
            let err = load(None, serde_json::json!({"max_frame_bytes": 12})).unwrap_err();
            assert!(
                err.contains("--max-frame-bytes 12: must be between"),
                "{err}"
            );
            let err = load(
                None,
                serde_json::json!({"http": "no-such-host.invalid:8080"}),
            )
            .unwrap_err();
            assert!(err.contains("--http no-such-host.invalid:8080"), "{err}");
            assert!(err.contains("use an IP address"), "{err}");
            assert!(!err.contains("default.") && !err.contains(".rs:"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_host_name_in_a_listen_address_is_resolved() {
        Jail::expect_with(|_| {
            let flags = serde_json::json!({"http": "localhost:8081", "grpc": "[::1]:50052"});
            let config = load(None, flags).unwrap();
            assert_eq!(config.http, "127.0.0.1:8081".parse().unwrap());
            assert_eq!(config.grpc, "[::1]:50052".parse().unwrap());
            Ok(())
        });
    }

    #[test]
    fn each_value_s_source_is_the_last_layer_that_holds_it() {
        Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "nats_connections = 3\nsocket_mode = \"0600\"\n")?;
            jail.set_env("IPC_GATEWAY_NATS_CONNECTIONS", "4");
            jail.set_env("NATS_URL", "nats://10.0.0.1:4222");
            let flags = serde_json::json!({"max_frame_bytes": 4096});
            let sources = Sources::read(Some(Path::new("gw.toml")), &flags);
            assert_eq!(sources.of("http"), Source::Default);
            assert_eq!(
                sources.of("socket_mode"),
                Source::File("gw.toml".into(), "\"0600\"".into())
            );
            assert_eq!(
                sources.of("nats_connections").to_string(),
                "env IPC_GATEWAY_NATS_CONNECTIONS"
            );
            assert_eq!(sources.of("nats_url").to_string(), "env NATS_URL");
            assert_eq!(
                sources.of("max_frame_bytes").to_string(),
                "flag --max-frame-bytes"
            );
            Ok(())
        });
    }

    #[test]
    fn a_secret_s_value_is_never_shown_and_errors_name_the_other_setting_as_written() {
        Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "nats_password = \"file-pw\"\n")?;
            jail.set_env("IPC_GATEWAY_NATS_TOKEN", "env-token");
            let flags = serde_json::json!({"nats_creds": "/etc/a.creds"});
            let sources = Sources::read(Some(Path::new("gw.toml")), &flags);
            assert_eq!(sources.describe("nats_token"), "IPC_GATEWAY_NATS_TOKEN=***");
            assert_eq!(
                sources.describe("nats_password"),
                "nats_password = *** in gw.toml"
            );
            assert_eq!(sources.written("nats_token"), "IPC_GATEWAY_NATS_TOKEN");
            assert_eq!(sources.written("nats_creds"), "--nats-creds");
            assert_eq!(
                without_user_info("nats://gw:pw@a:4222, nats://b:4222,tls://tok@c/x@y"),
                "nats://***@a:4222, nats://b:4222,tls://***@c/x@y"
            );
            assert_eq!(without_user_info("gw:pw@a:4222,b"), "***@a:4222,b");
            let err = explain_invalid(
                "nats_token: cannot be used together with `nats_creds`",
                &sources,
            );
            assert_eq!(
                err,
                "IPC_GATEWAY_NATS_TOKEN=***: cannot be used together with --nats-creds /etc/a.creds"
            );
            Ok(())
        });
    }

    #[test]
    fn a_token_password_or_user_from_the_environment_is_taken_as_the_text_it_is() {
        Jail::expect_with(|jail| {
            jail.set_env("IPC_GATEWAY_NATS_USER", "0123");
            jail.set_env("IPC_GATEWAY_NATS_PASSWORD", "\"quoted\"");
            let config = load(None, serde_json::json!({})).unwrap();
            assert_eq!(config.nats_user.as_deref(), Some("0123"));
            assert_eq!(
                config.nats_password.as_ref().map(|p| p.expose()),
                Some("\"quoted\"")
            );
            let flags = serde_json::json!({"nats_user": "from-flag"});
            let config = load(None, flags).unwrap();
            assert_eq!(
                config.nats_user.as_deref(),
                Some("from-flag"),
                "a flag wins"
            );
            Ok(())
        });
    }

    #[test]
    fn the_closest_key_is_suggested_and_nothing_for_a_stranger() {
        assert_eq!(closest_key("max_frame_byte"), Some("max_frame_bytes"));
        assert_eq!(closest_key("nats_ulr"), Some("nats_url"));
        assert_eq!(closest_key("completely_different_thing"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
