//! The report: the measured runs aggregated into rows (medians over the repeats, ratios to the
//! direct rows), the aims checked on them, and the run's metadata, in one structure that is
//! written as `latest.json` and rendered as Markdown (markdown.rs) from the same values.

use std::collections::HashMap;

use ipc_gateway::config::IdentityHeaders;
use serde::Serialize;

use crate::common::{GatewayBinary, RunMeta};
use crate::load::Measured;
use crate::settings::{Case, Mode, Settings};
use crate::{REQUEST_TIMEOUT, SUBJECT};

#[derive(Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub run: RunMeta,
    pub echo_service: String,
    pub gateway: Gateway,
    pub settings: ReportSettings,
    pub rows: Vec<Row>,
    pub aims: Vec<AimCheck>,
}

#[derive(Serialize)]
pub struct Gateway {
    #[serde(flatten)]
    pub binary: GatewayBinary,
    pub runs: Vec<GatewayRun>,
}

#[derive(Serialize)]
pub struct GatewayRun {
    pub worker_threads: usize,
    pub args: String,
}

#[derive(Serialize)]
pub struct ReportSettings {
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub c1_repeats: usize,
    pub repeats: usize,
    pub concurrency: Vec<usize>,
    pub payload_bytes: Vec<usize>,
    pub gateway_worker_threads: Vec<usize>,
    pub load_generator_threads: usize,
    /// The identity headers the gateways stamp (`--identity-headers`) and
    /// `direct + identity headers` sends: their form, then their names.
    pub identity_headers: IdentityHeaders,
    pub identity_header_names: Vec<String>,
    pub modes: Vec<Mode>,
    pub request_timeout_ms: u64,
    pub aggregation: &'static str,
}

/// One case, aggregated over its runs: at concurrency 1 each number is the median of the
/// repeats.
#[derive(Serialize)]
pub struct Row {
    pub mode: Mode,
    /// Gateway rows only.
    pub gateway_worker_threads: Option<usize>,
    pub concurrency: usize,
    pub payload_bytes: usize,
    pub req_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// req/s over the direct row's at the same concurrency and payload (gateway rows only).
    #[serde(rename = "ratio_vs_direct")]
    pub ratio: Option<f64>,
    /// req/s over the `direct, mt client` row's (gateway rows only).
    #[serde(rename = "ratio_vs_direct_multi_thread_client")]
    pub ratio_mt: Option<f64>,
    #[serde(rename = "gateway_cpu_us_per_request")]
    pub gateway_cpu_us: Option<f64>,
    #[serde(rename = "nats_server_cpu_us_per_request")]
    pub nats_server_cpu_us: Option<f64>,
    #[serde(rename = "echo_service_cpu_us_per_request")]
    pub echo_service_cpu_us: Option<f64>,
    /// The load generator's own (this process's) CPU per request: the client's share.
    #[serde(rename = "client_cpu_us_per_request")]
    pub client_cpu_us: Option<f64>,
    pub errors: u64,
    /// The lowest and highest p50 over the runs, when the case ran more than once.
    pub p50_spread_us: Option<[f64; 2]>,
    pub runs: Vec<Measured>,
}

#[derive(Serialize)]
pub struct AimCheck {
    pub aim: &'static str,
    pub mode: Mode,
    pub gateway_worker_threads: usize,
    pub payload_bytes: usize,
    pub value: f64,
    pub bound: f64,
    pub met: bool,
    pub detail: String,
}

impl Report {
    pub fn build(
        run: RunMeta,
        settings: &Settings,
        gateway_runs: Vec<(usize, String)>,
        results: Vec<(Case, Measured)>,
    ) -> Report {
        let rows = aggregate(results, settings);
        let aims = check_aims(&rows);
        Report {
            benchmark: "ipc-gateway request-reply (issue core)",
            echo_service: format!("ipc-gateway demo-echo --subject {SUBJECT} (one process)"),
            gateway: Gateway {
                binary: run.gateway.clone(),
                runs: gateway_runs
                    .into_iter()
                    .map(|(worker_threads, args)| GatewayRun {
                        worker_threads,
                        args,
                    })
                    .collect(),
            },
            run,
            settings: ReportSettings {
                seconds: settings.seconds,
                warmup_seconds: settings.warmup,
                c1_repeats: settings.c1_repeats,
                repeats: settings.repeats,
                concurrency: settings.concurrency.clone(),
                payload_bytes: settings.payloads.clone(),
                gateway_worker_threads: settings.workers.clone(),
                load_generator_threads: settings.client_threads,
                identity_headers: settings.identity_headers,
                identity_header_names: crate::clients::identity_headers(settings.identity_headers)
                    .map(|map| map.iter().map(|(name, _)| name.to_string()).collect())
                    .unwrap_or_default(),
                modes: settings.modes.clone(),
                request_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
                aggregation: "each c=1 row's numbers are medians over its interleaved repeats",
            },
            rows,
            aims,
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn row(case: Case, runs: Vec<Measured>) -> Row {
    let of = |f: fn(&Measured) -> f64| median(runs.iter().map(f).collect());
    let cpu = |f: fn(&Measured) -> Option<f64>| {
        let median = median(runs.iter().filter_map(f).collect());
        median.is_finite().then_some(median)
    };
    let p50_spread_us = (runs.len() > 1).then(|| {
        let min = runs.iter().map(|m| m.p50_us).fold(f64::INFINITY, f64::min);
        let max = runs.iter().map(|m| m.p50_us).fold(0.0, f64::max);
        [min, max]
    });
    Row {
        mode: case.mode,
        gateway_worker_threads: case.mode.is_gateway().then_some(case.workers),
        concurrency: case.concurrency,
        payload_bytes: case.payload,
        req_per_s: of(|m| m.req_per_s),
        p50_us: of(|m| m.p50_us),
        p99_us: of(|m| m.p99_us),
        p999_us: of(|m| m.p999_us),
        ratio: None,
        ratio_mt: None,
        gateway_cpu_us: cpu(|m| m.cpu.gateway),
        nats_server_cpu_us: cpu(|m| m.cpu.nats_server),
        echo_service_cpu_us: cpu(|m| m.cpu.echo_service),
        client_cpu_us: cpu(|m| m.cpu.bench_process),
        errors: runs.iter().map(|m| m.errors).sum(),
        p50_spread_us,
        runs,
    }
}

/// The runs grouped by case into rows, in report order, with their ratios to direct.
fn aggregate(results: Vec<(Case, Measured)>, settings: &Settings) -> Vec<Row> {
    let mut by_case: Vec<(Case, Vec<Measured>)> = Vec::new();
    for (case, measured) in results {
        match by_case.iter_mut().find(|(c, _)| *c == case) {
            Some((_, runs)) => runs.push(measured),
            None => by_case.push((case, vec![measured])),
        }
    }
    let key = |case: &Case| {
        let payload_rank = settings.payloads.iter().position(|&p| p == case.payload);
        let c_rank = settings
            .concurrency
            .iter()
            .position(|&c| c == case.concurrency);
        (payload_rank, c_rank, case.mode.rank(), case.workers)
    };
    by_case.sort_by_key(|(case, _)| key(case));
    let mut rows: Vec<Row> = by_case
        .into_iter()
        .map(|(case, runs)| row(case, runs))
        .collect();
    let baseline = |mode: Mode| -> HashMap<(usize, usize), f64> {
        rows.iter()
            .filter(|row| row.mode == mode)
            .map(|row| ((row.concurrency, row.payload_bytes), row.req_per_s))
            .collect()
    };
    let (direct, direct_mt) = (baseline(Mode::Direct), baseline(Mode::DirectMulti));
    for row in &mut rows {
        if row.mode.is_gateway() || row.mode == Mode::DirectStamped {
            let key = (row.concurrency, row.payload_bytes);
            row.ratio = direct.get(&key).map(|d| row.req_per_s / d);
            row.ratio_mt = direct_mt.get(&key).map(|d| row.req_per_s / d);
        }
    }
    rows
}

fn find_row(rows: &[Row], mode: Mode, concurrency: usize, payload: usize) -> Option<&Row> {
    rows.iter().find(|row| {
        row.mode == mode && row.concurrency == concurrency && row.payload_bytes == payload
    })
}

/// The aims, checked on every Unix-socket gateway row that has its baselines in this run.
fn check_aims(rows: &[Row]) -> Vec<AimCheck> {
    let mut checks = Vec::new();
    for row in rows.iter().filter(|row| row.mode.in_aims()) {
        if row.concurrency == 256
            && let Some(direct) = find_row(rows, Mode::Direct, 256, row.payload_bytes)
        {
            checks.push(throughput_aim(row, direct));
        }
        if row.concurrency == 1
            && let (Some(direct), Some(bare)) = (
                find_row(rows, Mode::Direct, 1, row.payload_bytes),
                find_row(rows, Mode::Bare, 1, row.payload_bytes),
            )
        {
            checks.push(latency_aim(row, direct, bare));
        }
    }
    checks
}

/// Aim 1: at concurrency 256, gateway throughput ≥ 0.9 × direct throughput.
fn throughput_aim(row: &Row, direct: &Row) -> AimCheck {
    let ratio = row.req_per_s / direct.req_per_s;
    AimCheck {
        aim: "throughput_c256",
        mode: row.mode,
        gateway_worker_threads: row.gateway_worker_threads.unwrap_or(0),
        payload_bytes: row.payload_bytes,
        value: ratio,
        bound: 0.9,
        detail: format!(
            "{:.0} / {:.0} req/s = {:.2} × direct (aim ≥ 0.90){}",
            row.req_per_s,
            direct.req_per_s,
            ratio,
            row.ratio_mt.map_or(String::new(), |r| format!(
                "; for reference {r:.2} × the direct mt client"
            ))
        ),
        met: row.errors == 0 && ratio >= 0.9,
    }
}

/// Aim 2: at concurrency 1, gateway p50 ≤ direct p50 + bare-socket p50 + 10 µs.
fn latency_aim(row: &Row, direct: &Row, bare: &Row) -> AimCheck {
    let bound = direct.p50_us + bare.p50_us + 10.0;
    AimCheck {
        aim: "latency_c1",
        mode: row.mode,
        gateway_worker_threads: row.gateway_worker_threads.unwrap_or(0),
        payload_bytes: row.payload_bytes,
        value: row.p50_us,
        bound,
        detail: format!(
            "p50 {:.1} µs vs direct {:.1} + bare {:.1} + 10 = {:.1} µs (over by {:+.1})",
            row.p50_us,
            direct.p50_us,
            bare.p50_us,
            bound,
            row.p50_us - bound
        ),
        met: row.errors == 0 && row.p50_us <= bound,
    }
}
