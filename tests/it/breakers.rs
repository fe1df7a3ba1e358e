//! Circuit breakers end to end: a subject nobody serves opens its own breaker and is refused
//! at once with a retry hint, while the rest of its group and other groups keep working; a
//! slow service opens its whole group, but a client's own short deadline does not; after the
//! cool-down one trial request closes the breaker again when the service is back.

use std::time::{Duration, Instant};

use crate::common::*;

/// A policy that lets these tests read the breaker groups on /status.
const STATUS_POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/open-with-status.toml"
);

async fn group_state(gateway: &GatewayProcess, group: &str) -> String {
    let body = gateway.get("/status").await.1;
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    status["breakers"]
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["group"] == group))
        .map(|g| g["state"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_failing_group_opens_others_keep_working_and_a_trial_closes_it() {
    let nats = NatsServer::start();
    let _other = spawn_echo(&nats.url(), "svc.other.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            STATUS_POLICY,
            "--breaker-failures",
            "3",
            "--breaker-cooldown-ms",
            "700",
            "--breaker-reconnect-grace-ms",
            "0",
        ],
    );
    let _list = spawn_echo(&nats.url(), "svc.orders.list", Duration::ZERO).await;
    let mut conn = gateway.json().await;
    for id in 0..3 {
        let reply = conn
            .call(&format!(r#"{{"id":{id},"subject":"svc.orders.create"}}"#))
            .await;
        assert_eq!(reply["error"]["code"], "NO_RESPONDERS");
    }
    let started = Instant::now();
    let refused = conn
        .call(r#"{"id":"x","subject":"svc.orders.create"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "CIRCUIT_OPEN", "{refused}");
    let hint = refused["error"]["retry_after_ms"]
        .as_u64()
        .expect("a retry hint");
    assert!(
        hint > 0 && hint <= 840,
        "the cool-down left, plus up to 20 % jitter: {hint}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    assert_eq!(group_state(&gateway, "svc.orders.create").await, "OPEN");
    assert_eq!(group_state(&gateway, "svc.orders").await, "CLOSED");
    assert_eq!(
        gateway.metric("ipc_gateway_breakers{state=\"open\"}").await,
        Some(1.0)
    );

    // Nobody on svc.orders.create says nothing about the rest of its group.
    let reply = conn
        .call(r#"{"id":"l","subject":"svc.orders.list","data":"listed"}"#)
        .await;
    assert_eq!(reply["data"], "listed", "{reply}");

    // Another group is not affected.
    let reply = conn
        .call(r#"{"id":"o","subject":"svc.other.echo","data":"fine"}"#)
        .await;
    assert_eq!(reply["data"], "fine");

    // The service comes back; after the cool-down one trial closes the breaker.
    let _orders = spawn_echo(&nats.url(), "svc.orders.create", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let trial = conn
        .call(r#"{"id":"t","subject":"svc.orders.create","data":"back"}"#)
        .await;
    assert_eq!(trial["data"], "back", "{trial}");
    assert_eq!(group_state(&gateway, "svc.orders.create").await, "CLOSED");
    assert_eq!(
        gateway.metric("ipc_gateway_breakers{state=\"open\"}").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn a_failed_trial_opens_the_breaker_again_and_bad_requests_do_not_count() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            STATUS_POLICY,
            "--breaker-failures",
            "2",
            "--breaker-cooldown-ms",
            "300",
            "--breaker-reconnect-grace-ms",
            "0",
        ],
    );
    let mut conn = gateway.json().await;
    // A client's mistakes say nothing about the service.
    for _ in 0..5 {
        let reply = conn
            .call(r#"{"subject":"svc.pay.do","data_b64":"%%%"}"#)
            .await;
        assert_eq!(reply["error"]["code"], "BAD_REQUEST");
    }
    for _ in 0..2 {
        conn.call(r#"{"subject":"svc.pay.do"}"#).await;
    }
    assert_eq!(group_state(&gateway, "svc.pay.do").await, "OPEN");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let trial = conn.call(r#"{"subject":"svc.pay.do"}"#).await;
    assert_eq!(
        trial["error"]["code"], "NO_RESPONDERS",
        "the trial goes through and fails"
    );
    let refused = conn.call(r#"{"subject":"svc.pay.do"}"#).await;
    assert_eq!(refused["error"]["code"], "CIRCUIT_OPEN");
}

#[tokio::test]
async fn binary_clients_get_circuit_open_with_the_hint_in_the_param_field() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            STATUS_POLICY,
            "--breaker-failures",
            "1",
            "--breaker-cooldown-ms",
            "5000",
            "--breaker-reconnect-grace-ms",
            "0",
        ],
    );
    let client = ipc_gateway::client::Client::connect(&gateway.socket)
        .await
        .unwrap();
    let first = client.request("svc.x.y", b"", None).await.err().unwrap();
    assert_eq!(
        first.code(),
        Some(ipc_gateway::protocol::ErrorCode::NoResponders)
    );
    match client.request("svc.x.y", b"", None).await {
        Err(ipc_gateway::client::ClientError::Gateway(error)) => {
            assert_eq!(error.code, ipc_gateway::protocol::ErrorCode::CircuitOpen);
            let hint = error.retry_after_ms.expect("a retry hint");
            assert!(hint > 4000 && hint <= 6000, "{hint}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn no_responders_just_after_nats_comes_back_do_not_open_a_breaker() {
    let mut nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            STATUS_POLICY,
            "--breaker-failures",
            "2",
            "--breaker-reconnect-grace-ms",
            "3000",
        ],
    );
    let mut conn = gateway.json().await;
    // Right after start: the services may still be connecting.
    for id in 0..5 {
        let answer = conn
            .call(&format!(r#"{{"id":{id},"subject":"svc.late.work"}}"#))
            .await;
        assert_eq!(answer["error"]["code"], "NO_RESPONDERS", "{answer}");
    }
    assert_eq!(group_state(&gateway, "svc.late").await, "CLOSED");
    assert_eq!(
        group_state(&gateway, "svc.late.work").await,
        "",
        "nothing counted"
    );
    // After the grace they count (against the exact subject).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for id in 5..7 {
        conn.call(&format!(r#"{{"id":{id},"subject":"svc.late.work"}}"#))
            .await;
    }
    assert_eq!(group_state(&gateway, "svc.late.work").await, "OPEN");
    // A NATS restart starts a new grace: a service that is not back yet is not held to it.
    nats.kill();
    nats.restart();
    gateway.wait_status("/ready", 200).await;
    for id in 10..15 {
        let answer = conn
            .call(&format!(r#"{{"id":{id},"subject":"svc.other.work"}}"#))
            .await;
        assert_eq!(answer["error"]["code"], "NO_RESPONDERS", "{answer}");
    }
    assert_eq!(group_state(&gateway, "svc.other").await, "CLOSED");
    assert_eq!(group_state(&gateway, "svc.other.work").await, "");
}

#[tokio::test]
async fn a_slow_service_opens_its_group_but_an_impatient_client_does_not() {
    let nats = NatsServer::start();
    let _slow = spawn_echo(&nats.url(), "svc.slow.a", Duration::from_secs(2)).await;
    let _fast = spawn_echo(&nats.url(), "svc.slow.b", Duration::ZERO).await;
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            STATUS_POLICY,
            "--breaker-failures",
            "2",
            "--breaker-min-timeout-ms",
            "300",
            "--breaker-reconnect-grace-ms",
            "0",
        ],
    );
    let mut conn = gateway.json().await;
    // Deadlines shorter than breaker_min_timeout_ms accuse nobody, however many.
    for id in 0..5 {
        let reply = conn
            .call(&format!(
                r#"{{"id":{id},"subject":"svc.slow.a","timeout_ms":50}}"#
            ))
            .await;
        assert_eq!(reply["error"]["code"], "TIMEOUT", "{reply}");
    }
    assert_eq!(group_state(&gateway, "svc.slow").await, "CLOSED");
    let reply = conn
        .call(r#"{"id":"b","subject":"svc.slow.b","data":"ok"}"#)
        .await;
    assert_eq!(reply["data"], "ok");
    // Requests that waited long enough do: the whole group opens.
    for id in 10..12 {
        let reply = conn
            .call(&format!(
                r#"{{"id":{id},"subject":"svc.slow.a","timeout_ms":400}}"#
            ))
            .await;
        assert_eq!(reply["error"]["code"], "TIMEOUT", "{reply}");
    }
    assert_eq!(group_state(&gateway, "svc.slow").await, "OPEN");
    let refused = conn.call(r#"{"id":"c","subject":"svc.slow.b"}"#).await;
    assert_eq!(refused["error"]["code"], "CIRCUIT_OPEN", "{refused}");
}
