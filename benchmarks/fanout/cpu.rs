//! CPU time of every process in a case between two marks, from /proc: the gateway and its
//! nats-server, the native nats-server, each client process, the publisher (this process), and
//! the whole machine's busy share (/proc/stat, which includes whatever else ran on it).

use std::time::Instant;

use serde::Serialize;

use crate::common::{cpu_ticks, machine_ticks, ticks_per_second};

/// The processes a case watches.
pub struct Pids {
    pub gateway: u32,
    pub gateway_nats: u32,
    pub native_nats: u32,
    pub clients: Vec<u32>,
}

pub struct Mark {
    at: Instant,
    gateway: Option<u64>,
    gateway_nats: Option<u64>,
    native_nats: Option<u64>,
    publisher: Option<u64>,
    clients: Vec<Option<u64>>,
    machine: Option<(u64, u64)>,
}

pub fn mark(pids: &Pids) -> Mark {
    Mark {
        at: Instant::now(),
        gateway: cpu_ticks(pids.gateway),
        gateway_nats: cpu_ticks(pids.gateway_nats),
        native_nats: cpu_ticks(pids.native_nats),
        publisher: cpu_ticks(std::process::id()),
        clients: pids.clients.iter().map(|&pid| cpu_ticks(pid)).collect(),
        machine: machine_ticks(),
    }
}

/// CPU seconds each used between two marks (clock-tick resolution), and the wall time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub wall_seconds: f64,
    pub gateway_seconds: f64,
    pub gateway_nats_seconds: f64,
    pub native_nats_seconds: f64,
    /// All client processes together.
    pub clients_seconds: f64,
    /// The busiest client process's CPU time over the wall time (1 = one whole CPU; each
    /// client process is one thread, so 1 is its ceiling).
    pub busiest_client_share: f64,
    pub publisher_seconds: f64,
    /// The whole machine's busy time over its capacity (all CPUs), 0..1.
    pub machine_busy: Option<f64>,
    /// The part of that not used by this case's processes (other work on the machine, the
    /// kernel's own threads), 0..1.
    pub others_busy: Option<f64>,
}

pub fn between(a: &Mark, b: &Mark) -> CpuUse {
    let hz = ticks_per_second();
    let delta = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => y.saturating_sub(x) as f64 / hz,
        _ => 0.0,
    };
    let wall = (b.at - a.at).as_secs_f64();
    let clients: Vec<f64> = a
        .clients
        .iter()
        .zip(&b.clients)
        .map(|(x, y)| delta(*x, *y))
        .collect();
    let mut cpu = CpuUse {
        wall_seconds: wall,
        gateway_seconds: delta(a.gateway, b.gateway),
        gateway_nats_seconds: delta(a.gateway_nats, b.gateway_nats),
        native_nats_seconds: delta(a.native_nats, b.native_nats),
        clients_seconds: clients.iter().sum(),
        busiest_client_share: clients.iter().fold(0.0, |m: f64, c| m.max(*c)) / wall.max(1e-9),
        publisher_seconds: delta(a.publisher, b.publisher),
        machine_busy: None,
        others_busy: None,
    };
    if let (Some((busy0, total0)), Some((busy1, total1))) = (a.machine, b.machine)
        && total1 > total0
    {
        let capacity = (total1 - total0) as f64 / hz;
        let ours = cpu.gateway_seconds
            + cpu.gateway_nats_seconds
            + cpu.native_nats_seconds
            + cpu.clients_seconds
            + cpu.publisher_seconds;
        let busy = (busy1 - busy0) as f64 / hz;
        cpu.machine_busy = Some(busy / capacity);
        cpu.others_busy = Some(((busy - ours) / capacity).max(0.0));
    }
    cpu
}
