//! The parent's run, stage by stage: start nats-server, the echo service and the gateway; a
//! warm-up connection and the baseline; N idle connections from the client processes; one
//! larger echo on each; close; the gateway's memory read after each stage.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{self, Proc, START_PATIENCE, TempDir, nofile_limit, start_echo, start_nats};
use crate::memory::{Snapshot, settle, wait_for_gauge};
use crate::settings::Settings;
use crate::stages::{ClientProc, StageResult, stage};
use crate::ws::{Mode, Server, big_request, close, open, source_address};
use crate::{CLIENT_FD_SPARE, GATEWAY_FD_SPARE, SUBJECT};

/// What the run measured, for the report.
pub struct Run {
    /// The `ipc-gateway` arguments the gateway was started with.
    pub gateway_args: String,
    /// Open-files limits (soft, hard) of this process and of the gateway.
    pub bench_nofile: Nofile,
    pub gateway_nofile: Nofile,
    /// How many connections each client process held.
    pub client_processes: Vec<usize>,
    pub baseline: Snapshot,
    pub opened: StageResult,
    pub idle: Snapshot,
    pub big: Option<(StageResult, Snapshot)>,
    pub closed: StageResult,
    pub after_close: Snapshot,
}

pub fn run(settings: &Settings, bin: &Path) -> Result<Run, String> {
    let n = settings.connections;
    let (bench_nofile, client_counts) = plan_clients(settings)?;
    let dir = TempDir::new("ipc-gw-wsidle")?;
    let (_nats, nats_url) = start_nats(&dir.0)?;
    let _echo = start_echo(bin, &nats_url, SUBJECT, &dir.0)?;
    let (mut gateway, args, http) = start_gateway(bin, &nats_url, &dir, settings)?;
    let pid = gateway.pid();
    let gateway_nofile = nofile_limit(&pid.to_string());

    eprintln!(
        "warm-up connection (ping, one {} B echo, close)...",
        settings.big_bytes
    );
    warm_up(http, settings.big_bytes)?;
    wait_for_gauge(http, 0.0, Duration::from_secs(10));
    let baseline = settle(pid, Some(http), settings.settle)?;
    eprintln!("baseline: VmRSS {} KiB", baseline.memory.vm_rss);

    let mut clients = start_clients(&client_counts, http, settings)?;
    let opened = stage(&mut clients, None, "opened")?;
    eprintln!(
        "opened {} ({} failed) in {:.1} s",
        opened.ok, opened.failed, opened.seconds
    );
    if opened.ok != n {
        return Err(format!(
            "only {} of {n} connections opened; first error: {}",
            opened.ok,
            opened.first_error.as_deref().unwrap_or("-")
        ));
    }
    wait_for_gauge(http, n as f64, Duration::from_secs(10));
    let idle = settle(pid, Some(http), settings.settle)?;
    eprintln!("{n} idle: VmRSS {} KiB", idle.memory.vm_rss);

    let big = big_stage(&mut clients, pid, http, settings)?;
    let closed = stage(&mut clients, Some("close"), "closed")?;
    eprintln!(
        "closed {} ({} failed) in {:.1} s",
        closed.ok, closed.failed, closed.seconds
    );
    for client in &mut clients {
        client.0.proc.stop();
    }
    wait_for_gauge(http, 0.0, Duration::from_secs(20));
    let after_close = settle(pid, Some(http), settings.settle)?;
    eprintln!("after close: VmRSS {} KiB", after_close.memory.vm_rss);
    gateway.stop();

    Ok(Run {
        gateway_args: args.join(" "),
        bench_nofile,
        gateway_nofile,
        client_processes: client_counts,
        baseline,
        opened,
        idle,
        big,
        closed,
        after_close,
    })
}

/// An open-files limit: (soft, hard).
type Nofile = Option<(u64, u64)>;

/// Checks the open-files limit (the gateway inherits it and needs one FD per connection) and
/// spreads the connections over client processes, each holding at most its limit less a
/// spare. Returns this process's limit and the connections per client process.
fn plan_clients(settings: &Settings) -> Result<(Nofile, Vec<usize>), String> {
    let n = settings.connections;
    let bench_nofile = nofile_limit("self");
    let soft = bench_nofile.map_or(1024, |(soft, _)| soft);
    if n as u64 + GATEWAY_FD_SPARE > soft {
        return Err(format!(
            "{n} connections need about {} open files in the gateway, but `ulimit -n` is {soft} (hard {}): lower WSIDLE_CONNECTIONS or raise the limit (benchmarks/ws_idle.sh raises it to the hard limit)",
            n as u64 + GATEWAY_FD_SPARE,
            bench_nofile.map_or("unknown".into(), |(_, hard)| hard.to_string())
        ));
    }
    let per_process = (soft - CLIENT_FD_SPARE) as usize;
    let processes = n
        .div_ceil(per_process)
        .max(settings.min_client_processes)
        .min(n);
    let counts = (0..processes)
        .map(|i| n / processes + usize::from(i < n % processes))
        .collect();
    Ok((bench_nofile, counts))
}

/// The gateway, with room for N connections; its arguments and HTTP port.
fn start_gateway(
    bin: &Path,
    nats_url: &str,
    dir: &TempDir,
    settings: &Settings,
) -> Result<(Proc, Vec<String>, u16), String> {
    common::start_gateway(
        bin,
        nats_url,
        &dir.0,
        settings.connections + 16,
        &settings.gateway_args,
        "gateway",
    )
}

/// The warm-up connection: a ping, one big echo request (retried until the echo service has
/// subscribed), a close.
fn warm_up(port: u16, big_bytes: usize) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(async {
        let mut ws = open(port, source_address(0, 1), Server::Gateway, Mode::Idle, 0).await?;
        let deadline = Instant::now() + START_PATIENCE;
        let size = big_bytes.max(1);
        while let Err(err) = big_request(&mut ws, size).await {
            if Instant::now() >= deadline {
                return Err(format!("warm-up: the echo service did not answer: {err}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        close(ws).await
    })
}

/// The client processes: this bench binary again, with WSIDLE_ROLE=client.
fn start_clients(
    counts: &[usize],
    http: u16,
    settings: &Settings,
) -> Result<Vec<ClientProc>, String> {
    let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
    let mut clients = Vec::new();
    let mut first = 0;
    for &count in counts {
        let kind = (Server::Gateway, Mode::Idle);
        clients.push(ClientProc::start(&exe, http, first, count, kind, settings)?);
        first += count;
    }
    eprintln!(
        "opening {} connections from {} client process(es), {} source address(es)...",
        settings.connections,
        clients.len(),
        settings.sources
    );
    Ok(clients)
}

/// Step 3: one larger echo request on every connection, then the memory (skipped when
/// WSIDLE_BIG_BYTES is 0).
fn big_stage(
    clients: &mut [ClientProc],
    pid: u32,
    http: u16,
    settings: &Settings,
) -> Result<Option<(StageResult, Snapshot)>, String> {
    if settings.big_bytes == 0 {
        return Ok(None);
    }
    let result = stage(clients, Some("big"), "big")?;
    eprintln!(
        "{} B echo on every connection: {} ok, {} failed in {:.1} s",
        settings.big_bytes, result.ok, result.failed, result.seconds
    );
    let snapshot = settle(pid, Some(http), settings.settle)?;
    eprintln!(
        "after the big message: VmRSS {} KiB",
        snapshot.memory.vm_rss
    );
    Ok(Some((result, snapshot)))
}
