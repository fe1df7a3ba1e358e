//! Soak test: steady load on all three front-ends of one gateway for a long time (default two
//! hours), with the policy and the audit log on, nats-server killed (`kill -9`) and restarted
//! every SOAK_RESTART_EVERY_SECONDS and the policy reloaded every SOAK_RELOAD_EVERY_SECONDS,
//! watching the gateway's memory, file descriptors, answers, subscriptions and audit log.
//!
//! One run starts ONE nats-server (free loopback port, with a monitoring port), ONE echo
//! service (`ipc-gateway demo-echo --subject soak.echo`) and ONE gateway from the release
//! binary (`--worker-threads 1 --policy FILE --auth-jwt-secret-file FILE --audit-file FILE`,
//! otherwise default settings). The policy (policy.rs) grants this process's uid, and the
//! bearer-token subjects `soak-ws` and `soak-grpc`, exactly what they use. The load, from this
//! process, all at once:
//!
//! - Requests to the echo service, every reply compared byte for byte with its request
//!   (payloads 64 B to 8 KiB, timeout 2000 ms), each task keeping one request outstanding and
//!   pacing itself to its share of its front-end's rate, backing off after errors (50 ms, the
//!   gateway's `retry_after_ms` after CIRCUIT_OPEN, 100 ms and a reconnect when the connection
//!   is gone): `SOAK_CONNECTIONS` (8) Unix-socket connections, binary frames and JSON lines in
//!   turn, with `SOAK_INFLIGHT` (16) tasks each, `SOAK_RATE` (3000) req/s in all;
//!   `SOAK_WS_CONNECTIONS` (4) WebSocket connections (JSON) with `SOAK_INFLIGHT` tasks each,
//!   `SOAK_WS_RATE` (400) req/s; `SOAK_GRPC_TASKS` (16) tasks of unary gRPC `Request` calls on
//!   one channel, `SOAK_GRPC_RATE` (400) req/s.
//! - Three subscription feeds of numbered messages (feeds.rs): one Unix-socket subscriber on
//!   `soak.events`, which a NATS client publishes to at `SOAK_PUBLISH_RATE` (100) msg/s; and
//!   `SOAK_WS_SUBSCRIBERS` (50) WebSocket subscribers and one gRPC Subscribe stream on
//!   `soak.ws.events`, which a WebSocket client publishes to through the gateway at
//!   `SOAK_WS_PUBLISH_RATE` (20) msg/s. Every subscriber counts gaps, duplicates and `dropped`
//!   notices.
//!
//! Every `SOAK_SAMPLE_SECONDS` (5) the gateway's VmRSS and open FDs (from /proc), its
//! `/metrics` gauges, the interval's rates per front-end and the audit records are sampled and
//! printed. At the end the report judges the five aims decided before the run (report.rs) and
//! goes to `artifacts/soak/<SOAK_REPORT_NAME>.{md,json}` and `<name>-series.csv` (series.rs).
//!
//! Settings (environment): SOAK_SECONDS (default 7200), SOAK_WARMUP_SECONDS (default
//! min(120, SOAK_SECONDS / 6)), SOAK_SAMPLE_SECONDS (5), SOAK_CONNECTIONS (8), SOAK_INFLIGHT
//! (16), SOAK_RATE (3000; 0 = only the pause), SOAK_PAUSE_MS (1), SOAK_PUBLISH_RATE (100),
//! SOAK_RESTART_EVERY_SECONDS (1200; 0 = never), SOAK_OUTAGE_SECONDS (5),
//! SOAK_RELOAD_EVERY_SECONDS (600; 0 = never), SOAK_WS_SUBSCRIBERS (50), SOAK_WS_PUBLISH_RATE
//! (20), SOAK_WS_CONNECTIONS (4), SOAK_WS_RATE (400), SOAK_GRPC_TASKS (16), SOAK_GRPC_RATE
//! (400), SOAK_GATEWAY_ARGS (extra `serve` flags), SOAK_REPORT_NAME (latest), IPC_GATEWAY_BIN
//! (default target/release/ipc-gateway), SOAK_NO_ARTIFACTS=1 (print only), SOAK_COMMAND (the
//! command line recorded in the report; set by benchmarks/soak.sh).
//!
//! The modules: `settings` (the knobs), `stats` (the counters every task shares), `links` (how
//! a client reaches each front-end), `clients` (the request connections, the NATS publisher,
//! the direct probe), `feeds` (the subscribers and the WebSocket publisher), `load` (the
//! request tasks and the load thread), `policy` (identities, tokens, the policy and its
//! reloads), `audit` (reading the audit log as it grows), `samples` (what is sampled every few
//! seconds), `restarts` (nats-server on fixed ports, recovery watching), `run` (the supervisor
//! that starts, kills, restarts, reloads, samples and stops), `report` and `audit_report` (the
//! aims and figures: the JSON), `markdown` (the same report as Markdown) and `series` (the
//! samples as CSV).

#[path = "../common/mod.rs"]
mod common;

mod audit;
mod audit_report;
mod clients;
mod feeds;
mod links;
mod load;
mod markdown;
mod policy;
mod report;
mod restarts;
mod run;
mod samples;
mod series;
mod settings;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use common::{RunMeta, RunSpec, write_named};
use report::Report;
use settings::Settings;

const ECHO_SUBJECT: &str = "soak.echo";
const EVENTS_SUBJECT: &str = "soak.events";
/// The subject of the WebSocket and gRPC feeds, published to through the gateway.
const WS_EVENTS_SUBJECT: &str = "soak.ws.events";
/// A subject the policy grants nobody: the probe after each reload must be refused.
const FORBIDDEN_SUBJECT: &str = "soak.forbidden";
/// Deadline given to every request (the gateway answers TIMEOUT after it).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
/// If the gateway has not answered a request this long after it was sent, the soak stops
/// waiting and counts it as "no answer" (a broken promise: every request gets an answer).
const WATCHDOG: Duration = Duration::from_millis(7000);
/// After the end, requests still outstanding get this long to be answered.
const END_GRACE: Duration = Duration::from_secs(10);
/// Errors this long after a restart's recovery still count to that restart's disruption.
const DISRUPTION_TAIL_MS: u64 = 10_000;
const MIN_PAYLOAD: usize = 64;
const MAX_PAYLOAD: usize = 8192;
/// Upper bound on requests one task sends, on samples kept, on gap events kept.
const MAX_REQUESTS_PER_TASK: u64 = 100_000_000;
const MAX_SAMPLES: usize = 100_000;
const MAX_GAP_EVENTS: usize = 10_000;
const MAX_RESTARTS: usize = 10;

fn soak() -> Result<ExitCode, String> {
    let settings = Settings::from_env()?;
    let mut meta = RunMeta::start(&RunSpec {
        command_var: "SOAK_COMMAND",
        knobs: settings::KNOBS,
        fallback: "cargo bench --bench soak",
        script: "benchmarks/soak.sh",
        full_commit: true,
        binary_sha256: true,
    })?;
    let bin = meta.gateway_bin.clone();
    let (outcome, stats) = run::run(&settings, &bin)?;
    meta.finish();
    let gateway_died = outcome.gateway_died.is_some();
    let logs = (
        outcome.gateway_log.tail.clone(),
        outcome.echo_log_tail.clone(),
    );

    let report = Report::build(meta, outcome, &settings, &stats);
    let name = settings.report_name.as_str();
    let md = markdown::render(&report, name);
    println!("{md}");
    if settings.artifacts {
        let out = report.run.artifacts_dir("soak");
        // The log tails next to the report, best effort.
        if std::fs::create_dir_all(&out).is_ok() {
            let _ = std::fs::write(out.join(format!("{name}-gateway.log")), &logs.0);
            if let Some(echo) = &logs.1 {
                let _ = std::fs::write(out.join(format!("{name}-echo.log")), echo);
            }
        }
        write_named(&out, name, &report, &md)?;
        let csv = out.join(format!("{name}-series.csv"));
        std::fs::write(&csv, series::csv(&report.samples))
            .map_err(|err| format!("{}: {err}", csv.display()))?;
    }
    Ok(if gateway_died {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    soak().unwrap_or_else(|err| {
        eprintln!("soak: {err}");
        ExitCode::FAILURE
    })
}
