//! The knobs (WSIDLE_* in the environment), checked.

use std::time::Duration;

use crate::common::{env_args, env_artifacts, env_f64, env_list, env_words};
use crate::ws::{Mode, Server};

pub struct Settings {
    pub connections: usize,
    pub sources: usize,
    pub big_bytes: usize,
    pub handshakes: usize,
    pub min_client_processes: usize,
    pub settle: Duration,
    pub gateway_args: Vec<String>,
    pub artifacts: bool,
    /// The side-by-side runs (gateway vs nats-server's own WebSocket listener): connection
    /// counts (empty: none), servers and modes.
    pub compare: Vec<usize>,
    pub compare_servers: Vec<Server>,
    pub compare_modes: Vec<Mode>,
}

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        Ok(Settings {
            connections: env_f64("WSIDLE_CONNECTIONS", 10_000.0, 1.0, 1e6)? as usize,
            sources: env_f64("WSIDLE_SOURCES", 4.0, 1.0, 250.0)? as usize,
            big_bytes: env_f64("WSIDLE_BIG_BYTES", 4096.0, 0.0, 1e6)? as usize,
            handshakes: env_f64("WSIDLE_HANDSHAKES", 64.0, 1.0, 4096.0)? as usize,
            min_client_processes: env_f64("WSIDLE_CLIENT_PROCESSES", 1.0, 1.0, 64.0)? as usize,
            settle: Duration::from_secs_f64(env_f64("WSIDLE_SETTLE_SECONDS", 30.0, 1.0, 600.0)?),
            gateway_args: env_args("WSIDLE_GATEWAY_ARGS"),
            artifacts: env_artifacts("WSIDLE_NO_ARTIFACTS"),
            compare: env_list("WSIDLE_COMPARE", &[1000, 5000, 19_000], 0, 1_000_000)?
                .into_iter()
                .filter(|&n| n > 0)
                .collect(),
            compare_servers: env_words(
                "WSIDLE_COMPARE_SERVERS",
                &["gateway", "native"],
                &["gateway", "native"],
            )?
            .iter()
            .filter_map(|w| Server::parse(w))
            .collect(),
            compare_modes: env_words(
                "WSIDLE_COMPARE_MODES",
                &["idle", "shared", "own"],
                &["idle", "shared", "own"],
            )?
            .iter()
            .filter_map(|w| Mode::parse(w))
            .collect(),
        })
    }
}

/// The knobs recorded in the command line when benchmarks/ws_idle.sh did not set
/// WSIDLE_COMMAND.
pub const KNOBS: &[&str] = &[
    "WSIDLE_CONNECTIONS",
    "WSIDLE_SOURCES",
    "WSIDLE_BIG_BYTES",
    "WSIDLE_HANDSHAKES",
    "WSIDLE_CLIENT_PROCESSES",
    "WSIDLE_SETTLE_SECONDS",
    "WSIDLE_GATEWAY_ARGS",
    "WSIDLE_COMPARE",
    "WSIDLE_COMPARE_SERVERS",
    "WSIDLE_COMPARE_MODES",
    "IPC_GATEWAY_BIN",
];
