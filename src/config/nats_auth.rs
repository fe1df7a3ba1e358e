//! The settings that secure the gateway's own NATS connections (`nats_creds`, `nats_nkey`,
//! `nats_token`, `nats_user` + `nats_password`, `nats_tls_*`): which combinations make sense,
//! and the files they name, read and parsed at start, so that a typo stops the gateway with the
//! setting's name instead of turning into an endless reconnect loop. The core reads the creds
//! and seed files again at every connect, with `read_creds` and `read_seed`.
//!
//! Errors name a second setting as `` `key` ``; `sources::explain_invalid` rewrites each such
//! name to the setting as the operator wrote it.

use std::path::Path;
use std::sync::OnceLock;

use nkeys::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{Config, Sources};

/// The ways of proving who the gateway is, one at most (`nats_password` goes with `nats_user`).
pub const CREDENTIAL_KEYS: [&str; 4] = ["nats_creds", "nats_nkey", "nats_token", "nats_user"];

/// The settings whose origin the log names when NATS refuses the gateway.
const NAMED_KEYS: [&str; 9] = [
    "nats_creds",
    "nats_nkey",
    "nats_token",
    "nats_user",
    "nats_password",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
    "nats_tls_first",
];

/// How the first configuration loaded (the one the daemon connects with: these settings need a
/// restart) wrote each of `NAMED_KEYS`.
static WRITTEN: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();

/// Remembers how `sources` wrote the NATS security settings given, on the first load only.
pub(super) fn remember_sources(sources: &Sources) {
    WRITTEN.get_or_init(|| {
        NAMED_KEYS
            .iter()
            .filter(|key| sources.of(key) != super::Source::Default)
            .map(|key| (*key, sources.written(key)))
            .collect()
    });
}

/// A NATS security setting as the operator wrote it, without its value: `--nats-token`,
/// `IPC_GATEWAY_NATS_TOKEN`, `nats_token in /etc/ipc-gateway/gateway.toml`; the flag when the
/// configuration was not loaded from the command line (a gateway built in a test).
pub fn written_as(key: &str) -> String {
    WRITTEN
        .get()
        .and_then(|written| written.iter().find(|(k, _)| *k == key))
        .map_or_else(
            || format!("--{}", key.replace('_', "-")),
            |(_, w)| w.clone(),
        )
}

/// The settings whose environment variable is taken as the text it is: figment reads `0123`
/// as the number 123 and `"abc"` as abc, which would change a token, a password or a user name
/// without a word.
const TEXT_KEYS: [&str; 3] = ["nats_token", "nats_user", "nats_password"];

/// `TEXT_KEYS` from their `IPC_GATEWAY_` variables, exactly as set, to merge over figment's
/// reading of the environment.
pub(super) fn text_from_env() -> figment::providers::Serialized<figment::value::Dict> {
    let mut given = figment::value::Dict::new();
    for (name, value) in std::env::vars() {
        let Some(key) = name.get(super::ENV_PREFIX.len()..) else {
            continue;
        };
        if name[..super::ENV_PREFIX.len()].eq_ignore_ascii_case(super::ENV_PREFIX)
            && let Some(key) = TEXT_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key))
        {
            given.insert((*key).to_owned(), value.into());
        }
    }
    figment::providers::Serialized::defaults(given)
}

impl Config {
    /// The credential setting in force (`CREDENTIAL_KEYS`), if any.
    pub fn nats_credential_key(&self) -> Option<&'static str> {
        let set = [
            self.nats_creds.is_some(),
            self.nats_nkey.is_some(),
            self.nats_token.is_some(),
            self.nats_user.is_some(),
        ];
        CREDENTIAL_KEYS
            .iter()
            .zip(set)
            .find_map(|(key, set)| set.then_some(*key))
    }

    /// Whether any `nats_tls_*` setting is given: then every NATS connection must be TLS, even
    /// to a server whose INFO does not ask for it (so that a man in the middle who strips that
    /// from the INFO does not get the credentials in clear).
    pub fn nats_tls(&self) -> bool {
        self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some() || self.nats_tls_first
    }

    /// Conflicting settings, then the files: each exists and parses.
    pub(super) fn validate_nats_auth(&self) -> Result<(), String> {
        // async-nats does not send a URL's user information: a credential there would be
        // ignored (and shown wherever the URL is).
        if self
            .nats_servers()
            .is_ok_and(|servers| servers.iter().any(|server| server.has_user_pass()))
        {
            return Err(
                "nats_url: a user, password or token in the URL is not sent to NATS: set `nats_token`, or `nats_user` and `nats_password`".into(),
            );
        }
        let set: Vec<&str> = [
            ("nats_creds", self.nats_creds.is_some()),
            ("nats_nkey", self.nats_nkey.is_some()),
            ("nats_token", self.nats_token.is_some()),
            ("nats_user", self.nats_user.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if let [first, second, ..] = set[..] {
            return Err(format!(
                "{second}: cannot be used together with `{first}`: give one way to authenticate to NATS"
            ));
        }
        if self.nats_password.is_some() && self.nats_user.is_none() {
            return Err("nats_password: needs `nats_user`".into());
        }
        if self.nats_user.is_some() && self.nats_password.is_none() {
            return Err("nats_user: needs `nats_password`".into());
        }
        for (key, empty) in [
            ("nats_user", self.nats_user.as_deref() == Some("")),
            (
                "nats_token",
                self.nats_token
                    .as_ref()
                    .is_some_and(|t| t.expose().is_empty()),
            ),
        ] {
            if empty {
                return Err(format!("{key}: must not be empty"));
            }
        }
        match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(_), None) => return Err("nats_tls_cert: needs `nats_tls_key`".into()),
            (None, Some(_)) => return Err("nats_tls_key: needs `nats_tls_cert`".into()),
            _ => {}
        }
        let file = |key: &str, path: &Path, check: fn(&Path) -> Result<(), String>| {
            check(path).map_err(|why| format!("{key}: {why}"))
        };
        if let Some(path) = &self.nats_creds {
            file("nats_creds", path, |path| read_creds(path).map(|_| ()))?;
        }
        if let Some(path) = &self.nats_nkey {
            file("nats_nkey", path, |path| read_seed(path).map(|_| ()))?;
        }
        if let Some(path) = &self.nats_tls_ca {
            file("nats_tls_ca", path, check_certificates)?;
        }
        if let Some(path) = &self.nats_tls_cert {
            file("nats_tls_cert", path, check_certificates)?;
        }
        if let Some(path) = &self.nats_tls_key {
            file("nats_tls_key", path, check_private_key)?;
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// A `.creds` file: the user JWT and the key pair of its nkey seed. The format is two blocks,
/// each a `-----BEGIN …-----` line, the content, and an `------END …------` line: the JWT
/// first, then the seed. Errors never quote the file (it holds the seed).
pub fn read_creds(path: &Path) -> Result<(String, KeyPair), String> {
    let text = read(path)?;
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("---")
            && line.contains("BEGIN")
            && let Some(content) = lines.next().filter(|content| !content.is_empty())
        {
            blocks.push(content.to_owned());
        }
    }
    let not_creds = |what: &str| {
        format!(
            "{} is not a NATS credentials file: {what} (expected a -----BEGIN NATS USER JWT----- block, then a -----BEGIN USER NKEY SEED----- block)",
            path.display()
        )
    };
    let [jwt, seed, ..] = &blocks[..] else {
        return Err(not_creds("it has fewer than two BEGIN blocks"));
    };
    if jwt.split('.').count() != 3 {
        return Err(not_creds("its first block is not a JWT"));
    }
    let key_pair = KeyPair::from_seed(seed)
        .map_err(|err| not_creds(&format!("its seed is not valid ({err})")))?;
    Ok((jwt.clone(), key_pair))
}

/// An nkey seed file (`SU…`, as `nk -gen user` writes it): its key pair. Errors never quote the
/// file.
pub fn read_seed(path: &Path) -> Result<KeyPair, String> {
    let text = read(path)?;
    let seed = text.trim();
    KeyPair::from_seed(seed).map_err(|err| {
        format!(
            "{} does not hold an nkey seed such as SUA… ({err})",
            path.display()
        )
    })
}

fn check_certificates(path: &Path) -> Result<(), String> {
    read(path)?;
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("{} is not PEM certificates: {err}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(())
}

fn check_private_key(path: &Path) -> Result<(), String> {
    read(path)?;
    PrivateKeyDer::from_pem_file(path)
        .map(|_| ())
        .map_err(|err| format!("{} is not a PEM private key: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn config(edit: impl FnOnce(&mut Config)) -> Config {
        let mut config = Config::default();
        edit(&mut config);
        config
    }

    #[test]
    fn two_ways_to_authenticate_or_half_of_one_are_refused_naming_both_settings() {
        for (config, says) in [
            (
                config(|c| {
                    c.nats_creds = Some("a.creds".into());
                    c.nats_token = Some(Secret::new("t"));
                }),
                "nats_token: cannot be used together with `nats_creds`",
            ),
            (
                config(|c| {
                    c.nats_nkey = Some("a.nk".into());
                    c.nats_user = Some("u".into());
                    c.nats_password = Some(Secret::new("p"));
                }),
                "nats_user: cannot be used together with `nats_nkey`",
            ),
            (
                config(|c| c.nats_password = Some(Secret::new("p"))),
                "nats_password: needs `nats_user`",
            ),
            (
                config(|c| c.nats_user = Some("u".into())),
                "nats_user: needs `nats_password`",
            ),
            (
                config(|c| c.nats_tls_cert = Some("c.pem".into())),
                "nats_tls_cert: needs `nats_tls_key`",
            ),
            (
                config(|c| c.nats_tls_key = Some("k.pem".into())),
                "nats_tls_key: needs `nats_tls_cert`",
            ),
        ] {
            let err = config.validate_nats_auth().unwrap_err();
            assert!(err.starts_with(says), "{err}");
        }
        assert!(Config::default().validate_nats_auth().is_ok());
        let url = config(|c| c.nats_url = "nats://gw:pw@127.0.0.1:4222".into());
        assert!(
            url.validate_nats_auth()
                .unwrap_err()
                .starts_with("nats_url: a user, password or token in the URL is not sent")
        );
    }

    #[test]
    fn files_that_are_missing_or_do_not_parse_are_refused_naming_the_setting_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.creds");
        let err = config(|c| c.nats_creds = Some(missing.clone()))
            .validate_nats_auth()
            .unwrap_err();
        assert!(
            err.starts_with("nats_creds: cannot read") && err.contains(&*missing.to_string_lossy()),
            "{err}"
        );
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "SUAsecretsecret\n").unwrap();
        for (key, edit) in [
            (
                "nats_creds",
                (|c: &mut Config, p| c.nats_creds = Some(p)) as fn(&mut Config, _),
            ),
            ("nats_nkey", |c, p| c.nats_nkey = Some(p)),
            ("nats_tls_ca", |c, p| c.nats_tls_ca = Some(p)),
        ] {
            let err = config(|c| edit(c, junk.clone()))
                .validate_nats_auth()
                .unwrap_err();
            assert!(err.starts_with(&format!("{key}: ")), "{err}");
            assert!(err.contains(&*junk.to_string_lossy()), "{err}");
            assert!(!err.contains("SUAsecret"), "the file is not quoted: {err}");
        }
        let err = config(|c| {
            c.nats_tls_cert = Some(junk.clone());
            c.nats_tls_key = Some(junk.clone());
        })
        .validate_nats_auth()
        .unwrap_err();
        assert!(err.starts_with("nats_tls_cert: "), "{err}");
    }

    #[test]
    fn a_seed_file_and_a_creds_file_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let user = KeyPair::new_user();
        let seed = dir.path().join("user.nk");
        std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
        assert_eq!(read_seed(&seed).unwrap().public_key(), user.public_key());
        let creds = dir.path().join("user.creds");
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\naaa.bbb.ccc\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\
                 NKEY Seed printed below can be used to sign and prove identity.\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().unwrap()
            ),
        )
        .unwrap();
        let (jwt, key_pair) = read_creds(&creds).unwrap();
        assert_eq!(jwt, "aaa.bbb.ccc");
        assert_eq!(key_pair.public_key(), user.public_key());
    }
}
