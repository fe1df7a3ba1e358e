//! The WebSocket front-end with a real WebSocket client: the same envelope and core as the
//! Unix socket, JSON text messages and binary frames, origin checks, the message limit and
//! close codes.

use std::time::Duration;

use crate::common::ws::*;
use crate::common::*;
use bytes::Bytes;
use futures_util::SinkExt;
use ipc_gateway::protocol::binary::{FrameHeader, FrameParts, HEADER_LEN, frame_type};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn json_requests_subscriptions_and_errors_over_websocket() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", std::time::Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let mut ws = connect(&gateway, None).await.unwrap();
    assert_eq!(
        call(&mut ws, r#"{"subject":"demo.echo","data":"hello"}"#).await,
        json!({"id":null,"ok":true,"data":"hello"})
    );
    assert_eq!(
        call(
            &mut ws,
            r#"{"op":"subscribe","id":"s","subject":"events.>"}"#
        )
        .await,
        json!({"id":"s","ok":true})
    );
    let publisher = nats.client().await;
    publisher.publish("events.a", "x".into()).await.unwrap();
    publisher.flush().await.unwrap();
    match next(&mut ws).await {
        Message::Text(text) => assert_eq!(
            serde_json::from_str::<Value>(text.as_str()).unwrap(),
            json!({"op":"msg","sid":"s","subject":"events.a","data":"x"})
        ),
        other => panic!("{other:?}"),
    }
    let error = call(&mut ws, r#"{"id":7,"subject":"nobody.home"}"#).await;
    assert_eq!(error["error"]["code"], "NO_RESPONDERS");
    let bad = call(&mut ws, "not json").await;
    assert_eq!(bad["error"]["code"], "BAD_REQUEST");
    assert_eq!(
        call(&mut ws, r#"{"op":"ping"}"#).await,
        json!({"op":"pong"}),
        "still open"
    );
}

#[tokio::test]
async fn a_binary_message_carries_one_frame_and_gets_a_binary_reply() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", std::time::Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    let request = frame(FrameParts {
        frame_type: frame_type::REQUEST,
        id: 42,
        subject: b"demo.echo",
        payload: b"binary hello",
        ..FrameParts::default()
    });
    ws.send(Message::Binary(Bytes::from(request.to_vec())))
        .await
        .unwrap();
    match next(&mut ws).await {
        Message::Binary(data) => {
            let header = FrameHeader::parse(&data);
            assert_eq!((header.frame_type, header.id), (frame_type::REPLY, 42));
            assert!(data.ends_with(b"binary hello"));
            assert_eq!(data.len(), HEADER_LEN + header.body_len as usize);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn foreign_origins_are_refused_before_the_upgrade() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--ws-allowed-origins", "https://app.example"],
    );
    let own = format!("http://127.0.0.1:{}", gateway.http_port);
    assert!(
        connect(&gateway, Some(&own)).await.is_ok(),
        "the gateway's own page"
    );
    assert!(
        connect(&gateway, Some("https://app.example")).await.is_ok(),
        "an allowed origin"
    );
    assert!(
        connect(&gateway, None).await.is_ok(),
        "a program without Origin"
    );
    assert_eq!(
        connect(&gateway, Some("https://evil.example")).await.err(),
        Some(403)
    );
}

#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--ws-max-message-bytes", "1024"]);
    let mut ws = connect(&gateway, None).await.unwrap();
    // A subscription does not keep the broken connection open.
    call(&mut ws, r#"{"op":"subscribe","id":"s","subject":"news"}"#).await;
    let huge = format!(r#"{{"subject":"demo.echo","data":"{}"}}"#, "x".repeat(4096));
    let _ = ws.send(Message::text(huge)).await;
    // tungstenite cannot skip the rest of a message over its limit, so the connection ends:
    // TOO_LARGE first, then close code 1009.
    match next(&mut ws).await {
        Message::Text(text) => {
            let answer: Value = serde_json::from_str(text.as_str()).unwrap();
            assert_eq!(answer["error"]["code"], "TOO_LARGE", "{answer}");
        }
        other => panic!("{other:?}"),
    }
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_closes_with_1001() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(400)).await;
    let mut gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let mut ws = connect(&gateway, None).await.unwrap();
    ws.send(Message::text(r#"{"id":1,"subject":"svc.slow","data":"x"}"#))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gateway.signal("TERM");
    match next(&mut ws).await {
        Message::Text(text) => assert_eq!(
            serde_json::from_str::<Value>(text.as_str()).unwrap(),
            json!({"id":1,"ok":true,"data":"x"})
        ),
        other => panic!("{other:?}"),
    }
    match next(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("{other:?}"),
    }
    assert_eq!(gateway.wait_exit(), Some(0));
}

#[tokio::test]
async fn a_message_a_little_over_the_limit_gets_too_large_and_the_connection_stays() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--ws-max-message-bytes", "1024"]);
    let mut ws = connect(&gateway, None).await.unwrap();
    let big = format!(r#"{{"id":1,"subject":"a","data":"{}"}}"#, "x".repeat(1500));
    let answer = call(&mut ws, &big).await;
    assert_eq!(answer["error"]["code"], "TOO_LARGE", "{answer}");
    assert_eq!(
        call(&mut ws, r#"{"op":"ping","id":2}"#).await,
        json!({"op":"pong","id":2})
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_as_they_come_each_with_its_id() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(300)).await;
    let _fast = spawn_echo(&nats.url(), "svc.fast", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    send(&mut ws, r#"{"id":"slow","subject":"svc.slow","data":"s"}"#).await;
    for n in 0..100 {
        send(
            &mut ws,
            &format!(r#"{{"id":{n},"subject":"svc.fast","data":"{n}"}}"#),
        )
        .await;
    }
    let mut answered = Vec::new();
    for _ in 0..101 {
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(
            answer["data"].as_str(),
            answer["id"]
                .as_u64()
                .map(|n| n.to_string())
                .as_deref()
                .or(Some("s"))
        );
        answered.push(answer["id"].clone());
    }
    assert_eq!(
        answered.last(),
        Some(&json!("slow")),
        "the slow one is overtaken"
    );
    answered.sort_by_key(|id| id.as_u64().unwrap_or(u64::MAX));
    assert_eq!(
        answered[..100],
        (0..100).map(|n| json!(n)).collect::<Vec<_>>()[..]
    );
}

#[tokio::test]
async fn every_error_code_path_over_websocket() {
    let mut nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(500)).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--breaker-failures",
            "2",
            "--breaker-reconnect-grace-ms",
            "0",
            "--rate-limit-requests-per-sec",
            "20",
        ],
    );
    let mut ws = connect(&gateway, None).await.unwrap();
    for (line, code) in [
        ("{", "BAD_REQUEST"),
        (r#"{"op":"dance","id":1,"subject":"a"}"#, "BAD_REQUEST"),
        (r#"{"id":2,"subject":"bad subject"}"#, "BAD_REQUEST"),
        (r#"{"op":"unsubscribe","id":"nope"}"#, "BAD_REQUEST"),
        (
            r#"{"id":3,"subject":"svc.slow","timeout_ms":50}"#,
            "TIMEOUT",
        ),
        (r#"{"id":4,"subject":"nobody.home"}"#, "NO_RESPONDERS"),
        (r#"{"id":5,"subject":"nobody.home"}"#, "NO_RESPONDERS"),
        (r#"{"id":6,"subject":"nobody.home"}"#, "CIRCUIT_OPEN"),
    ] {
        let answer = call(&mut ws, line).await;
        assert_eq!(answer["error"]["code"], code, "{line}: {answer}");
    }
    // Binary: a frame of a version the gateway does not speak; the connection goes on.
    let mut frame = frame(FrameParts {
        frame_type: frame_type::PING,
        id: 7,
        ..FrameParts::default()
    });
    frame[1] = 9;
    let mut binary = connect(&gateway, None).await.unwrap();
    binary
        .send(Message::Binary(Bytes::from(frame.to_vec())))
        .await
        .unwrap();
    match next(&mut binary).await {
        Message::Binary(data) => {
            let header = FrameHeader::parse(&data);
            assert_eq!(header.frame_type, frame_type::ERROR);
            assert!(data.windows(19).any(|w| w == b"UNSUPPORTED_VERSION"));
        }
        other => panic!("{other:?}"),
    }
    // Over the rate limit.
    let mut codes = Vec::new();
    for n in 0..40 {
        send(&mut ws, &format!(r#"{{"op":"ping","id":{n}}}"#)).await;
        send(
            &mut ws,
            &format!(r#"{{"op":"publish","id":{n},"subject":"x"}}"#),
        )
        .await;
    }
    for _ in 0..80 {
        let answer = next_json(&mut ws).await;
        codes.push(answer["error"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert!(codes.iter().any(|c| c == "OVERLOADED"), "{codes:?}");
    // NATS gone.
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = call(&mut ws, r#"{"id":8,"subject":"svc.other"}"#).await;
    assert_eq!(answer["error"]["code"], "UNAVAILABLE", "{answer}");
}

#[tokio::test]
async fn unsubscribe_stops_the_messages() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    call(&mut ws, r#"{"op":"subscribe","id":"s","subject":"news"}"#).await;
    let publisher = nats.client().await;
    publisher.publish("news", "one".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(next_json(&mut ws).await["data"], "one");
    assert_eq!(
        call(&mut ws, r#"{"op":"unsubscribe","id":"s"}"#).await,
        json!({"id":"s","ok":true})
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    while nats.subscriptions_on("news").await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "NATS saw the unsubscribe"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publisher.publish("news", "two".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(
        call(&mut ws, r#"{"op":"ping","id":1}"#).await,
        json!({"op":"pong","id":1}),
        "no message after the unsubscribe"
    );
}

#[tokio::test]
async fn a_client_close_is_answered_at_once_and_ends_its_subscriptions() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    call(&mut ws, r#"{"op":"subscribe","id":"s","subject":"news"}"#).await;
    ws.close(None).await.unwrap();
    // The gateway's reply completes the closing handshake: a clean end, not a reset.
    loop {
        match tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut ws))
            .await
            .expect("the close is answered in time")
        {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(err)) => panic!("{err}"),
        }
    }
    let deadline = std::time::Instant::now() + PATIENCE;
    while nats.subscriptions_on("news").await != 0
        || gateway
            .metric(r#"ipc_gateway_connections{frontend="ws"}"#)
            .await
            != Some(0.0)
    {
        assert!(std::time::Instant::now() < deadline, "the connection ends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_text_message_that_is_not_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    let bad = Frame::message(
        Bytes::from_static(b"{\"subject\":\"a\",\"data\":\"\xff\xfe\"}"),
        OpCode::Data(Data::Text),
        true,
    );
    ws.send(Message::Frame(bad)).await.unwrap();
    let answer = next_json(&mut ws).await;
    assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{answer}");
    assert_eq!(
        close_code(&mut ws).await,
        Some(1007),
        "RFC 6455: invalid data"
    );
}

#[tokio::test]
async fn publish_and_request_with_the_same_bad_subject_get_the_same_code_over_websocket() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut ws = connect(&gateway, None).await.unwrap();
    for subject in ["a b", "a..b", "a.*", "a.>", ".a", "a."] {
        for op in ["request", "publish"] {
            let line = json!({"op": op, "id": 1, "subject": subject, "data": "x"}).to_string();
            let answer = call(&mut ws, &line).await;
            assert_eq!(
                answer["error"]["code"], "BAD_REQUEST",
                "{op} {subject:?}: {answer}"
            );
        }
    }
}

/// Publishes `n` numbered messages on `subject` in one go.
async fn publish_burst(nats: &NatsServer, subject: &str, n: usize) {
    let publisher = nats.client().await;
    for i in 0..n {
        publisher
            .publish(subject.to_owned(), format!("{i}").into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
}

#[tokio::test]
async fn with_batch_true_one_message_carries_several_json_lines_in_order() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let (mut ws, _) = connect_to(&gateway, "/ws?batch=true", &[]).await.unwrap();
    let ack = call(
        &mut ws,
        r#"{"op":"subscribe","id":"b","subject":"batch.json"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let total = 200;
    publish_burst(&nats, "batch.json", total).await;
    let (mut seen, mut most_in_one) = (Vec::new(), 0);
    while seen.len() < total {
        let Message::Text(text) = next(&mut ws).await else {
            continue;
        };
        assert!(
            text.ends_with('\n'),
            "each line ends with a newline: {text:?}"
        );
        let lines: Vec<&str> = text.lines().collect();
        most_in_one = most_in_one.max(lines.len());
        for line in lines {
            let message: Value = serde_json::from_str(line).unwrap();
            assert_eq!(message["op"], "msg", "{message}");
            seen.push(message["data"].as_str().unwrap().parse::<usize>().unwrap());
        }
    }
    assert_eq!(seen, (0..total).collect::<Vec<_>>(), "all, in order");
    assert!(most_in_one > 1, "a burst of {total} never shared a message");
}

#[tokio::test]
async fn with_batch_true_binary_frames_follow_each_other_in_one_message() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let (mut ws, _) = connect_to(&gateway, "/ws?batch=1", &[]).await.unwrap();
    let subscribe = frame(FrameParts {
        frame_type: frame_type::SUBSCRIBE,
        id: 7,
        subject: b"batch.bin",
        ..FrameParts::default()
    });
    ws.send(Message::Binary(Bytes::from(subscribe.to_vec())))
        .await
        .unwrap();
    let Message::Binary(ack) = next(&mut ws).await else {
        panic!("no ack")
    };
    assert_eq!(FrameHeader::parse(&ack).frame_type, frame_type::ACK);
    let total = 200;
    publish_burst(&nats, "batch.bin", total).await;
    let (mut seen, mut most_in_one) = (Vec::new(), 0);
    while seen.len() < total {
        let Message::Binary(data) = next(&mut ws).await else {
            continue;
        };
        let mut rest = &data[..];
        let mut frames = 0;
        while !rest.is_empty() {
            let header = FrameHeader::parse(rest);
            assert_eq!((header.frame_type, header.id), (frame_type::MSG, 7));
            let end = HEADER_LEN + header.body_len as usize;
            // The payload (the number) ends the frame.
            let digits = rest[..end]
                .iter()
                .rev()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let number = std::str::from_utf8(&rest[end - digits..end]).unwrap();
            seen.push(number.parse::<usize>().unwrap());
            rest = &rest[end..];
            frames += 1;
        }
        most_in_one = most_in_one.max(frames);
    }
    assert_eq!(seen, (0..total).collect::<Vec<_>>(), "all, in order");
    assert!(most_in_one > 1, "a burst of {total} never shared a message");
}

#[tokio::test]
async fn an_unknown_ws_parameter_is_refused_before_the_upgrade() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    for path in ["/ws?batch=maybe", "/ws?format=json"] {
        let refused = connect_to(&gateway, path, &[]).await.unwrap_err();
        assert_eq!(refused, 400, "{path}");
    }
    assert!(connect_to(&gateway, "/ws?batch=false", &[]).await.is_ok());
}
