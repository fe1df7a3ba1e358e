//! The report: the gateway's memory at each stage, per connection (stage − baseline) / N, the
//! checks against the bounds, the connection counts and the run's metadata, in one
//! structure that is written as `latest.json` and rendered as Markdown (markdown.rs) from the
//! same values.

use serde::Serialize;

use crate::common::{GatewayBinary, RunMeta};
use crate::compare::Row;
use crate::memory::Snapshot;
use crate::run::Run;
use crate::settings::Settings;
use crate::stages::StageResult;
use crate::ws::source_address;
use crate::{BIG_IN_FLIGHT, SETTLE_KIB, SETTLE_WINDOW};

/// The bound on RSS per idle connection, and its aim.
pub const LIMIT_BYTES: f64 = 4096.0;
pub const AIM_BYTES: f64 = 2048.0;

#[derive(Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub run: RunMeta,
    pub gateway: Gateway,
    pub limits: Limits,
    pub settings: ReportSettings,
    pub stages: Stages,
    pub per_connection: PerConnection,
    pub connections: Connections,
    pub checks: Checks,
    /// The gateway next to nats-server's own WebSocket listener (compare.rs).
    pub side_by_side: Vec<Row>,
}

#[derive(Serialize)]
pub struct Gateway {
    #[serde(flatten)]
    pub binary: GatewayBinary,
    pub args: String,
}

#[derive(Clone, Copy, Serialize)]
pub struct Nofile {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Serialize)]
pub struct Limits {
    pub open_files_bench: Option<Nofile>,
    pub open_files_gateway: Option<Nofile>,
}

#[derive(Serialize)]
pub struct ReportSettings {
    pub connections: usize,
    pub source_addresses: Vec<String>,
    pub client_processes: Vec<usize>,
    pub handshakes_in_flight_per_process: usize,
    pub big_message_bytes: usize,
    pub big_in_flight_per_process: usize,
    pub settle: Settle,
}

#[derive(Serialize)]
pub struct Settle {
    pub window_seconds: f64,
    pub max_move_kib: u64,
    pub cap_seconds: f64,
}

#[derive(Serialize)]
pub struct Stages {
    pub baseline: Snapshot,
    pub idle: Snapshot,
    pub after_big_message: Option<Snapshot>,
    pub after_close: Snapshot,
}

/// Bytes per connection between a stage and the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct PerConn {
    #[serde(rename = "vm_rss_bytes")]
    pub vm_rss: f64,
    #[serde(rename = "rss_anon_bytes")]
    pub rss_anon: f64,
    #[serde(rename = "private_dirty_bytes")]
    pub private_dirty: Option<f64>,
}

#[derive(Serialize)]
pub struct PerConnection {
    pub idle: PerConn,
    pub after_big_message: Option<PerConn>,
    pub after_close: PerConn,
}

#[derive(Serialize)]
pub struct Connections {
    pub opened: StageResult,
    pub big_message: Option<StageResult>,
    pub closed: StageResult,
}

#[derive(Serialize)]
pub struct Checks {
    pub idle_rss_per_connection_bytes: f64,
    pub limit_4kib_met: bool,
    pub aim_2kib_met: bool,
    pub ws_gauge_equals_n: bool,
}

/// Bytes per connection between two readings in KiB (None when a field is missing).
fn per_conn(after: Option<u64>, before: Option<u64>, n: usize) -> Option<f64> {
    Some((after? as f64 - before? as f64) * 1024.0 / n as f64)
}

pub fn per_connection(stage: &Snapshot, baseline: &Snapshot, n: usize) -> PerConn {
    let (s, b) = (&stage.memory, &baseline.memory);
    PerConn {
        vm_rss: per_conn(Some(s.vm_rss), Some(b.vm_rss), n).unwrap_or(f64::NAN),
        rss_anon: per_conn(Some(s.rss_anon), Some(b.rss_anon), n).unwrap_or(f64::NAN),
        private_dirty: per_conn(s.private_dirty, b.private_dirty, n),
    }
}

impl Report {
    pub fn build(meta: RunMeta, run: Run, side_by_side: Vec<Row>, s: &Settings) -> Report {
        let n = s.connections;
        let per = |snap: &Snapshot| per_connection(snap, &run.baseline, n);
        let per_connection = PerConnection {
            idle: per(&run.idle),
            after_big_message: run.big.as_ref().map(|(_, snap)| per(snap)),
            after_close: per(&run.after_close),
        };
        let idle = per_connection.idle.vm_rss;
        let checks = Checks {
            idle_rss_per_connection_bytes: idle,
            limit_4kib_met: idle <= LIMIT_BYTES,
            aim_2kib_met: idle <= AIM_BYTES,
            ws_gauge_equals_n: run.idle.ws_connections == Some(n as f64),
        };
        let nofile = |limits: Option<(u64, u64)>| limits.map(|(soft, hard)| Nofile { soft, hard });
        let (big_result, big_snapshot) = run.big.unzip();
        Report {
            benchmark: "ipc-gateway idle WebSocket memory (issue 5)",
            gateway: Gateway {
                binary: meta.gateway.clone(),
                args: run.gateway_args,
            },
            run: meta,
            limits: Limits {
                open_files_bench: nofile(run.bench_nofile),
                open_files_gateway: nofile(run.gateway_nofile),
            },
            settings: ReportSettings {
                connections: n,
                source_addresses: (0..s.sources)
                    .map(|i| source_address(i, s.sources).to_string())
                    .collect(),
                client_processes: run.client_processes,
                handshakes_in_flight_per_process: s.handshakes,
                big_message_bytes: s.big_bytes,
                big_in_flight_per_process: BIG_IN_FLIGHT,
                settle: Settle {
                    window_seconds: SETTLE_WINDOW.as_secs_f64(),
                    max_move_kib: SETTLE_KIB,
                    cap_seconds: s.settle.as_secs_f64(),
                },
            },
            stages: Stages {
                baseline: run.baseline,
                idle: run.idle,
                after_big_message: big_snapshot,
                after_close: run.after_close,
            },
            per_connection,
            connections: Connections {
                opened: run.opened,
                big_message: big_result,
                closed: run.closed,
            },
            checks,
            side_by_side,
        }
    }
}
