//! Memory benchmark (issue 12): what WebSocket connections and subscriptions cost the gateway
//! in RSS, and whether memory comes back after a fan-out burst or after many subscriptions
//! were opened and closed, for one or more gateway binaries (allocators) in the same run. It
//! owns `artifacts/memory/latest.{md,json}`.
//!
//! For each variant (a gateway binary with its environment and extra flags, MEMBENCH_VARIANTS)
//! it runs these scenarios, each against a fresh gateway and one shared nats-server:
//!
//! - `sizes`: N = MEMBENCH_CONNECTIONS (19,000) WebSocket connections, one ping each: idle RSS;
//!   then each subscribes to one subject, the same for all (`mem.all`): RSS. A second fresh
//!   gateway: N connections, each subscribed to a subject of its own (`mem.own.<i>.0`): RSS.
//!   Per connection = (stage − baseline) / N, baseline = the gateway before any connection.
//! - `burst`: MEMBENCH_BURST_SUBSCRIBERS (10,000) connections subscribed to `mem.burst`; a NATS
//!   client publishes MEMBENCH_BURST_MESSAGES (300) messages of MEMBENCH_BURST_BYTES (128) at
//!   once; every connection reads them all; RSS every second until MEMBENCH_AFTER_SECONDS (60)
//!   after the last one arrived.
//! - `churn`: MEMBENCH_CHURN_CONNECTIONS (10,000) connections open MEMBENCH_CHURN_SUBSCRIPTIONS
//!   (50,000) subscriptions in all, each on a subject of its own, then close them all; RSS
//!   every second for MEMBENCH_AFTER_SECONDS.
//!
//! The aim for after a burst or churn: RSS at +60 s ≤ 2 × the RSS just before + 20 MB.
//!
//! The connections live in client processes (this binary again, MEMBENCH_ROLE=client), as in
//! `ws_idle`: each holds as many as its open-files limit allows, bound to loopback source
//! addresses 127.0.0.2.. so that no address runs out of ports.
//!
//! Modules: `settings` (knobs and variants), `client` (the client process), `procs` (the
//! parent's side of the client processes), `scenarios` (the runs and RSS samples), `report`
//! (the JSON structure and its Markdown).

#[path = "../common/mod.rs"]
mod common;

mod client;
mod procs;
mod report;
mod scenarios;
mod settings;

use std::process::ExitCode;
use std::time::Duration;

use common::{RunMeta, RunSpec, write_latest};

/// How long one handshake or one subscribe/unsubscribe round may take per connection.
const STEP_PATIENCE: Duration = Duration::from_secs(60);
/// How long a client process may take for a whole stage.
const STAGE_PATIENCE: Duration = Duration::from_secs(900);
/// FDs a client process keeps for itself besides its connections.
const CLIENT_FD_SPARE: u64 = 64;
/// FDs the gateway needs besides its WebSocket connections.
const GATEWAY_FD_SPARE: u64 = 64;
/// Memory has settled when VmRSS moved at most this much (KiB) over `SETTLE_WINDOW`.
const SETTLE_KIB: u64 = 64;
const SETTLE_WINDOW: Duration = Duration::from_secs(2);

fn memory() -> Result<(), String> {
    let settings = settings::Settings::from_env()?;
    let mut meta = RunMeta::start(&RunSpec {
        command_var: "MEMBENCH_COMMAND",
        knobs: settings::KNOBS,
        fallback: "cargo bench --bench memory",
        script: "benchmarks/memory.sh",
        full_commit: false,
        binary_sha256: false,
    })?;
    let variants = scenarios::run_all(&settings, &meta.gateway_bin)?;
    meta.finish();
    let report = report::Report::build(meta, &settings, variants);
    let md = report::markdown(&report);
    println!("{md}");
    if settings.artifacts {
        write_latest(&report.meta.artifacts_dir("memory"), &report, &md)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = if std::env::var("MEMBENCH_ROLE").is_ok_and(|role| role == "client") {
        client::client_main()
    } else {
        memory()
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("memory bench: {err}");
            ExitCode::FAILURE
        }
    }
}
