//! A real WebSocket client (tokio-tungstenite) for the WebSocket front-end's tests.

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
pub use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::http::HeaderName;

use futures_util::{SinkExt, StreamExt};

use super::{GatewayProcess, PATIENCE};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/ws`, with an `Origin` header as a browser would send; `Err` carries the HTTP status
/// of a refused upgrade.
pub async fn connect(gateway: &GatewayProcess, origin: Option<&str>) -> Result<Ws, u16> {
    let headers: Vec<(&str, &str)> = origin
        .map(|origin| ("Origin", origin))
        .into_iter()
        .collect();
    connect_with_headers(gateway, &headers)
        .await
        .map(|(ws, _)| ws)
}

/// Opens `/ws` with these request headers (`Authorization`, `Sec-WebSocket-Protocol`, …) and
/// returns the upgrade's response too (its headers say which subprotocol was selected); `Err`
/// carries the HTTP status of a refused upgrade.
pub async fn connect_with_headers(
    gateway: &GatewayProcess,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response), u16> {
    connect_to(gateway, "/ws", headers).await
}

/// Opens `path` (`/ws` with a query, say) with these request headers.
pub async fn connect_to(
    gateway: &GatewayProcess,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response), u16> {
    let mut request = format!("ws://127.0.0.1:{}{path}", gateway.http_port)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => Ok(connected),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("{other}"),
    }
}

/// The next message; fails the test after `PATIENCE`.
pub async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("a message in time")
        .expect("the socket is open")
        .expect("read")
}

/// The next text message as JSON, skipping pings.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match next(ws).await {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

pub async fn send(ws: &mut Ws, line: &str) {
    ws.send(Message::text(line)).await.unwrap();
}

/// Sends one JSON envelope and returns the next JSON message.
pub async fn call(ws: &mut Ws, line: &str) -> Value {
    send(ws, line).await;
    next_json(ws).await
}

/// The close frame's code, reading past whatever comes before it; `None` when the connection
/// ended without one.
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the connection ends in time")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}
