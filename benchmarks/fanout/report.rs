//! The report: the run's setup and every case (path × K) with its phases, in one structure that
//! is written as `latest.json` and rendered as Markdown (markdown.rs) from the same values.

use serde::Serialize;

use crate::SUBJECT;
use crate::common::{GatewayBinary, RunMeta};
use crate::run::{Case, Logs, Run};
use crate::settings::{Path, Settings};

#[derive(Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub run: RunMeta,
    pub gateway: Gateway,
    pub nats: Nats,
    pub settings: ReportSettings,
    pub cases: Vec<Case>,
    pub logs: Logs,
}

#[derive(Serialize)]
pub struct Gateway {
    #[serde(flatten)]
    pub binary: GatewayBinary,
    pub args: String,
}

/// The two nats-servers' config files.
#[derive(Serialize)]
pub struct Nats {
    pub gateway_path_config: String,
    pub native_path_config: String,
}

#[derive(Serialize)]
pub struct ReportSettings {
    pub subject: &'static str,
    pub gateway_ws_path: &'static str,
    pub ks: Vec<usize>,
    pub paths: Vec<Path>,
    pub seconds: f64,
    pub sustained_deliveries_per_second: f64,
    pub burst_messages: usize,
    pub payload_bytes: usize,
    pub connections_per_client_process: usize,
    pub min_client_processes: usize,
    pub source_addresses: usize,
    pub handshakes_in_flight_per_process: usize,
    pub drain_cap_seconds: f64,
    pub max_rate_drain_seconds: f64,
    pub idle_seconds: f64,
    pub open_files: Option<(u64, u64)>,
}

impl Report {
    pub fn build(meta: RunMeta, run: Run, s: &Settings) -> Report {
        Report {
            benchmark: "ipc-gateway fan-out: K WebSocket subscribers on one subject, gateway vs nats-server's own WebSocket listener (issue 12)",
            gateway: Gateway {
                binary: meta.gateway.clone(),
                args: run.gateway_args,
            },
            run: meta,
            nats: Nats {
                gateway_path_config: run.gateway_nats_config,
                native_path_config: run.native_nats_config,
            },
            settings: ReportSettings {
                subject: SUBJECT,
                gateway_ws_path: s.gateway_ws_path,
                ks: s.ks.clone(),
                paths: s.paths.clone(),
                seconds: s.seconds,
                sustained_deliveries_per_second: s.rate,
                burst_messages: s.burst,
                payload_bytes: s.payload,
                connections_per_client_process: s.per_process,
                min_client_processes: s.min_processes,
                source_addresses: s.sources,
                handshakes_in_flight_per_process: s.handshakes,
                drain_cap_seconds: s.drain.as_secs_f64(),
                max_rate_drain_seconds: s.max_drain.as_secs_f64(),
                idle_seconds: s.idle,
                open_files: run.open_files,
            },
            cases: run.cases,
            logs: run.logs,
        }
    }
}
