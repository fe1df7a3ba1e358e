//! WebSocket connections the benchmarks hold by the thousand (`ws_idle/`, `fanout/`): each is
//! bound to a loopback source address before it connects (so that no source address runs out
//! of ports) and upgraded with a small client read buffer. On top of that: the gateway's JSON
//! ping and subscribe (docs/protocol.md), and the NATS protocol spoken over nats-server's own
//! WebSocket listener (INFO, CONNECT, SUB, PING/PONG) with a reader that splits whatever
//! arrives into MSG, PING, ... however the server cut it into WebSocket messages. And one
//! `ipc_gateway::client::Client` over a WebSocket (`gateway_ws_client`: the gateway and soak
//! benches), with a bearer token if wanted.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, future};
use ipc_gateway::client::{Client, WireFormat};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes as WsUtf8Bytes};

pub type Ws = WebSocketStream<TcpStream>;

/// 127.0.0.2, 127.0.0.3, ... by connection index.
pub fn source_address(index: usize, sources: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (index % sources) as u8)
}

/// Binds to `source` (any port), connects to 127.0.0.1:`port` and upgrades to a WebSocket on
/// `path`, each step within `patience`.
pub async fn connect(
    port: u16,
    source: Ipv4Addr,
    path: &str,
    patience: Duration,
) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|err| format!("socket: {err}"))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|err| format!("bind {source}: {err}"))?;
    let stream = tokio::time::timeout(
        patience,
        socket.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|err| format!("connect from {source}: {err}"))?;
    let _ = stream.set_nodelay(true);
    // The client's own buffers: small, so that thousands of connections fit one process.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = tokio::time::timeout(
        patience,
        tokio_tungstenite::client_async_with_config(
            format!("ws://127.0.0.1:{port}{path}"),
            stream,
            Some(config),
        ),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_string())?
    .map_err(|err| format!("WebSocket handshake: {err}"))?;
    Ok(ws)
}

/// The next text or binary message's bytes before `deadline` (pings and pongs are skipped;
/// tungstenite answers pings itself).
pub async fn next_data(ws: &mut Ws, deadline: Instant) -> Result<Vec<u8>, String> {
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("no answer in time".into()),
            Ok(None) => return Err("the server closed the connection".into()),
            Ok(Some(Err(err))) => return Err(format!("read: {err}")),
            Ok(Some(Ok(Message::Text(text)))) => return Ok(text.as_bytes().to_vec()),
            Ok(Some(Ok(Message::Binary(data)))) => return Ok(data.to_vec()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(format!("the server closed the connection: {frame:?}"));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Sends one JSON text message to the gateway and returns the next text message, parsed.
pub async fn json_round_trip(
    ws: &mut Ws,
    text: String,
    patience: Duration,
) -> Result<Value, String> {
    ws.send(Message::text(text))
        .await
        .map_err(|err| format!("send: {err}"))?;
    let answer = next_data(ws, Instant::now() + patience).await?;
    serde_json::from_slice(&answer).map_err(|err| format!("bad JSON from the gateway: {err}"))
}

/// `{"op":"ping","id":1}` → a pong.
pub async fn gateway_ping(ws: &mut Ws, patience: Duration) -> Result<(), String> {
    let pong = json_round_trip(ws, r#"{"op":"ping","id":1}"#.to_owned(), patience).await?;
    if pong["op"] != "pong" {
        return Err(format!("expected a pong, got {pong}"));
    }
    Ok(())
}

/// `{"op":"subscribe","id":<sid>,"subject":<subject>}` → `{"id":<sid>,"ok":true}`, which the
/// gateway sends once nats-server has the subscription.
pub async fn gateway_subscribe(
    ws: &mut Ws,
    sid: &str,
    subject: &str,
    patience: Duration,
) -> Result<(), String> {
    let request = serde_json::json!({"op": "subscribe", "id": sid, "subject": subject});
    let ack = json_round_trip(ws, request.to_string(), patience).await?;
    if ack["id"] != sid || ack["ok"] != true {
        return Err(format!("subscribe {subject}: {ack}"));
    }
    Ok(())
}

/// The NATS protocol over nats-server's WebSocket listener: reads INFO, sends `CONNECT
/// {"verbose":false,"pedantic":false}`, one `SUB <subject> <n>` per subject (sids 1, 2, ...)
/// and `PING` in one message, and waits for the PONG, which the server sends only after it has
/// processed the SUBs. Returns the reader, holding whatever came after the PONG.
pub async fn nats_open(
    ws: &mut Ws,
    subjects: &[&str],
    patience: Duration,
) -> Result<NatsReader, String> {
    let deadline = Instant::now() + patience;
    let mut reader = NatsReader::default();
    let mut saw_info = false;
    while !saw_info {
        reader.feed(&next_data(ws, deadline).await?);
        while let Some(event) = reader.next_event() {
            match event {
                NatsEvent::Info => saw_info = true,
                NatsEvent::Err(err) => return Err(format!("nats-server: {err}")),
                _ => {}
            }
        }
    }
    let mut hello = String::from("CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
    for (i, subject) in subjects.iter().enumerate() {
        hello += &format!("SUB {subject} {}\r\n", i + 1);
    }
    hello += "PING\r\n";
    ws.send(Message::binary(hello.into_bytes()))
        .await
        .map_err(|err| format!("send: {err}"))?;
    loop {
        reader.feed(&next_data(ws, deadline).await?);
        while let Some(event) = reader.next_event() {
            match event {
                NatsEvent::Pong => return Ok(reader),
                NatsEvent::Err(err) => return Err(format!("nats-server: {err}")),
                _ => {}
            }
        }
    }
}

/// One thing nats-server said.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsEvent<'a> {
    /// A message (MSG or HMSG): its payload (after the headers, for HMSG).
    Msg(&'a [u8]),
    Ping,
    Pong,
    Info,
    Ok,
    /// `-ERR '...'`: the text.
    Err(String),
    Other,
}

/// Splits the bytes nats-server sends into protocol lines and messages, whatever the
/// WebSocket messages' boundaries.
#[derive(Default)]
pub struct NatsReader {
    buf: Vec<u8>,
    pos: usize,
}

impl NatsReader {
    pub fn feed(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete event, or None until more bytes are fed.
    pub fn next_event(&mut self) -> Option<NatsEvent<'_>> {
        let rest = &self.buf[self.pos..];
        let eol = memchr::memmem::find(rest, b"\r\n")?;
        let line = &rest[..eol];
        let start = self.pos;
        if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
            let fields: Vec<&[u8]> = line
                .split(|b| *b == b' ')
                .filter(|f| !f.is_empty())
                .collect();
            let number = |field: &[u8]| -> usize {
                std::str::from_utf8(field)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            };
            let total = number(fields.last().copied().unwrap_or(b"0"));
            let headers = if line.starts_with(b"HMSG ") && fields.len() >= 2 {
                number(fields[fields.len() - 2])
            } else {
                0
            };
            let body = start + eol + 2;
            if self.buf.len() < body + total + 2 {
                return None;
            }
            self.pos = body + total + 2;
            return Some(NatsEvent::Msg(
                &self.buf[body + headers.min(total)..body + total],
            ));
        }
        self.pos = start + eol + 2;
        let line = &self.buf[start..start + eol];
        Some(match line {
            b"PING" => NatsEvent::Ping,
            b"PONG" => NatsEvent::Pong,
            b"+OK" => NatsEvent::Ok,
            _ if line.starts_with(b"INFO") => NatsEvent::Info,
            _ if line.starts_with(b"-ERR") => {
                NatsEvent::Err(String::from_utf8_lossy(&line[4..]).trim().to_owned())
            }
            _ => NatsEvent::Other,
        })
    }
}

/// `ipc_gateway::client::Client` over one WebSocket connection to the gateway's `GET /ws`
/// (TCP_NODELAY on this side): a binary message per v1 frame, or a text message per JSON
/// envelope; with `token`, the upgrade carries `Authorization: Bearer <token>`.
pub async fn gateway_ws_client(
    port: u16,
    format: WireFormat,
    token: Option<&str>,
) -> Result<Client, String> {
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|err| format!("{url}: {err}"))?;
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token is not a valid header value".to_string())?;
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .map_err(|err| format!("connect {url}: {err}"))?;
    let (sink, stream) = ws.split();
    let sink = sink.with(move |frame: Bytes| {
        future::ready(match format {
            WireFormat::Binary => Ok(Message::Binary(frame)),
            WireFormat::JsonLines => WsUtf8Bytes::try_from(frame)
                .map(Message::Text)
                .map_err(tungstenite::Error::from),
        })
    });
    // Answers until the gateway closes; pings and pongs are tungstenite's business. Each
    // message is copied out: tungstenite's messages are slices of its read buffer, and while
    // one is alive (the client hands reply payloads to the waiting tasks) tungstenite cannot
    // reuse that buffer and allocates and zero-fills a new one for the next frame. A copy of
    // its own per message (small allocations the allocator recycles) costs less than a shared
    // arena, whose 64 KiB blocks are returned to the kernel and faulted in again.
    let stream = stream
        .take_while(|message| future::ready(matches!(message, Ok(m) if !m.is_close())))
        .filter_map(|message| {
            future::ready(match message {
                Ok(Message::Binary(data)) => Some(Bytes::copy_from_slice(&data)),
                Ok(Message::Text(text)) => Some(Bytes::copy_from_slice(text.as_bytes())),
                _ => None,
            })
        });
    Ok(Client::over_messages(format, sink, Box::pin(stream)))
}
