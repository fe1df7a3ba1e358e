//! One idle WebSocket connection as the clients use it: bound to a loopback source address,
//! upgraded with small client buffers, one ping round trip; one larger echo request; a close.
//! Plain tokio-tungstenite with JSON text messages: thousands of these live in one client
//! process, so each is only the socket and its buffers (no tasks, no queues).

use std::net::{Ipv4Addr, SocketAddr};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{STEP_PATIENCE, SUBJECT};

pub type Ws = WebSocketStream<TcpStream>;

pub fn source_address(index: usize, sources: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (index % sources) as u8)
}

/// Binds to `source` (any port), connects to the gateway, upgrades to WebSocket and does one
/// ping round trip.
pub async fn open(port: u16, source: Ipv4Addr) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|err| format!("socket: {err}"))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|err| format!("bind {source}: {err}"))?;
    let stream = tokio::time::timeout(
        STEP_PATIENCE,
        socket.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|err| format!("connect from {source}: {err}"))?;
    let _ = stream.set_nodelay(true);
    // The client's own buffers: small, so that 10,000 connections fit one client process.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio::time::timeout(
        STEP_PATIENCE,
        tokio_tungstenite::client_async_with_config(
            format!("ws://127.0.0.1:{port}/ws"),
            stream,
            Some(config),
        ),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_string())?
    .map_err(|err| format!("WebSocket handshake: {err}"))?;
    let pong = round_trip(&mut ws, r#"{"op":"ping","id":1}"#.to_owned()).await?;
    if pong["op"] != "pong" {
        return Err(format!("expected a pong, got {pong}"));
    }
    Ok(ws)
}

/// Sends one text message and returns the next text message, parsed.
async fn round_trip(ws: &mut Ws, text: String) -> Result<Value, String> {
    ws.send(Message::text(text))
        .await
        .map_err(|err| format!("send: {err}"))?;
    let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("no answer in time".into()),
            Ok(None) => return Err("the gateway closed the connection".into()),
            Ok(Some(Err(err))) => return Err(format!("read: {err}")),
            Ok(Some(Ok(Message::Text(text)))) => {
                return serde_json::from_str(text.as_str())
                    .map_err(|err| format!("bad JSON from the gateway: {err}"));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(format!("the gateway closed the connection: {frame:?}"));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// One echo request carrying `size` bytes; the reply must carry them back.
pub async fn big_request(ws: &mut Ws, size: usize) -> Result<(), String> {
    let data = "x".repeat(size);
    let request = format!(
        r#"{{"op":"request","id":2,"subject":"{SUBJECT}","timeout_ms":10000,"data":"{data}"}}"#
    );
    let reply = round_trip(ws, request).await?;
    if reply["ok"] != true {
        return Err(format!("echo request failed: {}", reply["error"]));
    }
    match reply["data"].as_str() {
        Some(echoed) if echoed.len() == size => Ok(()),
        _ => Err(format!("echo reply without the {size} bytes")),
    }
}

/// Sends a close frame and waits for the gateway's close (or the end of the stream).
pub async fn close(mut ws: Ws) -> Result<(), String> {
    ws.close(None)
        .await
        .map_err(|err| format!("close: {err}"))?;
    let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("the gateway did not close in time".into()),
            Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}
