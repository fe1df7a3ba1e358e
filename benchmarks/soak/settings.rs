//! The soak's knobs (SOAK_* in the environment), checked, and what follows from them: the
//! number of request tasks and when nats-server is killed.

use std::time::Duration;

use crate::MAX_RESTARTS;
use crate::common::{env_args, env_artifacts, env_f64};

#[derive(Clone)]
pub struct Settings {
    pub seconds: f64,
    pub warmup: f64,
    pub sample: f64,
    pub connections: usize,
    pub inflight: usize,
    pub rate: f64,
    pub pause: Duration,
    pub publish_rate: f64,
    pub restarts: usize,
    pub outage: f64,
    pub gateway_args: Vec<String>,
    pub artifacts: bool,
}

/// The knobs recorded in the command line when benchmarks/soak.sh did not set SOAK_COMMAND.
pub const KNOBS: &[&str] = &[
    "SOAK_SECONDS",
    "SOAK_WARMUP_SECONDS",
    "SOAK_SAMPLE_SECONDS",
    "SOAK_CONNECTIONS",
    "SOAK_INFLIGHT",
    "SOAK_RATE",
    "SOAK_PAUSE_MS",
    "SOAK_PUBLISH_RATE",
    "SOAK_RESTARTS",
    "SOAK_OUTAGE_SECONDS",
    "SOAK_GATEWAY_ARGS",
    "IPC_GATEWAY_BIN",
];

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let seconds = env_f64("SOAK_SECONDS", 1800.0, 20.0, 7.0 * 86400.0)?;
        let settings = Settings {
            seconds,
            warmup: env_f64(
                "SOAK_WARMUP_SECONDS",
                (seconds / 6.0).min(120.0),
                0.0,
                seconds / 2.0,
            )?,
            sample: env_f64("SOAK_SAMPLE_SECONDS", 5.0, 0.5, 60.0)?,
            connections: env_f64("SOAK_CONNECTIONS", 8.0, 1.0, 256.0)? as usize,
            inflight: env_f64("SOAK_INFLIGHT", 16.0, 1.0, 1024.0)? as usize,
            rate: env_f64("SOAK_RATE", 4000.0, 0.0, 1e7)?,
            pause: Duration::from_secs_f64(env_f64("SOAK_PAUSE_MS", 1.0, 0.0, 10_000.0)? / 1e3),
            publish_rate: env_f64("SOAK_PUBLISH_RATE", 100.0, 0.0, 100_000.0)?,
            restarts: env_f64("SOAK_RESTARTS", 2.0, 0.0, MAX_RESTARTS as f64)? as usize,
            outage: env_f64("SOAK_OUTAGE_SECONDS", 5.0, 0.0, 600.0)?,
            gateway_args: env_args("SOAK_GATEWAY_ARGS"),
            artifacts: env_artifacts("SOAK_NO_ARTIFACTS"),
        };
        let gap = settings.seconds / (settings.restarts as f64 + 1.0);
        if settings.restarts > 0 && settings.outage + 5.0 >= gap {
            return Err(format!(
                "SOAK_OUTAGE_SECONDS={} does not fit between {} restarts in {} s",
                settings.outage, settings.restarts, settings.seconds
            ));
        }
        Ok(settings)
    }

    pub fn tasks(&self) -> usize {
        self.connections * self.inflight
    }

    /// When each kill happens, in seconds from the start of the load.
    pub fn kill_times(&self) -> Vec<f64> {
        (1..=self.restarts)
            .map(|k| self.seconds * k as f64 / (self.restarts as f64 + 1.0))
            .collect()
    }
}
