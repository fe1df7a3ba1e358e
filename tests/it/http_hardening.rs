//! The HTTP port against hostile clients, with the real binary and real sockets: a slowloris
//! (connections that send half a request and stall) is timed out and bounded by the connection
//! slots, leaving the Unix socket, `/health` and established WebSockets served; refusals are
//! answered with `503`, not reset; an upgraded WebSocket holds one slot, not two; and only the
//! gateway's own and the configured origins may open `/ws`, whatever the Host header says.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::ws::{call, connect};
use crate::common::{GatewayProcess, NatsServer, PATIENCE, spawn_echo};
use ipc_gateway::frontend::grpc::pb;

const ECHO: &str = r#"{"op":"request","id":1,"subject":"demo.echo","data":"hi","timeout_ms":2000}"#;

/// Opens `count` connections to the HTTP port, `BATCH` at a time, that each send the start of a
/// request (the request line and part of a header) and then stall.
async fn slowloris(port: u16, count: usize) -> Vec<TcpStream> {
    const BATCH: usize = 100;
    let mut streams = Vec::with_capacity(count);
    while streams.len() < count {
        let batch = BATCH.min(count - streams.len());
        let opened = join_all((0..batch).map(|_| async move {
            let mut stream = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect to the HTTP port");
            // A refused connection may already be closed: the write may fail, which is fine.
            let _ = stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                .await;
            stream
        }))
        .await;
        streams.extend(opened);
    }
    streams
}

/// What a stalled client sees within a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A `503` answer (then a close or a reset).
    Refused,
    /// A close with nothing before it (the header timeout).
    Closed,
    /// A reset with nothing before it.
    Reset,
    /// Nothing yet: the gateway still holds the connection.
    Open,
    /// Anything else.
    Other,
}

async fn seen(stream: &mut TcpStream, wait: Duration) -> Seen {
    let mut data = Vec::new();
    let read = tokio::time::timeout(wait, stream.read_to_end(&mut data)).await;
    if data.starts_with(b"HTTP/1.1 503") {
        return Seen::Refused;
    }
    match read {
        Err(_) if data.is_empty() => Seen::Open,
        Ok(Ok(_)) if data.is_empty() => Seen::Closed,
        Ok(Err(_)) if data.is_empty() => Seen::Reset,
        _ => Seen::Other,
    }
}

/// How many of `streams` saw each outcome, all read at once for up to `wait`.
async fn tally(streams: &mut [TcpStream], wait: Duration) -> Vec<(Seen, usize)> {
    let outcomes = join_all(streams.iter_mut().map(|stream| seen(stream, wait))).await;
    let mut counts: Vec<(Seen, usize)> = Vec::new();
    for outcome in outcomes {
        match counts.iter_mut().find(|(seen, _)| *seen == outcome) {
            Some((_, count)) => *count += 1,
            None => counts.push((outcome, 1)),
        }
    }
    counts
}

fn count(tally: &[(Seen, usize)], which: Seen) -> usize {
    tally
        .iter()
        .find(|(seen, _)| *seen == which)
        .map_or(0, |(_, count)| *count)
}

/// The gateway process's open file descriptors.
fn open_fds(gateway: &GatewayProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gateway.pid()))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// `GET path` on a new connection: (status, body). Unlike `common::http_get` it keeps what
/// came before a reset (a refusal may be one).
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut data = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut data)).await;
    let response = String::from_utf8_lossy(&data);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

/// How many sets of `slots` connections a flood that took `flooded_in` can have had held in
/// turn, each for `timeout` (on a loaded machine the flood itself can outlast the timeout).
fn generations(flooded_in: Duration, timeout: Duration) -> usize {
    1 + (flooded_in.as_millis() / timeout.as_millis()) as usize
}

/// A request through a new Unix-socket connection.
async fn uds_request_works(gateway: &GatewayProcess) {
    let mut client = gateway.json().await;
    let answer = client.call(ECHO).await;
    assert_eq!(answer["ok"], true, "{answer}");
}

/// A request through a new gRPC connection.
async fn grpc_request_works(gateway: &GatewayProcess) {
    let request = pb::RequestMessage {
        subject: "demo.echo".into(),
        payload: b"hi".to_vec().into(),
        ..Default::default()
    };
    let reply = gateway.grpc().await.request(request).await;
    assert_eq!(reply.expect("a gRPC reply").into_inner().payload, b"hi"[..]);
}

#[tokio::test]
async fn a_slowloris_leaves_the_socket_health_and_websockets_served_and_is_timed_out() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    // 200 slots, of which at most 100 for HTTP connections that are not WebSockets.
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--max-connections",
            "200",
            "--http-header-timeout-ms",
            "2000",
        ],
    );
    let mut ws = connect(&gateway, None)
        .await
        .expect("a WebSocket before the flood");
    assert_eq!(call(&mut ws, ECHO).await["ok"], true);

    let flood_began = Instant::now();
    let mut stalled = slowloris(gateway.http_port, 300).await;
    let flooded_in = flood_began.elapsed();

    // (a) A new Unix-socket client is served, and a new gRPC one: the flood holds at most
    // half the slots.
    uds_request_works(&gateway).await;
    grpc_request_works(&gateway).await;
    // (c) The WebSocket opened before the flood is served.
    assert_eq!(call(&mut ws, ECHO).await["ok"], true);
    // (b) A new HTTP client is refused, answered, while the stalled ones hold every HTTP place…
    if flood_began.elapsed() < Duration::from_millis(1500) {
        let (status, body) = get(gateway.http_port, "/health").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.starts_with("OVERLOADED: "), "{body}");
    }
    // …and served again once the header timeout has closed them.
    gateway.wait_status("/health", 200).await;
    let recovered_in = flood_began.elapsed();
    assert!(
        recovered_in < flooded_in + Duration::from_millis(2000 + 3000),
        "/health came back after {recovered_in:?}"
    );
    assert!(
        recovered_in > Duration::from_millis(1500),
        "/health came back after {recovered_in:?}, before the header timeout"
    );

    // Every stalled connection has been dealt with by the server: 100 at a time held, then
    // closed by the header timeout; the others refused with a 503.
    let held = 100 * generations(flooded_in, Duration::from_millis(2000));
    let seen = tally(&mut stalled, Duration::from_secs(2)).await;
    let closed = count(&seen, Seen::Closed);
    assert!((100..=held).contains(&closed), "{seen:?}");
    assert_eq!(count(&seen, Seen::Refused), 300 - closed, "{seen:?}");
    assert_eq!(call(&mut ws, ECHO).await["ok"], true);
    let rejected = gateway
        .metric("ipc_gateway_connections_rejected_total{frontend=\"ws\"}")
        .await;
    assert!(rejected >= Some(201.0), "{rejected:?}");
}

#[tokio::test]
async fn ten_times_more_half_sent_requests_than_slots_hold_no_more_descriptors_than_the_slots() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--max-connections",
            "200",
            "--http-header-timeout-ms",
            "5000",
        ],
    );
    uds_request_works(&gateway).await;
    let fds_before = open_fds(&gateway);

    let flood_began = Instant::now();
    let mut stalled = slowloris(gateway.http_port, 2000).await;
    let flooded_in = flood_began.elapsed();
    let fds_during = open_fds(&gateway);
    // 100 HTTP places, and up to 64 refusals being answered cleanly (each for at most 1 s).
    assert!(
        fds_during <= fds_before + 100 + 64 + 8,
        "{fds_during} descriptors open, {fds_before} before the flood"
    );
    uds_request_works(&gateway).await;
    grpc_request_works(&gateway).await;

    // No bare reset: every connection was refused with a 503 first, or held (at most 100 at a
    // time, each until the header timeout).
    let seen = tally(&mut stalled, Duration::from_millis(1500)).await;
    let (open, closed) = (count(&seen, Seen::Open), count(&seen, Seen::Closed));
    assert!(open <= 100, "{seen:?}");
    assert!(
        open + closed <= 100 * generations(flooded_in, Duration::from_secs(5)),
        "{seen:?} after a flood of {flooded_in:?}"
    );
    assert_eq!(
        count(&seen, Seen::Refused),
        2000 - open - closed,
        "{seen:?}"
    );
    eprintln!(
        "2000 half-sent requests in {flooded_in:?}: {seen:?}; gateway descriptors {fds_before} before, {fds_during} during"
    );

    // The header timeout frees the rest.
    gateway.wait_status("/health", 200).await;
    let seen = tally(&mut stalled, PATIENCE).await;
    assert_eq!(count(&seen, Seen::Open), 0, "{seen:?}");
    drop(stalled);
    let deadline = Instant::now() + PATIENCE;
    while open_fds(&gateway) > fds_before + 8 {
        assert!(Instant::now() < deadline, "{} open", open_fds(&gateway));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    uds_request_works(&gateway).await;
}

#[tokio::test]
async fn an_upgraded_websocket_holds_one_slot_and_idle_or_oversized_http_connections_are_closed() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--max-connections", "4", "--http-header-timeout-ms", "500"],
    );
    // Four slots, at most two of them for HTTP: four WebSockets fit because each hands its
    // HTTP connection's slot over to its client.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let mut ws = connect(&gateway, None)
            .await
            .expect("a WebSocket within the limit");
        assert_eq!(call(&mut ws, ECHO).await["ok"], true);
        sockets.push(ws);
    }
    assert_eq!(connect(&gateway, None).await.err(), Some(503));
    // A full gateway still answers its operators.
    assert_eq!(get(gateway.http_port, "/health").await.0, 200);
    let mut refused = gateway.json().await;
    let refusal = refused.recv().await;
    assert_eq!(refusal["error"]["code"], "OVERLOADED", "{refusal}");
    drop(sockets.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut client = gateway.json().await;
        if client.call(ECHO).await["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sockets);
    gateway.wait_status("/health", 200).await;

    // A kept-alive connection, idle after its request, is closed after the header timeout.
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.http_port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.ends_with(b"{\"status\":\"ok\"}") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(n > 0, "closed before answering");
        response.extend_from_slice(&buf[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200"));
    let idle_since = Instant::now();
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("closed in time")
        .expect("a clean close");
    assert_eq!(n, 0);
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(400) && idle < Duration::from_millis(2000),
        "closed after {idle:?} idle"
    );

    // Headers over 32 KiB are refused rather than buffered.
    let mut stream = TcpStream::connect(("127.0.0.1", gateway.http_port))
        .await
        .unwrap();
    let huge = format!(
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "x".repeat(40 * 1024)
    );
    let _ = stream.write_all(huge.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// The status of a WebSocket upgrade request with these `Host` and `Origin` headers.
async fn upgrade_status(port: u16, host: &str, origin: Option<&str>) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let origin = origin.map_or(String::new(), |origin| format!("Origin: {origin}\r\n"));
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {line:?}"))
}

#[tokio::test]
async fn only_the_gateway_s_own_and_configured_origins_open_ws_whatever_the_host_header() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--ws-allowed-origins", "https://app.example"],
    );
    let port = gateway.http_port;
    let own = format!("127.0.0.1:{port}");
    // DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends a Host header
    // that matches its page's origin. It is refused all the same.
    let evil = format!("evil.example:{port}");
    assert_eq!(
        upgrade_status(port, &evil, Some(&format!("http://{evil}"))).await,
        403
    );
    assert_eq!(
        upgrade_status(port, &own, Some(&format!("http://{own}"))).await,
        101,
        "the page's own origin"
    );
    assert_eq!(
        upgrade_status(port, &own, Some(&format!("https://{own}"))).await,
        101,
        "behind TLS termination on the same address"
    );
    let localhost = format!("localhost:{port}");
    assert_eq!(
        upgrade_status(port, &localhost, Some(&format!("http://{localhost}"))).await,
        101,
        "localhost"
    );
    assert_eq!(
        upgrade_status(port, &own, Some("https://app.example")).await,
        101,
        "an allowed origin"
    );
    assert_eq!(upgrade_status(port, &own, None).await, 101, "a program");
    for refused in [
        format!("ftp://{own}"),
        format!("ws://{own}"),
        format!("http://127.0.0.1:{}", port + 1),
        "http://app.example".to_owned(),
        "null".to_owned(),
    ] {
        assert_eq!(
            upgrade_status(port, &own, Some(&refused)).await,
            403,
            "{refused}"
        );
    }

    // Behind a proxy: the public origin replaces the listen address's.
    let proxied = GatewayProcess::start(&nats.url(), &["--public-origins", "https://gw.example"]);
    let port = proxied.http_port;
    let own = format!("127.0.0.1:{port}");
    assert_eq!(
        upgrade_status(port, "gw.example", Some("https://gw.example")).await,
        101
    );
    assert_eq!(
        upgrade_status(port, &own, Some(&format!("http://{own}"))).await,
        403
    );
}
