//! The parent's side of the client processes: starting them (this bench binary again, with
//! FANOUT_ROLE=client), giving every one the same command and reading the status line each
//! answers with (`<word> key=value ... error=<text>`).

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use crate::common::LineProc;
use crate::settings::{Path, Settings};

/// How long the client processes may take to connect and subscribe, or to answer a command.
const CONNECT_PATIENCE: Duration = Duration::from_secs(300);
const ANSWER_PATIENCE: Duration = Duration::from_secs(60);

/// One status line: its fields, and the text after `error=` (None for `-`).
#[derive(Debug, Default)]
pub struct Fields {
    values: HashMap<String, String>,
    pub error: Option<String>,
}

impl Fields {
    fn parse(line: &str, word: &str) -> Result<Fields, String> {
        let rest = line
            .strip_prefix(word)
            .ok_or_else(|| format!("expected {word:?} from a client process, got {line:?}"))?;
        let (fields, error) = rest.split_once(" error=").unwrap_or((rest, "-"));
        let values = fields
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Fields {
            values,
            error: (error != "-").then(|| error.to_owned()),
        })
    }

    pub fn num(&self, key: &str) -> u64 {
        self.values
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn float(&self, key: &str) -> f64 {
        self.values
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn text(&self, key: &str) -> &str {
        self.values.get(key).map_or("", String::as_str)
    }
}

/// The client processes of one case.
pub struct Fleet {
    clients: Vec<LineProc>,
}

impl Fleet {
    /// Starts one client process per entry of `counts` (connections each), all on `path`.
    pub fn start(path: Path, port: u16, counts: &[usize], s: &Settings) -> Result<Fleet, String> {
        let exe = std::env::current_exe().map_err(|err| format!("current_exe: {err}"))?;
        let mut clients = Vec::new();
        let mut first = 0;
        for &count in counts {
            clients.push(LineProc::spawn(
                "fanout client",
                Command::new(&exe)
                    .env("FANOUT_ROLE", "client")
                    .env("FANOUT_CLIENT_PATH", path.name())
                    .env("FANOUT_CLIENT_WS_PATH", s.gateway_ws_path)
                    .env("FANOUT_CLIENT_PORT", port.to_string())
                    .env("FANOUT_CLIENT_COUNT", count.to_string())
                    .env("FANOUT_CLIENT_FIRST", first.to_string())
                    .env("FANOUT_SOURCES", s.sources.to_string())
                    .env("FANOUT_HANDSHAKES", s.handshakes.to_string()),
            )?);
            first += count;
        }
        Ok(Fleet { clients })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.clients.iter().map(|c| c.proc.pid()).collect()
    }

    /// Every process's `ready` line, once all its connections subscribed or failed.
    pub fn ready(&mut self) -> Result<Vec<Fields>, String> {
        self.answers("ready", CONNECT_PATIENCE)
    }

    /// Sends `command` to every process and returns their answers (lines starting `word`).
    pub fn ask(&mut self, command: &str, word: &str) -> Result<Vec<Fields>, String> {
        for client in &mut self.clients {
            client.send(command)?;
        }
        self.answers(word, ANSWER_PATIENCE)
    }

    fn answers(&mut self, word: &str, patience: Duration) -> Result<Vec<Fields>, String> {
        let mut all = Vec::new();
        for client in &mut self.clients {
            let line = client.recv(patience).ok_or_else(|| {
                format!("a client process gave no {word:?} line within {patience:?}")
            })?;
            all.push(Fields::parse(&line, word)?);
        }
        Ok(all)
    }

    /// The sum of a field over all processes.
    pub fn sum(answers: &[Fields], key: &str) -> u64 {
        answers.iter().map(|a| a.num(key)).sum()
    }

    /// Asks every process to close and stops it.
    pub fn close(mut self) {
        let _ = self.ask("close", "closed");
        for client in &mut self.clients {
            client.proc.stop_within(Duration::from_secs(5));
        }
    }
}
