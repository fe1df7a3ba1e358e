//! The settings as flags of `ipc-gateway serve`: one `--<key-with-dashes>` per entry of
//! `SETTINGS`, its help the setting's doc comment and its `[default: …]` read from
//! `Config::default()` when the command is built, so nothing here restates a setting. A flag's
//! value is read by the same serde code as the file and the environment. Only the flags given
//! end up in `Flags`, which `Config::load` merges over the file and the environment.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use figment::Figment;
use figment::providers::Serialized;
use figment::value::{Dict, Value};
use serde::Serialize;

use super::{Config, SETTINGS, Setting};

/// The settings given on the command line, by key; flatten it into the `serve` arguments.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Flags(Dict);

impl Args for Flags {
    fn augment_args(command: Command) -> Command {
        let defaults = Defaults::read();
        command.args(SETTINGS.iter().map(|setting| flag(setting, &defaults)))
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for Flags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let defaults = Defaults::read();
        let mut given = Dict::new();
        for setting in SETTINGS {
            let Some(values) = matches.get_many::<Value>(setting.key) else {
                continue;
            };
            let mut values: Vec<Value> = values.cloned().collect();
            let value = if defaults.is_list(setting.key) {
                Value::from(values)
            } else if let Some(value) = values.pop() {
                value
            } else {
                continue;
            };
            given.insert(setting.key.to_owned(), value);
        }
        Ok(Flags(given))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0.extend(Self::from_arg_matches(matches)?.0);
        Ok(())
    }
}

/// One setting's flag. A list (`ws_allowed_origins`) may be given several times.
fn flag(setting: &Setting, defaults: &Defaults) -> Arg {
    let key = setting.key;
    let list = defaults.is_list(key);
    let switch = defaults.is_bool(key);
    let arg = Arg::new(key)
        .long(leak(setting.flag()))
        .value_name(leak(key.to_ascii_uppercase()))
        .help(format!(
            "{} [default: {}]",
            setting.help(),
            defaults.shown(key)
        ))
        .action(if list {
            ArgAction::Append
        } else {
            ArgAction::Set
        })
        .value_parser(move |text: &str| read(key, list, text));
    if switch {
        // `--auth-required` alone means true; `--auth-required false` says false.
        arg.num_args(0..=1).default_missing_value("true")
    } else {
        arg
    }
}

/// clap (without its `string` feature) takes flag names as `&'static str`. The command is
/// built once per process, so leaking these few short names is the plain way to give it them.
fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// Reads a flag's text the way its setting's serde code takes it: as text when the setting
/// takes text (a path, an address, "0660", "json", a subject even if it looks like a number),
/// else as the first of a whole number, a number or true/false that it accepts. A value it
/// cannot take is refused with the error the text got.
fn read(key: &'static str, list: bool, text: &str) -> Result<Value, String> {
    let as_text = Value::from(text);
    let refusal = match accepts(key, list, &as_text) {
        Ok(()) => return Ok(as_text),
        Err(refusal) => refusal,
    };
    [
        text.parse::<u64>().ok().map(Value::from),
        text.parse::<i64>().ok().map(Value::from),
        text.parse::<f64>().ok().map(Value::from),
        text.parse::<bool>().ok().map(Value::from),
    ]
    .into_iter()
    .flatten()
    .find(|value| accepts(key, list, value).is_ok())
    .ok_or(refusal)
}

/// Whether `Config` can be extracted with `value` (one item, for a list) as setting `key`.
/// Only the type is checked here; `Config::validate` judges the merged result.
fn accepts(key: &str, list: bool, value: &Value) -> Result<(), String> {
    let value = if list {
        Value::from(vec![value.clone()])
    } else {
        value.clone()
    };
    Figment::from(Serialized::defaults(Config::default()))
        .merge(Serialized::default(key, value))
        .extract::<Config>()
        .map(|_| ())
        .map_err(|err| err.kind.to_string())
}

/// `Config::default()` through serde, by key: each default as a file would spell it (the
/// socket mode as "0660", the worker threads as this host's core count).
struct Defaults(serde_json::Map<String, serde_json::Value>);

impl Defaults {
    fn read() -> Defaults {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(map)) => Defaults(map),
            other => unreachable!("Config serializes to an object, not {other:?}"),
        }
    }

    /// Whether the setting is a list, so that its flag may be repeated.
    fn is_list(&self, key: &str) -> bool {
        self.0.get(key).is_some_and(serde_json::Value::is_array)
    }

    /// Whether the setting is true/false, so that its flag alone means true.
    fn is_bool(&self, key: &str) -> bool {
        self.0.get(key).is_some_and(serde_json::Value::is_boolean)
    }

    /// The default as `--help` shows it: text without quotes, a list joined with ", ", and
    /// "none" for no value or an empty list.
    fn shown(&self, key: &str) -> String {
        fn shown(value: &serde_json::Value) -> String {
            match value {
                serde_json::Value::Null => "none".to_owned(),
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Array(items) if items.is_empty() => "none".to_owned(),
                serde_json::Value::Array(items) => {
                    items.iter().map(shown).collect::<Vec<_>>().join(", ")
                }
                other => other.to_string(),
            }
        }
        self.0.get(key).map_or_else(|| "none".to_owned(), shown)
    }
}

#[cfg(test)]
// figment's `Jail` closures return its (large) error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use std::collections::BTreeSet;

    use clap::error::ErrorKind;
    use figment::Jail;
    use figment::providers::Format;

    use super::*;
    use crate::config::{KEYS, LogFormat};

    fn serve() -> Command {
        Flags::augment_args(Command::new("serve"))
    }

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let matches =
            serve().try_get_matches_from(std::iter::once("serve").chain(args.to_vec()))?;
        Flags::from_arg_matches(&matches)
    }

    /// The text of one option in rendered help: from `--flag <` to the next option.
    fn help_entry<'a>(help: &'a str, flag: &str) -> &'a str {
        let start = help
            .find(&format!("{flag} <"))
            .or_else(|| help.find(&format!("{flag} [<")))
            .unwrap_or_else(|| panic!("{flag} is not in the help:\n{help}"));
        let entry = &help[start..];
        let end = entry
            .match_indices('\n')
            .map(|(at, _)| at)
            .find(|&at| entry[at + 1..].trim_start().starts_with('-'))
            .unwrap_or(entry.len());
        &entry[..end]
    }

    #[test]
    fn every_key_has_a_flag_whose_help_shows_the_default_from_config_default() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let help = serve().render_help().to_string();
        for key in KEYS {
            let flag = format!("--{}", key.replace('_', "-"));
            let shown = match &defaults[key] {
                serde_json::Value::Null => "none".to_owned(),
                serde_json::Value::Array(items) if items.is_empty() => "none".to_owned(),
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let entry = help_entry(&help, &flag);
            assert!(
                entry.contains(&format!("[default: {shown}]")),
                "{key}: {entry}"
            );
        }
        // Spelled out, so that the rendering is checked too, not only agreement with itself.
        let workers = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
        for (flag, shown) in [
            ("--socket", "/tmp/ipc-gateway.sock".to_owned()),
            ("--socket-mode", "0660".to_owned()),
            ("--max-frame-bytes", "1048576".to_owned()),
            ("--http", "127.0.0.1:8080".to_owned()),
            ("--log-format", "text".to_owned()),
            ("--default-subject", "none".to_owned()),
            ("--breaker-failure-rate", "0.0".to_owned()),
            ("--worker-threads", workers.to_string()),
        ] {
            let entry = help_entry(&help, flag);
            assert!(entry.contains(&format!("[default: {shown}]")), "{entry}");
        }
        assert!(
            help_entry(&help, "--max-frame-bytes")
                .contains("Largest frame or JSON line accepted, in bytes.")
        );
    }

    #[test]
    fn every_config_field_is_in_keys_and_has_help() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let fields: BTreeSet<&str> = defaults
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let keys: BTreeSet<&str> = KEYS.iter().copied().collect();
        assert_eq!(fields, keys);
        assert_eq!(keys.len(), KEYS.len(), "a key is listed twice");
        let settings: Vec<&str> = SETTINGS.iter().map(|setting| setting.key).collect();
        assert_eq!(settings, KEYS);
        for setting in SETTINGS {
            assert!(!setting.help().is_empty(), "{} has no doc", setting.key);
        }
    }

    #[test]
    fn flags_are_read_like_the_file_and_the_environment() {
        Jail::expect_with(|_| {
            let flags = parse(&[
                "--socket-mode",
                "0600",
                "--max-frame-bytes",
                "4096",
                "--log-format",
                "json",
                "--ws-allowed-origins",
                "https://a.example",
                "--ws-allowed-origins",
                "https://b.example",
                "--breaker-failure-rate",
                "0.25",
                "--default-subject",
                "123",
                "--http",
                "127.0.0.1:9",
            ])
            .unwrap();
            let config = Config::load(None, &flags).unwrap();
            assert_eq!(config.socket_mode, 0o600);
            assert_eq!(config.max_frame_bytes, 4096);
            assert_eq!(config.log_format, LogFormat::Json);
            assert_eq!(
                config.ws_allowed_origins,
                ["https://a.example", "https://b.example"]
            );
            assert_eq!(config.breaker_failure_rate, 0.25);
            assert_eq!(config.default_subject.as_deref(), Some("123"));
            assert_eq!(config.http.port(), 9);
            assert_eq!(config.nats_url, Config::default().nats_url);
            Ok(())
        });
    }

    #[test]
    fn only_the_flags_given_override_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env("IPC_GATEWAY_MAX_FRAME_BYTES", "8192");
            jail.set_env("IPC_GATEWAY_NATS_CONNECTIONS", "3");
            let config = Config::load(None, &parse(&["--nats-connections", "4"]).unwrap()).unwrap();
            assert_eq!(config.nats_connections, 4);
            assert_eq!(config.max_frame_bytes, 8192);
            assert_eq!(parse(&[]).unwrap(), Flags::default());
            Ok(())
        });
    }

    #[test]
    fn identity_headers_take_a_form_or_the_old_switch_as_a_flag() {
        use crate::config::IdentityHeaders;
        Jail::expect_with(|_| {
            for (given, form) in [
                ("minimal", IdentityHeaders::Minimal),
                ("full", IdentityHeaders::Full),
                ("off", IdentityHeaders::Off),
                ("false", IdentityHeaders::Off),
                ("true", IdentityHeaders::Full),
            ] {
                let flags = parse(&["--identity-headers", given]).unwrap();
                let config = Config::load(None, &flags).unwrap();
                assert_eq!(config.identity_headers, form, "{given}");
            }
            Ok(())
        });
    }

    /// docs/operations.md: its settings table lists every setting in order with its
    /// environment variable, flag and default (the meaning column is prose for operators and is
    /// not checked), and it points to the example file.
    #[test]
    fn the_operations_guide_lists_every_setting_with_its_default() {
        let guide =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
                .unwrap();
        let table = guide
            .split("| TOML key | environment | flag | default | meaning |")
            .nth(1)
            .expect("the settings table");
        let rows: Vec<Vec<&str>> = table
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|line| line[1..].splitn(5, " | ").map(str::trim).collect())
            .collect();
        let keys: Vec<&str> = rows.iter().map(|row| row[0].trim_matches('`')).collect();
        assert_eq!(keys, KEYS, "the table's keys");
        let defaults = Defaults::read();
        for (row, setting) in rows.iter().zip(SETTINGS) {
            assert!(row[1].contains(&format!("`{}`", setting.env())), "{row:?}");
            assert_eq!(row[2], format!("`--{}`", setting.flag()), "{row:?}");
            let documented = match row[3].strip_prefix('`') {
                Some(code) => code.split('`').next().unwrap_or_default(),
                None => row[3],
            };
            if setting.key == "worker_threads" {
                // The default depends on the host.
                assert_eq!(documented, "half the CPUs, at least 1");
            } else {
                assert_eq!(documented, defaults.shown(setting.key), "{row:?}");
            }
        }

        assert!(
            guide.contains("[`dist/ipc-gateway.toml`]"),
            "the guide points to the example"
        );
    }

    /// dist/ipc-gateway.toml, the one example file: every key, each with its doc comment
    /// above it, loads and validates, and each value given is the default except the ones its
    /// header names.
    #[test]
    fn the_example_file_in_dist_has_every_key_with_its_doc_and_loads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/ipc-gateway.toml");
        let example = std::fs::read_to_string(path).unwrap();
        for setting in SETTINGS {
            let key = setting.key;
            let at = example
                .find(&format!("\n{key} = "))
                .or_else(|| example.find(&format!("\n# {key} = ")))
                .unwrap_or_else(|| panic!("{key} is not in the example"));
            let first_doc_line = setting.doc.lines().next().unwrap_or_default().trim();
            let before = &example[..at];
            assert!(
                before[before.len().saturating_sub(setting.doc.len() + 200)..]
                    .contains(first_doc_line),
                "{key}: its doc comment is not above it"
            );
        }
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(figment::providers::Toml::file(path))
            .extract()
            .unwrap();
        config.validate().unwrap();
        let given = serde_json::to_value(&config).unwrap();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        for key in KEYS {
            if !["socket", "worker_threads", "log_format"].contains(key) {
                assert_eq!(given[key], defaults[key], "{key} differs from the default");
            }
        }
    }

    #[test]
    fn a_flag_value_of_the_wrong_kind_is_refused_naming_the_flag() {
        for (args, says) in [
            (["--max-frame-bytes", "lots"], "usize"),
            (["--log-format", "xml"], "json"),
            (["--socket-mode", "999"], "octal"),
            (["--http", "8080"], "address"),
            (["--identity-headers", "some"], "minimal"),
        ] {
            let err = parse(&args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{err}");
            let text = err.to_string();
            assert!(
                text.contains(args[0]) && text.contains(args[1]) && text.contains(says),
                "{text}"
            );
        }
        let err = parse(&["--max-frame-byte", "1"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }
}
