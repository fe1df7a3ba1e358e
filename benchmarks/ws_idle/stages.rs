//! The parent's side of the client processes: starting them, giving them commands and adding
//! up the status line each prints per stage.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::STAGE_PATIENCE;
use crate::common::LineProc;
use crate::settings::Settings;
use crate::ws::{Mode, Server};

pub struct ClientProc(pub LineProc);

impl ClientProc {
    pub fn start(
        exe: &Path,
        port: u16,
        first: usize,
        count: usize,
        kind: (Server, Mode),
        s: &Settings,
    ) -> Result<Self, String> {
        LineProc::spawn(
            "ws_idle client",
            Command::new(exe)
                .env("WSIDLE_ROLE", "client")
                .env("WSIDLE_PORT", port.to_string())
                .env("WSIDLE_COUNT", count.to_string())
                .env("WSIDLE_FIRST", first.to_string())
                .env("WSIDLE_SOURCES", s.sources.to_string())
                .env("WSIDLE_BIG_BYTES", s.big_bytes.to_string())
                .env("WSIDLE_HANDSHAKES", s.handshakes.to_string())
                .env("WSIDLE_SERVER", kind.0.name())
                .env("WSIDLE_MODE", kind.1.name()),
        )
        .map(ClientProc)
    }

    fn command(&mut self, command: &str) -> Result<(), String> {
        self.0.send(command)
    }

    /// Waits for the status line of `stage`.
    fn wait(&mut self, stage: &str) -> Result<StageResult, String> {
        let line = self.0.recv(STAGE_PATIENCE).ok_or_else(|| {
            format!("a client process said nothing for {STAGE_PATIENCE:?} in stage {stage}")
        })?;
        StageResult::parse(&line, stage)
    }
}

/// One stage over all client processes: connections that made it, that failed, that were
/// lost while idle; the longest time a process took; the first error.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StageResult {
    pub ok: usize,
    pub failed: usize,
    #[serde(rename = "lost_while_idle")]
    pub lost: usize,
    pub seconds: f64,
    pub first_error: Option<String>,
}

impl StageResult {
    fn parse(line: &str, stage: &str) -> Result<StageResult, String> {
        let rest = line
            .strip_prefix(stage)
            .ok_or_else(|| format!("expected {stage:?} from a client process, got {line:?}"))?;
        let (fields, error) = rest.split_once(" error=").unwrap_or((rest, "-"));
        let mut result = StageResult {
            first_error: (error != "-").then(|| error.to_owned()),
            ..StageResult::default()
        };
        for field in fields.split_whitespace() {
            let (key, value) = field.split_once('=').unwrap_or((field, ""));
            match key {
                "ok" => result.ok = value.parse().unwrap_or(0),
                "failed" => result.failed = value.parse().unwrap_or(0),
                "lost" => result.lost = value.parse().unwrap_or(0),
                "secs" => result.seconds = value.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        Ok(result)
    }

    fn add(&mut self, other: StageResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.lost += other.lost;
        self.seconds = self.seconds.max(other.seconds);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Gives every client process a command and sums their answers.
pub fn stage(
    clients: &mut [ClientProc],
    command: Option<&str>,
    name: &str,
) -> Result<StageResult, String> {
    if let Some(command) = command {
        for client in clients.iter_mut() {
            client.command(command)?;
        }
    }
    let mut total = StageResult::default();
    for client in clients.iter_mut() {
        total.add(client.wait(name)?);
    }
    Ok(total)
}
