//! Soak test: steady load through the gateway for a long time (default 30 minutes), with NATS
//! killed (`kill -9`) and restarted in the middle, watching the gateway's memory and file
//! descriptors.
//!
//! One run starts ONE nats-server (free loopback port, with a monitoring port), ONE echo
//! service (`ipc-gateway demo-echo --subject soak.echo`) and ONE gateway from the release
//! binary (`--worker-threads 1`, otherwise default settings). The load, from this process:
//!
//! - `SOAK_CONNECTIONS` (8) client connections (`ipc_gateway::client::Client`, binary frames),
//!   each with `SOAK_INFLIGHT` (16) tasks that each keep one request outstanding; after each
//!   answer a task pauses at least `SOAK_PAUSE_MS` (1 ms) and paces itself so that all tasks
//!   together send about `SOAK_RATE` (4000) requests per second. Payloads are 64 B to 8 KiB
//!   (uniform), every reply is compared byte for byte with its request, timeout 2000 ms.
//!   After an error a task backs off: 50 ms after UNAVAILABLE (and most other codes), the
//!   gateway's `retry_after_ms` (at most 1 s) after CIRCUIT_OPEN, 100 ms and a reconnect when
//!   the connection is gone.
//! - one subscriber connection on `soak.events`, which a NATS client in this process publishes
//!   to at `SOAK_PUBLISH_RATE` (100) messages per second, each with a sequence number; the
//!   subscriber counts deliveries, gaps, duplicates and `dropped` notices.
//!
//! At 1/3 and 2/3 of the run (`SOAK_RESTARTS` = 2) nats-server is killed with SIGKILL and
//! started again on the same ports after `SOAK_OUTAGE_SECONDS` (5). Every `SOAK_SAMPLE_SECONDS`
//! (5) the gateway's VmRSS and open FDs (from /proc), its `/metrics` gauges
//! `ipc_gateway_connections` and `ipc_gateway_inflight_requests`, and the interval's request
//! rate are sampled and printed. At the end, every request must have ended with a reply or an
//! error (sent == replies + errors); the report goes to `artifacts/soak/latest.{md,json}`.
//!
//! Settings (environment): SOAK_SECONDS (default 1800), SOAK_WARMUP_SECONDS (default
//! min(120, SOAK_SECONDS / 6)), SOAK_SAMPLE_SECONDS (5), SOAK_CONNECTIONS (8), SOAK_INFLIGHT
//! (16), SOAK_RATE (4000; 0 = only the pause), SOAK_PAUSE_MS (1), SOAK_PUBLISH_RATE (100),
//! SOAK_RESTARTS (2), SOAK_OUTAGE_SECONDS (5), SOAK_GATEWAY_ARGS (extra `serve` flags),
//! IPC_GATEWAY_BIN (default target/release/ipc-gateway), SOAK_NO_ARTIFACTS=1 (print only),
//! SOAK_COMMAND (the command line recorded in the report; set by benchmarks/soak.sh).
//!
//! The modules: `settings` (the knobs), `stats` (the counters every task shares), `clients`
//! (the gateway connections, the subscriber, the publisher, the direct probe), `load` (the
//! request tasks and the load thread), `samples` (what is sampled every few seconds),
//! `restarts` (nats-server on fixed ports, recovery watching), `run` (the supervisor that
//! starts, kills, restarts, samples and stops), `report` (the aims and figures: the JSON) and
//! `markdown` (the same report as Markdown).

#[path = "../common/mod.rs"]
mod common;

mod clients;
mod load;
mod markdown;
mod report;
mod restarts;
mod run;
mod samples;
mod settings;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use common::{RunMeta, RunSpec, write_latest};
use report::Report;
use settings::Settings;

const ECHO_SUBJECT: &str = "soak.echo";
const EVENTS_SUBJECT: &str = "soak.events";
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
    let md = markdown::render(&report);
    println!("{md}");
    if settings.artifacts {
        let out = report.run.artifacts_dir("soak");
        // The log tails next to the report, best effort.
        if std::fs::create_dir_all(&out).is_ok() {
            let _ = std::fs::write(out.join("latest-gateway.log"), &logs.0);
            if let Some(echo) = &logs.1 {
                let _ = std::fs::write(out.join("latest-echo.log"), echo);
            }
        }
        write_latest(&out, &report, &md)?;
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
