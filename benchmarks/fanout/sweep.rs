//! The rate sweep (FANOUT_SWEEP): the sustained phase again at rising offered rates, and the
//! highest rate each path keeps up with. The max-rate phase cannot compare capacity: nats-server's
//! own listener holds its publisher back when its subscribers lag, and the gateway's nats-server
//! cannot, so the two paths' publishers load the shared CPUs differently. At a steady offered
//! rate both publishers do the same work.

use std::fmt::Write as _;

use crate::common::fmt_opt;
use crate::markdown::{ms, name};
use crate::report::Report;
use crate::run::Phase;
use crate::settings::Path;

/// Share of the offered rate a path must deliver within the publishing window.
const IN_WINDOW: f64 = 0.99;
/// Highest p99 delivery latency, in µs, of a rate a path keeps up with.
const MAX_P99_US: f64 = 100_000.0;

/// Offered deliveries a second of a sweep step.
fn offered(phase: &Phase) -> f64 {
    phase.target_publish_rate.unwrap_or(0.0) * phase.subscribers as f64
}

/// Whether a path kept up with the step's rate: nearly all of it delivered within the window,
/// everything delivered in the end (nothing dropped, nothing lost), and promptly.
pub fn keeps_up(phase: &Phase) -> bool {
    let offered = offered(phase);
    offered > 0.0
        && phase.deliveries_per_second >= IN_WINDOW * offered
        && phase.delivered == phase.expected
        && phase.dropped_notified == 0
        && phase.latency_us.p99.is_some_and(|p99| p99 <= MAX_P99_US)
}

pub fn render(md: &mut String, report: &Report) {
    if report.cases.iter().all(|case| case.sweep.is_empty()) {
        return;
    }
    let _ = writeln!(md, "\n## Sweep of steady rates (FANOUT_SWEEP)\n");
    let _ = writeln!(
        md,
        "The sustained phase again at each offered rate. A path keeps up with a rate when it delivers at least {IN_WINDOW} × the offered rate within the publishing window, every message in the end (none dropped, none lost) and p99 latency ≤ {} ms.\n",
        MAX_P99_US / 1000.0
    );
    let _ = writeln!(
        md,
        "| K | path | offered deliveries/s | deliveries/s in the window | ÷ offered | delivered / expected | dropped (notices) | silent loss | p50 ms | p99 ms | server CPU µs/delivery | keeps up |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for case in &report.cases {
        for phase in &case.sweep {
            let offered = offered(phase);
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.3} | {} / {} | {} | {} | {} | {} | {} | {} |",
                case.k,
                name(case),
                offered,
                phase.deliveries_per_second,
                phase.deliveries_per_second / offered.max(1.0),
                phase.delivered,
                phase.expected,
                phase.dropped_notified,
                phase
                    .silent_loss
                    .map_or("not known".into(), |n| n.to_string()),
                ms(phase.latency_us.p50),
                ms(phase.latency_us.p99),
                fmt_opt(phase.server_cpu_us_per_delivery, 2),
                if keeps_up(phase) { "yes" } else { "no" },
            );
        }
    }
    summary(md, report);
}

/// Per K, the highest rate each path kept up with, and their ratio.
fn summary(md: &mut String, report: &Report) {
    let _ = writeln!(md, "\n### Highest offered rate kept up with\n");
    let _ = writeln!(
        md,
        "| K | gateway | native nats-server | gateway ÷ native |"
    );
    let _ = writeln!(md, "| ---: | ---: | ---: | ---: |");
    let mut ks: Vec<usize> = report.cases.iter().map(|case| case.k).collect();
    ks.sort_unstable();
    ks.dedup();
    for k in ks {
        let best = |path: Path| {
            report
                .cases
                .iter()
                .filter(|case| case.k == k && case.path == path)
                .flat_map(|case| &case.sweep)
                .filter(|phase| keeps_up(phase))
                .map(offered)
                .fold(None, |best: Option<f64>, rate| {
                    Some(best.map_or(rate, |b| b.max(rate)))
                })
        };
        let (gateway, native) = (best(Path::Gateway), best(Path::Native));
        let ratio = match (gateway, native) {
            (Some(g), Some(n)) if n > 0.0 => format!("{:.2}", g / n),
            _ => "—".into(),
        };
        let rate = |r: Option<f64>| r.map_or("none".into(), |r| format!("{r:.0}"));
        let _ = writeln!(
            md,
            "| {k} | {} | {} | {ratio} |",
            rate(gateway),
            rate(native)
        );
    }
}
