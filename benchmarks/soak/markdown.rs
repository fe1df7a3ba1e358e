//! The soak's report (report.rs) rendered as Markdown: the run's description, the aims, memory
//! and FDs, requests per front-end, the subscription feeds, each NATS restart, each policy
//! reload, the audit comparison, and the samples. Every number comes from the `Report`, as
//! written to the JSON; times relative to a restart are the difference of two times in it.

use std::fmt::Write as _;

use crate::common::fd_kinds_text;
use crate::report::{Report, RestartReport};
use crate::run::LOG_TAIL_BYTES;
use crate::samples::opt;
use crate::{DISRUPTION_TAIL_MS, ECHO_SUBJECT, EVENTS_SUBJECT, WS_EVENTS_SUBJECT};

/// The report as Markdown; `name` is the file name its companions share (`latest`, ...).
pub fn render(report: &Report, name: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# ipc-gateway soak test\n");
    describe_run(&mut md, report);
    aims(&mut md, report);
    memory_and_fds(&mut md, report);
    requests(&mut md, report);
    feeds(&mut md, report);
    restarts(&mut md, &report.restarts);
    reloads(&mut md, report);
    audit(&mut md, report);
    samples(&mut md, report, name);
    let gateway = &report.gateway;
    let _ = writeln!(
        md,
        "\nGateway log: {} bytes, {} WARN lines, {} ERROR lines; its last {} KiB are in `{name}-gateway.log`.",
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
        "- Identities and policy: the gateway runs with `--policy` (a file that grants this process's uid, and the JWT subjects `soak-ws` and `soak-grpc`, exactly the subjects each uses; `soak.forbidden` is granted to nobody), `--auth-jwt-secret-file` (HS256; the WebSocket upgrades carry `Authorization: Bearer`, the gRPC calls `authorization` metadata) and `--audit-file` (read as it grows, across rotations)."
    );
    let _ = writeln!(
        md,
        "- Requests to `{ECHO_SUBJECT}`, all front-ends at once, one request outstanding per task, each task paced to its share of its front-end's rate (at least {} ms pause after each answer); payloads {}–{} B (uniform); timeout {} ms; backoff after an error: 50 ms (UNAVAILABLE and most codes), `retry_after_ms` up to 1 s (CIRCUIT_OPEN), 100 ms + reconnect (connection lost). Every reply is compared with its request byte for byte.",
        settings.pause_ms,
        settings.payload_bytes[0],
        settings.payload_bytes[1],
        settings.request_timeout_ms
    );
    let _ = writeln!(
        md,
        "  - Unix socket: {} connections (binary frames and JSON lines in turn) × {} tasks, {:.0} req/s in all;",
        settings.connections, settings.tasks_per_connection, settings.target_req_per_s,
    );
    let _ = writeln!(
        md,
        "  - WebSocket: {} connections (JSON text messages) × {} tasks, {:.0} req/s in all;",
        settings.ws_connections, settings.ws_tasks_per_connection, settings.ws_target_req_per_s,
    );
    let _ = writeln!(
        md,
        "  - gRPC: {} tasks of unary `Request` calls on one channel, {:.0} req/s in all.",
        settings.grpc_tasks, settings.grpc_target_req_per_s,
    );
    let _ = writeln!(
        md,
        "- Subscription feeds, every message numbered: `{EVENTS_SUBJECT}` to one Unix-socket subscriber, published by a NATS client in the soak process at {:.0} msg/s; `{WS_EVENTS_SUBJECT}` to {} WebSocket subscribers and one gRPC Subscribe stream, published through the gateway by a WebSocket client at {:.0} msg/s (each publish acknowledged; a refused one is sent again with the same number).",
        settings.publish_rate, settings.ws_subscribers, settings.ws_publish_rate
    );
    let times = |list: &[f64]| {
        if list.is_empty() {
            return "none".to_string();
        }
        list.iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
            + " s"
    };
    let _ = writeln!(
        md,
        "- NATS restarts (every {:.0} s): `kill -9` of nats-server at {}, restarted on the same ports {:.0} s later.",
        settings.restart_every_seconds,
        times(&settings.kill_at_seconds),
        settings.outage_seconds
    );
    let _ = writeln!(
        md,
        "- Policy reloads (every {:.0} s, moved {:.0} s later when they fall on a kill): the file rewritten in its other version (B adds a grant for an identity that never connects), then SIGHUP, at {}.",
        settings.reload_every_seconds,
        settings.outage_seconds + 30.0,
        times(&settings.reload_at_seconds)
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
    let (fds, requests, aims) = (&report.fds, &report.requests, &report.aims);
    let range = |r: Option<[u64; 2]>| r.map_or("n/a".into(), |[a, b]| format!("{a}–{b}"));
    let count = |v: Option<u64>| v.map_or("n/a".into(), |v| v.to_string());
    let _ = writeln!(
        md,
        "\n## Aims\n\nDecided before the run and kept whatever the result.\n"
    );
    let fronts: Vec<String> = requests
        .by_frontend
        .iter()
        .map(|f| {
            format!(
                "{} sent {} = replies {} + errors {} ({}), wrong payload {}, no answer {}, answered twice {}",
                f.frontend,
                f.sent,
                f.replies,
                f.errors,
                if f.sent == f.replies + f.errors { "equal" } else { "NOT equal" },
                f.wrong_replies,
                f.no_answer,
                f.stray_answers
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "1. **Every request on every front-end answered exactly once: {}** — sent == replies + errors, every reply byte for byte its request, no answer with an id nobody waited for (answered twice), none unanswered after {} s, no task abandoned at the end ({}): {}.",
        verdict(aims.every_request_answered_once),
        report.settings.watchdog_ms / 1000,
        requests.abandoned_tasks,
        fronts.join("; ")
    );
    let feeds: Vec<String> = report
        .feeds
        .iter()
        .map(|f| {
            format!(
                "{} missing {} outside the outages, {} of them unannounced",
                f.feed, f.missing_outside_outages, f.missing_outside_outages_unannounced
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "2. **No subscription gap outside the outage windows, unless a `dropped` notice announced it: {}** — an outage window runs from a kill until {} s after requests and every feed delivered again; a gap is announced when the notices since the last message count at least the missing messages, or carry the gap flag; every feed must have delivered: {}.",
        verdict(aims.no_unannounced_gap_outside_outages),
        DISRUPTION_TAIL_MS / 1000,
        feeds.join("; ")
    );
    let w = &report.rss_kib.flat_window;
    let _ = writeln!(
        md,
        "3. **RSS flat over the last hour (the last third for runs under 2 h) within 5 %: {}** — defined as: the least-squares trend of the steady samples (NATS outages and recoveries left out) in the window changes by less than 5 % of their mean across the window. Window t={:.0}–{:.0} s, {} samples, mean {}, trend {} KiB/h, change across the window {}; (for information: max/min {}).",
        verdict(aims.rss_flat_last_hour),
        w.from_s,
        w.to_s,
        w.samples,
        w.mean_kib.map_or("n/a".into(), |m| mib(m as u64)),
        w.slope_kib_per_hour
            .map_or("n/a".into(), |v| format!("{v:+.0}")),
        w.trend_change_pct
            .map_or("n/a".into(), |v| format!("{v:+.2} %")),
        w.max_over_min_pct
            .map_or("n/a".into(), |v| format!("+{v:.2} %")),
    );
    let _ = writeln!(
        md,
        "4. **File descriptors flat: {}** — steady samples after warm-up ranged {} (flat = range ≤ 2 and end ≤ after-warm-up + 2: {} → {}); idle after every client left {} against {} idle before the load (must be ≤ + 2). All samples after warm-up, outages included: {}.",
        verdict(aims.fd_flat),
        range(fds.range_steady_after_warmup),
        count(fds.after_warmup_steady),
        count(fds.end_steady),
        count(fds.idle_after_clients_left),
        fds.start_idle,
        range(fds.range_all_after_warmup),
    );
    let audit = &report.audit;
    let differ = audit
        .rows
        .iter()
        .filter(|r| r.expected != r.recorded)
        .count();
    let _ = writeln!(
        md,
        "5. **Audit records equal to operations: {}** — {} records read, {} rows compared by op, front-end and outcome, {} differ; `audit_lost` {}, unreadable lines {} (see [Audit log](#audit-log)).",
        verdict(aims.audit_equals_operations),
        audit.records,
        audit.rows.len(),
        differ,
        audit.lost,
        audit.unreadable_lines
    );
    let _ = writeln!(
        md,
        "\nAlso checked: **every policy reload seen by the gateway, successful, and the policy enforced after it: {}** ({} reloads, see [Policy reloads](#policy-reloads)).",
        verdict(aims.every_reload_checked),
        report.reloads.len()
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
        "- Client reconnects: {} (failed attempts {}).\n",
        r.client_reconnects, r.client_reconnect_failures
    );
    let _ = writeln!(
        md,
        "| front-end | sent | replies | errors | wrong payload | no answer | answered twice | reconnects |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for f in &r.by_frontend {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            f.frontend,
            f.sent,
            f.replies,
            f.errors,
            f.wrong_replies,
            f.no_answer,
            f.stray_answers,
            f.reconnects
        );
    }
}

fn feeds(md: &mut String, report: &Report) {
    let _ = writeln!(md, "\n## Subscription feeds\n");
    let _ = writeln!(
        md,
        "Deliveries, gaps and duplicates are summed over each feed's subscribers; the ws and grpc feeds share one publisher.\n"
    );
    let _ = writeln!(
        md,
        "| feed | subscribers | published | publish refused | delivered | missing | of which announced | missing outside outages | … unannounced | duplicates | `dropped` notices (messages) | gap flags | resubscribes |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for f in &report.feeds {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} |",
            f.feed,
            f.subscribers,
            f.published,
            f.publish_failed,
            f.received,
            f.missing,
            f.missing_announced,
            f.missing_outside_outages,
            f.missing_outside_outages_unannounced,
            f.duplicates_or_out_of_order,
            f.dropped_notices,
            f.dropped_messages,
            f.gap_flags,
            f.resubscribes
        );
    }
}

fn reloads(md: &mut String, report: &Report) {
    let _ = writeln!(md, "\n## Policy reloads\n");
    if report.reloads.is_empty() {
        let _ = writeln!(md, "None in this run.");
        return;
    }
    let _ = writeln!(
        md,
        "Each: the policy file rewritten, SIGHUP, then `ipc_gateway_policy_reloads_total{{outcome=\"ok\"}}` must go up, `ipc_gateway_policy_last_reload_successful` be 1, and a request to `soak.forbidden` over the Unix socket be refused with FORBIDDEN.\n"
    );
    let _ = writeln!(
        md,
        "| at | version | seen after | failed reloads | last successful | probe | ok |"
    );
    let _ = writeln!(md, "| ---: | --- | ---: | ---: | ---: | --- | --- |");
    for r in &report.reloads {
        let _ = writeln!(
            md,
            "| {:.1} s | {} | {} | {} | {} | {} | {} |",
            r.at_s,
            r.version,
            r.seen_after_ms
                .map_or("not seen".into(), |ms| format!("{ms} ms")),
            opt(r.failed_reloads),
            opt(r.last_reload_successful),
            r.refused_probe.as_deref().unwrap_or("-"),
            if r.ok { "yes" } else { "**no**" }
        );
    }
}

fn audit(md: &mut String, report: &Report) {
    let a = &report.audit;
    let _ = writeln!(md, "\n## Audit log\n");
    let _ = writeln!(
        md,
        "Records from the start of the load to the gateway's exit: {}; `audit_lost` count {}; unreadable lines {}; rotations followed {}. Expected: a `connect` for each connection the soak opened and a `disconnect` for each (all are closed by the end); a `request`, `publish` or `subscribe` with the outcome the soak got for each one the gateway answered (one lost with its connection, or not answered in time, has no known outcome and is not expected); a `policy_reload` ok for each reload. Anything else is a difference.\n",
        a.records, a.lost, a.unreadable_lines, a.rotations_followed
    );
    let _ = writeln!(md, "| op | front-end | outcome | expected | recorded | |");
    let _ = writeln!(md, "| --- | --- | --- | ---: | ---: | --- |");
    for r in &a.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            r.op,
            r.frontend,
            r.outcome,
            r.expected,
            r.recorded,
            if r.expected == r.recorded {
                "".to_string()
            } else {
                format!("**{:+}**", r.recorded as i64 - r.expected as i64)
            }
        );
    }
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
    let rows: [(&str, Cell<'_>); 16] = [
        ("`kill -9` nats-server at", &|r| {
            format!("{:.1} s", r.kill_at_s)
        }),
        ("gateway RSS in the last sample before the kill", &|r| {
            r.rss_kib_before_kill
                .map_or("n/a".into(), |kib| format!("{kib} KiB"))
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
        ("subscription delivers again (uds / ws / grpc feed)", &|r| {
            r.feeds_deliver_again_at_s
                .iter()
                .map(|at| after(base(r), *at))
                .collect::<Vec<_>>()
                .join(" / ")
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
        ("outage window (aim 2 leaves it out)", &|r| {
            format!(
                "{:.1} – {:.1} s",
                r.outage_window_s[0], r.outage_window_s[1]
            )
        }),
        ("messages missed in it (uds / ws / grpc)", &|r| {
            r.messages_missed
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
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

fn samples(md: &mut String, report: &Report, name: &str) {
    let settings = &report.settings;
    let _ = writeln!(md, "\n## Samples\n");
    let every: f64 = if settings.seconds <= 600.0 { 0.0 } else { 60.0 };
    let _ = writeln!(
        md,
        "{}; the full series is in `{name}.json` and `{name}-series.csv`.\n",
        if every == 0.0 {
            "Every sample"
        } else {
            "One sample a minute, plus every sample taken while NATS was down or recovering"
        }
    );
    let _ = writeln!(
        md,
        "| t (s) | phase | RSS KiB | FDs | threads | connections | in flight | NATS conns up | req/s (uds / ws / grpc) | avg latency | direct NATS p50 | errors | feed msgs (uds / ws / grpc) | missing | dropped | audit records | CPU % gw / echo / nats / soak |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
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
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} ({:.0} / {:.0} / {:.0}) | {} | {} | {} | {} / {} / {} | {} | {} | {} | {:.0} / {:.0} / {} / {:.0} |",
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
            s.avg_latency_ms
                .map_or("-".into(), |v| format!("{v:.2} ms")),
            s.direct_ms.map_or("-".into(), |v| format!("{v:.2} ms")),
            s.errors,
            s.feed_messages[0],
            s.feed_messages[1],
            s.feed_messages[2],
            s.sub_missing,
            s.dropped,
            s.audit_records,
            s.gw_cpu_pct,
            s.echo_cpu_pct,
            s.nats_cpu_pct.map_or("-".into(), |v| format!("{v:.0}")),
            s.self_cpu_pct
        );
    }
}
