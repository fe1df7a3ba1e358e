//! Priority lanes under pressure, through the real gateway: a client subscribes high, normal
//! and low, stops reading until the gateway's writer is blocked on its full socket, gets a
//! burst on all three, then reads. What it must find (rules in docs/protocol.md#priority):
//! every high message, before the normal ones; the newest normal ones; no low one; each drop
//! counted in a `dropped` notice ahead of the messages; and a high request's reply ahead of the
//! answers queued before it. Over JSON lines and binary frames on the Unix socket, and JSON on
//! the WebSocket.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::ws::{self as wsc, Ws};
use crate::common::*;
use bytes::Bytes;
use ipc_gateway::protocol::binary::{FrameParts, flag, frame_type};
use serde_json::{Value, json};

/// Stream messages the gateway queues per connection in these tests.
const QUEUE: &str = "16";
/// Filler messages: big, so that a few fill the client's socket.
const FILL_BYTES: usize = 64 * 1024;
/// Filler messages published between two looks at the drop counter.
const ROUND: u32 = 16;

/// What a client read, whatever its wire. Sids are the names below (binary ids mapped).
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// A reply or error, by request id.
    Answer(String),
    Pong(String),
    /// A message; `data` only for the burst's small ones.
    Msg {
        sid: String,
        data: String,
    },
    Dropped {
        sid: String,
        count: u64,
    },
}

fn sid_name(id: u64) -> String {
    match id {
        1 => "hi",
        2 => "no",
        3 => "lo",
        4 => "fill",
        _ => "?",
    }
    .into()
}

fn seen_json(line: &Value) -> Seen {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    match line["op"].as_str() {
        Some("msg") => {
            let sid = text(&line["sid"]);
            let data = if sid == "fill" {
                String::new()
            } else {
                text(&line["data"])
            };
            Seen::Msg { sid, data }
        }
        Some("dropped") => Seen::Dropped {
            sid: text(&line["sid"]),
            count: line["count"].as_u64().unwrap(),
        },
        Some("pong") => Seen::Pong(text(&line["id"])),
        _ if line["ok"] == true => Seen::Answer(text(&line["id"])),
        _ => panic!("unexpected {line}"),
    }
}

/// Publishes filler on `fill` until the gateway's writer to this client is blocked: a whole
/// round of filler was dropped (the writer took none of it, so its socket is full).
async fn fill_until_blocked(gateway: &GatewayProcess, publisher: &async_nats::Client, fe: &str) {
    let series = format!(r#"ipc_gateway_dropped_messages_total{{frontend="{fe}"}}"#);
    let chunk = Bytes::from(vec![b'x'; FILL_BYTES]);
    for _ in 0..200 {
        let before = gateway.metric(&series).await.unwrap_or(0.0);
        for _ in 0..ROUND {
            publisher.publish("fill", chunk.clone()).await.unwrap();
        }
        publisher.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        if gateway.metric(&series).await.unwrap_or(0.0) - before >= ROUND as f64 {
            return;
        }
    }
    panic!("the gateway kept writing to a client that does not read");
}

/// Ten messages each on `p.lo`, `p.no` and `p.hi`, interleaved (`hi-0` … `lo-9`), and time for
/// the gateway to queue them.
async fn burst(publisher: &async_nats::Client) {
    for n in 0..10 {
        for class in ["lo", "no", "hi"] {
            publisher
                .publish(format!("p.{class}"), format!("{class}-{n}").into())
                .await
                .unwrap();
        }
    }
    publisher.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// The burst's messages still to be read: with room for 16, the ten high ones (first), the six
/// newest normal ones, no low one.
fn expected_burst() -> Vec<Seen> {
    let msg = |sid: &str, n| Seen::Msg {
        sid: sid.into(),
        data: format!("{sid}-{n}"),
    };
    (0..10)
        .map(|n| msg("hi", n))
        .chain((4..10).map(|n| msg("no", n)))
        .collect()
}

/// Whether `seen` holds all of the burst that can arrive.
fn burst_read(seen: &[Seen]) -> bool {
    seen.iter()
        .filter(|s| matches!(s, Seen::Msg { sid, .. } if sid != "fill"))
        .count()
        >= 16
}

/// Checks the order and drop rules on what the client read, and returns the drops reported
/// per subscription (filler included).
fn check_burst(seen: &[Seen]) -> BTreeMap<String, u64> {
    let first_burst = seen
        .iter()
        .position(|s| matches!(s, Seen::Msg { sid, .. } if sid != "fill"))
        .expect("burst messages");
    let burst: Vec<Seen> = seen[first_burst..]
        .iter()
        .filter(|s| matches!(s, Seen::Msg { .. }))
        .cloned()
        .collect();
    assert_eq!(
        burst,
        expected_burst(),
        "high first, then the newest normal; nothing else after them"
    );
    let mut dropped = BTreeMap::new();
    for event in seen {
        if let Seen::Dropped { sid, count } = event {
            *dropped.entry(sid.clone()).or_default() += count;
        }
    }
    assert!(
        seen[first_burst..]
            .iter()
            .all(|s| !matches!(s, Seen::Dropped { .. })),
        "notices come ahead of the messages: {seen:?}"
    );
    assert_eq!(dropped.get("lo"), Some(&10), "every low one: {dropped:?}");
    assert_eq!(
        dropped.get("no"),
        Some(&4),
        "the four oldest normal: {dropped:?}"
    );
    assert_eq!(dropped.get("hi"), None, "no high one: {dropped:?}");
    assert!(dropped.get("fill").is_some_and(|n| *n > 0));
    dropped
}

fn gateway_under_pressure(nats: &NatsServer) -> GatewayProcess {
    GatewayProcess::start(
        &nats.url(),
        &[
            "--subscription-queue",
            QUEUE,
            // The test decides when the client reads again.
            "--slow-client-stall-ms",
            "120000",
            "--ws-ping-interval-ms",
            "0",
        ],
    )
}

#[tokio::test]
async fn json_lines_high_first_low_dropped_first_and_a_high_reply_ahead() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.echo", Duration::ZERO).await;
    let publisher = nats.client().await;
    let gateway = gateway_under_pressure(&nats);
    let mut conn = gateway.json().await;
    for (sid, priority) in [("hi", "high"), ("no", "normal"), ("lo", "low")] {
        assert_eq!(
            conn.call(&format!(
                r#"{{"op":"subscribe","id":"{sid}","subject":"p.{sid}","priority":"{priority}"}}"#
            ))
            .await,
            json!({"id": sid, "ok": true})
        );
    }
    assert_eq!(
        conn.call(r#"{"op":"subscribe","id":"fill","subject":"fill"}"#)
            .await["ok"],
        true
    );
    fill_until_blocked(&gateway, &publisher, "uds").await;
    // Answers queue behind the blocked writer: a normal reply, pongs, then a high reply.
    conn.send(r#"{"id":"r-normal","subject":"svc.echo","data":"n"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1..=3 {
        conn.send(&format!(r#"{{"op":"ping","id":"p{n}"}}"#)).await;
    }
    conn.send(r#"{"id":"r-high","subject":"svc.echo","data":"h","priority":"high"}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    burst(&publisher).await;

    let mut seen = Vec::new();
    while !burst_read(&seen) || seen.iter().filter(|s| matches!(s, Seen::Pong(_))).count() < 3 {
        seen.push(seen_json(&conn.recv().await));
    }
    conn.assert_silent(Duration::from_millis(300)).await;
    let dropped = check_burst(&seen);
    let answers: Vec<&Seen> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Answer(_) | Seen::Pong(_)))
        .collect();
    let expected = ["r-high", "r-normal", "p1", "p2", "p3"].map(|id| match id {
        "p1" | "p2" | "p3" => Seen::Pong(id.into()),
        _ => Seen::Answer(id.into()),
    });
    assert_eq!(
        answers,
        expected.iter().collect::<Vec<_>>(),
        "the high reply came last and went first"
    );
    assert_eq!(
        gateway
            .metric(r#"ipc_gateway_dropped_messages_total{frontend="uds"}"#)
            .await,
        Some(dropped.values().sum::<u64>() as f64),
        "every drop is counted and reported"
    );
}

/// Sends a frame; `flags` carries the priority bits.
fn frame_with(kind: u8, id: u64, flags: u8, subject: &str, payload: &[u8]) -> Vec<u8> {
    frame(FrameParts {
        frame_type: kind,
        flags,
        id,
        subject: subject.as_bytes(),
        payload,
        ..FrameParts::default()
    })
    .to_vec()
}

#[tokio::test]
async fn binary_frames_honour_the_priority_bits_and_msg_frames_carry_them() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.echo", Duration::ZERO).await;
    let publisher = nats.client().await;
    let gateway = gateway_under_pressure(&nats);
    let mut conn = gateway.raw().await;
    // Ids 1–3: high, normal, low (bits 1, 0, 2); 4: the filler, normal.
    for (id, bits, subject) in [
        (1, 1, "p.hi"),
        (2, 0, "p.no"),
        (3, 2, "p.lo"),
        (4, 0, "fill"),
    ] {
        conn.send(&frame_with(frame_type::SUBSCRIBE, id, bits, subject, b""))
            .await;
        let ack = conn.recv().await;
        assert_eq!(
            (ack.header.frame_type, ack.header.id),
            (frame_type::ACK, id)
        );
    }
    fill_until_blocked(&gateway, &publisher, "uds").await;
    conn.send(&frame_with(frame_type::REQUEST, 10, 0, "svc.echo", b"n"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.send(&frame_with(frame_type::PING, 11, 0, "", b""))
        .await;
    conn.send(&frame_with(
        frame_type::REQUEST,
        12,
        1 | flag::RETRY,
        "svc.echo",
        b"h",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    burst(&publisher).await;

    let mut seen = Vec::new();
    while !burst_read(&seen) || !seen.contains(&Seen::Pong("11".into())) {
        let frame = conn.recv().await;
        let header = frame.header;
        seen.push(match header.frame_type {
            frame_type::MSG => {
                let expected_bits = match header.id {
                    1 => 1,
                    3 => 2,
                    _ => 0,
                };
                assert_eq!(
                    header.flags & flag::PRIORITY_MASK,
                    expected_bits,
                    "a MSG frame carries its subscription's class: {frame:?}"
                );
                let sid = sid_name(header.id);
                let data = if sid == "fill" {
                    String::new()
                } else {
                    String::from_utf8(frame.payload.to_vec()).unwrap()
                };
                Seen::Msg { sid, data }
            }
            frame_type::DROPPED => Seen::Dropped {
                sid: sid_name(header.id),
                count: header.param.into(),
            },
            frame_type::REPLY => Seen::Answer(header.id.to_string()),
            frame_type::PONG => Seen::Pong(header.id.to_string()),
            _ => panic!("unexpected {frame:?}"),
        });
    }
    check_burst(&seen);
    let answers: Vec<&Seen> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Answer(_) | Seen::Pong(_)))
        .collect();
    assert_eq!(
        answers,
        [
            &Seen::Answer("12".into()),
            &Seen::Answer("10".into()),
            &Seen::Pong("11".into())
        ]
    );
}

#[tokio::test]
async fn websocket_json_high_first_and_low_dropped_first() {
    let nats = NatsServer::start();
    let publisher = nats.client().await;
    let gateway = gateway_under_pressure(&nats);
    let mut ws: Ws = wsc::connect(&gateway, None).await.unwrap();
    for (sid, priority) in [("hi", "high"), ("no", "normal"), ("lo", "low")] {
        assert_eq!(
            wsc::call(
                &mut ws,
                &format!(
                    r#"{{"op":"subscribe","id":"{sid}","subject":"p.{sid}","priority":"{priority}"}}"#
                )
            )
            .await,
            json!({"id": sid, "ok": true})
        );
    }
    assert_eq!(
        wsc::call(
            &mut ws,
            r#"{"op":"subscribe","id":"fill","subject":"fill"}"#
        )
        .await["ok"],
        true
    );
    fill_until_blocked(&gateway, &publisher, "ws").await;
    burst(&publisher).await;
    let mut seen = Vec::new();
    while !burst_read(&seen) {
        seen.push(seen_json(&wsc::next_json(&mut ws).await));
    }
    check_burst(&seen);
}

#[tokio::test]
async fn an_invalid_priority_is_a_bad_request_and_the_connection_goes_on() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let mut conn = gateway.json().await;
    for (line, id, shown) in [
        (
            r#"{"op":"subscribe","id":"s","subject":"a","priority":"urgent"}"#,
            json!("s"),
            r#""urgent""#,
        ),
        (
            r#"{"id":2,"subject":"svc.echo","data":"x","priority":0}"#,
            json!(2),
            "0",
        ),
    ] {
        assert_eq!(
            conn.call(line).await,
            json!({"id": id, "ok": false, "error": {
                "code": "BAD_REQUEST",
                "message": format!(r#""priority" must be "high", "normal" or "low", not {shown}"#),
            }})
        );
    }
    // Nothing was opened or sent, and the connection still works, priority and all.
    assert_eq!(
        conn.call(r#"{"op":"subscribe","id":"s","subject":"a","priority":"low"}"#)
            .await,
        json!({"id":"s","ok":true})
    );
    assert_eq!(
        conn.call(r#"{"id":3,"subject":"svc.echo","data":"x","priority":"high"}"#)
            .await,
        json!({"id":3,"ok":true,"data":"x"})
    );

    let mut raw = gateway.raw().await;
    raw.send(&frame_with(frame_type::SUBSCRIBE, 7, 3, "a", b""))
        .await;
    let error = raw.recv().await;
    assert_eq!(
        (error.header.frame_type, error.header.id, error.code()),
        (frame_type::ERROR, 7, "BAD_REQUEST".to_owned())
    );
    assert!(
        String::from_utf8_lossy(&error.payload).contains("priority bits"),
        "{error:?}"
    );
    raw.send(&frame_with(frame_type::REQUEST, 8, 2, "svc.echo", b"low"))
        .await;
    let reply = raw.recv().await;
    assert_eq!(
        (reply.header.frame_type, reply.header.id, &reply.payload[..]),
        (frame_type::REPLY, 8, &b"low"[..])
    );
}
