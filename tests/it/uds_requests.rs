//! Request-reply, publish, subscribe and the default subject through the Unix socket, with a
//! real nats-server and the real gateway binary.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use ipc_gateway::client::Client;
use ipc_gateway::protocol::binary::{FrameParts, frame_type};
use serde_json::json;

#[tokio::test]
async fn json_request_gets_the_echoed_reply_with_a_null_id() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let mut conn = gateway.json().await;
    let reply = conn.call(r#"{"subject":"demo.echo","data":"hello"}"#).await;
    assert_eq!(reply, json!({"id": null, "ok": true, "data": "hello"}));
    let reply = conn
        .call(r#"{"op":"request","id":"r2","subject":"demo.echo","data":"x\ny","headers":{"X-Trace":"t1"},"timeout_ms":2000}"#)
        .await;
    assert_eq!(reply["id"], "r2");
    assert_eq!(reply["data"], "x\ny");
    assert_eq!(reply["headers"]["X-Trace"], "t1");
}

#[tokio::test]
async fn binary_data_travels_as_base64_both_ways() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let mut conn = gateway.json().await;
    let reply = conn
        .call(r#"{"id":1,"subject":"demo.echo","data_b64":"/wABAg=="}"#)
        .await;
    assert_eq!(reply, json!({"id": 1, "ok": true, "data_b64": "/wABAg=="}));
}

fn nc_available() -> bool {
    std::process::Command::new("nc").arg("-h").output().is_ok()
}

#[tokio::test]
async fn real_nc_that_half_closes_after_sending_still_gets_its_answer() {
    if !nc_available() {
        eprintln!("SKIPPED: nc is not installed (apt-get install netcat-openbsd)");
        return;
    }
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::from_millis(200)).await;
    let gateway = GatewayProcess::start(&nats.url(), NO_TRACE);
    let socket = gateway.socket.clone();
    // -N: shut down the write side at end of input, before the slow reply comes back.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '%s\\n%s\\n' '{{\"subject\":\"demo.echo\",\"data\":\"hello\"}}' '{{\"id\":2,\"subject\":\"demo.echo\",\"data\":\"again\"}}' | timeout 10 nc -N -U {}",
                socket.display()
            ))
            .output()
            .expect("run nc")
    })
    .await
    .unwrap();
    assert!(output.status.success(), "nc failed: {output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines.contains(&json!({"id": null, "ok": true, "data": "hello"})));
    assert!(lines.contains(&json!({"id": 2, "ok": true, "data": "again"})));
}

#[tokio::test]
async fn a_raw_client_that_half_closes_gets_every_pipelined_answer() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::from_millis(100)).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    for id in 0..50 {
        conn.send(&format!(
            r#"{{"id":{id},"subject":"demo.echo","data":"{id}"}}"#
        ))
        .await;
    }
    conn.shutdown_write().await;
    let mut seen = HashSet::new();
    while let Some(reply) = conn.recv_or_eof().await {
        assert_eq!(reply["ok"], true);
        assert_eq!(reply["data"], reply["id"].to_string());
        seen.insert(reply["id"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), 50);
}

#[tokio::test]
async fn a_thousand_pipelined_binary_requests_come_back_out_of_order_matched_by_id() {
    let nats = NatsServer::start();
    // Replies are delayed by different amounts, so later requests overtake earlier ones.
    let client = nats.client().await;
    let mut requests = client.subscribe("svc.jitter").await.unwrap();
    registered(&client).await;
    let service = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let client = client.clone();
            tokio::spawn(async move {
                let n: u64 = std::str::from_utf8(&message.payload)
                    .unwrap()
                    .parse()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis((n * 7919) % 23)).await;
                client
                    .publish(message.reply.unwrap(), message.payload)
                    .await
                    .unwrap();
            });
        }
    });
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.raw().await;
    conn.send(&numbered_requests(b"svc.jitter", 1000, 5000))
        .await;
    let mut order = Vec::new();
    for _ in 0..1000 {
        let reply = conn.recv().await;
        assert_eq!(reply.header.frame_type, frame_type::REPLY, "{reply:?}");
        assert_eq!(reply.payload, reply.header.id.to_string().as_bytes());
        order.push(reply.header.id);
    }
    let unique: HashSet<u64> = order.iter().copied().collect();
    assert_eq!(unique.len(), 1000);
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "replies came back in order"
    );
    service.abort();
}

/// Binary request frames with ids 1 to `count`, each carrying its id as text.
fn numbered_requests(subject: &[u8], count: u64, timeout_ms: u32) -> Vec<u8> {
    let mut batch = Vec::new();
    for id in 1..=count {
        let payload = id.to_string();
        batch.extend_from_slice(&frame(FrameParts {
            frame_type: frame_type::REQUEST,
            id,
            param: timeout_ms,
            subject,
            payload: payload.as_bytes(),
            ..FrameParts::default()
        }));
    }
    batch
}

/// Replies reach the gateway in one burst, far more than its NATS client's subscription buffer
/// holds: none may be lost (it used to be dropped from the full buffer and end in `TIMEOUT`).
#[tokio::test]
async fn a_burst_of_replies_larger_than_the_nats_buffer_answers_every_request() {
    // Within `max_inflight_per_connection` (1,024), so that all are out at once.
    const REQUESTS: u64 = 1000;
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut requests = client.subscribe("svc.burst").await.unwrap();
    registered(&client).await;
    // Holds every request until the last has come, then answers them all at once.
    let service = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(message) = requests.next().await {
            held.push(message);
            if held.len() as u64 == REQUESTS {
                break;
            }
        }
        for message in held {
            client
                .publish(message.reply.unwrap(), message.payload)
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
    });
    let gateway = GatewayProcess::start(&nats.url(), TINY_NATS_BUFFER);
    let mut conn = gateway.raw().await;
    conn.send(&numbered_requests(b"svc.burst", REQUESTS, 10_000))
        .await;
    let mut answered = HashSet::new();
    for _ in 0..REQUESTS {
        let reply = conn.recv().await;
        assert_eq!(reply.header.frame_type, frame_type::REPLY, "{reply:?}");
        assert_eq!(reply.payload, reply.header.id.to_string().as_bytes());
        answered.insert(reply.header.id);
    }
    assert_eq!(answered.len() as u64, REQUESTS);
    service.await.unwrap();
}

#[tokio::test]
async fn the_client_module_requests_publishes_and_subscribes() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let client = Client::connect(&gateway.socket).await.unwrap();
    let reply = client.request("demo.echo", b"hi", None).await.unwrap();
    assert_eq!(&reply.data[..], b"hi");
    let mut subscription = client.subscribe("events.*", None).await.unwrap();
    client.publish("events.one", b"payload").await.unwrap();
    match tokio::time::timeout(PATIENCE, subscription.events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        ipc_gateway::client::SubscriptionEvent::Message { subject, data, .. } => {
            assert_eq!(subject, "events.one");
            assert_eq!(&data[..], b"payload");
        }
        other => panic!("{other:?}"),
    }
    client.unsubscribe(subscription.sid).await.unwrap();
    client.ping().await.unwrap();
}

#[tokio::test]
async fn publish_reaches_nats_and_is_acked_only_when_it_has_an_id() {
    let nats = NatsServer::start();
    let observer = nats.client().await;
    let mut received = observer.subscribe("events.>").await.unwrap();
    registered(&observer).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    conn.send(r#"{"op":"publish","subject":"events.a","data":"x"}"#)
        .await;
    let ack = conn
        .call(r#"{"op":"publish","id":"p1","subject":"events.b","data":"y","headers":{"K":"v"}}"#)
        .await;
    assert_eq!(
        ack,
        json!({"id": "p1", "ok": true}),
        "no ack line for the publish without id"
    );
    let first = tokio::time::timeout(PATIENCE, received.next())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(PATIENCE, received.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.subject.as_str(), &first.payload[..]),
        ("events.a", &b"x"[..])
    );
    assert_eq!(
        (second.subject.as_str(), &second.payload[..]),
        ("events.b", &b"y"[..])
    );
    assert_eq!(second.headers.unwrap().get("K").unwrap().as_str(), "v");
}

#[tokio::test]
async fn subscribe_with_a_wildcard_delivers_interleaved_with_replies_until_unsubscribed() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let publisher = nats.client().await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    assert_eq!(
        conn.call(r#"{"op":"subscribe","id":"s1","subject":"events.>"}"#)
            .await,
        json!({"id": "s1", "ok": true})
    );
    publisher.publish("events.a.b", "one".into()).await.unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(
        conn.recv().await,
        json!({"op": "msg", "sid": "s1", "subject": "events.a.b", "data": "one"})
    );
    // A request on the same connection while subscribed.
    let reply = conn
        .call(r#"{"id":5,"subject":"demo.echo","data":"r"}"#)
        .await;
    assert_eq!(reply["id"], 5);
    assert_eq!(
        conn.call(r#"{"op":"unsubscribe","id":"s1"}"#).await,
        json!({"id": "s1", "ok": true})
    );
    publisher.publish("events.a.c", "two".into()).await.unwrap();
    publisher.flush().await.unwrap();
    conn.assert_silent(Duration::from_millis(300)).await;
    // The NATS subscription is gone, not just muted.
    let deadline = std::time::Instant::now() + PATIENCE;
    while nats.subscriptions_on("events.>").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the NATS subscription was left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = conn.call(r#"{"op":"unsubscribe","id":"s1"}"#).await;
    assert_eq!(again["error"]["code"], "BAD_REQUEST");
}

#[tokio::test]
async fn queue_group_subscribers_share_the_messages() {
    let nats = NatsServer::start();
    let publisher = nats.client().await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut a = gateway.json().await;
    let mut b = gateway.json().await;
    a.call(r#"{"op":"subscribe","id":1,"subject":"jobs","queue":"workers"}"#)
        .await;
    b.call(r#"{"op":"subscribe","id":1,"subject":"jobs","queue":"workers"}"#)
        .await;
    for n in 0..20 {
        publisher
            .publish("jobs", n.to_string().into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let (mut to_a, mut to_b) = (0, 0);
    while to_a + to_b < 20 {
        tokio::select! {
            line = a.recv() => { assert_eq!(line["op"], "msg"); to_a += 1; }
            line = b.recv() => { assert_eq!(line["op"], "msg"); to_b += 1; }
        }
    }
    a.assert_silent(Duration::from_millis(200)).await;
    b.assert_silent(Duration::from_millis(50)).await;
    let total = to_a + to_b;
    assert_eq!(total, 20, "each message goes to exactly one member");
}

#[tokio::test]
async fn an_object_without_op_or_subject_goes_whole_to_the_default_subject() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "legacy.tasks", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--default-subject", "legacy.tasks"]);
    let mut conn = gateway.json().await;
    let line = r#"{"task_id":"t1","payload":"hello"}"#;
    let reply = conn.call(line).await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["data"], line);

    let plain = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = plain.json().await;
    let reply = conn.call(line).await;
    assert_eq!(reply["error"]["code"], "BAD_REQUEST");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("default subject")
    );
}
