//! Fan-out benchmark (issue 12): one subject, K WebSocket subscribers, side by side through the
//! gateway and through nats-server's own WebSocket listener, in the same run. It owns the
//! measurement and its report, `artifacts/fanout/latest.{md,json}`.
//!
//! One run starts TWO nats-servers (each from a config file with a monitoring port): one for
//! the gateway, and one with its own WebSocket listener (`websocket { no_tls: true }`) for the
//! native path; and ONE gateway from the release binary on the first (`--max-connections`
//! raised to fit, otherwise default settings plus FANOUT_GATEWAY_ARGS). A publisher in this
//! process (async-nats) publishes on NATS directly to `fan.x`, on the nats-server of the path
//! being measured. Then for each K in FANOUT_KS (100, 1,000, 10,000) and each path:
//!
//! - gateway: K WebSocket clients on the gateway's `GET /ws` each send
//!   `{"op":"subscribe","id":"s","subject":"fan.x"}` and wait for the ack;
//! - native: K WebSocket clients on nats-server's listener each send `CONNECT
//!   {"verbose":false,"pedantic":false}`, `SUB fan.x 1`, `PING` and wait for the PONG.
//!
//! The clients live in client processes: this binary again with FANOUT_ROLE=client, each
//! holding up to FANOUT_PER_PROCESS (5,000) connections on one thread (at least
//! FANOUT_CLIENT_PROCESSES = 2 processes), answering the parent's
//! commands over stdin/stdout. Then the phases: idle (nothing published: what the connections
//! cost at rest), sustained (FANOUT_RATE deliveries a second, i.e. FANOUT_RATE / K messages a
//! second, for FANOUT_SECONDS), burst (FANOUT_BURST = 300 messages at once) and max rate (the
//! publisher as fast as it can for FANOUT_SECONDS). In each: deliveries counted by the
//! clients, `dropped` notices, latency (the payload carries the send time; clients on the same
//! host compute now − send time), CPU of every process from /proc, and the loss signals of the
//! servers (the gateway's /metrics, nats-server's /varz `slow_consumers` and its log).
//!
//! Settings (environment): FANOUT_KS, FANOUT_PATHS, FANOUT_SECONDS, FANOUT_RATE, FANOUT_BURST,
//! FANOUT_PAYLOAD, FANOUT_PER_PROCESS, FANOUT_CLIENT_PROCESSES, FANOUT_SOURCES,
//! FANOUT_HANDSHAKES, FANOUT_DRAIN_SECONDS, FANOUT_MAX_DRAIN_SECONDS, FANOUT_IDLE_SECONDS,
//! FANOUT_GATEWAY_ARGS, IPC_GATEWAY_BIN, FANOUT_NO_ARTIFACTS=1 (print only), FANOUT_COMMAND
//! (the command recorded in the report; set by benchmarks/fanout.sh).
//!
//! The modules: `settings` (the knobs and the two paths), `hist` (the latency histogram the
//! clients send back), `clients` (the client process), `fleet` (the parent's side of the
//! client processes), `publisher`, `servers` (the nats-servers, the gateway, their loss
//! signals), `cpu` (CPU time from /proc between two marks), `run` (the cases and phases),
//! `report` (the JSON) and `markdown` (the same report as Markdown).

#[path = "../common/mod.rs"]
mod common;

mod clients;
mod cpu;
mod fleet;
mod hist;
mod markdown;
mod publisher;
mod report;
mod run;
mod servers;
mod settings;
mod sweep;

use std::process::ExitCode;
use std::time::Duration;

use common::{RunMeta, RunSpec, write_latest};
use report::Report;
use settings::Settings;

const SUBJECT: &str = "fan.x";
/// How long one connect, handshake or subscribe may take.
const STEP_PATIENCE: Duration = Duration::from_secs(60);
/// FDs a client process keeps for itself besides its connections.
const CLIENT_FD_SPARE: u64 = 64;
/// FDs the gateway (and nats-server) need besides the WebSocket connections.
const GATEWAY_FD_SPARE: u64 = 64;

fn fanout() -> Result<(), String> {
    let settings = Settings::from_env()?;
    let mut meta = RunMeta::start(&RunSpec {
        command_var: "FANOUT_COMMAND",
        knobs: settings::KNOBS,
        fallback: "cargo bench --bench fanout",
        script: "benchmarks/fanout.sh",
        full_commit: false,
        binary_sha256: false,
    })?;
    let bin = meta.gateway_bin.clone();
    let run = run::run(&settings, &bin)?;
    meta.finish();
    let report = Report::build(meta, run, &settings);
    let md = markdown::render(&report);
    println!("{md}");
    if settings.artifacts {
        write_latest(&report.run.artifacts_dir("fanout"), &report, &md)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    if std::env::var("FANOUT_ROLE").is_ok_and(|role| role == "client") {
        return match clients::client_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("fanout client: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match fanout() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fanout bench: {err}");
            ExitCode::FAILURE
        }
    }
}
