//! The NATS pool replaces connections through deadpool, and the subscriptions and requests of
//! connected clients carry on across the replacement. The gateway runs in-process here so the
//! test can order a replacement directly.

use std::time::Duration;

use crate::common::*;
use ipc_gateway::Config;
use ipc_gateway::core::Gateway;
use ipc_gateway::frontend::uds::{self, UdsListener};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_every_pool_connection_keeps_clients_subscriptions_and_requests_working() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        socket: dir.path().join("gw.sock"),
        nats_url: nats.url(),
        nats_connections: 2,
        ..Config::default()
    };
    let gateway = Gateway::new(config.clone()).await.unwrap();
    let listener = UdsListener::bind(&config.socket, config.socket_mode)
        .await
        .unwrap();
    tokio::spawn(uds::serve(gateway.clone(), listener));
    let publisher = nats.client().await;

    let mut conn = JsonConn::connect(&config.socket).await;
    assert_eq!(
        conn.call(r#"{"op":"subscribe","id":"s","subject":"feed.>"}"#)
            .await,
        json!({"id":"s","ok":true})
    );
    for slot in 0..2 {
        gateway.replace_connection(slot).await.unwrap();
    }
    assert_eq!(gateway.readiness().nats_pool_size, 2);
    assert_eq!(
        gateway.readiness().nats_connected,
        2,
        "the successors are connected"
    );
    // The subscription comes back on a new connection by itself, and the client is told
    // that messages published during the move may be lost.
    let mut delivered = false;
    let mut gap = false;
    for attempt in 0..100 {
        publisher
            .publish("feed.a", format!("{attempt}").into())
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        while let Ok(line) = tokio::time::timeout(Duration::from_millis(100), conn.recv()).await {
            assert_eq!(line["sid"], "s", "{line}");
            match line["op"].as_str() {
                Some("dropped") if line["gap"] == true => gap = true,
                Some("msg") => delivered = true,
                _ => panic!("unexpected {line}"),
            }
        }
        if delivered {
            break;
        }
    }
    assert!(
        delivered,
        "the subscription did not come back after the replacement"
    );
    assert!(gap, "the client was not told of the gap");
    // And requests go through the new connections.
    let reply = conn
        .call(r#"{"id":1,"subject":"demo.echo","data":"after"}"#)
        .await;
    assert_eq!(reply["data"], "after", "{reply}");
    // The retired connections close: exactly one NATS subscription is left.
    let deadline = std::time::Instant::now() + PATIENCE;
    while nats.subscriptions_on("feed.>").await != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "old subscriptions were left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
