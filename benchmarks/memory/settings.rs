//! The knobs (MEMBENCH_* in the environment), checked, and the gateway variants to compare.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::common::{env_args, env_artifacts, env_f64};

pub struct Settings {
    pub connections: usize,
    pub burst_subscribers: usize,
    pub burst_messages: usize,
    pub burst_bytes: usize,
    pub churn_connections: usize,
    pub churn_subscriptions: usize,
    pub after: Duration,
    pub sources: usize,
    pub handshakes: usize,
    pub settle: Duration,
    pub scenarios: Vec<String>,
    /// None: one variant, the gateway binary the run metadata found.
    pub variants: Option<Vec<Variant>>,
    pub gateway_args: Vec<String>,
    pub artifacts: bool,
}

/// One gateway to measure: a binary, its environment, extra `serve` flags.
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub name: String,
    pub binary: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl Settings {
    pub fn from_env() -> Result<Settings, String> {
        let scenarios: Vec<String> = std::env::var("MEMBENCH_SCENARIOS")
            .unwrap_or_else(|_| "sizes,burst,churn".into())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(bad) = scenarios
            .iter()
            .find(|s| !["sizes", "burst", "churn"].contains(&s.as_str()))
        {
            return Err(format!(
                "MEMBENCH_SCENARIOS: unknown {bad:?} (sizes, burst, churn)"
            ));
        }
        Ok(Settings {
            connections: env_f64("MEMBENCH_CONNECTIONS", 19_000.0, 1.0, 1e6)? as usize,
            burst_subscribers: env_f64("MEMBENCH_BURST_SUBSCRIBERS", 10_000.0, 1.0, 1e6)? as usize,
            burst_messages: env_f64("MEMBENCH_BURST_MESSAGES", 300.0, 1.0, 1e6)? as usize,
            burst_bytes: env_f64("MEMBENCH_BURST_BYTES", 128.0, 0.0, 1e6)? as usize,
            churn_connections: env_f64("MEMBENCH_CHURN_CONNECTIONS", 10_000.0, 1.0, 1e6)? as usize,
            churn_subscriptions: env_f64("MEMBENCH_CHURN_SUBSCRIPTIONS", 50_000.0, 1.0, 1e7)?
                as usize,
            after: Duration::from_secs_f64(env_f64("MEMBENCH_AFTER_SECONDS", 60.0, 1.0, 3600.0)?),
            sources: env_f64("MEMBENCH_SOURCES", 4.0, 1.0, 250.0)? as usize,
            handshakes: env_f64("MEMBENCH_HANDSHAKES", 64.0, 1.0, 4096.0)? as usize,
            settle: Duration::from_secs_f64(env_f64("MEMBENCH_SETTLE_SECONDS", 20.0, 1.0, 600.0)?),
            scenarios,
            variants: parse_variants()?,
            gateway_args: env_args("MEMBENCH_GATEWAY_ARGS"),
            artifacts: env_artifacts("MEMBENCH_NO_ARTIFACTS"),
        })
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    /// The variants to run: MEMBENCH_VARIANTS, else `default` = the gateway binary found.
    pub fn variants(&self, default_bin: &Path) -> Vec<Variant> {
        self.variants.clone().unwrap_or_else(|| {
            vec![Variant {
                name: "default".into(),
                binary: default_bin.to_owned(),
                env: Vec::new(),
                args: Vec::new(),
            }]
        })
    }
}

/// MEMBENCH_VARIANTS: `;`-separated `name=BINARY [VAR=VALUE ...] [--flag ...]`, e.g.
/// `glibc=/tmp/b/glibc; glibc-arena2=/tmp/b/glibc MALLOC_ARENA_MAX=2; mimalloc=/tmp/b/mi`.
fn parse_variants() -> Result<Option<Vec<Variant>>, String> {
    let Ok(text) = std::env::var("MEMBENCH_VARIANTS") else {
        return Ok(None);
    };
    let mut variants = Vec::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let mut words = entry.split_whitespace();
        let first = words.next().unwrap_or_default();
        let (name, binary) = first
            .split_once('=')
            .ok_or_else(|| format!("MEMBENCH_VARIANTS: {entry:?} is not name=BINARY ..."))?;
        let binary = PathBuf::from(binary);
        if !binary.is_file() {
            return Err(format!(
                "MEMBENCH_VARIANTS: {} is not a file",
                binary.display()
            ));
        }
        let mut variant = Variant {
            name: name.to_owned(),
            binary,
            env: Vec::new(),
            args: Vec::new(),
        };
        for word in words {
            match word.split_once('=') {
                Some((var, value)) if !word.starts_with('-') => {
                    variant.env.push((var.to_owned(), value.to_owned()))
                }
                _ => variant.args.push(word.to_owned()),
            }
        }
        variants.push(variant);
    }
    if variants.is_empty() {
        return Err("MEMBENCH_VARIANTS is empty".into());
    }
    Ok(Some(variants))
}

/// The knobs recorded in the command line when benchmarks/memory.sh did not set
/// MEMBENCH_COMMAND.
pub const KNOBS: &[&str] = &[
    "MEMBENCH_CONNECTIONS",
    "MEMBENCH_BURST_SUBSCRIBERS",
    "MEMBENCH_BURST_MESSAGES",
    "MEMBENCH_BURST_BYTES",
    "MEMBENCH_CHURN_CONNECTIONS",
    "MEMBENCH_CHURN_SUBSCRIPTIONS",
    "MEMBENCH_AFTER_SECONDS",
    "MEMBENCH_SCENARIOS",
    "MEMBENCH_VARIANTS",
    "MEMBENCH_GATEWAY_ARGS",
    "IPC_GATEWAY_BIN",
];
