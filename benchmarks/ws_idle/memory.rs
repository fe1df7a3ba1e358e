//! The gateway's memory at one stage: read from /proc once VmRSS has settled, with its FDs,
//! threads and WebSocket connection gauge.

use std::time::{Duration, Instant};

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::common::{Memory, fd_count, http_get, metric_labeled, proc_memory, proc_status};
use crate::{SAMPLE_EVERY, SETTLE_KIB, SETTLE_WINDOW};

/// The gateway's memory at one stage, and what else was true then.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub memory: Memory,
    pub settled: bool,
    /// Seconds it took to settle (or the cap).
    pub settle_seconds: f64,
    pub ws_connections: Option<f64>,
    pub fds: Option<u64>,
    pub threads: Option<u64>,
}

/// In JSON the memory fields are named with their unit (`vm_rss_kib`, ...).
impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let m = &self.memory;
        let mut map = serializer.serialize_map(Some(11))?;
        map.serialize_entry("vm_rss_kib", &m.vm_rss)?;
        map.serialize_entry("rss_anon_kib", &m.rss_anon)?;
        map.serialize_entry("rss_file_kib", &m.rss_file)?;
        map.serialize_entry("vm_hwm_kib", &m.vm_hwm)?;
        map.serialize_entry("private_dirty_kib", &m.private_dirty)?;
        map.serialize_entry("anonymous_kib", &m.anonymous)?;
        map.serialize_entry("settled", &self.settled)?;
        map.serialize_entry("settle_seconds", &self.settle_seconds)?;
        map.serialize_entry("ws_connections_gauge", &self.ws_connections)?;
        map.serialize_entry("fds", &self.fds)?;
        map.serialize_entry("threads", &self.threads)?;
        map.end()
    }
}

/// Waits until VmRSS moved at most SETTLE_KIB over SETTLE_WINDOW (at most `cap`), then reads
/// the process's memory, its FDs and (for a gateway: its HTTP port) its WebSocket connection
/// gauge.
pub fn settle(pid: u32, http: Option<u16>, cap: Duration) -> Result<Snapshot, String> {
    let started = Instant::now();
    let window = (SETTLE_WINDOW.as_millis() / SAMPLE_EVERY.as_millis()) as usize + 1;
    let mut samples: Vec<u64> = Vec::new();
    let settled = loop {
        let memory = proc_memory(pid).ok_or("the server is gone")?;
        samples.push(memory.vm_rss);
        if samples.len() >= window {
            let last = &samples[samples.len() - window..];
            let (min, max) = (last.iter().min(), last.iter().max());
            if let (Some(min), Some(max)) = (min, max)
                && max - min <= SETTLE_KIB
            {
                break true;
            }
        }
        if started.elapsed() >= cap {
            break false;
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let memory = proc_memory(pid).ok_or("the server is gone")?;
    let ws_connections = http
        .and_then(|http| http_get(http, "/metrics"))
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| metric_labeled(&body, "ipc_gateway_connections", "frontend=\"ws\""));
    Ok(Snapshot {
        memory,
        settled,
        settle_seconds: started.elapsed().as_secs_f64(),
        ws_connections,
        fds: fd_count(pid),
        threads: proc_status(pid).map(|(_, threads)| threads),
    })
}

/// Waits until the gateway's WebSocket gauge reads `want` (at most `cap`).
pub fn wait_for_gauge(http: u16, want: f64, cap: Duration) -> Option<f64> {
    let deadline = Instant::now() + cap;
    loop {
        let value = http_get(http, "/metrics").and_then(|(_, body)| {
            metric_labeled(&body, "ipc_gateway_connections", "frontend=\"ws\"")
        });
        if value == Some(want) || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
