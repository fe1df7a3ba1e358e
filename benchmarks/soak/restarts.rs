//! NATS restarts: nats-server on fixed ports (so that it can be started again where the gateway
//! and the echo service expect it), and the watch after each restart for when the gateway's
//! /ready and nats-server's /connz say everything is back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Proc, http_get, log_file, wait_for_tcp};

/// After a restart, how long gateway readiness and recovery are watched.
const RECOVERY_PATIENCE: Duration = Duration::from_secs(120);

/// One kill and restart as the supervisor saw it (seconds since the load started).
#[derive(Default, Clone)]
pub struct Restart {
    pub kill_s: f64,
    pub restart_s: Option<f64>,
    /// nats-server accepted TCP again.
    pub nats_listening_s: Option<f64>,
    /// The gateway's /ready answered 200 again.
    pub gateway_ready_s: Option<f64>,
    pub echo_connected_s: Option<f64>,
    pub gateway_connected_s: Option<f64>,
}

/// When, after a restart, the gateway's /ready said 200 again and nats-server saw the echo
/// service's and all the gateway's connections again (seconds since t0).
#[derive(Default, Clone, Copy)]
pub struct Reconnected {
    pub gateway_ready: Option<f64>,
    pub echo_connected: Option<f64>,
    pub gateway_connected: Option<f64>,
}

/// Polls the gateway's /ready and nats-server's /connz after a restart (bounded).
pub fn watch_recovery(
    gateway_http: u16,
    nats_monitor: u16,
    pool_size: usize,
    t0: Instant,
    into: Arc<Mutex<Reconnected>>,
) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + RECOVERY_PATIENCE;
        let mut seen = Reconnected::default();
        while Instant::now() < deadline {
            let now = t0.elapsed().as_secs_f64();
            if seen.gateway_ready.is_none()
                && let Some((200, _)) = http_get(gateway_http, "/ready")
            {
                seen.gateway_ready = Some(now);
            }
            if (seen.echo_connected.is_none() || seen.gateway_connected.is_none())
                && let Some(connz) = http_get(nats_monitor, "/connz")
                    .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            {
                let names: Vec<&str> = connz
                    .get("connections")
                    .and_then(Value::as_array)
                    .map(|list| {
                        list.iter()
                            .filter_map(|c| c.get("name").and_then(Value::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                if seen.echo_connected.is_none() && names.contains(&"ipc-gateway-demo-echo") {
                    seen.echo_connected = Some(now);
                }
                let pool = names
                    .iter()
                    .filter(|n| n.starts_with("ipc-gateway-") && **n != "ipc-gateway-demo-echo")
                    .count();
                if seen.gateway_connected.is_none() && pool >= pool_size {
                    seen.gateway_connected = Some(now);
                }
            }
            *into.lock().unwrap_or_else(|p| p.into_inner()) = seen;
            if seen.gateway_ready.is_some()
                && seen.echo_connected.is_some()
                && seen.gateway_connected.is_some()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// nats-server on `port` with its monitoring port, logging into `dir` (one log per start).
pub fn start_nats(port: u16, monitor: u16, dir: &Path, generation: usize) -> Result<Proc, String> {
    let mut proc = Proc::spawn(
        "nats-server",
        Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("nats-server-{generation}.log"))?),
    )?;
    wait_for_tcp(port, &mut proc)?;
    Ok(proc)
}
