//! The soak's report: what the run saw (run.rs) and counted (stats.rs, audit.rs), judged
//! against the five aims decided before the run (every request answered exactly once, no
//! unannounced subscription gap outside the outages, RSS flat over the last hour, FDs flat,
//! audit records equal to operations), per front-end, per feed, per NATS restart and per policy
//! reload, with the run's metadata, in one structure that is written as JSON and rendered as
//! Markdown (markdown.rs) from the same values. The audit comparison is in audit_report.rs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, Serializer};

use crate::audit_report::AuditReport;
use crate::common::{GatewayBinary, RunMeta};
use crate::policy::Reload;
use crate::run::Outcome;
use crate::samples::Sample;
use crate::settings::Settings;
use crate::stats::{CATEGORIES, FEEDS, FRONTS, GapEvent, Stats, category_name};
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
    pub feeds: Vec<FeedReport>,
    pub restarts: Vec<RestartReport>,
    pub reloads: Vec<Reload>,
    pub audit: AuditReport,
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
    pub restart_every_seconds: f64,
    pub kill_at_seconds: Vec<f64>,
    pub outage_seconds: f64,
    pub reload_every_seconds: f64,
    pub reload_at_seconds: Vec<f64>,
    pub ws_subscribers: usize,
    pub ws_publish_rate: f64,
    pub ws_connections: usize,
    pub ws_tasks_per_connection: usize,
    pub ws_target_req_per_s: f64,
    pub grpc_tasks: usize,
    pub grpc_target_req_per_s: f64,
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
    /// The window aim 3 judges: the last hour when the run lasted 2 h or more, else its last
    /// third; steady samples only.
    pub flat_window: FlatWindow,
}

#[derive(Serialize)]
pub struct FlatWindow {
    pub from_s: f64,
    pub to_s: f64,
    pub samples: usize,
    pub mean_kib: Option<f64>,
    pub min_kib: Option<u64>,
    pub max_kib: Option<u64>,
    pub slope_kib_per_hour: Option<f64>,
    /// The least-squares trend's change across the window, in % of the window's mean.
    pub trend_change_pct: Option<f64>,
    pub max_over_min_pct: Option<f64>,
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
    pub by_frontend: Vec<FrontReport>,
}

#[derive(Serialize)]
pub struct FrontReport {
    pub frontend: &'static str,
    pub sent: u64,
    pub replies: u64,
    pub errors: u64,
    pub wrong_replies: u64,
    pub no_answer: u64,
    pub stray_answers: u64,
    pub reconnects: u64,
    pub answered_exactly_once: bool,
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
pub struct FeedReport {
    pub feed: &'static str,
    pub subscribers: u64,
    pub published: u64,
    pub publish_failed: u64,
    /// Deliveries, summed over the feed's subscribers.
    pub received: u64,
    pub missing: u64,
    pub missing_announced: u64,
    pub missing_outside_outages: u64,
    pub missing_outside_outages_unannounced: u64,
    pub duplicates_or_out_of_order: u64,
    pub dropped_notices: u64,
    pub dropped_messages: u64,
    pub gap_flags: u64,
    pub resubscribes: u64,
}

/// One NATS restart: times in seconds since the load started.
#[derive(Serialize)]
pub struct RestartReport {
    pub kill_at_s: f64,
    /// The gateway's RSS in the last sample before the kill: the level a leak would raise from
    /// one restart to the next (a restart itself frees buffers that then grow back).
    pub rss_kib_before_kill: Option<u64>,
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
    /// Each feed's first delivery after the restart (`FEEDS` order).
    pub feeds_deliver_again_at_s: Vec<Option<f64>>,
    /// The last error of any kind before the next kill (or the end).
    pub last_error_at_s: Option<f64>,
    /// The first and last CIRCUIT_OPEN answer.
    pub circuit_open_first_last_at_s: Option<[f64; 2]>,
    /// Errors from the kill until DISRUPTION_TAIL_MS after requests succeeded again.
    pub errors_in_disruption: Codes,
    /// The outage window the subscription aim leaves out: from the kill to DISRUPTION_TAIL
    /// after requests and every feed delivered again (at most to the next kill).
    pub outage_window_s: [f64; 2],
    /// Messages missed in the window, per feed.
    pub messages_missed: Vec<u64>,
}

#[derive(Serialize)]
pub struct Aims {
    /// 1. Every request on every front-end answered exactly once.
    pub every_request_answered_once: bool,
    /// 2. No subscription gap outside the outage windows unless a `dropped` notice announced it.
    pub no_unannounced_gap_outside_outages: bool,
    /// 3. RSS flat within 5 % over the last hour (see `FlatWindow`).
    pub rss_flat_last_hour: bool,
    /// 4. FDs flat after warm-up and back to idle after the clients left.
    pub fd_flat: bool,
    /// 5. Audit records equal to operations, by op, front-end and outcome; none lost.
    pub audit_equals_operations: bool,
    /// Besides: every policy reload seen by the gateway, successful, and the policy enforced.
    pub every_reload_checked: bool,
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
        let (restarts, steady_errors, windows) = restart_reports(&outcome, stats);
        let (rss_kib, fds) = memory_and_fds(&outcome, settings);
        let requests = requests(&outcome, stats, steady_errors);
        let feeds = feeds(stats, &windows);
        let audit = AuditReport::build(&outcome.audit, stats, outcome.reloads.len());
        let aims = Aims {
            every_request_answered_once: outcome.abandoned == 0
                && requests.by_frontend.iter().all(|f| f.answered_exactly_once),
            no_unannounced_gap_outside_outages: feeds
                .iter()
                .all(|f| f.missing_outside_outages_unannounced == 0 && f.received > 0),
            rss_flat_last_hour: rss_kib
                .flat_window
                .trend_change_pct
                .is_some_and(|pct| pct.abs() < 5.0),
            fd_flat: fd_flat(&fds),
            audit_equals_operations: audit.matches(),
            every_reload_checked: outcome.reloads.len() == settings.reload_times().len()
                && outcome.reloads.iter().all(|r| r.ok),
        };
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
            requests,
            feeds,
            restarts,
            reloads: outcome.reloads.clone(),
            audit,
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
        restart_every_seconds: settings.restart_every,
        kill_at_seconds: settings.kill_times(),
        outage_seconds: settings.outage,
        reload_every_seconds: settings.reload_every,
        reload_at_seconds: settings.reload_times(),
        ws_subscribers: settings.ws_subscribers,
        ws_publish_rate: settings.ws_publish_rate,
        ws_connections: settings.ws_connections,
        ws_tasks_per_connection: settings.ws_inflight(),
        ws_target_req_per_s: settings.ws_rate,
        grpc_tasks: settings.grpc_tasks,
        grpc_target_req_per_s: settings.grpc_rate,
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
        by_frontend: FRONTS
            .iter()
            .zip(&stats.fronts)
            .map(|(front, c)| {
                let (sent, replies, errors) = (load(&c.sent), load(&c.replies), load(&c.errors));
                let (wrong, no_answer, stray) = (
                    load(&c.wrong_replies),
                    load(&c.no_answer),
                    load(&c.stray_answers),
                );
                FrontReport {
                    frontend: front.as_str(),
                    sent,
                    replies,
                    errors,
                    wrong_replies: wrong,
                    no_answer,
                    stray_answers: stray,
                    reconnects: load(&c.reconnects),
                    answered_exactly_once: sent > 0
                        && sent == replies + errors
                        && wrong == 0
                        && no_answer == 0
                        && stray == 0,
                }
            })
            .collect(),
    }
}

/// Whether a moment (ms since t0) lies in one of the outage windows.
fn in_outage(windows: &[(u64, u64)], at_ms: u64) -> bool {
    windows
        .iter()
        .any(|(from, to)| at_ms >= *from && at_ms <= *to)
}

fn feeds(stats: &Stats, windows: &[(u64, u64)]) -> Vec<FeedReport> {
    FEEDS
        .iter()
        .zip(&stats.feeds)
        .map(|(name, f)| {
            let gaps: Vec<GapEvent> = f
                .gap_events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .filter(|g| !in_outage(windows, g.at_ms))
                .collect();
            FeedReport {
                feed: name,
                subscribers: load(&f.subscribers),
                published: load(&f.published),
                publish_failed: load(&f.publish_failed),
                received: load(&f.received),
                missing: load(&f.missing),
                missing_announced: load(&f.missing_announced),
                missing_outside_outages: gaps.iter().map(|g| g.missing).sum(),
                missing_outside_outages_unannounced: gaps
                    .iter()
                    .filter(|g| !g.announced)
                    .map(|g| g.missing)
                    .sum(),
                duplicates_or_out_of_order: load(&f.duplicates),
                dropped_notices: load(&f.dropped_notices),
                dropped_messages: load(&f.dropped_messages),
                gap_flags: load(&f.gap_flags),
                resubscribes: load(&f.resubscribes),
            }
        })
        .collect()
}

/// The memory and FD figures.
fn memory_and_fds(outcome: &Outcome, settings: &Settings) -> (RssKib, Fds) {
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
        flat_window: flat_window(&steady, settings, outcome.load_seconds),
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
    (rss_kib, fds)
}

/// Aim 4: steady samples after warm-up within 2 FDs of each other, the end no more than 2
/// above the start, and the idle gateway after the clients left within 2 of the idle gateway
/// before the load.
fn fd_flat(fds: &Fds) -> bool {
    let steady = match (
        fds.range_steady_after_warmup,
        fds.after_warmup_steady,
        fds.end_steady,
    ) {
        (Some([min, max]), Some(a), Some(b)) => max - min <= 2 && b <= a + 2,
        _ => false,
    };
    steady
        && fds
            .idle_after_clients_left
            .is_some_and(|idle| idle <= fds.start_idle + 2)
}

/// Aim 3's window: the last hour of a run of 2 h or more, else the last third of the load.
fn flat_window(steady: &[&Sample], settings: &Settings, load_seconds: f64) -> FlatWindow {
    let to_s = load_seconds;
    let span = if settings.seconds >= 7200.0 {
        3600.0
    } else {
        load_seconds / 3.0
    };
    let from_s = (to_s - span).max(settings.warmup);
    let window: Vec<&Sample> = steady.iter().copied().filter(|s| s.t >= from_s).collect();
    let mean = (!window.is_empty())
        .then(|| window.iter().map(|s| s.rss_kb as f64).sum::<f64>() / window.len() as f64);
    let min = window.iter().map(|s| s.rss_kb).min();
    let max = window.iter().map(|s| s.rss_kb).max();
    let slope = rss_slope(&window);
    FlatWindow {
        from_s,
        to_s,
        samples: window.len(),
        mean_kib: mean,
        min_kib: min,
        max_kib: max,
        slope_kib_per_hour: slope,
        trend_change_pct: slope
            .zip(mean)
            .filter(|_| window.len() >= 10)
            .map(|(slope, mean)| slope * (to_s - from_s) / 3600.0 / mean * 100.0),
        max_over_min_pct: min
            .zip(max)
            .filter(|(min, _)| *min > 0)
            .map(|(min, max)| (max as f64 / min as f64 - 1.0) * 100.0),
    }
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
/// outage windows (ms since t0) the subscription aim leaves out.
#[allow(clippy::type_complexity)]
fn restart_reports(
    outcome: &Outcome,
    stats: &Stats,
) -> (Vec<RestartReport>, Vec<u64>, Vec<(u64, u64)>) {
    let end_ms = (outcome.load_seconds * 1e3) as u64 + END_GRACE.as_millis() as u64;
    let gaps: Vec<Vec<GapEvent>> = stats
        .feeds
        .iter()
        .map(|f| {
            f.gap_events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
        .collect();
    let mut reports = Vec::new();
    let mut disrupted: Vec<(u64, u64)> = Vec::new();
    let mut windows: Vec<(u64, u64)> = Vec::new();
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
        let feeds_recovered: Vec<u64> = stats
            .feeds
            .iter()
            .map(|f| load(&f.recovered_ms[index]))
            .collect();
        // Every feed and the requests: the latest of their recoveries (never = the segment).
        let all_recovered = feeds_recovered.iter().fold(recovered, |a, b| a.max(*b));
        let requests_end = window_end(recovered);
        let outage_end = window_end(all_recovered);
        disrupted.push((kill_ms, requests_end));
        windows.push((kill_ms, outage_end));
        let at = |slots: &[AtomicU64]| secs(load(&slots[index]));
        let after_zero = |slots: &[AtomicU64]| {
            Some(load(&slots[index]))
                .filter(|ms| *ms > 0)
                .map(|ms| ms as f64 / 1e3)
        };
        reports.push(RestartReport {
            kill_at_s: restart.kill_s,
            rss_kib_before_kill: outcome
                .samples
                .iter()
                .rfind(|s| s.t < restart.kill_s)
                .map(|s| s.rss_kb),
            restart_at_s: restart.restart_s,
            first_unavailable_at_s: at(&stats.first_unavailable_ms),
            nats_listening_at_s: restart.nats_listening_s,
            gateway_ready_at_s: restart.gateway_ready_s,
            echo_service_reconnected_at_s: restart.echo_connected_s,
            gateway_pool_reconnected_at_s: restart.gateway_connected_s,
            direct_nats_echo_ok_again_at_s: at(&stats.direct_recovered_ms),
            requests_ok_again_at_s: secs(recovered),
            requests_ok_after_restart_s: secs(recovered).zip(restart.restart_s).map(|(a, b)| a - b),
            subscription_delivers_again_at_s: secs(feeds_recovered[0]),
            feeds_deliver_again_at_s: feeds_recovered.iter().map(|ms| secs(*ms)).collect(),
            last_error_at_s: after_zero(&stats.last_error_ms),
            circuit_open_first_last_at_s: at(&stats.first_circuit_open_ms)
                .zip(after_zero(&stats.last_circuit_open_ms))
                .map(|(a, b)| [a, b]),
            errors_in_disruption: Codes(stats.errors_in(kill_ms, requests_end)),
            outage_window_s: [kill_ms as f64 / 1e3, outage_end as f64 / 1e3],
            messages_missed: gaps
                .iter()
                .map(|feed| {
                    feed.iter()
                        .filter(|g| g.at_ms >= kill_ms && g.at_ms <= outage_end)
                        .map(|g| g.missing)
                        .sum()
                })
                .collect(),
        });
    }
    let steady_errors = errors_outside(stats, &disrupted);
    (reports, steady_errors, windows)
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
