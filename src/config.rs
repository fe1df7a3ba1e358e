//! The one `Config`: defaults < TOML file < environment (`IPC_GATEWAY_<KEY>`, and `NATS_URL`)
//! < command-line flags, merged by figment and validated once at start. Every error names the
//! key that is wrong.
//!
//! Each setting is written down once, in the `settings!` block below: its doc comment, key,
//! type and default. That block makes the `Config` struct, its `Default`, `KEYS` and
//! `SETTINGS`; the key is the TOML key, `IPC_GATEWAY_<KEY>` the environment variable, and
//! `flags` turns `SETTINGS` into the `serve` flags (`--max-frame-bytes`), whose help is the doc
//! comment and whose default is read from `Config::default()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

use crate::protocol::subject::{SubjectUse, validate_subject};

mod flags;
mod nats_auth;
mod origin;
mod secret;
mod secret_files;
mod sources;

pub use flags::Flags;
pub use nats_auth::{CREDENTIAL_KEYS, read_creds, read_seed, written_as};
pub use origin::Origin;
pub use secret::{REDACTED, Secret};
pub use secret_files::OpenSecretFile;
pub use sources::{Source, Sources, without_user_info};

pub const ENV_PREFIX: &str = "IPC_GATEWAY_";

/// One setting as the command line and the documentation see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The TOML key, also the environment variable's suffix and, with dashes, the flag.
    pub key: &'static str,
    /// The field's doc comment, as written (one string per line).
    pub doc: &'static str,
}

impl Setting {
    /// The command-line flag, without its leading dashes: `max-frame-bytes`.
    pub fn flag(&self) -> String {
        self.key.replace('_', "-")
    }

    /// The environment variable: `IPC_GATEWAY_MAX_FRAME_BYTES`.
    pub fn env(&self) -> String {
        format!("{ENV_PREFIX}{}", self.key.to_ascii_uppercase())
    }

    /// The doc comment as one line of prose.
    pub fn help(&self) -> String {
        self.doc.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Declares the settings once. Each entry is a doc comment, optional `#[serde(...)]`
/// attributes, then `pub key: Type = default,`; out come the struct, its `Default`, `KEYS` and
/// `SETTINGS`, all in the order written.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[serde($($serde:tt)*)])*
                pub $key:ident: $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[doc = $doc])*
                $(#[serde($($serde)*)])*
                pub $key: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $($key: $default,)*
                }
            }
        }

        /// Every setting's key (TOML key, flag name with `_`, environment variable suffix).
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        /// Every setting with its doc comment, for the flags and their help.
        pub const SETTINGS: &[Setting] = &[
            $(Setting {
                key: stringify!($key),
                doc: concat!($($doc, "\n"),*),
            }),*
        ];
    };
}

settings! {
    /// Every setting of the daemon, after merging the layers (see the module doc).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        /// This gateway's name among several on one NATS cluster: shown in /status, every
        /// audit record and the `Ipc-Gateway-Id` header, and where presence says a client is.
        /// Letters, digits, `-`, `_`, `.`, at most 64. None: the host name, `-`, the pid.
        pub gateway_id: Option<String> = None,
        /// Subject prefix of named clients: a message to `<prefix>.bob` reaches the client
        /// registered as `bob`, on whichever gateway it is connected to.
        pub client_subject_prefix: String = "client".into(),
        /// JetStream KV bucket of presence (named clients: where each one is connected).
        pub presence_bucket: String = "ipc_presence".into(),
        /// How long a presence entry outlives its gateway: refreshed at a third of this while
        /// the client is connected, so a gateway killed without cleaning up leaves no entry
        /// older than this.
        pub presence_ttl_ms: u64 = 15_000,
        /// Replaying subscriptions (`since_seq`/`since_time`) the gateway holds at once, over all
        /// its clients: each is a JetStream consumer on nats-server. Past it, `OVERLOADED`.
        pub max_replays: usize = 4096,
        /// Path of the Unix socket to listen on.
        pub socket: PathBuf = PathBuf::from("/tmp/ipc-gateway.sock"),
        /// Permission bits of the socket file, in octal ("0660").
        #[serde(deserialize_with = "octal_mode", serialize_with = "octal_mode_out")]
        pub socket_mode: u32 = 0o660,
        /// NATS server URL(s), comma-separated for a cluster. The environment variable
        /// NATS_URL sets it too, over IPC_GATEWAY_NATS_URL.
        pub nats_url: String = "nats://127.0.0.1:4222".into(),
        /// Connections in the NATS pool; requests are spread across them.
        pub nats_connections: usize = 2,
        /// Messages one shared NATS subscription may hold between the NATS client and the
        /// gateway's fan-out; past it the NATS client drops them, and every client on that
        /// subscription is told how many (`dropped`).
        pub nats_subscription_buffer: usize = 16384,
        // The gateway's own NATS credentials and TLS (docs/operations.md, "Connecting to a
        // secured NATS"): config/nats_auth.rs checks them, core/credentials.rs applies them.
        /// NATS credentials file (`.creds`: a user JWT and its nkey seed), for a server in
        /// operator/JWT mode. Read again at every connect, so a rotated file is taken at the next
        /// reconnect. One of nats_creds, nats_nkey, nats_token, nats_user.
        pub nats_creds: Option<PathBuf> = None,
        /// NATS nkey seed file (a user seed, `SU…`), for a server that lists the user's public
        /// nkey. Read again at every connect.
        pub nats_nkey: Option<PathBuf> = None,
        /// NATS token. A secret, shown as "***": set it in the environment
        /// (IPC_GATEWAY_NATS_TOKEN) or the file, not as a flag (`ps` shows flags).
        pub nats_token: Option<Secret> = None,
        /// NATS user name, with nats_password.
        pub nats_user: Option<String> = None,
        /// NATS password of nats_user. A secret, shown as "***": set it in the environment
        /// (IPC_GATEWAY_NATS_PASSWORD) or the file, not as a flag (`ps` shows flags).
        pub nats_password: Option<Secret> = None,
        /// PEM file of the CA certificate(s) that NATS's certificate must chain to; none = the
        /// system's roots. Any nats_tls_* setting makes TLS required on every NATS connection.
        pub nats_tls_ca: Option<PathBuf> = None,
        /// PEM client certificate for NATS mutual TLS (`verify: true`), with nats_tls_key.
        pub nats_tls_cert: Option<PathBuf> = None,
        /// PEM private key of nats_tls_cert.
        pub nats_tls_key: Option<PathBuf> = None,
        /// Start TLS before NATS's INFO, for a server whose `tls` block has
        /// `handshake_first: true`.
        pub nats_tls_first: bool = false,
        /// Address of the HTTP port: /health, /ready, /status, /metrics and the WebSocket /ws.
        #[serde(deserialize_with = "listen_address")]
        pub http: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
        /// How long an HTTP client may take to send a request's headers, and how long a
        /// kept-alive HTTP connection may wait for its next request, before it is closed.
        pub http_header_timeout_ms: u64 = 10_000,
        /// HTTP connections at once that are not WebSockets (yet): sending a request, being
        /// answered, or kept alive between requests. Each also takes a place under
        /// max_connections; this cap keeps a flood of them from taking every place from the
        /// other clients. Past it, 503. 0 = half of max_connections.
        pub http_max_handshakes: usize = 0,
        /// Subject for JSON objects that name neither op nor subject.
        pub default_subject: Option<String> = None,
        /// Largest frame or JSON line accepted, in bytes.
        pub max_frame_bytes: usize = 1 << 20,
        /// Default request deadline, and the ceiling on a client's `timeout_ms`.
        pub request_timeout_ms: u64 = 5000,
        /// Client connections served at once; the next one gets an error and is closed.
        pub max_connections: usize = 10_000,
        /// Requests (and other commands awaiting an answer) per connection before the gateway
        /// stops reading from that client.
        pub max_inflight_per_connection: usize = 1024,
        /// Payload bytes in flight through the gateway before requests get `OVERLOADED`.
        pub max_inflight_bytes: usize = 256 << 20,
        /// Subscription messages queued per connection before the oldest are dropped.
        pub subscription_queue: usize = 1024,
        /// Subscriptions one connection (or one gRPC connection's calls together) may hold;
        /// past it, subscribe gets `OVERLOADED`.
        pub max_subscriptions_per_connection: usize = 1000,
        /// On SIGTERM, how long in-flight requests may take before they get `UNAVAILABLE`.
        pub drain_timeout_ms: u64 = 5000,
        /// Tokio worker threads, by default half the cores (at least 1: the gateway shares its
        /// host with nats-server and the services); 1 runs everything on one thread.
        pub worker_threads: usize = default_worker_threads(),
        /// Log format: "text" or "json". Filter with RUST_LOG.
        pub log_format: LogFormat = LogFormat::Text,
        /// Log filter in RUST_LOG's syntax ("info", "warn,ipc_gateway::core=debug"), reloaded
        /// on SIGHUP. None: RUST_LOG, else "info".
        pub log_filter: Option<String> = None,
        /// A client whose answers cannot be written for this long (it stopped reading) is
        /// disconnected.
        pub slow_client_stall_ms: u64 = 10_000,
        /// Per-connection limit on requests, publishes and subscribes a second; 0 = off.
        pub rate_limit_requests_per_sec: u64 = 0,
        /// Per-connection limit on payload bytes a second; 0 = off.
        pub rate_limit_bytes_per_sec: u64 = 0,
        /// Close connections with no traffic and no subscriptions after this long; 0 = off.
        pub idle_timeout_ms: u64 = 0,
        /// Largest WebSocket message accepted; 0 = the same as `max_frame_bytes`.
        pub ws_max_message_bytes: usize = 0,
        /// The gateway's own origins (`scheme://host[:port]`): browser pages from them may open
        /// `/ws`. Empty: the http:// and https:// forms of the `http` address, and of
        /// localhost when that address is loopback; 0.0.0.0 and [::] stand for loopback. Behind
        /// a proxy, or listening on a public address, list the origins browsers use. A list.
        pub public_origins: Vec<String> = Vec::new(),
        /// Origins whose browser pages may open `/ws`, besides the gateway's own (clients that
        /// send no `Origin`, such as programs, are always let in). "*" allows any, "null" the
        /// opaque origin. A list: repeat the flag for several.
        pub ws_allowed_origins: Vec<String> = Vec::new(),
        /// How often the server pings each WebSocket; one that misses two pongs is closed.
        /// 0 = off.
        pub ws_ping_interval_ms: u64 = 20_000,
        /// The most one read from a WebSocket's socket takes. Reads land in a buffer of the
        /// worker thread's, so no connection keeps a read buffer: only the bytes of a frame
        /// not yet whole are kept, while it is not, and they grow by at most this much per read
        /// (a client that announces a large frame and sends little costs little).
        pub ws_read_buffer_bytes: usize = 16 * 1024,
        /// Address of the gRPC port (service `ipcgateway.v1.Gateway`, health, reflection).
        #[serde(deserialize_with = "listen_address")]
        pub grpc: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 50051)),
        /// HTTP/2 keepalive: ping interval on gRPC connections; a connection whose ping is not
        /// answered within the same time is closed. 0 = off.
        pub grpc_keepalive_ms: u64 = 20_000,
        /// Concurrent gRPC streams (calls) per HTTP/2 connection.
        pub grpc_max_concurrent_streams: u32 = 1024,
        /// PEM certificate chain (leaf first) for TLS on the HTTP port: https, and wss:// at
        /// /ws. Needs tls_key. Also the gRPC port's unless grpc_tls_cert is set. Read again on
        /// SIGHUP. None: plain HTTP.
        pub tls_cert: Option<PathBuf> = None,
        /// PEM private key (PKCS#8, PKCS#1 or SEC1) of tls_cert.
        pub tls_key: Option<PathBuf> = None,
        /// PEM certificate chain for TLS on the gRPC port (ALPN h2), with grpc_tls_key. None:
        /// tls_cert and tls_key, so one pair turns TLS on for both ports; neither: plain gRPC.
        pub grpc_tls_cert: Option<PathBuf> = None,
        /// PEM private key of grpc_tls_cert.
        pub grpc_tls_key: Option<PathBuf> = None,
        /// PEM bundle of the CAs that client certificates must chain to, on both TLS ports; a
        /// verified certificate's subject is the client's identity (`cert` in the policy). A
        /// certificate that does not chain is refused at the handshake. Read again on SIGHUP.
        /// None: no client certificates are asked for.
        pub tls_client_ca: Option<PathBuf> = None,
        /// With tls_client_ca: "optional" (a client without a certificate connects as today,
        /// with a token or anonymous) or "required" (the handshake refuses it).
        pub tls_client_auth: ClientAuth = ClientAuth::Optional,
        /// Subject tokens that name a circuit breaker's group (`svc.orders.create` →
        /// `svc.orders`).
        pub breaker_group_tokens: usize = 2,
        /// Consecutive failures (TIMEOUT, NO_RESPONDERS) that open a group's breaker.
        pub breaker_failures: u32 = 5,
        /// How long an open breaker refuses before it lets one trial request through.
        pub breaker_cooldown_ms: u64 = 5000,
        /// Failure rate (0 to 1) over the window that opens a breaker; 0 turns the rule off.
        pub breaker_failure_rate: f64 = 0.0,
        /// The failure-rate window.
        pub breaker_window_ms: u64 = 10_000,
        /// Requests a window needs before its failure rate counts.
        pub breaker_min_requests: u32 = 20,
        /// After a NATS connection comes up, how long `NO_RESPONDERS` does not count against a
        /// breaker (services reconnect after the gateway); 0 = always counts.
        pub breaker_reconnect_grace_ms: u64 = 5000,
        /// A `TIMEOUT` counts against a breaker only when the request waited at least this
        /// long: a client's own short `timeout_ms` says nothing about the service.
        pub breaker_min_timeout_ms: u64 = 1000,
        /// HS256 shared secret for bearer JWTs (WebSocket and gRPC): a file of at least 32
        /// bytes, its trailing line break ignored.
        pub auth_jwt_secret_file: Option<PathBuf> = None,
        /// PEM public key for bearer JWTs: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA).
        pub auth_jwt_public_key_file: Option<PathBuf> = None,
        /// Required `aud` claim of bearer JWTs; none = `aud` is not checked.
        pub auth_jwt_audience: Option<String> = None,
        /// Refuse WebSocket upgrades without a token (401) and gRPC calls without one
        /// (UNAUTHENTICATED). Unix-socket callers are always identified by the kernel.
        pub auth_required: bool = false,
        /// The subject policy (TOML, see docs/policy.md), reloaded on SIGHUP; none = every
        /// identity may use every subject except the reserved ones.
        pub policy: Option<PathBuf> = None,
        /// Which `Ipc-Gateway-*` identity headers every message sent to NATS for a client
        /// carries: "full" (all of docs/identity.md's table), "minimal" (only
        /// `Ipc-Gateway-Uid`, `-Sub` and `-Cert`, the values a service authorises on:
        /// cheaper for every service, which parses each header of each message) or "off";
        /// true and false mean full and off.
        pub identity_headers: IdentityHeaders = IdentityHeaders::Full,
        /// Start a W3C trace (random trace id, a `traceparent` to NATS and back on the reply,
        /// `trace_id` in the audit record) for requests and publishes that come without a valid
        /// `traceparent`; a client's own trace is continued either way. On whenever
        /// `otlp_endpoint` is set. Off by default: it costs about 0.8 µs of CPU per request.
        pub trace_requests: bool = false,
        /// Export one OpenTelemetry span per request, publish and subscribe over OTLP/gRPC to
        /// this collector URL (`http://127.0.0.1:4317`); none = off.
        pub otlp_endpoint: Option<String> = None,
        /// Connections one identified caller (a uid, or a token's subject) may hold at once;
        /// 0 = unlimited. Anonymous callers are bounded by max_connections only.
        pub max_connections_per_identity: usize = 0,
        /// The audit log (JSON lines, docs/audit.md): a file, or "-" for standard output;
        /// none = off.
        pub audit_file: Option<PathBuf> = None,
        /// When the audit queue is full: "drop" (count the loss, write an audit_lost record)
        /// or "block" (slow the clients down; no record is lost).
        pub audit_overflow: crate::telemetry::audit::Overflow = crate::telemetry::audit::Overflow::Drop,
        /// Audit records queued for the writer at most.
        pub audit_queue: usize = 65_536,
        /// Rotate the audit file before it passes this size; 0 = never.
        pub audit_max_bytes: u64 = 100 << 20,
        /// Rotated audit files kept (.1 newest ... .N oldest).
        pub audit_keep: usize = 5,
    }
}

/// The settings whose values are secrets (`Secret`): shown as "***" everywhere, compared by
/// value when a reload looks for changes.
pub const SECRET_KEYS: &[&str] = &["nats_token", "nats_password"];

/// The NATS client library's log target: logging holds its events at `warn` unless a filter
/// names it (the gateway logs what they mean, rate-limited).
pub const NATS_CLIENT_LOG_TARGET: &str = "async_nats";

fn is_gateway_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn is_gateway_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(is_gateway_id_char)
}

/// The kernel's host name (`uname -n`); empty when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// Whether a TLS client must present a certificate (`tls_client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Optional,
    Required,
}

/// Which identity headers the gateway stamps (`identity_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityHeaders {
    Full,
    Minimal,
    Off,
}

impl<'de> Deserialize<'de> for IdentityHeaders {
    /// "full", "minimal" or "off"; also true and false (as booleans or as text), the
    /// setting's values before "minimal" existed.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Switch(bool),
            Word(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Switch(true) => Ok(IdentityHeaders::Full),
            Written::Switch(false) => Ok(IdentityHeaders::Off),
            Written::Word(word) => match word.as_str() {
                "full" | "true" => Ok(IdentityHeaders::Full),
                "minimal" => Ok(IdentityHeaders::Minimal),
                "off" | "false" => Ok(IdentityHeaders::Off),
                _ => Err(serde::de::Error::custom(format!(
                    "identity_headers is \"full\", \"minimal\" or \"off\", not {word:?}"
                ))),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration error, worded for the operator: it names the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Merges every layer. `flags` holds only the settings given on the command line.
    pub fn load<T: Serialize>(file: Option<&Path>, flags: &T) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only our own keys: an unrelated IPC_GATEWAY_* variable (a script's, the client
        // commands' IPC_GATEWAY_SOCKET is ours) must not stop the daemon from starting.
        for (name, _) in std::env::vars() {
            if let Some(key) = name.strip_prefix(ENV_PREFIX)
                && !KEYS.contains(&key.to_ascii_lowercase().as_str())
            {
                eprintln!("ipc-gateway: ignoring {name}: not a setting");
            }
        }
        figment = figment
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .filter(|key| KEYS.iter().any(|k| key.as_str().eq_ignore_ascii_case(k))),
            )
            .merge(Env::raw().only(&["NATS_URL"]).map(|_| "nats_url".into()))
            .merge(nats_auth::text_from_env())
            .merge(Serialized::defaults(flags));
        // Errors name the setting as the operator wrote it (flag, variable or file key).
        let sources = Sources::read(file, flags);
        let config: Config = figment
            .extract()
            .map_err(|err| ConfigError(sources::explain(&err, &sources)))?;
        config
            .validate()
            .map_err(|err| ConfigError(sources::explain_invalid(&err.0, &sources)))?;
        nats_auth::remember_sources(&sources);
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if self.socket.as_os_str().is_empty() {
            return bad("socket", "must be a path");
        }
        if self.socket_mode > 0o777 {
            return bad("socket_mode", "must be permission bits such as 0660");
        }
        if let Err(err) = self.nats_servers() {
            return bad("nats_url", &err);
        }
        if let Some(Err(err)) = self
            .log_filter
            .as_deref()
            .map(crate::telemetry::logging::parse)
        {
            return bad("log_filter", &err);
        }
        if let Some(id) = &self.gateway_id
            && !is_gateway_id(id)
        {
            return bad(
                "gateway_id",
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            );
        }
        if crate::protocol::subject::validate_subject(
            &self.client_subject_prefix,
            crate::protocol::subject::SubjectUse::Publish,
        )
        .is_err()
            || self.client_subject_prefix.starts_with(['$', '_'])
        {
            return bad(
                "client_subject_prefix",
                "must be a subject without wildcards outside the reserved namespaces ($..., _...), e.g. \"client\"",
            );
        }
        if self.presence_bucket.is_empty()
            || !self
                .presence_bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(
                "presence_bucket",
                "must be a KV bucket name: letters, digits, '-' and '_'",
            );
        }
        if !(1_000..=86_400_000).contains(&self.presence_ttl_ms) {
            return bad(
                "presence_ttl_ms",
                "must be between 1000 (a second) and 86400000 (a day)",
            );
        }
        if self.nats_connections == 0 || self.nats_connections > 64 {
            return bad("nats_connections", "must be between 1 and 64");
        }
        if self.max_frame_bytes < 64 || self.max_frame_bytes > u32::MAX as usize {
            return bad("max_frame_bytes", "must be between 64 and 4294967295");
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms > u32::MAX as u64 {
            return bad("request_timeout_ms", "must be between 1 and 4294967295");
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            (
                "max_inflight_per_connection",
                self.max_inflight_per_connection,
            ),
            ("max_inflight_bytes", self.max_inflight_bytes),
            ("subscription_queue", self.subscription_queue),
            ("audit_queue", self.audit_queue),
            ("nats_subscription_buffer", self.nats_subscription_buffer),
            (
                "max_subscriptions_per_connection",
                self.max_subscriptions_per_connection,
            ),
            ("worker_threads", self.worker_threads),
            ("max_replays", self.max_replays),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        for (key, value) in [
            ("slow_client_stall_ms", self.slow_client_stall_ms),
            ("breaker_group_tokens", self.breaker_group_tokens as u64),
            ("breaker_failures", self.breaker_failures as u64),
            ("breaker_cooldown_ms", self.breaker_cooldown_ms),
            ("breaker_window_ms", self.breaker_window_ms),
            ("breaker_min_requests", self.breaker_min_requests as u64),
            (
                "grpc_max_concurrent_streams",
                self.grpc_max_concurrent_streams as u64,
            ),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if !(0.0..=1.0).contains(&self.breaker_failure_rate) {
            return bad("breaker_failure_rate", "must be between 0 (off) and 1");
        }
        if !(64..=(1 << 20)).contains(&self.ws_read_buffer_bytes) {
            return bad("ws_read_buffer_bytes", "must be between 64 and 1048576");
        }
        if self.max_inflight_bytes < self.max_frame_bytes {
            return bad(
                "max_inflight_bytes",
                "must be at least max_frame_bytes, or a frame that fits could never be sent",
            );
        }
        if self.http_header_timeout_ms == 0 {
            return bad("http_header_timeout_ms", "must be at least 1");
        }
        self.validate_tls().map_err(ConfigError)?;
        if let Err(err) = self.validate_origins() {
            return Err(ConfigError(err));
        }
        if let Err(err) = self.validate_nats_auth() {
            return Err(ConfigError(err));
        }
        if let Some(subject) = &self.default_subject
            && let Err(err) = validate_subject(subject, SubjectUse::Publish)
        {
            return bad("default_subject", &err.message);
        }
        Ok(())
    }

    /// The secret settings' values, in `SECRET_KEYS` order.
    pub fn secrets(&self) -> [Option<&Secret>; 2] {
        [self.nats_token.as_ref(), self.nats_password.as_ref()]
    }

    /// A certificate needs its key and the reverse; client CAs and their requirement need a
    /// TLS port to apply to.
    fn validate_tls(&self) -> Result<(), String> {
        let pairs = [
            ("tls_cert", "tls_key", &self.tls_cert, &self.tls_key),
            (
                "grpc_tls_cert",
                "grpc_tls_key",
                &self.grpc_tls_cert,
                &self.grpc_tls_key,
            ),
        ];
        for (cert, key, cert_path, key_path) in pairs {
            let (has_cert, has_key) = (cert_path.is_some(), key_path.is_some());
            if has_cert != has_key {
                let (given, missing) = if has_cert { (cert, key) } else { (key, cert) };
                return Err(format!(
                    "{given}: {cert} and {key} go together; {missing} is missing"
                ));
            }
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() && self.grpc_tls_cert.is_none() {
            return Err(
                "tls_client_ca: client certificates need TLS: set tls_cert and tls_key (or grpc_tls_cert and grpc_tls_key)"
                    .into(),
            );
        }
        if self.tls_client_auth == ClientAuth::Required && self.tls_client_ca.is_none() {
            return Err(
                "tls_client_auth: \"required\" needs tls_client_ca, the CAs client certificates must chain to"
                    .into(),
            );
        }
        Ok(())
    }

    /// The NATS server addresses: `nats_url` is one URL or several separated by commas.
    pub fn nats_servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        let servers: Vec<async_nats::ServerAddr> = self
            .nats_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                url.parse().map_err(|err| {
                    // A URL that does not parse may still hold a password.
                    format!("{:?} is not a NATS URL: {err}", without_user_info(url))
                })
            })
            .collect::<Result<_, _>>()?;
        if servers.is_empty() {
            return Err("must be a NATS URL such as nats://127.0.0.1:4222".into());
        }
        Ok(servers)
    }

    /// `gateway_id`, or when none is set the host name and the pid (`web-3-4242`), with any
    /// character a gateway id may not hold replaced by `-`.
    pub fn resolved_gateway_id(&self) -> String {
        if let Some(id) = &self.gateway_id {
            return id.clone();
        }
        let host: String = host_name()
            .chars()
            .map(|c| if is_gateway_id_char(c) { c } else { '-' })
            .take(50)
            .collect();
        let host = if host.is_empty() {
            "gateway".into()
        } else {
            host
        };
        format!("{host}-{}", std::process::id())
    }

    pub fn audit(&self) -> crate::telemetry::audit::AuditConfig {
        crate::telemetry::audit::AuditConfig {
            gateway: Some(self.resolved_gateway_id().into()),
            path: self.audit_file.clone(),
            overflow: self.audit_overflow,
            queue: self.audit_queue,
            max_bytes: self.audit_max_bytes,
            keep: self.audit_keep,
        }
    }

    pub fn breaker(&self) -> crate::core::breaker::BreakerConfig {
        crate::core::breaker::BreakerConfig {
            group_tokens: self.breaker_group_tokens,
            failures: self.breaker_failures,
            cooldown: Duration::from_millis(self.breaker_cooldown_ms),
            failure_rate: self.breaker_failure_rate,
            window: Duration::from_millis(self.breaker_window_ms),
            min_requests: self.breaker_min_requests,
            reconnect_grace: Duration::from_millis(self.breaker_reconnect_grace_ms),
            min_timeout: Duration::from_millis(self.breaker_min_timeout_ms),
        }
    }

    /// The HTTP header read timeout (also the keep-alive idle time).
    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    /// The cap in force on HTTP connections that are not WebSockets.
    pub fn http_handshake_limit(&self) -> usize {
        match self.http_max_handshakes {
            0 => (self.max_connections / 2).max(1),
            n => n,
        }
    }

    /// The WebSocket message limit in force.
    pub fn ws_max_message(&self) -> usize {
        match self.ws_max_message_bytes {
            0 => self.max_frame_bytes,
            n => n,
        }
    }

    /// The WebSocket ping interval, `None` when the heartbeat is off.
    pub fn ws_ping_interval(&self) -> Option<Duration> {
        (self.ws_ping_interval_ms > 0).then(|| Duration::from_millis(self.ws_ping_interval_ms))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Reads permission bits written in octal, as a string ("0660") or as the digits a TOML or
/// environment integer leaves (660).
/// Half the cores, at least 1. The gateway runs beside nats-server and the services it
/// fronts; on a 2-core host one worker used less CPU per request than two in every measured row
/// (UDS, WebSocket, gRPC; artifacts/bench/request-path.md), and a second worker only moved work
/// between threads that compete with NATS for the same cores.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn listen_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    resolve_listen_address(&text).map_err(serde::de::Error::custom)
}

/// A listen address: `IP:PORT`, or `HOST:PORT` with the host name resolved once, at start
/// (an IPv4 address preferred: `localhost:8080` is 127.0.0.1:8080).
pub fn resolve_listen_address(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not a listen address: write IP:PORT, such as 127.0.0.1:8080"
        ));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{text:?} is not a listen address: the port {port:?} is not a number from 0 to 65535"
        ));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = match (host, 0).to_socket_addrs() {
        Ok(addresses) => addresses.collect(),
        Err(err) => {
            return Err(format!(
                "{text:?} is not a listen address: cannot resolve {host:?} ({err}); use an IP address such as 127.0.0.1:{port}"
            ));
        }
    };
    let port: u16 = port.parse().unwrap_or_default();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .map(|address| SocketAddr::new(address.ip(), port))
        .ok_or_else(|| {
            format!("{text:?}: {host:?} has no address; use an IP address such as 127.0.0.1:{port}")
        })
}

fn octal_mode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Text(String),
        Digits(u64),
    }
    let digits = match Mode::deserialize(deserializer)? {
        Mode::Text(text) => text,
        Mode::Digits(number) => number.to_string(),
    };
    let trimmed = digits.trim_start_matches("0o");
    u32::from_str_radix(trimmed, 8).map_err(|_| {
        serde::de::Error::custom(format!("{digits:?} is not an octal mode such as 0660"))
    })
}

fn octal_mode_out<S: serde::Serializer>(mode: &u32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{mode:04o}"))
}

#[cfg(test)]
// figment's `Jail` closures return its (large) error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        nats_connections: Option<usize>,
    }

    #[test]
    fn layers_merge_in_order_defaults_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                "nats_connections = 3\nmax_frame_bytes = 4096\nsocket_mode = \"0600\"\nrequest_timeout_ms = 100",
            )?;
            jail.set_env("IPC_GATEWAY_MAX_FRAME_BYTES", "8192");
            jail.set_env("NATS_URL", "nats://10.0.0.1:4222");
            let flags = Flags {
                nats_connections: Some(4),
            };
            let config = Config::load(Some(Path::new("gw.toml")), &flags).unwrap();
            assert_eq!(config.nats_connections, 4);
            assert_eq!(config.max_frame_bytes, 8192);
            assert_eq!(config.request_timeout_ms, 100);
            assert_eq!(config.socket_mode, 0o600);
            assert_eq!(config.nats_url, "nats://10.0.0.1:4222");
            assert_eq!(config.http, Config::default().http);
            Ok(())
        });
    }

    #[test]
    fn identity_headers_take_a_form_or_the_old_switch_from_every_layer() {
        Jail::expect_with(|jail| {
            assert_eq!(Config::default().identity_headers, IdentityHeaders::Full);
            for (written, form) in [
                ("\"minimal\"", IdentityHeaders::Minimal),
                ("\"full\"", IdentityHeaders::Full),
                ("\"off\"", IdentityHeaders::Off),
                ("false", IdentityHeaders::Off),
                ("true", IdentityHeaders::Full),
            ] {
                jail.create_file("gw.toml", &format!("identity_headers = {written}"))?;
                let config = Config::load(Some(Path::new("gw.toml")), &Flags::default()).unwrap();
                assert_eq!(config.identity_headers, form, "{written}");
            }
            for (written, form) in [
                ("minimal", IdentityHeaders::Minimal),
                ("false", IdentityHeaders::Off),
                ("true", IdentityHeaders::Full),
            ] {
                jail.set_env("IPC_GATEWAY_IDENTITY_HEADERS", written);
                let config = Config::load(None, &Flags::default()).unwrap();
                assert_eq!(config.identity_headers, form, "{written}");
            }
            jail.set_env("IPC_GATEWAY_IDENTITY_HEADERS", "some");
            let err = Config::load(None, &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("identity_headers"), "{err}");
            assert!(err.to_string().contains("\"minimal\""), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_gateway_id_defaults_to_the_host_name_and_pid() {
        let id = Config::default().resolved_gateway_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        assert!(is_gateway_id(&id), "{id}");
        let named = Config {
            gateway_id: Some("web-1".into()),
            ..Config::default()
        };
        assert_eq!(named.resolved_gateway_id(), "web-1");
    }

    #[test]
    fn errors_name_the_bad_key() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_frame_bytes = \"lots\"")?;
            let err = Config::load(Some(Path::new("bad.toml")), &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("max_frame_bytes"), "{err}");
            jail.create_file("unknown.toml", "max_frame_byte = 1")?;
            let err = Config::load(Some(Path::new("unknown.toml")), &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("max_frame_byte"), "{err}");
            jail.create_file("zero.toml", "nats_connections = 0")?;
            let err = Config::load(Some(Path::new("zero.toml")), &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("nats_connections"), "{err}");
            jail.set_env("IPC_GATEWAY_SOCKET_MODE", "0640");
            jail.set_env("IPC_GATEWAY_SOMETHING_ELSE", "1");
            let config = Config::load(None, &Flags::default()).unwrap();
            assert_eq!(config.socket_mode, 0o640, "unknown variables are ignored");
            jail.create_file(
                "budget.toml",
                "max_frame_bytes = 4096\nmax_inflight_bytes = 1024",
            )?;
            let err = Config::load(Some(Path::new("budget.toml")), &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("max_inflight_bytes"), "{err}");
            jail.create_file("url.toml", "nats_url = \"nats://a:4222, nats://b:99999\"")?;
            let err = Config::load(Some(Path::new("url.toml")), &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("nats_url"), "{err}");
            jail.create_file("id.toml", "gateway_id = \"web 1\"")?;
            let err = Config::load(Some(Path::new("id.toml")), &Flags::default()).unwrap_err();
            assert!(err.to_string().contains("gateway_id"), "{err}");
            for (text, key) in [
                (
                    "client_subject_prefix = \"client.*\"",
                    "client_subject_prefix",
                ),
                (
                    "client_subject_prefix = \"_INBOX\"",
                    "client_subject_prefix",
                ),
                ("presence_bucket = \"a.b\"", "presence_bucket"),
                ("presence_ttl_ms = 10", "presence_ttl_ms"),
            ] {
                jail.create_file("names.toml", text)?;
                let err =
                    Config::load(Some(Path::new("names.toml")), &Flags::default()).unwrap_err();
                assert!(err.to_string().contains(key), "{text}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn a_cluster_is_several_comma_separated_urls() {
        let config = Config {
            nats_url: "nats://10.0.0.1:4222, nats://10.0.0.2:4223".into(),
            ..Config::default()
        };
        assert_eq!(config.nats_servers().unwrap().len(), 2);
    }

    #[test]
    fn a_nats_url_that_does_not_parse_is_named_without_its_password() {
        let config = Config {
            nats_url: "nats://gw:s3cret@host:notaport".into(),
            ..Config::default()
        };
        let error = config.nats_servers().unwrap_err();
        assert!(error.contains("nats://***@host:notaport"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn a_default_subject_with_a_wildcard_is_refused() {
        let config = Config {
            default_subject: Some("a.*".into()),
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("default_subject")
        );
    }
}
