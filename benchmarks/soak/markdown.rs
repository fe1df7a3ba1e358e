//! The soak's report (report.rs) rendered as Markdown: the run's description, the aims, memory
//! and FDs, requests, the subscription, each NATS restart, and the samples. Every number comes
//! from the `Report`, as written to `latest.json`; times relative to a restart are the
//! difference of two times in it.

use std::fmt::Write as _;

use crate::common::fd_kinds_text;
use crate::report::{Report, RestartReport};
use crate::run::LOG_TAIL_BYTES;
use crate::samples::opt;
use crate::{DISRUPTION_TAIL_MS, ECHO_SUBJECT, EVENTS_SUBJECT};

pub fn render(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# ipc-gateway soak test\n");
    describe_run(&mut md, report);
    aims(&mut md, report);
    memory_and_fds(&mut md, report);
    requests(&mut md, report);
    subscription(&mut md, report);
    restarts(&mut md, &report.restarts);
    samples(&mut md, report);
    let gateway = &report.gateway;
    let _ = writeln!(
        md,
        "\nGateway log: {} bytes, {} WARN lines, {} ERROR lines; its last {} KiB are in `latest-gateway.log`.",
        gateway.log_bytes,
        gateway.log_warn_lines,
        gateway.log_error_lines,
        LOG_TAIL_BYTES / 1024
    );
    md
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB ({kb} KiB)", kb as f64 / 1024.0)
}

fn describe_run(md: &mut String, report: &Report) {
    let (run, settings, gateway) = (&report.run, &report.settings, &report.gateway);
    let _ = writeln!(md, "{}", run.md_command());
    let _ = writeln!(
        md,
        "- Date: {} (start); load ran {:.0} s of the {:.0} s asked for; the whole run took {:.0} s",
        run.date, settings.load_seconds_run, settings.seconds, run.wall_seconds
    );
    let _ = writeln!(
        md,
        "{}",
        run.md_machine("nats-server, the echo service, the gateway and the load generator share these CPUs, unpinned")
    );
    let uncommitted = &run.git_at_start.uncommitted;
    let dirty = if uncommitted.is_empty() {
        "no uncommitted changes under src/ or the manifest".to_string()
    } else {
        format!("uncommitted changes in: {}", uncommitted.join(", "))
    };
    let sha = gateway.binary.binary_sha256.as_deref().unwrap_or("unknown");
    let _ = writeln!(
        md,
        "- Gateway: `{}` (built {}, sha256 {}…); source when the run started: git {} ({dirty})",
        gateway.binary.binary,
        gateway.binary.binary_built,
        &sha[..sha.len().min(16)],
        run.git_at_start.commit
    );
    let _ = writeln!(md, "- Gateway started as: `ipc-gateway {}`", gateway.args);
    let _ = writeln!(
        md,
        "- nats-server version: `{}` (one server on loopback, with a monitoring port); echo service: one `ipc-gateway demo-echo --subject {ECHO_SUBJECT}`",
        run.nats_server_version
    );
    let _ = writeln!(
        md,
        "- Load: {} connections × {} tasks, one request outstanding per task, each task paced to {:.0} req/s in total (at least {} ms pause after each answer); payloads {}–{} B (uniform); timeout {} ms; backoff after an error: 50 ms (UNAVAILABLE and most codes), `retry_after_ms` up to 1 s (CIRCUIT_OPEN), 100 ms + reconnect (connection lost). Every reply is compared with its request byte for byte.",
        settings.connections,
        settings.tasks_per_connection,
        settings.target_req_per_s,
        settings.pause_ms,
        settings.payload_bytes[0],
        settings.payload_bytes[1],
        settings.request_timeout_ms
    );
    let _ = writeln!(
        md,
        "- Subscription: one more connection subscribed to `{EVENTS_SUBJECT}`; a NATS client in the soak process publishes numbered messages to it at {:.0} msg/s",
        settings.publish_rate
    );
    let _ = writeln!(
        md,
        "- NATS restarts: `kill -9` of nats-server at {}, restarted on the same ports {:.0} s later",
        settings
            .kill_at_seconds
            .iter()
            .map(|t| format!("{t:.0} s"))
            .collect::<Vec<_>>()
            .join(" and "),
        settings.outage_seconds
    );
    let _ = writeln!(
        md,
        "- Samples every {:.0} s: gateway VmRSS and open FDs (/proc), its /metrics gauges, req/s in the interval. Warm-up cut: the first {:.0} s.",
        settings.sample_seconds, settings.warmup_seconds
    );
    if report.interrupted {
        let _ = writeln!(
            md,
            "\n**The run was interrupted (SIGINT/SIGTERM) before its end.**"
        );
    }
    if let Some(died) = &gateway.died_during_run {
        let _ = writeln!(md, "\n**GATEWAY FAILURE: {died}.**");
    }
    if let Some(died) = &report.echo_service_died {
        let _ = writeln!(md, "\n**{died}.**");
    }
}

fn growth_text(report: &Report) -> String {
    report
        .rss_kib
        .growth_after_warmup_pct
        .map_or("n/a".into(), |g| format!("{g:+.2} %"))
}

fn aims(md: &mut String, report: &Report) {
    let (rss, fds, requests) = (&report.rss_kib, &report.fds, &report.requests);
    let range = |r: Option<[u64; 2]>| r.map_or("n/a".into(), |[a, b]| format!("{a}–{b}"));
    let count = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
    let _ = writeln!(md, "\n## Aims\n");
    let _ = writeln!(
        md,
        "1. **RSS growth after warm-up < 5 %: {}** — {} after warm-up (t={:.0} s) → {} at the end (t={:.0} s): {}.",
        verdict(report.aims.rss_growth_under_5_pct),
        rss.after_warmup.map_or("n/a".into(), |a| mib(a.kib)),
        rss.after_warmup.map_or(0.0, |a| a.t),
        rss.end.map_or("n/a".into(), |a| mib(a.kib)),
        rss.end.map_or(0.0, |a| a.t),
        growth_text(report),
    );
    let _ = writeln!(
        md,
        "2. **FD count flat after warm-up: {}** — steady samples (outside the NATS outages and recoveries) ranged {}; {} right after warm-up, {} at the end (flat = range ≤ 2 and end ≤ after-warm-up + 2). All samples after warm-up, outages included: {}.",
        verdict(report.aims.fd_flat),
        range(fds.range_steady_after_warmup),
        count(fds.after_warmup_steady),
        count(fds.end_steady),
        range(fds.range_all_after_warmup),
    );
    let _ = writeln!(
        md,
        "3. **Every request answered (sent == replies + errors, none unanswered): {}** — sent {}, replies {}, errors {}, sum {}; no answer within {} s: {}; tasks abandoned at the end: {}.",
        verdict(report.aims.every_request_answered),
        requests.sent,
        requests.replies,
        requests.errors,
        requests.replies + requests.errors,
        report.settings.watchdog_ms / 1000,
        requests.no_answer,
        requests.abandoned_tasks,
    );
}

fn memory_and_fds(md: &mut String, report: &Report) {
    let (rss, fds) = (&report.rss_kib, &report.fds);
    let count = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
    let _ = writeln!(md, "\n## Memory and file descriptors\n");
    let _ = writeln!(md, "| | RSS | FDs |");
    let _ = writeln!(md, "| --- | ---: | ---: |");
    let _ = writeln!(
        md,
        "| start (idle, before load) | {} | {} |",
        mib(rss.start_idle),
        fds.start_idle
    );
    let _ = writeln!(
        md,
        "| after warm-up (t={:.0} s) | {} | {} |",
        rss.after_warmup.map_or(0.0, |a| a.t),
        rss.after_warmup.map_or("n/a".into(), |a| mib(a.kib)),
        count(fds.after_warmup)
    );
    let _ = writeln!(
        md,
        "| end, under load (t={:.0} s) | {} | {} |",
        rss.end.map_or(0.0, |a| a.t),
        rss.end.map_or("n/a".into(), |a| mib(a.kib)),
        count(fds.end)
    );
    if let (Some(rss_idle), Some(fds_idle)) =
        (rss.idle_after_clients_left, fds.idle_after_clients_left)
    {
        let _ = writeln!(
            md,
            "| idle after all clients left | {} | {} |",
            mib(rss_idle),
            fds_idle
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "- Growth after warm-up (end vs. after warm-up): {}; highest RSS after warm-up: {}.",
        growth_text(report),
        rss.max_after_warmup.map_or("n/a".into(), mib)
    );
    if let Some(g) = rss.growth_mean_last_vs_first_minute_pct {
        let _ = writeln!(
            md,
            "- Mean of the last minute of steady samples vs. the first minute after warm-up: {g:+.2} %."
        );
    }
    if let Some(slope) = rss.slope_kib_per_hour {
        let _ = writeln!(
            md,
            "- Least-squares slope of RSS over the steady samples after warm-up: {slope:+.0} KiB/hour."
        );
    }
    idle_after(md, report);
    let _ = writeln!(
        md,
        "- Gateway at SIGTERM: {}.",
        report.gateway.exit_at_sigterm
    );
}

fn idle_after(md: &mut String, report: &Report) {
    let fds = &report.fds;
    let (Some(after), Some(fds_after), Some(kinds_after)) = (
        &report.after_clients_left,
        fds.idle_after_clients_left,
        &fds.kinds_idle_after,
    ) else {
        return;
    };
    let kinds = |kinds: &[crate::report::FdKind]| {
        let pairs: Vec<(String, u64)> = kinds.iter().map(|k| (k.kind.clone(), k.count)).collect();
        fd_kinds_text(&pairs)
    };
    let _ = writeln!(
        md,
        "- After the load stopped and all clients disconnected: `ipc_gateway_connections` = {}, `ipc_gateway_inflight_requests` = {}, FDs {} ({}); idle before the load: {} ({}).",
        opt(after.connections),
        opt(after.inflight_requests),
        fds_after,
        kinds(kinds_after),
        fds.start_idle,
        kinds(&fds.kinds_idle_before)
    );
}

fn requests(md: &mut String, report: &Report) {
    let r = &report.requests;
    let latency =
        |us: Option<u64>| us.map_or("n/a".into(), |us| format!("{:.2} ms", us as f64 / 1e3));
    let _ = writeln!(md, "\n## Requests\n");
    let _ = writeln!(
        md,
        "- Sent {}, replies {} (wrong payload: {}), errors {}, no answer {}; average {:.0} req/s over the load.",
        r.sent, r.replies, r.wrong_replies, r.errors, r.no_answer, r.avg_req_per_s
    );
    let _ = writeln!(md, "- Errors by code: {}.", r.errors_by_code.text());
    let _ = writeln!(
        md,
        "- Errors outside the NATS disruptions (from each kill until {} s after requests succeeded again): {}.",
        DISRUPTION_TAIL_MS / 1000,
        r.errors_outside_disruptions.text()
    );
    let _ = writeln!(
        md,
        "- Reply latency (successful requests; histogram upper bounds): p50 {}, p99 {}, p99.9 {}, max {:.1} ms.",
        latency(r.latency_us.p50),
        latency(r.latency_us.p99),
        latency(r.latency_us.p999),
        r.latency_us.max as f64 / 1e3
    );
    let _ = writeln!(
        md,
        "- Client reconnects: {} (failed attempts {}).",
        r.client_reconnects, r.client_reconnect_failures
    );
}

fn subscription(md: &mut String, report: &Report) {
    let s = &report.subscription;
    let _ = writeln!(md, "\n## Subscription\n");
    let _ = writeln!(
        md,
        "- Published {} (publish failed or timed out: {}), received {}, missing (sequence gaps) {} of which {} outside the NATS disruptions, duplicates/out of order {}, `dropped` notices {} ({} messages), resubscribes {}.",
        s.published,
        s.publish_failed,
        s.received,
        s.missing,
        s.missing_outside_disruptions,
        s.duplicates_or_out_of_order,
        s.dropped_notices,
        s.dropped_messages,
        s.resubscribes
    );
}

/// "never", or the seconds from `base` to `at`.
fn after(base: f64, at: Option<f64>) -> String {
    at.map_or("never".into(), |t| format!("{:.2} s", t - base))
}

/// The time the other rows of a restart are measured from: the restart (else the kill).
fn base(r: &RestartReport) -> f64 {
    r.restart_at_s.unwrap_or(r.kill_at_s)
}

type Cell<'a> = &'a dyn Fn(&RestartReport) -> String;

fn restarts(md: &mut String, restarts: &[RestartReport]) {
    let _ = writeln!(md, "\n## NATS restarts\n");
    if restarts.is_empty() {
        let _ = writeln!(md, "None in this run.");
        return;
    }
    let _ = writeln!(
        md,
        "\"at\" times are seconds from the start of the load; the others are measured from the restart (nats-server started again), except \"first UNAVAILABLE\" (from the kill). \"Requests through the gateway OK again\" = the first successful reply to a request sent after the restart.\n"
    );
    let mut header = String::from("| |");
    let mut rule = String::from("| --- |");
    for index in 0..restarts.len() {
        let _ = write!(header, " restart {} |", index + 1);
        rule.push_str(" ---: |");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    let errors_label = format!(
        "errors from the kill to OK + {} s",
        DISRUPTION_TAIL_MS / 1000
    );
    let rows: [(&str, Cell<'_>); 14] = [
        ("`kill -9` nats-server at", &|r| {
            format!("{:.1} s", r.kill_at_s)
        }),
        ("first UNAVAILABLE, after the kill", &|r| {
            after(r.kill_at_s, r.first_unavailable_at_s)
        }),
        ("nats-server started again at", &|r| {
            r.restart_at_s.map_or("—".into(), |t| format!("{t:.1} s"))
        }),
        ("nats-server listening", &|r| {
            after(base(r), r.nats_listening_at_s)
        }),
        ("all gateway NATS connections back (/connz)", &|r| {
            after(base(r), r.gateway_pool_reconnected_at_s)
        }),
        ("gateway /ready 200", &|r| {
            after(base(r), r.gateway_ready_at_s)
        }),
        ("echo service reconnected (/connz)", &|r| {
            after(base(r), r.echo_service_reconnected_at_s)
        }),
        ("direct NATS request to the echo OK again", &|r| {
            after(base(r), r.direct_nats_echo_ok_again_at_s)
        }),
        ("**requests through the gateway OK again**", &|r| {
            format!("**{}**", after(base(r), r.requests_ok_again_at_s))
        }),
        ("subscription delivers again", &|r| {
            after(base(r), r.subscription_delivers_again_at_s)
        }),
        (
            "CIRCUIT_OPEN answers (breaker open), first – last",
            &|r| {
                r.circuit_open_first_last_at_s
                    .map_or("none".into(), |[a, b]| {
                        format!("{:.2} s – {:.2} s", a - base(r), b - base(r))
                    })
            },
        ),
        ("last error", &|r| {
            after(base(r), r.last_error_at_s).replace("never", "no errors")
        }),
        (&errors_label, &|r| r.errors_in_disruption.text()),
        ("subscription messages missed", &|r| {
            r.messages_missed.to_string()
        }),
    ];
    for (label, cell) in rows {
        let _ = write!(md, "| {label} |");
        for r in restarts {
            let _ = write!(md, " {} |", cell(r));
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\n\"last error\" is the last error of any kind before the next kill (or the end of the run); a negative time means before the restart."
    );
}

fn samples(md: &mut String, report: &Report) {
    let settings = &report.settings;
    let _ = writeln!(md, "\n## Samples\n");
    let every: f64 = if settings.seconds <= 600.0 { 0.0 } else { 60.0 };
    let _ = writeln!(
        md,
        "{}; the full series is in `latest.json`.\n",
        if every == 0.0 {
            "Every sample"
        } else {
            "One sample a minute, plus every sample taken while NATS was down or recovering"
        }
    );
    let _ = writeln!(
        md,
        "| t (s) | phase | RSS KiB | FDs | threads | connections | in flight | NATS conns up | req/s | avg latency | direct NATS p50 | errors | sub msgs | CPU % gw / echo / nats / soak |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let mut next_minute = 0.0;
    for (i, s) in report.samples.iter().enumerate() {
        let last = i + 1 == report.samples.len();
        let minute_due = every > 0.0 && s.t + settings.sample_seconds / 2.0 >= next_minute;
        let show =
            every == 0.0 || last || minute_due || s.phase == "nats-down" || s.phase == "recovering";
        if !show {
            continue;
        }
        if minute_due {
            // No loop: the next whole minute after this sample.
            next_minute = ((s.t + settings.sample_seconds / 2.0) / every).floor() * every + every;
        }
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.0} / {:.0} / {} / {:.0} |",
            s.t,
            s.phase,
            s.rss_kb,
            s.fds,
            s.threads,
            opt(s.connections),
            opt(s.inflight),
            opt(s.nats_connected),
            s.req_per_s,
            s.avg_latency_ms
                .map_or("-".into(), |v| format!("{v:.2} ms")),
            s.direct_ms.map_or("-".into(), |v| format!("{v:.2} ms")),
            s.errors,
            s.sub_messages,
            s.gw_cpu_pct,
            s.echo_cpu_pct,
            s.nats_cpu_pct.map_or("-".into(), |v| format!("{v:.0}")),
            s.self_cpu_pct
        );
    }
}
