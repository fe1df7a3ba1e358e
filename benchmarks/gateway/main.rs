//! Request-reply benchmark for issue "core": the gateway against direct NATS, on one machine.
//!
//! One run starts ONE nats-server (free loopback port) and ONE echo service
//! (`ipc-gateway demo-echo`), plus one gateway per BENCH_WORKERS value from the release binary
//! (`--worker-threads 1` and `--worker-threads 2` by default, otherwise default settings), and
//! measures, for every payload and concurrency (requests outstanding at once: that many tasks
//! sharing one connection/client):
//!
//! - `direct`: async-nats request-reply from this process (the baseline), on the load
//!   generator's current-thread runtime; `direct, mt client` is the same on a multi-thread
//!   runtime (tokio's default shape), for reference only;
//! - `bare UDS echo`: one Unix-socket round trip to an echo thread in this process that sends
//!   each v1 frame back as its reply, with the same client as the gateway rows (the floor one
//!   extra hop costs; no NATS);
//! - `gateway binary` / `gateway JSON`: through the gateway's socket with
//!   `ipc_gateway::client::Client`, speaking binary frames or JSON lines;
//! - `gateway WS binary` / `gateway WS JSON`: through the gateway's WebSocket (`GET /ws` on its
//!   HTTP port) with the same client over tokio-tungstenite, one v1 binary frame per binary
//!   message or one JSON envelope per text message (not judged by the aims, which are about
//!   the Unix socket);
//! - `gateway gRPC unary`: the `Request` rpc over one HTTP/2 connection (tonic client generated
//!   from proto/gateway.proto), one call per request;
//! - `gateway gRPC Exchange`: requests pipelined on one `Exchange` stream, answers matched by id.
//!
//! Rows at concurrency 1 are repeated (interleaved with the other modes) and reported as the
//! median of the repeats, because single-request latency on this VM depends on CPU placement.
//! Results go to stdout (Markdown) and to `artifacts/bench/latest.{json,md}`.
//!
//! The modules: `settings` (knobs, modes, the schedule), `servers` (the processes and the bare
//! echo), `clients` (one connected client per mode), `load` (the tasks and the measurement),
//! `report` (rows, aims and metadata: the JSON) and `markdown` (the same report as Markdown).
//!
//! Settings (environment): BENCH_SECONDS (measured seconds per row, default 3), BENCH_WARMUP
//! (default 0.5), BENCH_C1_REPEATS (default 5), BENCH_REPEATS (rows at c > 1, default 1),
//! BENCH_CONCURRENCY (default "1,16,256"), BENCH_PAYLOADS (default "128,4096"), BENCH_WORKERS
//! (gateway worker threads, default "1,2"), BENCH_MODES (default
//! "direct,direct-mt,direct-stamped,bare,binary,json,ws-binary,ws-json,grpc-unary,
//! grpc-unary-h2,grpc-exchange"),
//! BENCH_CLIENT_THREADS (load generator runtime: 1 = current-thread, default 1),
//! BENCH_GATEWAY_ARGS (extra `serve` flags, for experiments), IPC_GATEWAY_BIN (the gateway
//! binary; default target/release/ipc-gateway), BENCH_NO_ARTIFACTS=1 (print only),
//! BENCH_COMMAND (the command line recorded in the artifacts; set by benchmarks/run.sh).

#[path = "../common/mod.rs"]
mod common;

mod clients;
mod load;
mod markdown;
mod report;
mod servers;
mod settings;

use std::process::ExitCode;
use std::time::Duration;

use common::{RunMeta, RunSpec, TempDir, write_latest};
use report::Report;
use servers::Servers;
use settings::Settings;

/// The echo service's subject.
const SUBJECT: &str = "bench.echo";
/// Deadline given to every request (the gateway answers TIMEOUT after it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn run() -> Result<(), String> {
    let settings = Settings::from_env()?;
    let mut meta = RunMeta::start(&RunSpec {
        command_var: "BENCH_COMMAND",
        knobs: settings::KNOBS,
        fallback: "cargo bench --bench gateway",
        script: "benchmarks/run.sh",
        full_commit: false,
        binary_sha256: false,
    })?;
    let dir = TempDir::new("ipc-gw-bench")?;
    let servers = Servers::start(&meta.gateway_bin, &dir, &settings)?;
    let results = load::run_all(&settings, &servers)?;
    let gateway_runs = servers.stop();
    meta.finish();

    let report = Report::build(meta, &settings, gateway_runs, results);
    let md = markdown::render(&report);
    println!("{md}");
    if settings.artifacts {
        write_latest(&report.run.artifacts_dir("bench"), &report, &md)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway bench: {err}");
            ExitCode::FAILURE
        }
    }
}
