//! The report (report.rs) rendered as Markdown: the run's setup, then one table per phase
//! (sustained, max rate, burst), the connections and the idle cost, and any errors. Every
//! number comes from the `Report`, as written to `latest.json`.

use std::fmt::Write as _;

use crate::common::fmt_opt;
use crate::cpu::CpuUse;
use crate::report::Report;
use crate::run::{Case, LogSample, Phase, Rss};

/// A client process at this share of its one core is marked as near its limit.
const NEAR_LIMIT: f64 = 0.7;
use crate::servers::Signals;
use crate::settings::Path;

pub fn render(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# ipc-gateway benchmark: fan-out to K WebSocket subscribers, gateway vs nats-server's own WebSocket listener\n"
    );
    describe_run(&mut md, report);
    sustained(&mut md, report);
    max_rate(&mut md, report);
    burst(&mut md, report);
    crate::sweep::render(&mut md, report);
    connections(&mut md, report);
    logs(&mut md, report);
    errors(&mut md, report);
    md
}

fn logs(md: &mut String, report: &Report) {
    let logs = &report.logs;
    let _ = writeln!(md, "\n## Server logs over the whole run\n");
    for (what, sample) in [
        (
            "\"Slow Consumer\" in the gateway's nats-server's log",
            &logs.gateway_nats_slow_consumer,
        ),
        (
            "\"Slow Consumer\" in the native nats-server's log",
            &logs.native_nats_slow_consumer,
        ),
        (
            "the gateway's \"NATS disconnected\" warnings",
            &logs.gateway_nats_disconnected,
        ),
        (
            "the gateway's \"NATS subscription buffer full\" warnings",
            &logs.gateway_subscription_buffer_full,
        ),
    ] {
        let _ = writeln!(
            md,
            "- {what}: {} line(s){}",
            sample.lines,
            first_lines(sample)
        );
    }
}

fn first_lines(sample: &LogSample) -> String {
    if sample.first.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = sample
        .first
        .iter()
        .map(|line| format!("`{}`", line.replace('`', "'")))
        .collect();
    format!("; first: {}", quoted.join(" "))
}

fn describe_run(md: &mut String, report: &Report) {
    let (run, s) = (&report.run, &report.settings);
    let _ = writeln!(md, "{}", run.md_command());
    let _ = writeln!(
        md,
        "- Date: {} (start; the run took {:.0} s)",
        run.date, run.wall_seconds
    );
    let _ = writeln!(
        md,
        "{}",
        run.md_machine(
            "the gateway, both nats-servers, the client processes and the publisher share them, with whatever else ran (see machine busy)"
        )
    );
    let _ = writeln!(
        md,
        "- {}; two servers, each from a config file with a monitoring port: one for the gateway, one with its own WebSocket listener (`websocket {{ no_tls: true }}`) for the native path; other settings at their defaults",
        run.nats_server_version
    );
    let _ = writeln!(
        md,
        "- Gateway: `{}` (built {}); source when the run started: git {}{}; started as `ipc-gateway {}`",
        report.gateway.binary.binary,
        report.gateway.binary.binary_built,
        run.git_at_start.commit,
        run.md_uncommitted(),
        report.gateway.args
    );
    let _ = writeln!(
        md,
        "- Subscribers: K WebSocket connections on subject `{}`, from client processes (this bench binary again, one thread each, at least {} of them, at most {} connections each), bound to {} loopback source addresses. gateway path: `GET {}`, `{{\"op\":\"subscribe\",\"id\":\"s\",\"subject\":\"{}\"}}` and its ack; native path: `CONNECT {{\"verbose\":false,\"pedantic\":false}}`, `SUB {} 1`, `PING` → `PONG` on nats-server's listener (which puts as many NATS messages in one WebSocket message as it has ready, as `?batch=true` lets the gateway do)",
        s.subject,
        s.min_client_processes,
        s.connections_per_client_process,
        s.source_addresses,
        s.gateway_ws_path,
        s.subject,
        s.subject
    );
    let _ = writeln!(
        md,
        "- Publisher: one async-nats client in the bench process on the path's nats-server, {} B payloads that start with the send time; latency = receive time − send time, measured by the clients on the same host",
        s.payload_bytes
    );
    let _ = writeln!(
        md,
        "- Phases per case: idle {} s (nothing published); sustained: {} deliveries/s (K × the publish rate) for {} s; burst: {} messages at once; max rate: the publisher as fast as it can for {} s. After publishing, sustained and burst wait until every message is delivered or notified dropped, or nothing more arrives for 2 s (at most {} s); max rate counts {} s more",
        s.idle_seconds,
        s.sustained_deliveries_per_second,
        s.seconds,
        s.burst_messages,
        s.seconds,
        s.drain_cap_seconds,
        s.max_rate_drain_seconds
    );
    let _ = writeln!(
        md,
        "- CPU: user + system time from /proc/PID/stat (10 ms ticks). Server side = the gateway + its nats-server (gateway path) or the native nats-server, over the deliveries of the phase. \"busiest client\" = the busiest client process's CPU share of one core (each is one thread: 100 % would make it the bottleneck). \"machine busy\" = all CPUs, from /proc/stat."
    );
}

pub fn name(case: &Case) -> String {
    match case.path {
        Path::Gateway => "gateway".into(),
        Path::Native => "native nats-server".into(),
    }
}

fn pct(value: f64) -> String {
    format!("{:.0} %", value * 100.0)
}

pub fn ms(us: Option<f64>) -> String {
    fmt_opt(us.map(|v| v / 1000.0), 2)
}

fn server_share(case: &Case, phase: &Phase, window: bool) -> String {
    let cpu = if window {
        &phase.cpu_window
    } else {
        &phase.cpu
    };
    let wall = cpu.wall_seconds.max(1e-9);
    match case.path {
        Path::Gateway => format!(
            "{} + {}",
            pct(cpu.gateway_seconds / wall),
            pct(cpu.gateway_nats_seconds / wall)
        ),
        Path::Native => pct(cpu.native_nats_seconds / wall),
    }
}

/// `machine busy (others)`: all CPUs' busy share, and the part not used by this case's
/// processes.
fn busy(cpu: &CpuUse) -> String {
    match (cpu.machine_busy, cpu.others_busy) {
        (Some(all), Some(others)) => format!("{} ({})", pct(all), pct(others)),
        (Some(all), None) => pct(all),
        _ => "—".into(),
    }
}

/// A client process's CPU share, marked when it comes near the one core it can use: the
/// deliveries/s of that row may then be the client's limit rather than the server's.
fn client_share(share: f64) -> String {
    if share >= NEAR_LIMIT {
        format!("{} (near its limit)", pct(share))
    } else {
        pct(share)
    }
}

/// `gateway + its nats-server` or the native nats-server, MiB.
fn server_rss(case: &Case, rss: &Rss) -> String {
    let mib = |kib: Option<u64>| fmt_opt(kib.map(|v| v as f64 / 1024.0), 0);
    match case.path {
        Path::Gateway => format!("{} + {}", mib(rss.gateway), mib(rss.gateway_nats)),
        Path::Native => mib(rss.native_nats),
    }
}

fn phases<'a>(
    report: &'a Report,
    pick: impl Fn(&'a Case) -> Option<&'a Phase>,
) -> Vec<(&'a Case, &'a Phase)> {
    report
        .cases
        .iter()
        .filter_map(|case| pick(case).map(|phase| (case, phase)))
        .collect()
}

fn sustained(md: &mut String, report: &Report) {
    let _ = writeln!(md, "\n## Sustained rate\n");
    let _ = writeln!(
        md,
        "| K | path | publish msg/s | deliveries/s | delivered / expected | p50 ms | p99 ms | server CPU µs/delivery | server CPU (gateway + its nats / native) | client CPU µs/delivery | busiest client | machine busy (others) |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (case, p) in phases(report, |c| c.sustained.as_ref()) {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            case.k,
            name(case),
            fmt_opt(p.target_publish_rate, 1),
            p.deliveries_per_second,
            p.delivered,
            p.expected,
            ms(p.latency_us.p50),
            ms(p.latency_us.p99),
            fmt_opt(p.server_cpu_us_per_delivery, 2),
            server_share(case, p, false),
            fmt_opt(p.client_cpu_us_per_delivery, 2),
            client_share(p.cpu.busiest_client_share),
            busy(&p.cpu),
        );
    }
}

fn max_rate(md: &mut String, report: &Report) {
    let _ = writeln!(md, "\n## Max rate (publisher as fast as it can)\n");
    let _ = writeln!(
        md,
        "| K | path | published msg/s | deliveries/s while publishing | delivered while publishing | delivered by {} s later | dropped (notices) | conns lost | p50 ms | p99 ms | server CPU µs/delivery | server CPU share | server RSS after, MiB | busiest client | machine busy (others) | loss signals |",
        report.settings.max_rate_drain_seconds
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (case, p) in phases(report, |c| c.max_rate.as_ref()) {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} | {} of {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            case.k,
            name(case),
            p.published.messages as f64 / p.published.seconds.max(1e-9),
            p.deliveries_per_second,
            p.delivered_in_window,
            p.delivered,
            p.expected,
            p.dropped_notified,
            p.connections_lost,
            ms(p.latency_us.p50),
            ms(p.latency_us.p99),
            fmt_opt(p.server_cpu_us_per_delivery, 2),
            server_share(case, p, true),
            server_rss(case, &p.rss_after_kib),
            client_share(p.cpu_window.busiest_client_share),
            busy(&p.cpu_window),
            signals_text(&p.signals),
        );
    }
    let _ = writeln!(
        md,
        "\n\"while publishing\" counts deliveries up to the end of publishing (published msg/s counts what the publisher's client accepted: nats-server holds a publisher back when its subscribers lag). Expected = published × subscribers: most of the backlog is still queued when the phase stops counting, so the max-rate phase does not judge loss (the burst does); its loss signals show whether a server cut off a consumer. Server CPU µs/delivery is over the deliveries counted. Latency at max rate is mostly queueing. Server CPU share and busiest client are over the publishing window. Loss signals: the servers' own counters over the phase (gateway: `ipc_gateway_dropped_messages_total`, `ipc_gateway_nats_slow_consumer_total`, slow-client disconnects; nats-server: /varz `slow_consumers` and \"Slow Consumer\" log lines of the server the path uses)."
    );
}

/// The non-zero loss signals of a phase, or "none".
fn signals_text(sig: &Signals) -> String {
    let mut parts = Vec::new();
    let mut add = |value: Option<f64>, what: &str| {
        if let Some(v) = value.filter(|v| *v != 0.0) {
            parts.push(format!("{what} {v:.0}"));
        }
    };
    add(sig.gateway_dropped_messages, "gateway dropped");
    add(
        sig.gateway_nats_slow_consumer,
        "gateway async-nats slow consumer",
    );
    add(
        sig.gateway_slow_client_disconnects,
        "gateway slow-client disconnects",
    );
    add(sig.nats_slow_consumers, "nats-server slow consumers");
    add(
        Some(sig.nats_slow_consumer_log_lines),
        "\"Slow Consumer\" log lines",
    );
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn opt_delta(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.0}"))
}

fn burst(md: &mut String, report: &Report) {
    let rows = phases(report, |c| c.burst.as_ref());
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Burst: {} messages at once\n",
        report.settings.burst_messages
    );
    let _ = writeln!(
        md,
        "| K | path | expected | delivered | dropped (notices) | gap notices | silent loss | subscribers complete / short | conns lost | to the last delivery s | p50 ms | p99 ms | server CPU µs/delivery | busiest client | machine busy (others) | gateway dropped_messages Δ | gateway nats_slow_consumer Δ | gateway slow_client disconnects Δ | nats-server slow_consumers Δ | \"Slow Consumer\" log lines Δ |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (case, p) in rows {
        let sig = &p.signals;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            case.k,
            name(case),
            p.expected,
            p.delivered,
            p.dropped_notified,
            p.gap_notices,
            p.silent_loss.map_or_else(
                || format!(
                    "not known (still arriving after {:.0} s)",
                    p.last_delivery_seconds
                ),
                |v| v.to_string()
            ),
            p.per_subscriber.complete,
            p.per_subscriber.short,
            p.connections_lost,
            p.last_delivery_seconds,
            ms(p.latency_us.p50),
            ms(p.latency_us.p99),
            fmt_opt(p.server_cpu_us_per_delivery, 2),
            client_share(p.cpu.busiest_client_share),
            busy(&p.cpu),
            opt_delta(sig.gateway_dropped_messages),
            opt_delta(sig.gateway_nats_slow_consumer),
            opt_delta(sig.gateway_slow_client_disconnects),
            opt_delta(sig.nats_slow_consumers),
            sig.nats_slow_consumer_log_lines,
        );
    }
    let _ = writeln!(
        md,
        "\nsilent loss = expected − delivered − dropped (notices), once nothing more arrived for 2 s (a subscriber that got a gap notice was told that an unknown number were lost, so its share of this is not silent); expected = messages × subscribers. A subscriber is complete when its deliveries plus its dropped notices add up to the messages published. The Δ columns are the servers' own counters over the phase (\"—\": the native path has no gateway); the nats-server ones are of the server the path uses (the gateway's, or the native one)."
    );
}

fn connections(md: &mut String, report: &Report) {
    let _ = writeln!(md, "\n## Connections and idle cost\n");
    let _ = writeln!(
        md,
        "| K | path | client processes | subscribed | subscribe time s | server subscriptions | server RSS when subscribed, MiB | idle server CPU | idle clients CPU s |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mib = |kib: Option<u64>| fmt_opt(kib.map(|v| v as f64 / 1024.0), 1);
    for case in &report.cases {
        let Some(c) = &case.connect else { continue };
        let rss = match case.path {
            Path::Gateway => format!(
                "{} + {}",
                mib(c.rss_kib.gateway),
                mib(c.rss_kib.gateway_nats)
            ),
            Path::Native => mib(c.rss_kib.native_nats),
        };
        let (idle_server, idle_clients) = match &case.idle {
            Some(p) => (
                server_share(case, p, true),
                format!("{:.2}", p.cpu.clients_seconds),
            ),
            None => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:?} | {} of {} ({} failed) | {:.1} | {} | {rss} | {idle_server} | {idle_clients} |",
            case.k,
            name(case),
            case.client_processes,
            c.ok,
            case.k,
            c.failed,
            c.seconds,
            fmt_opt(c.server_subscriptions, 0),
        );
    }
    let _ = writeln!(
        md,
        "\nThe same servers serve every case, so their RSS includes what earlier cases (max-rate phases above all) grew them to; memory per connection is measured by `ws_idle` (artifacts/ws-idle/). nats-server's subscriptions include its own (about 60). Idle CPU is over {} s with nothing published.",
        report.settings.idle_seconds
    );
}

fn errors(md: &mut String, report: &Report) {
    let mut lines = Vec::new();
    for case in &report.cases {
        let label = format!("K = {}, {}", case.k, name(case));
        if let Some(err) = &case.error {
            lines.push(format!("- {label}: the case stopped: {err}"));
        }
        if let Some(err) = case.connect.as_ref().and_then(|c| c.first_error.as_ref()) {
            lines.push(format!("- {label}, connect: {err}"));
        }
        for (phase, p) in [
            ("sustained", &case.sustained),
            ("burst", &case.burst),
            ("max rate", &case.max_rate),
        ] {
            if let Some(p) = p
                && let Some(err) = &p.first_error
            {
                lines.push(format!(
                    "- {label}, {phase}: {} connection(s) lost; first: {err}",
                    p.connections_lost
                ));
            }
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(md, "\n## Errors and lost connections\n");
        for line in lines {
            let _ = writeln!(md, "{line}");
        }
    }
}
