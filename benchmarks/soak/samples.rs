//! Samples of the gateway under load, one every SOAK_SAMPLE_SECONDS: its memory, FDs and
//! threads (/proc), its /metrics gauges, nats-server's connection count, the interval's
//! request rate and latency, and the CPU use of every process. Each is printed as it is taken
//! and kept for the report (`Sample` is also how it appears in `latest.json`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_json::Value;

use crate::common::{
    cpu_ticks, fd_count, http_get, metric_sum, proc_status, round1, round1_opt, round3_opt,
};
use crate::settings::Settings;
use crate::stats::Stats;

#[derive(Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    #[serde(serialize_with = "round1")]
    pub t: f64,
    /// warm-up, steady, nats-down or recovering.
    pub phase: &'static str,
    #[serde(rename = "rss_kib")]
    pub rss_kb: u64,
    pub fds: u64,
    pub threads: u64,
    #[serde(rename = "gateway_cpu_pct", serialize_with = "round1")]
    pub gw_cpu_pct: f64,
    #[serde(serialize_with = "round1")]
    pub echo_cpu_pct: f64,
    #[serde(rename = "soak_process_cpu_pct", serialize_with = "round1")]
    pub self_cpu_pct: f64,
    #[serde(rename = "nats_server_cpu_pct", serialize_with = "round1_opt")]
    pub nats_cpu_pct: Option<f64>,
    /// Median round trip of direct NATS requests to the echo service (not through the gateway).
    #[serde(rename = "direct_nats_p50_ms", serialize_with = "round3_opt")]
    pub direct_ms: Option<f64>,
    pub connections: Option<f64>,
    #[serde(rename = "inflight_requests")]
    pub inflight: Option<f64>,
    pub nats_connected: Option<f64>,
    pub nats_server_connections: Option<u64>,
    pub sent: u64,
    pub replies: u64,
    pub errors: u64,
    #[serde(serialize_with = "round1")]
    pub req_per_s: f64,
    #[serde(serialize_with = "round3_opt")]
    pub avg_latency_ms: Option<f64>,
    pub sub_messages: u64,
}

/// Counters at one moment; a sample is the difference of two.
#[derive(Default, Clone, Copy)]
pub struct Totals {
    sent: u64,
    replies: u64,
    errors: u64,
    latency_sum_us: u64,
    received: u64,
    cpu_ticks: u64,
    echo_ticks: u64,
    self_ticks: u64,
    /// nats-server's pid and CPU ticks (a restarted server starts from 0).
    nats: Option<(u32, u64)>,
}

pub fn totals(stats: &Stats, pids: &Pids) -> Totals {
    Totals {
        sent: stats.sent.load(Ordering::Relaxed),
        replies: stats.replies.load(Ordering::Relaxed),
        errors: stats.errors_total(),
        latency_sum_us: stats.latency_sum_us.load(Ordering::Relaxed),
        received: stats.received.load(Ordering::Relaxed),
        cpu_ticks: cpu_ticks(pids.gateway).unwrap_or(0),
        echo_ticks: cpu_ticks(pids.echo).unwrap_or(0),
        self_ticks: cpu_ticks(std::process::id()).unwrap_or(0),
        nats: pids.nats.and_then(|pid| Some((pid, cpu_ticks(pid)?))),
    }
}

/// The processes whose CPU use is sampled.
pub struct Pids {
    pub gateway: u32,
    pub echo: u32,
    pub nats: Option<u32>,
}

/// Takes samples: where to look.
pub struct Probe {
    pub gateway_pid: u32,
    pub stats: Arc<Stats>,
    pub gateway_http: u16,
    pub nats_monitor: u16,
    pub clk_tck: f64,
}

impl Probe {
    pub fn sample(
        &self,
        t: f64,
        phase: &'static str,
        nats_up: bool,
        previous: (f64, Totals),
        now: Totals,
    ) -> Option<Sample> {
        // /proc first, so the HTTP scrape's own socket is not counted.
        let (rss_kb, threads) = proc_status(self.gateway_pid)?;
        let fds = fd_count(self.gateway_pid)?;
        let metrics = http_get(self.gateway_http, "/metrics").map(|(_, body)| body);
        let metric = |name: &str| metrics.as_deref().and_then(|m| metric_sum(m, name));
        let nats_server_connections = if nats_up {
            http_get(self.nats_monitor, "/varz")
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .and_then(|v| v.get("connections").and_then(Value::as_u64))
        } else {
            None
        };
        let dt = (t - previous.0).max(1e-3);
        let before = previous.1;
        let replies = now.replies - before.replies;
        let pct = |after: u64, before: u64| {
            after.saturating_sub(before) as f64 / self.clk_tck / dt * 100.0
        };
        let direct = self.stats.direct_probe_us.load(Ordering::Relaxed);
        Some(Sample {
            t,
            phase,
            rss_kb,
            fds,
            threads,
            gw_cpu_pct: pct(now.cpu_ticks, before.cpu_ticks),
            echo_cpu_pct: pct(now.echo_ticks, before.echo_ticks),
            self_cpu_pct: pct(now.self_ticks, before.self_ticks),
            nats_cpu_pct: match (now.nats, before.nats) {
                (Some((pid, after)), Some((old, before))) if pid == old => Some(pct(after, before)),
                _ => None,
            },
            direct_ms: (direct != u64::MAX).then(|| direct as f64 / 1e3),
            connections: metric("ipc_gateway_connections"),
            inflight: metric("ipc_gateway_inflight_requests"),
            nats_connected: metric("ipc_gateway_nats_connected"),
            nats_server_connections,
            sent: now.sent - before.sent,
            replies,
            errors: now.errors - before.errors,
            req_per_s: replies as f64 / dt,
            avg_latency_ms: (replies > 0).then(|| {
                (now.latency_sum_us - before.latency_sum_us) as f64 / replies as f64 / 1e3
            }),
            sub_messages: now.received - before.received,
        })
    }
}

/// "-" or the value without decimals.
pub fn opt(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

pub fn print_sample(s: &Sample) {
    eprintln!(
        "t={:>7.1}s {:<10} rss {:>7} KiB  fds {:>3}  thr {:>2}  conns {:>3}  inflight {:>4}  nats {:>2}  {:>6.0} req/s  avg {:>6}  err {:>5}  sub {:>4}  direct {:>6}  cpu gw {:>4.1}% echo {:>4.1}% nats {:>4} soak {:>4.1}%",
        s.t,
        s.phase,
        s.rss_kb,
        s.fds,
        s.threads,
        opt(s.connections),
        opt(s.inflight),
        opt(s.nats_connected),
        s.req_per_s,
        s.avg_latency_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
        s.errors,
        s.sub_messages,
        s.direct_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
        s.gw_cpu_pct,
        s.echo_cpu_pct,
        s.nats_cpu_pct.map_or("-".into(), |v| format!("{v:.1}%")),
        s.self_cpu_pct,
    );
}

/// What the run is doing at `t`: the phase a sample is labelled with.
pub fn phase_at(
    t: f64,
    settings: &Settings,
    stats: &Stats,
    nats_down: bool,
    restarts_so_far: usize,
) -> &'static str {
    if nats_down {
        return "nats-down";
    }
    let t_ms = (t * 1e3) as u64;
    let watched = stats.restart_ms.iter().zip(&stats.recovered_ms);
    for (restart, recovered) in watched.take(restarts_so_far) {
        let restart = restart.load(Ordering::Relaxed);
        let recovered = recovered.load(Ordering::Relaxed);
        if t_ms >= restart
            && (recovered == u64::MAX || t_ms < recovered + (settings.sample * 1e3) as u64 + 1000)
        {
            return "recovering";
        }
    }
    if t < settings.warmup {
        "warm-up"
    } else {
        "steady"
    }
}
