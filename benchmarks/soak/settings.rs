//! The soak's knobs (SOAK_* in the environment), checked, and what follows from them: the
//! number of request tasks per front-end, when nats-server is killed and when the policy is
//! reloaded.

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
    pub restart_every: f64,
    pub outage: f64,
    pub reload_every: f64,
    pub ws_subscribers: usize,
    pub ws_publish_rate: f64,
    pub ws_connections: usize,
    pub ws_rate: f64,
    pub grpc_tasks: usize,
    pub grpc_rate: f64,
    pub gateway_args: Vec<String>,
    pub artifacts: bool,
    /// The report's file names: `<name>.md`, `<name>.json`, `<name>-series.csv`.
    pub report_name: String,
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
    "SOAK_RESTART_EVERY_SECONDS",
    "SOAK_OUTAGE_SECONDS",
    "SOAK_RELOAD_EVERY_SECONDS",
    "SOAK_WS_SUBSCRIBERS",
    "SOAK_WS_PUBLISH_RATE",
    "SOAK_WS_CONNECTIONS",
    "SOAK_WS_RATE",
    "SOAK_GRPC_TASKS",
    "SOAK_GRPC_RATE",
    "SOAK_GATEWAY_ARGS",
    "SOAK_REPORT_NAME",
    "IPC_GATEWAY_BIN",
];

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let seconds = env_f64("SOAK_SECONDS", 7200.0, 20.0, 7.0 * 86400.0)?;
        let count = |name: &str, default: f64, max: f64| -> Result<usize, String> {
            Ok(env_f64(name, default, 0.0, max)? as usize)
        };
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
            rate: env_f64("SOAK_RATE", 3000.0, 0.0, 1e7)?,
            pause: Duration::from_secs_f64(env_f64("SOAK_PAUSE_MS", 1.0, 0.0, 10_000.0)? / 1e3),
            publish_rate: env_f64("SOAK_PUBLISH_RATE", 100.0, 0.0, 100_000.0)?,
            restart_every: env_f64("SOAK_RESTART_EVERY_SECONDS", 1200.0, 0.0, 7.0 * 86400.0)?,
            outage: env_f64("SOAK_OUTAGE_SECONDS", 5.0, 0.0, 600.0)?,
            reload_every: env_f64("SOAK_RELOAD_EVERY_SECONDS", 600.0, 0.0, 7.0 * 86400.0)?,
            ws_subscribers: count("SOAK_WS_SUBSCRIBERS", 50.0, 5000.0)?,
            ws_publish_rate: env_f64("SOAK_WS_PUBLISH_RATE", 20.0, 0.0, 100_000.0)?,
            ws_connections: count("SOAK_WS_CONNECTIONS", 4.0, 256.0)?,
            ws_rate: env_f64("SOAK_WS_RATE", 400.0, 0.0, 1e7)?,
            grpc_tasks: count("SOAK_GRPC_TASKS", 16.0, 1024.0)?,
            grpc_rate: env_f64("SOAK_GRPC_RATE", 400.0, 0.0, 1e7)?,
            gateway_args: env_args("SOAK_GATEWAY_ARGS"),
            artifacts: env_artifacts("SOAK_NO_ARTIFACTS"),
            report_name: std::env::var("SOAK_REPORT_NAME")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "latest".into()),
        };
        if !settings
            .report_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "SOAK_REPORT_NAME={:?}: letters, digits, '-' and '_' only",
                settings.report_name
            ));
        }
        if settings.restart_every > 0.0 && settings.outage + 5.0 >= settings.restart_every {
            return Err(format!(
                "SOAK_OUTAGE_SECONDS={} does not fit between restarts every {} s",
                settings.outage, settings.restart_every
            ));
        }
        if settings.kill_times().len() > MAX_RESTARTS {
            return Err(format!(
                "{} restarts in {} s: at most {MAX_RESTARTS}",
                settings.kill_times().len(),
                settings.seconds
            ));
        }
        Ok(settings)
    }

    pub fn tasks(&self) -> usize {
        self.connections * self.inflight
    }

    /// Request tasks per WebSocket connection (the WebSocket rate shared like SOAK_RATE).
    pub fn ws_inflight(&self) -> usize {
        self.inflight
    }

    /// When each kill happens, in seconds from the start of the load: every
    /// SOAK_RESTART_EVERY_SECONDS from half of it on (600, 1800, 3000 s... by default), as
    /// long as the outage and a minute of recovery fit before the end. Half a period in, so
    /// that no kill falls on the edge of the window aim 3 judges (the last hour, or third):
    /// the gateway's RSS dips at a kill and grows back over a minute or two, and a window that
    /// opens on that dip reads the regrowth as a trend.
    pub fn kill_times(&self) -> Vec<f64> {
        let step = self.restart_every;
        if step <= 0.0 {
            return Vec::new();
        }
        (0..)
            .map(|k| step / 2.0 + k as f64 * step)
            .take_while(|t| *t < self.seconds - self.outage - 60.0)
            .collect()
    }

    /// When each policy reload happens: every SOAK_RELOAD_EVERY_SECONDS except at a kill (the
    /// two are then 5 s apart, so that each is seen on its own), up to 10 s before the end.
    pub fn reload_times(&self) -> Vec<f64> {
        let kills = self.kill_times();
        every(self.reload_every, self.seconds - 10.0)
            .into_iter()
            .map(|t| {
                if kills.iter().any(|k| (k - t).abs() < 1.0) {
                    t + self.outage + 30.0
                } else {
                    t
                }
            })
            .filter(|t| *t < self.seconds - 10.0)
            .collect()
    }
}

/// `step`, `2 step`, ... below `until` (none when `step` is 0).
fn every(step: f64, until: f64) -> Vec<f64> {
    if step <= 0.0 {
        return Vec::new();
    }
    (1..)
        .map(|k| k as f64 * step)
        .take_while(|t| *t < until)
        .collect()
}
