//! Shared subscriptions: clients of one gateway subscribed to the same (subject, queue group)
//! share one NATS subscription, each still getting every message (or, in a queue group, each
//! message going to one member across gateway and direct NATS subscribers), and what the NATS
//! client drops reaches every affected client as a `dropped` count.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::common::{GatewayProcess, JsonConn, NatsServer, PATIENCE, TINY_NATS_BUFFER, ws};

/// Waits until nats-server holds `expected` subscriptions on `subject`.
async fn wait_subscriptions(nats: &NatsServer, subject: &str, expected: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = nats.subscriptions_on(subject).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nats-server holds {now} subscriptions on {subject}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The payloads of the next `n` messages on `conn`, as text.
async fn payloads(conn: &mut JsonConn, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let message = conn.recv().await;
        assert_eq!(message["op"], "msg", "{message}");
        seen.push(message["data"].as_str().unwrap_or_default().to_owned());
    }
    seen
}

#[tokio::test]
async fn clients_on_one_subject_share_one_nats_subscription_and_each_gets_every_message() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conns = Vec::new();
    for n in 0..3 {
        let mut conn = gateway.json().await;
        let ack = conn
            .call(&format!(
                r#"{{"op":"subscribe","id":"s{n}","subject":"fan.a"}}"#
            ))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
        conns.push(conn);
    }
    let mut browser = ws::connect(&gateway, None).await.expect("websocket");
    let ack = ws::call(
        &mut browser,
        r#"{"op":"subscribe","id":"w","subject":"fan.a"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    // Another pattern is another NATS subscription, even when it overlaps.
    let ack = conns[0]
        .call(r#"{"op":"subscribe","id":"wild","subject":"fan.*"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    wait_subscriptions(&nats, "fan.a", 1).await;
    wait_subscriptions(&nats, "fan.*", 1).await;
    assert_eq!(
        gateway.metric("ipc_gateway_nats_subscriptions").await,
        Some(2.0)
    );
    assert_eq!(
        gateway
            .metric("ipc_gateway_subscriptions{frontend=\"uds\"}")
            .await,
        Some(4.0)
    );

    let publisher = nats.client().await;
    for n in 0..5 {
        publisher
            .publish("fan.a", format!("m{n}").into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let expected: Vec<String> = (0..5).map(|n| format!("m{n}")).collect();
    for conn in &mut conns[1..] {
        assert_eq!(payloads(conn, 5).await, expected);
    }
    // The first client holds both subscriptions: each message once under each sid.
    let mut by_sid: Vec<(String, String)> = Vec::new();
    while by_sid.len() < 10 {
        let message = conns[0].recv().await;
        by_sid.push((
            message["sid"].as_str().unwrap().to_owned(),
            message["data"].as_str().unwrap().to_owned(),
        ));
    }
    for sid in ["s0", "wild"] {
        let got: Vec<&String> = by_sid
            .iter()
            .filter(|(s, _)| s == sid)
            .map(|(_, data)| data)
            .collect();
        assert_eq!(got, expected.iter().collect::<Vec<_>>(), "sid {sid}");
    }
    for n in 0..5 {
        let message = ws::next_json(&mut browser).await;
        assert_eq!(message["sid"], "w", "{message}");
        assert_eq!(message["data"], format!("m{n}"), "{message}");
    }

    // Leaving keeps the NATS subscription while anyone is left on it...
    for (n, conn) in conns.iter_mut().enumerate().skip(1) {
        let ack = conn
            .call(&format!(r#"{{"op":"unsubscribe","id":"s{n}"}}"#))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    drop(browser);
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_subscriptions(&nats, "fan.a", 1).await;
    publisher.publish("fan.a", "last".into()).await.unwrap();
    publisher.flush().await.unwrap();
    let mut last = Vec::new();
    while last.len() < 2 {
        let message = conns[0].recv().await;
        last.push(message["sid"].as_str().unwrap().to_owned());
        assert_eq!(message["data"], "last", "{message}");
    }
    last.sort();
    assert_eq!(last, ["s0", "wild"]);
    for conn in &mut conns[1..] {
        conn.assert_silent(Duration::from_millis(200)).await;
    }
    // ...and the last one out removes it.
    let ack = conns[0].call(r#"{"op":"unsubscribe","id":"s0"}"#).await;
    assert_eq!(ack["ok"], true, "{ack}");
    wait_subscriptions(&nats, "fan.a", 0).await;
    wait_subscriptions(&nats, "fan.*", 1).await;
    drop(conns);
    wait_subscriptions(&nats, "fan.*", 0).await;
    assert_eq!(
        gateway.metric("ipc_gateway_nats_subscriptions").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn a_queue_group_gives_each_message_to_one_member_across_gateway_and_direct_subscribers() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let direct = nats.client().await;
    let mut direct_member = direct
        .queue_subscribe("jobs", "workers".into())
        .await
        .unwrap();
    direct.flush().await.unwrap();
    let mut members = Vec::new();
    for n in 0..2 {
        let mut conn = gateway.json().await;
        let ack = conn
            .call(&format!(
                r#"{{"op":"subscribe","id":"q{n}","subject":"jobs","queue":"workers"}}"#
            ))
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
        members.push(conn);
    }
    // One queue subscription for the gateway's two members, one for the direct client.
    wait_subscriptions(&nats, "jobs", 2).await;

    let total = 200;
    for n in 0..total {
        direct.publish("jobs", format!("{n}").into()).await.unwrap();
    }
    direct.flush().await.unwrap();

    let mut seen: Vec<String> = Vec::new();
    let mut per_member = [0usize; 3];
    let [first, second] = &mut members[..] else {
        unreachable!()
    };
    let deadline = Instant::now() + PATIENCE;
    while seen.len() < total {
        assert!(
            Instant::now() < deadline,
            "only {} of {total} jobs arrived",
            seen.len()
        );
        tokio::select! {
            message = direct_member.next() => {
                let message = message.expect("the direct member's subscription ended");
                per_member[2] += 1;
                seen.push(String::from_utf8_lossy(&message.payload).into_owned());
            }
            message = first.recv() => {
                per_member[0] += 1;
                seen.push(message["data"].as_str().unwrap().to_owned());
            }
            message = second.recv() => {
                per_member[1] += 1;
                seen.push(message["data"].as_str().unwrap().to_owned());
            }
        }
    }
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), total, "a job was delivered twice: {seen:?}");
    assert!(
        per_member[0] > 0 && per_member[1] > 0 && per_member[2] > 0,
        "every member gets work: {per_member:?}"
    );
    // The gateway takes turns between its members.
    assert!(
        per_member[0].abs_diff(per_member[1]) <= 1,
        "gateway members alternate: {per_member:?}"
    );
    for member in &mut members {
        member.assert_silent(Duration::from_millis(200)).await;
    }
}

/// Sums what one client saw on subscription `sid`: messages, and drops it was told about.
async fn count_until(conn: &mut JsonConn, sid: &str, total: u64) -> (u64, u64) {
    let (mut messages, mut dropped) = (0, 0);
    let deadline = Instant::now() + PATIENCE;
    while messages + dropped < total {
        assert!(
            Instant::now() < deadline,
            "{messages} messages and {dropped} dropped of {total}: the rest were lost silently"
        );
        let Ok(event) = tokio::time::timeout(Duration::from_millis(500), conn.recv()).await else {
            continue;
        };
        assert_eq!(event["sid"], sid, "{event}");
        match event["op"].as_str() {
            Some("msg") => messages += 1,
            Some("dropped") => dropped += event["count"].as_u64().unwrap(),
            _ => panic!("unexpected {event}"),
        }
    }
    assert_eq!(messages + dropped, total, "more than was published");
    (messages, dropped)
}

/// The gateway's metric of messages its NATS client dropped says `dropped`.
async fn assert_slow_consumer_metric(gateway: &GatewayProcess, dropped: u64) {
    let slow: Value = gateway
        .metric("ipc_gateway_nats_slow_consumer_total")
        .await
        .map(Value::from)
        .unwrap_or_default();
    assert_eq!(
        slow.as_f64(),
        Some(dropped as f64),
        "the metric counts them"
    );
}

/// Publishes `0`..`total` on `burst` as fast as the client goes; returns the publisher.
async fn publish_burst(nats: &NatsServer, total: u64) -> async_nats::Client {
    let publisher = nats.client().await;
    for n in 0..total {
        publisher
            .publish("burst", format!("{n}").into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    publisher
}

#[tokio::test]
async fn messages_the_nats_client_drops_reach_every_subscriber_as_dropped_counts() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), TINY_NATS_BUFFER);
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut conn = gateway.json().await;
        let ack = conn
            .call(r#"{"op":"subscribe","id":"b","subject":"burst"}"#)
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
        conns.push(conn);
    }
    let total = 100u64;
    let publisher = publish_burst(&nats, total).await;
    let mut seen = Vec::new();
    for conn in &mut conns {
        seen.push(count_until(conn, "b", total).await);
    }
    assert!(
        seen.iter().all(|(_, dropped)| *dropped > 0),
        "the burst did not overflow the NATS client's buffer, so this test proves nothing: {seen:?}"
    );
    assert_eq!(seen[0], seen[1], "both clients lost the same messages");
    assert_slow_consumer_metric(&gateway, seen[0].1).await;
    // The subscription goes on working.
    publisher.publish("burst", "after".into()).await.unwrap();
    publisher.flush().await.unwrap();
    for conn in &mut conns {
        let message = conn.recv().await;
        assert_eq!(message["data"], "after", "{message}");
    }
}

#[tokio::test]
async fn a_long_burst_the_nats_client_drops_is_counted_to_the_last_message() {
    // async-nats reports each message it drops on a bounded channel of 128 events, and once
    // that was full the rest went uncounted: thousands dropped at once must still add up.
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), TINY_NATS_BUFFER);
    let mut conn = gateway.json().await;
    let ack = conn
        .call(r#"{"op":"subscribe","id":"b","subject":"burst"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let total = 5_000u64;
    publish_burst(&nats, total).await;
    let (messages, dropped) = count_until(&mut conn, "b", total).await;
    assert!(
        dropped > 128,
        "fewer drops than the event channel holds, so this test proves nothing: {messages} messages, {dropped} dropped"
    );
    assert_slow_consumer_metric(&gateway, dropped).await;
}

#[tokio::test]
async fn an_overloaded_nats_buffer_is_logged_once_per_period_not_once_per_burst() {
    // Every burst overflows the buffer again; the members are told each time, the log once.
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start_logged(&nats.url(), TINY_NATS_BUFFER, &[]);
    let mut conn = gateway.json().await;
    let ack = conn
        .call(r#"{"op":"subscribe","id":"b","subject":"burst"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let mut dropped_total = 0;
    for _ in 0..5 {
        publish_burst(&nats, 2_000).await;
        let (_, dropped) = count_until(&mut conn, "b", 2_000).await;
        dropped_total += dropped;
    }
    assert!(dropped_total > 0, "no burst overflowed the buffer");
    assert_slow_consumer_metric(&gateway, dropped_total).await;
    let lines = gateway
        .log()
        .lines()
        .filter(|line| line.contains("NATS subscription buffer full"))
        .count();
    assert_eq!(lines, 1, "{}", gateway.log());
}

/// Reads until a `dropped` notice with `gap` arrives on `conn` (messages before it are fine).
async fn wait_gap(conn: &mut JsonConn, sid: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no gap notice");
        let Ok(event) = tokio::time::timeout(Duration::from_millis(500), conn.recv()).await else {
            continue;
        };
        assert_eq!(event["sid"], sid, "{event}");
        if event["op"] == "dropped" && event["gap"] == true {
            return event;
        }
        assert_eq!(event["op"], "msg", "{event}");
    }
}

/// The slow consumers nats-server has cut off so far (its monitoring port's `/varz`).
async fn slow_consumers(nats: &NatsServer) -> u64 {
    let (_, body) = crate::common::http_get(nats.monitor_port, "/varz").await;
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|varz| varz["slow_consumers"].as_u64())
        .unwrap_or(0)
}

/// Publishes `data` until `conn` gets it (the gateway may still be resubscribing).
async fn delivered_again(nats: &NatsServer, conn: &mut JsonConn, subject: &str) {
    let publisher = nats.client().await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the subscription never delivered again"
        );
        publisher
            .publish(subject.to_owned(), "again".into())
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), conn.recv()).await {
            assert_eq!(event["op"], "msg", "{event}");
            if event["data"] == "again" {
                return;
            }
        }
    }
}

#[tokio::test]
async fn a_nats_outage_reaches_subscribers_as_a_gap_and_the_subscription_goes_on() {
    let mut nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--nats-connections", "1"]);
    let mut conn = gateway.json().await;
    let ack = conn
        .call(r#"{"op":"subscribe","id":"g","subject":"outage.feed"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    nats.restart();
    let notice = wait_gap(&mut conn, "g").await;
    assert_eq!(notice["count"], 0, "{notice}");
    delivered_again(&nats, &mut conn, "outage.feed").await;
    let gaps = gateway.metric("ipc_gateway_nats_gaps_total").await;
    assert!(gaps >= Some(1.0), "{gaps:?}");
}

#[tokio::test]
async fn a_gateway_cut_off_by_nats_server_as_a_slow_consumer_tells_its_subscribers() {
    // nats-server cuts a connection that has more than this waiting for it.
    let nats = NatsServer::start_with_config("max_pending: 262144\nmax_payload: 65536\n");
    let gateway = GatewayProcess::start(&nats.url(), &["--nats-connections", "1"]);
    let mut conn = gateway.json().await;
    let ack = conn
        .call(r#"{"op":"subscribe","id":"s","subject":"firehose"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    // A gateway that does not read (stopped) while messages are published to it, a MiB at a
    // time, until nats-server has cut it. How much that takes depends on how much the
    // kernel's socket buffers hold for it first (loopback TCP buffers grow to several MiB).
    gateway.signal("STOP");
    let publisher = nats.client().await;
    let chunk = bytes::Bytes::from(vec![b'x'; 32 * 1024]);
    let mut cut = false;
    for _ in 0..256 {
        for _ in 0..32 {
            publisher.publish("firehose", chunk.clone()).await.unwrap();
        }
        publisher.flush().await.unwrap();
        if slow_consumers(&nats).await > 0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "nats-server never cut the stopped gateway off");
    gateway.signal("CONT");
    wait_gap(&mut conn, "s").await;
    delivered_again(&nats, &mut conn, "firehose").await;
}
