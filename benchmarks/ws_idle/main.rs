//! Idle WebSocket benchmark (issue 5): how much gateway memory one idle WebSocket connection
//! costs. It owns the measurement and its report, `artifacts/ws-idle/latest.{md,json}`.
//!
//! One run starts ONE nats-server, ONE echo service (`ipc-gateway demo-echo`) and ONE gateway
//! from the release binary (`--max-connections` raised to fit, otherwise default settings plus
//! WSIDLE_GATEWAY_ARGS), then:
//!
//! 1. warm-up: one WebSocket connection does a ping and one echo request of WSIDLE_BIG_BYTES,
//!    and closes; then the gateway's memory is read once it has settled: the baseline;
//! 2. N = WSIDLE_CONNECTIONS (10,000) connections are opened from client processes (this same
//!    binary re-run with WSIDLE_ROLE=client, as many as the open-files limit needs), each bound
//!    to one of WSIDLE_SOURCES loopback source addresses (127.0.0.2, 127.0.0.3, ...) before it
//!    connects, so that no source address runs out of ports. Each does one round trip
//!    (`{"op":"ping","id":1}` → pong) so that it is fully set up, then stays idle (the client
//!    keeps reading, so it answers the gateway's pings). Memory settles and is read again;
//!    `ipc_gateway_connections{frontend="ws"}` from /metrics must equal N;
//! 3. every connection sends one echo request with a WSIDLE_BIG_BYTES payload (4 KiB) and gets
//!    it back (tungstenite's buffers grow to fit and never shrink); memory is read again;
//! 4. every connection is closed; memory is read once more.
//!
//! Then, side by side (compare.rs), the same question for the gateway and for nats-server's own
//! WebSocket listener: for each N in WSIDLE_COMPARE (1,000, 5,000, 19,000) and each mode (idle;
//! one subscription each on one subject; one each on its own subject), fresh servers, a
//! baseline, N connections, and the measured process's RSS per connection (for native: the
//! nats-server serving the WebSocket clients).
//!
//! Memory comes from /proc/PID/status (VmRSS, RssAnon) and /proc/PID/smaps_rollup
//! (Private_Dirty). Per connection = (stage − baseline) / N. The bound is 4 KiB of RSS
//! per idle connection, its aim 2 KiB.
//!
//! Settings (environment): WSIDLE_CONNECTIONS (10000), WSIDLE_SOURCES (source addresses, 4),
//! WSIDLE_BIG_BYTES (4096; 0 skips step 3), WSIDLE_HANDSHAKES (handshakes in flight per client
//! process, 64), WSIDLE_CLIENT_PROCESSES (at least this many client processes, 1),
//! WSIDLE_SETTLE_SECONDS (longest wait for memory to settle, 30), WSIDLE_GATEWAY_ARGS (extra
//! `serve` flags), WSIDLE_COMPARE (the side-by-side Ns; 0 skips them), WSIDLE_COMPARE_SERVERS
//! (gateway,native), WSIDLE_COMPARE_MODES (idle,shared,own), IPC_GATEWAY_BIN,
//! WSIDLE_NO_ARTIFACTS=1 (print only), WSIDLE_COMMAND (the command recorded in the report; set
//! by benchmarks/ws_idle.sh, which also raises `ulimit -n`).
//!
//! The modules: `settings` (the knobs), `ws` (one WebSocket connection of a kind: gateway or
//! native, idle or subscribed; echo, close), `clients` (the client process), `stages` (the
//! parent's side of the client processes), `memory` (a process's memory once it has settled),
//! `run` (the stages in order), `compare` (the side-by-side rows), `report` (per-connection
//! figures and checks: the JSON) and `markdown` (the same report as Markdown).

#[path = "../common/mod.rs"]
mod common;

mod clients;
mod compare;
mod markdown;
mod memory;
mod report;
mod run;
mod settings;
mod stages;
mod ws;

use std::process::ExitCode;
use std::time::Duration;

use common::{RunMeta, RunSpec, TempDir, write_latest};
use report::Report;
use settings::Settings;

const SUBJECT: &str = "wsidle.echo";
/// How long one handshake, round trip or close may take.
const STEP_PATIENCE: Duration = Duration::from_secs(30);
/// How long a client process may take for a whole stage.
const STAGE_PATIENCE: Duration = Duration::from_secs(600);
/// Echo requests in flight at once per client process in step 3 (the gateway's NATS client
/// buffers are shared by all connections; a burst of N at once would grow them).
const BIG_IN_FLIGHT: usize = 64;
/// FDs a client process keeps for itself besides its connections.
const CLIENT_FD_SPARE: u64 = 64;
/// FDs the gateway needs besides its WebSocket connections (listeners, NATS, epoll, logs).
const GATEWAY_FD_SPARE: u64 = 64;
/// Memory has settled when it moved at most this much (KiB) over `SETTLE_WINDOW`.
const SETTLE_KIB: u64 = 64;
const SETTLE_WINDOW: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

fn ws_idle() -> Result<(), String> {
    let settings = Settings::from_env()?;
    let mut meta = RunMeta::start(&RunSpec {
        command_var: "WSIDLE_COMMAND",
        knobs: settings::KNOBS,
        fallback: "cargo bench --bench ws_idle",
        script: "benchmarks/ws_idle.sh",
        full_commit: false,
        binary_sha256: false,
    })?;
    let bin = meta.gateway_bin.clone();
    let run = run::run(&settings, &bin)?;
    let dir = TempDir::new("ipc-gw-wsidle-compare")?;
    let side_by_side = compare::compare(&settings, &bin, &dir.0);
    meta.finish();
    let report = Report::build(meta, run, side_by_side, &settings);
    let md = markdown::render(&report);
    println!("{md}");
    if settings.artifacts {
        write_latest(&report.run.artifacts_dir("ws-idle"), &report, &md)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    if std::env::var("WSIDLE_ROLE").is_ok_and(|role| role == "client") {
        return match clients::client_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ws_idle client: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match ws_idle() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ws_idle bench: {err}");
            ExitCode::FAILURE
        }
    }
}
