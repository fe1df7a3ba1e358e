//! The report (report.rs) rendered as Markdown: the run's description, the gateway's memory by
//! stage, per connection, and the checks. Every number comes from the `Report`, as written to
//! `latest.json`.

use std::fmt::Write as _;

use crate::common::payload_label;
use crate::memory::Snapshot;
use crate::report::{Nofile, PerConn, Report};
use crate::ws::{Mode, Server};
use crate::{SUBJECT, report};

pub fn render(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# ipc-gateway benchmark: idle WebSocket connections, gateway memory per connection\n"
    );
    describe_run(&mut md, report);
    stages(&mut md, report);
    per_connection(&mut md, report);
    checks(&mut md, report);
    let _ = writeln!(
        md,
        "\nRSS counts the gateway process's resident pages only: kernel socket buffers are not in it. glibc malloc keeps freed memory in its arenas, so \"after all closed\" shows what was not given back to the kernel, not a leak by itself."
    );
    side_by_side(&mut md, report);
    md
}

fn bytes(value: Option<f64>) -> String {
    value.map_or("—".into(), |b| {
        format!("{b:.0} B ({:.2} KiB)", b / 1024.0)
    })
}

fn mode_text(mode: Mode) -> &'static str {
    match mode {
        Mode::Idle => "idle",
        Mode::Shared => "1 subscription each, one subject",
        Mode::Own => "1 subscription each, own subject",
    }
}

/// The gateway next to nats-server's own WebSocket listener.
fn side_by_side(md: &mut String, report: &Report) {
    let rows = &report.side_by_side;
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Side by side: the gateway vs nats-server's own WebSocket listener\n"
    );
    let _ = writeln!(
        md,
        "Each row starts fresh servers: for the gateway a nats-server and a gateway (`--max-connections N+16`), for native a nats-server with `websocket {{ no_tls: true }}` (RSS of that nats-server, which serves the WebSocket clients). One warm-up connection of the row's kind opens and closes, the process settles (the baseline), N connections open and set themselves up (gateway: a ping, or `subscribe` and its ack; native: `CONNECT`, the `SUB` if any, `PING` → `PONG`) and stay idle, the process settles again. Per connection = (VmRSS loaded − baseline) / N. \"+ its nats-server\" adds what the gateway's own nats-server grew by (the gateway's subscriptions live there too).\n"
    );
    let _ = writeln!(
        md,
        "| N | connections | gateway | gateway's nats-server | gateway + its nats-server | native nats-server |"
    );
    let _ = writeln!(md, "| ---: | --- | ---: | ---: | ---: | ---: |");
    let mut keys: Vec<(usize, Mode)> = Vec::new();
    for row in rows {
        if !keys.contains(&(row.connections, row.mode)) {
            keys.push((row.connections, row.mode));
        }
    }
    for (n, mode) in keys {
        let find = |server: Server| {
            rows.iter()
                .find(|r| r.connections == n && r.mode == mode && r.server == server)
        };
        let per =
            |server: Server| find(server).and_then(|r| r.per_connection.as_ref().map(|p| p.vm_rss));
        let gateway_nats = find(Server::Gateway).and_then(|r| r.gateway_nats_per_connection_bytes);
        let sum = per(Server::Gateway).zip(gateway_nats).map(|(a, b)| a + b);
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} | {} | {} |",
            mode_text(mode),
            bytes(per(Server::Gateway)),
            bytes(gateway_nats),
            bytes(sum),
            bytes(per(Server::Native)),
        );
    }
    let _ = writeln!(md, "\nThe readings behind it:\n");
    let _ = writeln!(
        md,
        "| N | server | connections | baseline VmRSS KiB | loaded VmRSS KiB | RssAnon per conn | settled | server subscriptions | its nats-server VmRSS KiB (before → after) | opened |"
    );
    let _ = writeln!(
        md,
        "| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
    );
    for row in rows {
        let (base, loaded) = (row.baseline.as_ref(), row.loaded.as_ref());
        let settled = |snap: Option<&Snapshot>| {
            snap.map_or("—".into(), |s| {
                if s.settled {
                    "yes".to_string()
                } else {
                    format!("NO ({:.0} s)", s.settle_seconds)
                }
            })
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            row.connections,
            match row.server {
                Server::Gateway => "gateway",
                Server::Native => "native nats-server",
            },
            mode_text(row.mode),
            base.map_or("—".into(), |s| s.memory.vm_rss.to_string()),
            loaded.map_or("—".into(), |s| s.memory.vm_rss.to_string()),
            bytes(row.per_connection.as_ref().map(|p| p.rss_anon)),
            settled(base),
            settled(loaded),
            row.server_subscriptions
                .map_or("—".into(), |v| format!("{v:.0}")),
            row.gateway_nats_rss_kib
                .map_or("—".into(), |(a, b)| format!("{a} → {b}")),
            row.opened
                .as_ref()
                .map_or("—".into(), |o| format!("{} ({} failed)", o.ok, o.failed)),
        );
    }
    for row in rows {
        if let Some(err) = &row.error {
            let _ = writeln!(
                md,
                "\n- {} {} {}: {err}",
                row.connections,
                row.server.name(),
                row.mode.name()
            );
        }
    }
}

fn limits_text(limits: Option<Nofile>) -> String {
    limits.map_or("unknown".into(), |l| {
        format!("soft {}, hard {}", l.soft, l.hard)
    })
}

fn opt_kib(value: Option<u64>) -> String {
    value.map_or("—".into(), |v| v.to_string())
}

fn describe_run(md: &mut String, report: &Report) {
    let (run, s) = (&report.run, &report.settings);
    let n = s.connections;
    let _ = writeln!(md, "{}", run.md_command());
    let _ = writeln!(
        md,
        "- Date: {} (start; the run took {:.0} s)",
        run.date, run.wall_seconds
    );
    let _ = writeln!(
        md,
        "{}",
        run.md_machine("other work shared the machine (memory numbers do not depend on it)")
    );
    let _ = writeln!(
        md,
        "- {} (one server on a loopback port); echo service: one `ipc-gateway demo-echo --subject {SUBJECT}` process",
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
        "- Open-files limit: this process {}, the gateway {} (this sandbox's hard limit cannot be raised: one gateway process holds at most about 19,900 connections here)",
        limits_text(report.limits.open_files_bench),
        limits_text(report.limits.open_files_gateway)
    );
    let sources = s.source_addresses.len();
    let _ = writeln!(
        md,
        "- Clients: {} client process(es) holding {:?} connections, each bound to one of {} loopback source addresses (127.0.0.2–127.0.0.{}) before connecting; up to {} handshakes in flight per process; client tokio-tungstenite read buffer 4 KiB",
        s.client_processes.len(),
        s.client_processes,
        sources,
        1 + sources,
        s.handshakes_in_flight_per_process
    );
    let _ = writeln!(
        md,
        "- Method: a warm-up connection (ping, one {} B echo, close), then the baseline; {n} connections each do one `{{\"op\":\"ping\",\"id\":1}}` → pong round trip and stay idle (the clients keep reading); then each sends one {} B echo request (JSON text message, at most {} in flight per client process) and gets it back; then all close. Memory is read from /proc once VmRSS moved ≤ {} KiB over {} s (at most {} s). Per connection = (stage − baseline) / {n}.",
        s.big_message_bytes,
        s.big_message_bytes,
        s.big_in_flight_per_process,
        s.settle.max_move_kib,
        s.settle.window_seconds as u64,
        s.settle.cap_seconds as u64
    );
}

fn stages(md: &mut String, report: &Report) {
    let (n, big_bytes) = (
        report.settings.connections,
        report.settings.big_message_bytes,
    );
    let stages = &report.stages;
    let _ = writeln!(md, "\n## Gateway memory by stage\n");
    let _ = writeln!(
        md,
        "| stage | VmRSS KiB | RssAnon KiB | Private_Dirty KiB | settled | ws gauge | gateway FDs | threads |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
    );
    let mut rows: Vec<(String, &Snapshot)> = vec![
        (
            "baseline (after the warm-up connection closed)".into(),
            &stages.baseline,
        ),
        (
            format!("{n} idle connections (one ping each)"),
            &stages.idle,
        ),
    ];
    if let Some(snap) = &stages.after_big_message {
        rows.push((format!("{n} idle, after one {big_bytes} B echo each"), snap));
    }
    rows.push(("after all closed".into(), &stages.after_close));
    for (name, snap) in &rows {
        let m = &snap.memory;
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            m.vm_rss,
            m.rss_anon,
            opt_kib(m.private_dirty),
            if snap.settled {
                format!("yes ({:.1} s)", snap.settle_seconds)
            } else {
                format!("NO (gave up after {:.0} s)", snap.settle_seconds)
            },
            snap.ws_connections
                .map_or("—".into(), |v| format!("{v:.0}")),
            opt_kib(snap.fds),
            opt_kib(snap.threads),
        );
    }
}

fn per_connection(md: &mut String, report: &Report) {
    let n = report.settings.connections;
    let per = &report.per_connection;
    let _ = writeln!(md, "\n## Per connection\n");
    let _ = writeln!(
        md,
        "| stage − baseline, / {n} | VmRSS | RssAnon | Private_Dirty |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    let fmt = |bytes: f64| format!("{bytes:.0} B ({:.2} KiB)", bytes / 1024.0);
    let mut rows: Vec<(String, &PerConn)> = vec![("idle (one ping each)".into(), &per.idle)];
    if let Some(p) = &per.after_big_message {
        rows.push((
            format!(
                "after one {} B echo each",
                report.settings.big_message_bytes
            ),
            p,
        ));
    }
    rows.push(("after all closed (what stays)".into(), &per.after_close));
    for (name, p) in &rows {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            fmt(p.vm_rss),
            fmt(p.rss_anon),
            p.private_dirty.map_or("—".into(), fmt)
        );
    }
}

fn checks(md: &mut String, report: &Report) {
    let n = report.settings.connections;
    let (checks, conns) = (&report.checks, &report.connections);
    let met = |met: bool| if met { "MET" } else { "NOT MET" };
    let idle = checks.idle_rss_per_connection_bytes;
    let _ = writeln!(md, "\n## Checks\n");
    let _ = writeln!(
        md,
        "- **At most {} KiB of RSS per idle connection**: {} ({idle:.0} B per connection; VmRSS)",
        report::LIMIT_BYTES as u64 / 1024,
        met(checks.limit_4kib_met)
    );
    let _ = writeln!(
        md,
        "- **Aim: {} KiB per idle connection**: {} ({idle:.0} B)",
        report::AIM_BYTES as u64 / 1024,
        met(checks.aim_2kib_met)
    );
    let _ = writeln!(
        md,
        "- `ipc_gateway_connections{{frontend=\"ws\"}}` with {n} open: {} ({})",
        report
            .stages
            .idle
            .ws_connections
            .map_or("missing".into(), |v| format!("{v:.0}")),
        if checks.ws_gauge_equals_n {
            "= N, as it should"
        } else {
            "≠ N"
        }
    );
    let big = conns.big_message.as_ref();
    let _ = writeln!(
        md,
        "- Connections: opened {} of {n} in {:.1} s ({} failed); lost while idle: {}; {} echo: {} ok, {} failed; closed {} ({} failed)",
        conns.opened.ok,
        conns.opened.seconds,
        conns.opened.failed,
        big.map_or(conns.closed.lost, |b| b.lost),
        payload_label(report.settings.big_message_bytes),
        big.map_or(0, |b| b.ok),
        big.map_or(0, |b| b.failed),
        conns.closed.ok,
        conns.closed.failed,
    );
    for (name, result) in [
        ("open", Some(&conns.opened)),
        ("echo", big),
        ("close", Some(&conns.closed)),
    ] {
        if let Some(err) = result.and_then(|r| r.first_error.as_deref()) {
            let _ = writeln!(md, "- First {name} error: {err}");
        }
    }
}
