//! What a run measures: the knobs from the environment (BENCH_*), the modes (kinds of row),
//! and the schedule of cases, with the concurrency-1 repeats interleaved across the run.

use std::time::Duration;

use ipc_gateway::config::IdentityHeaders;

use serde::{Serialize, Serializer};

use crate::common::{env_args, env_artifacts, env_f64, env_list};

pub struct Settings {
    pub seconds: f64,
    pub warmup: f64,
    pub c1_repeats: usize,
    pub repeats: usize,
    pub concurrency: Vec<usize>,
    pub payloads: Vec<usize>,
    pub workers: Vec<usize>,
    pub client_threads: usize,
    /// Which modes run (BENCH_MODES); all by default.
    pub modes: Vec<Mode>,
    /// Extra `ipc-gateway serve` flags for experiments (BENCH_GATEWAY_ARGS, split on spaces).
    pub gateway_args: Vec<String>,
    /// The identity headers the gateways stamp: `--identity-headers` in BENCH_GATEWAY_ARGS,
    /// else the default. `direct + identity headers` sends the same ones.
    pub identity_headers: IdentityHeaders,
    pub artifacts: bool,
}

/// `--identity-headers` in the gateway's extra flags, else the gateway's default.
fn identity_headers(gateway_args: &[String]) -> Result<IdentityHeaders, String> {
    let given = gateway_args
        .iter()
        .position(|arg| arg == "--identity-headers")
        .and_then(|at| gateway_args.get(at + 1));
    match given {
        None => Ok(ipc_gateway::config::Config::default().identity_headers),
        Some(form) => serde_json::from_value(serde_json::Value::from(form.as_str()))
            .map_err(|err| format!("BENCH_GATEWAY_ARGS: --identity-headers {form}: {err}")),
    }
}

/// The knobs recorded in the command line when benchmarks/run.sh did not set BENCH_COMMAND.
pub const KNOBS: &[&str] = &[
    "BENCH_SECONDS",
    "BENCH_WARMUP",
    "BENCH_C1_REPEATS",
    "BENCH_REPEATS",
    "BENCH_CONCURRENCY",
    "BENCH_PAYLOADS",
    "BENCH_WORKERS",
    "BENCH_CLIENT_THREADS",
    "BENCH_MODES",
    "BENCH_GATEWAY_ARGS",
    "IPC_GATEWAY_BIN",
];

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let gateway_args = env_args("BENCH_GATEWAY_ARGS");
        Ok(Settings {
            identity_headers: identity_headers(&gateway_args)?,
            gateway_args,
            seconds: env_f64("BENCH_SECONDS", 3.0, 0.1, 600.0)?,
            warmup: env_f64("BENCH_WARMUP", 0.5, 0.0, 60.0)?,
            c1_repeats: env_f64("BENCH_C1_REPEATS", 5.0, 1.0, 25.0)? as usize,
            repeats: env_f64("BENCH_REPEATS", 1.0, 1.0, 25.0)? as usize,
            concurrency: env_list("BENCH_CONCURRENCY", &[1, 16, 256], 1, 4096)?,
            payloads: env_list("BENCH_PAYLOADS", &[128, 4096], 1, 512 * 1024)?,
            workers: env_list("BENCH_WORKERS", &[1, 2], 1, 64)?,
            client_threads: env_f64("BENCH_CLIENT_THREADS", 1.0, 1.0, 64.0)? as usize,
            modes: env_modes()?,
            artifacts: env_artifacts("BENCH_NO_ARTIFACTS"),
        })
    }

    pub fn row(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    pub fn warm(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    pub fn repeats_for(&self, concurrency: usize) -> usize {
        if concurrency == 1 {
            self.c1_repeats
        } else {
            self.repeats
        }
    }
}

fn env_modes() -> Result<Vec<Mode>, String> {
    let Ok(text) = std::env::var("BENCH_MODES") else {
        return Ok(Mode::ALL.to_vec());
    };
    let mut modes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mode = Mode::ALL
            .into_iter()
            .find(|mode| mode.knob() == part)
            .ok_or_else(|| {
                let known: Vec<&str> = Mode::ALL.iter().map(|m| m.knob()).collect();
                format!("BENCH_MODES: unknown mode {part:?} ({})", known.join(", "))
            })?;
        modes.push(mode);
    }
    if modes.is_empty() {
        return Err("BENCH_MODES is empty".into());
    }
    Ok(modes)
}

/// A kind of row: what the requests go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Direct,
    /// The same direct client on a multi-thread runtime (tokio's default shape).
    DirectMulti,
    /// The direct client sending, with every request, the identity headers the gateway
    /// stamps on a Unix-socket caller's (`clients::identity_headers`): what the identity
    /// costs NATS and the service, without the gateway.
    DirectStamped,
    Bare,
    GatewayBinary,
    GatewayJson,
    /// The gateway's WebSocket (`GET /ws`): one v1 binary frame per binary message.
    WsBinary,
    /// The gateway's WebSocket: one JSON envelope per text message.
    WsJson,
    GrpcUnary,
    /// The same `Request` call from a client on h2 alone (no tonic, hyper or tower on the
    /// client side), to show what the gateway answers when its client costs less.
    GrpcUnaryH2,
    GrpcExchange,
}

impl Mode {
    /// Every mode, in the order rows are reported.
    pub const ALL: [Mode; 11] = [
        Mode::Direct,
        Mode::DirectMulti,
        Mode::DirectStamped,
        Mode::Bare,
        Mode::GatewayBinary,
        Mode::GatewayJson,
        Mode::WsBinary,
        Mode::WsJson,
        Mode::GrpcUnary,
        Mode::GrpcUnaryH2,
        Mode::GrpcExchange,
    ];

    /// The name in the Markdown table.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct (async-nats)",
            Mode::DirectMulti => "direct, mt client",
            Mode::DirectStamped => "direct + identity headers",
            Mode::Bare => "bare UDS echo",
            Mode::GatewayBinary => "gateway binary",
            Mode::GatewayJson => "gateway JSON",
            Mode::WsBinary => "gateway WS binary",
            Mode::WsJson => "gateway WS JSON",
            Mode::GrpcUnary => "gateway gRPC unary",
            Mode::GrpcUnaryH2 => "gateway gRPC unary, h2 client",
            Mode::GrpcExchange => "gateway gRPC Exchange",
        }
    }

    /// The key in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::DirectMulti => "direct_multi_thread_client",
            Mode::DirectStamped => "direct_identity_headers",
            Mode::Bare => "bare_uds",
            Mode::GatewayBinary => "gateway_binary",
            Mode::GatewayJson => "gateway_json",
            Mode::WsBinary => "gateway_ws_binary",
            Mode::WsJson => "gateway_ws_json",
            Mode::GrpcUnary => "gateway_grpc_unary",
            Mode::GrpcUnaryH2 => "gateway_grpc_unary_h2_client",
            Mode::GrpcExchange => "gateway_grpc_exchange",
        }
    }

    /// The name in BENCH_MODES.
    pub fn knob(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::DirectMulti => "direct-mt",
            Mode::DirectStamped => "direct-stamped",
            Mode::Bare => "bare",
            Mode::GatewayBinary => "binary",
            Mode::GatewayJson => "json",
            Mode::WsBinary => "ws-binary",
            Mode::WsJson => "ws-json",
            Mode::GrpcUnary => "grpc-unary",
            Mode::GrpcUnaryH2 => "grpc-unary-h2",
            Mode::GrpcExchange => "grpc-exchange",
        }
    }

    pub fn is_gateway(self) -> bool {
        !matches!(
            self,
            Mode::Direct | Mode::DirectMulti | Mode::DirectStamped | Mode::Bare
        )
    }

    /// Rows the aims are checked on: the Unix-socket modes. The aims (issue "core") compare
    /// against direct NATS plus one bare Unix-socket hop; WebSocket and gRPC rows cross TCP and
    /// their own framing instead, so they are reported beside them but not judged by them.
    pub fn in_aims(self) -> bool {
        matches!(self, Mode::GatewayBinary | Mode::GatewayJson)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, Mode::WsBinary | Mode::WsJson)
    }

    /// Where the mode's rows go in the report.
    pub fn rank(self) -> usize {
        Mode::ALL.iter().position(|m| *m == self).unwrap_or(0)
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.key())
    }
}

/// What a row measures. `workers` is the gateway's worker threads (0 for non-gateway rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Case {
    pub mode: Mode,
    pub workers: usize,
    pub concurrency: usize,
    pub payload: usize,
}

/// The cases in run order: rows at concurrency 1 go round by round, every mode once per round
/// (rotated), so that their repeats are spread over the run; the rest follow, mode by mode.
pub fn schedule(settings: &Settings) -> Vec<Case> {
    let mut modes: Vec<(Mode, usize)> = Mode::ALL
        .into_iter()
        .filter(|mode| !mode.is_gateway() && settings.modes.contains(mode))
        .map(|mode| (mode, 0))
        .collect();
    for &workers in &settings.workers {
        for mode in Mode::ALL {
            if mode.is_gateway() && settings.modes.contains(&mode) {
                modes.push((mode, workers));
            }
        }
    }
    let max_repeats = settings
        .concurrency
        .iter()
        .map(|&c| settings.repeats_for(c))
        .max()
        .unwrap_or(1);
    let mut cases = Vec::new();
    for round in 0..max_repeats {
        for &concurrency in &settings.concurrency {
            if round >= settings.repeats_for(concurrency) {
                continue;
            }
            for &payload in &settings.payloads {
                for i in 0..modes.len() {
                    let (mode, workers) = modes[(i + round) % modes.len()];
                    cases.push(Case {
                        mode,
                        workers,
                        concurrency,
                        payload,
                    });
                }
            }
        }
    }
    cases
}
