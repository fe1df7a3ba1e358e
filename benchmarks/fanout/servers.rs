//! The servers of a run: the gateway's nats-server (no WebSocket listener), the gateway
//! (`ipc-gateway serve` on it), and a second nats-server with its own WebSocket listener for the
//! native path, each with a monitoring port. Also the loss signals each side reports: the
//! gateway's /metrics counters, and nats-server's `slow_consumers` (/varz) and "Slow Consumer"
//! log lines.

use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::GATEWAY_FD_SPARE;
use crate::common::{
    NatsServer, Proc, http_get, http_status, metric_labeled, metric_sum, start_gateway,
    start_nats_server,
};
use crate::settings::{Path, Settings};

pub struct Servers {
    pub gateway_nats: NatsServer,
    pub native_nats: NatsServer,
    pub gateway: Proc,
    pub gateway_args: Vec<String>,
    pub http: u16,
}

pub fn start(bin: &FsPath, dir: &FsPath, s: &Settings) -> Result<Servers, String> {
    let gateway_nats = start_nats_server(dir, "nats-gateway", false)?;
    let native_nats = start_nats_server(dir, "nats-native", true)?;
    let most = s.ks.iter().copied().max().unwrap_or(0);
    let (gateway, gateway_args, http) = start_gateway(
        bin,
        &gateway_nats.url,
        dir,
        most + GATEWAY_FD_SPARE as usize,
        &s.gateway_args,
        "gateway",
    )?;
    Ok(Servers {
        gateway_nats,
        native_nats,
        gateway,
        gateway_args,
        http,
    })
}

/// Counters that say a message was dropped or a consumer was cut off, read before and after
/// a phase; the report keeps the differences.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Signals {
    /// `ipc_gateway_dropped_messages_total` (messages dropped at a client's queue; each was
    /// reported in a `dropped` notice).
    pub gateway_dropped_messages: Option<f64>,
    /// `ipc_gateway_nats_slow_consumer_total` (messages async-nats dropped before the gateway
    /// queued them: no notice).
    pub gateway_nats_slow_consumer: Option<f64>,
    /// `ipc_gateway_disconnects_total{reason="slow_client"}`.
    pub gateway_slow_client_disconnects: Option<f64>,
    /// /varz `slow_consumers` of the nats-server this path uses.
    pub nats_slow_consumers: Option<f64>,
    /// Lines with "Slow Consumer" in that nats-server's log.
    pub nats_slow_consumer_log_lines: f64,
}

impl Servers {
    pub fn nats(&self, path: Path) -> &NatsServer {
        match path {
            Path::Gateway => &self.gateway_nats,
            Path::Native => &self.native_nats,
        }
    }

    /// The port the clients of `path` connect to.
    pub fn client_port(&self, path: Path) -> u16 {
        match path {
            Path::Gateway => self.http,
            Path::Native => self.native_nats.ws_port.unwrap_or(0),
        }
    }

    fn metrics(&self) -> Option<String> {
        http_get(self.http, "/metrics")
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    }

    pub fn signals(&self, path: Path) -> Signals {
        let nats = self.nats(path);
        let mut signals = Signals {
            nats_slow_consumers: nats.varz("slow_consumers"),
            nats_slow_consumer_log_lines: nats.log_lines("Slow Consumer") as f64,
            ..Signals::default()
        };
        if path == Path::Gateway
            && let Some(text) = self.metrics()
        {
            signals.gateway_dropped_messages =
                Some(metric_sum(&text, "ipc_gateway_dropped_messages_total").unwrap_or(0.0));
            signals.gateway_nats_slow_consumer =
                Some(metric_sum(&text, "ipc_gateway_nats_slow_consumer_total").unwrap_or(0.0));
            signals.gateway_slow_client_disconnects = Some(
                metric_labeled(
                    &text,
                    "ipc_gateway_disconnects_total",
                    "reason=\"slow_client\"",
                )
                .unwrap_or(0.0),
            );
        }
        signals
    }

    /// Subscriptions the server side holds for `path`: the gateway's
    /// `ipc_gateway_subscriptions`, or nats-server's /varz `subscriptions` (which also counts
    /// the server's own).
    pub fn subscriptions(&self, path: Path) -> Option<f64> {
        match path {
            Path::Gateway => self
                .metrics()
                .and_then(|text| metric_sum(&text, "ipc_gateway_subscriptions")),
            Path::Native => self.native_nats.varz("subscriptions"),
        }
    }

    /// Client connections the server side holds for `path` now.
    pub fn connections(&self, path: Path) -> Option<f64> {
        match path {
            Path::Gateway => self.metrics().and_then(|text| {
                metric_labeled(&text, "ipc_gateway_connections", "frontend=\"ws\"")
            }),
            Path::Native => self.native_nats.varz("connections"),
        }
    }

    /// Waits (at most `cap`) until the gateway's /ready says 200 (its NATS connections are up:
    /// nats-server may have cut them off as slow consumers in the phase before). Whether it
    /// was ready.
    pub fn wait_gateway_ready(&self, cap: Duration) -> bool {
        let deadline = Instant::now() + cap;
        loop {
            if http_status(self.http, "/ready") == Some(200) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `cap`) until `path`'s server holds at most `most` client connections.
    pub fn wait_connections_at_most(&self, path: Path, most: f64, cap: Duration) -> Option<f64> {
        let deadline = Instant::now() + cap;
        loop {
            let now = self.connections(path);
            if now.is_some_and(|n| n <= most) || Instant::now() >= deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `after − before`, field by field.
pub fn signals_delta(before: &Signals, after: &Signals) -> Signals {
    let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    Signals {
        gateway_dropped_messages: d(
            before.gateway_dropped_messages,
            after.gateway_dropped_messages,
        ),
        gateway_nats_slow_consumer: d(
            before.gateway_nats_slow_consumer,
            after.gateway_nats_slow_consumer,
        ),
        gateway_slow_client_disconnects: d(
            before.gateway_slow_client_disconnects,
            after.gateway_slow_client_disconnects,
        ),
        nats_slow_consumers: d(before.nats_slow_consumers, after.nats_slow_consumers),
        nats_slow_consumer_log_lines: after.nats_slow_consumer_log_lines
            - before.nats_slow_consumer_log_lines,
    }
}
