//! The soak's report: what the run saw (run.rs) and counted (stats.rs), judged against the
//! aims (memory growth, flat FDs, every request answered), per NATS restart, and with the run's
//! metadata, in one structure that is written as `latest.json` and rendered as Markdown
//! (markdown.rs) from the same values.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, Serializer};

use crate::common::{GatewayBinary, RunMeta};
use crate::run::Outcome;
use crate::samples::Sample;
use crate::settings::Settings;
use crate::stats::{CATEGORIES, Stats, category_name};
use crate::{DISRUPTION_TAIL_MS, END_GRACE, MAX_PAYLOAD, MIN_PAYLOAD, REQUEST_TIMEOUT, WATCHDOG};

#[derive(Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    #[serde(flatten)]
    pub run: RunMeta,
    pub gateway: Gateway,
    pub echo_service_died: Option<String>,
    pub interrupted: bool,
    pub settings: ReportSettings,
    pub rss_kib: RssKib,
    pub fds: Fds,
    pub after_clients_left: Option<AfterClientsLeft>,
    pub requests: Requests,
    pub subscription: Subscription,
    pub restarts: Vec<RestartReport>,
    pub aims: Aims,
    pub samples: Vec<Sample>,
}

#[derive(Serialize)]
pub struct Gateway {
    #[serde(flatten)]
    pub binary: GatewayBinary,
    pub args: String,
    pub exit_at_sigterm: String,
    pub died_during_run: Option<String>,
    pub log_bytes: u64,
    pub log_warn_lines: u64,
    pub log_error_lines: u64,
}

#[derive(Serialize)]
pub struct ReportSettings {
    pub seconds: f64,
    pub load_seconds_run: f64,
    pub warmup_seconds: f64,
    pub sample_seconds: f64,
    pub connections: usize,
    pub tasks_per_connection: usize,
    pub target_req_per_s: f64,
    pub pause_ms: f64,
    pub payload_bytes: [usize; 2],
    pub request_timeout_ms: u64,
    pub watchdog_ms: u64,
    pub publish_rate: f64,
    pub restarts: usize,
    pub kill_at_seconds: Vec<f64>,
    pub outage_seconds: f64,
}

/// A moment of the run and the RSS then.
#[derive(Clone, Copy, Serialize)]
pub struct AtKib {
    pub t: f64,
    pub kib: u64,
}

#[derive(Serialize)]
pub struct RssKib {
    pub start_idle: u64,
    pub after_warmup: Option<AtKib>,
    pub end: Option<AtKib>,
    pub max_after_warmup: Option<u64>,
    pub idle_after_clients_left: Option<u64>,
    pub growth_after_warmup_pct: Option<f64>,
    /// Mean RSS of the last minute of steady samples against the first minute after warm-up.
    pub growth_mean_last_vs_first_minute_pct: Option<f64>,
    pub slope_kib_per_hour: Option<f64>,
}

#[derive(Serialize)]
pub struct Fds {
    pub start_idle: u64,
    /// The first sample after the warm-up cut, whatever its phase.
    pub after_warmup: Option<u64>,
    /// The last sample under load.
    pub end: Option<u64>,
    pub after_warmup_steady: Option<u64>,
    pub end_steady: Option<u64>,
    pub range_steady_after_warmup: Option<[u64; 2]>,
    pub range_all_after_warmup: Option<[u64; 2]>,
    pub idle_after_clients_left: Option<u64>,
    pub kinds_idle_before: Vec<FdKind>,
    pub kinds_idle_after: Option<Vec<FdKind>>,
}

#[derive(Serialize)]
pub struct FdKind {
    pub kind: String,
    pub count: u64,
}

#[derive(Serialize)]
pub struct AfterClientsLeft {
    pub connections: Option<f64>,
    pub inflight_requests: Option<f64>,
}

#[derive(Serialize)]
pub struct Requests {
    pub sent: u64,
    pub replies: u64,
    pub wrong_replies: u64,
    pub errors: u64,
    pub errors_by_code: Codes,
    pub errors_outside_disruptions: Codes,
    pub no_answer: u64,
    pub abandoned_tasks: usize,
    pub sent_equals_answered: bool,
    pub avg_req_per_s: f64,
    pub latency_us: Latency,
    pub client_reconnects: u64,
    pub client_reconnect_failures: u64,
}

/// Reply latency of successful requests (histogram upper bounds).
#[derive(Serialize)]
pub struct Latency {
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub p999: Option<u64>,
    pub max: u64,
}

#[derive(Serialize)]
pub struct Subscription {
    pub published: u64,
    pub publish_failed: u64,
    pub received: u64,
    pub missing: u64,
    pub missing_outside_disruptions: u64,
    pub duplicates_or_out_of_order: u64,
    pub dropped_notices: u64,
    pub dropped_messages: u64,
    pub resubscribes: u64,
}

/// One NATS restart: times in seconds since the load started.
#[derive(Serialize)]
pub struct RestartReport {
    pub kill_at_s: f64,
    pub restart_at_s: Option<f64>,
    pub first_unavailable_at_s: Option<f64>,
    pub nats_listening_at_s: Option<f64>,
    pub gateway_ready_at_s: Option<f64>,
    pub echo_service_reconnected_at_s: Option<f64>,
    pub gateway_pool_reconnected_at_s: Option<f64>,
    pub direct_nats_echo_ok_again_at_s: Option<f64>,
    /// The first successful reply to a request sent after the restart.
    pub requests_ok_again_at_s: Option<f64>,
    pub requests_ok_after_restart_s: Option<f64>,
    pub subscription_delivers_again_at_s: Option<f64>,
    /// The last error of any kind before the next kill (or the end).
    pub last_error_at_s: Option<f64>,
    /// The first and last CIRCUIT_OPEN answer.
    pub circuit_open_first_last_at_s: Option<[f64; 2]>,
    /// Errors from the kill until DISRUPTION_TAIL_MS after requests succeeded again.
    pub errors_in_disruption: Codes,
    pub messages_missed: u64,
}

#[derive(Serialize)]
pub struct Aims {
    pub rss_growth_under_5_pct: bool,
    pub fd_flat: bool,
    pub every_request_answered: bool,
}

/// Error counts by category, in category order; in JSON a map of the non-zero ones.
pub struct Codes(pub Vec<u64>);

impl Codes {
    /// `NAME count, NAME count`, or `none`.
    pub fn text(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| format!("{} {n}", category_name(c)))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

impl Serialize for Codes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (category_name(c), n)),
        )
    }
}

impl Report {
    pub fn build(run: RunMeta, outcome: Outcome, settings: &Settings, stats: &Stats) -> Report {
        let (restarts, steady_errors, steady_missing) = restart_reports(&outcome, stats);
        let (rss_kib, fds, aims) = memory_and_fds(&outcome, settings, stats);
        let gateway = Gateway {
            binary: run.gateway.clone(),
            args: outcome.gateway_args.clone(),
            exit_at_sigterm: outcome.gateway_exit.clone(),
            died_during_run: outcome.gateway_died.clone(),
            log_bytes: outcome.gateway_log.bytes,
            log_warn_lines: outcome.gateway_log.warn_lines,
            log_error_lines: outcome.gateway_log.error_lines,
        };
        Report {
            benchmark: "ipc-gateway soak test",
            run,
            gateway,
            echo_service_died: outcome.echo_died.clone(),
            interrupted: outcome.interrupted,
            settings: report_settings(settings, outcome.load_seconds),
            rss_kib,
            fds,
            after_clients_left: outcome.idle_after.as_ref().map(|i| AfterClientsLeft {
                connections: i.connections,
                inflight_requests: i.inflight,
            }),
            requests: requests(&outcome, stats, steady_errors),
            subscription: subscription(stats, steady_missing),
            restarts,
            aims,
            samples: outcome.samples,
        }
    }
}

fn report_settings(settings: &Settings, load_seconds: f64) -> ReportSettings {
    ReportSettings {
        seconds: settings.seconds,
        load_seconds_run: load_seconds,
        warmup_seconds: settings.warmup,
        sample_seconds: settings.sample,
        connections: settings.connections,
        tasks_per_connection: settings.inflight,
        target_req_per_s: settings.rate,
        pause_ms: settings.pause.as_secs_f64() * 1e3,
        payload_bytes: [MIN_PAYLOAD, MAX_PAYLOAD],
        request_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
        watchdog_ms: WATCHDOG.as_millis() as u64,
        publish_rate: settings.publish_rate,
        restarts: settings.restarts,
        kill_at_seconds: settings.kill_times(),
        outage_seconds: settings.outage,
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn requests(outcome: &Outcome, stats: &Stats, steady_errors: Vec<u64>) -> Requests {
    let sent = load(&stats.sent);
    let replies = load(&stats.replies);
    let errors = stats.errors_total();
    Requests {
        sent,
        replies,
        wrong_replies: load(&stats.wrong_replies),
        errors,
        errors_by_code: Codes(stats.error_counts()),
        errors_outside_disruptions: Codes(steady_errors),
        no_answer: load(&stats.no_answer),
        abandoned_tasks: outcome.abandoned,
        sent_equals_answered: sent == replies + errors,
        avg_req_per_s: replies as f64 / outcome.load_seconds.max(1e-3),
        latency_us: Latency {
            p50: stats.quantile_us(0.5),
            p99: stats.quantile_us(0.99),
            p999: stats.quantile_us(0.999),
            max: load(&stats.latency_max_us),
        },
        client_reconnects: load(&stats.reconnects),
        client_reconnect_failures: load(&stats.reconnect_failures),
    }
}

fn subscription(stats: &Stats, steady_missing: u64) -> Subscription {
    Subscription {
        published: load(&stats.published),
        publish_failed: load(&stats.publish_failed),
        received: load(&stats.received),
        missing: load(&stats.missing),
        missing_outside_disruptions: steady_missing,
        duplicates_or_out_of_order: load(&stats.duplicates),
        dropped_notices: load(&stats.dropped_notices),
        dropped_messages: load(&stats.dropped_messages),
        resubscribes: load(&stats.resubscribes),
    }
}

/// The memory and FD figures, and the three aims.
fn memory_and_fds(outcome: &Outcome, settings: &Settings, stats: &Stats) -> (RssKib, Fds, Aims) {
    let after: Vec<&Sample> = outcome
        .samples
        .iter()
        .filter(|s| s.t >= settings.warmup)
        .collect();
    let steady: Vec<&Sample> = after
        .iter()
        .copied()
        .filter(|s| s.phase == "steady")
        .collect();
    let first = after.first().map(|s| AtKib {
        t: s.t,
        kib: s.rss_kb,
    });
    let last = after.last().map(|s| AtKib {
        t: s.t,
        kib: s.rss_kb,
    });
    let growth_pct = match (first, last) {
        (Some(a), Some(b)) if a.kib > 0 => {
            Some((b.kib as f64 - a.kib as f64) / a.kib as f64 * 100.0)
        }
        _ => None,
    };
    let range = |s: &[&Sample]| {
        let min = s.iter().map(|x| x.fds).min()?;
        let max = s.iter().map(|x| x.fds).max()?;
        Some([min, max])
    };
    let fd_range_steady = range(&steady);
    let fd_after_warmup = steady.first().map(|s| s.fds);
    let fd_end = steady.last().map(|s| s.fds);
    let fd_met = match (fd_range_steady, fd_after_warmup, fd_end) {
        (Some([min, max]), Some(a), Some(b)) => max - min <= 2 && b <= a + 2,
        _ => false,
    };
    let sent = load(&stats.sent);
    let answered = load(&stats.replies) + stats.errors_total();
    let idle_after = outcome.idle_after.as_ref();
    let kinds = |kinds: &[(String, u64)]| {
        kinds
            .iter()
            .map(|(kind, count)| FdKind {
                kind: kind.clone(),
                count: *count,
            })
            .collect::<Vec<_>>()
    };
    let rss_kib = RssKib {
        start_idle: outcome.idle_before.0,
        after_warmup: first,
        end: last,
        max_after_warmup: after.iter().map(|s| s.rss_kb).max(),
        idle_after_clients_left: idle_after.map(|i| i.rss_kb),
        growth_after_warmup_pct: growth_pct,
        growth_mean_last_vs_first_minute_pct: growth_mean_pct(&steady, settings),
        slope_kib_per_hour: rss_slope(&steady),
    };
    let fds = Fds {
        start_idle: outcome.idle_before.1,
        after_warmup: after.first().map(|s| s.fds),
        end: outcome.samples.last().map(|s| s.fds),
        after_warmup_steady: fd_after_warmup,
        end_steady: fd_end,
        range_steady_after_warmup: fd_range_steady,
        range_all_after_warmup: range(&after),
        idle_after_clients_left: idle_after.map(|i| i.fds),
        kinds_idle_before: kinds(&outcome.idle_fd_kinds),
        kinds_idle_after: idle_after.map(|i| kinds(&i.fd_kinds)),
    };
    let aims = Aims {
        rss_growth_under_5_pct: growth_pct.is_some_and(|g| g < 5.0),
        fd_flat: fd_met,
        every_request_answered: sent == answered && load(&stats.no_answer) == 0,
    };
    (rss_kib, fds, aims)
}

/// Mean RSS of the last minute of steady samples against the first minute, in percent.
fn growth_mean_pct(steady: &[&Sample], settings: &Settings) -> Option<f64> {
    let minute = (60.0 / settings.sample).ceil().max(1.0) as usize;
    if steady.len() < 2 * minute {
        return None;
    }
    let mean = |s: &[&Sample]| s.iter().map(|x| x.rss_kb as f64).sum::<f64>() / s.len() as f64;
    let a = mean(&steady[..minute]);
    let b = mean(&steady[steady.len() - minute..]);
    Some((b - a) / a * 100.0)
}

/// Least-squares slope of RSS over the steady samples, KiB per hour.
fn rss_slope(steady: &[&Sample]) -> Option<f64> {
    (steady.len() >= 3).then(|| {
        let n = steady.len() as f64;
        let mx = steady.iter().map(|s| s.t).sum::<f64>() / n;
        let my = steady.iter().map(|s| s.rss_kb as f64).sum::<f64>() / n;
        let sxy: f64 = steady
            .iter()
            .map(|s| (s.t - mx) * (s.rss_kb as f64 - my))
            .sum();
        let sxx: f64 = steady.iter().map(|s| (s.t - mx).powi(2)).sum();
        if sxx > 0.0 { sxy / sxx * 3600.0 } else { 0.0 }
    })
}

fn secs(ms: u64) -> Option<f64> {
    (ms != u64::MAX).then_some(ms as f64 / 1e3)
}

/// One report per restart; the errors outside every disruption window, by category; and the
/// subscription messages missed outside them.
fn restart_reports(outcome: &Outcome, stats: &Stats) -> (Vec<RestartReport>, Vec<u64>, u64) {
    let end_ms = (outcome.load_seconds * 1e3) as u64 + END_GRACE.as_millis() as u64;
    let gaps = stats
        .gap_events
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut reports = Vec::new();
    let mut disrupted: Vec<(u64, u64)> = Vec::new();
    for (index, restart) in outcome.restarts.iter().enumerate() {
        let kill_ms = (restart.kill_s * 1e3) as u64;
        let segment_end = outcome
            .restarts
            .get(index + 1)
            // Up to the second before the one in which the next kill happened.
            .map_or(end_ms, |next| {
                ((next.kill_s as u64) * 1000).saturating_sub(1)
            });
        let window_end = |recovered: u64| {
            if recovered == u64::MAX {
                segment_end
            } else {
                (recovered + DISRUPTION_TAIL_MS).min(segment_end)
            }
        };
        let recovered = load(&stats.recovered_ms[index]);
        let sub_recovered = load(&stats.sub_recovered_ms[index]);
        let (requests_end, sub_end) = (window_end(recovered), window_end(sub_recovered));
        disrupted.push((kill_ms, requests_end));
        let at = |slots: &[AtomicU64]| secs(load(&slots[index]));
        let after_zero = |slots: &[AtomicU64]| {
            Some(load(&slots[index]))
                .filter(|ms| *ms > 0)
                .map(|ms| ms as f64 / 1e3)
        };
        reports.push(RestartReport {
            kill_at_s: restart.kill_s,
            restart_at_s: restart.restart_s,
            first_unavailable_at_s: at(&stats.first_unavailable_ms),
            nats_listening_at_s: restart.nats_listening_s,
            gateway_ready_at_s: restart.gateway_ready_s,
            echo_service_reconnected_at_s: restart.echo_connected_s,
            gateway_pool_reconnected_at_s: restart.gateway_connected_s,
            direct_nats_echo_ok_again_at_s: at(&stats.direct_recovered_ms),
            requests_ok_again_at_s: secs(recovered),
            requests_ok_after_restart_s: secs(recovered).zip(restart.restart_s).map(|(a, b)| a - b),
            subscription_delivers_again_at_s: secs(sub_recovered),
            last_error_at_s: after_zero(&stats.last_error_ms),
            circuit_open_first_last_at_s: at(&stats.first_circuit_open_ms)
                .zip(after_zero(&stats.last_circuit_open_ms))
                .map(|(a, b)| [a, b]),
            errors_in_disruption: Codes(stats.errors_in(kill_ms, requests_end)),
            messages_missed: gaps
                .iter()
                .filter(|(t, _)| *t >= kill_ms && *t <= sub_end)
                .map(|(_, n)| n)
                .sum(),
        });
    }
    let steady_errors = errors_outside(stats, &disrupted);
    let steady_missing: u64 = gaps
        .iter()
        .filter(|(t, _)| {
            !reports.iter().any(|r| {
                let from = (r.kill_at_s * 1e3) as u64;
                let to = r
                    .subscription_delivers_again_at_s
                    .map_or(u64::MAX, |s| (s * 1e3) as u64 + DISRUPTION_TAIL_MS);
                *t >= from && *t <= to
            })
        })
        .map(|(_, n)| n)
        .sum();
    (reports, steady_errors, steady_missing)
}

/// Errors outside every disruption window, by category.
fn errors_outside(stats: &Stats, disrupted: &[(u64, u64)]) -> Vec<u64> {
    let mut in_windows = vec![0u64; CATEGORIES];
    for &(from, to) in disrupted {
        for (c, n) in stats.errors_in(from, to).into_iter().enumerate() {
            in_windows[c] += n;
        }
    }
    stats
        .error_counts()
        .iter()
        .zip(&in_windows)
        .map(|(all, windows)| all.saturating_sub(*windows))
        .collect()
}
