//! How the gateway proves who it is to NATS and checks NATS's certificate: the `nats_creds`,
//! `nats_nkey`, `nats_token`, `nats_user`/`nats_password` and `nats_tls_*` settings (checked at
//! start by config/nats_auth.rs) put on the `ConnectOptions` every NATS connection starts from:
//! the pool's (so JetStream and KV, which use the pool's clients, too), the failure probe's and
//! `demo-echo`'s.
//!
//! A creds or seed file is read again at every connect (async-nats reads its own
//! `credentials_file` once, when the options are built): a rotated file is taken at the next
//! reconnect, as the NATS Go client does. The CA and client certificate files are read at every
//! connect by async-nats itself.

use std::path::PathBuf;
use std::sync::Arc;

use async_nats::{Auth, AuthError, ConnectOptions};

use crate::config::{Config, Secret, read_creds, read_seed, written_as};

/// The credential and TLS settings of one configuration.
#[derive(Debug, Clone)]
pub struct Credentials {
    method: Method,
    tls_ca: Option<PathBuf>,
    tls_client: Option<(PathBuf, PathBuf)>,
    tls_first: bool,
    tls_required: bool,
}

#[derive(Debug, Clone)]
enum Method {
    Anonymous,
    Creds(Arc<PathBuf>),
    Nkey(Arc<PathBuf>),
    Token(Secret),
    User(String, Secret),
}

impl Credentials {
    pub fn new(config: &Config) -> Credentials {
        let method = match (
            &config.nats_creds,
            &config.nats_nkey,
            &config.nats_token,
            (&config.nats_user, &config.nats_password),
        ) {
            (Some(path), ..) => Method::Creds(Arc::new(path.clone())),
            (_, Some(path), ..) => Method::Nkey(Arc::new(path.clone())),
            (_, _, Some(token), _) => Method::Token(token.clone()),
            (_, _, _, (Some(user), Some(password))) => Method::User(user.clone(), password.clone()),
            _ => Method::Anonymous,
        };
        Credentials {
            method,
            tls_ca: config.nats_tls_ca.clone(),
            tls_client: config
                .nats_tls_cert
                .clone()
                .zip(config.nats_tls_key.clone()),
            tls_first: config.nats_tls_first,
            tls_required: config.nats_tls(),
        }
    }

    /// `ConnectOptions` with the credential and TLS settings; everything else is the caller's.
    pub fn options(&self) -> ConnectOptions {
        let options = match &self.method {
            Method::Anonymous => ConnectOptions::new(),
            Method::Token(token) => ConnectOptions::new().token(token.expose().to_owned()),
            Method::User(user, password) => {
                ConnectOptions::new().user_and_password(user.clone(), password.expose().to_owned())
            }
            Method::Creds(path) => {
                let path = path.clone();
                ConnectOptions::with_auth_callback(move |nonce| {
                    let path = path.clone();
                    async move {
                        let (jwt, key_pair) = read_creds(&path).map_err(AuthError::new)?;
                        let mut auth = Auth::new();
                        auth.jwt = Some(jwt);
                        auth.signature = Some(key_pair.sign(&nonce).map_err(AuthError::new)?);
                        Ok(auth)
                    }
                })
            }
            Method::Nkey(path) => {
                let path = path.clone();
                ConnectOptions::with_auth_callback(move |nonce| {
                    let path = path.clone();
                    async move {
                        let key_pair = read_seed(&path).map_err(AuthError::new)?;
                        let mut auth = Auth::new();
                        auth.nkey = Some(key_pair.public_key());
                        auth.signature = Some(key_pair.sign(&nonce).map_err(AuthError::new)?);
                        Ok(auth)
                    }
                })
            }
        };
        let options = match &self.tls_ca {
            Some(ca) => options.add_root_certificates(ca.clone()),
            None => options,
        };
        let options = match &self.tls_client {
            Some((cert, key)) => options.add_client_certificate(cert.clone(), key.clone()),
            None => options,
        };
        let options = options.require_tls(self.tls_required);
        if self.tls_first {
            options.tls_first()
        } else {
            options
        }
    }

    /// The setting that holds the credential, as written (`--nats-token`,
    /// `IPC_GATEWAY_NATS_USER and IPC_GATEWAY_NATS_PASSWORD`); `None` without one.
    pub fn credential_setting(&self) -> Option<String> {
        match &self.method {
            Method::Anonymous => None,
            Method::Creds(_) => Some(written_as("nats_creds")),
            Method::Nkey(_) => Some(written_as("nats_nkey")),
            Method::Token(_) => Some(written_as("nats_token")),
            Method::User(..) => Some(format!(
                "{} and {}",
                written_as("nats_user"),
                written_as("nats_password")
            )),
        }
    }

    /// The TLS settings given, as written (`--nats-tls-ca, --nats-tls-cert`); `None` without.
    pub fn tls_settings(&self) -> Option<String> {
        let given: Vec<String> = [
            ("nats_tls_ca", self.tls_ca.is_some()),
            ("nats_tls_cert", self.tls_client.is_some()),
            ("nats_tls_key", self.tls_client.is_some()),
            ("nats_tls_first", self.tls_first),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(key, _)| written_as(key))
        .collect();
        (!given.is_empty()).then(|| given.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_named_is_the_one_that_holds_the_credential() {
        let token = Config {
            nats_token: Some(Secret::new("t0k3n")),
            ..Config::default()
        };
        let credentials = Credentials::new(&token);
        assert_eq!(
            credentials.credential_setting().as_deref(),
            Some(written_as("nats_token").as_str())
        );
        assert!(!format!("{credentials:?}").contains("t0k3n"));
        let user = Config {
            nats_user: Some("gw".into()),
            nats_password: Some(Secret::new("pw")),
            nats_tls_ca: Some("ca.pem".into()),
            ..Config::default()
        };
        let credentials = Credentials::new(&user);
        assert_eq!(
            credentials.credential_setting().as_deref(),
            Some(
                format!(
                    "{} and {}",
                    written_as("nats_user"),
                    written_as("nats_password")
                )
                .as_str()
            )
        );
        assert_eq!(credentials.tls_settings(), Some(written_as("nats_tls_ca")));
        assert!(credentials.tls_required, "a CA makes TLS required");
        let anonymous = Credentials::new(&Config::default());
        assert_eq!(anonymous.credential_setting(), None);
        assert_eq!(anonymous.tls_settings(), None);
        assert!(!anonymous.tls_required);
    }
}
