//! Every error code a Unix-socket client can get, and that each leaves the connection usable
//! where the protocol can resynchronise.

use std::time::{Duration, Instant};

use crate::common::*;
use bytes::BufMut;
use ipc_gateway::protocol::binary::{self, FrameParts, frame_type};
use serde_json::json;

/// The connection still answers after an error.
async fn still_usable(conn: &mut JsonConn) {
    assert_eq!(
        conn.call(r#"{"op":"ping","id":"alive"}"#).await,
        json!({"op":"pong","id":"alive"})
    );
}

#[tokio::test]
async fn bad_json_lines_get_bad_request_and_the_connection_stays_open() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    let cases = [
        (r#"{"subject":"demo.echo","data":"#, "malformed JSON"),
        ("not json at all", "malformed JSON"),
        (r#"{"op":"dance","id":1,"subject":"a"}"#, "unknown op"),
        (r#"{"op":"publish","id":2,"data":"x"}"#, "subject"),
        (
            r#"{"id":3,"subject":"demo echo","data":"x"}"#,
            "white space",
        ),
        (r#"{"id":4,"subject":"demo..echo"}"#, "empty token"),
        (r#"{"id":5,"subject":"demo.*"}"#, "wildcard"),
        (r#"{"op":"publish","id":6,"subject":"demo.>"}"#, "wildcard"),
        (r#"{"op":"subscribe","subject":"a"}"#, "needs an \"id\""),
        (
            r#"{"op":"subscribe","id":7,"subject":"a.>.b"}"#,
            "last token",
        ),
        (r#"{"id":8,"subject":"a","data_b64":"***"}"#, "base64"),
        (
            r#"{"id":9,"subject":"a","timeout_ms":"soon"}"#,
            "invalid envelope",
        ),
        (
            r#"{"id":10,"subject":"a","headers":{"bad name":"x"}}"#,
            "header name",
        ),
        (r#"[1,2,3]"#, "invalid envelope"),
    ];
    for (line, hint) in cases {
        let reply = conn.call(line).await;
        assert_eq!(reply["ok"], false, "{line}");
        assert_eq!(reply["error"]["code"], "BAD_REQUEST", "{line} -> {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(hint),
            "{line}: {message:?} should mention {hint:?}"
        );
    }
    // The id of a line whose other fields are wrong is still echoed.
    let reply = conn
        .call(r#"{"id":"keep","subject":"a","timeout_ms":-5}"#)
        .await;
    assert_eq!(reply["id"], "keep");
    still_usable(&mut conn).await;
}

#[tokio::test]
async fn a_line_over_the_limit_is_too_large_and_the_next_line_works() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--max-frame-bytes", "1024", "--trace-requests", "false"],
    );
    let mut conn = gateway.json().await;
    let huge = format!(
        r#"{{"id":1,"subject":"demo.echo","data":"{}"}}"#,
        "x".repeat(200_000)
    );
    conn.send(&huge).await;
    let reply = conn.recv().await;
    assert_eq!(reply["error"]["code"], "TOO_LARGE");
    assert_eq!(reply["id"], serde_json::Value::Null);
    let reply = conn
        .call(r#"{"id":2,"subject":"demo.echo","data":"small"}"#)
        .await;
    assert_eq!(reply, json!({"id":2,"ok":true,"data":"small"}));
}

#[tokio::test]
async fn no_responders_is_reported_at_once_and_the_connection_stays_open() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    let started = Instant::now();
    let reply = conn
        .call(r#"{"id":1,"subject":"nobody.home","timeout_ms":3000}"#)
        .await;
    assert_eq!(reply["error"]["code"], "NO_RESPONDERS");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "did not wait out the deadline"
    );
    still_usable(&mut conn).await;
}

#[tokio::test]
async fn a_slow_service_gets_timeout_at_the_clients_deadline_capped_by_the_ceiling() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_secs(3)).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--request-timeout-ms", "800"]);
    let mut conn = gateway.json().await;
    let started = Instant::now();
    let reply = conn
        .call(r#"{"id":1,"subject":"svc.slow","timeout_ms":200}"#)
        .await;
    let waited = started.elapsed();
    assert_eq!(reply["error"]["code"], "TIMEOUT");
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    // A client asking for more than the ceiling gets the ceiling.
    let started = Instant::now();
    let reply = conn
        .call(r#"{"id":2,"subject":"svc.slow","timeout_ms":60000}"#)
        .await;
    let waited = started.elapsed();
    assert_eq!(reply["error"]["code"], "TIMEOUT");
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(2900),
        "{waited:?}"
    );
    still_usable(&mut conn).await;
}

#[tokio::test]
async fn an_unknown_binary_version_gets_an_error_frame_naming_v1_then_close() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.raw().await;
    let mut bytes = frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 1,
        subject: b"demo.echo",
        ..FrameParts::default()
    });
    bytes[1] = 7;
    conn.send(&bytes).await;
    let error = conn.recv().await;
    assert_eq!(error.header.frame_type, frame_type::ERROR);
    assert_eq!(error.code(), "UNSUPPORTED_VERSION");
    assert!(String::from_utf8_lossy(&error.payload).contains("[1]"));
    assert!(
        conn.recv_or_eof().await.is_none(),
        "the connection closes after a fatal error"
    );
}

#[tokio::test]
async fn bad_binary_frames_that_can_be_skipped_leave_the_connection_usable() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--max-frame-bytes", "4096"]);
    let mut conn = gateway.raw().await;
    let mut unknown_type = frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 11,
        subject: b"demo.echo",
        ..FrameParts::default()
    });
    unknown_type[2] = 0x44;
    conn.send(&unknown_type).await;
    let error = conn.recv().await;
    assert_eq!(
        (error.header.id, error.code()),
        (11, "BAD_REQUEST".to_owned())
    );

    let oversized = frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 12,
        subject: b"demo.echo",
        payload: &[b'x'; 10_000],
        ..FrameParts::default()
    });
    conn.send(&oversized).await;
    let error = conn.recv().await;
    assert_eq!(
        (error.header.id, error.code()),
        (12, "TOO_LARGE".to_owned())
    );

    let invalid_subject = frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 13,
        subject: b"demo.*",
        ..FrameParts::default()
    });
    conn.send(&invalid_subject).await;
    assert_eq!(conn.recv().await.code(), "BAD_REQUEST");

    conn.send(&frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 14,
        subject: b"demo.echo",
        payload: b"fine",
        ..FrameParts::default()
    }))
    .await;
    let reply = conn.recv().await;
    assert_eq!(
        (reply.header.frame_type, reply.header.id),
        (frame_type::REPLY, 14)
    );
    assert_eq!(&reply.payload[..], b"fine");
}

#[tokio::test]
async fn a_frame_claiming_a_gigabyte_is_rejected_without_allocating_it() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let before = gateway.rss_kib();
    let mut conn = gateway.raw().await;
    let mut header = bytes::BytesMut::new();
    header.put_u8(binary::MAGIC);
    header.put_u8(binary::VERSION);
    header.put_u8(frame_type::REQUEST);
    header.put_u8(0);
    header.put_u32(1 << 30);
    header.put_u64(77);
    header.put_u32(0);
    conn.send(&header).await;
    let error = conn.recv().await;
    assert_eq!(
        (error.header.id, error.code()),
        (77, "TOO_LARGE".to_owned())
    );
    let after = gateway.rss_kib();
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Other clients are unaffected.
    let mut other = gateway.json().await;
    assert_eq!(other.call(r#"{"op":"ping"}"#).await, json!({"op":"pong"}));
}

#[tokio::test]
async fn the_inflight_byte_budget_answers_overloaded() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(500)).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--max-inflight-bytes", "1000", "--max-frame-bytes", "1000"],
    );
    let mut conn = gateway.json().await;
    let payload = "x".repeat(600);
    conn.send(&format!(
        r#"{{"id":1,"subject":"svc.slow","data":"{payload}"}}"#
    ))
    .await;
    // The first request holds 600 of the 1000 bytes until its reply comes back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = conn
        .call(&format!(
            r#"{{"id":2,"subject":"svc.slow","data":"{payload}"}}"#
        ))
        .await;
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["error"]["code"], "OVERLOADED");
    let first = conn.recv().await;
    assert_eq!(
        (first["id"].as_u64(), first["ok"].as_bool()),
        (Some(1), Some(true))
    );
    // Spent bytes come back: the same request now succeeds.
    let reply = conn
        .call(&format!(
            r#"{{"id":3,"subject":"svc.slow","data":"{payload}"}}"#
        ))
        .await;
    assert_eq!(reply["ok"], true);
}

#[tokio::test]
async fn the_connection_limit_answers_overloaded_then_closes() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--max-connections", "1"]);
    // The harness's start-up probe may hold the one slot for a moment.
    let mut first = loop {
        let mut conn = gateway.json().await;
        if conn.call(r#"{"op":"ping"}"#).await["op"] == "pong" {
            break conn;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut second = gateway.json().await;
    second.send(r#"{"op":"ping"}"#).await;
    let reply = second.recv().await;
    assert_eq!(reply["error"]["code"], "OVERLOADED");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum of 1")
    );
    assert!(second.recv_or_eof().await.is_none());
    still_usable(&mut first).await;
}

#[tokio::test]
async fn a_client_over_its_inflight_limit_is_not_read_until_answers_drain() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(300)).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--max-inflight-per-connection", "4"]);
    let mut conn = gateway.json().await;
    for id in 0..12 {
        conn.send(&format!(r#"{{"id":{id},"subject":"svc.slow","data":"x"}}"#))
            .await;
    }
    // Backpressure, not errors: all twelve are answered, in three waves of four.
    let started = Instant::now();
    for _ in 0..12 {
        assert_eq!(conn.recv().await["ok"], true);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_loses_the_oldest_messages_and_is_told_how_many() {
    let nats = NatsServer::start();
    let publisher = nats.client().await;
    let gateway = GatewayProcess::start(&nats.url(), &["--subscription-queue", "16"]);
    let mut conn = gateway.json().await;
    conn.call(r#"{"op":"subscribe","id":"s","subject":"flood"}"#)
        .await;
    let total = 5000u64;
    let payload = bytes::Bytes::from(vec![b'y'; 1024]);
    for _ in 0..total {
        publisher.publish("flood", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut delivered, mut dropped) = (0u64, 0u64);
    while delivered + dropped < total {
        let Ok(line) = tokio::time::timeout(Duration::from_secs(3), conn.recv()).await else {
            panic!("stalled after {delivered} delivered and {dropped} dropped of {total}");
        };
        match line["op"].as_str() {
            Some("msg") => delivered += 1,
            Some("dropped") => {
                assert_eq!(line["sid"], "s");
                dropped += line["count"].as_u64().unwrap();
            }
            _ => panic!("unexpected {line}"),
        }
    }
    assert_eq!(
        delivered + dropped,
        total,
        "every message is delivered or counted"
    );
    assert!(
        dropped > 0,
        "a client that did not read should have lost some"
    );
    let counted = gateway
        .metric("ipc_gateway_dropped_messages_total{frontend=\"uds\"}")
        .await
        .unwrap();
    assert_eq!(counted, dropped as f64);
}

#[tokio::test]
async fn publish_and_request_with_the_same_bad_subject_get_the_same_code() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    for subject in ["a b", "a..b", "a.*", "a.>", ".a", "a."] {
        for op in ["request", "publish"] {
            let line = json!({"op": op, "id": 1, "subject": subject, "data": "x"}).to_string();
            let answer = conn.call(&line).await;
            assert_eq!(
                answer["error"]["code"], "BAD_REQUEST",
                "{op} {subject:?}: {answer}"
            );
        }
    }
    // Binary frames: a subject that is not UTF-8, both ways.
    let mut raw = gateway.raw().await;
    for kind in [frame_type::REQUEST, frame_type::PUBLISH] {
        raw.send(&frame(FrameParts {
            frame_type: kind,
            id: 7,
            subject: b"a.\xff",
            payload: b"x",
            ..FrameParts::default()
        }))
        .await;
        assert_eq!(raw.recv().await.code(), "BAD_REQUEST");
    }
}
