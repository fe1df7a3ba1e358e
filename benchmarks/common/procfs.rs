//! What /proc says about a process: memory, threads, open files and their kinds, CPU time,
//! limits; and the output of a small command.

use std::process::{Command, Stdio};

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

/// The whole machine's CPU time from /proc/stat, in clock ticks summed over all CPUs: (busy,
/// total), where busy is total less idle and iowait.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
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
