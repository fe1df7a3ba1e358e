//! The soak's identities and their policy: the Unix-socket user (this process's uid), and two
//! bearer-token subjects, `soak-ws` and `soak-grpc`, whose HS256 tokens are signed with a
//! secret given to the gateway. The policy grants each exactly what it uses; a reload rewrites
//! it in the other of two versions (the second adds a grant for an identity that never
//! connects), sends the gateway SIGHUP and checks the reload counter, the
//! last-reload-successful gauge, and that the policy still refuses what it does not grant.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc_gateway::client::Client;
use ipc_gateway::protocol::{ErrorCode, Frontend};
use serde::Serialize;

use crate::common::{http_get, metric_labeled, metric_sum};
use crate::stats::{Stats, outcome_of};
use crate::{ECHO_SUBJECT, EVENTS_SUBJECT, FORBIDDEN_SUBJECT, REQUEST_TIMEOUT, WS_EVENTS_SUBJECT};

pub const WS_SUB: &str = "soak-ws";
pub const GRPC_SUB: &str = "soak-grpc";
/// How long a reload may take to show in the gateway's metrics.
const RELOAD_PATIENCE: Duration = Duration::from_secs(10);

/// The files the gateway is started with, and the tokens the clients present.
pub struct Identities {
    pub policy: PathBuf,
    pub secret: PathBuf,
    pub ws_token: String,
    pub grpc_token: String,
    pub uid: u32,
}

impl Identities {
    /// Writes the secret and version A of the policy into `dir`; tokens valid for `seconds`
    /// plus a day.
    pub fn create(dir: &Path, seconds: f64) -> Result<Identities, String> {
        let secret: Vec<u8> = {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id());
            let mut x = seed | 1;
            (0..48)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b'a' + (x % 26) as u8
                })
                .collect()
        };
        let secret_path = dir.join("jwt-secret");
        std::fs::write(&secret_path, &secret).map_err(|err| format!("jwt secret: {err}"))?;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + seconds as u64
            + 86_400;
        let key = jsonwebtoken::EncodingKey::from_secret(&secret)
            .map_err(|err| format!("jwt key: {err}"))?;
        let token = |sub: &str| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &serde_json::json!({"sub": sub, "exp": exp}),
                &key,
            )
            .map_err(|err| format!("token: {err}"))
        };
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let identities = Identities {
            policy: dir.join("policy.toml"),
            secret: secret_path,
            ws_token: token(WS_SUB)?,
            grpc_token: token(GRPC_SUB)?,
            uid,
        };
        identities.write_policy(0)?;
        Ok(identities)
    }

    /// Writes version `version_name(version)` of the policy (write, then rename: the gateway never reads
    /// half a file).
    pub fn write_policy(&self, version: usize) -> Result<(), String> {
        let mut text = format!(
            r#"# The soak's policy, version {v}: each identity gets exactly what it uses.
[[grant]]
match = {{ uid = {uid} }}
request = {{ allow = ["{ECHO_SUBJECT}"] }}
subscribe = {{ allow = ["{EVENTS_SUBJECT}"] }}

[[grant]]
match = {{ sub = "{WS_SUB}" }}
request = {{ allow = ["{ECHO_SUBJECT}"] }}
publish = {{ allow = ["{WS_EVENTS_SUBJECT}"] }}
subscribe = {{ allow = ["{WS_EVENTS_SUBJECT}"] }}

[[grant]]
match = {{ sub = "{GRPC_SUB}" }}
request = {{ allow = ["{ECHO_SUBJECT}"] }}
subscribe = {{ allow = ["{WS_EVENTS_SUBJECT}"] }}
"#,
            v = version_name(version),
            uid = self.uid,
        );
        if version_name(version) == "B" {
            text.push_str(
                r#"
# Version B only: a grant for an identity that never connects.
[[grant]]
match = { sub = "soak-unused" }
publish = { allow = ["soak.unrelated.>"] }
"#,
            );
        }
        let staged = self.policy.with_extension("toml.new");
        std::fs::write(&staged, text).map_err(|err| format!("policy: {err}"))?;
        std::fs::rename(&staged, &self.policy).map_err(|err| format!("policy: {err}"))
    }
}

/// The policy's two versions alternate: A, B, A, ...
fn version_name(version: usize) -> &'static str {
    if version.is_multiple_of(2) { "A" } else { "B" }
}

/// One policy reload as the soak saw it.
#[derive(Clone, Default, Serialize)]
pub struct Reload {
    /// Seconds since the load started.
    pub at_s: f64,
    pub version: &'static str,
    /// The gateway's `ipc_gateway_policy_reloads_total{outcome="ok"}` went up, this many ms
    /// after SIGHUP; none: not within RELOAD_PATIENCE.
    pub seen_after_ms: Option<u64>,
    pub failed_reloads: Option<f64>,
    pub last_reload_successful: Option<f64>,
    /// A request to a subject nobody is granted, over the Unix socket, after the reload: the
    /// error code it got (FORBIDDEN expected).
    pub refused_probe: Option<String>,
    pub ok: bool,
}

/// Rewrites the policy (version `version`), sends SIGHUP and checks the reload in a thread of
/// its own; the result goes into `into`.
pub fn reload(
    identities: &Identities,
    version: usize,
    gateway_pid: u32,
    gateway_http: u16,
    socket: PathBuf,
    stats: Arc<Stats>,
    into: Arc<Mutex<Vec<Reload>>>,
) -> Result<(), String> {
    let reloads_ok =
        |body: &str| metric_labeled(body, "ipc_gateway_policy_reloads_total", r#"outcome="ok""#);
    let before = http_get(gateway_http, "/metrics")
        .and_then(|(_, body)| reloads_ok(&body))
        .unwrap_or(0.0);
    identities.write_policy(version)?;
    let at_s = stats.t0.elapsed().as_secs_f64();
    let sent = Instant::now();
    // SAFETY: kill only sends a signal to the gateway this process started.
    if unsafe { libc::kill(gateway_pid as libc::pid_t, libc::SIGHUP) } != 0 {
        return Err(format!(
            "SIGHUP to {gateway_pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let version = version_name(version);
    std::thread::spawn(move || {
        let mut seen = Reload {
            at_s,
            version,
            ..Reload::default()
        };
        while sent.elapsed() < RELOAD_PATIENCE {
            if let Some((_, body)) = http_get(gateway_http, "/metrics")
                && reloads_ok(&body).is_some_and(|n| n > before)
            {
                seen.seen_after_ms = Some(sent.elapsed().as_millis() as u64);
                seen.failed_reloads = Some(
                    metric_labeled(
                        &body,
                        "ipc_gateway_policy_reloads_total",
                        r#"outcome="failed""#,
                    )
                    .unwrap_or(0.0),
                );
                seen.last_reload_successful =
                    metric_sum(&body, "ipc_gateway_policy_last_reload_successful");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        seen.refused_probe = refused_probe(&socket, &stats);
        seen.ok = seen.seen_after_ms.is_some()
            && seen.last_reload_successful == Some(1.0)
            && seen.refused_probe.as_deref() == Some(ErrorCode::Forbidden.as_str());
        into.lock().unwrap_or_else(|p| p.into_inner()).push(seen);
    });
    Ok(())
}

/// One request over the Unix socket to a subject the policy grants nobody: the code it got.
fn refused_probe(socket: &Path, stats: &Stats) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let client = Client::connect(socket).await.ok()?;
        stats.record_op(Frontend::Uds, "connect", "ok");
        let answer = client
            .request(FORBIDDEN_SUBJECT, b"may I?", Some(REQUEST_TIMEOUT))
            .await;
        let outcome = outcome_of(&answer);
        if let Some(outcome) = outcome {
            stats.record_op(Frontend::Uds, "request", outcome);
        }
        Some(outcome.unwrap_or("no answer").to_owned())
    })
}
