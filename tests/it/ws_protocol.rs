//! The gateway's own RFC 6455 implementation (src/frontend/ws/), from the wire: the opening
//! handshake, fragments, pings from the client, the closing handshake, and frames a client may
//! not send. Raw TCP where a WebSocket library would refuse to send what is tested.

use std::time::Duration;

use crate::common::ws::*;
use crate::common::*;
use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// RFC 6455 §1.3's example key and the accept value it must get.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends an upgrade request with these extra header lines; returns the answer's head and the
/// socket, positioned after it.
async fn raw_upgrade(port: u16, headers: &str) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed without an answer: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (String::from_utf8(head).unwrap(), stream)
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n";

async fn raw_ws(port: u16) -> TcpStream {
    let (head, stream) = raw_upgrade(port, &format!("{UPGRADE}Sec-WebSocket-Key: {KEY}\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// A client frame, masked.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0xA1, 0x02, 0x53, 0xF4];
    let mut frame = vec![first];
    assert!(payload.len() < 126);
    frame.push(0x80 | payload.len() as u8);
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The next frame the gateway sends: (first byte, payload). Server frames are never masked.
async fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut head))
        .await
        .expect("a frame in time")
        .expect("a frame");
    assert_eq!(head[1] & 0x80, 0, "the gateway masked a frame");
    let len = match head[1] & 0x7F {
        126 => {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.unwrap();
            u16::from_be_bytes(len) as usize
        }
        127 => {
            let mut len = [0u8; 8];
            stream.read_exact(&mut len).await.unwrap();
            u64::from_be_bytes(len) as usize
        }
        short => short as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    (head[0], payload)
}

/// Reads frames until a close frame; its code.
async fn close_code_raw(stream: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) = read_frame(stream).await;
        if first & 0x0F == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn the_handshake_answers_rfc_6455_s_example_and_refuses_what_is_not_an_upgrade() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let port = gateway.http_port;
    let (head, _) = raw_upgrade(port, &format!("{UPGRADE}Sec-WebSocket-Key: {KEY}\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains(&format!(
            "sec-websocket-accept: {}",
            ACCEPT.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(lower.contains("upgrade: websocket"), "{head}");

    // No upgrade asked for: 426, saying what to ask for.
    let (head, _) = raw_upgrade(port, "").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // Another protocol version, or a key that is not 16 bytes: 400.
    let (head, _) = raw_upgrade(
        port,
        &format!("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let (head, _) = raw_upgrade(port, &format!("{UPGRADE}Sec-WebSocket-Key: c2hvcnQ=\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Each refusal is counted against no connection: a proper upgrade still works.
    let mut ws = connect(&gateway, None).await.unwrap();
    assert_eq!(
        call(&mut ws, r#"{"op":"ping","id":1}"#).await,
        json!({"op":"pong","id":1})
    );
}

#[tokio::test]
async fn a_fragmented_request_with_a_ping_between_its_pieces_gets_the_pong_then_the_reply() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    let line = br#"{"id":5,"subject":"demo.echo","data":"in three pieces"}"#;
    let (one, rest) = line.split_at(10);
    let (two, three) = rest.split_at(20);
    let pieces = [
        Frame::message(Bytes::copy_from_slice(one), OpCode::Data(Data::Text), false),
        Frame::ping(Bytes::from_static(b"are you there")),
        Frame::message(
            Bytes::copy_from_slice(two),
            OpCode::Data(Data::Continue),
            false,
        ),
        Frame::message(
            Bytes::copy_from_slice(three),
            OpCode::Data(Data::Continue),
            true,
        ),
    ];
    for piece in pieces {
        ws.feed(Message::Frame(piece)).await.unwrap();
    }
    ws.flush().await.unwrap();
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(Bytes::from_static(b"are you there"))
    );
    let reply: Value = match next(&mut ws).await {
        Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(reply, json!({"id":5,"ok":true,"data":"in three pieces"}));
}

#[tokio::test]
async fn requests_sent_in_one_write_are_each_answered_and_the_client_s_close_code_is_echoed() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut stream = raw_ws(gateway.http_port).await;
    let mut burst = Vec::new();
    for id in 0..50 {
        burst.extend(masked(
            0x81,
            format!(r#"{{"op":"ping","id":{id}}}"#).as_bytes(),
        ));
    }
    stream.write_all(&burst).await.unwrap();
    for id in 0..50 {
        let (first, payload) = read_frame(&mut stream).await;
        assert_eq!(first, 0x81, "a whole text message");
        let pong: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(pong, json!({"op":"pong","id":id}));
    }
    let mut goodbye = 4000u16.to_be_bytes().to_vec();
    goodbye.extend_from_slice(b"done");
    stream.write_all(&masked(0x88, &goodbye)).await.unwrap();
    assert_eq!(
        close_code_raw(&mut stream).await,
        4000,
        "the close code is echoed"
    );
    // Then the gateway closes the TCP connection.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?} {rest:?}");
}

#[tokio::test]
async fn frames_a_client_may_not_send_close_the_connection_with_1002() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let unmasked = vec![0x81, 0x02, b'{', b'}'];
    let reserved_bit = {
        let mut frame = masked(0x81, b"{}");
        frame[0] |= 0x40;
        frame
    };
    let unknown_opcode = masked(0x83, b"{}");
    let stray_continuation = masked(0x80, b"{}");
    let long_ping = {
        // A ping announcing 126 bytes (control frames carry at most 125).
        vec![0x89, 0x80 | 126, 0, 126, 1, 2, 3, 4]
    };
    for (what, frame) in [
        ("unmasked", unmasked),
        ("reserved bit", reserved_bit),
        ("unknown opcode", unknown_opcode),
        ("stray continuation", stray_continuation),
        ("long ping", long_ping),
    ] {
        let mut stream = raw_ws(gateway.http_port).await;
        stream.write_all(&frame).await.unwrap();
        assert_eq!(close_code_raw(&mut stream).await, 1002, "{what}");
    }
    // None of them hurt anyone else.
    let mut ws = connect(&gateway, None).await.unwrap();
    assert_eq!(
        call(&mut ws, r#"{"op":"ping","id":1}"#).await,
        json!({"op":"pong","id":1})
    );
}

#[tokio::test]
async fn a_frame_trickled_a_byte_at_a_time_is_read_whole() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut stream = raw_ws(gateway.http_port).await;
    let frame = masked(0x81, br#"{"op":"ping","id":"slow"}"#);
    for byte in &frame {
        stream.write_all(&[*byte]).await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (first, payload) = read_frame(&mut stream).await;
    assert_eq!(first, 0x81);
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"op":"pong","id":"slow"})
    );
}

#[tokio::test]
async fn large_messages_cross_in_both_directions_whole() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    // Each payload needs a 64-bit length (over 65,535 bytes), and together the replies are more
    // than one write's worth of frames.
    let sizes = [70_000, 200_000, 125, 126, 65_535, 300_000];
    for (id, size) in sizes.iter().enumerate() {
        let data: String = (0..*size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let line = json!({"id": id, "subject": "demo.echo", "data": data}).to_string();
        ws.feed(Message::text(line)).await.unwrap();
    }
    ws.flush().await.unwrap();
    // Answered as they come (not necessarily in order), each whole.
    let mut answered = vec![false; sizes.len()];
    for _ in &sizes {
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["ok"], true, "{}", reply["error"]);
        let id = reply["id"].as_u64().unwrap() as usize;
        assert!(
            !std::mem::replace(&mut answered[id], true),
            "answered twice: {id}"
        );
        let data = reply["data"].as_str().unwrap();
        assert_eq!(data.len(), sizes[id]);
        assert!(
            data.bytes()
                .enumerate()
                .all(|(i, b)| b == b'a' + (i % 26) as u8)
        );
    }
}

/// A WebSocket client that stops reading while the gateway writes to it holds that write for
/// up to the stall time (a minute here); at the end of the drain the gateway cuts it, so the
/// connection ends, and is audited, before the gateway exits.
#[tokio::test]
async fn a_websocket_stuck_in_a_write_through_the_drain_is_cut_and_its_disconnect_is_audited() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gateway =
        start_with_short_drain(&nats.url(), &audit, &["--slow-client-stall-ms", "60000"]);
    let mut stream = raw_ws(gateway.http_port).await;
    let subscribe = br#"{"op":"subscribe","id":"s","subject":"flood"}"#;
    stream.write_all(&masked(0x81, subscribe)).await.unwrap();
    let (_, ack) = read_frame(&mut stream).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&ack).unwrap(),
        json!({"id":"s","ok":true})
    );
    // The client reads nothing more.
    flood_then_stop(&nats, &mut gateway, "flood").await;
    assert_disconnect_audited(&gateway, &audit, "subscribe", "ws");
    drop(stream);
}
