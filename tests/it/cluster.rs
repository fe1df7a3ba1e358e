//! Several gateways on a 3-node NATS cluster: clients on different gateways talk through
//! subjects, queue groups spread over the nodes, and the gateways ride out a node that is
//! killed or hangs (every request answered exactly once, subscribers told of the gap).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    let records = crate::common::audit_records(&audit);
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

/// Which of the nodes `among` hold a client connection named `name` (from their `/connz`).
async fn nodes_holding(cluster: &NatsCluster, name: &str, among: &[usize]) -> Vec<usize> {
    let mut holding = Vec::new();
    for &index in among {
        let (_, body) = http_get(cluster.nodes[index].monitor_port, "/connz?limit=1024").await;
        let connz: Value = serde_json::from_str(&body).unwrap_or_default();
        let held = connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|conn| conn["name"] == name);
        if held {
            holding.push(index);
        }
    }
    holding
}

/// Waits until exactly one of the nodes `among` holds the client connection `name`, and
/// returns it.
async fn node_holding(cluster: &NatsCluster, name: &str, among: &[usize]) -> usize {
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        if let [node] = nodes_holding(cluster, name, among).await[..] {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "none of nodes {among:?} holds {name}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one load connection saw: each request's id and when it was sent, and each answer's
/// id, when it came and its error code (`None` for a reply).
#[derive(Default)]
struct LoadRun {
    sent: Vec<(u64, Instant)>,
    answers: Vec<(u64, Instant, Option<String>)>,
}

const FAILOVER_TIMEOUT_MS: u64 = 2000;

/// One socket client sending a request every `pace` until `stop`, reading answers as they
/// come; after `stop` it reads until every request is answered and then 500 ms more, to see
/// any second answer.
async fn request_load(
    gateway: &GatewayProcess,
    connection: u64,
    subject: &str,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> LoadRun {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::UnixStream::connect(&gateway.socket)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut run = LoadRun::default();
    let mut tick = tokio::time::interval(pace);
    let mut stopped: Option<Instant> = None;
    let mut quiet_from: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick(), if stopped.is_none() => {
                if stop.load(Ordering::SeqCst) {
                    stopped = Some(Instant::now());
                    continue;
                }
                let id = connection * 1_000_000 + run.sent.len() as u64;
                let request = json!({"op":"request","id":id,"subject":subject,"data":id.to_string(),"timeout_ms":FAILOVER_TIMEOUT_MS});
                write.write_all(format!("{request}\n").as_bytes()).await.expect("write");
                run.sent.push((id, Instant::now()));
            }
            line = lines.next_line() => {
                let line = line.expect("read").expect("the gateway keeps the connection open");
                let answer: Value = serde_json::from_str(&line).expect("JSON");
                let id = answer["id"].as_u64().expect("an answer names its request");
                let code = if answer["ok"] == true {
                    let data = answer["data"].as_str().unwrap_or_default();
                    assert!(data.ends_with(&format!(":{id}")), "a reply went to the wrong request: {answer}");
                    None
                } else {
                    Some(answer["error"]["code"].as_str().unwrap_or_default().to_owned())
                };
                run.answers.push((id, Instant::now(), code));
            }
            () = tokio::time::sleep(Duration::from_millis(50)), if stopped.is_some() => {}
        }
        if let Some(stopped) = stopped {
            if run.answers.len() >= run.sent.len() {
                let quiet = *quiet_from.get_or_insert_with(Instant::now);
                if quiet.elapsed() >= Duration::from_millis(500) {
                    return run;
                }
            }
            if stopped.elapsed() > Duration::from_millis(FAILOVER_TIMEOUT_MS) + PATIENCE {
                return run; // the counts below say what is missing
            }
        }
    }
}

/// What the loads on one gateway saw, checked on the way: every request answered exactly once,
/// with a reply or UNAVAILABLE or TIMEOUT, and no error before the cut.
struct Summary {
    sent: usize,
    ok: usize,
    errors: std::collections::BTreeMap<String, usize>,
    /// Each answer: when its request was sent, when it came, its error code.
    answers: Vec<(Instant, Instant, Option<String>)>,
    /// The last error, as time after the cut.
    last_error: Option<Duration>,
    /// When the last request that failed was sent.
    last_failed_sent: Option<Instant>,
}

fn summarize(runs: &[LoadRun], cut: Instant) -> Summary {
    let mut answers_per_id = std::collections::HashMap::new();
    let (mut sent, mut ok) = (0, 0);
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    let mut answers = Vec::new();
    for run in runs {
        sent += run.sent.len();
        let sent_at: std::collections::HashMap<u64, Instant> = run.sent.iter().copied().collect();
        for (id, at, code) in &run.answers {
            *answers_per_id.entry(*id).or_insert(0) += 1;
            match code {
                None => ok += 1,
                Some(code) => *errors.entry(code.clone()).or_insert(0) += 1,
            }
            let sent = *sent_at
                .get(id)
                .expect("an answer to a request this client sent");
            answers.push((sent, *at, code.clone()));
        }
        for (id, _) in &run.sent {
            assert_eq!(
                answers_per_id.get(id),
                Some(&1),
                "request {id} got no answer or more than one"
            );
        }
    }
    assert_eq!(answers_per_id.len(), sent, "answers to requests never sent");
    assert_eq!(ok + errors.values().sum::<usize>(), sent);
    // During a failover: UNAVAILABLE for the requests waiting on the lost connection and those
    // sent while the gateway had none; TIMEOUT for a request whose message or reply was lost
    // with the node (or sat on a hung node's connection until its deadline). Nothing else: the
    // service had instances on the surviving nodes all along, whose interest every node knew
    // (so never NO_RESPONDERS), and any other code is a bug.
    for code in errors.keys() {
        assert!(
            code == "UNAVAILABLE" || code == "TIMEOUT",
            "{code} during a failover: {errors:?}"
        );
    }
    assert!(
        answers
            .iter()
            .all(|(_, at, code)| code.is_none() || *at >= cut),
        "an error before the cut"
    );
    let failed = || answers.iter().filter(|(_, _, code)| code.is_some());
    let last_error = failed().map(|(_, at, _)| *at - cut).max();
    let last_failed_sent = failed().map(|(sent, _, _)| *sent).max();
    Summary {
        sent,
        ok,
        errors,
        answers,
        last_error,
        last_failed_sent,
    }
}

/// Two gateways under load on a 3-node cluster, for the failover tests. The first has one
/// pool connection, on node `doomed`, which the test then takes away: it has no other
/// connection to fall back on and must move to a surviving node by itself. Four socket clients
/// send it a request every 5 ms each, to a queue-group service; a socket subscriber on it is
/// fed by a publisher on a surviving node every 5 ms. The second gateway has the default pool
/// (two connections, each on a node picked at random) and two socket clients like the others.
struct Failover {
    cluster: NatsCluster,
    gateway: Arc<GatewayProcess>,
    second: Arc<GatewayProcess>,
    doomed: usize,
    /// The service's instances by node (none on `doomed` unless asked for).
    instances: Vec<Option<Instance>>,
    stop_load: Arc<AtomicBool>,
    /// Each load with whether it is on the second gateway.
    loads: Vec<(bool, tokio::task::JoinHandle<LoadRun>)>,
    stop_publishing: Arc<AtomicBool>,
    publisher: tokio::task::JoinHandle<usize>,
    stop_reading: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<Vec<(Instant, Value)>>,
}

const FAILOVER_SUBJECT: &str = "cluster.fail.echo";

impl Failover {
    /// Everything set up and the load running for a second.
    async fn start(instance_on_doomed: bool) -> Failover {
        let cluster = NatsCluster::start().await;
        cluster.wait_routed().await;
        let gateway = GatewayProcess::start(
            &cluster.urls(),
            &[
                &["--nats-connections", "1", "--gateway-id", "gw-a"][..],
                &NO_BREAKERS,
            ]
            .concat(),
        );
        let doomed = node_holding(&cluster, "ipc-gateway-0", &[0, 1, 2]).await;
        let survivors: Vec<usize> = (0..3).filter(|node| *node != doomed).collect();
        eprintln!("the gateway is on node {doomed}");

        let mut instances = Vec::new();
        for (name, node) in cluster.nodes.iter().enumerate() {
            instances.push(match name != doomed || instance_on_doomed {
                true => Some(Instance::start(&node.url(), FAILOVER_SUBJECT, "echo", name).await),
                false => None,
            });
        }
        let members = instances.iter().flatten().count();
        for (node, instance) in instances.iter().enumerate() {
            let others = members - usize::from(instance.is_some());
            wait_routed_interest(&cluster, node, FAILOVER_SUBJECT, others).await;
        }
        let mut probe = Peer::Uds(gateway.json().await);
        request_until_served(&mut probe, FAILOVER_SUBJECT, "ready?").await;
        let second = GatewayProcess::start(
            &cluster.urls(),
            &[&["--gateway-id", "gw-b"][..], &NO_BREAKERS].concat(),
        );
        let mut probe = Peer::Uds(second.json().await);
        request_until_served(&mut probe, FAILOVER_SUBJECT, "ready?").await;

        let mut subscriber = gateway.json().await;
        let ack = subscriber
            .call(r#"{"op":"subscribe","id":"feed","subject":"cluster.fail.feed"}"#)
            .await;
        assert_eq!(ack, json!({"id":"feed","ok":true}));
        let stop_publishing = Arc::new(AtomicBool::new(false));
        let publisher = {
            let client = cluster.nodes[survivors[0]].client().await;
            let stop = stop_publishing.clone();
            tokio::spawn(async move {
                let mut seq = 0usize;
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    client
                        .publish("cluster.fail.feed", seq.to_string().into())
                        .await
                        .expect("publish");
                    seq += 1;
                }
                seq
            })
        };
        let stop_reading = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop_reading.clone();
            tokio::spawn(async move {
                let mut events = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(event) =
                        tokio::time::timeout(Duration::from_millis(100), subscriber.recv()).await
                    {
                        events.push((Instant::now(), event));
                    }
                }
                events
            })
        };

        let stop_load = Arc::new(AtomicBool::new(false));
        let gateway = Arc::new(gateway);
        let second = Arc::new(second);
        let loads = (1..=6)
            .map(|connection| {
                let on_second = connection > 4;
                let gateway = match on_second {
                    true => second.clone(),
                    false => gateway.clone(),
                };
                let stop = stop_load.clone();
                let load = tokio::spawn(async move {
                    let pace = Duration::from_millis(5);
                    request_load(&gateway, connection, FAILOVER_SUBJECT, pace, stop).await
                });
                (on_second, load)
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Failover {
            cluster,
            gateway,
            second,
            doomed,
            instances,
            stop_load,
            loads,
            stop_publishing,
            publisher,
            stop_reading,
            reader,
        }
    }

    /// After the doomed node was taken away at `cut`: the first gateway moves to a surviving
    /// node by itself within `within` and the second serves again by then, every request gets
    /// exactly one answer, and the subscriber is told of the gap and delivered to again. Stops
    /// the load, the publisher and the subscriber.
    async fn check(&mut self, cut: Instant, within: Duration) {
        // Through its one connection, a request can succeed only once that connection is on a
        // surviving node.
        let mut probe = self.gateway.json().await;
        for id in 0.. {
            let request = json!({"op":"request","id":id,"subject":FAILOVER_SUBJECT,"data":"probe","timeout_ms":1000});
            let reply = probe.call(&request.to_string()).await;
            if reply["ok"] == true {
                break;
            }
            let code = reply["error"]["code"].as_str().unwrap_or_default();
            assert!(code == "UNAVAILABLE" || code == "TIMEOUT", "{reply}");
            assert!(
                cut.elapsed() < within,
                "the gateway was still not served {within:?} after the cut: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let moved = cut.elapsed();
        self.gateway.wait_status("/ready", 200).await;
        self.second.wait_status("/ready", 200).await;
        // Load goes on for a while after the failover.
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.stop_load.store(true, Ordering::SeqCst);
        let mut runs = Vec::new();
        let mut second_runs = Vec::new();
        for (on_second, load) in self.loads.drain(..) {
            match on_second {
                true => second_runs.push(load.await.unwrap()),
                false => runs.push(load.await.unwrap()),
            }
        }
        let second = summarize(&second_runs, cut);
        eprintln!(
            "second gateway (default pool): {} requests, {} replies, errors {:?}; last error {:?} after the cut",
            second.sent, second.ok, second.errors, second.last_error
        );
        assert!(
            second
                .last_failed_sent
                .is_none_or(|sent| sent < cut + within),
            "the second gateway still failed requests {within:?} after the cut"
        );

        let first = summarize(&runs, cut);
        // Once the probe was served, the gateway stays served: every request sent a second
        // after that got a reply. (Requests sent just after `cut` may still succeed: the
        // signal takes a moment to land.)
        let settled = cut + moved + Duration::from_secs(1);
        let late_failures: Vec<_> = first
            .answers
            .iter()
            .filter(|(sent, _, code)| *sent > settled && code.is_some())
            .map(|(sent, at, code)| (*sent - cut, *at - cut, code.clone()))
            .collect();
        // When requests succeeded again: the first reply to a request sent after the last
        // request that failed.
        let recovered = first.last_failed_sent.and_then(|last| {
            first
                .answers
                .iter()
                .filter(|(sent, _, code)| *sent > last && code.is_none())
                .map(|(_, at, _)| *at - cut)
                .min()
        });
        eprintln!(
            "failover: {} requests, {} replies, errors {:?}; the last failed request sent {:?} after the cut, answered {:?} after it; the next reply {recovered:?} after it; a probe served {moved:?} after it",
            first.sent,
            first.ok,
            first.errors,
            first.last_failed_sent.map(|sent| sent - cut),
            first.last_error,
        );
        assert!(
            first
                .last_failed_sent
                .is_none_or(|sent| sent < cut + within),
            "requests still failed {within:?} after the cut"
        );
        assert!(
            late_failures.is_empty(),
            "requests failed after the gateway was served again (sent, answered after the cut; code): {:?}",
            &late_failures[..late_failures.len().min(20)]
        );

        // The publisher has gone on all along: by now the subscription delivers again, and
        // the outage reached the subscriber as a gap notice.
        self.stop_reading.store(true, Ordering::SeqCst);
        let events = (&mut self.reader).await.unwrap();
        self.stop_publishing.store(true, Ordering::SeqCst);
        let published = (&mut self.publisher).await.unwrap();
        let mut previous: Option<u64> = None;
        let mut told = false;
        let mut gap_at = None;
        let mut resumed_at = None;
        for (at, event) in &events {
            match event["op"].as_str() {
                Some("dropped") => {
                    assert_eq!(event["sid"], "feed", "{event}");
                    told = true;
                    if event["gap"] == true && *at >= cut && gap_at.is_none() {
                        gap_at = Some(*at);
                    }
                }
                Some("msg") => {
                    let seq: u64 = event["data"].as_str().unwrap().parse().unwrap();
                    if let Some(previous) = previous {
                        assert!(seq > previous, "out of order: {seq} after {previous}");
                        assert!(
                            seq == previous + 1 || told,
                            "messages {}..{seq} were lost without a dropped notice",
                            previous + 1
                        );
                    }
                    if gap_at.is_some() && resumed_at.is_none() {
                        resumed_at = Some(*at);
                    }
                    previous = Some(seq);
                    told = false;
                }
                _ => panic!("unexpected {event}"),
            }
        }
        let gap_at = gap_at.expect("the subscriber was told of the gap (dropped, gap:true)");
        let resumed_at = resumed_at.expect("the subscription delivered again after the failover");
        eprintln!(
            "subscription: {published} published, {} delivered; gap notice {:?} after the cut, delivering again {:?} after it",
            events.iter().filter(|(_, e)| e["op"] == "msg").count(),
            gap_at - cut,
            resumed_at - cut,
        );
        let gaps = self.gateway.metric("ipc_gateway_nats_gaps_total").await;
        assert!(gaps >= Some(1.0), "{gaps:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_gateways_node_under_load_every_request_answered_once_and_it_moves_on() {
    // The service has an instance on every node: one dies with the node.
    let mut failover = Failover::start(true).await;
    let doomed = failover.doomed;
    // Taken before the kill: the gateway may notice it before `kill` has reaped the process.
    let killed = Instant::now();
    failover.cluster.nodes[doomed].kill();
    failover.check(killed, Duration::from_secs(10)).await;

    // The killed node comes back on its ports and store: the cluster heals. Its routes and
    // JetStream come back, the service instance that died with it is served requests again
    // (its client reconnected by itself), and its clients get what gateway clients publish.
    let Failover {
        cluster,
        gateway,
        instances,
        ..
    } = &mut failover;
    let restarted = Instant::now();
    cluster.nodes[doomed].restart();
    cluster.wait_routed().await;
    cluster.wait_healthy().await;
    let back = cluster.nodes[doomed].client().await;
    let mut healed = back.subscribe("cluster.fail.healed").await.unwrap();
    registered(&back).await;
    let mut client = gateway.json().await;
    let deadline = Instant::now() + PATIENCE * 3;
    let instance = instances[doomed].as_ref().unwrap();
    let before = instance.answered();
    let mut id = 0;
    while instance.answered() == before {
        id += 1;
        let request = json!({"op":"request","id":id,"subject":FAILOVER_SUBJECT,"data":"again","timeout_ms":FAILOVER_TIMEOUT_MS});
        let reply = client.call(&request.to_string()).await;
        assert_eq!(reply["ok"], true, "{reply}");
        assert!(
            Instant::now() < deadline,
            "the instance on the restarted node never got a request"
        );
    }
    eprintln!(
        "restart: routed and healthy, and its instance served again, {:?} after the restart",
        restarted.elapsed()
    );
    let publish = r#"{"op":"publish","id":"h","subject":"cluster.fail.healed","data":"healed"}"#;
    let message = loop {
        assert_eq!(client.call(publish).await, json!({"id":"h","ok":true}));
        if let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(200), healed.next()).await
        {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "a client of the restarted node never got a message"
        );
    };
    assert_eq!(&message.payload[..], b"healed");
}

/// A node that hangs (SIGSTOP: as a host that freezes or drops off the network, its TCP
/// connections stay open and silent) is noticed only by NATS pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_under_load_is_left_within_seconds_and_every_request_answered_once() {
    // No instance on the node that hangs: its share of a queue group's requests would wait
    // for nats-server's own route pings, which is NATS's business, not the gateway's.
    let mut failover = Failover::start(false).await;
    let pid = failover.cluster.nodes[failover.doomed].pid().unwrap();
    let hung = Instant::now();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    failover.check(hung, Duration::from_secs(20)).await;
    // Dropping the cluster kills the stopped node (SIGKILL ends a stopped process too).
}
