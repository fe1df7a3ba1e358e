//! Several gateways on a 3-node NATS cluster: clients on different gateways talk through
//! subjects, and the gateways ride out the loss of a node.

use std::time::Duration;

use crate::common::cluster::NatsCluster;
use crate::common::{GatewayProcess, RecordingService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_cluster_routes_its_nodes_and_has_jetstream() {
    let cluster = NatsCluster::start().await;
    cluster.wait_routed().await;
    let first = cluster.nodes[0].client().await;
    let third = cluster.nodes[2].client().await;
    let mut subscriber = third.subscribe("cluster.smoke").await.expect("subscribe");
    third.flush().await.expect("flush");
    // Interest crosses the route asynchronously: publish until the message arrives.
    let message = loop {
        first
            .publish("cluster.smoke", "hello".into())
            .await
            .expect("publish");
        if let Ok(Some(message)) = tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(&mut subscriber),
        )
        .await
        {
            break message;
        }
    };
    assert_eq!(&message.payload[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gateway_names_itself_in_status_headers_and_audit_records() {
    let cluster = NatsCluster::start().await;
    cluster.wait_routed().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let named = GatewayProcess::start(
        &cluster.nodes[0].url(),
        &[
            "--gateway-id",
            "gw-a",
            "--audit-file",
            audit.to_str().unwrap(),
        ],
    );
    let unnamed = GatewayProcess::start(&cluster.urls(), &[]);
    let mut service = RecordingService::start(&cluster.nodes[2], "cluster.whoami").await;

    // The service is on another node: its interest reaches node 0 over a route.
    let mut client = named.json().await;
    let reply = loop {
        let reply = client
            .call(r#"{"op":"request","id":1,"subject":"cluster.whoami","data":"hi"}"#)
            .await;
        if reply["ok"] == true {
            break reply;
        }
        assert_eq!(reply["error"]["code"], "NO_RESPONDERS", "{reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["data"], "hi");
    let received = service.next().await;
    let headers = received.headers.expect("identity headers");
    assert_eq!(
        headers.get("Ipc-Gateway-Id").map(|v| v.as_str()),
        Some("gw-a")
    );

    let (_, status) = named.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["gateway_id"], "gw-a");
    let (_, status) = unnamed.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let default_id = status["gateway_id"].as_str().unwrap().to_owned();
    assert!(
        default_id.ends_with(&format!("-{}", unnamed.pid())),
        "the default id is the host name and the pid: {default_id}"
    );

    drop(client);
    named.signal("TERM");
    let mut named = named;
    assert_eq!(named.wait_exit(), Some(0));
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(records.iter().any(|r| r["op"] == "request"));
    for record in &records {
        assert_eq!(record["gateway"], "gw-a", "{record}");
    }
}
