//! Several gateways on a 3-node NATS cluster: clients on different gateways talk through
//! subjects, and the gateways ride out the loss of a node.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::cluster::NatsCluster;
use crate::common::ws::{self, Ws};
use crate::common::{GatewayProcess, JsonConn, PATIENCE, RecordingService, http_get, registered};

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

/// Keeps breakers out of these tests: `NO_RESPONDERS` while interest crosses the routes, and
/// the `TIMEOUT`s of a failover, are what the tests look at, not what a breaker makes of them.
const NO_BREAKERS: [&str; 4] = [
    "--breaker-failures",
    "1000000",
    "--breaker-min-timeout-ms",
    "3600000",
];

/// A client of either front-end that speaks JSON envelopes.
enum Peer {
    Ws(Box<Ws>),
    Uds(JsonConn),
}

impl Peer {
    async fn send(&mut self, line: &str) {
        match self {
            Peer::Ws(socket) => ws::send(socket, line).await,
            Peer::Uds(conn) => conn.send(line).await,
        }
    }

    /// The next envelope; fails the test after `PATIENCE`.
    async fn recv(&mut self) -> Value {
        match self {
            Peer::Ws(socket) => ws::next_json(socket).await,
            Peer::Uds(conn) => conn.recv().await,
        }
    }

    /// The next envelope if one comes within `wait`.
    async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.recv()).await.ok()
    }

    async fn call(&mut self, line: &str) -> Value {
        self.send(line).await;
        self.recv().await
    }
}

/// Requests `subject` until a service answers: its interest reaches the asker's node over a
/// route some time after it subscribed, and until then the answer is `NO_RESPONDERS`.
async fn request_until_served(peer: &mut Peer, subject: &str, data: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    for id in 0.. {
        let request =
            json!({"op":"request","id":id,"subject":subject,"data":data,"timeout_ms":5000});
        let reply = peer.call(&request.to_string()).await;
        assert_eq!(reply["id"], id, "{reply}");
        if reply["ok"] == true {
            return reply;
        }
        assert_eq!(reply["error"]["code"], "NO_RESPONDERS", "{reply}");
        assert!(Instant::now() < deadline, "{subject} was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// `asker` requests `subject` and `answerer`, subscribed to it as `sid`, answers: it gets the
/// request as a `msg` with `reply_to` and publishes its answer there. Retried while the
/// subscription's interest is still on its way over the routes (`NO_RESPONDERS`).
async fn request_answered_by(asker: &mut Peer, answerer: &mut Peer, subject: &str, sid: &str) {
    let deadline = Instant::now() + PATIENCE;
    for id in 0.. {
        let request = json!({"op":"request","id":id,"subject":subject,"data":format!("q{id}"),"timeout_ms":5000});
        asker.send(&request.to_string()).await;
        let reply = tokio::select! {
            reply = asker.recv() => reply,
            message = answerer.recv() => {
                assert_eq!(message["op"], "msg", "{message}");
                assert_eq!(message["sid"], sid, "{message}");
                assert_eq!(message["subject"], subject, "{message}");
                assert_eq!(message["data"], format!("q{id}"), "{message}");
                let reply_to = message["reply_to"].as_str().expect("a request has reply_to");
                let answer = json!({"op":"publish","subject":reply_to,"data":format!("a{id}")});
                answerer.send(&answer.to_string()).await;
                asker.recv().await
            }
        };
        assert_eq!(reply["id"], id, "{reply}");
        if reply["ok"] == true {
            assert_eq!(reply["data"], format!("a{id}"), "{reply}");
            return;
        }
        assert_eq!(reply["error"]["code"], "NO_RESPONDERS", "{reply}");
        assert!(Instant::now() < deadline, "{sid} never got the request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `publisher` publishes on `subject` until `subscriber` (subscribed as `sid`) gets a message:
/// its interest crosses the routes asynchronously. Then one last publish, `last`, is read: it
/// must be the next thing after the copies of the first ones that were already on their way.
async fn publish_until_delivered(
    publisher: &mut Peer,
    subscriber: &mut Peer,
    subject: &str,
    sid: &str,
) {
    let deadline = Instant::now() + PATIENCE;
    let mut first = None;
    for n in 0.. {
        let publish = json!({"op":"publish","subject":subject,"data":format!("p{n}")});
        publisher.send(&publish.to_string()).await;
        if let Some(message) = subscriber.recv_within(Duration::from_millis(200)).await {
            first = Some(message);
            break;
        }
        assert!(Instant::now() < deadline, "{sid} never got a message");
    }
    let mut message = first.unwrap();
    let last = json!({"op":"publish","id":"last","subject":subject,"data":"last"});
    let ack = publisher.call(&last.to_string()).await;
    assert_eq!(ack, json!({"id":"last","ok":true}));
    loop {
        assert_eq!(message["op"], "msg", "{message}");
        assert_eq!(message["sid"], sid, "{message}");
        assert_eq!(message["subject"], subject, "{message}");
        if message["data"] == "last" {
            return;
        }
        assert!(
            message["data"].as_str().unwrap().starts_with('p'),
            "{message}"
        );
        message = subscriber.recv().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_and_a_socket_client_on_two_gateways_talk_through_the_cluster() {
    let cluster = NatsCluster::start().await;
    cluster.wait_routed().await;
    let first = GatewayProcess::start(
        &cluster.nodes[0].url(),
        &[&["--gateway-id", "gw-1"][..], &NO_BREAKERS].concat(),
    );
    let second = GatewayProcess::start(
        &cluster.nodes[1].url(),
        &[&["--gateway-id", "gw-2"][..], &NO_BREAKERS].concat(),
    );
    // A plain NATS service on the third node, which neither gateway is connected to.
    let mut service = RecordingService::start(&cluster.nodes[2], "cluster.svc.echo").await;
    let mut browser = Peer::Ws(Box::new(ws::connect(&first, None).await.expect("upgrade")));
    let mut program = Peer::Uds(second.json().await);

    // Both request the service on node 2: it sees which gateway and front-end each came from.
    let reply = request_until_served(&mut browser, "cluster.svc.echo", "from ws").await;
    assert_eq!(reply["data"], "from ws");
    let seen = service.next().await;
    let headers = seen.headers.expect("identity headers");
    assert_eq!(headers.get("Ipc-Gateway-Id").unwrap().as_str(), "gw-1");
    let reply = request_until_served(&mut program, "cluster.svc.echo", "from uds").await;
    assert_eq!(reply["data"], "from uds");
    let seen = service.next().await;
    let headers = seen.headers.expect("identity headers");
    assert_eq!(headers.get("Ipc-Gateway-Id").unwrap().as_str(), "gw-2");

    // Each client serves requests for the other, through the other's gateway and node.
    let ack = program
        .call(r#"{"op":"subscribe","id":"asks","subject":"cluster.ask.uds"}"#)
        .await;
    assert_eq!(ack, json!({"id":"asks","ok":true}));
    request_answered_by(&mut browser, &mut program, "cluster.ask.uds", "asks").await;
    let ack = browser
        .call(r#"{"op":"subscribe","id":"asks","subject":"cluster.ask.ws"}"#)
        .await;
    assert_eq!(ack, json!({"id":"asks","ok":true}));
    request_answered_by(&mut program, &mut browser, "cluster.ask.ws", "asks").await;

    // Publishes cross both ways.
    let ack = program
        .call(r#"{"op":"subscribe","id":"events","subject":"cluster.events.>"}"#)
        .await;
    assert_eq!(ack, json!({"id":"events","ok":true}));
    publish_until_delivered(
        &mut browser,
        &mut program,
        "cluster.events.from_ws",
        "events",
    )
    .await;
    let ack = browser
        .call(r#"{"op":"subscribe","id":"events","subject":"cluster.events.>"}"#)
        .await;
    assert_eq!(ack, json!({"id":"events","ok":true}));
    // The socket client's own subscription sees its publishes too.
    let publish = r#"{"op":"publish","id":"p","subject":"cluster.events.from_uds","data":"x"}"#;
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert_eq!(program.call(publish).await, json!({"id":"p","ok":true}));
        let own = program.recv().await;
        assert_eq!(own["data"], "x", "{own}");
        if let Some(message) = browser.recv_within(Duration::from_millis(200)).await {
            assert_eq!(message["op"], "msg", "{message}");
            assert_eq!(message["sid"], "events");
            assert_eq!(message["subject"], "cluster.events.from_uds");
            assert_eq!(message["data"], "x");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the WebSocket client never got a message"
        );
    }
}

/// How many other nodes' routes have told `node` of interest in exactly `subject`.
async fn routed_interest(cluster: &NatsCluster, node: usize, subject: &str) -> usize {
    let (_, body) = http_get(cluster.nodes[node].monitor_port, "/routez?subs=1").await;
    let Ok(routez) = serde_json::from_str::<Value>(&body) else {
        return 0;
    };
    let mut peers: Vec<&str> = routez["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|route| {
            route["subscriptions_list"]
                .as_array()
                .is_some_and(|subs| subs.iter().any(|s| s == subject))
        })
        .filter_map(|route| route["remote_name"].as_str())
        .collect();
    peers.sort_unstable();
    peers.dedup();
    peers.len()
}

/// Waits until `node` knows of interest in `subject` on `peers` other nodes.
async fn wait_routed_interest(cluster: &NatsCluster, node: usize, subject: &str, peers: usize) {
    let deadline = Instant::now() + PATIENCE;
    while routed_interest(cluster, node, subject).await < peers {
        assert!(
            Instant::now() < deadline,
            "node {node} never learnt of {subject} on {peers} other nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One instance of a service in a NATS queue group, as a plain NATS client: answers each
/// request with `<name>:<payload>` and counts what it answered.
struct Instance {
    answered: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Instance {
    async fn start(url: &str, subject: &str, queue: &str, name: usize) -> Instance {
        let client = async_nats::connect(url).await.expect("connect");
        let mut requests = client
            .queue_subscribe(subject.to_owned(), queue.to_owned())
            .await
            .expect("queue subscribe");
        registered(&client).await;
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let Some(reply) = request.reply else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut data = format!("{name}:").into_bytes();
                data.extend_from_slice(&request.payload);
                let _ = client.publish(reply, data.into()).await;
            }
        });
        Instance {
            answered,
            _task: task,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

/// Sends `count` pipelined requests on one socket connection and returns, per request, the
/// instance that answered it; every request must get exactly one answer, a reply to it.
async fn pipelined_requests(gateway: &GatewayProcess, subject: &str, count: usize) -> Vec<usize> {
    let mut conn = gateway.json().await;
    for id in 0..count {
        let request = json!({"op":"request","id":id,"subject":subject,"data":format!("r{id}"),"timeout_ms":5000});
        conn.send(&request.to_string()).await;
    }
    let mut by = vec![None; count];
    for _ in 0..count {
        let reply = conn.recv().await;
        assert_eq!(reply["ok"], true, "{reply}");
        let id = reply["id"].as_u64().expect("an id") as usize;
        let (instance, data) = reply["data"].as_str().unwrap().split_once(':').unwrap();
        assert_eq!(data, format!("r{id}"), "a reply went to the wrong request");
        assert!(by[id].is_none(), "request {id} was answered twice");
        by[id] = Some(instance.parse().unwrap());
    }
    conn.assert_silent(Duration::from_millis(300)).await;
    by.into_iter().map(Option::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_requests_through_two_gateways_spread_over_instances_on_every_node() {
    let cluster = NatsCluster::start().await;
    cluster.wait_routed().await;
    let subject = "cluster.work.resize";
    let mut instances = Vec::new();
    for (name, node) in cluster.nodes.iter().enumerate() {
        instances.push(Instance::start(&node.url(), subject, "workers", name).await);
    }
    // Every node knows of the members on the other two before the first request.
    for node in 0..3 {
        wait_routed_interest(&cluster, node, subject, 2).await;
    }
    let first = GatewayProcess::start(&cluster.nodes[0].url(), &NO_BREAKERS);
    let second = GatewayProcess::start(&cluster.nodes[1].url(), &NO_BREAKERS);

    let per_gateway = 300;
    let (from_first, from_second) = tokio::join!(
        pipelined_requests(&first, subject, per_gateway),
        pipelined_requests(&second, subject, per_gateway),
    );
    let mut replies = [0usize; 3];
    for instance in from_first.iter().chain(&from_second) {
        replies[*instance] += 1;
    }
    let answered: Vec<usize> = instances.iter().map(Instance::answered).collect();
    eprintln!("replies by instance {replies:?}; requests each instance answered {answered:?}");
    // One member of the group got each request: the instances answered as many as were sent.
    assert_eq!(answered.iter().sum::<usize>(), 2 * per_gateway);
    assert_eq!(answered, replies);
    for (instance, count) in answered.iter().enumerate() {
        assert!(
            *count > 0,
            "instance {instance} (on node {instance}) got none of {}",
            2 * per_gateway
        );
    }
}
