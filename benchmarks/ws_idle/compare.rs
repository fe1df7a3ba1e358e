//! The side-by-side runs: RSS per idle WebSocket connection on the gateway and on nats-server's
//! own WebSocket listener, for each N in WSIDLE_COMPARE (1,000, 5,000, 19,000) and each mode:
//! idle, one subscription each on one shared subject, one subscription each on its own subject.
//!
//! Every row starts fresh servers, so that memory freed by an earlier row cannot be reused
//! (glibc and Go both keep what they freed): for the gateway, a nats-server and a gateway
//! (`--max-connections N+16`, plus WSIDLE_GATEWAY_ARGS); for native, a nats-server with
//! `websocket { no_tls: true }`. One warm-up connection of the row's kind opens and closes,
//! the measured process (the gateway, or the native nats-server) settles: the baseline. Then N
//! connections open from client processes, set themselves up (gateway: a ping, or a subscribe
//! and its ack; native: CONNECT, the SUB if any, PING → PONG) and stay idle; the process
//! settles again. Per connection = (loaded − baseline) / N. For the gateway the RSS of its
//! nats-server is read too: the gateway's subscriptions are nats-server subscriptions there.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::CLIENT_FD_SPARE;
use crate::common::{
    NatsServer, Proc, http_get, metric_sum, nofile_limit, proc_status, start_gateway,
    start_nats_server,
};
use crate::memory::{Snapshot, settle, wait_for_gauge};
use crate::report::{PerConn, per_connection};
use crate::settings::Settings;
use crate::stages::{ClientProc, StageResult, stage};
use crate::ws::{Mode, Server, close, open, source_address};

#[derive(Serialize)]
pub struct Row {
    pub connections: usize,
    pub server: Server,
    pub mode: Mode,
    /// The measured process: the gateway, or the native nats-server.
    pub baseline: Option<Snapshot>,
    pub loaded: Option<Snapshot>,
    pub per_connection: Option<PerConn>,
    /// The gateway's nats-server (gateway rows): VmRSS at the baseline and loaded, KiB, and
    /// the difference per connection in bytes.
    pub gateway_nats_rss_kib: Option<(u64, u64)>,
    pub gateway_nats_per_connection_bytes: Option<f64>,
    /// `ipc_gateway_subscriptions`, or the native nats-server's /varz `subscriptions` (which
    /// also counts the server's own), with the N connections open.
    pub server_subscriptions: Option<f64>,
    pub client_processes: Vec<usize>,
    pub opened: Option<StageResult>,
    pub closed: Option<StageResult>,
    pub error: Option<String>,
}

pub fn compare(settings: &Settings, bin: &Path, dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for &n in &settings.compare {
        for &mode in &settings.compare_modes {
            for &server in &settings.compare_servers {
                eprintln!(
                    "side by side: {} connections, {}, {}",
                    n,
                    server.name(),
                    mode.name()
                );
                let row = one(n, server, mode, settings, bin, dir);
                match (&row.per_connection, &row.error) {
                    (_, Some(err)) => eprintln!("   failed: {err}"),
                    (Some(per), None) => eprintln!("   {:.0} B per connection", per.vm_rss),
                    _ => {}
                }
                rows.push(row);
            }
        }
    }
    rows
}

/// The connections per client process for `n`: as few processes as the open-files limit allows.
fn split(n: usize) -> Vec<usize> {
    let soft = nofile_limit("self").map_or(1024, |(soft, _)| soft);
    let per_process = (soft.saturating_sub(CLIENT_FD_SPARE) as usize).max(1);
    let processes = n.div_ceil(per_process).max(1);
    (0..processes)
        .map(|i| n / processes + usize::from(i < n % processes))
        .collect()
}

fn one(n: usize, server: Server, mode: Mode, s: &Settings, bin: &Path, dir: &Path) -> Row {
    let mut row = Row {
        connections: n,
        server,
        mode,
        baseline: None,
        loaded: None,
        per_connection: None,
        gateway_nats_rss_kib: None,
        gateway_nats_per_connection_bytes: None,
        server_subscriptions: None,
        client_processes: split(n),
        opened: None,
        closed: None,
        error: None,
    };
    let sub = dir.join(format!("{}-{}-{n}", server.name(), mode.name()));
    if let Err(err) = std::fs::create_dir_all(&sub)
        .map_err(|err| format!("{}: {err}", sub.display()))
        .and_then(|()| measure(&mut row, s, bin, &sub))
    {
        row.error = Some(err);
    }
    let _ = std::fs::remove_dir_all(&sub);
    row
}

/// The servers of one row: the process to measure, its port for clients, its /metrics port.
struct RowServers {
    nats: NatsServer,
    gateway: Option<(Proc, u16)>,
}

impl RowServers {
    fn start(
        server: Server,
        n: usize,
        s: &Settings,
        bin: &Path,
        dir: &Path,
    ) -> Result<Self, String> {
        match server {
            Server::Gateway => {
                let nats = start_nats_server(dir, "nats", false)?;
                let (gateway, _, http) =
                    start_gateway(bin, &nats.url, dir, n + 16, &s.gateway_args, "gateway")?;
                Ok(RowServers {
                    nats,
                    gateway: Some((gateway, http)),
                })
            }
            Server::Native => Ok(RowServers {
                nats: start_nats_server(dir, "nats", true)?,
                gateway: None,
            }),
        }
    }

    fn pid(&self) -> u32 {
        match &self.gateway {
            Some((gateway, _)) => gateway.pid(),
            None => self.nats.pid(),
        }
    }

    fn http(&self) -> Option<u16> {
        self.gateway.as_ref().map(|(_, http)| *http)
    }

    fn client_port(&self) -> u16 {
        match &self.gateway {
            Some((_, http)) => *http,
            None => self.nats.ws_port.unwrap_or(0),
        }
    }

    fn subscriptions(&self) -> Option<f64> {
        match self.http() {
            Some(http) => http_get(http, "/metrics")
                .and_then(|(_, body)| metric_sum(&body, "ipc_gateway_subscriptions")),
            None => self.nats.varz("subscriptions"),
        }
    }
}

fn measure(row: &mut Row, s: &Settings, bin: &Path, dir: &Path) -> Result<(), String> {
    let (n, server, mode) = (row.connections, row.server, row.mode);
    let servers = RowServers::start(server, n, s, bin, dir)?;
    let port = servers.client_port();
    warm_up(port, server, mode, n)?;
    if let Some(http) = servers.http() {
        wait_for_gauge(http, 0.0, Duration::from_secs(10));
    }
    let pid = servers.pid();
    let baseline = settle(pid, servers.http(), s.settle)?;
    let nats_before = proc_status(servers.nats.pid()).map(|(rss, _)| rss);

    let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
    let mut clients = Vec::new();
    let mut first = 0;
    for &count in &row.client_processes {
        clients.push(ClientProc::start(
            &exe,
            port,
            first,
            count,
            (server, mode),
            s,
        )?);
        first += count;
    }
    let opened = stage(&mut clients, None, "opened")?;
    row.opened = Some(opened.clone());
    if opened.ok != n {
        return Err(format!(
            "only {} of {n} connections opened; first error: {}",
            opened.ok,
            opened.first_error.as_deref().unwrap_or("-")
        ));
    }
    if let Some(http) = servers.http() {
        wait_for_gauge(http, n as f64, Duration::from_secs(10));
    }
    let loaded = settle(pid, servers.http(), s.settle)?;
    row.server_subscriptions = servers.subscriptions();
    if server == Server::Gateway {
        let nats_after = proc_status(servers.nats.pid()).map(|(rss, _)| rss);
        if let (Some(before), Some(after)) = (nats_before, nats_after) {
            row.gateway_nats_rss_kib = Some((before, after));
            row.gateway_nats_per_connection_bytes =
                Some((after as f64 - before as f64) * 1024.0 / n as f64);
        }
    }
    row.per_connection = Some(per_connection(&loaded, &baseline, n));
    row.baseline = Some(baseline);
    row.loaded = Some(loaded);
    row.closed = Some(stage(&mut clients, Some("close"), "closed")?);
    for client in &mut clients {
        client.0.proc.stop();
    }
    Ok(())
}

/// One connection of the row's kind opens and closes before the baseline is read.
fn warm_up(port: u16, server: Server, mode: Mode, index: usize) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(async {
        let ws = open(port, source_address(0, 1), server, mode, index).await?;
        close(ws).await
    })
}
