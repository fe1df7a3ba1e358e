//! One idle WebSocket connection as the clients use it (the socket and its buffers, no tasks or
//! queues: thousands live in one client process), built on `common/ws.rs`: bound to a loopback
//! source address, upgraded with small client buffers, then set up by its kind. On the
//! gateway: one ping round trip, or one subscription (acknowledged); on nats-server's own
//! WebSocket listener: CONNECT, the subscription if any, and PING → PONG. Also the larger echo
//! request of step 3 and the close.

use std::net::Ipv4Addr;

use serde::Serialize;
use serde_json::Value;

use crate::common::{Ws, connect, gateway_ping, gateway_subscribe, json_round_trip, nats_open};
use crate::{STEP_PATIENCE, SUBJECT};

pub use crate::common::source_address;

/// Which server the connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Server {
    /// The gateway's `GET /ws` (JSON envelopes).
    Gateway,
    /// nats-server's own WebSocket listener (NATS protocol).
    Native,
}

/// What each connection does once open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nothing but the set-up round trip (ping, or PING/PONG).
    Idle,
    /// One subscription, the same subject for every connection (`wsidle.all`).
    Shared,
    /// One subscription each, on its own subject (`wsidle.own.<index>`).
    Own,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::Gateway => "gateway",
            Server::Native => "native",
        }
    }

    pub fn parse(word: &str) -> Option<Server> {
        match word {
            "gateway" => Some(Server::Gateway),
            "native" => Some(Server::Native),
            _ => None,
        }
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Shared => "shared",
            Mode::Own => "own",
        }
    }

    pub fn parse(word: &str) -> Option<Mode> {
        match word {
            "idle" => Some(Mode::Idle),
            "shared" => Some(Mode::Shared),
            "own" => Some(Mode::Own),
            _ => None,
        }
    }

    /// The subject connection `index` subscribes to, if any.
    fn subject(self, index: usize) -> Option<String> {
        match self {
            Mode::Idle => None,
            Mode::Shared => Some("wsidle.all".into()),
            Mode::Own => Some(format!("wsidle.own.{index}")),
        }
    }
}

/// Binds to `source`, connects to `port` on `server` and sets the connection up for `mode`.
pub async fn open(
    port: u16,
    source: Ipv4Addr,
    server: Server,
    mode: Mode,
    index: usize,
) -> Result<Ws, String> {
    let subject = mode.subject(index);
    match server {
        Server::Gateway => {
            let mut ws = connect(port, source, "/ws", STEP_PATIENCE).await?;
            match &subject {
                None => gateway_ping(&mut ws, STEP_PATIENCE).await?,
                Some(subject) => gateway_subscribe(&mut ws, "s", subject, STEP_PATIENCE).await?,
            }
            Ok(ws)
        }
        Server::Native => {
            let mut ws = connect(port, source, "/", STEP_PATIENCE).await?;
            let subjects: Vec<&str> = subject.as_deref().into_iter().collect();
            nats_open(&mut ws, &subjects, STEP_PATIENCE).await?;
            Ok(ws)
        }
    }
}

/// One echo request carrying `size` bytes; the reply must carry them back.
pub async fn big_request(ws: &mut Ws, size: usize) -> Result<(), String> {
    let data = "x".repeat(size);
    let request = format!(
        r#"{{"op":"request","id":2,"subject":"{SUBJECT}","timeout_ms":10000,"data":"{data}"}}"#
    );
    let reply: Value = json_round_trip(ws, request, STEP_PATIENCE).await?;
    if reply["ok"] != true {
        return Err(format!("echo request failed: {}", reply["error"]));
    }
    match reply["data"].as_str() {
        Some(echoed) if echoed.len() == size => Ok(()),
        _ => Err(format!("echo reply without the {size} bytes")),
    }
}

/// Sends a close frame and waits for the server's close (or the end of the stream).
pub async fn close(mut ws: Ws) -> Result<(), String> {
    use futures_util::StreamExt;
    ws.close(None)
        .await
        .map_err(|err| format!("close: {err}"))?;
    let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("the server did not close in time".into()),
            Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}
