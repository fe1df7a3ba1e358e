//! Why the pool cannot connect to NATS, in one log line per period that says what to fix: the
//! server cannot be reached (the TCP connect's own error), it refused the gateway's credentials
//! (naming the setting that holds them), the creds or seed file could not be used, or TLS failed
//! (rustls's reason, naming the TLS settings). async-nats's event for a failed attempt carries
//! only the error's kind ("IO error"), so the line comes from a probe: a plain TCP connect,
//! then one NATS connect with the same credentials and TLS, whose error has the cause. The probe
//! runs only when a line is due (once per period), never per attempt.
//!
//! No line holds a secret: the credential is named by its setting, and what NATS and rustls
//! say about a refusal never quotes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{ConnectError, ConnectErrorKind, ServerAddr};
use tracing::{debug, warn};

use super::credentials::Credentials;
use super::pool::LogThrottle;

/// How long each step of the probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The servers, the credentials, and the one throttle over every pool connection.
pub struct ConnectFailures {
    servers: Vec<ServerAddr>,
    credentials: Arc<Credentials>,
    throttle: LogThrottle,
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq)]
enum Cause {
    /// TCP does not connect: the system's error.
    Unreachable(String),
    /// NATS answered the CONNECT with "Authorization Violation".
    Refused,
    /// The creds or seed file could not be read or used at connect.
    Unsigned(String),
    /// The TLS handshake, or TLS set-up, failed: why.
    Tls(String),
    /// Another handshake failure: async-nats's error.
    Handshake(String),
    /// The probe connected: the failure has passed.
    Passed,
}

impl ConnectFailures {
    pub fn new(
        servers: Vec<ServerAddr>,
        credentials: Arc<Credentials>,
        every: Duration,
    ) -> ConnectFailures {
        ConnectFailures {
            servers,
            credentials,
            throttle: LogThrottle::new(every),
        }
    }

    /// One failed (re)connect attempt of pool connection `connection`; `event` is async-nats's
    /// text for it. Logs at most one line per period, over every connection, from a task of its
    /// own (the probe's connection is not `Sync`, as async-nats wants its event futures).
    pub fn report(self: &Arc<Self>, connection: usize, event: String) {
        if !self.throttle.allow(Instant::now()) {
            debug!(connection, error = %event, "NATS connect failed");
            return;
        }
        let failures = self.clone();
        tokio::spawn(async move { failures.log(&event).await });
    }

    async fn log(&self, event: &str) {
        let cause = self.probe().await;
        let url = self.urls();
        match &cause {
            Cause::Unreachable(cause) => warn!(
                %url,
                %cause,
                error = %event,
                "NATS unreachable; retrying (logged at most every {} s)",
                self.every_secs()
            ),
            other => warn!("{}", self.line(other, event)),
        }
    }

    fn every_secs(&self) -> u64 {
        self.throttle.every().as_secs()
    }

    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("{}://{}:{}", scheme(s), s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The log line for a cause other than `Unreachable` (which keeps its structured form).
    fn line(&self, cause: &Cause, event: &str) -> String {
        let url = self.urls();
        let every = self.every_secs();
        let retrying = format!("retrying (logged at most every {every} s)");
        let setting = self.credentials.credential_setting();
        match cause {
            Cause::Refused => match setting {
                Some(setting) => format!(
                    "NATS at {url} refused the gateway's credentials ({setting}): authorization violation; {retrying}"
                ),
                None => format!(
                    "NATS at {url} refused the gateway: authorization violation (no credential is set; see --nats-creds, --nats-nkey, --nats-token, --nats-user); {retrying}"
                ),
            },
            Cause::Unsigned(why) => format!(
                "NATS at {url}: the gateway could not sign in with {}: {why}; {retrying}",
                setting.unwrap_or_else(|| "its credential".into())
            ),
            Cause::Tls(why) => format!(
                "NATS at {url}: TLS failed ({}): {why}; {retrying}",
                self.credentials
                    .tls_settings()
                    .unwrap_or_else(|| "no nats_tls_* setting: the system's CA roots".into())
            ),
            Cause::Handshake(why) => {
                format!("NATS at {url}: TCP connects, the NATS handshake fails: {why}; {retrying}")
            }
            Cause::Passed | Cause::Unreachable(_) => {
                format!("NATS connect failed ({event}); a new attempt connected")
            }
        }
    }

    /// A TCP connect to the first server, then one NATS connect with the same credentials.
    async fn probe(&self) -> Cause {
        let Some(server) = self.servers.first() else {
            return Cause::Unreachable("no server".into());
        };
        let address = (server.host().to_owned(), server.port());
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
            Err(_) => return Cause::Unreachable(format!("no answer within {PROBE_TIMEOUT:?}")),
            Ok(Err(err)) => return Cause::Unreachable(err.to_string()),
            Ok(Ok(_)) => {}
        }
        let connected = self
            .credentials
            .options()
            .name("ipc-gateway-probe")
            .connection_timeout(PROBE_TIMEOUT * 2)
            .connect(server.clone())
            .await;
        match connected {
            Ok(_client) => Cause::Passed,
            Err(err) => classify(&err),
        }
    }
}

fn scheme(server: &ServerAddr) -> &'static str {
    if server.tls_required() { "tls" } else { "nats" }
}

/// The cause a failed NATS connect names.
fn classify(err: &ConnectError) -> Cause {
    match err.kind() {
        ConnectErrorKind::AuthorizationViolation => return Cause::Refused,
        ConnectErrorKind::Authentication => {
            let why = std::error::Error::source(err).map_or_else(
                || err.to_string(),
                |source| {
                    let text = source.to_string();
                    text.strip_prefix("AuthError(")
                        .and_then(|inner| inner.strip_suffix(')'))
                        .map_or(text.clone(), str::to_owned)
                },
            );
            return Cause::Unsigned(why);
        }
        _ => {}
    }
    if let Some(tls) = rustls_error(err) {
        return Cause::Tls(tls.to_string());
    }
    if err.kind() == ConnectErrorKind::Tls {
        return Cause::Tls(
            std::error::Error::source(err).map_or_else(|| err.to_string(), ToString::to_string),
        );
    }
    Cause::Handshake(err.to_string())
}

/// rustls's error in `err`'s chain: tokio-rustls wraps it in an `io::Error`, whose `source()`
/// skips it, so each `io::Error` is looked into too.
fn rustls_error(err: &ConnectError) -> Option<&async_nats::rustls::Error> {
    let mut next = std::error::Error::source(err);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>())
        {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Secret, written_as};

    fn failures(config: &Config) -> ConnectFailures {
        ConnectFailures::new(
            vec!["nats://127.0.0.1:4222".parse().unwrap()],
            Arc::new(Credentials::new(config)),
            Duration::from_secs(10),
        )
    }

    #[test]
    fn errors_are_sorted_into_causes() {
        assert_eq!(
            classify(&ConnectError::new(ConnectErrorKind::AuthorizationViolation)),
            Cause::Refused
        );
        let unsigned = ConnectError::with_source(
            ConnectErrorKind::Authentication,
            async_nats::AuthError::new("nats_creds: cannot read /x"),
        );
        assert_eq!(
            classify(&unsigned),
            Cause::Unsigned("nats_creds: cannot read /x".into())
        );
        let handshake = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            async_nats::rustls::Error::InvalidCertificate(
                async_nats::rustls::CertificateError::UnknownIssuer,
            ),
        );
        let tls = classify(&ConnectError::from(handshake));
        assert!(
            matches!(&tls, Cause::Tls(why) if why.contains("UnknownIssuer")),
            "{tls:?}"
        );
        assert!(matches!(
            classify(&ConnectError::with_source(
                ConnectErrorKind::Io,
                "broken pipe"
            )),
            Cause::Handshake(_)
        ));
    }

    #[test]
    fn a_refusal_names_the_credential_setting_and_never_its_value() {
        let config = Config {
            nats_token: Some(Secret::new("t0k3n-value")),
            ..Config::default()
        };
        let line = failures(&config).line(&Cause::Refused, "authorization violation");
        // How the setting is written depends on the first `Config::load` of this process
        // (another unit test's, here): `--nats-token` for the daemon given that flag.
        let token = written_as("nats_token");
        assert_eq!(
            line,
            format!(
                "NATS at nats://127.0.0.1:4222 refused the gateway's credentials ({token}): authorization violation; retrying (logged at most every 10 s)"
            )
        );
        let anonymous = failures(&Config::default()).line(&Cause::Refused, "");
        assert!(anonymous.contains("no credential is set"), "{anonymous}");
        let tls = failures(&Config {
            nats_tls_ca: Some("ca.pem".into()),
            ..Config::default()
        })
        .line(
            &Cause::Tls("invalid peer certificate: UnknownIssuer".into()),
            "",
        );
        assert!(
            tls.contains(&format!(
                "TLS failed ({}): invalid peer certificate",
                written_as("nats_tls_ca")
            )),
            "{tls}"
        );
    }
}
