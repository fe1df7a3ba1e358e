//! Named clients and presence on a 3-node NATS cluster with JetStream, with two or three real
//! gateways: a registered name receives `client.<name>` messages on whichever gateway holds
//! it, the policy decides who may take which name, presence lives in a KV bucket (online,
//! offline after a clean close, gone after the TTL when a gateway is killed -9), the newer
//! registration of a name wins, and presence can be watched and asked over HTTP.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::cluster::NatsCluster;
use crate::common::{GatewayProcess, JsonConn, write_private};

const TTL_MS: u64 = 1500;
const SECRET: &[u8] = b"presence-tests-secret-0123456789";

const POLICY: &str = r#"
[[grant]]
match = { any = true }
publish = { allow = [">"] }
subscribe = { allow = [">"] }
request = { allow = [">"] }
names = ["bob", "team.*"]
presence = [">"]

[[grant]]
match = { sub = "ops" }
status = true
"#;

/// A temporary directory with the policy and the JWT secret.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.toml"), POLICY).unwrap();
        write_private(&dir.path().join("jwt.secret"), SECRET);
        Files { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }
}

fn start_gateway(cluster: &NatsCluster, node: usize, id: &str, files: &Files) -> GatewayProcess {
    let ttl = TTL_MS.to_string();
    GatewayProcess::start(
        &cluster.nodes[node].url(),
        &[
            "--gateway-id",
            id,
            "--presence-ttl-ms",
            &ttl,
            "--policy",
            &files.path("policy.toml"),
            "--auth-jwt-secret-file",
            &files.path("jwt.secret"),
        ],
    )
}

async fn cluster_with(count: usize) -> (NatsCluster, Files, Vec<GatewayProcess>) {
    let cluster = NatsCluster::start().await;
    cluster.wait_routed().await;
    let files = Files::new();
    let gateways = (0..count)
        .map(|index| start_gateway(&cluster, index, &format!("gw-{}", index + 1), &files))
        .collect();
    (cluster, files, gateways)
}

/// Sends `line` until it is answered ok (the gateway may still be making the bucket at start);
/// returns the last answer.
async fn call_ok(conn: &mut JsonConn, line: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = conn.call(line).await;
        if answer["ok"] == true || Instant::now() > deadline {
            return answer;
        }
        assert_eq!(answer["error"]["code"], "UNAVAILABLE", "{line}: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next line within `wait`, if any.
async fn next_within(conn: &mut JsonConn, wait: Duration) -> Option<Value> {
    tokio::time::timeout(wait, conn.recv()).await.ok()
}

/// Reads lines until one satisfies `want` (others are skipped), or fails after 20 s.
async fn wait_for(conn: &mut JsonConn, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no {what} in time");
        if let Some(line) = next_within(conn, Duration::from_millis(200)).await
            && want(&line)
        {
            return line;
        }
    }
}

/// Publishes with `publish` until `bob` receives a message on `client.bob` with `data`.
async fn deliver_until_received<F, Fut>(bob: &mut JsonConn, data: &str, mut publish: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "{data} never reached bob");
        publish().await;
        if let Some(line) = next_within(bob, Duration::from_millis(200)).await
            && line["op"] == "msg"
            && line["data"] == data
        {
            return line;
        }
    }
}

async fn presence_of(conn: &mut JsonConn, name: &str) -> Value {
    call_ok(
        conn,
        &json!({"op":"presence","id":"q","name":name}).to_string(),
    )
    .await
}

/// Asks until the presence of `name` satisfies `want`.
async fn presence_until(conn: &mut JsonConn, name: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = presence_of(conn, name).await;
        if want(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "presence of {name} stayed {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn token(sub: &str) -> String {
    let now = crate::common::unix_now();
    crate::common::hs256(&json!({"sub": sub, "iat": now, "exp": now + 600}), SECRET)
}

/// GET with an optional bearer token: (status, body).
async fn http_get_as(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_name_receives_client_messages_from_nats_and_other_gateways() {
    let (cluster, _files, gateways) = cluster_with(2).await;
    let mut bob = gateways[1].json().await;
    let answer = call_ok(&mut bob, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    assert_eq!(answer, json!({"id":1,"ok":true}));

    // A direct NATS publish on another node.
    let nats = cluster.nodes[2].client().await;
    let message = deliver_until_received(&mut bob, "direct", || async {
        nats.publish("client.bob", "direct".into()).await.unwrap();
        nats.flush().await.unwrap();
    })
    .await;
    assert_eq!(message["sid"], 1, "{message}");
    assert_eq!(message["subject"], "client.bob", "{message}");

    // A client of the other gateway.
    let mut alice = gateways[0].json().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        assert!(
            Instant::now() < deadline,
            "alice's message never reached bob"
        );
        alice
            .send(r#"{"op":"publish","subject":"client.bob","data":"via gw-1"}"#)
            .await;
        if let Some(line) = next_within(&mut bob, Duration::from_millis(200)).await
            && line["data"] == "via gw-1"
        {
            break line;
        }
    };
    assert_eq!(message["sid"], 1, "{message}");

    // Requests to the name work when bob answers its reply_to.
    let mut caller = gateways[0].json().await;
    caller
        .send(
            r#"{"op":"request","id":"r","subject":"client.bob","data":"ping?","timeout_ms":3000}"#,
        )
        .await;
    let request = wait_for(&mut bob, "the request", |line| line["data"] == "ping?").await;
    let reply_to = request["reply_to"].as_str().expect("reply_to").to_owned();
    bob.send(&json!({"op":"publish","subject":reply_to,"data":"pong!"}).to_string())
        .await;
    let reply = wait_for(&mut caller, "the reply", |line| line["id"] == "r").await;
    assert_eq!(reply["data"], "pong!", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_else_can_subscribe_to_a_name_or_see_its_messages() {
    let (cluster, _files, gateways) = cluster_with(1).await;
    let mut spy = gateways[0].json().await;
    let refused = spy
        .call(r#"{"op":"subscribe","id":"s","subject":"client.bob"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let refused = spy
        .call(r#"{"op":"subscribe","id":"s","subject":"client.>"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let all = spy
        .call(r#"{"op":"subscribe","id":"all","subject":">"}"#)
        .await;
    assert_eq!(all["ok"], true, "{all}");

    let mut bob = gateways[0].json().await;
    call_ok(&mut bob, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let nats = cluster.nodes[0].client().await;
    deliver_until_received(&mut bob, "secret", || async {
        nats.publish("client.bob", "secret".into()).await.unwrap();
        nats.publish("visible.x", "public".into()).await.unwrap();
        nats.flush().await.unwrap();
    })
    .await;
    // The `>` subscriber sees the ordinary subject, never the name's.
    let seen = wait_for(&mut spy, "the public message", |line| line["op"] == "msg").await;
    assert_eq!(seen["subject"], "visible.x", "{seen}");
    for _ in 0..5 {
        if let Some(line) = next_within(&mut spy, Duration::from_millis(100)).await {
            assert_ne!(line["subject"], "client.bob", "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_follow_the_policy_and_default_to_the_user_name() {
    let (cluster, _files, gateways) = cluster_with(1).await;
    let mut conn = gateways[0].json().await;
    // Wait until the bucket is usable.
    call_ok(&mut conn, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let forbidden = conn
        .call(r#"{"op":"register","id":2,"name":"mallory"}"#)
        .await;
    assert_eq!(forbidden["error"]["code"], "FORBIDDEN", "{forbidden}");
    for (line, why) in [
        (r#"{"op":"register","id":3,"name":"team.*"}"#, "wildcard"),
        (r#"{"op":"register","id":3,"name":"a..b"}"#, "empty token"),
        (r#"{"op":"register","id":3,"name":"bob@host"}"#, "character"),
        (r#"{"op":"register","id":3}"#, "no name"),
        (r#"{"op":"register","name":"team.a"}"#, "no id"),
        (r#"{"op":"register","id":1,"name":"team.a"}"#, "id in use"),
        (r#"{"op":"register","id":3,"name":"bob"}"#, "held already"),
        (r#"{"op":"unregister","id":3,"name":"team.b"}"#, "not held"),
    ] {
        let answer = conn.call(line).await;
        assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{why}: {answer}");
    }
    let team = conn
        .call(r#"{"op":"register","id":4,"name":"team.a"}"#)
        .await;
    assert_eq!(team["ok"], true, "{team}");
    // The test's own user name (a Unix-socket client) is its default name.
    let user = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let user = String::from_utf8(user.stdout).unwrap().trim().to_owned();
    let own = conn
        .call(&json!({"op":"register","id":5,"name":user}).to_string())
        .await;
    assert_eq!(own["ok"], true, "{user}: {own}");
    let gone = conn
        .call(r#"{"op":"unregister","id":6,"name":"team.a"}"#)
        .await;
    assert_eq!(gone["ok"], true, "{gone}");

    // Without a policy: only the own name.
    let open = GatewayProcess::start(
        &cluster.nodes[1].url(),
        &[
            "--gateway-id",
            "gw-open",
            "--presence-ttl-ms",
            &TTL_MS.to_string(),
        ],
    );
    let mut conn = open.json().await;
    let own = call_ok(
        &mut conn,
        &json!({"op":"register","id":1,"name":user}).to_string(),
    )
    .await;
    assert_eq!(own["ok"], true, "{own}");
    let other = conn.call(r#"{"op":"register","id":2,"name":"bob"}"#).await;
    assert_eq!(other["error"]["code"], "FORBIDDEN", "{other}");
    // Presence of others is not shown without a grant; one's own is.
    let other = conn.call(r#"{"op":"presence","id":3,"name":"bob"}"#).await;
    assert_eq!(other["error"]["code"], "FORBIDDEN", "{other}");
    let mine = conn
        .call(&json!({"op":"presence","id":4,"name":user}).to_string())
        .await;
    assert_eq!(mine["online"], true, "{mine}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_online_with_the_gateway_and_offline_after_a_clean_close() {
    let (_cluster, _files, gateways) = cluster_with(2).await;
    let mut bob = gateways[1].json().await;
    call_ok(&mut bob, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let mut asker = gateways[0].json().await;
    let online = presence_until(&mut asker, "bob", |a| a["online"] == true).await;
    assert_eq!(online["id"], "q");
    assert_eq!(online["gateway"], "gw-2", "{online}");
    assert_eq!(online["frontend"], "uds", "{online}");
    assert!(
        online["connected_at"].as_str().unwrap().ends_with('Z'),
        "{online}"
    );
    drop(bob);
    let offline = presence_until(&mut asker, "bob", |a| a["online"] == false).await;
    assert_eq!(
        offline,
        json!({"id":"q","ok":true,"name":"bob","online":false})
    );

    // The operators' view: 403 without the status grant, 200 with it.
    let mut bob = gateways[1].json().await;
    call_ok(&mut bob, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let port = gateways[0].http_port;
    let (status, _) = http_get_as(port, "/presence?name=bob", None).await;
    assert_eq!(status, 403);
    let (status, _) = http_get_as(port, "/presence?name=bob", Some(&token("someone"))).await;
    assert_eq!(status, 403);
    let (status, _) = http_get_as(port, "/presence?name=bob", Some("not.a.token")).await;
    assert_eq!(status, 401);
    let ops = token("ops");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get_as(port, "/presence?name=bob", Some(&ops)).await;
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        if body["online"] == true {
            assert_eq!(body["gateway"], "gw-2", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = http_get_as(port, "/presence?name=a..b", Some(&ops)).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_names_expire_and_watchers_see_them_go_offline() {
    let (cluster, _files, gateways) = cluster_with(2).await;
    let mut watcher = gateways[0].json().await;
    let watching = call_ok(
        &mut watcher,
        r#"{"op":"presence_watch","id":"w1","pattern":"team.>"}"#,
    )
    .await;
    assert_eq!(watching, json!({"id":"w1","ok":true}));
    let mut member = gateways[1].json().await;
    call_ok(&mut member, r#"{"op":"register","id":1,"name":"team.x"}"#).await;
    let online = wait_for(&mut watcher, "online", |line| line["online"] == true).await;
    assert_eq!(
        (
            &online["op"],
            &online["sid"],
            &online["name"],
            &online["gateway"]
        ),
        (
            &json!("presence"),
            &json!("w1"),
            &json!("team.x"),
            &json!("gw-2")
        ),
        "{online}"
    );

    // Refreshes (every TTL/3) are not changes: nothing more while team.x stays.
    watcher.assert_silent(Duration::from_millis(TTL_MS)).await;

    // A clean close: offline at once (the entry is deleted).
    let mut brief = gateways[1].json().await;
    call_ok(&mut brief, r#"{"op":"register","id":1,"name":"team.y"}"#).await;
    wait_for(&mut watcher, "team.y online", |line| {
        line["name"] == "team.y" && line["online"] == true
    })
    .await;
    drop(brief);
    wait_for(&mut watcher, "team.y offline", |line| {
        line["name"] == "team.y" && line["online"] == false
    })
    .await;

    // The entry's last write before the kill (a refresh after this read only makes it later).
    let js = async_nats::jetstream::new(cluster.nodes[0].client().await);
    let kv = js.get_key_value("ipc_presence").await.unwrap();
    let written = kv
        .entry("team.x")
        .await
        .unwrap()
        .expect("team.x's entry")
        .created;
    gateways[1].signal("KILL");
    let offline = wait_for(&mut watcher, "offline", |line| {
        line["name"] == "team.x" && line["online"] == false
    })
    .await;
    let seen = time::OffsetDateTime::now_utc();
    assert_eq!(offline["sid"], "w1", "{offline}");
    // Not before that write could have expired: the gateway's death itself says nothing. (Its
    // refreshes come every TTL/3, but on a loaded machine one can be late, so the write's own
    // time is the bound, not the kill's.)
    let expires = written + Duration::from_millis(TTL_MS);
    assert!(
        seen >= expires - Duration::from_millis(20),
        "offline {} ms before the entry written at {written} could expire",
        (expires - seen).whole_milliseconds()
    );
    let mut asker = gateways[0].json().await;
    let answer = presence_of(&mut asker, "team.x").await;
    assert_eq!(answer["online"], false, "{answer}");

    // Unsubscribe ends the watch.
    // Each change once: no second offline (the deletion's marker expiring) for either name.
    watcher
        .assert_silent(Duration::from_millis(TTL_MS * 2))
        .await;
    let ended = watcher.call(r#"{"op":"unsubscribe","id":"w1"}"#).await;
    assert_eq!(ended, json!({"id":"w1","ok":true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_registration_wins_and_the_older_gateway_cannot_take_it_back() {
    let (cluster, _files, gateways) = cluster_with(2).await;
    let mut older = gateways[0].json().await;
    call_ok(&mut older, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let mut asker = gateways[0].json().await;
    presence_until(&mut asker, "bob", |a| a["gateway"] == "gw-1").await;

    let mut newer = gateways[1].json().await;
    call_ok(&mut newer, r#"{"op":"register","id":7,"name":"bob"}"#).await;
    let lost = wait_for(&mut older, "name_lost", |line| line["op"] == "name_lost").await;
    assert_eq!(lost, json!({"op":"name_lost","sid":1,"name":"bob"}));

    let nats = cluster.nodes[2].client().await;
    deliver_until_received(&mut newer, "to the newer", || async {
        nats.publish("client.bob", "to the newer".into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
    })
    .await;
    // The older connection gets nothing more.
    for _ in 0..3 {
        nats.publish("client.bob", "again".into()).await.unwrap();
    }
    nats.flush().await.unwrap();
    older.assert_silent(Duration::from_millis(500)).await;

    // Several refresh periods later the entry still names the newer gateway: the older one's
    // refreshes (with its old revision) did not restore it.
    tokio::time::sleep(Duration::from_millis(TTL_MS * 2)).await;
    let answer = presence_of(&mut asker, "bob").await;
    assert_eq!(answer["gateway"], "gw-2", "{answer}");
    let js = async_nats::jetstream::new(cluster.nodes[0].client().await);
    let kv = js.get_key_value("ipc_presence").await.unwrap();
    let mut stream = js.get_stream("KV_ipc_presence").await.unwrap();
    let config = &stream.info().await.unwrap().config;
    assert_eq!(
        config.num_replicas, 3,
        "a cluster keeps presence on three nodes"
    );
    assert_eq!(config.max_age, Duration::from_millis(TTL_MS));
    let entry = kv.get("bob").await.unwrap().expect("the entry");
    let value: Value = serde_json::from_slice(&entry).unwrap();
    assert_eq!(value["gateway"], "gw-2", "{value}");
    older.assert_silent(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_registration_wins_on_one_gateway_too() {
    let (cluster, _files, gateways) = cluster_with(1).await;
    let mut first = gateways[0].json().await;
    call_ok(&mut first, r#"{"op":"register","id":"a","name":"bob"}"#).await;
    let mut second = gateways[0].json().await;
    call_ok(&mut second, r#"{"op":"register","id":"b","name":"bob"}"#).await;
    let lost = wait_for(&mut first, "name_lost", |line| line["op"] == "name_lost").await;
    assert_eq!(lost, json!({"op":"name_lost","sid":"a","name":"bob"}));
    let nats = cluster.nodes[0].client().await;
    let got = deliver_until_received(&mut second, "hi", || async {
        nats.publish("client.bob", "hi".into()).await.unwrap();
        nats.flush().await.unwrap();
    })
    .await;
    assert_eq!(got["sid"], "b");
    first.assert_silent(Duration::from_millis(300)).await;
    // The first may register again and win it back.
    let again = first
        .call(r#"{"op":"register","id":"c","name":"bob"}"#)
        .await;
    assert_eq!(again["ok"], true, "{again}");
    let lost = wait_for(&mut second, "name_lost", |line| line["op"] == "name_lost").await;
    assert_eq!(lost["sid"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jetstream_register_is_unavailable_and_the_gateway_goes_on() {
    let nats = crate::common::NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &["--gateway-id", "gw-nojs"]);
    let mut conn = gateway.json().await;
    let user = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let user = String::from_utf8(user.stdout).unwrap().trim().to_owned();
    let refused = conn
        .call(&json!({"op":"register","id":1,"name":user}).to_string())
        .await;
    assert_eq!(refused["error"]["code"], "UNAVAILABLE", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("JetStream"), "{message}");
    let refused = conn
        .call(&json!({"op":"presence_watch","id":"w","pattern":user}).to_string())
        .await;
    assert_eq!(refused["error"]["code"], "UNAVAILABLE", "{refused}");
    // Everything else works.
    let ack = conn
        .call(r#"{"op":"publish","id":2,"subject":"plain.subject","data":"x"}"#)
        .await;
    assert_eq!(ack, json!({"id":2,"ok":true}));
    assert_eq!(gateway.get("/health").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_register_ask_presence_and_hear_name_lost() {
    use crate::common::frame;
    use ipc_gateway::protocol::binary::{FrameParts, frame_type};

    let (cluster, _files, gateways) = cluster_with(1).await;
    let mut raw = gateways[0].raw().await;
    let register = frame(FrameParts {
        frame_type: frame_type::REGISTER,
        id: 9,
        subject: b"bob",
        ..FrameParts::default()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        raw.send(&register).await;
        let answer = raw.recv().await;
        if answer.header.frame_type == frame_type::ACK {
            assert_eq!(answer.header.id, 9);
            break;
        }
        assert_eq!(answer.code(), "UNAVAILABLE", "{answer:?}");
        assert!(Instant::now() < deadline, "{answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nats = cluster.nodes[0].client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        nats.publish("client.bob", "framed".into()).await.unwrap();
        nats.flush().await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), raw.recv()).await;
        if let Ok(message) = got {
            assert_eq!(message.header.frame_type, frame_type::MSG, "{message:?}");
            assert_eq!(message.header.id, 9);
            assert_eq!(&message.subject[..], b"client.bob");
            assert_eq!(&message.payload[..], b"framed");
            break;
        }
        assert!(Instant::now() < deadline, "no MSG");
    }
    // Let any duplicate deliveries of the loop above arrive and skip them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.send(&frame(FrameParts {
        frame_type: frame_type::PRESENCE_QUERY,
        id: 10,
        subject: b"bob",
        ..FrameParts::default()
    }))
    .await;
    let answer = loop {
        let answer = raw.recv().await;
        if answer.header.frame_type != frame_type::MSG {
            break answer;
        }
    };
    assert_eq!(answer.header.frame_type, frame_type::PRESENCE, "{answer:?}");
    assert_eq!((answer.header.id, answer.header.param), (10, 1));
    let info: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(info["gateway"], "gw-1", "{info}");

    let mut newer = gateways[0].json().await;
    call_ok(&mut newer, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let lost = raw.recv().await;
    assert_eq!(lost.header.frame_type, frame_type::NAME_LOST, "{lost:?}");
    assert_eq!(lost.header.id, 9);
    assert_eq!(&lost.subject[..], b"bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_registers_asks_watches_and_hears_name_lost() {
    use futures_util::StreamExt;
    use ipc_gateway::frontend::grpc::pb;

    let (cluster, _files, gateways) = cluster_with(1).await;
    let mut client = gateways[0].grpc().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut named = loop {
        let request = pb::RegisterRequest { name: "bob".into() };
        match client.register(request).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let refused = client
        .register(pb::RegisterRequest {
            name: "mallory".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let nats = cluster.nodes[1].client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        nats.publish("client.bob", "over grpc".into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
        if let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_millis(300), named.next()).await
        {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "no message on the Register stream"
        );
    };
    assert_eq!(message.subject, "client.bob");
    assert_eq!(&message.payload[..], b"over grpc");
    assert!(!message.name_lost);

    let presence = client
        .presence(pb::PresenceRequest { name: "bob".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(presence.online, "{presence:?}");
    assert_eq!(
        (presence.gateway.as_str(), presence.frontend.as_str()),
        ("gw-1", "grpc")
    );

    let mut watch = client
        .watch_presence(pb::WatchPresenceRequest {
            pattern: "team.>".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut member = gateways[0].json().await;
    call_ok(&mut member, r#"{"op":"register","id":1,"name":"team.y"}"#).await;
    let event = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("a presence event")
        .unwrap()
        .unwrap();
    assert_eq!((event.name.as_str(), event.online), ("team.y", true));

    // A socket client takes the name: the stream says so, then ends.
    call_ok(&mut member, r#"{"op":"register","id":2,"name":"bob"}"#).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline.into(), named.next())
            .await
            .expect("name_lost in time");
        let message = next.expect("a last message").unwrap();
        if message.name_lost {
            break;
        }
    }
    let end = tokio::time::timeout(Duration::from_secs(10), named.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_take_their_token_subject_and_anonymous_ones_nothing() {
    use crate::common::ws;

    let cluster = NatsCluster::start().await;
    let files = Files::new();
    let ttl = TTL_MS.to_string();
    // No policy: the default names only.
    let gateway = GatewayProcess::start(
        &cluster.nodes[0].url(),
        &[
            "--gateway-id",
            "gw-ws",
            "--presence-ttl-ms",
            &ttl,
            "--auth-jwt-secret-file",
            &files.path("jwt.secret"),
        ],
    );
    let authorization = format!("Bearer {}", token("carol"));
    let (mut carol, _) = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)])
        .await
        .expect("carol connects");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = ws::call(&mut carol, r#"{"op":"register","id":1,"name":"carol"}"#).await;
        if answer["ok"] == true {
            break;
        }
        assert_eq!(answer["error"]["code"], "UNAVAILABLE", "{answer}");
        assert!(Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other = ws::call(&mut carol, r#"{"op":"register","id":2,"name":"dave"}"#).await;
    assert_eq!(other["error"]["code"], "FORBIDDEN", "{other}");
    let mine = ws::call(&mut carol, r#"{"op":"presence","id":3,"name":"carol"}"#).await;
    assert_eq!(
        (&mine["online"], &mine["frontend"], &mine["identity"]),
        (&json!(true), &json!("ws"), &json!("sub=carol")),
        "{mine}"
    );

    let mut anonymous = ws::connect(&gateway, None).await.expect("connects");
    let refused = ws::call(
        &mut anonymous,
        r#"{"op":"register","id":1,"name":"anonymous"}"#,
    )
    .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let refused = ws::call(&mut anonymous, r#"{"op":"presence","id":2,"name":"carol"}"#).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_policy_that_no_longer_gives_a_name_takes_it_away() {
    let (_cluster, files, gateways) = cluster_with(1).await;
    let mut bob = gateways[0].json().await;
    call_ok(&mut bob, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let mut team = gateways[0].json().await;
    call_ok(&mut team, r#"{"op":"register","id":1,"name":"team.a"}"#).await;
    // Two presence watches: the reload takes the wide one away and keeps the team one.
    let mut wide = gateways[0].json().await;
    call_ok(
        &mut wide,
        r#"{"op":"presence_watch","id":"w","pattern":">"}"#,
    )
    .await;
    let mut teams = gateways[0].json().await;
    call_ok(
        &mut teams,
        r#"{"op":"presence_watch","id":"t","pattern":"team.>"}"#,
    )
    .await;
    std::fs::write(
        files.path("policy.toml"),
        POLICY
            .replace(r#"names = ["bob", "team.*"]"#, r#"names = ["team.*"]"#)
            .replace(r#"presence = [">"]"#, r#"presence = ["team.>"]"#),
    )
    .unwrap();
    gateways[0].signal("HUP");
    let lost = wait_for(&mut bob, "name_lost", |line| line["op"] == "name_lost").await;
    assert_eq!(lost, json!({"op":"name_lost","sid":1,"name":"bob"}));
    let ended = wait_for(&mut wide, "unsubscribed", |line| {
        line["op"] == "unsubscribed"
    })
    .await;
    assert_eq!(ended["sid"], "w", "{ended}");
    assert_eq!(ended["error"]["code"], "FORBIDDEN", "{ended}");
    // The ended watch's id is free again, and a watch the new policy refuses is refused.
    let refused = wide
        .call(r#"{"op":"presence_watch","id":"w","pattern":">"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let mut asker = gateways[0].json().await;
    presence_until(&mut asker, "team.a", |a| a["online"] == true).await;
    let mut newcomer = gateways[0].json().await;
    call_ok(&mut newcomer, r#"{"op":"register","id":1,"name":"team.b"}"#).await;
    let online = wait_for(&mut teams, "team.b online", |line| {
        line["name"] == "team.b" && line["online"] == true
    })
    .await;
    assert_eq!(online["sid"], "t", "{online}");
    team.assert_silent(Duration::from_millis(200)).await;
    wide.assert_silent(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_cleanly_deletes_its_entries_at_once() {
    let cluster = NatsCluster::start().await;
    cluster.wait_routed().await;
    let files = Files::new();
    // A TTL far longer than the test waits: only a delete can make the name offline in time.
    let long_ttl = [
        "--presence-ttl-ms",
        "120000",
        "--policy",
        &files.path("policy.toml"),
    ];
    let stopping = GatewayProcess::start(
        &cluster.nodes[0].url(),
        &[&["--gateway-id", "gw-stop"][..], &long_ttl[..]].concat(),
    );
    let staying = GatewayProcess::start(
        &cluster.nodes[1].url(),
        &[&["--gateway-id", "gw-stay"][..], &long_ttl[..]].concat(),
    );
    let mut bob = stopping.json().await;
    call_ok(&mut bob, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let mut asker = staying.json().await;
    presence_until(&mut asker, "bob", |a| a["gateway"] == "gw-stop").await;
    stopping.signal("TERM");
    let mut stopping = stopping;
    assert_eq!(stopping.wait_exit(), Some(0));
    let answer = presence_of(&mut asker, "bob").await;
    assert_eq!(answer["online"], false, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_registered_once_jetstream_is_back_are_kept_alive() {
    let store = tempfile::tempdir().unwrap();
    let mut nats = crate::common::NatsServer::start_with_config(&format!(
        "jetstream {{ store_dir: \"{}\" }}",
        store.path().display()
    ));
    nats.kill();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--gateway-id",
            "gw-late",
            "--presence-ttl-ms",
            &TTL_MS.to_string(),
        ],
    );
    // The gateway backs off while NATS (and so JetStream) is away.
    tokio::time::sleep(Duration::from_secs(8)).await;
    nats.restart();
    let user = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let user = String::from_utf8(user.stdout).unwrap().trim().to_owned();
    let mut conn = gateway.json().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = conn
            .call(&json!({"op":"register","id":1,"name":user}).to_string())
            .await;
        if answer["ok"] == true {
            break;
        }
        assert_eq!(answer["error"]["code"], "UNAVAILABLE", "{answer}");
        assert!(Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Refreshed: still online well past the TTL.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(TTL_MS / 2)).await;
        let answer = conn
            .call(&json!({"op":"presence","id":2,"name":user}).to_string())
            .await;
        assert_eq!(answer["online"], true, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_subscriptions_share_the_per_connection_bound() {
    let cluster = NatsCluster::start().await;
    let files = Files::new();
    let gateway = GatewayProcess::start(
        &cluster.nodes[0].url(),
        &[
            "--presence-ttl-ms",
            &TTL_MS.to_string(),
            "--policy",
            &files.path("policy.toml"),
            "--max-subscriptions-per-connection",
            "3",
        ],
    );
    let mut conn = gateway.json().await;
    call_ok(&mut conn, r#"{"op":"register","id":1,"name":"team.a"}"#).await;
    let ok = conn
        .call(r#"{"op":"subscribe","id":2,"subject":"x.y"}"#)
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let ok = conn
        .call(r#"{"op":"register","id":3,"name":"team.b"}"#)
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let over = conn
        .call(r#"{"op":"register","id":4,"name":"team.c"}"#)
        .await;
    assert_eq!(over["error"]["code"], "OVERLOADED", "{over}");
    let over = conn
        .call(r#"{"op":"subscribe","id":5,"subject":"x.z"}"#)
        .await;
    assert_eq!(over["error"]["code"], "OVERLOADED", "{over}");
    // Giving a name up makes room.
    let gone = conn
        .call(r#"{"op":"unregister","id":6,"name":"team.a"}"#)
        .await;
    assert_eq!(gone["ok"], true, "{gone}");
    let ok = conn
        .call(r#"{"op":"register","id":7,"name":"team.c"}"#)
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_operations_are_audited_with_the_name() {
    let cluster = NatsCluster::start().await;
    let files = Files::new();
    let audit = files.path("audit.jsonl");
    let mut gateway = GatewayProcess::start(
        &cluster.nodes[0].url(),
        &[
            "--presence-ttl-ms",
            &TTL_MS.to_string(),
            "--policy",
            &files.path("policy.toml"),
            "--audit-file",
            &audit,
        ],
    );
    let mut conn = gateway.json().await;
    call_ok(&mut conn, r#"{"op":"register","id":1,"name":"bob"}"#).await;
    let refused = conn
        .call(r#"{"op":"register","id":2,"name":"mallory"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    drop(conn);
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let records = crate::common::audit_records(std::path::Path::new(&audit));
    let register = |id: i64| {
        records
            .iter()
            .rfind(|r| r["op"] == "register" && r["id"] == id)
            .unwrap_or_else(|| panic!("no register record for id {id}: {records:?}"))
    };
    assert_eq!(
        (&register(1)["subject"], &register(1)["outcome"]),
        (&json!("bob"), &json!("ok"))
    );
    assert_eq!(
        (&register(2)["subject"], &register(2)["outcome"]),
        (&json!("mallory"), &json!("FORBIDDEN"))
    );
}
