//! Fault tests: nats-server killed under load, clients that stop reading, rate limits and idle
//! connections. Every request must end in exactly one answer before its deadline, and other
//! clients must keep being served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use ipc_gateway::client::{Client, ClientError};
use serde_json::json;

async fn metric(gateway: &GatewayProcess, series: &str) -> f64 {
    gateway.metric(series).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_pipelined_load_every_request_is_answered_in_time_and_service_resumes() {
    let mut nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.echo", Duration::from_millis(2)).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut subscriber = gateway.json().await;
    subscriber
        .call(r#"{"op":"subscribe","id":"s","subject":"feed.>"}"#)
        .await;

    let deadline = Duration::from_millis(1500);
    let clients = 4;
    let per_client = 2000;
    let mut runs = Vec::new();
    for c in 0..clients {
        let client = Arc::new(Client::connect(&gateway.socket).await.unwrap());
        runs.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            for n in 0..per_client {
                let client = client.clone();
                calls.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let payload = format!("{c}-{n}");
                    let result = client
                        .request("svc.echo", payload.as_bytes(), Some(deadline))
                        .await;
                    (
                        started.elapsed(),
                        result.map(|reply| reply.data == payload.as_bytes()),
                    )
                }));
                if n % 200 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let mut outcomes = Vec::new();
            for call in calls {
                outcomes.push(call.await.unwrap());
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(80)).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.restart();

    let (mut ok, mut errors) = (0, std::collections::HashMap::new());
    for run in runs {
        for (waited, result) in run.await.unwrap() {
            assert!(
                waited < deadline + Duration::from_millis(700),
                "waited {waited:?}"
            );
            match result {
                Ok(matches) => {
                    assert!(matches, "a reply went to the wrong request");
                    ok += 1;
                }
                Err(ClientError::Gateway(error)) => *errors.entry(error.code).or_insert(0) += 1,
                Err(other) => panic!("the connection failed: {other}"),
            }
        }
    }
    let answered = ok + errors.values().sum::<usize>();
    assert_eq!(
        answered,
        clients * per_client,
        "every request got exactly one answer"
    );
    assert!(ok > 0, "some requests succeeded before the kill");
    eprintln!("ok {ok}, errors {errors:?}");

    // Without restarting the gateway, requests succeed again, and the subscription delivers.
    gateway.wait_status("/ready", 200).await;
    let client = Client::connect(&gateway.socket).await.unwrap();
    let started = Instant::now();
    loop {
        match client.request("svc.echo", b"again", Some(deadline)).await {
            Ok(reply) => {
                assert_eq!(&reply.data[..], b"again");
                break;
            }
            Err(_) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "requests never succeeded again"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let publisher = nats.client().await;
    let started = Instant::now();
    let mut gap = false;
    loop {
        publisher.publish("feed.x", "after".into()).await.unwrap();
        publisher.flush().await.unwrap();
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(200), subscriber.recv()).await
        {
            if line["op"] == "dropped" && line["gap"] == true {
                // The outage: what was published during it is lost, and the client is told.
                gap = true;
                continue;
            }
            assert_eq!(line["op"], "msg", "{line}");
            assert_eq!(line["data"], "after");
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the subscription never delivered again"
        );
    }
    assert!(gap, "the subscriber was not told of the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_others_are_not_slowed() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--slow-client-stall-ms",
            "500",
            "--subscription-queue",
            "64",
        ],
    );
    // The stalled client subscribes to a flood and never reads.
    let mut stalled = gateway.json().await;
    stalled
        .call(r#"{"op":"subscribe","id":"f","subject":"flood"}"#)
        .await;
    let publisher = nats.client().await;
    let flood = tokio::spawn(async move {
        let payload = bytes::Bytes::from(vec![b'z'; 8192]);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            for _ in 0..100 {
                let _ = publisher.publish("flood", payload.clone()).await;
            }
            let _ = publisher.flush().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Meanwhile another client's requests keep their usual latency.
    let mut other = gateway.json().await;
    let mut slowest = Duration::ZERO;
    for id in 0..40 {
        let started = Instant::now();
        let reply = other
            .call(&format!(
                r#"{{"id":{id},"subject":"demo.echo","data":"x"}}"#
            ))
            .await;
        assert_eq!(reply["ok"], true);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "another client waited {slowest:?}"
    );
    let deadline = Instant::now() + PATIENCE;
    while metric(
        &gateway,
        "ipc_gateway_disconnects_total{frontend=\"uds\",reason=\"slow_client\"}",
    )
    .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the stalled client was never disconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flood.abort();
    // Its memory stayed bounded: the gateway did not buffer the flood.
    assert!(
        gateway.rss_kib() < 200 * 1024,
        "RSS {} KiB",
        gateway.rss_kib()
    );
    drop(stalled);
}

#[tokio::test]
async fn the_rate_limit_answers_overloaded_and_recovers() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--rate-limit-requests-per-sec", "5"]);
    let mut conn = gateway.json().await;
    for id in 0..8 {
        conn.send(&format!(
            r#"{{"id":{id},"subject":"demo.echo","data":"x"}}"#
        ))
        .await;
    }
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..8 {
        let reply = conn.recv().await;
        if reply["ok"] == true {
            ok += 1;
        } else {
            assert_eq!(reply["error"]["code"], "OVERLOADED");
            assert!(
                reply["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("rate limit")
            );
            limited += 1;
        }
    }
    assert_eq!((ok, limited), (5, 3));
    assert_eq!(
        conn.call(r#"{"op":"ping"}"#).await,
        json!({"op":"pong"}),
        "pings are not limited"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let reply = conn
        .call(r#"{"id":"later","subject":"demo.echo","data":"y"}"#)
        .await;
    assert_eq!(reply["ok"], true, "tokens came back");
}

#[tokio::test]
async fn idle_connections_close_but_subscribers_stay() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--idle-timeout-ms", "300"]);
    let mut idle = gateway.json().await;
    let mut subscriber = gateway.json().await;
    subscriber
        .call(r#"{"op":"subscribe","id":"s","subject":"quiet"}"#)
        .await;
    let started = Instant::now();
    assert!(
        idle.recv_or_eof().await.is_none(),
        "the idle connection is closed"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        subscriber.call(r#"{"op":"ping"}"#).await,
        json!({"op":"pong"})
    );
    assert!(
        metric(
            &gateway,
            "ipc_gateway_disconnects_total{frontend=\"uds\",reason=\"idle\"}"
        )
        .await
            >= 1.0
    );

    // Off by default: a quiet connection stays.
    let plain = GatewayProcess::start(&nats.url(), &[]);
    let mut quiet = plain.json().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(quiet.call(r#"{"op":"ping"}"#).await, json!({"op":"pong"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_survive_a_lost_connection_within_their_deadline() {
    let mut nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(300)).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    for id in 0..10 {
        conn.send(&format!(
            r#"{{"id":"r{id}","subject":"svc.slow","data":"{id}","retry":true,"timeout_ms":4000}}"#
        ))
        .await;
        conn.send(&format!(
            r#"{{"id":"n{id}","subject":"svc.slow","data":"{id}","timeout_ms":4000}}"#
        ))
        .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    nats.restart();
    let (mut retried_ok, mut plain_unavailable) = (0, 0);
    for _ in 0..20 {
        let reply = conn.recv().await;
        let id = reply["id"].as_str().unwrap().to_owned();
        if let Some(n) = id.strip_prefix('r') {
            assert_eq!(reply["ok"], true, "an idempotent request failed: {reply}");
            assert_eq!(reply["data"], n);
            retried_ok += 1;
        } else {
            assert_eq!(reply["error"]["code"], "UNAVAILABLE", "{reply}");
            plain_unavailable += 1;
        }
    }
    assert_eq!((retried_ok, plain_unavailable), (10, 10));
    assert!(metric(&gateway, "ipc_gateway_retries_total").await >= 10.0);
}

/// Sends `signal` (`-STOP`, `-CONT`) to nats-server: a stopped server's connections stay open
/// and unread, so the gateway's NATS client fills its socket, then its queue.
fn signal_nats(nats: &NatsServer, signal: &str) {
    let pid = nats.pid().expect("nats-server runs").to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// When the NATS client's queue is full, a publish waits for room (the client's later
/// commands wait behind it, so messages still leave in order) and a request waits no longer
/// than its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_wait_for_room_in_nats_in_order_and_requests_not_past_their_deadline() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const COUNT: usize = 6000;
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--nats-connections", "1"]);
    let watcher = nats.client().await;
    let mut seen = watcher.subscribe("order.x").await.unwrap();
    registered(&watcher).await;
    // Sent over a second connection while the first one's publish waits.
    let mut asker = gateway.json().await;

    signal_nats(&nats, "-STOP");
    let stream = tokio::net::UnixStream::connect(&gateway.socket)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let padding = "x".repeat(16 << 10);
        for n in 0..COUNT {
            let line = format!(
                "{{\"op\":\"publish\",\"id\":{n},\"subject\":\"order.x\",\"data\":\"{n:06}{padding}\"}}\n"
            );
            write.write_all(line.as_bytes()).await.unwrap();
        }
        write
    });
    let mut lines = BufReader::new(read).lines();
    let ack = |line: Option<String>, n: usize| {
        let answer: serde_json::Value = serde_json::from_str(&line.expect("open")).unwrap();
        assert_eq!(answer, json!({"id":n,"ok":true}), "publish {n}");
    };
    // Acks come while the NATS client takes the messages, then stop: one waits for room.
    let mut acked = 0;
    while let Ok(line) = tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await {
        ack(line.unwrap(), acked);
        acked += 1;
    }
    assert!(
        acked > 0 && acked < COUNT,
        "{acked} of {COUNT} acked with nats-server stopped: expected some, not all"
    );

    let asked = Instant::now();
    let answer = asker
        .call(r#"{"op":"request","id":"r","subject":"order.svc","data":"?","timeout_ms":300}"#)
        .await;
    assert_eq!(answer["error"]["code"], "TIMEOUT", "{answer}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the request's answer came {:?} after it, with a 300 ms deadline",
        asked.elapsed()
    );

    signal_nats(&nats, "-CONT");
    for n in acked..COUNT {
        let line = tokio::time::timeout(PATIENCE, lines.next_line()).await;
        ack(line.expect("an ack in time").unwrap(), n);
    }
    let _write = writer.await.unwrap();
    for n in 0..COUNT {
        let message = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut seen))
            .await
            .expect("every publish reaches NATS")
            .unwrap();
        assert_eq!(&message.payload[..6], format!("{n:06}").as_bytes());
    }
}
