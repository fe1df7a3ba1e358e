//! Helpers shared by the benchmark binaries (`gateway.rs`, `soak.rs`, `ws_idle.rs`): child
//! processes that stop when dropped, loopback ports, a tiny HTTP GET for /ready and /metrics,
//! what /proc says about a process (memory, FDs, CPU, limits), and the run's metadata (machine,
//! git state, date, the recorded command). Each bench includes it with `mod common;`, so
//! helpers a bench does not use are not dead code.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long start-up waits (nats-server, echo service, gateway) before giving up.
pub const START_PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Settings from the environment

/// A number from the environment, checked against a range; unset or empty gives `default`.
pub fn env_f64(name: &str, default: f64, min: f64, max: f64) -> Result<f64, String> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => {
            let value: f64 = text
                .trim()
                .parse()
                .map_err(|_| format!("{name}={text:?} is not a number"))?;
            if !(min..=max).contains(&value) {
                return Err(format!("{name}={value} is outside {min}..={max}"));
            }
            Ok(value)
        }
        _ => Ok(default),
    }
}

/// Extra `ipc-gateway serve` flags from a variable, split on whitespace.
pub fn env_args(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|args| args.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Artifacts are written unless `name` (e.g. BENCH_NO_ARTIFACTS) is set to something.
pub fn env_artifacts(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v.is_empty())
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process that is stopped when dropped: SIGTERM, a bounded wait, then SIGKILL.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command) -> Result<Proc, String> {
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start {name} ({command:?}): {err}"))?;
        Ok(Proc {
            name,
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status);
        }
        self.exited
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.exited() {
            None => Ok(()),
            Some(status) => Err(format!("{} exited early: {status}", self.name)),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
    }

    /// SIGTERM, up to `patience` for it to exit, then SIGKILL. The exit status, and whether
    /// it exited by itself (false: it had to be killed).
    pub fn stop_within(&mut self, patience: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(status) = self.exited() {
            return (Some(status), true);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return (Some(status), true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        (self.exited, false)
    }

    /// SIGTERM, up to 8 s, then SIGKILL.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(8));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|err| format!("no free loopback port: {err}"))
}

pub fn wait_for_tcp(port: u16, proc: &mut Proc) -> Result<(), String> {
    let deadline = Instant::now() + START_PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.check_alive()?;
        if Instant::now() >= deadline {
            return Err(format!("{} did not listen on port {port}", proc.name));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// One nats-server on a free loopback port, logging into `dir`; returns it and its URL.
pub fn start_nats(dir: &Path) -> Result<(Proc, String), String> {
    let port = free_port()?;
    let mut nats = Proc::spawn(
        "nats-server",
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, "nats-server.log")?),
    )?;
    wait_for_tcp(port, &mut nats)?;
    Ok((nats, format!("nats://127.0.0.1:{port}")))
}

/// The demo echo service (`ipc-gateway demo-echo`) answering `subject`, logging warnings
/// into `dir`.
pub fn start_echo(bin: &Path, nats_url: &str, subject: &str, dir: &Path) -> Result<Proc, String> {
    Proc::spawn(
        "ipc-gateway demo-echo",
        Command::new(bin)
            .args(["demo-echo", "--nats-url", nats_url, "--subject", subject])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, "echo.log")?),
    )
}

/// `GET path` on a loopback port: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    stream.take(8 << 20).read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `GET path` on a loopback port; only the status code.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

/// The sum of a Prometheus metric's samples over all label sets.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    metric_where(text, name, |_| true)
}

/// The sum of a Prometheus metric's samples whose labels contain `label` (e.g.
/// `frontend="ws"`).
pub fn metric_labeled(text: &str, name: &str, label: &str) -> Option<f64> {
    metric_where(text, name, |labels| labels.contains(label))
}

fn metric_where(text: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(end) = line.find(['{', ' ']) else {
            continue;
        };
        if &line[..end] != name {
            continue;
        }
        let labels = line[end..]
            .strip_prefix('{')
            .and_then(|rest| rest.split_once('}'))
            .map_or("", |(labels, _)| labels);
        if !keep(labels) {
            continue;
        }
        if let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            sum += value;
            found = true;
        }
    }
    found.then_some(sum)
}

pub fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, String> {
    std::fs::File::create(dir.join(name)).map_err(|err| format!("{name}: {err}"))
}

/// A private directory for sockets and logs, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/<prefix>-<pid>`, e.g. prefix `ipc-gw-bench`.
    pub fn new(prefix: &str) -> Result<TempDir, String> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// What /proc says about a process

/// A `key: value kB` (or plain number) field of a /proc file such as `status`.
fn proc_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line[name.len()..].split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
}

/// VmRSS (KiB) and thread count from /proc/PID/status.
pub fn proc_status(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        proc_field(&status, "VmRSS:")?,
        proc_field(&status, "Threads:").unwrap_or(0),
    ))
}

/// Memory of a process in KiB: /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM) and
/// /proc/PID/smaps_rollup (Private_Dirty, Anonymous; `None` where the kernel lacks it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub vm_hwm: u64,
    pub private_dirty: Option<u64>,
    pub anonymous: Option<u64>,
}

pub fn proc_memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
    let rollup_field = |name: &str| rollup.as_deref().and_then(|r| proc_field(r, name));
    Some(Memory {
        vm_rss: proc_field(&status, "VmRSS:")?,
        rss_anon: proc_field(&status, "RssAnon:").unwrap_or(0),
        rss_file: proc_field(&status, "RssFile:").unwrap_or(0),
        vm_hwm: proc_field(&status, "VmHWM:").unwrap_or(0),
        private_dirty: rollup_field("Private_Dirty:"),
        anonymous: rollup_field("Anonymous:"),
    })
}

/// The open-files limit (soft, hard) of a process, from /proc/PID/limits ("self" works).
pub fn nofile_limit(pid: &str) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace();
    let parse = |v: Option<&str>| match v? {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    };
    Some((parse(numbers.next())?, parse(numbers.next())?))
}

/// What a process's FDs point at, counted by kind (`socket`, `anon_inode:[eventpoll]`, a path).
pub fn fd_kinds(pid: u32) -> Vec<(String, u64)> {
    let mut kinds: Vec<(String, u64)> = Vec::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for entry in entries.flatten().take(100_000) {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.display().to_string();
        let kind = match target.split_once(":[") {
            Some((kind @ ("socket" | "pipe"), _)) => kind.to_string(),
            _ => target,
        };
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.sort();
    kinds
}

pub fn fd_kinds_text(kinds: &[(String, u64)]) -> String {
    kinds
        .iter()
        .map(|(k, n)| format!("{n}× {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn fd_count(pid: u32) -> Option<u64> {
    Some(
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .take(1_000_000)
            .count() as u64,
    )
}

/// User + system CPU time of a process so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

pub fn ticks_per_second() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .and_then(|s| s.parse().ok())
        .unwrap_or(100.0)
}

pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// Run metadata

/// CPU count, CPU model and kernel release.
pub fn machine_meta() -> (usize, String, String) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    (nproc, cpu_model, kernel)
}

/// The command line to record: `command_var` (set by the bench's script) if set, else the
/// knobs that are set followed by `fallback` (e.g. `cargo bench --bench gateway`).
pub fn recorded_command(command_var: &str, knobs: &[&str], fallback: &str) -> String {
    if let Ok(command) = std::env::var(command_var)
        && !command.trim().is_empty()
    {
        return command;
    }
    let mut env = Vec::new();
    for name in knobs {
        if let Ok(value) = std::env::var(name) {
            env.push(format!("{name}={value}"));
        }
    }
    env.push(fallback.into());
    env.join(" ")
}

pub fn utc_now() -> String {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into())
}

/// The commit (short or full), and the files under src/ and the manifest that differ from it.
pub fn git_state(manifest: &Path, short: bool) -> (String, Vec<String>) {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(manifest)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let rev: &[&str] = if short {
        &["rev-parse", "--short", "HEAD"]
    } else {
        &["rev-parse", "HEAD"]
    };
    let commit = git(rev).map_or("unknown".into(), |s| s.trim().to_owned());
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .map(|s| {
        s.lines()
            .filter_map(|line| line.get(3..))
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default();
    (commit, dirty)
}

/// The gateway binary: IPC_GATEWAY_BIN, else target/release/ipc-gateway (honouring
/// CARGO_TARGET_DIR). `script` names what builds it, for the error message.
pub fn gateway_binary(manifest: &Path, script: &str) -> Result<PathBuf, String> {
    let bin = match std::env::var_os("IPC_GATEWAY_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("target"));
            let target = if target.is_relative() {
                manifest.join(target)
            } else {
                target
            };
            target.join("release").join("ipc-gateway")
        }
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "the gateway binary {} is missing: run `cargo build --release` first ({script} does)",
            bin.display()
        ))
    }
}

/// The binary's modification time, UTC.
pub fn built_at(bin: &Path) -> String {
    command_output(
        "date",
        &[
            "-u",
            "-r",
            &bin.display().to_string(),
            "+%Y-%m-%dT%H:%M:%SZ",
        ],
    )
    .unwrap_or_else(|| "unknown".into())
}
