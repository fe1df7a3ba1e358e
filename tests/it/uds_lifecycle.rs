//! The daemon's life: readiness follows NATS, NATS outages answer at once, graceful shutdown
//! answers every in-flight request, the socket file is guarded, and bad configuration is named.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn ready_is_503_while_nats_is_down_and_200_when_it_is_back() {
    let mut nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let body = gateway.wait_status("/ready", 200).await;
    assert!(body.contains("\"ready\":true"), "{body}");
    assert_eq!(gateway.get("/health").await.0, 200);
    nats.kill();
    let body = gateway.wait_status("/ready", 503).await;
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["not_ready"], json!(["nats"]));
    assert_eq!(gateway.get("/health").await.0, 200, "alive while not ready");
    nats.restart();
    gateway.wait_status("/ready", 200).await;
}

#[tokio::test]
async fn requests_and_publishes_while_nats_is_down_get_unavailable_within_a_second() {
    let mut nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let mut conn = gateway.json().await;
    nats.kill();
    gateway.wait_status("/ready", 503).await;
    let started = Instant::now();
    let reply = conn
        .call(r#"{"id":1,"subject":"demo.echo","timeout_ms":5000}"#)
        .await;
    assert_eq!(reply["error"]["code"], "UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let reply = conn
        .call(r#"{"op":"publish","id":2,"subject":"events.a","data":"x"}"#)
        .await;
    assert_eq!(reply["error"]["code"], "UNAVAILABLE");
    // After NATS returns, the same connection works again without restarting anything.
    nats.restart();
    gateway.wait_status("/ready", 200).await;
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let reply = conn
        .call(r#"{"id":3,"subject":"demo.echo","data":"back"}"#)
        .await;
    assert_eq!(reply, json!({"id":3,"ok":true,"data":"back"}));
}

#[tokio::test]
async fn the_gateway_starts_while_nats_is_down_and_connects_when_it_comes_up() {
    let port = free_port();
    let gateway = GatewayProcess::start(&format!("nats://127.0.0.1:{port}"), &[]);
    assert_eq!(gateway.get("/ready").await.0, 503);
    let mut conn = gateway.json().await;
    assert_eq!(
        conn.call(r#"{"subject":"a"}"#).await["error"]["code"],
        "UNAVAILABLE"
    );
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(child);
    gateway.wait_status("/ready", 200).await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero_and_removes_the_socket() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(600)).await;
    let mut gateway = GatewayProcess::start(&nats.url(), &["--drain-timeout-ms", "5000"]);
    let mut conn = gateway.json().await;
    for id in 0..20 {
        conn.send(&format!(
            r#"{{"id":{id},"subject":"svc.slow","data":"{id}"}}"#
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    gateway.signal("TERM");
    let mut answered = 0;
    while let Some(reply) = conn.recv_or_eof().await {
        assert_eq!(reply["ok"], true, "{reply}");
        answered += 1;
    }
    assert_eq!(answered, 20);
    assert_eq!(gateway.wait_exit(), Some(0));
    assert!(
        !gateway.socket.exists(),
        "the socket file is removed on exit"
    );
}

#[tokio::test]
async fn requests_still_waiting_when_the_drain_time_ends_get_unavailable() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_secs(5)).await;
    let mut gateway = GatewayProcess::start(&nats.url(), &["--drain-timeout-ms", "300"]);
    let mut conn = gateway.json().await;
    for id in 0..10 {
        conn.send(&format!(r#"{{"id":{id},"subject":"svc.slow","data":"x"}}"#))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    gateway.signal("TERM");
    let mut answered = 0;
    while let Some(reply) = conn.recv_or_eof().await {
        assert_eq!(reply["error"]["code"], "UNAVAILABLE", "{reply}");
        answered += 1;
    }
    assert_eq!(answered, 10);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gateway.wait_exit(), Some(0));
}

#[tokio::test]
async fn a_second_gateway_refuses_a_live_socket_and_a_stale_socket_is_replaced() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args(["serve", "--nats-url", &nats.url(), "--http", "127.0.0.1:0"])
        .args(["--grpc", "127.0.0.1:0"])
        .arg("--socket")
        .arg(&gateway.socket)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another process is listening"), "{stderr}");
    // The live socket was left alone.
    let mut conn = gateway.json().await;
    assert_eq!(conn.call(r#"{"op":"ping"}"#).await, json!({"op":"pong"}));

    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args([
            "serve",
            "--nats-url",
            &nats.url(),
            "--http",
            &format!("127.0.0.1:{port}"),
            "--grpc",
            "127.0.0.1:0",
        ])
        .arg("--socket")
        .arg(&stale)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while std::os::unix::net::UnixStream::connect(&stale).is_err() {
        assert!(
            Instant::now() < deadline,
            "the stale socket was not replaced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn the_socket_gets_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--socket-mode", "0600"]);
    let mode = std::fs::metadata(&gateway.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn bad_configuration_fails_start_up_naming_the_key() {
    let output = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args(["serve", "--max-frame-bytes", "3"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // Named as written: the flag and its value.
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-frame-bytes 3"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "request_timeout_ms = \"fast\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("request_timeout_ms"));

    let output = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args(["serve"])
        .env("IPC_GATEWAY_NATS_CONNECTIONS", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("IPC_GATEWAY_NATS_CONNECTIONS=0"));
}

#[tokio::test]
async fn metrics_count_requests_by_frontend_and_outcome() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    conn.call(r#"{"subject":"demo.echo","data":"a"}"#).await;
    conn.call(r#"{"subject":"nobody"}"#).await;
    conn.call(r#"{"subject":"nobody"}"#).await;
    let (status, text) = gateway.get("/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "ipc_gateway_requests_total{frontend=\"uds\",op=\"request\",outcome=\"ok\"} 1",
        "ipc_gateway_requests_total{frontend=\"uds\",op=\"request\",outcome=\"NO_RESPONDERS\"} 2",
        "ipc_gateway_connections{frontend=\"uds\"} 1",
        "ipc_gateway_nats_connected 2",
        "ipc_gateway_inflight_requests 0",
        "ipc_gateway_request_duration_seconds_bucket{frontend=\"uds\"",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[tokio::test]
async fn the_command_line_client_prints_replies_and_error_codes() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let socket = gateway.socket.clone();
    // Off the runtime thread: the echo service runs on it.
    let run = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"));
        command.args(args).arg("--socket").arg(&socket);
        async move {
            tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap()
        }
    };
    let output = run(&["request", "demo.echo", "hello"]).await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n");
    let output = run(&["request", "nobody.here", "x"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("NO_RESPONDERS:"));
    let output = run(&["publish", "events.x", "hi"]).await;
    assert!(output.status.success());
}

#[tokio::test]
async fn in_flight_requests_get_unavailable_at_once_when_nats_goes_away() {
    let mut nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_secs(20)).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--request-timeout-ms", "15000"]);
    let mut conn = gateway.json().await;
    for id in 0..10 {
        conn.send(&format!(r#"{{"id":{id},"subject":"svc.slow","data":"x"}}"#))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    nats.kill();
    for _ in 0..10 {
        let reply = conn.recv().await;
        assert_eq!(reply["error"]["code"], "UNAVAILABLE", "{reply}");
    }
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
}

/// Reads one gauge or counter value from /metrics.
async fn metric(gateway: &GatewayProcess, series: &str) -> f64 {
    let value = gateway.metric(series).await;
    value.unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test]
async fn a_subscriber_that_hangs_up_is_cleaned_up_even_on_a_quiet_subject() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    conn.call(r#"{"op":"subscribe","id":"q","subject":"quiet.subject"}"#)
        .await;
    // Half-close first (as `nc -N` does): the subscription stays served...
    conn.shutdown_write().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nats.subscriptions_on("quiet.subject").await, 1);
    // ...until the client closes completely.
    drop(conn);
    let deadline = Instant::now() + PATIENCE;
    while nats.subscriptions_on("quiet.subject").await > 0
        || metric(&gateway, "ipc_gateway_connections{frontend=\"uds\"}").await > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the closed subscriber was never cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn during_the_drain_ready_is_503_and_new_commands_are_refused() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(1500)).await;
    let mut gateway = GatewayProcess::start(&nats.url(), &["--drain-timeout-ms", "5000"]);
    let mut conn = gateway.json().await;
    conn.send(r#"{"id":"old","subject":"svc.slow","data":"x"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    gateway.signal("TERM");
    let body = gateway.wait_status("/ready", 503).await;
    assert!(body.contains("shutting_down"), "{body}");
    let refused = conn
        .call(r#"{"id":"new","subject":"svc.slow","data":"y"}"#)
        .await;
    assert_eq!(refused["id"], "new");
    assert_eq!(refused["error"]["code"], "UNAVAILABLE");
    let answered = conn.recv().await;
    assert_eq!(
        (answered["id"].as_str(), answered["ok"].as_bool()),
        (Some("old"), Some(true))
    );
    assert!(conn.recv_or_eof().await.is_none());
    assert_eq!(gateway.wait_exit(), Some(0));
}

#[tokio::test]
async fn a_second_signal_cuts_the_drain_short() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_secs(8)).await;
    let mut gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--drain-timeout-ms",
            "30000",
            "--request-timeout-ms",
            "30000",
        ],
    );
    let mut conn = gateway.json().await;
    conn.send(r#"{"id":1,"subject":"svc.slow","data":"x"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    gateway.signal("TERM");
    gateway.wait_status("/ready", 503).await;
    let started = Instant::now();
    gateway.signal("INT");
    let reply = conn.recv().await;
    assert_eq!(reply["error"]["code"], "UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gateway.wait_exit(), Some(0));
}

#[tokio::test]
async fn a_list_of_nats_urls_is_a_cluster_and_a_dead_member_is_skipped() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let urls = format!("{dead},{}", nats.url());
    let gateway = GatewayProcess::start(&urls, &[]);
    gateway.wait_status("/ready", 200).await;
    let mut conn = gateway.json().await;
    let reply = conn
        .call(r#"{"id":1,"subject":"demo.echo","data":"c"}"#)
        .await;
    assert_eq!(reply["data"], "c");
}

#[tokio::test]
async fn a_client_that_leaves_with_requests_in_flight_leaks_nothing() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(400)).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    for id in 0..5 {
        conn.send(&format!(r#"{{"id":{id},"subject":"svc.slow","data":"x"}}"#))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(conn);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let late = metric(&gateway, "ipc_gateway_late_replies_total").await;
        let connections = metric(&gateway, "ipc_gateway_connections{frontend=\"uds\"}").await;
        let inflight = metric(&gateway, "ipc_gateway_inflight_requests").await;
        let bytes = metric(&gateway, "ipc_gateway_inflight_bytes").await;
        if late == 5.0 && connections == 0.0 && inflight == 0.0 && bytes == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "late {late}, connections {connections}, in flight {inflight}, bytes {bytes}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Unix-socket counterpart of the WebSocket test in ws_protocol.rs: a client that stops
/// reading holds the gateway's write for up to the stall time; the cut at the end of the drain
/// ends it, and its disconnect is audited before the gateway exits.
#[tokio::test]
async fn a_client_stuck_in_a_write_through_the_drain_is_cut_and_its_disconnect_is_audited() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gateway =
        start_with_short_drain(&nats.url(), &audit, &["--slow-client-stall-ms", "60000"]);
    let stream = tokio::net::UnixStream::connect(&gateway.socket)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"{\"op\":\"subscribe\",\"id\":\"s\",\"subject\":\"flood\"}\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(read).lines();
    let ack = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ack).unwrap(),
        json!({"id":"s","ok":true})
    );
    // Nothing more is read.
    flood_then_stop(&nats, &mut gateway, "flood").await;
    assert_disconnect_audited(&gateway, &audit, "subscribe", "uds");
    drop((lines, write));
}
