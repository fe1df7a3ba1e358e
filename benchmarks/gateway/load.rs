//! The load generator: for each case, `c` tasks share the row's client and each keeps one
//! request outstanding through a warm-up and a measured window; only replies inside the window
//! count. It also reads the CPU time the processes spent in the window. `run_all` drives every
//! case of the schedule on this process's runtime (or, for `direct, mt client`, on a
//! multi-thread one).

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::SUBJECT;
use crate::clients::{self, Endpoints, Target};
use crate::common::{START_PATIENCE, cpu_ticks, payload_label, ticks_per_second};
use crate::servers::Servers;
use crate::settings::{Case, Mode, Settings, schedule};

/// After a row's end, tasks still waiting for a reply get this long before they are aborted.
const ROW_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on requests one task sends in one row.
const MAX_REQUESTS_PER_TASK: u64 = 50_000_000;
/// Upper bound on latency samples kept per row (throughput is counted past it).
const MAX_SAMPLES_PER_ROW: usize = 8_000_000;

/// CPU time per completed request in microseconds, by process, over the measured window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuPerRequest {
    pub gateway: Option<f64>,
    pub nats_server: Option<f64>,
    pub echo_service: Option<f64>,
    pub bench_process: Option<f64>,
}

/// One run of one case.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub req_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub aborted_tasks: usize,
    #[serde(rename = "cpu_us_per_request")]
    pub cpu: CpuPerRequest,
}

/// The processes whose CPU time a row reports.
#[derive(Clone, Copy)]
struct Pids {
    gateway: Option<u32>,
    nats_server: u32,
    echo_service: u32,
}

/// When a row's measured window starts and ends, and how many latencies a task keeps.
#[derive(Clone, Copy)]
struct Window {
    t0: Instant,
    t_end: Instant,
    sample_cap: usize,
}

#[derive(Default)]
struct TaskResult {
    samples: Vec<u64>,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs every case of the schedule, in order, printing one line per case on stderr.
pub fn run_all(settings: &Settings, servers: &Servers) -> Result<Vec<(Case, Measured)>, String> {
    let runtime = if settings.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.client_threads)
            .enable_all()
            .build()
    }
    .map_err(|err| format!("runtime: {err}"))?;
    let multi = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    let env = Env {
        settings,
        servers,
        clk_tck: ticks_per_second(),
        multi: multi.handle().clone(),
    };
    let cases = schedule(settings);
    let results = runtime.block_on(async {
        wait_for_echo(&servers.nats_url).await?;
        let mut results = Vec::with_capacity(cases.len());
        for (index, &case) in cases.iter().enumerate() {
            let measured = run_case(&env, case).await?;
            print_progress(index, cases.len(), case, &measured);
            results.push((case, measured));
        }
        Ok::<_, String>(results)
    });
    drop(runtime);
    multi.shutdown_timeout(Duration::from_secs(2));
    results
}

/// The echo service subscribes shortly after it starts: waits until it answers.
async fn wait_for_echo(nats_url: &str) -> Result<(), String> {
    let deadline = Instant::now() + START_PATIENCE;
    let probe = async_nats::connect(nats_url)
        .await
        .map_err(|err| format!("connect {nats_url}: {err}"))?;
    while probe
        .request(SUBJECT, Bytes::from_static(b"ping"))
        .await
        .is_err()
    {
        if Instant::now() >= deadline {
            return Err("the echo service did not answer".to_string());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn print_progress(index: usize, total: usize, case: Case, measured: &Measured) {
    eprintln!(
        "[{:>2}/{}] {:<20} gw-threads {:<2} c={:<3} {:>7}: {:>8.0} req/s  p50 {:>7.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs{}",
        index + 1,
        total,
        case.mode.name(),
        if case.mode.is_gateway() {
            case.workers.to_string()
        } else {
            "—".into()
        },
        case.concurrency,
        payload_label(case.payload),
        measured.req_per_s,
        measured.p50_us,
        measured.p99_us,
        measured.p999_us,
        if measured.errors > 0 {
            format!("  ERRORS {}", measured.errors)
        } else {
            String::new()
        }
    );
}

/// What one benchmark run has to hand.
struct Env<'a> {
    settings: &'a Settings,
    servers: &'a Servers,
    clk_tck: f64,
    /// A multi-thread runtime (one worker per CPU) for the `direct, mt client` rows.
    multi: tokio::runtime::Handle,
}

async fn run_case(env: &Env<'_>, case: Case) -> Result<Measured, String> {
    let (warmup, row, clk_tck) = (env.settings.warm(), env.settings.row(), env.clk_tck);
    let mut pids = Pids {
        gateway: None,
        nats_server: env.servers.nats.pid(),
        echo_service: env.servers.echo.pid(),
    };
    let measured = if case.mode == Mode::DirectMulti {
        // Connected and driven on the multi-thread runtime, so its tasks run there.
        let url = env.servers.nats_url.clone();
        let payload = clients::payload_text(case.payload);
        env.multi
            .spawn(async move {
                let target = clients::connect_direct(&url, payload, None).await?;
                clients::first_request(&target, case.mode).await?;
                Ok::<_, String>(measure(target, case.concurrency, warmup, row, pids, clk_tck).await)
            })
            .await
            .map_err(|err| format!("{}: {err}", case.mode.name()))??
    } else {
        let gateway = case
            .mode
            .is_gateway()
            .then(|| env.servers.gateway(case.workers))
            .transpose()?;
        pids.gateway = gateway.map(|g| g.proc.pid());
        let endpoints = Endpoints {
            nats_url: &env.servers.nats_url,
            bare_socket: &env.servers.bare_socket,
            gateway: gateway.map(|g| (g.socket.as_path(), g.http, g.grpc)),
            identity: env.settings.identity_headers,
        };
        let target = clients::connect(case, &endpoints).await?;
        measure(target, case.concurrency, warmup, row, pids, clk_tck).await
    };
    // Let the connection close and the processes settle before the next row.
    tokio::time::sleep(Duration::from_millis(150)).await;
    Ok(measured)
}

/// Runs `concurrency` tasks, each sending one request at a time, for warm-up + measured time.
/// A request counts if it completes inside the measured window; its latency is send to reply.
async fn measure(
    target: Target,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    pids: Pids,
    clk_tck: f64,
) -> Measured {
    let start = tokio::time::Instant::now();
    let (t0, t_end) = (start + warmup, start + warmup + duration);
    let window = Window {
        t0: t0.into_std(),
        t_end: t_end.into_std(),
        sample_cap: (MAX_SAMPLES_PER_ROW / concurrency).max(1000),
    };
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(drive(target.clone(), window)))
        .collect();
    let snapshot = || {
        [
            pids.gateway.and_then(cpu_ticks),
            cpu_ticks(pids.nats_server),
            cpu_ticks(pids.echo_service),
            cpu_ticks(std::process::id()),
        ]
    };
    tokio::time::sleep_until(t0).await;
    let before = snapshot();
    tokio::time::sleep_until(t_end).await;
    let after = snapshot();

    let (mut total, aborted_tasks) = collect(tasks, t_end + ROW_GRACE).await;
    total.samples.sort_unstable();
    let completed = total.completed;
    let per_request = |i: usize| -> Option<f64> {
        let (b, a) = (before[i]?, after[i]?);
        (completed > 0).then(|| (a.saturating_sub(b)) as f64 / clk_tck * 1e6 / completed as f64)
    };
    Measured {
        req_per_s: completed as f64 / duration.as_secs_f64(),
        p50_us: percentile(&total.samples, 0.50),
        p99_us: percentile(&total.samples, 0.99),
        p999_us: percentile(&total.samples, 0.999),
        completed,
        errors: total.errors,
        first_error: total.first_error,
        aborted_tasks,
        cpu: CpuPerRequest {
            gateway: per_request(0),
            nats_server: per_request(1),
            echo_service: per_request(2),
            bench_process: per_request(3),
        },
    }
}

/// One task of a row: one request at a time until the window ends.
async fn drive(target: Target, window: Window) -> TaskResult {
    let mut result = TaskResult {
        samples: Vec::with_capacity(window.sample_cap.min(1 << 16)),
        ..TaskResult::default()
    };
    for _ in 0..MAX_REQUESTS_PER_TASK {
        let sent = Instant::now();
        if sent >= window.t_end {
            break;
        }
        let outcome = target.once().await;
        let done = Instant::now();
        if done < window.t0 || done > window.t_end {
            continue;
        }
        match outcome {
            Ok(()) => {
                result.completed += 1;
                if result.samples.len() < window.sample_cap {
                    result.samples.push((done - sent).as_nanos() as u64);
                }
            }
            Err(err) => {
                result.errors += 1;
                result.first_error.get_or_insert(err);
            }
        }
    }
    result
}

/// Waits for every task until `grace`, aborting the late ones; their results summed, and how
/// many had to be aborted.
async fn collect(
    tasks: Vec<tokio::task::JoinHandle<TaskResult>>,
    grace: tokio::time::Instant,
) -> (TaskResult, usize) {
    let mut total = TaskResult::default();
    let mut aborted = 0;
    for task in tasks {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(grace, task).await {
            Ok(Ok(result)) => {
                total.completed += result.completed;
                total.errors += result.errors;
                if total.first_error.is_none() {
                    total.first_error = result.first_error;
                }
                total.samples.extend_from_slice(&result.samples);
            }
            Ok(Err(_)) => aborted += 1,
            Err(_) => {
                abort.abort();
                aborted += 1;
            }
        }
    }
    (total, aborted)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}
