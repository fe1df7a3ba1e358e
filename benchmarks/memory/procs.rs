//! The parent's side of the client processes: how many, starting them, giving every one a
//! command and adding up their status lines.

use std::process::Command;

use serde::Serialize;

use crate::common::{LineProc, nofile_limit};
use crate::settings::Settings;
use crate::{CLIENT_FD_SPARE, GATEWAY_FD_SPARE, STAGE_PATIENCE};

/// One command over all client processes.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StageResult {
    pub ok: usize,
    pub failed: usize,
    pub msgs: u64,
    pub dropped: u64,
    pub seconds: f64,
    pub first_error: Option<String>,
}

impl StageResult {
    fn parse(line: &str, stage: &str) -> Result<StageResult, String> {
        let rest = line
            .strip_prefix(stage)
            .ok_or_else(|| format!("expected {stage:?} from a client process, got {line:?}"))?;
        let (fields, error) = rest.split_once(" error=").unwrap_or((rest, "-"));
        let mut r = StageResult {
            first_error: (error != "-").then(|| error.to_owned()),
            ..StageResult::default()
        };
        for field in fields.split_whitespace() {
            let (key, value) = field.split_once('=').unwrap_or((field, ""));
            match key {
                "ok" => r.ok = value.parse().unwrap_or(0),
                "failed" => r.failed = value.parse().unwrap_or(0),
                "msgs" => r.msgs = value.parse().unwrap_or(0),
                "dropped" => r.dropped = value.parse().unwrap_or(0),
                "secs" => r.seconds = value.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        Ok(r)
    }

    fn add(&mut self, other: StageResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.msgs += other.msgs;
        self.dropped += other.dropped;
        self.seconds = self.seconds.max(other.seconds);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The client processes holding one scenario's connections.
pub struct Clients(Vec<LineProc>);

impl Clients {
    /// Opens `count` connections to the gateway's HTTP port, spread over as many client
    /// processes as the open-files limit needs; returns once all reported.
    pub fn open(
        port: u16,
        count: usize,
        settings: &Settings,
    ) -> Result<(Clients, StageResult), String> {
        let soft = nofile_limit("self").map_or(1024, |(soft, _)| soft);
        if count as u64 + GATEWAY_FD_SPARE > soft {
            return Err(format!(
                "{count} connections need about {} open files in the gateway, but `ulimit -n` is {soft} (benchmarks/memory.sh raises it to the hard limit)",
                count as u64 + GATEWAY_FD_SPARE
            ));
        }
        let per_process = (soft - CLIENT_FD_SPARE) as usize;
        let processes = count.div_ceil(per_process).max(1);
        let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
        let mut clients = Vec::new();
        let mut first = 0;
        for i in 0..processes {
            let share = count / processes + usize::from(i < count % processes);
            clients.push(LineProc::spawn(
                "memory bench client",
                Command::new(&exe)
                    .env("MEMBENCH_ROLE", "client")
                    .env("MEMBENCH_PORT", port.to_string())
                    .env("MEMBENCH_COUNT", share.to_string())
                    .env("MEMBENCH_FIRST", first.to_string())
                    .env("MEMBENCH_SOURCES", settings.sources.to_string())
                    .env("MEMBENCH_HANDSHAKES", settings.handshakes.to_string()),
            )?);
            first += share;
        }
        let mut clients = Clients(clients);
        let opened = clients.collect("opened")?;
        if opened.ok != count {
            return Err(format!(
                "only {} of {count} connections opened; first error: {}",
                opened.ok,
                opened.first_error.as_deref().unwrap_or("-")
            ));
        }
        Ok((clients, opened))
    }

    /// Gives every client process `command` (its first word names the status line).
    pub fn command(&mut self, command: &str) -> Result<StageResult, String> {
        for client in &mut self.0 {
            client.send(command)?;
        }
        let stage = command.split_whitespace().next().unwrap_or(command);
        self.collect(stage)
    }

    /// Like `command`, but fails when a connection failed.
    pub fn all_ok(&mut self, command: &str, want: usize) -> Result<StageResult, String> {
        let result = self.command(command)?;
        if result.ok != want || result.failed > 0 {
            return Err(format!(
                "`{command}`: {} ok, {} failed of {want}; first error: {}",
                result.ok,
                result.failed,
                result.first_error.as_deref().unwrap_or("-")
            ));
        }
        Ok(result)
    }

    fn collect(&mut self, stage: &str) -> Result<StageResult, String> {
        let mut total = StageResult::default();
        for client in &mut self.0 {
            let line = client.recv(STAGE_PATIENCE).ok_or_else(|| {
                format!("a client process said nothing for {STAGE_PATIENCE:?} after {stage}")
            })?;
            total.add(StageResult::parse(&line, stage)?);
        }
        Ok(total)
    }
}
