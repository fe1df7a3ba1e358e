//! The parent's run: the servers and one publisher per path, then for each K and each path a
//! case: K subscribers from client processes, and the phases in order (idle, sustained rate,
//! burst, max rate), each measured the same way: zero the clients' counters, mark the CPU, publish,
//! count what arrived by the end of publishing, wait for the rest (until every message is
//! accounted for, nothing more arrives for a while, or the drain cap), collect the counters and
//! the latency histograms, and the loss signals of the servers.
//!
//! A case that fails (its clients cannot connect, a publish fails) keeps its error in the
//! report and the run goes on with the next.

use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::common::{TempDir, log_matches, nofile_limit, proc_status, wait_ready};
use crate::cpu::{CpuUse, Mark, Pids, between, mark};
use crate::fleet::{Fields, Fleet};
use crate::hist::Hist;
use crate::publisher::{Published, Publisher};
use crate::servers::{self, Servers, Signals, signals_delta};
use crate::settings::{Path, Settings};
use crate::{CLIENT_FD_SPARE, GATEWAY_FD_SPARE};

/// Deliveries have stopped when nothing more arrived for this long.
const STABLE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(100);

/// What the run measured, for the report.
pub struct Run {
    pub gateway_args: String,
    pub gateway_nats_config: String,
    pub native_nats_config: String,
    pub open_files: Option<(u64, u64)>,
    pub cases: Vec<Case>,
    pub logs: Logs,
}

/// What the servers' logs said over the whole run: how many lines matched, and the first few.
#[derive(Debug, Serialize)]
pub struct Logs {
    /// "Slow Consumer" in the gateway's nats-server's log.
    pub gateway_nats_slow_consumer: LogSample,
    /// "Slow Consumer" in the native nats-server's log.
    pub native_nats_slow_consumer: LogSample,
    /// The gateway's "NATS disconnected" warnings (a pool connection lost).
    pub gateway_nats_disconnected: LogSample,
    /// The gateway's "NATS subscription buffer full" warnings (async-nats dropped a message).
    pub gateway_subscription_buffer_full: LogSample,
}

#[derive(Debug, Serialize)]
pub struct LogSample {
    pub lines: usize,
    pub first: Vec<String>,
}

fn sample(log: &FsPath, needle: &str) -> LogSample {
    let (lines, first) = log_matches(log, needle, 3);
    LogSample { lines, first }
}

#[derive(Debug, Serialize)]
pub struct Case {
    pub path: Path,
    pub k: usize,
    /// Connections per client process.
    pub client_processes: Vec<usize>,
    pub connect: Option<Connect>,
    pub idle: Option<Phase>,
    pub sustained: Option<Phase>,
    pub burst: Option<Phase>,
    pub max_rate: Option<Phase>,
    /// The sustained phase again at each of FANOUT_SWEEP's rates, in order.
    pub sweep: Vec<Phase>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Connect {
    pub ok: u64,
    pub failed: u64,
    /// The slowest client process's time to connect and subscribe all its connections.
    pub seconds: f64,
    pub first_error: Option<String>,
    /// `ipc_gateway_subscriptions`, or the native nats-server's /varz `subscriptions`.
    pub server_subscriptions: Option<f64>,
    /// VmRSS with the K subscribers connected (the servers run through all cases: this
    /// includes what earlier cases grew them to).
    pub rss_kib: Rss,
}

#[derive(Debug, Serialize)]
pub struct Rss {
    pub gateway: Option<u64>,
    pub gateway_nats: Option<u64>,
    pub native_nats: Option<u64>,
}

/// The servers' VmRSS now.
fn rss(servers: &Servers) -> Rss {
    let kib = |pid| proc_status(pid).map(|(rss, _)| rss);
    Rss {
        gateway: kib(servers.gateway.pid()),
        gateway_nats: kib(servers.gateway_nats.pid()),
        native_nats: kib(servers.native_nats.pid()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Idle,
    Sustained,
    Burst,
    Max,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub published: Published,
    /// The paced publisher's rate (sustained phase), messages a second.
    pub target_publish_rate: Option<f64>,
    /// Subscribers connected when the phase began.
    pub subscribers: u64,
    /// published × subscribers.
    pub expected: u64,
    /// Delivered by the time the publisher finished (and the counts were read).
    pub delivered_in_window: u64,
    /// delivered_in_window / the window's wall time.
    pub deliveries_per_second: f64,
    pub delivered: u64,
    /// The sum of the `count`s of `dropped` notices the clients received.
    pub dropped_notified: u64,
    /// expected − delivered − dropped_notified, once deliveries have ended (`None` when the
    /// wait was cut off while messages still arrived, as it always is at max rate).
    pub silent_loss: Option<i64>,
    /// Why the wait for deliveries ended: `accounted` (every expected message delivered or
    /// notified dropped), `stopped` (nothing more arrived for 2 s) or `cap` (still arriving at
    /// the cap).
    pub drain_end: &'static str,
    /// From the start of publishing to the last count that still grew.
    pub last_delivery_seconds: f64,
    /// delivered / last_delivery_seconds.
    pub deliveries_per_second_overall: f64,
    pub per_subscriber: PerSubscriber,
    pub connections_lost: u64,
    pub first_error: Option<String>,
    pub unparsed: u64,
    /// `dropped` notices with `gap` (the gateway told its subscribers that an unknown number
    /// were lost): silent loss is then not silent, but its size is unknown.
    pub gap_notices: u64,
    pub latency_us: Latency,
    /// CPU over the publishing window.
    pub cpu_window: CpuUse,
    /// CPU from the start of publishing to the last delivery.
    pub cpu: CpuUse,
    /// Server-side CPU (gateway + its nats-server, or the native nats-server) per delivery.
    pub server_cpu_us_per_delivery: Option<f64>,
    pub client_cpu_us_per_delivery: Option<f64>,
    pub signals: Signals,
    /// The servers' VmRSS at the end of the phase.
    pub rss_after_kib: Rss,
}

/// Subscribers by what they got (delivered + dropped notices) against what was published.
#[derive(Debug, Serialize)]
pub struct PerSubscriber {
    pub complete: u64,
    pub short: u64,
    pub over: u64,
    pub min_delivered: u64,
    pub max_delivered: u64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

pub fn run(settings: &Settings, bin: &FsPath) -> Result<Run, String> {
    let open_files = nofile_limit("self");
    let soft = open_files.map_or(1024, |(soft, _)| soft);
    let most = settings.ks.iter().copied().max().unwrap_or(0);
    if most as u64 + GATEWAY_FD_SPARE > soft {
        return Err(format!(
            "K = {most} needs about {} open files in the gateway and in nats-server, but `ulimit -n` is {soft}: lower FANOUT_KS or raise the limit (benchmarks/fanout.sh raises it to the hard limit)",
            most as u64 + GATEWAY_FD_SPARE
        ));
    }
    let per_process = settings
        .per_process
        .min((soft - CLIENT_FD_SPARE) as usize)
        .max(1);
    let dir = TempDir::new("ipc-gw-fanout")?;
    let mut servers = servers::start(bin, &dir.0, settings)?;
    let gateway_publisher = Publisher::connect(&servers.gateway_nats.url, settings.payload)?;
    let native_publisher = Publisher::connect(&servers.native_nats.url, settings.payload)?;
    let mut cases = Vec::new();
    for &k in &settings.ks {
        for &path in &settings.paths {
            let publisher = match path {
                Path::Gateway => &gateway_publisher,
                Path::Native => &native_publisher,
            };
            eprintln!("== {} path, K = {k}", path.name());
            let case = run_case(path, k, per_process, &mut servers, publisher, settings);
            if let Some(err) = &case.error {
                eprintln!("   case failed: {err}");
            }
            cases.push(case);
        }
    }
    servers.gateway.stop();
    let gateway_log = dir.0.join("gateway.log");
    let logs = Logs {
        gateway_nats_slow_consumer: sample(&servers.gateway_nats.log, "Slow Consumer"),
        native_nats_slow_consumer: sample(&servers.native_nats.log, "Slow Consumer"),
        gateway_nats_disconnected: sample(&gateway_log, "NATS disconnected"),
        gateway_subscription_buffer_full: sample(&gateway_log, "subscription buffer full"),
    };
    Ok(Run {
        gateway_args: servers.gateway_args.join(" "),
        gateway_nats_config: servers.gateway_nats.config.clone(),
        native_nats_config: servers.native_nats.config.clone(),
        open_files,
        cases,
        logs,
    })
}

fn split(k: usize, per_process: usize, min_processes: usize) -> Vec<usize> {
    let processes = k
        .div_ceil(per_process)
        .max(min_processes)
        .clamp(1, k.max(1));
    (0..processes)
        .map(|i| k / processes + usize::from(i < k % processes))
        .collect()
}

fn run_case(
    path: Path,
    k: usize,
    per_process: usize,
    servers: &mut Servers,
    publisher: &Publisher,
    s: &Settings,
) -> Case {
    let counts = split(k, per_process, s.min_processes);
    let mut case = Case {
        path,
        k,
        client_processes: counts.clone(),
        connect: None,
        idle: None,
        sustained: None,
        burst: None,
        max_rate: None,
        sweep: Vec::new(),
        error: None,
    };
    // Only the publisher stays connected to the native nats-server between cases.
    let baseline = match path {
        Path::Gateway => 0.0,
        Path::Native => 1.0,
    };
    // A max-rate phase may have had the gateway's NATS connections cut off: the next gateway
    // case starts once they are back.
    if let Err(err) = wait_ready(
        servers.http,
        &mut servers.gateway,
        "the gateway is not ready",
    ) {
        case.error = Some(err);
        return case;
    }
    let mut fleet = match Fleet::start(path, servers.client_port(path), &counts, s) {
        Ok(fleet) => fleet,
        Err(err) => {
            case.error = Some(err);
            return case;
        }
    };
    if let Err(err) = phases(&mut case, &mut fleet, servers, publisher, s) {
        case.error = Some(err);
    }
    fleet.close();
    servers.wait_connections_at_most(path, baseline, Duration::from_secs(30));
    publisher.settle(Duration::from_secs(30));
    case
}

fn phases(
    case: &mut Case,
    fleet: &mut Fleet,
    servers: &Servers,
    publisher: &Publisher,
    s: &Settings,
) -> Result<(), String> {
    let (path, k) = (case.path, case.k);
    let ready = fleet.ready()?;
    let ok = Fleet::sum(&ready, "ok");
    let connect = Connect {
        ok,
        failed: Fleet::sum(&ready, "failed"),
        seconds: ready.iter().map(|r| r.float("secs")).fold(0.0, f64::max),
        first_error: ready.iter().find_map(|r| r.error.clone()),
        server_subscriptions: wait_subscriptions(servers, path, ok as f64),
        rss_kib: rss(servers),
    };
    eprintln!(
        "   {} of {k} subscribed in {:.1} s ({} failed)",
        connect.ok, connect.seconds, connect.failed
    );
    let first_error = connect.first_error.clone();
    case.connect = Some(connect);
    if ok == 0 {
        return Err(format!(
            "no subscriber connected; first error: {}",
            first_error.as_deref().unwrap_or("-")
        ));
    }
    let pids = Pids {
        gateway: servers.gateway.pid(),
        gateway_nats: servers.gateway_nats.pid(),
        native_nats: servers.native_nats.pid(),
        clients: fleet.pids(),
    };
    let mut measure = |kind, rate| phase(kind, rate, path, k, fleet, servers, publisher, &pids, s);
    if s.idle > 0.0 {
        case.idle = Some(measure(Kind::Idle, s.rate)?);
    }
    case.sustained = Some(measure(Kind::Sustained, s.rate)?);
    if s.burst > 0 {
        case.burst = Some(measure(Kind::Burst, s.rate)?);
    }
    // Before the max rate, which may cut the gateway's NATS connections off for a while.
    for &rate in &s.sweep {
        eprintln!("   sweep: {rate} deliveries/s");
        case.sweep.push(measure(Kind::Sustained, rate as f64)?);
    }
    case.max_rate = Some(measure(Kind::Max, s.rate)?);
    Ok(())
}

/// Waits (at most 10 s) until the server side holds `want` subscriptions.
fn wait_subscriptions(servers: &Servers, path: Path, want: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = servers.subscriptions(path);
        if now.is_some_and(|n| n >= want) || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(POLL);
    }
}

/// delivered + dropped over all client processes.
fn accounted(answers: &[Fields]) -> u64 {
    Fleet::sum(answers, "delivered") + Fleet::sum(answers, "dropped")
}

#[allow(clippy::too_many_arguments)]
fn phase(
    kind: Kind,
    deliveries_per_second: f64,
    path: Path,
    k: usize,
    fleet: &mut Fleet,
    servers: &Servers,
    publisher: &Publisher,
    pids: &Pids,
    s: &Settings,
) -> Result<Phase, String> {
    if path == Path::Gateway && !servers.wait_gateway_ready(Duration::from_secs(30)) {
        return Err("the gateway's /ready did not say 200 within 30 s".into());
    }
    let subscribers = Fleet::sum(&fleet.ask("reset", "reset")?, "alive");
    let signals_before = servers.signals(path);
    let rate = deliveries_per_second / k as f64;
    let start: Mark = mark(pids);
    let published = match kind {
        Kind::Idle => {
            std::thread::sleep(Duration::from_secs_f64(s.idle));
            Published::default()
        }
        Kind::Sustained => {
            let count = (rate * s.seconds).round().max(1.0) as u64;
            publisher.paced(rate, count)?
        }
        Kind::Burst => publisher.burst(s.burst as u64)?,
        Kind::Max => publisher.flat_out(s.seconds)?,
    };
    let in_window = fleet.ask("count", "count")?;
    let window_end = mark(pids);
    let delivered_in_window = Fleet::sum(&in_window, "delivered");
    let expected = published.messages * subscribers;

    // Wait for the rest.
    let cap = match kind {
        Kind::Max => s.max_drain,
        _ => s.drain,
    };
    let mut total = accounted(&in_window);
    let mut last = (Instant::now(), mark(pids));
    let drain_started = Instant::now();
    let drain_end = loop {
        if total >= expected {
            break "accounted";
        }
        if last.0.elapsed() >= STABLE {
            break "stopped";
        }
        if drain_started.elapsed() >= cap {
            break "cap";
        }
        std::thread::sleep(POLL);
        let now = accounted(&fleet.ask("count", "count")?);
        if now != total {
            total = now;
            last = (Instant::now(), mark(pids));
        }
    };
    let report = fleet.ask(&format!("report {}", published.messages), "report")?;
    let signals = signals_delta(&signals_before, &servers.signals(path));

    let mut hist = Hist::default();
    for answer in &report {
        hist.merge(&Hist::decode(answer.text("hist")));
    }
    let delivered = Fleet::sum(&report, "delivered");
    let dropped = Fleet::sum(&report, "dropped");
    let cpu_window = between(&start, &window_end);
    let cpu = if kind == Kind::Idle {
        cpu_window.clone()
    } else {
        between(&start, &last.1)
    };
    let server_seconds = match path {
        Path::Gateway => cpu.gateway_seconds + cpu.gateway_nats_seconds,
        Path::Native => cpu.native_nats_seconds,
    };
    let per_delivery = |seconds: f64| (delivered > 0).then(|| seconds * 1e6 / delivered as f64);
    let last_delivery_seconds = cpu.wall_seconds;
    let result = Phase {
        published,
        target_publish_rate: (kind == Kind::Sustained).then_some(rate),
        subscribers,
        expected,
        delivered_in_window,
        deliveries_per_second: delivered_in_window as f64 / cpu_window.wall_seconds.max(1e-9),
        delivered,
        dropped_notified: dropped,
        silent_loss: (drain_end != "cap")
            .then_some(expected as i64 - delivered as i64 - dropped as i64),
        drain_end,
        last_delivery_seconds,
        deliveries_per_second_overall: delivered as f64 / last_delivery_seconds.max(1e-9),
        per_subscriber: PerSubscriber {
            complete: Fleet::sum(&report, "complete"),
            short: Fleet::sum(&report, "short"),
            over: Fleet::sum(&report, "over"),
            min_delivered: report.iter().map(|r| r.num("min")).min().unwrap_or(0),
            max_delivered: report.iter().map(|r| r.num("max")).max().unwrap_or(0),
        },
        connections_lost: Fleet::sum(&report, "lost"),
        first_error: report.iter().find_map(|r| r.error.clone()),
        unparsed: Fleet::sum(&report, "unparsed"),
        gap_notices: Fleet::sum(&report, "gaps"),
        latency_us: Latency {
            samples: hist.count(),
            p50: hist.quantile(0.5),
            p99: hist.quantile(0.99),
            max: hist.max(),
        },
        server_cpu_us_per_delivery: per_delivery(server_seconds),
        client_cpu_us_per_delivery: per_delivery(cpu.clients_seconds),
        cpu_window,
        cpu,
        signals,
        rss_after_kib: rss(servers),
    };
    eprintln!(
        "   {kind:?}: published {} in {:.2} s; delivered {} of {} ({:.0}/s in the window), dropped {dropped}, silent loss {} (wait: {drain_end}); p50 {} µs p99 {} µs; server CPU {} µs/delivery",
        result.published.messages,
        result.published.seconds,
        result.delivered,
        result.expected,
        result.deliveries_per_second,
        result
            .silent_loss
            .map_or("not known".into(), |v| v.to_string()),
        result
            .latency_us
            .p50
            .map_or("-".into(), |v| format!("{v:.0}")),
        result
            .latency_us
            .p99
            .map_or("-".into(), |v| format!("{v:.0}")),
        result
            .server_cpu_us_per_delivery
            .map_or("-".into(), |v| format!("{v:.2}")),
    );
    Ok(result)
}
