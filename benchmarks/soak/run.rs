//! The supervisor: starts nats-server, the echo service and the gateway (with the soak's policy,
//! JWT secret and audit log), measures the idle gateway, starts the load (load.rs) in its own
//! thread, then kills and restarts nats-server and reloads the policy on schedule, samples the
//! gateway and reads its audit log until the end; at the end it stops the load, measures the
//! idle gateway again, stops everything, reads the rest of the audit log and hands the
//! `Outcome` to the report.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc_gateway::client::Client;

use crate::audit::AuditTail;
use crate::common::{
    Proc, START_PATIENCE, TempDir, fd_count, fd_kinds, free_port, http_get, log_file, metric_sum,
    proc_status, ticks_per_second, wait_ready,
};
use crate::load::{Endpoints, LoadHandles, run_load};
use crate::policy::{Identities, Reload};
use crate::restarts::{Reconnected, Restart, start_nats, watch_recovery};
use crate::samples::{Pids, Probe, Sample, Totals, phase_at, print_sample, totals};
use crate::settings::Settings;
use crate::stats::Stats;
use crate::{ECHO_SUBJECT, MAX_SAMPLES, REQUEST_TIMEOUT};

/// Largest log tail copied next to the report.
pub const LOG_TAIL_BYTES: u64 = 256 * 1024;

/// What the run saw, for the report.
pub struct Outcome {
    pub samples: Vec<Sample>,
    /// The idle gateway before the load: RSS (KiB) and FDs, and what the FDs were.
    pub idle_before: (u64, u64),
    pub idle_fd_kinds: Vec<(String, u64)>,
    pub idle_after: Option<IdleAfter>,
    pub restarts: Vec<Restart>,
    pub abandoned: usize,
    pub load_seconds: f64,
    pub gateway_died: Option<String>,
    pub echo_died: Option<String>,
    pub interrupted: bool,
    pub gateway_args: String,
    pub gateway_exit: String,
    pub gateway_log: GatewayLog,
    /// The tail of the echo service's log.
    pub echo_log_tail: Option<String>,
    pub reloads: Vec<Reload>,
    /// The audit log from the start of the load to the gateway's exit.
    pub audit: AuditTail,
}

/// The idle gateway after every client left.
pub struct IdleAfter {
    pub rss_kb: u64,
    pub fds: u64,
    pub fd_kinds: Vec<(String, u64)>,
    pub connections: Option<f64>,
    pub inflight: Option<f64>,
}

/// The gateway's log: its last LOG_TAIL_BYTES, its size, and its WARN and ERROR lines.
#[derive(Default)]
pub struct GatewayLog {
    pub tail: String,
    pub bytes: u64,
    pub warn_lines: u64,
    pub error_lines: u64,
}

/// The child processes and where they listen.
struct Procs {
    dir: TempDir,
    nats: Option<Proc>,
    nats_port: u16,
    nats_monitor: u16,
    /// How many times nats-server was started (each start logs to its own file).
    generation: usize,
    nats_url: String,
    echo: Proc,
    gateway: Proc,
    gateway_http: u16,
    gateway_grpc: u16,
    gateway_args: Vec<String>,
    socket: PathBuf,
    identities: Identities,
    audit_file: PathBuf,
}

impl Procs {
    fn start(bin: &Path, settings: &Settings) -> Result<Procs, String> {
        let dir = TempDir::new("ipc-gw-soak")?;
        let nats_port = free_port()?;
        let nats_monitor = free_port()?;
        let nats = Some(start_nats(nats_port, nats_monitor, &dir.0, 1)?);
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let echo = Proc::spawn(
            "ipc-gateway demo-echo",
            Command::new(bin)
                .args([
                    "demo-echo",
                    "--nats-url",
                    &nats_url,
                    "--subject",
                    ECHO_SUBJECT,
                ])
                .env("NO_COLOR", "1")
                // demo-echo logs every request that carries an identity at INFO: ~300 KB/s
                // at the soak's rates, for nothing the report reads.
                .env("RUST_LOG", "info,ipc_gateway::demo=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&dir.0, "echo.log")?),
        )?;
        let socket = dir.0.join("gateway.sock");
        let gateway_http = free_port()?;
        let gateway_grpc = free_port()?;
        let identities = Identities::create(&dir.0, settings.seconds)?;
        let audit_file = dir.0.join("audit.jsonl");
        let gateway_args: Vec<String> = [
            "serve",
            "--nats-url",
            &nats_url,
            "--socket",
            &socket.display().to_string(),
            "--http",
            &format!("127.0.0.1:{gateway_http}"),
            // Its own gRPC port, so that a gateway already on 50051 cannot stop the soak.
            "--grpc",
            &format!("127.0.0.1:{gateway_grpc}"),
            "--worker-threads",
            "1",
            "--policy",
            &identities.policy.display().to_string(),
            "--auth-jwt-secret-file",
            &identities.secret.display().to_string(),
            "--audit-file",
            &audit_file.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(settings.gateway_args.iter().cloned())
        .collect();
        let mut gateway = Proc::spawn(
            "ipc-gateway serve",
            Command::new(bin)
                .args(&gateway_args)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&dir.0, "gateway.log")?),
        )?;
        wait_ready(
            gateway_http,
            &mut gateway,
            "the gateway did not become ready",
        )?;
        Ok(Procs {
            dir,
            nats,
            nats_port,
            nats_monitor,
            generation: 1,
            nats_url,
            echo,
            gateway,
            gateway_http,
            gateway_grpc,
            gateway_args,
            socket,
            identities,
            audit_file,
        })
    }

    fn restart_nats(&mut self) -> Result<(), String> {
        self.generation += 1;
        self.nats = Some(start_nats(
            self.nats_port,
            self.nats_monitor,
            &self.dir.0,
            self.generation,
        )?);
        Ok(())
    }

    fn pids(&self) -> Pids {
        Pids {
            gateway: self.gateway.pid(),
            echo: self.echo.pid(),
            nats: self.nats.as_ref().map(Proc::pid),
        }
    }
}

/// The echo service subscribes shortly after it starts: waits until it answers through the
/// gateway (one request; this warms nothing up).
fn wait_for_echo(socket: &Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    rt.block_on(async {
        let client = Client::connect(socket)
            .await
            .map_err(|err| format!("connect {}: {err}", socket.display()))?;
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            match client
                .request(ECHO_SUBJECT, b"ping", Some(REQUEST_TIMEOUT))
                .await
            {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(format!("the echo service did not answer: {err}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}

/// The whole soak. Fails only when something cannot start; a gateway that dies during the
/// run is in the outcome.
pub fn run(settings: &Settings, bin: &Path) -> Result<(Outcome, Arc<Stats>), String> {
    let mut procs = Procs::start(bin, settings)?;
    wait_for_echo(&procs.socket)?;
    // Let the probe connection close before the idle measurement.
    std::thread::sleep(Duration::from_millis(500));
    let gateway_pid = procs.gateway.pid();
    let idle_before = (
        proc_status(gateway_pid).map_or(0, |s| s.0),
        fd_count(gateway_pid).unwrap_or(0),
    );
    let idle_fd_kinds = fd_kinds(gateway_pid);
    eprintln!(
        "soak: gateway pid {gateway_pid} ready; idle before load: rss {} KiB, {} fds; {} s of load, kills at {:?} s, reloads at {:?} s, warm-up {} s",
        idle_before.0,
        idle_before.1,
        settings.seconds,
        settings.kill_times(),
        settings.reload_times(),
        settings.warmup
    );

    let stats = Arc::new(Stats::new(settings.seconds));
    let audit = AuditTail::from_end(procs.audit_file.clone())?;
    let mut load = Load::start(settings, &procs, stats.clone())?;
    let mut supervisor = Supervisor::new(
        settings,
        &procs,
        stats.clone(),
        load.interrupted.clone(),
        audit,
    );
    supervisor.until_end(&mut procs)?;
    let load_seconds = stats.t0.elapsed().as_secs_f64();
    // A kill near the end whose restart has not come yet: restart now, so the gateway ends
    // connected.
    if procs.nats.is_none() {
        procs.restart_nats()?;
    }
    // A last sample under load, then stop and wait for the outstanding requests.
    supervisor.last_sample(&procs);
    stats.watching.store(usize::MAX, Ordering::Relaxed);
    let abandoned = load.finish();
    eprintln!("soak: load stopped after {load_seconds:.1} s; {abandoned} task(s) abandoned");
    let restarts = supervisor.restarts_seen();
    // The last reload's check has had RELOAD_PATIENCE and more by now (END_GRACE, and the
    // reloads end 10 s before the end).
    let reloads = supervisor
        .reloads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Supervisor {
        samples,
        gateway_died,
        echo_died,
        mut audit,
        ..
    } = supervisor;

    // All clients are gone now: the gateway should be back to its idle shape.
    let idle_after = gateway_died
        .is_none()
        .then(|| idle_after(gateway_pid, procs.gateway_http));
    let stopped = stop(procs);
    // The gateway has flushed its audit log at exit: the rest of it.
    audit.poll();
    Ok((
        Outcome {
            samples,
            idle_before,
            idle_fd_kinds,
            idle_after,
            restarts,
            abandoned,
            load_seconds,
            gateway_died,
            echo_died,
            interrupted: load.interrupted.load(Ordering::Relaxed),
            gateway_args: stopped.gateway_args,
            gateway_exit: stopped.gateway_exit,
            gateway_log: stopped.gateway_log,
            echo_log_tail: stopped.echo_log_tail,
            reloads,
            audit,
        },
        stats,
    ))
}

/// The load thread; stopped when dropped (an early return on error), or on `finish`.
struct Load {
    stop: Arc<AtomicBool>,
    interrupted: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Load {
    /// Starts the load and waits until every task runs.
    fn start(settings: &Settings, procs: &Procs, stats: Arc<Stats>) -> Result<Load, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let interrupted = Arc::new(AtomicBool::new(false));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let handles = LoadHandles {
            stats,
            stop: stop.clone(),
            interrupted: interrupted.clone(),
        };
        let settings = settings.clone();
        let endpoints = Endpoints {
            socket: procs.socket.clone(),
            nats_url: procs.nats_url.clone(),
            http_port: procs.gateway_http,
            grpc_port: procs.gateway_grpc,
            ws_token: procs.identities.ws_token.clone(),
            grpc_token: procs.identities.grpc_token.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("soak-load".into())
            .spawn(move || run_load(&settings, endpoints, handles, started_tx))
            .map_err(|err| format!("load thread: {err}"))?;
        let load = Load {
            stop,
            interrupted,
            thread: Some(thread),
        };
        match started_rx.recv_timeout(START_PATIENCE * 2) {
            Ok(Ok(())) => Ok(load),
            Ok(Err(err)) => Err(err),
            Err(_) => Err("the load did not start".into()),
        }
    }

    /// Stops the load; how many request tasks had to be abandoned.
    fn finish(&mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |h| h.join().unwrap_or(0))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Kills and restarts nats-server on schedule and samples the gateway, until the end.
struct Supervisor<'a> {
    settings: &'a Settings,
    stats: Arc<Stats>,
    interrupted: Arc<AtomicBool>,
    probe: Probe,
    kill_times: Vec<f64>,
    /// How many NATS connections the gateway keeps (its pool): all must come back.
    pool_size: usize,
    next_kill: usize,
    pending_restart: Option<Instant>,
    restarts: Vec<Restart>,
    ready_watch: Vec<Arc<Mutex<Reconnected>>>,
    samples: Vec<Sample>,
    next_sample: Instant,
    previous: (f64, Totals),
    gateway_died: Option<String>,
    echo_died: Option<String>,
    reload_times: Vec<f64>,
    next_reload: usize,
    reloads: Arc<Mutex<Vec<Reload>>>,
    audit: AuditTail,
}

impl<'a> Supervisor<'a> {
    fn new(
        settings: &'a Settings,
        procs: &Procs,
        stats: Arc<Stats>,
        interrupted: Arc<AtomicBool>,
        audit: AuditTail,
    ) -> Supervisor<'a> {
        let probe = Probe {
            gateway_pid: procs.gateway.pid(),
            stats: stats.clone(),
            gateway_http: procs.gateway_http,
            nats_monitor: procs.nats_monitor,
            clk_tck: ticks_per_second(),
        };
        let pool_size = http_get(procs.gateway_http, "/metrics")
            .and_then(|(_, body)| metric_sum(&body, "ipc_gateway_nats_pool_size"))
            .map_or(2, |n| n as usize);
        Supervisor {
            settings,
            next_sample: stats.t0 + Duration::from_secs_f64(settings.sample),
            previous: (0.0, totals(&stats, &procs.pids(), 0)),
            stats,
            interrupted,
            probe,
            kill_times: settings.kill_times(),
            pool_size,
            next_kill: 0,
            pending_restart: None,
            restarts: Vec::new(),
            ready_watch: Vec::new(),
            samples: Vec::new(),
            gateway_died: None,
            echo_died: None,
            reload_times: settings.reload_times(),
            next_reload: 0,
            reloads: Arc::new(Mutex::new(Vec::new())),
            audit,
        }
    }

    fn until_end(&mut self, procs: &mut Procs) -> Result<(), String> {
        let t0 = self.stats.t0;
        let end = t0 + Duration::from_secs_f64(self.settings.seconds);
        loop {
            let now = Instant::now();
            if self.interrupted.load(Ordering::Relaxed) {
                eprintln!("soak: interrupted; stopping early");
                break;
            }
            if !self.check_processes(procs) || now >= end {
                break;
            }
            if self.kill_due(now) {
                self.kill(procs);
            }
            if let Some(at) = self.pending_restart
                && now >= at
            {
                self.restart(procs)?;
            }
            if let Some(reload) = self.reload_times.get(self.next_reload)
                && now >= t0 + Duration::from_secs_f64(*reload)
            {
                self.reload(procs)?;
            }
            if now >= self.next_sample && self.samples.len() < MAX_SAMPLES {
                self.sample(procs);
            }
            // Sleep until the next event (at most 100 ms, to notice a dead process).
            let mut wake = self.next_sample.min(end);
            if let Some(at) = self.pending_restart {
                wake = wake.min(at);
            }
            if let Some(kill) = self.kill_times.get(self.next_kill) {
                wake = wake.min(t0 + Duration::from_secs_f64(*kill));
            }
            if let Some(reload) = self.reload_times.get(self.next_reload) {
                wake = wake.min(t0 + Duration::from_secs_f64(*reload));
            }
            let nap = wake
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            std::thread::sleep(nap);
        }
        Ok(())
    }

    /// Notes a dead echo service; false when the gateway died (the run ends).
    fn check_processes(&mut self, procs: &mut Procs) -> bool {
        let t = self.stats.t0.elapsed().as_secs_f64();
        if let Some(status) = procs.gateway.exited() {
            let died = format!("the gateway exited at t={t:.1}s: {status}");
            eprintln!("soak: {died}");
            self.gateway_died = Some(died);
            return false;
        }
        if self.echo_died.is_none()
            && let Some(status) = procs.echo.exited()
        {
            let died = format!("the echo service exited at t={t:.1}s: {status}");
            eprintln!("soak: {died}");
            self.echo_died = Some(died);
        }
        true
    }

    fn kill_due(&self, now: Instant) -> bool {
        self.pending_restart.is_none()
            && self
                .kill_times
                .get(self.next_kill)
                .is_some_and(|kill| now >= self.stats.t0 + Duration::from_secs_f64(*kill))
    }

    fn kill(&mut self, procs: &mut Procs) {
        // Attribute what follows to this restart first, then kill.
        let kill_ms = self.stats.now_ms();
        self.stats.kill_ms[self.next_kill].store(kill_ms, Ordering::Relaxed);
        self.stats.watching.store(self.next_kill, Ordering::Relaxed);
        if let Some(mut proc) = procs.nats.take() {
            proc.kill9();
        }
        self.restarts.push(Restart {
            kill_s: kill_ms as f64 / 1e3,
            ..Restart::default()
        });
        eprintln!(
            "soak: t={:.1}s kill -9 nats-server (restart {} of {})",
            kill_ms as f64 / 1e3,
            self.next_kill + 1,
            self.kill_times.len()
        );
        self.next_kill += 1;
        self.pending_restart = Some(Instant::now() + Duration::from_secs_f64(self.settings.outage));
    }

    fn restart(&mut self, procs: &mut Procs) -> Result<(), String> {
        let index = self.restarts.len() - 1;
        let restart_ms = self.stats.now_ms();
        self.stats.restart_ms[index].store(restart_ms, Ordering::Relaxed);
        procs.restart_nats()?;
        let listening = self.stats.now_ms();
        let restart = &mut self.restarts[index];
        restart.restart_s = Some(restart_ms as f64 / 1e3);
        restart.nats_listening_s = Some(listening as f64 / 1e3);
        let ready = Arc::new(Mutex::new(Reconnected::default()));
        watch_recovery(
            procs.gateway_http,
            procs.nats_monitor,
            self.pool_size,
            self.stats.t0,
            ready.clone(),
        );
        self.ready_watch.push(ready);
        eprintln!(
            "soak: t={:.1}s nats-server started again on port {} (listening after {} ms)",
            restart_ms as f64 / 1e3,
            procs.nats_port,
            listening - restart_ms
        );
        self.pending_restart = None;
        Ok(())
    }

    /// Rewrites the policy in its other version and sends SIGHUP; a thread checks the reload.
    fn reload(&mut self, procs: &Procs) -> Result<(), String> {
        self.next_reload += 1;
        eprintln!(
            "soak: t={:.1}s policy reload {} of {} (SIGHUP)",
            self.stats.t0.elapsed().as_secs_f64(),
            self.next_reload,
            self.reload_times.len()
        );
        crate::policy::reload(
            &procs.identities,
            self.next_reload,
            procs.gateway.pid(),
            procs.gateway_http,
            procs.socket.clone(),
            self.stats.clone(),
            self.reloads.clone(),
        )
    }

    fn sample(&mut self, procs: &Procs) {
        self.audit.poll();
        let t = self.stats.t0.elapsed().as_secs_f64();
        let nats_down = procs.nats.is_none();
        let phase = phase_at(
            t,
            self.settings,
            &self.stats,
            nats_down,
            self.restarts.len(),
        );
        let current = totals(&self.stats, &procs.pids(), self.audit.records);
        if let Some(sample) = self
            .probe
            .sample(t, phase, !nats_down, self.previous, current)
        {
            print_sample(&sample);
            self.samples.push(sample);
        }
        self.previous = (t, current);
        let every = Duration::from_secs_f64(self.settings.sample);
        while self.next_sample <= Instant::now() {
            self.next_sample += every;
        }
    }

    /// One more sample at the end, unless the last one is recent.
    fn last_sample(&mut self, procs: &Procs) {
        self.audit.poll();
        let t = self.stats.t0.elapsed().as_secs_f64();
        let current = totals(&self.stats, &procs.pids(), self.audit.records);
        if self.gateway_died.is_none()
            && t - self.previous.0 >= self.settings.sample / 2.0
            && let Some(sample) = self.probe.sample(
                t,
                phase_at(t, self.settings, &self.stats, false, self.restarts.len()),
                true,
                self.previous,
                current,
            )
        {
            print_sample(&sample);
            self.samples.push(sample);
        }
    }

    /// The restarts, with what the recovery watchers saw.
    fn restarts_seen(&mut self) -> Vec<Restart> {
        let mut restarts = std::mem::take(&mut self.restarts);
        for (restart, ready) in restarts.iter_mut().zip(&self.ready_watch) {
            let seen = *ready.lock().unwrap_or_else(|p| p.into_inner());
            restart.gateway_ready_s = seen.gateway_ready;
            restart.echo_connected_s = seen.echo_connected;
            restart.gateway_connected_s = seen.gateway_connected;
        }
        restarts
    }
}

fn idle_after(gateway_pid: u32, gateway_http: u16) -> IdleAfter {
    std::thread::sleep(Duration::from_secs(2));
    let (rss_kb, _) = proc_status(gateway_pid).unwrap_or((0, 0));
    let fds = fd_count(gateway_pid).unwrap_or(0);
    let fd_kinds = fd_kinds(gateway_pid);
    let metrics = http_get(gateway_http, "/metrics").map(|(_, b)| b);
    IdleAfter {
        rss_kb,
        fds,
        fd_kinds,
        connections: metrics
            .as_deref()
            .and_then(|m| metric_sum(m, "ipc_gateway_connections")),
        inflight: metrics
            .as_deref()
            .and_then(|m| metric_sum(m, "ipc_gateway_inflight_requests")),
    }
}

/// What stopping the processes leaves for the report.
struct Stopped {
    gateway_args: String,
    gateway_exit: String,
    gateway_log: GatewayLog,
    echo_log_tail: Option<String>,
}

/// Stops the gateway (SIGTERM, then up to 10 s), the echo service and nats-server, and reads
/// the logs before their directory goes.
fn stop(mut procs: Procs) -> Stopped {
    let gateway_exit = match procs.gateway.stop_within(Duration::from_secs(10)) {
        (Some(status), true) => format!("exited by itself after SIGTERM: {status}"),
        (Some(status), false) => format!("did not exit within 10 s of SIGTERM; killed: {status}"),
        (None, _) => "unknown".into(),
    };
    procs.echo.stop();
    if let Some(mut proc) = procs.nats.take() {
        proc.stop();
    }
    let log = procs.dir.0.join("gateway.log");
    let (tail, bytes) = log_tail(&log).unwrap_or_default();
    Stopped {
        gateway_args: procs.gateway_args.join(" "),
        gateway_exit,
        gateway_log: GatewayLog {
            tail,
            bytes,
            warn_lines: count_lines(&log, "WARN"),
            error_lines: count_lines(&log, "ERROR"),
        },
        echo_log_tail: log_tail(&procs.dir.0.join("echo.log")).map(|(text, _)| text),
    }
}

/// The last `LOG_TAIL_BYTES` of a log, from its first whole line.
fn log_tail(path: &Path) -> Option<(String, u64)> {
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let skip = size.saturating_sub(LOG_TAIL_BYTES);
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(skip)).ok()?;
    let mut raw = Vec::new();
    file.read_to_end(&mut raw).ok()?;
    let mut text = String::from_utf8_lossy(&raw).into_owned();
    if skip > 0
        && let Some(newline) = text.find('\n')
    {
        text.drain(..=newline);
    }
    Some((text, size))
}

fn count_lines(path: &Path, needle: &str) -> u64 {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter(|line| line.contains(needle)).count() as u64)
        .unwrap_or(0)
}
