//! Flow and liveness on the WebSocket front-end, with real clients: credit flow control (on
//! the Unix socket too: one queue for both), a client that stops reading, the heartbeat and
//! the idle timeout.

use std::time::{Duration, Instant};

use crate::common::ws::*;
use crate::common::*;
use futures_util::StreamExt;
use ipc_gateway::protocol::binary::{FrameParts, frame_type};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Publishes `count` messages on `subject`, numbered from `from`, and waits until NATS has
/// them.
async fn publish_numbered(client: &async_nats::Client, subject: &str, from: u32, count: u32) {
    for n in from..from + count {
        client
            .publish(subject.to_owned(), n.to_string().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
}

/// Reads `count` events (skipping pings) and returns them.
async fn next_events(ws: &mut Ws, count: usize) -> Vec<Value> {
    let mut events = Vec::new();
    while events.len() < count {
        events.push(next_json(ws).await);
    }
    events
}

/// Nothing but pings arrives within `wait`.
async fn assert_silent(ws: &mut Ws, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn credit_bounds_what_a_subscription_gets_until_the_client_grants_more() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--subscription-queue", "4"]);
    let mut ws = connect(&gateway, None).await.unwrap();
    let publisher = nats.client().await;
    assert_eq!(
        call(
            &mut ws,
            r#"{"op":"subscribe","id":"v","subject":"video","credit":1}"#
        )
        .await,
        json!({"id":"v","ok":true})
    );
    publish_numbered(&publisher, "video", 1, 1).await;
    assert_eq!(next_json(&mut ws).await["data"], "1");
    // No credit left: 2–10 wait in the subscription's queue of 4; the oldest five are dropped.
    publish_numbered(&publisher, "video", 2, 9).await;
    let notice = next_json(&mut ws).await;
    assert_eq!(notice["op"], "dropped", "{notice}");
    let mut dropped = notice["count"].as_u64().unwrap();
    while dropped < 5 {
        let notice = next_json(&mut ws).await;
        assert_eq!(notice["op"], "dropped", "{notice}");
        dropped += notice["count"].as_u64().unwrap();
    }
    assert_eq!(dropped, 5);
    assert_silent(&mut ws, Duration::from_millis(300)).await;
    send(&mut ws, r#"{"op":"credit","sid":"v","n":2}"#).await;
    let granted: Vec<Value> = next_events(&mut ws, 2).await;
    assert_eq!(
        granted
            .iter()
            .map(|m| m["data"].clone())
            .collect::<Vec<_>>(),
        ["7", "8"]
    );
    assert_silent(&mut ws, Duration::from_millis(300)).await;
    send(&mut ws, r#"{"op":"credit","sid":"v","n":100}"#).await;
    let rest = next_events(&mut ws, 2).await;
    assert_eq!(
        rest.iter().map(|m| m["data"].clone()).collect::<Vec<_>>(),
        ["9", "10"]
    );
    // Credit left over lets new messages straight through.
    publish_numbered(&publisher, "video", 11, 1).await;
    assert_eq!(next_json(&mut ws).await["data"], "11");
    assert!(
        gateway
            .metric(r#"ipc_gateway_dropped_messages_total{frontend="ws"}"#)
            .await
            .unwrap()
            >= 5.0
    );
}

#[tokio::test]
async fn credit_on_the_unix_socket_and_every_bad_grant() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    let publisher = nats.client().await;
    conn.call(r#"{"op":"subscribe","id":1,"subject":"frames","credit":2}"#)
        .await;
    conn.call(r#"{"op":"subscribe","id":2,"subject":"plain"}"#)
        .await;
    publish_numbered(&publisher, "frames", 1, 5).await;
    assert_eq!(conn.recv().await["data"], "1");
    assert_eq!(conn.recv().await["data"], "2");
    conn.assert_silent(Duration::from_millis(300)).await;
    conn.send(r#"{"op":"credit","sid":1,"n":3}"#).await;
    for n in ["3", "4", "5"] {
        assert_eq!(conn.recv().await["data"], n);
    }
    for (line, fragment) in [
        (r#"{"op":"credit","sid":9,"n":1}"#, "no subscription"),
        (r#"{"op":"credit","sid":1,"n":0}"#, "at least 1"),
        (r#"{"op":"credit","sid":1}"#, "at least 1"),
        (r#"{"op":"credit","sid":2,"n":1}"#, "without \"credit\""),
        (
            r#"{"op":"subscribe","id":3,"subject":"x","credit":0}"#,
            "at least 1",
        ),
    ] {
        let answer = conn.call(line).await;
        assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{line}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(fragment),
            "{line}: {answer}"
        );
    }
    // A subscription without credit is not held back.
    publish_numbered(&publisher, "plain", 1, 3).await;
    for n in ["1", "2", "3"] {
        assert_eq!(conn.recv().await["data"], n);
    }
}

#[tokio::test]
async fn credit_in_binary_frames_subscribe_param_and_credit_frame() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.raw().await;
    let publisher = nats.client().await;
    conn.send(&frame(FrameParts {
        frame_type: frame_type::SUBSCRIBE,
        id: 5,
        param: 1,
        subject: b"frames",
        ..FrameParts::default()
    }))
    .await;
    assert_eq!(conn.recv().await.header.frame_type, frame_type::ACK);
    publish_numbered(&publisher, "frames", 1, 3).await;
    let first = conn.recv().await;
    assert_eq!(
        (first.header.frame_type, first.header.id),
        (frame_type::MSG, 5)
    );
    assert_eq!(&first.payload[..], b"1");
    conn.send(&frame(FrameParts {
        frame_type: frame_type::CREDIT,
        id: 5,
        param: 2,
        ..FrameParts::default()
    }))
    .await;
    assert_eq!(&conn.recv().await.payload[..], b"2");
    assert_eq!(&conn.recv().await.payload[..], b"3");
    // A grant for a subscription that does not exist is an error, and the connection goes on.
    conn.send(&frame(FrameParts {
        frame_type: frame_type::CREDIT,
        id: 6,
        param: 1,
        ..FrameParts::default()
    }))
    .await;
    let error = conn.recv().await;
    assert_eq!(error.header.frame_type, frame_type::ERROR);
    assert_eq!(error.code(), "BAD_REQUEST");
}

#[tokio::test]
async fn a_client_that_stops_reading_gets_dropped_notices_then_is_disconnected() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--subscription-queue",
            "8",
            "--slow-client-stall-ms",
            "500",
            "--ws-ping-interval-ms",
            "0",
        ],
    );
    let mut slow = connect(&gateway, None).await.unwrap();
    call(
        &mut slow,
        r#"{"op":"subscribe","id":"feed","subject":"feed"}"#,
    )
    .await;
    let mut other = connect(&gateway, None).await.unwrap();
    // Far more than the kernel's socket buffers hold, until the gateway gives up on the slow
    // client: its socket fills and stays full.
    let publisher = nats.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..64 {
                    publisher.publish("feed", chunk.clone()).await.unwrap();
                }
                publisher.flush().await.unwrap();
            }
        }
    });
    let series = r#"ipc_gateway_disconnects_total{frontend="ws",reason="slow_client"}"#;
    let deadline = Instant::now() + PATIENCE * 2;
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while gateway.metric(series).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the slow client is disconnected");
        n += 1;
        let started = Instant::now();
        let answer = call(
            &mut other,
            &format!(r#"{{"id":{n},"subject":"demo.echo","data":"still here"}}"#),
        )
        .await;
        assert_eq!(answer["data"], "still here");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.await.unwrap();
    assert!(
        slowest < Duration::from_secs(2),
        "the other client waited {slowest:?} during the flood"
    );
    // What the slow client finds when it reads again: the messages its socket held, dropped
    // notices among them, then the end of the connection.
    let (mut messages, mut dropped, mut close) = (0, 0, None);
    loop {
        match tokio::time::timeout(PATIENCE, slow.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let event: Value = serde_json::from_str(text.as_str()).unwrap();
                match event["op"].as_str() {
                    Some("msg") => messages += 1,
                    Some("dropped") => dropped += event["count"].as_u64().unwrap(),
                    _ => panic!("{event}"),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                close = frame.map(|f| u16::from(f.code));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    // Whether a `dropped` notice is among what the socket held depends on timing: it is only
    // written if the subscription's queue overflowed while the socket still had room, that is
    // if the pump outran the writer before the socket filled. A gateway whose writer keeps up
    // (one worker thread, a cheaper request path) fills the socket first, and the notice for
    // the drops that follow is never written: the client is disconnected with it queued.
    // What always holds: the client got messages, the gateway dropped (and counted) others,
    // and every notice the client did get is counted.
    let counted = gateway
        .metric(r#"ipc_gateway_dropped_messages_total{frontend="ws"}"#)
        .await
        .unwrap();
    assert!(
        messages > 0 && counted > 0.0,
        "{messages} messages, {dropped} dropped notices, {counted} drops counted"
    );
    assert!(matches!(close, None | Some(4008)), "close code {close:?}");
    assert!(counted >= dropped as f64);
    assert_eq!(
        call(&mut other, r#"{"op":"ping","id":1}"#).await,
        json!({"op":"pong","id":1})
    );
}

#[tokio::test]
async fn a_client_that_misses_two_pongs_is_closed_and_one_that_answers_is_not() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--ws-ping-interval-ms", "200"]);
    // tungstenite answers pings only while the stream is read: `silent` never reads.
    let mut silent = connect(&gateway, None).await.unwrap();
    let mut alive = connect(&gateway, None).await.unwrap();
    let series = r#"ipc_gateway_disconnects_total{frontend="ws",reason="heartbeat"}"#;
    let answering = tokio::spawn(async move {
        // Six intervals: long enough for the silent one to be closed.
        let deadline = Instant::now() + Duration::from_millis(1200);
        loop {
            if let Ok(message) = tokio::time::timeout(Duration::from_millis(50), alive.next()).await
            {
                match message {
                    Some(Ok(Message::Ping(_))) => {}
                    other => panic!("the answering client got {other:?}"),
                }
            }
            if Instant::now() > deadline {
                return alive;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    while gateway.metric(series).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the silent client is closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its close frame waits in its socket, after the two pings it never answered (unless the
    // gateway's grace time ran out first and the connection was reset).
    let code = close_code(&mut silent).await;
    assert!(matches!(code, None | Some(1008)), "close code {code:?}");
    let mut alive = answering.await.unwrap();
    assert_eq!(
        call(&mut alive, r#"{"op":"ping","id":2}"#).await,
        json!({"op":"pong","id":2}),
        "a client that reads (and so answers pings) stays"
    );
    assert_eq!(gateway.metric(series).await, Some(1.0));
}

#[tokio::test]
async fn an_idle_websocket_is_closed_with_1008_unless_it_holds_a_subscription() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--idle-timeout-ms", "300", "--ws-ping-interval-ms", "100"],
    );
    let mut idle = connect(&gateway, None).await.unwrap();
    let mut subscribed = connect(&gateway, None).await.unwrap();
    call(
        &mut subscribed,
        r#"{"op":"subscribe","id":"s","subject":"quiet"}"#,
    )
    .await;
    // Answered pings are not activity. `subscribed` is read meanwhile, so it answers its pings
    // too (tungstenite answers only while the stream is read): left unread, two missed pongs
    // at 100 ms close it for the heartbeat before the idle one is closed.
    let closed = close_code(&mut idle);
    tokio::pin!(closed);
    let code = loop {
        tokio::select! {
            code = &mut closed => break code,
            message = subscribed.next() => match message {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected silence, got {other:?}"),
            },
        }
    };
    assert_eq!(code, Some(1008));
    assert_silent(&mut subscribed, Duration::from_millis(600)).await;
    assert_eq!(
        call(&mut subscribed, r#"{"op":"ping","id":1}"#).await,
        json!({"op":"pong","id":1})
    );
    assert_eq!(
        gateway
            .metric(r#"ipc_gateway_disconnects_total{frontend="ws",reason="idle"}"#)
            .await,
        Some(1.0)
    );
}
