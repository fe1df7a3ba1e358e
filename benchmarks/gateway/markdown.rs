//! The report (report.rs) rendered as Markdown: the run's description, the results table, the
//! errors and the aims. Every number comes from the `Report`, as written to `latest.json`.

use std::fmt::Write as _;

use crate::SUBJECT;
use crate::common::{fmt_opt, payload_label};
use crate::report::{AimCheck, Report, Row};

pub fn render(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# ipc-gateway benchmark: request-reply, gateway vs direct NATS\n"
    );
    describe_run(&mut md, report);
    let _ = writeln!(md, "## Results\n");
    results_table(&mut md, &report.rows);
    errors(&mut md, &report.rows);
    let _ = writeln!(md, "\n## Aims\n");
    aim_section(
        &mut md,
        &report.aims,
        "throughput_c256",
        "Aim 1: gateway ≥ 0.9 × direct throughput at concurrency 256",
    );
    aim_section(
        &mut md,
        &report.aims,
        "latency_c1",
        "Aim 2: at concurrency 1, gateway p50 ≤ direct p50 + bare-socket round trip p50 + 10 µs (medians of the repeats)",
    );
    md
}

fn describe_run(md: &mut String, report: &Report) {
    let (run, settings) = (&report.run, &report.settings);
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
            "everything (nats-server, echo service, gateway, load generator) shares these CPUs, unpinned"
        )
    );
    let _ = writeln!(
        md,
        "- {} (one server on a loopback port); echo service: one `ipc-gateway demo-echo --subject {SUBJECT}` process",
        run.nats_server_version
    );
    let _ = writeln!(
        md,
        "- Gateway: `{}` (built {}); source when the run started: git {}{}; started as:",
        report.gateway.binary.binary,
        report.gateway.binary.binary_built,
        run.git_at_start.commit,
        run.md_uncommitted()
    );
    for gateway in &report.gateway.runs {
        let _ = writeln!(
            md,
            "  - `ipc-gateway {}` (worker threads {})",
            gateway.args, gateway.worker_threads
        );
    }
    let _ = writeln!(
        md,
        "- Load generator: this process, tokio {} runtime; concurrency c = c tasks sharing one connection (one `async_nats::Client` for direct; one `ipc_gateway::client::Client` for binary, for JSON lines (`WireFormat::JsonLines`) and for the bare echo; one HTTP/2 connection for gRPC: a call per request for unary, one `Exchange` stream for Exchange)",
        if settings.load_generator_threads == 1 {
            "current-thread".to_string()
        } else {
            format!("{}-worker", settings.load_generator_threads)
        }
    );
    let _ = writeln!(
        md,
        "- Identity headers: the gateways stamp `--identity-headers {}`; for this process as a Unix-socket caller that is {} header(s) ({}), and \"direct + identity headers\" sends the same",
        serde_json::to_value(settings.identity_headers)
            .ok()
            .and_then(|form| form.as_str().map(str::to_owned))
            .unwrap_or_default(),
        settings.identity_header_names.len(),
        settings
            .identity_header_names
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if settings.modes.iter().any(|m| m.is_websocket()) {
        let _ = writeln!(
            md,
            "- WebSocket rows: one tokio-tungstenite connection to the gateway's `GET /ws` on its HTTP port (loopback TCP, TCP_NODELAY on the client side), carrying the same `ipc_gateway::client::Client` (`Client::over_messages`), pipelined the same way: \"WS binary\" sends one v1 binary frame per binary message, \"WS JSON\" one JSON envelope per text message; replies are matched by id. The aims below are checked on the Unix-socket rows only."
        );
    }
    let _ = writeln!(
        md,
        "- Each row: {:.1} s warm-up, then {:.1} s measured; req/s = replies completed in the measured window / its length; latency = send to reply, µs",
        settings.warmup_seconds, settings.seconds
    );
    let _ = writeln!(
        md,
        "- Rows at c=1 were run {} times, interleaved with the other modes (latency at c=1 depends on which CPUs the processes land on); each c=1 column is the median of its repeats, and \"p50 spread\" gives their min–max. Rows at c>1 were run {} time(s).",
        settings.c1_repeats, settings.repeats
    );
    let _ = writeln!(
        md,
        "- \"× direct\" = the row's req/s / direct's at the same c and payload (the aims use this baseline: the async-nats client on the same current-thread runtime as every other client here); \"× mt\" = the same over \"direct, mt client\" (async-nats on a multi-thread runtime with one worker per CPU, tokio's default shape), for reference only; \"gw CPU\" = gateway process CPU (user+sys) per completed request, µs, from /proc at 100 Hz tick resolution; \"nats CPU\" and \"echo CPU\" the same for the nats-server and the echo service (what a request costs the rest of the path: the gateway's identity headers are parsed by the service's NATS client on every request); \"client CPU\" the same for this process, the load generator (its clients and its bookkeeping). In the gRPC unary rows the machine is about 30 % idle (vmstat, 2026-12-06): the tonic client and the gateway mostly take turns, a batch of calls at a time, and req/s comes out near 1 / (client CPU + gw CPU); the client's share caps that row whatever the gateway costs. The \"gRPC unary, h2 client\" rows make the same calls from a client on the h2 crate alone (the request encoded once; no tonic codec, tower buffer or hyper on the client side): same server, a cheaper client.\n"
    );
}

fn results_table(md: &mut String, rows: &[Row]) {
    let _ = writeln!(
        md,
        "| mode | gw threads | c | payload | req/s | p50 µs | p99 µs | p99.9 µs | × direct | × mt | gw CPU µs/req | nats CPU µs/req | echo CPU µs/req | client CPU µs/req | p50 spread | errors |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
    );
    for row in rows {
        let spread = row.p50_spread_us.map_or("—".into(), |[min, max]| {
            format!("{min:.1}–{max:.1} ({}×)", row.runs.len())
        });
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.mode.name(),
            row.gateway_worker_threads
                .map_or("—".into(), |w| w.to_string()),
            row.concurrency,
            payload_label(row.payload_bytes),
            row.req_per_s,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            fmt_opt(row.ratio, 2),
            fmt_opt(row.ratio_mt, 2),
            fmt_opt(row.gateway_cpu_us, 1),
            fmt_opt(row.nats_server_cpu_us, 1),
            fmt_opt(row.echo_service_cpu_us, 1),
            fmt_opt(row.client_cpu_us, 1),
            spread,
            row.errors,
        );
    }
}

fn errors(md: &mut String, rows: &[Row]) {
    let errors: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.runs.iter().filter_map(move |m| {
                m.first_error.as_ref().map(|e| {
                    format!(
                        "{} c={} {}: {} errors, e.g. {e}",
                        row.mode.name(),
                        row.concurrency,
                        payload_label(row.payload_bytes),
                        m.errors
                    )
                })
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "\nErrors:\n");
        for e in errors {
            let _ = writeln!(md, "- {e}");
        }
    }
}

fn aim_section(md: &mut String, aims: &[AimCheck], aim: &str, title: &str) {
    let checks: Vec<&AimCheck> = aims.iter().filter(|a| a.aim == aim).collect();
    let met = checks.iter().filter(|a| a.met).count();
    let verdict = if checks.is_empty() {
        "NOT MEASURED in this run".to_string()
    } else if met == checks.len() {
        format!("MET in this run (all {} gateway rows)", checks.len())
    } else if met == 0 {
        format!("NOT MET in this run (0 of {} gateway rows)", checks.len())
    } else {
        format!(
            "PARTLY MET in this run ({met} of {} gateway rows)",
            checks.len()
        )
    };
    let _ = writeln!(md, "**{title}**: {verdict}\n");
    for check in checks {
        let _ = writeln!(
            md,
            "- {} {}, {} worker thread(s): {} — {}",
            check.mode.name(),
            payload_label(check.payload_bytes),
            check.gateway_worker_threads,
            check.detail,
            if check.met { "met" } else { "not met" }
        );
    }
    let _ = writeln!(md);
}
