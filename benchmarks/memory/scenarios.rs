//! The runs: for each variant, each scenario against a fresh gateway (one nats-server for the
//! whole run), and the gateway's RSS: settled at each stage, or sampled every second after a
//! burst or churn.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::common::{Proc, TempDir, free_port, log_file, proc_memory, start_nats, wait_ready};
use crate::procs::{Clients, StageResult};
use crate::settings::{Settings, Variant};
use crate::{SETTLE_KIB, SETTLE_WINDOW};

#[derive(Serialize)]
pub struct VariantResult {
    pub variant: Variant,
    /// The `serve` arguments of the last gateway started (ports differ per scenario).
    pub gateway_args: String,
    pub sizes: Option<Sizes>,
    pub burst: Option<After>,
    pub churn: Option<After>,
    pub errors: Vec<String>,
}

/// RSS in KiB at each stage of the `sizes` scenario.
#[derive(Serialize)]
pub struct Sizes {
    pub connections: usize,
    pub baseline_kib: u64,
    pub idle_kib: u64,
    pub one_subject_kib: u64,
    /// The second gateway (each connection on a subject of its own).
    pub own_baseline_kib: u64,
    pub own_idle_kib: u64,
    pub own_subject_kib: u64,
}

/// A burst or a churn: RSS before, at the peak, and every second after it.
#[derive(Serialize)]
pub struct After {
    pub connections: usize,
    pub subscriptions: usize,
    pub baseline_kib: u64,
    /// Just before the event (connections open, and for a burst subscribed, idle).
    pub before_kib: u64,
    /// Highest VmRSS sampled (and the kernel's high-water mark, VmHWM).
    pub peak_kib: u64,
    pub hwm_kib: u64,
    /// The event: messages delivered (burst) or subscriptions opened and closed (churn).
    pub event: StageResult,
    pub event_seconds: f64,
    /// (seconds since the event ended, VmRSS KiB), one a second.
    pub samples: Vec<(f64, u64)>,
    /// The last sample, at MEMBENCH_AFTER_SECONDS.
    pub end_kib: u64,
    /// 2 × before + 20 MB.
    pub aim_kib: u64,
    pub aim_met: bool,
}

impl After {
    /// The sample nearest `seconds` after the event.
    pub fn at(&self, seconds: f64) -> Option<u64> {
        self.samples
            .iter()
            .min_by(|a, b| (a.0 - seconds).abs().total_cmp(&(b.0 - seconds).abs()))
            .map(|s| s.1)
    }
}

pub fn run_all(settings: &Settings, default_bin: &Path) -> Result<Vec<VariantResult>, String> {
    let dir = TempDir::new("ipc-gw-membench")?;
    let (_nats, nats_url) = start_nats(&dir.0)?;
    let mut results = Vec::new();
    for variant in settings.variants(default_bin) {
        eprintln!("== variant {} ({})", variant.name, variant.binary.display());
        let mut result = VariantResult {
            variant: variant.clone(),
            gateway_args: String::new(),
            sizes: None,
            burst: None,
            churn: None,
            errors: Vec::new(),
        };
        let run = Run {
            settings,
            variant: &variant,
            nats_url: &nats_url,
            dir: &dir,
        };
        if settings.wants("sizes") {
            match run.sizes(&mut result.gateway_args) {
                Ok(sizes) => result.sizes = Some(sizes),
                Err(err) => result.errors.push(format!("sizes: {err}")),
            }
        }
        if settings.wants("burst") {
            match run.burst(&mut result.gateway_args) {
                Ok(after) => result.burst = Some(after),
                Err(err) => result.errors.push(format!("burst: {err}")),
            }
        }
        if settings.wants("churn") {
            match run.churn(&mut result.gateway_args) {
                Ok(after) => result.churn = Some(after),
                Err(err) => result.errors.push(format!("churn: {err}")),
            }
        }
        for err in &result.errors {
            eprintln!("   {}: {err}", variant.name);
        }
        results.push(result);
    }
    Ok(results)
}

struct Run<'a> {
    settings: &'a Settings,
    variant: &'a Variant,
    nats_url: &'a str,
    dir: &'a TempDir,
}

struct Gateway {
    proc: Proc,
    http: u16,
}

impl Gateway {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Run<'_> {
    fn gateway(&self, connections: usize, args_out: &mut String) -> Result<Gateway, String> {
        let http = free_port()?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--nats-url".into(),
            self.nats_url.into(),
            "--socket".into(),
            self.dir.0.join("gateway.sock").display().to_string(),
            "--http".into(),
            format!("127.0.0.1:{http}"),
            "--grpc".into(),
            "127.0.0.1:0".into(),
            "--max-connections".into(),
            (connections + 16).to_string(),
        ];
        args.extend(self.settings.gateway_args.iter().cloned());
        args.extend(self.variant.args.iter().cloned());
        let mut command = Command::new(&self.variant.binary);
        command
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.0, "gateway.log")?);
        for (var, value) in &self.variant.env {
            command.env(var, value);
        }
        let mut proc = Proc::spawn("ipc-gateway serve", &mut command)?;
        wait_ready(http, &mut proc, "the gateway did not become ready")?;
        *args_out = args.join(" ");
        Ok(Gateway { proc, http })
    }

    fn settle(&self, gateway: &Gateway) -> Result<u64, String> {
        settle(gateway.pid(), self.settings.settle)
    }

    fn sizes(&self, args: &mut String) -> Result<Sizes, String> {
        let n = self.settings.connections;
        let gateway = self.gateway(n, args)?;
        let baseline_kib = self.settle(&gateway)?;
        let (mut clients, _) = Clients::open(gateway.http, n, self.settings)?;
        let idle_kib = self.settle(&gateway)?;
        eprintln!("   sizes: baseline {baseline_kib} KiB, {n} idle {idle_kib} KiB");
        clients.all_ok("sub mem.all", n)?;
        let one_subject_kib = self.settle(&gateway)?;
        eprintln!("   sizes: {n} on one subject {one_subject_kib} KiB");
        drop(clients);
        drop(gateway);

        let gateway = self.gateway(n, args)?;
        let own_baseline_kib = self.settle(&gateway)?;
        let (mut clients, _) = Clients::open(gateway.http, n, self.settings)?;
        let own_idle_kib = self.settle(&gateway)?;
        clients.all_ok("own mem.own 1", n)?;
        let own_subject_kib = self.settle(&gateway)?;
        eprintln!("   sizes: {n} each on its own subject {own_subject_kib} KiB");
        Ok(Sizes {
            connections: n,
            baseline_kib,
            idle_kib,
            one_subject_kib,
            own_baseline_kib,
            own_idle_kib,
            own_subject_kib,
        })
    }

    fn burst(&self, args: &mut String) -> Result<After, String> {
        let s = self.settings;
        let n = s.burst_subscribers;
        let gateway = self.gateway(n, args)?;
        let baseline_kib = self.settle(&gateway)?;
        let (mut clients, _) = Clients::open(gateway.http, n, s)?;
        clients.all_ok("sub mem.burst", n)?;
        let before_kib = self.settle(&gateway)?;
        let sampler = Sampler::start(gateway.pid());
        let started = Instant::now();
        publish(self.nats_url, "mem.burst", s.burst_messages, s.burst_bytes)?;
        let event = clients.command(&format!("expect {} 120", s.burst_messages))?;
        let event_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "   burst: {} msgs, {} dropped, {} of {n} complete in {event_seconds:.1} s",
            event.msgs, event.dropped, event.ok
        );
        let after = self.after(
            &gateway,
            sampler,
            n,
            n,
            baseline_kib,
            before_kib,
            event,
            event_seconds,
        );
        drop(clients);
        Ok(after)
    }

    fn churn(&self, args: &mut String) -> Result<After, String> {
        let s = self.settings;
        let n = s.churn_connections;
        let per_connection = s.churn_subscriptions.div_ceil(n);
        let gateway = self.gateway(n, args)?;
        let baseline_kib = self.settle(&gateway)?;
        let (mut clients, _) = Clients::open(gateway.http, n, s)?;
        let before_kib = self.settle(&gateway)?;
        let sampler = Sampler::start(gateway.pid());
        let started = Instant::now();
        let opened = clients.all_ok(
            &format!("own mem.churn {per_connection}"),
            n * per_connection,
        )?;
        let held_kib = proc_memory(gateway.pid()).map_or(0, |m| m.vm_rss);
        let closed = clients.all_ok("unsub", n * per_connection)?;
        let event_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "   churn: {} subscriptions opened in {:.1} s (RSS {held_kib} KiB), closed in {:.1} s",
            opened.ok, opened.seconds, closed.seconds
        );
        let event = StageResult {
            seconds: opened.seconds + closed.seconds,
            ..closed
        };
        let after = self.after(
            &gateway,
            sampler,
            n,
            n * per_connection,
            baseline_kib,
            before_kib,
            event,
            event_seconds,
        );
        drop(clients);
        Ok(after)
    }

    /// Samples until MEMBENCH_AFTER_SECONDS after the event, then sums up.
    #[allow(clippy::too_many_arguments)]
    fn after(
        &self,
        gateway: &Gateway,
        sampler: Sampler,
        connections: usize,
        subscriptions: usize,
        baseline_kib: u64,
        before_kib: u64,
        event: StageResult,
        event_seconds: f64,
    ) -> After {
        let ended = Instant::now();
        let mut samples = Vec::new();
        let after = self.settings.after.as_secs_f64();
        loop {
            let t = ended.elapsed().as_secs_f64();
            if let Some(memory) = proc_memory(gateway.pid()) {
                samples.push(((t * 10.0).round() / 10.0, memory.vm_rss));
            }
            if t >= after {
                break;
            }
            let next = (samples.len() as f64).min(after) - t;
            std::thread::sleep(Duration::from_secs_f64(next.max(0.01)));
        }
        let during = sampler.stop();
        let hwm_kib = proc_memory(gateway.pid()).map_or(0, |m| m.vm_hwm);
        let peak_kib = during
            .iter()
            .chain(samples.iter().map(|s| &s.1))
            .copied()
            .max()
            .unwrap_or(0);
        let end_kib = samples.last().map_or(0, |s| s.1);
        let aim_kib = 2 * before_kib + 20 * 1000 * 1000 / 1024;
        eprintln!(
            "   before {before_kib} KiB, peak {peak_kib} KiB, +{after:.0} s {end_kib} KiB (aim ≤ {aim_kib})"
        );
        After {
            connections,
            subscriptions,
            baseline_kib,
            before_kib,
            peak_kib,
            hwm_kib,
            event,
            event_seconds,
            samples,
            end_kib,
            aim_kib,
            aim_met: end_kib <= aim_kib,
        }
    }
}

/// VmRSS every 100 ms in a thread, while an event runs (for its peak).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u64>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(memory) = proc_memory(pid) {
                    samples.push(memory.vm_rss);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Waits until VmRSS moved at most SETTLE_KIB over SETTLE_WINDOW (at most `cap`); its value.
pub fn settle(pid: u32, cap: Duration) -> Result<u64, String> {
    let started = Instant::now();
    let every = Duration::from_millis(250);
    let window = (SETTLE_WINDOW.as_millis() / every.as_millis()) as usize + 1;
    let mut samples: Vec<u64> = Vec::new();
    loop {
        let rss = proc_memory(pid).ok_or("the gateway is gone")?.vm_rss;
        samples.push(rss);
        if samples.len() >= window {
            let last = &samples[samples.len() - window..];
            let (min, max) = (last.iter().min(), last.iter().max());
            if let (Some(min), Some(max)) = (min, max)
                && max - min <= SETTLE_KIB
            {
                return Ok(rss);
            }
        }
        if started.elapsed() >= cap {
            return Ok(rss);
        }
        std::thread::sleep(every);
    }
}

/// Publishes `count` messages of `bytes` to `subject` at once, from a NATS client of this
/// process, and flushes.
fn publish(nats_url: &str, subject: &str, count: usize, bytes: usize) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(async {
        let client = async_nats::connect(nats_url)
            .await
            .map_err(|err| format!("NATS: {err}"))?;
        let payload = bytes::Bytes::from(vec![b'x'; bytes]);
        for _ in 0..count {
            client
                .publish(subject.to_owned(), payload.clone())
                .await
                .map_err(|err| format!("publish: {err}"))?;
        }
        client.flush().await.map_err(|err| format!("flush: {err}"))
    })
}
