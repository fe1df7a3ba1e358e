//! Samples of the gateway under load, one every SOAK_SAMPLE_SECONDS: its memory, FDs and
//! threads (/proc), its /metrics gauges, nats-server's connection count, the interval's
//! request rate (in all and per front-end) and latency, the feeds' deliveries, gaps and drops,
//! the audit records read, and the CPU use of every process. Each is printed as it is taken
//! and kept for the report (`Sample` is also how it appears in the JSON and the series CSV).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::Value;

use crate::common::{
    cpu_ticks, fd_count, http_get, metric_sum, proc_status, round1, round1_opt, round3_opt,
};
use crate::settings::Settings;
use crate::stats::{FEED_UDS, Feed, Stats};

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
    /// Replies per second on each front-end (`FRONTS` order: uds, ws, grpc).
    pub req_per_s_by_front: [f64; 3],
    /// Messages delivered in the interval on the Unix-socket subscription (kept under its old
    /// name), and on each feed (`FEEDS` order: uds, ws, grpc; ws summed over its subscribers).
    pub sub_messages: u64,
    pub feed_messages: [u64; 3],
    /// Over all feeds, in the interval: messages missing (sequence gaps) and messages a
    /// `dropped` notice counted.
    pub sub_missing: u64,
    pub dropped: u64,
    /// Audit records the soak read in the interval.
    pub audit_records: u64,
}

/// Counters at one moment; a sample is the difference of two.
#[derive(Default, Clone, Copy)]
pub struct Totals {
    sent: u64,
    replies: u64,
    errors: u64,
    latency_sum_us: u64,
    received: u64,
    by_front: [u64; 3],
    by_feed: [u64; 3],
    missing: u64,
    dropped: u64,
    audit_records: u64,
    cpu_ticks: u64,
    echo_ticks: u64,
    self_ticks: u64,
    /// nats-server's pid and CPU ticks (a restarted server starts from 0).
    nats: Option<(u32, u64)>,
}

pub fn totals(stats: &Stats, pids: &Pids, audit_records: u64) -> Totals {
    let feeds = &stats.feeds;
    let sum = |f: fn(&Feed) -> &AtomicU64| feeds.iter().map(|x| f(x).load(Ordering::Relaxed)).sum();
    Totals {
        by_front: std::array::from_fn(|i| stats.fronts[i].replies.load(Ordering::Relaxed)),
        by_feed: std::array::from_fn(|i| feeds[i].received.load(Ordering::Relaxed)),
        missing: sum(|f| &f.missing),
        dropped: sum(|f| &f.dropped_messages),
        audit_records,
        sent: stats.sent.load(Ordering::Relaxed),
        replies: stats.replies.load(Ordering::Relaxed),
        errors: stats.errors_total(),
        latency_sum_us: stats.latency_sum_us.load(Ordering::Relaxed),
        received: feeds[FEED_UDS].received.load(Ordering::Relaxed),
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
            req_per_s_by_front: std::array::from_fn(|i| {
                now.by_front[i].saturating_sub(before.by_front[i]) as f64 / dt
            }),
            sub_messages: now.received - before.received,
            feed_messages: std::array::from_fn(|i| {
                now.by_feed[i].saturating_sub(before.by_feed[i])
            }),
            sub_missing: now.missing.saturating_sub(before.missing),
            dropped: now.dropped.saturating_sub(before.dropped),
            audit_records: now.audit_records.saturating_sub(before.audit_records),
        })
    }
}

/// "-" or the value without decimals.
pub fn opt(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

pub fn print_sample(s: &Sample) {
    eprintln!(
        "t={:>7.1}s {:<10} rss {:>7} KiB  fds {:>3}  thr {:>2}  conns {:>3}  inflight {:>4}  nats {:>2}  {:>6.0} req/s (uds {:.0} ws {:.0} grpc {:.0})  avg {:>6}  err {:>5}  sub {:>4}/{}/{} miss {} drop {}  audit {}  direct {:>6}  cpu gw {:>4.1}% echo {:>4.1}% nats {:>4} soak {:>4.1}%",
        s.t,
        s.phase,
        s.rss_kb,
        s.fds,
        s.threads,
        opt(s.connections),
        opt(s.inflight),
        opt(s.nats_connected),
        s.req_per_s,
        s.req_per_s_by_front[0],
        s.req_per_s_by_front[1],
        s.req_per_s_by_front[2],
        s.avg_latency_ms.map_or("-".into(), |v| format!("{v:.2}ms")),
        s.errors,
        s.feed_messages[0],
        s.feed_messages[1],
        s.feed_messages[2],
        s.sub_missing,
        s.dropped,
        s.audit_records,
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
