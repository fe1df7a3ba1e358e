//! What one client cannot do to another, end to end: forge answers to someone else's request,
//! break everyone's subscribes with a `>` subscriber, or take unbounded subscriptions.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use ipc_gateway::frontend::grpc::pb;
use serde_json::json;

#[tokio::test]
async fn subscribes_are_confirmed_quickly_with_a_nats_tap_on_everything() {
    let nats = NatsServer::start();
    let tap_client = nats.client().await;
    // A plain NATS client that sees (and would answer) every subject.
    let mut tap = tap_client.subscribe(">").await.unwrap();
    tap_client.flush().await.unwrap();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut conn = gateway.json().await;
    for id in 0..3 {
        let started = Instant::now();
        let ack = conn
            .call(
                &json!({"op":"subscribe","id":format!("s{id}"),"subject":format!("events.{id}")})
                    .to_string(),
            )
            .await;
        assert_eq!(ack, json!({"id":format!("s{id}"),"ok":true}));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "subscribe took {:?} with a tap on '>'",
            started.elapsed()
        );
    }
    let publisher = nats.client().await;
    publisher.publish("events.1", "x".into()).await.unwrap();
    publisher.flush().await.unwrap();
    let message = conn.recv().await;
    assert_eq!(message["op"], "msg");
    assert_eq!(message["sid"], "s1");
    // The tap saw the confirmation round trips, and could not disturb them.
    assert!(tap.next().await.is_some());
}

#[tokio::test]
async fn a_blind_spoof_of_a_guessed_reply_subject_never_answers_another_clients_request() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow", Duration::from_millis(800)).await;
    let gateway = GatewayProcess::start(&nats.url(), &["--nats-connections", "1"]);
    // The attacker learns one reply subject the way a NATS tap would (here: by watching
    // inboxes directly), then spoofs the next ones.
    let spy_client = nats.client().await;
    let mut spy = spy_client.subscribe("_INBOX.>").await.unwrap();
    spy_client.flush().await.unwrap();
    let mut victim = gateway.json().await;
    let first = victim
        .call(r#"{"id":1,"subject":"svc.slow","data":"one","timeout_ms":3000}"#)
        .await;
    assert_eq!(first["data"], "one");
    let seen = loop {
        let message = tokio::time::timeout(PATIENCE, spy.next())
            .await
            .unwrap()
            .unwrap();
        if message.payload.as_ref() == b"one" {
            break message.subject.to_string();
        }
    };
    let (prefix, token) = seen.rsplit_once('.').unwrap();
    let (token, _nonce) = token.split_once('_').expect("token_nonce");
    let token: u64 = token.parse().unwrap();
    victim
        .send(r#"{"id":2,"subject":"svc.slow","data":"two","timeout_ms":3000}"#)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Sequential tokens, with and without a nonce: none may answer request 2.
    for guess in token..token + 50 {
        for subject in [
            format!("{prefix}.{guess}"),
            format!("{prefix}.{guess}_{:016x}", 0u64),
            format!("{prefix}.{guess}_{:016x}", guess),
        ] {
            spy_client
                .publish(subject, "BLIND-SPOOF".into())
                .await
                .unwrap();
        }
    }
    spy_client.flush().await.unwrap();
    let second = victim.recv().await;
    assert_eq!(second["id"], 2);
    assert_eq!(second["data"], "two", "a spoof answered: {second}");
    let mismatches = gateway
        .metric("ipc_gateway_reply_mismatches_total")
        .await
        .unwrap_or(0.0);
    // The guesses that named request 2's live token with a wrong nonce were refused as
    // mismatches (the rest named no live request at all).
    assert!(mismatches >= 2.0, "{mismatches}");
}

#[tokio::test]
async fn subscriptions_per_connection_are_bounded_on_every_front_end() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--max-subscriptions-per-connection", "3"]);
    let mut conn = gateway.json().await;
    for id in 0..3 {
        let ack = conn
            .call(&json!({"op":"subscribe","id":id,"subject":"a.>"}).to_string())
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    let refused = conn
        .call(r#"{"op":"subscribe","id":9,"subject":"a.>"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "OVERLOADED", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max-subscriptions-per-connection")
    );
    let ack = conn.call(r#"{"op":"unsubscribe","id":0}"#).await;
    assert_eq!(ack["ok"], true);
    let again = conn
        .call(r#"{"op":"subscribe","id":9,"subject":"a.>"}"#)
        .await;
    assert_eq!(
        again["ok"], true,
        "room again after an unsubscribe: {again}"
    );
    // Another connection has its own allowance.
    let mut other = gateway.json().await;
    let ack = other
        .call(r#"{"op":"subscribe","id":1,"subject":"a.>"}"#)
        .await;
    assert_eq!(ack["ok"], true);

    // gRPC: a connection's Subscribe calls share the allowance.
    let mut client = gateway.grpc().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let stream = client
            .subscribe(pb::SubscribeRequest {
                subject: "b.>".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        streams.push(stream);
    }
    let status = client
        .subscribe(pb::SubscribeRequest {
            subject: "b.>".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    drop(streams);
}
