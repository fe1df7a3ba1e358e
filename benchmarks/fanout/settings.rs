//! The knobs (FANOUT_* in the environment), checked; and the two paths a case runs on.

use std::time::Duration;

use serde::Serialize;

use crate::common::{env_args, env_artifacts, env_f64, env_list, env_words};

/// Where the K WebSocket subscribers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// The gateway's `GET /ws`, JSON envelopes; the gateway subscribes on its nats-server.
    Gateway,
    /// nats-server's own WebSocket listener, NATS protocol.
    Native,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Gateway => "gateway",
            Path::Native => "native",
        }
    }

    pub fn parse(word: &str) -> Option<Path> {
        match word {
            "gateway" => Some(Path::Gateway),
            "native" => Some(Path::Native),
            _ => None,
        }
    }
}

pub struct Settings {
    /// Subscriber counts, one case each per path.
    pub ks: Vec<usize>,
    pub paths: Vec<Path>,
    /// Publishing seconds of the sustained and of the max-rate phase.
    pub seconds: f64,
    /// Deliveries per second of the sustained phase (the publish rate is this / K).
    pub rate: f64,
    /// Messages published at once in the burst phase (0 skips it).
    pub burst: usize,
    pub payload: usize,
    /// Most connections one client process holds.
    pub per_process: usize,
    /// At least this many client processes (each is one thread: two keep a small K from
    /// being bound by one client thread).
    pub min_processes: usize,
    pub sources: usize,
    pub handshakes: usize,
    /// Longest wait for the deliveries of a sustained or burst phase after its publishing
    /// ended.
    pub drain: Duration,
    /// How long the max-rate phase keeps counting after its publishing ended (its backlog can
    /// take far longer to deliver, so it is not waited for).
    pub max_drain: Duration,
    /// Seconds of the idle phase (0 skips it).
    pub idle: f64,
    /// Offered deliveries a second for the sweep: the sustained phase again at each (empty:
    /// no sweep). See `sweep.rs`.
    pub sweep: Vec<usize>,
    pub gateway_args: Vec<String>,
    /// The gateway path's WebSocket URL path: `/ws?batch=true` (several events per message,
    /// as nats-server's own listener sends) unless FANOUT_WS_BATCH=false.
    pub gateway_ws_path: &'static str,
    pub artifacts: bool,
}

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let paths = env_words(
            "FANOUT_PATHS",
            &["gateway", "native"],
            &["gateway", "native"],
        )?
        .iter()
        .filter_map(|word| Path::parse(word))
        .collect();
        Ok(Settings {
            ks: env_list("FANOUT_KS", &[100, 1000, 10_000], 1, 19_000)?,
            paths,
            seconds: env_f64("FANOUT_SECONDS", 4.0, 0.5, 600.0)?,
            rate: env_f64("FANOUT_RATE", 20_000.0, 1.0, 1e8)?,
            burst: env_f64("FANOUT_BURST", 300.0, 0.0, 1e6)? as usize,
            payload: env_f64("FANOUT_PAYLOAD", 64.0, 40.0, 1e6)? as usize,
            per_process: env_f64("FANOUT_PER_PROCESS", 5000.0, 1.0, 19_900.0)? as usize,
            min_processes: env_f64("FANOUT_CLIENT_PROCESSES", 2.0, 1.0, 64.0)? as usize,
            sources: env_f64("FANOUT_SOURCES", 4.0, 1.0, 250.0)? as usize,
            handshakes: env_f64("FANOUT_HANDSHAKES", 64.0, 1.0, 4096.0)? as usize,
            drain: Duration::from_secs_f64(env_f64("FANOUT_DRAIN_SECONDS", 90.0, 1.0, 600.0)?),
            max_drain: Duration::from_secs_f64(env_f64(
                "FANOUT_MAX_DRAIN_SECONDS",
                2.0,
                0.0,
                600.0,
            )?),
            idle: env_f64("FANOUT_IDLE_SECONDS", 2.0, 0.0, 600.0)?,
            sweep: env_list("FANOUT_SWEEP", &[], 1, 100_000_000)?,
            gateway_args: env_args("FANOUT_GATEWAY_ARGS"),
            gateway_ws_path: match env_words("FANOUT_WS_BATCH", &["true"], &["true", "false"])?[..]
            {
                [ref word] if word == "false" => "/ws",
                _ => "/ws?batch=true",
            },
            artifacts: env_artifacts("FANOUT_NO_ARTIFACTS"),
        })
    }
}

/// The knobs recorded in the command line when benchmarks/fanout.sh did not set
/// FANOUT_COMMAND.
pub const KNOBS: &[&str] = &[
    "FANOUT_KS",
    "FANOUT_PATHS",
    "FANOUT_SECONDS",
    "FANOUT_RATE",
    "FANOUT_BURST",
    "FANOUT_PAYLOAD",
    "FANOUT_PER_PROCESS",
    "FANOUT_CLIENT_PROCESSES",
    "FANOUT_SOURCES",
    "FANOUT_HANDSHAKES",
    "FANOUT_DRAIN_SECONDS",
    "FANOUT_MAX_DRAIN_SECONDS",
    "FANOUT_IDLE_SECONDS",
    "FANOUT_SWEEP",
    "FANOUT_GATEWAY_ARGS",
    "FANOUT_WS_BATCH",
    "IPC_GATEWAY_BIN",
];
