//! What one client cannot do to another, end to end: forge answers to someone else's request,
//! break everyone's subscribes with a `>` subscriber, or take unbounded subscriptions; and who
//! is calling (a second local uid through `setpriv`, HS256 and EdDSA tokens on WebSocket and
//! gRPC), what the policy lets them do (reserved subjects, answering a request, SIGHUP
//! reloads), and what services learn of them (`Ipc-Gateway-*` headers). Real processes only:
//! nats-server, the gateway binary, and clients as an outside program would be.

use std::time::{Duration, Instant};

use crate::common::*;
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

// ---------------------------------------------------------------------------------------------
// Who is calling, and what the policy lets them do: the helpers.

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_ipc-gateway");
/// The second local user the tests act as (`nobody` on Debian).
const NOBODY: u32 = 65534;
/// A HS256 secret the gateways under test verify tokens with (32 bytes, the minimum).
const SECRET: &[u8] = b"trust-tests-secret-0123456789abc";
/// What a forger signs with instead.
const WRONG_SECRET: &[u8] = b"forgers-secret-00000000000000000";

fn key_file(name: &str) -> String {
    format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The tests' service (see `RecordingService`).
type Service = RecordingService;

/// Returns once nats-server has processed everything `client` sent before (its SUBs above
/// all): `flush()` only writes the socket, so a message to a subject only this client
/// listens on makes the round trip.
async fn confirmed(client: &async_nats::Client) {
    let subject = format!("trust.sync.{}", client.new_inbox().replace('.', "_"));
    let mut sync = client.subscribe(subject.clone()).await.unwrap();
    client.publish(subject, "".into()).await.unwrap();
    client.flush().await.unwrap();
    tokio::time::timeout(PATIENCE, sync.next())
        .await
        .expect("nats-server answered the sync round trip")
        .expect("sync subscription open");
}

/// One header's first value, the name compared in any case.
fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()?
        .iter()
        .find(|(key, _)| {
            let key: &str = key.as_ref();
            key.eq_ignore_ascii_case(name)
        })
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str().to_owned())
}

/// Every header name the message carries.
fn header_names(message: &async_nats::Message) -> Vec<String> {
    message.headers.as_ref().map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .map(|(name, _)| {
                let name: &str = name.as_ref();
                name.to_owned()
            })
            .collect()
    })
}

/// The `Ipc-Gateway-*` header names a message carries.
fn identity_header_names(message: &async_nats::Message) -> Vec<String> {
    header_names(message)
        .into_iter()
        .filter(|name| name.to_ascii_lowercase().starts_with("ipc-gateway-"))
        .collect()
}

/// Asserts that `message` carries no `Ipc-Gateway-*` header.
fn assert_unstamped(message: &async_nats::Message) {
    assert_eq!(
        identity_header_names(message),
        Vec::<String>::new(),
        "{:?}",
        message.headers
    );
}

/// Sends a request to `svc.h` (with the client's own `X-Trace` header) and a publish to
/// `events.h`, and checks that both were answered.
async fn request_and_publish(conn: &mut JsonConn) {
    let request = json!({"id":1,"subject":"svc.h","data":"x","headers":{"X-Trace":"t1"}});
    assert_eq!(conn.call(&request.to_string()).await["data"], "x");
    let publish = json!({"op":"publish","id":2,"subject":"events.h","data":"y"});
    assert_eq!(conn.call(&publish.to_string()).await["ok"], true);
}

/// Asserts that an anonymous gRPC request reaches `service` (on `svc.>`) without an
/// `Ipc-Gateway-*` header.
async fn assert_anonymous_grpc_request_unstamped(gateway: &GatewayProcess, service: &mut Service) {
    let mut client = gateway.grpc().await;
    client.request(grpc_request("svc.g", None)).await.unwrap();
    assert_unstamped(&service.next().await);
}

/// Asserts that a client's own `Ipc-Gateway-Uid` is refused, whatever the gateway stamps.
async fn assert_forged_uid_refused(conn: &mut JsonConn) {
    let forged = json!({"id":3,"subject":"svc.h","data":"z","headers":{"Ipc-Gateway-Uid":"0"}});
    let refused = conn.call(&forged.to_string()).await;
    assert_eq!(refused["error"]["code"], "BAD_REQUEST", "{refused}");
}

/// A policy file in a directory of its own; rewrite it and send SIGHUP to reload.
struct PolicyFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl PolicyFile {
    fn new(text: &str) -> PolicyFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, text).unwrap();
        PolicyFile { _dir: dir, path }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// A gateway that checks `policy` and accepts tokens signed with `secret`.
fn token_gateway(nats: &NatsServer, policy: &PolicyFile, secret: &SecretFile) -> GatewayProcess {
    GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            policy.arg(),
            "--auth-jwt-secret-file",
            secret.arg(),
        ],
    )
}

/// Claims for `sub` that expire `exp_in` seconds from now (negative: expired that long ago).
fn claims(sub: &str, exp_in: i64) -> serde_json::Value {
    json!({"sub": sub, "iat": unix_now(), "exp": unix_now() + exp_in})
}

fn eddsa(claims: &serde_json::Value, private_key_file: &str) -> String {
    let pem = std::fs::read(key_file(private_key_file)).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// A gRPC request to `subject`, with `authorization: Bearer <token>` when given.
fn grpc_request(subject: &str, token: Option<&str>) -> tonic::Request<pb::RequestMessage> {
    let mut request = tonic::Request::new(pb::RequestMessage {
        subject: subject.into(),
        payload: "hi".into(),
        timeout_ms: Some(5000),
        ..Default::default()
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Waits until a counter reaches `value` (a reload is applied by the gateway's own task).
async fn wait_metric(gateway: &GatewayProcess, series: &str, value: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = gateway.metric(series).await.unwrap_or(0.0);
        if now >= value {
            assert_eq!(now, value, "{series}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {now}, wanted {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `setpriv` when this process may use it to run something as another uid (root, with
/// util-linux installed); `None` (and the test prints why it skips) otherwise.
fn setpriv() -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0);
    let found = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists());
    match (root, found) {
        (true, Some(path)) => Some(path),
        (false, _) => {
            println!("SKIPPED: the test process is not root, so it cannot run a second uid");
            None
        }
        (true, None) => {
            println!("SKIPPED: setpriv (util-linux) is not installed");
            None
        }
    }
}

/// Lets other local users reach the gateway's socket: its directory is a 0700 temporary
/// directory (the socket itself gets `--socket-mode 0666`).
fn share_socket_directory(gateway: &GatewayProcess) {
    use std::os::unix::fs::PermissionsExt;
    let dir = gateway.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs `program args…` as `uid` (its own group, no supplementary groups) and returns its
/// output and its pid.
async fn run_as(
    setpriv: &str,
    uid: u32,
    program: &str,
    args: &[&str],
) -> (std::process::Output, u32) {
    let id = uid.to_string();
    let child = tokio::process::Command::new(setpriv)
        .args(["--reuid", &id, "--regid", &id, "--clear-groups", program])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run setpriv");
    let pid = child.id().expect("a pid");
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("the client as another uid finished in time")
        .expect("its output");
    (output, pid)
}

/// A JSON-lines client for the Unix socket, in Python, to be run as another uid: it sends
/// each argument after the socket path as one line and prints each answer line.
const PY_JSON_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for line in sys.argv[2:]:
    f.write(line.encode() + b"\n")
    f.flush()
    print(f.readline().decode().strip(), flush=True)
"#;

fn python3() -> Option<&'static str> {
    // Not the PATH's python3: a root-only pyenv shim comes first there on some machines.
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
}

// ---------------------------------------------------------------------------------------------
// A second local user.

#[tokio::test]
async fn a_second_local_uid_is_identified_by_the_kernel_and_held_to_its_grants() {
    let Some(setpriv) = setpriv() else { return };
    let nats = NatsServer::start();
    // Listens on every svc subject, so a refused request would show up here if it leaked.
    let mut service = Service::start(&nats, "svc.>").await;
    let policy = PolicyFile::new(&format!(
        "[[grant]]\nmatch = {{ uid = {NOBODY} }}\nrequest = {{ allow = [\"svc.ok.>\"] }}\n"
    ));
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--policy", policy.arg(), "--socket-mode", "0666"],
    );
    share_socket_directory(&gateway);
    let socket = gateway.socket.to_str().unwrap();

    let (denied, _) = run_as(
        setpriv,
        NOBODY,
        GATEWAY_BIN,
        &["request", "svc.denied", "no", "--socket", socket],
    )
    .await;
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success(), "{denied:?}");
    assert!(stderr.starts_with("FORBIDDEN: "), "{stderr}");
    assert!(
        stderr.contains("uid=65534"),
        "the refusal names the caller: {stderr}"
    );

    let (allowed, pid) = run_as(
        setpriv,
        NOBODY,
        GATEWAY_BIN,
        &["request", "svc.ok.x", "yes", "--socket", socket],
    )
    .await;
    assert!(allowed.status.success(), "{allowed:?}");
    assert_eq!(String::from_utf8_lossy(&allowed.stdout), "yes\n");
    // The first message the service sees is the allowed one: the refused request never
    // reached NATS.
    let seen = service.next().await;
    assert_eq!(seen.subject.as_str(), "svc.ok.x");
    assert_eq!(header(&seen, "Ipc-Gateway-Uid").as_deref(), Some("65534"));
    assert_eq!(header(&seen, "Ipc-Gateway-User").as_deref(), Some("nobody"));
    assert_eq!(header(&seen, "Ipc-Gateway-Pid"), Some(pid.to_string()));
    assert_eq!(
        header(&seen, "Ipc-Gateway-Frontend").as_deref(),
        Some("uds")
    );
    assert_eq!(
        header(&seen, "Ipc-Gateway-Identity"),
        Some(format!("uid=65534 user=nobody pid={pid}"))
    );

    // The grant is nobody's: root (this process) on the same socket is refused the same
    // subject.
    let mut root = gateway.json().await;
    let refused = root
        .call(&json!({"id":1,"subject":"svc.ok.x","data":"root"}).to_string())
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("uid=0"),
        "{refused}"
    );

    // Claiming another uid in a header is refused, on a connection that stays open.
    let Some(python) = python3() else {
        println!("SKIPPED (the rest): no python3 outside root's home to run as uid {NOBODY}");
        return;
    };
    let lines = [
        json!({"id":1,"subject":"svc.ok.x","data":"forged","headers":{"Ipc-Gateway-Uid":"0"}}),
        json!({"id":2,"subject":"svc.ok.x","data":"forged","headers":{"ipc-gateway-identity":"uid=0 user=root"}}),
        json!({"id":3,"subject":"svc.ok.x","data":"honest","headers":{"X-Claim":"uid=0"}}),
    ]
    .map(|line| line.to_string());
    let mut args = vec!["-c", PY_JSON_CLIENT, socket];
    args.extend(lines.iter().map(String::as_str));
    let (forged, _) = run_as(setpriv, NOBODY, python, &args).await;
    assert!(forged.status.success(), "{forged:?}");
    let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&forged.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(answers.len(), 3, "{answers:?}");
    for answer in &answers[..2] {
        assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{answer}");
    }
    assert_eq!(answers[2]["data"], "honest", "{}", answers[2]);
    let seen = service.next().await;
    assert_eq!(
        seen.payload.as_ref(),
        b"honest",
        "a forged request reached NATS"
    );
    assert_eq!(header(&seen, "Ipc-Gateway-Uid").as_deref(), Some("65534"));
    assert_eq!(header(&seen, "X-Claim").as_deref(), Some("uid=0"));
}

// ---------------------------------------------------------------------------------------------
// Reserved subjects, snooping and answering.

#[tokio::test]
async fn without_a_policy_reserved_subjects_are_refused_and_filtered_out_of_a_wildcard() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.x", Duration::ZERO).await;
    // A plain NATS tap proves that what the gateway's client must not see did go over the bus.
    let tap_client = nats.client().await;
    let mut tap = tap_client.subscribe(">").await.unwrap();
    confirmed(&tap_client).await;
    // One NATS connection: everything below reaches the gateway in the order NATS sent it.
    let gateway = GatewayProcess::start(&nats.url(), &["--nats-connections", "1"]);
    let mut watcher = gateway.json().await;
    for subject in [
        "_INBOX.>",
        "$SYS.>",
        "$JS.>",
        "$JS.API.>",
        "$KV.>",
        "$O.>",
        "_IPC_GATEWAY.>",
    ] {
        let refused = watcher
            .call(&json!({"op":"subscribe","id":"r","subject":subject}).to_string())
            .await;
        assert_eq!(
            refused["error"]["code"], "FORBIDDEN",
            "subscribe {subject}: {refused}"
        );
    }
    for subject in ["$JS.API.INFO", "$SYS.REQ.SERVER.PING"] {
        // Refused before NATS: not NO_RESPONDERS (this nats-server has no JetStream).
        let refused = watcher
            .call(&json!({"id":"q","subject":subject,"data":"","timeout_ms":2000}).to_string())
            .await;
        assert_eq!(
            refused["error"]["code"], "FORBIDDEN",
            "request {subject}: {refused}"
        );
    }
    let refused = watcher
        .call(&json!({"op":"publish","id":"p","subject":"_INBOX.x","data":"spoof"}).to_string())
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    // The connection is still served, and `>` means "all I may see".
    let ack = watcher
        .call(r#"{"op":"subscribe","id":"all","subject":">"}"#)
        .await;
    assert_eq!(ack, json!({"id":"all","ok":true}));

    let mut requester = gateway.json().await;
    let reply = requester
        .call(r#"{"id":1,"subject":"svc.x","data":"secret-answer","timeout_ms":5000}"#)
        .await;
    assert_eq!(reply["data"], "secret-answer", "{reply}");
    let request = watcher.recv().await;
    assert_eq!(request["subject"], "svc.x", "{request}");
    let reply_to = request["reply_to"]
        .as_str()
        .expect("a request has reply_to");
    assert!(reply_to.starts_with("_INBOX."), "{reply_to}");

    let publisher = nats.client().await;
    for (subject, data) in [
        ("$SYS.x", "system"),
        ("_INBOX.someone.1", "inbox"),
        ("events.x", "visible"),
    ] {
        publisher.publish(subject, data.into()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    // The echo's answer on the requester's reply subject, `$SYS.x` and `_INBOX.someone.1` all
    // came before `events.x`: the next message is `events.x`, so none of them was delivered.
    let next = watcher.recv().await;
    assert_eq!(
        (next["subject"].as_str(), next["data"].as_str()),
        (Some("events.x"), Some("visible")),
        "{next}"
    );
    // ... although they were on the bus.
    let mut wanted = vec![
        (reply_to.to_owned(), "secret-answer"),
        ("$SYS.x".to_owned(), "system"),
        ("_INBOX.someone.1".to_owned(), "inbox"),
    ];
    while !wanted.is_empty() {
        let message = tokio::time::timeout(PATIENCE, tap.next())
            .await
            .unwrap_or_else(|_| panic!("the tap never saw {wanted:?}"))
            .unwrap();
        wanted.retain(|(subject, data)| {
            !(message.subject.as_str() == subject && message.payload.as_ref() == data.as_bytes())
        });
    }
}

#[tokio::test]
async fn a_grant_that_names_a_reserved_namespace_lets_only_that_one_through_a_wildcard() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "svc.x", Duration::ZERO).await;
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { any = true }
subscribe = { allow = [">", "$SYS.>"] }
request = { allow = [">"] }
"#,
    );
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--nats-connections", "1", "--policy", policy.arg()],
    );
    let mut watcher = gateway.json().await;
    let ack = watcher
        .call(r#"{"op":"subscribe","id":"all","subject":">"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let refused = watcher
        .call(r#"{"op":"subscribe","id":"i","subject":"_INBOX.>"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let mut requester = gateway.json().await;
    let reply = requester
        .call(r#"{"id":1,"subject":"svc.x","data":"answer","timeout_ms":5000}"#)
        .await;
    assert_eq!(reply["data"], "answer", "{reply}");
    let publisher = nats.client().await;
    for (subject, data) in [
        ("_INBOX.someone.1", "inbox"),
        ("$SYS.x", "system"),
        ("events.x", "visible"),
    ] {
        publisher.publish(subject, data.into()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    // In NATS's order: the request, (not the answer on the requester's inbox, nor
    // `_INBOX.someone.1`), `$SYS.x`, `events.x`.
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("events.x") {
        seen.push(watcher.recv().await["subject"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["svc.x", "$SYS.x", "events.x"]);
}

#[tokio::test]
async fn a_client_that_sees_a_reply_subject_cannot_snoop_on_or_answer_other_requests() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let mut snoop = gateway.json().await;
    let ack = snoop
        .call(r#"{"op":"subscribe","id":"s","subject":"svc.x"}"#)
        .await;
    assert_eq!(ack["ok"], true);
    let mut victim = gateway.json().await;
    victim
        .send(r#"{"id":1,"subject":"svc.x","data":"q","timeout_ms":8000}"#)
        .await;
    let request = snoop.recv().await;
    assert_eq!(request["subject"], "svc.x", "{request}");
    let reply_to = request["reply_to"].as_str().unwrap().to_owned();
    let (prefix, _token) = reply_to.rsplit_once('.').unwrap();
    for pattern in [
        format!("{prefix}.*"),
        format!("{prefix}.>"),
        "_INBOX.>".to_owned(),
        "_INBOX.*.*".to_owned(),
    ] {
        let refused = snoop
            .call(&json!({"op":"subscribe","id":"snoop","subject":pattern}).to_string())
            .await;
        assert_eq!(
            refused["error"]["code"], "FORBIDDEN",
            "{pattern}: {refused}"
        );
    }
    // A third client that saw the reply subject (it leaked, say) may not answer it: only the
    // client the request was delivered to may.
    let mut spoofer = gateway.json().await;
    let refused = spoofer
        .call(&json!({"op":"publish","id":"p","subject":reply_to,"data":"SPOOF"}).to_string())
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let answered = snoop
        .call(&json!({"op":"publish","id":"a","subject":reply_to,"data":"real"}).to_string())
        .await;
    assert_eq!(answered, json!({"id":"a","ok":true}));
    let reply = victim.recv().await;
    assert_eq!(
        (reply["id"].as_i64(), reply["data"].as_str()),
        (Some(1), Some("real")),
        "{reply}"
    );
}

#[tokio::test]
async fn a_client_answers_a_request_it_received_once_although_it_may_publish_nothing() {
    let nats = NatsServer::start();
    // Local processes (this test runs as one uid) serve `svc.>` and may publish nothing;
    // anonymous WebSocket clients may request it.
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { anonymous = false }
subscribe = { allow = ["svc.>"] }

[[grant]]
match = { anonymous = true }
request = { allow = ["svc.>"] }
"#,
    );
    let gateway = GatewayProcess::start(&nats.url(), &["--policy", policy.arg()]);
    let mut server = gateway.json().await;
    let ack = server
        .call(r#"{"op":"subscribe","id":"s","subject":"svc.>"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let refused = server
        .call(r#"{"op":"publish","id":"p","subject":"svc.other","data":"x"}"#)
        .await;
    assert_eq!(
        refused["error"]["code"], "FORBIDDEN",
        "publishes nothing: {refused}"
    );

    let mut requester = ws::connect(&gateway, None).await.unwrap();
    ws::send(
        &mut requester,
        r#"{"id":7,"subject":"svc.add","data":"1+1","timeout_ms":8000}"#,
    )
    .await;
    let request = server.recv().await;
    assert_eq!(request["subject"], "svc.add", "{request}");
    let reply_to = request["reply_to"].as_str().unwrap().to_owned();
    let answered = server
        .call(&json!({"op":"publish","id":"a1","subject":reply_to,"data":"2"}).to_string())
        .await;
    assert_eq!(answered, json!({"id":"a1","ok":true}));
    let reply = ws::next_json(&mut requester).await;
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(reply["data"], "2", "{reply}");
    // The answer carries who answered, like every message the gateway sends for a client.
    assert_eq!(reply["headers"]["Ipc-Gateway-Uid"], "0", "{reply}");

    let again = server
        .call(&json!({"op":"publish","id":"a2","subject":reply_to,"data":"3"}).to_string())
        .await;
    assert_eq!(
        again["error"]["code"], "FORBIDDEN",
        "a second answer: {again}"
    );
    let (prefix, _) = reply_to.rsplit_once('.').unwrap();
    for subject in [
        "_INBOX.x".to_owned(),
        format!("{prefix}.1"),
        format!("{reply_to}x"),
    ] {
        let refused = server
            .call(&json!({"op":"publish","id":"i","subject":subject,"data":"4"}).to_string())
            .await;
        assert_eq!(
            refused["error"]["code"], "FORBIDDEN",
            "{subject}: {refused}"
        );
    }
}

#[tokio::test]
async fn a_grpc_client_answers_a_request_from_its_subscription_on_the_same_connection_only() {
    let nats = NatsServer::start();
    // Anonymous gRPC clients may subscribe to svc.> and publish nothing; local ones request.
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { anonymous = true }
subscribe = { allow = ["svc.>"] }

[[grant]]
match = { anonymous = false }
request = { allow = ["svc.>"] }
"#,
    );
    let gateway = GatewayProcess::start(&nats.url(), &["--policy", policy.arg()]);
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            subject: "svc.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut requester = gateway.json().await;
    requester
        .send(r#"{"id":1,"subject":"svc.q","data":"q","timeout_ms":8000}"#)
        .await;
    let request = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(request.subject, "svc.q");
    let answer = |payload: &'static str| pb::PublishMessage {
        subject: request.reply_to.clone(),
        payload: payload.into(),
        ..Default::default()
    };
    // Another connection of the same (anonymous) identity did not receive the request.
    let mut other = gateway.grpc().await;
    let status = other.publish(answer("SPOOF")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    client.publish(answer("a")).await.unwrap();
    let reply = requester.recv().await;
    assert_eq!(reply["data"], "a", "{reply}");
    let status = client.publish(answer("again")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// Tokens: WebSocket and gRPC.

/// Bob (a token's subject) may request `svc.>`; anonymous callers only `public.>`.
const TOKEN_POLICY: &str = r#"
[[grant]]
match = { sub = "bob" }
request = { allow = ["svc.>"] }

[[grant]]
match = { anonymous = true }
request = { allow = ["public.>"] }
"#;

/// A token with `alg: none` and no signature.
fn unsigned(claims: &serde_json::Value) -> String {
    use base64::Engine;
    let encode = |value: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    format!(
        "{}.{}.",
        encode(json!({"alg":"none","typ":"JWT"})),
        encode(claims.clone())
    )
}

/// Asserts that the service saw a request from the token subject `bob` on `frontend`, and
/// nothing of the token itself.
fn assert_from_bob(seen: &async_nats::Message, frontend: &str, token: &str) {
    assert_eq!(header(seen, "Ipc-Gateway-Sub").as_deref(), Some("bob"));
    assert_eq!(
        header(seen, "Ipc-Gateway-Identity").as_deref(),
        Some("sub=bob")
    );
    assert_eq!(
        header(seen, "Ipc-Gateway-Frontend").as_deref(),
        Some(frontend)
    );
    assert_eq!(header(seen, "Ipc-Gateway-Uid"), None, "a token has no uid");
    assert_eq!(header(seen, "Authorization"), None, "{:?}", seen.headers);
    let leaked = seen
        .headers
        .iter()
        .flat_map(|headers| headers.iter())
        .any(|(_, values)| values.iter().any(|value| value.as_str().contains(token)));
    assert!(!leaked, "the token reached the service: {:?}", seen.headers);
}

/// The WebSocket request every token test sends; returns the answer.
async fn ws_request(ws: &mut ws::Ws, subject: &str, data: &str) -> serde_json::Value {
    ws::call(
        ws,
        &json!({"id":1,"subject":subject,"data":data,"timeout_ms":5000}).to_string(),
    )
    .await
}

#[tokio::test]
async fn websocket_takes_an_hs256_token_in_the_authorization_header_or_the_subprotocol_list() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let policy = PolicyFile::new(TOKEN_POLICY);
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = token_gateway(&nats, &policy, &secret);
    let valid = hs256(&claims("bob", 600), SECRET);

    // Without a token: anonymous, and the policy for anonymous callers applies.
    let (mut anonymous, _) = ws::connect_with_headers(&gateway, &[]).await.unwrap();
    let refused = ws_request(&mut anonymous, "svc.who", "anonymous").await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");

    // The Authorization header (the scheme word in any case).
    for scheme in ["Bearer", "bearer"] {
        let authorization = format!("{scheme} {valid}");
        let (mut bob, _) = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)])
            .await
            .unwrap();
        let reply = ws_request(&mut bob, "svc.who", scheme).await;
        assert_eq!(reply["data"], scheme, "{reply}");
        let seen = service.next().await;
        assert_eq!(seen.payload.as_ref(), scheme.as_bytes());
        assert_from_bob(&seen, "ws", &valid);
    }

    // The subprotocol list, as a browser sends it: `ipc-gateway.v1` is selected, the token
    // is not echoed.
    let offered = format!("ipc-gateway.v1, bearer.{valid}");
    let (mut browser, response) =
        ws::connect_with_headers(&gateway, &[("Sec-WebSocket-Protocol", &offered)])
            .await
            .unwrap();
    let selected = response.headers().get("sec-websocket-protocol");
    assert_eq!(
        selected.and_then(|value| value.to_str().ok()),
        Some("ipc-gateway.v1")
    );
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(&valid),
            "the token echoed in {name}: {value}"
        );
    }
    let reply = ws_request(&mut browser, "svc.who", "subprotocol").await;
    assert_eq!(reply["data"], "subprotocol", "{reply}");
    assert_from_bob(&service.next().await, "ws", &valid);

    // A bad token is refused on the upgrade, in either form.
    let bad = [
        ("expired", hs256(&claims("bob", -3600), SECRET)),
        ("forged", hs256(&claims("bob", 600), WRONG_SECRET)),
        ("unsigned", unsigned(&claims("bob", 600))),
        ("malformed", "not.a-jwt.at-all".to_owned()),
    ];
    for (what, token) in &bad {
        let authorization = format!("Bearer {token}");
        let refused =
            ws::connect_with_headers(&gateway, &[("Authorization", &authorization)]).await;
        assert_eq!(refused.err(), Some(401), "{what} token in Authorization");
        let offered = format!("ipc-gateway.v1, bearer.{token}");
        let refused =
            ws::connect_with_headers(&gateway, &[("Sec-WebSocket-Protocol", &offered)]).await;
        assert_eq!(
            refused.err(),
            Some(401),
            "{what} token in the subprotocol list"
        );
    }
}

#[tokio::test]
async fn a_websocket_auth_message_changes_who_is_calling_and_a_bad_one_closes_with_1008() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let policy = PolicyFile::new(TOKEN_POLICY);
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = token_gateway(&nats, &policy, &secret);
    let valid = hs256(&claims("bob", 600), SECRET);

    let mut ws = ws::connect(&gateway, None).await.unwrap();
    let refused = ws_request(&mut ws, "svc.who", "before").await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let authenticated = ws::call(
        &mut ws,
        &json!({"op":"auth","id":1,"token":valid}).to_string(),
    )
    .await;
    assert_eq!(authenticated, json!({"op":"auth","id":1,"ok":true}));
    // Same connection, now bob: bob's grant applies, and the service is told it is bob.
    let reply = ws_request(&mut ws, "svc.who", "after").await;
    assert_eq!(reply["data"], "after", "{reply}");
    let seen = service.next().await;
    assert_eq!(seen.payload.as_ref(), b"after");
    assert_from_bob(&seen, "ws", &valid);

    for (what, token) in [
        ("expired", hs256(&claims("bob", -3600), SECRET)),
        ("forged", hs256(&claims("bob", 600), WRONG_SECRET)),
    ] {
        let mut ws = ws::connect(&gateway, None).await.unwrap();
        let answer = ws::call(
            &mut ws,
            &json!({"op":"auth","id":1,"token":token}).to_string(),
        )
        .await;
        assert_eq!(answer["id"], 1, "{what}: {answer}");
        assert_eq!(
            answer["error"]["code"], "UNAUTHENTICATED",
            "{what}: {answer}"
        );
        assert_eq!(ws::close_code(&mut ws).await, Some(1008), "{what}");
    }
}

#[tokio::test]
async fn an_auth_that_changes_who_a_connection_is_is_refused_while_it_holds_subscriptions_or_names()
{
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { sub = "bob" }
request = { allow = ["svc.>"] }
subscribe = { allow = ["bob.>"] }

[[grant]]
match = { sub = "alice" }
subscribe = { allow = ["alice.>"] }

[[grant]]
match = { anonymous = true }
subscribe = { allow = ["public.>"] }
"#,
    );
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = token_gateway(&nats, &policy, &secret);
    let bob = hs256(&claims("bob", 600), SECRET);
    let alice = hs256(&claims("alice", 600), SECRET);
    let auth = |token: &str| json!({"op":"auth","id":"a","token":token}).to_string();

    // Bob subscribes: an auth as alice would leave bob's subscription running as alice.
    let (mut ws, _) =
        ws::connect_with_headers(&gateway, &[("Authorization", &format!("Bearer {bob}"))])
            .await
            .unwrap();
    let subscribed = ws::call(&mut ws, r#"{"op":"subscribe","id":"s","subject":"bob.>"}"#).await;
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    let refused = ws::call(&mut ws, &auth(&alice)).await;
    assert_eq!(refused["error"]["code"], "BAD_REQUEST", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sub=bob"),
        "{refused}"
    );
    // The connection goes on, still as bob.
    let reply = ws_request(&mut ws, "svc.who", "still bob").await;
    assert_eq!(reply["data"], "still bob", "{reply}");
    assert_from_bob(&service.next().await, "ws", &bob);
    // A fresh token for bob (a refresh) is accepted whatever the connection holds.
    let refreshed = hs256(&claims("bob", 1200), SECRET);
    let answer = ws::call(&mut ws, &auth(&refreshed)).await;
    assert_eq!(answer["ok"], true, "{answer}");

    // An anonymous subscriber must let go of what it holds before it becomes bob.
    let mut ws = ws::connect(&gateway, None).await.unwrap();
    let subscribed = ws::call(
        &mut ws,
        r#"{"op":"subscribe","id":"p","subject":"public.news"}"#,
    )
    .await;
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    let refused = ws::call(&mut ws, &auth(&bob)).await;
    assert_eq!(refused["error"]["code"], "BAD_REQUEST", "{refused}");
    let unsubscribed = ws::call(&mut ws, r#"{"op":"unsubscribe","id":"p"}"#).await;
    assert_eq!(unsubscribed["ok"], true, "{unsubscribed}");
    let answer = ws::call(&mut ws, &auth(&bob)).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let reply = ws_request(&mut ws, "svc.who", "now bob").await;
    assert_eq!(reply["data"], "now bob", "{reply}");
}

#[tokio::test]
async fn with_auth_required_websocket_and_grpc_callers_without_a_token_are_refused() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--auth-required", "--auth-jwt-secret-file", secret.arg()],
    );
    let valid = hs256(&claims("bob", 600), SECRET);

    assert_eq!(ws::connect(&gateway, None).await.err(), Some(401));
    let refused =
        ws::connect_with_headers(&gateway, &[("Sec-WebSocket-Protocol", "ipc-gateway.v1")]).await;
    assert_eq!(
        refused.err(),
        Some(401),
        "a subprotocol list without a token"
    );
    let authorization = format!("Bearer {valid}");
    let (mut ws, _) = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)])
        .await
        .unwrap();
    let reply = ws_request(&mut ws, "svc.who", "ws").await;
    assert_eq!(reply["data"], "ws", "{reply}");
    assert_from_bob(&service.next().await, "ws", &valid);

    let mut client = gateway.grpc().await;
    let status = client
        .request(grpc_request("svc.who", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = client
        .subscribe(pb::SubscribeRequest {
            subject: "svc.>".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let reply = client
        .request(grpc_request("svc.who", Some(&valid)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload.as_ref(), b"hi");
    assert_from_bob(&service.next().await, "grpc", &valid);
}

#[tokio::test]
async fn grpc_calls_each_carry_their_own_hs256_token_which_never_reaches_the_service() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let policy = PolicyFile::new(TOKEN_POLICY);
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = token_gateway(&nats, &policy, &secret);
    let valid = hs256(&claims("bob", 600), SECRET);
    // One HTTP/2 connection for every call below: the identity is the call's, not the
    // connection's.
    let mut client = gateway.grpc().await;

    let mut request = grpc_request("svc.who", Some(&valid));
    request
        .metadata_mut()
        .insert("x-trace", "t1".parse().unwrap());
    let reply = client.request(request).await.unwrap().into_inner();
    assert_eq!(reply.payload.as_ref(), b"hi");
    let seen = service.next().await;
    assert_from_bob(&seen, "grpc", &valid);
    // Other metadata is forwarded, so the missing `authorization` was left out on purpose.
    assert_eq!(header(&seen, "x-trace").as_deref(), Some("t1"));

    let status = client
        .request(grpc_request("svc.who", None))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "anonymous: {status:?}"
    );
    assert!(status.message().starts_with("FORBIDDEN"), "{status:?}");

    let mut wrong_scheme = grpc_request("svc.who", None);
    wrong_scheme
        .metadata_mut()
        .insert("authorization", format!("Basic {valid}").parse().unwrap());
    let bad = [
        (
            "expired",
            grpc_request("svc.who", Some(&hs256(&claims("bob", -3600), SECRET))),
        ),
        (
            "forged",
            grpc_request("svc.who", Some(&hs256(&claims("bob", 600), WRONG_SECRET))),
        ),
        (
            "unsigned",
            grpc_request("svc.who", Some(&unsigned(&claims("bob", 600)))),
        ),
        ("malformed", grpc_request("svc.who", Some("garbage"))),
        ("not bearer", wrong_scheme),
    ];
    for (what, request) in bad {
        let status = client.request(request).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{what}: {status:?}"
        );
        assert_eq!(
            status
                .metadata()
                .get("ipc-gateway-error")
                .and_then(|v| v.to_str().ok()),
            Some("UNAUTHENTICATED"),
            "{what}"
        );
    }
    // None of the refused calls reached NATS: the next message the service sees is this one.
    let reply = client
        .request(grpc_request("svc.last", Some(&valid)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload.as_ref(), b"hi");
    assert_eq!(service.next().await.subject.as_str(), "svc.last");
}

#[tokio::test]
async fn eddsa_tokens_are_checked_with_the_public_key_on_websocket_and_grpc() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let policy = PolicyFile::new(TOKEN_POLICY);
    let public_key = key_file("ed25519.pub.pem");
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--policy",
            policy.arg(),
            "--auth-jwt-public-key-file",
            &public_key,
        ],
    );
    let valid = eddsa(&claims("bob", 600), "ed25519.pem");

    let authorization = format!("Bearer {valid}");
    let (mut ws, _) = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)])
        .await
        .unwrap();
    let reply = ws_request(&mut ws, "svc.who", "eddsa").await;
    assert_eq!(reply["data"], "eddsa", "{reply}");
    assert_from_bob(&service.next().await, "ws", &valid);

    let mut client = gateway.grpc().await;
    let reply = client
        .request(grpc_request("svc.who", Some(&valid)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload.as_ref(), b"hi");
    assert_from_bob(&service.next().await, "grpc", &valid);

    let public_pem = std::fs::read(&public_key).unwrap();
    let bad = [
        ("expired", eddsa(&claims("bob", -3600), "ed25519.pem")),
        (
            "signed with another key",
            eddsa(&claims("bob", 600), "ed25519-other.pem"),
        ),
        // The classic confusion: HS256 with the public key as the shared secret.
        (
            "HS256 keyed with the public key",
            hs256(&claims("bob", 600), &public_pem),
        ),
        ("HS256", hs256(&claims("bob", 600), SECRET)),
    ];
    for (what, token) in &bad {
        let authorization = format!("Bearer {token}");
        let refused =
            ws::connect_with_headers(&gateway, &[("Authorization", &authorization)]).await;
        assert_eq!(refused.err(), Some(401), "WebSocket, {what}");
        let status = client
            .request(grpc_request("svc.who", Some(token)))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "gRPC, {what}: {status:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reloading the policy.

const OK_RELOADS: &str = r#"ipc_gateway_policy_reloads_total{outcome="ok"}"#;
const FAILED_RELOADS: &str = r#"ipc_gateway_policy_reloads_total{outcome="failed"}"#;

#[tokio::test]
async fn a_sighup_reload_applies_to_open_connections_and_a_broken_file_keeps_the_policy() {
    let nats = NatsServer::start();
    let _service = Service::start(&nats, "svc.>").await;
    // This test's connections are all local processes of one uid.
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { anonymous = false }
request = { allow = ["svc.a.>"] }
subscribe = { allow = ["events.>", "keep.>"] }
"#,
    );
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--policy", policy.arg(), "--nats-connections", "1"],
    );
    let mut conn = gateway.json().await;
    let request = |subject: &str| json!({"id":subject,"subject":subject,"data":"x"}).to_string();
    assert_eq!(conn.call(&request("svc.a.1")).await["data"], "x");
    let refused = conn.call(&request("svc.b.1")).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    for (sid, subject) in [("ev", "events.>"), ("keep", "keep.>")] {
        let ack = conn
            .call(&json!({"op":"subscribe","id":sid,"subject":subject}).to_string())
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
    }

    // Swap svc.a for svc.b, and take events away.
    policy.write(
        r#"
[[grant]]
match = { anonymous = false }
request = { allow = ["svc.b.>"] }
subscribe = { allow = ["keep.>"] }
"#,
    );
    gateway.signal("HUP");
    wait_metric(&gateway, OK_RELOADS, 1.0).await;
    // The subscription the new policy does not allow is ended, with a notice.
    let notice = conn.recv().await;
    assert_eq!(notice["op"], "unsubscribed", "{notice}");
    assert_eq!(notice["sid"], "ev", "{notice}");
    assert_eq!(notice["error"]["code"], "FORBIDDEN", "{notice}");
    // The same connection, under the new rules.
    let refused = conn.call(&request("svc.a.2")).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    assert_eq!(conn.call(&request("svc.b.2")).await["data"], "x");
    let refused = conn
        .call(r#"{"op":"subscribe","id":"ev2","subject":"events.>"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    // No more messages on the ended subscription; the other one still delivers (and comes
    // after, so the first was not delivered).
    let publisher = nats.client().await;
    publisher.publish("events.x", "gone".into()).await.unwrap();
    publisher.publish("keep.x", "kept".into()).await.unwrap();
    publisher.flush().await.unwrap();
    let message = conn.recv().await;
    assert_eq!(
        (message["sid"].as_str(), message["data"].as_str()),
        (Some("keep"), Some("kept")),
        "{message}"
    );
    let ack = conn.call(r#"{"op":"unsubscribe","id":"ev"}"#).await;
    assert_eq!(ack["error"]["code"], "BAD_REQUEST", "ev is gone: {ack}");

    // A file that does not load (a misspelt key; it would give svc.a back) keeps the policy.
    policy.write(
        r#"
[[grant]]
match = { anonymous = false }
request = { allow = ["svc.a.>", "svc.b.>"] }
subscribe = { allow = ["events.>", "keep.>"] }
publsh = { allow = [">"] }
"#,
    );
    gateway.signal("HUP");
    wait_metric(&gateway, FAILED_RELOADS, 1.0).await;
    assert_eq!(gateway.metric(OK_RELOADS).await, Some(1.0));
    let refused = conn.call(&request("svc.a.3")).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    assert_eq!(conn.call(&request("svc.b.3")).await["data"], "x");
    let refused = conn
        .call(r#"{"op":"subscribe","id":"ev3","subject":"events.>"}"#)
        .await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    publisher.publish("keep.y", "still".into()).await.unwrap();
    publisher.flush().await.unwrap();
    let message = conn.recv().await;
    assert_eq!(
        (message["sid"].as_str(), message["data"].as_str()),
        (Some("keep"), Some("still")),
        "{message}"
    );
    // A new connection gets the policy in force too.
    let mut fresh = gateway.json().await;
    let refused = fresh.call(&request("svc.a.4")).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
}

/// Everyone may subscribe to `svc.>`, `bin.>` and `other.>` until `REVOKED_POLICY` takes
/// the first two away.
const SUBSCRIBE_POLICY: &str = r#"
[[grant]]
match = { any = true }
subscribe = { allow = ["svc.>", "bin.>", "other.>"] }
"#;
const REVOKED_POLICY: &str = r#"
[[grant]]
match = { any = true }
subscribe = { allow = ["other.>"] }
"#;

#[tokio::test]
async fn a_reload_ends_a_revoked_subscription_with_a_notice_in_binary_and_on_websocket() {
    use ipc_gateway::protocol::binary::{FrameParts, frame_type};
    let nats = NatsServer::start();
    let policy = PolicyFile::new(SUBSCRIBE_POLICY);
    let gateway = GatewayProcess::start(&nats.url(), &["--policy", policy.arg()]);
    let mut raw = gateway.raw().await;
    for (id, subject) in [(3, "bin.>"), (4, "other.>")] {
        raw.send(&frame(FrameParts {
            frame_type: frame_type::SUBSCRIBE,
            id,
            subject: subject.as_bytes(),
            ..FrameParts::default()
        }))
        .await;
        let ack = raw.recv().await;
        assert_eq!(
            (ack.header.frame_type, ack.header.id),
            (frame_type::ACK, id)
        );
    }
    let mut ws = ws::connect(&gateway, None).await.unwrap();
    for (sid, subject) in [("w", "svc.>"), ("o", "other.>")] {
        let ack = ws::call(
            &mut ws,
            &json!({"op":"subscribe","id":sid,"subject":subject}).to_string(),
        )
        .await;
        assert_eq!(ack["ok"], true, "{ack}");
    }

    policy.write(REVOKED_POLICY);
    gateway.signal("HUP");
    wait_metric(&gateway, OK_RELOADS, 1.0).await;
    let notice = raw.recv().await;
    assert_eq!(
        (notice.header.frame_type, notice.header.id, notice.code()),
        (frame_type::UNSUBSCRIBED, 3, "FORBIDDEN".to_owned()),
        "{notice:?}"
    );
    let notice = ws::next_json(&mut ws).await;
    assert_eq!(
        (&notice["op"], &notice["sid"], &notice["error"]["code"]),
        (&json!("unsubscribed"), &json!("w"), &json!("FORBIDDEN")),
        "{notice}"
    );
    // Nothing more arrives on them: the subscription that stays gets the message published
    // after theirs first.
    let publisher = nats.client().await;
    for subject in ["bin.x", "svc.x", "other.x"] {
        publisher.publish(subject, subject.into()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let message = raw.recv().await;
    assert_eq!(
        (
            message.header.frame_type,
            message.header.id,
            &message.subject[..]
        ),
        (frame_type::MSG, 4, &b"other.x"[..]),
        "{message:?}"
    );
    let message = ws::next_json(&mut ws).await;
    assert_eq!(
        (&message["sid"], &message["subject"]),
        (&json!("o"), &json!("other.x")),
        "{message}"
    );
}

#[tokio::test]
async fn a_reload_ends_a_revoked_grpc_subscription_with_permission_denied() {
    let nats = NatsServer::start();
    let policy = PolicyFile::new(SUBSCRIBE_POLICY);
    let gateway = GatewayProcess::start(&nats.url(), &["--policy", policy.arg()]);
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            subject: "svc.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    policy.write(REVOKED_POLICY);
    gateway.signal("HUP");
    wait_metric(&gateway, OK_RELOADS, 1.0).await;
    let ended = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("the revoked stream ends in time");
    let status = match ended {
        Some(Err(status)) => status,
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().starts_with("FORBIDDEN"), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// Limits and identity headers.

#[tokio::test]
async fn connections_per_identity_are_bounded_and_a_closed_one_frees_its_place() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--max-connections-per-identity",
            "2",
            "--socket-mode",
            "0666",
        ],
    );
    let ping = r#"{"op":"ping","id":1}"#;
    let mut first = gateway.json().await;
    assert_eq!(first.call(ping).await, json!({"op":"pong","id":1}));
    let mut second = gateway.json().await;
    assert_eq!(second.call(ping).await, json!({"op":"pong","id":1}));
    let mut third = gateway.json().await;
    let refused = third.call(ping).await;
    assert_eq!(refused["error"]["code"], "OVERLOADED", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max-connections-per-identity"),
        "{refused}"
    );
    assert_eq!(
        third.recv_or_eof().await,
        None,
        "the refused connection is closed"
    );

    // The limit is per identity: another uid still gets in.
    if let Some(setpriv) = setpriv() {
        share_socket_directory(&gateway);
        let socket = gateway.socket.to_str().unwrap();
        let (other, _) = run_as(
            setpriv,
            NOBODY,
            GATEWAY_BIN,
            &["publish", "events.x", "hi", "--socket", socket],
        )
        .await;
        assert!(
            other.status.success(),
            "uid {NOBODY} was refused: {other:?}"
        );
    }

    // The first connection goes; once the gateway has seen it close, its place is free.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    let mut conn = loop {
        let mut conn = gateway.json().await;
        let answer = conn.call(ping).await;
        if answer["op"] == "pong" {
            break conn;
        }
        assert_eq!(answer["error"]["code"], "OVERLOADED", "{answer}");
        assert!(
            Instant::now() < deadline,
            "the closed connection's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(conn.call(ping).await["op"], "pong");
    assert_eq!(second.call(ping).await["op"], "pong");
}

#[tokio::test]
async fn a_token_subject_holds_at_most_its_connections_however_it_authenticates() {
    let nats = NatsServer::start();
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--max-connections-per-identity",
            "2",
            "--auth-jwt-secret-file",
            secret.arg(),
        ],
    );
    let valid = hs256(&claims("bob", 600), SECRET);
    let authorization = format!("Bearer {valid}");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (ws, _) = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)])
            .await
            .unwrap();
        held.push(ws);
    }
    let refused = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)]).await;
    assert_eq!(
        refused.err(),
        Some(503),
        "bob's third connection on the upgrade"
    );
    // An anonymous connection (not counted) that then says it is bob is bob's third too.
    let mut ws = ws::connect(&gateway, None).await.unwrap();
    let answer = ws::call(
        &mut ws,
        &json!({"op":"auth","id":1,"token":valid}).to_string(),
    )
    .await;
    assert_eq!(answer["error"]["code"], "OVERLOADED", "{answer}");
}

#[tokio::test]
async fn with_identity_headers_off_the_service_sees_none_and_clients_still_cannot_set_them() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let mut events = Service::start(&nats, "events.>").await;
    let stamping = GatewayProcess::start(&nats.url(), &[]);
    let plain = GatewayProcess::start(&nats.url(), &["--identity-headers", "false"]);

    // The same messages through a gateway that stamps: the service sees who sent them.
    let mut conn = stamping.json().await;
    request_and_publish(&mut conn).await;
    let seen = service.next().await;
    assert_eq!(header(&seen, "Ipc-Gateway-Uid").as_deref(), Some("0"));
    assert_eq!(header(&seen, "X-Trace").as_deref(), Some("t1"));
    assert_eq!(
        header(&events.next().await, "Ipc-Gateway-Uid").as_deref(),
        Some("0")
    );

    let mut conn = plain.json().await;
    request_and_publish(&mut conn).await;
    let seen = service.next().await;
    assert_unstamped(&seen);
    assert_eq!(
        header(&seen, "X-Trace").as_deref(),
        Some("t1"),
        "the client's headers still go"
    );
    assert_unstamped(&events.next().await);
    assert_anonymous_grpc_request_unstamped(&plain, &mut service).await;

    // Stamping off does not let a client claim an identity.
    assert_forged_uid_refused(&mut conn).await;
}

#[tokio::test]
async fn with_minimal_identity_headers_a_service_sees_only_the_uid_or_the_token_subject() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let mut events = Service::start(&nats, "events.>").await;
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--identity-headers",
            "minimal",
            "--auth-jwt-secret-file",
            secret.arg(),
            "--socket-mode",
            "0666",
        ],
    );

    // A local caller: its uid, in one header, on requests and publishes; its own headers too.
    let mut conn = gateway.json().await;
    request_and_publish(&mut conn).await;
    let seen = service.next().await;
    assert_eq!(identity_header_names(&seen), ["Ipc-Gateway-Uid"]);
    assert_eq!(header(&seen, "Ipc-Gateway-Uid").as_deref(), Some("0"));
    assert_eq!(header(&seen, "X-Trace").as_deref(), Some("t1"));
    let seen = events.next().await;
    assert_eq!(identity_header_names(&seen), ["Ipc-Gateway-Uid"]);
    assert_eq!(header(&seen, "Ipc-Gateway-Uid").as_deref(), Some("0"));

    // Another local user is told apart by the kernel, not by anything it sends.
    if let Some(setpriv) = setpriv() {
        share_socket_directory(&gateway);
        let socket = gateway.socket.to_str().unwrap();
        let (other, _) = run_as(
            setpriv,
            NOBODY,
            GATEWAY_BIN,
            &["publish", "events.nobody", "hi", "--socket", socket],
        )
        .await;
        assert!(other.status.success(), "uid {NOBODY}: {other:?}");
        let seen = events.next().await;
        assert_eq!(seen.subject.as_str(), "events.nobody");
        assert_eq!(identity_header_names(&seen), ["Ipc-Gateway-Uid"]);
        assert_eq!(header(&seen, "Ipc-Gateway-Uid"), Some(NOBODY.to_string()));
    }

    // A WebSocket caller with a token: its subject, in one header.
    let valid = hs256(&claims("bob", 600), SECRET);
    let authorization = format!("Bearer {valid}");
    let (mut bob, _) = ws::connect_with_headers(&gateway, &[("Authorization", &authorization)])
        .await
        .unwrap();
    assert_eq!(ws_request(&mut bob, "svc.who", "bob").await["data"], "bob");
    let seen = service.next().await;
    assert_eq!(identity_header_names(&seen), ["Ipc-Gateway-Sub"]);
    assert_eq!(header(&seen, "Ipc-Gateway-Sub").as_deref(), Some("bob"));

    // An anonymous caller has nothing to carry.
    assert_anonymous_grpc_request_unstamped(&gateway, &mut service).await;

    // Nor can a client claim one.
    assert_forged_uid_refused(&mut conn).await;
}

#[tokio::test]
async fn a_client_set_identity_header_is_refused_on_every_front_end() {
    let nats = NatsServer::start();
    let mut service = Service::start(&nats, "svc.>").await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);

    // JSON lines on the Unix socket, any case.
    let mut conn = gateway.json().await;
    for name in [
        "Ipc-Gateway-Uid",
        "ipc-gateway-identity",
        "IPC-GATEWAY-SUB",
        "Ipc-Gateway-Anything",
    ] {
        for op in ["request", "publish"] {
            let line = json!({"op":op,"id":1,"subject":"svc.h","data":"x","headers":{name:"0"}});
            let refused = conn.call(&line.to_string()).await;
            assert_eq!(
                refused["error"]["code"], "BAD_REQUEST",
                "{op} {name}: {refused}"
            );
        }
    }
    // Binary frames on the Unix socket.
    let mut raw = gateway.raw().await;
    let mut headers = ipc_gateway::protocol::Headers::new();
    headers.append_from_gateway("Ipc-Gateway-Uid", "0").unwrap();
    raw.send(&frame(ipc_gateway::protocol::binary::FrameParts {
        frame_type: ipc_gateway::protocol::binary::frame_type::REQUEST,
        id: 5,
        subject: b"svc.h",
        headers: Some(&headers),
        payload: b"x",
        ..Default::default()
    }))
    .await;
    let refused = raw.recv().await;
    assert_eq!(
        (refused.header.frame_type, refused.header.id, refused.code()),
        (
            ipc_gateway::protocol::binary::frame_type::ERROR,
            5,
            "BAD_REQUEST".to_owned()
        )
    );
    // WebSocket.
    let mut ws = ws::connect(&gateway, None).await.unwrap();
    let refused = ws::call(
        &mut ws,
        &json!({"id":1,"subject":"svc.h","data":"x","headers":{"ipc-gateway-pid":"1"}}).to_string(),
    )
    .await;
    assert_eq!(refused["error"]["code"], "BAD_REQUEST", "{refused}");
    // gRPC: a listed header, and call metadata.
    let mut client = gateway.grpc().await;
    let mut listed = grpc_request("svc.h", None);
    listed.get_mut().headers.push(pb::Header {
        name: "Ipc-Gateway-Uid".into(),
        value: "0".into(),
    });
    let status = client.request(listed).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut metadata = grpc_request("svc.h", None);
    metadata
        .metadata_mut()
        .insert("ipc-gateway-uid", "0".parse().unwrap());
    let status = client.request(metadata).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut publish = tonic::Request::new(pb::PublishMessage {
        subject: "svc.h".into(),
        payload: "x".into(),
        ..Default::default()
    });
    publish
        .metadata_mut()
        .insert("ipc-gateway-identity", "uid=0".parse().unwrap());
    let status = client.publish(publish).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Every connection is still served, and nothing above reached NATS: the first message
    // the service sees is this one.
    let reply = conn
        .call(r#"{"id":9,"subject":"svc.last","data":"ok"}"#)
        .await;
    assert_eq!(reply["data"], "ok", "{reply}");
    assert_eq!(service.next().await.subject.as_str(), "svc.last");
    assert_eq!(
        ws::call(&mut ws, r#"{"op":"ping","id":2}"#).await["op"],
        "pong"
    );
    client
        .request(grpc_request("svc.last", None))
        .await
        .unwrap();
    raw.send(&frame(ipc_gateway::protocol::binary::FrameParts {
        frame_type: ipc_gateway::protocol::binary::frame_type::PING,
        id: 6,
        ..Default::default()
    }))
    .await;
    assert_eq!(raw.recv().await.header.id, 6);
}

#[tokio::test]
async fn status_shows_breaker_groups_only_to_callers_granted_status() {
    let nats = NatsServer::start();
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { any = true }
request = { allow = [">"] }

[[grant]]
match = { sub = "ops" }
status = true
"#,
    );
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let gateway = token_gateway(&nats, &policy, &secret);
    // A request nobody serves makes a breaker entry named after its subject.
    let mut conn = gateway.json().await;
    let answer = conn.call(r#"{"subject":"secret.project.x"}"#).await;
    assert_eq!(answer["error"]["code"], "NO_RESPONDERS");
    let get = |token: Option<String>| {
        let port = gateway.http_port;
        async move {
            let mut request =
                String::from("GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
            if let Some(token) = token {
                request.push_str(&format!("Authorization: Bearer {token}\r\n"));
            }
            request.push_str("\r\n");
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
                .await
                .unwrap();
            let mut response = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response).await;
            String::from_utf8_lossy(&response).into_owned()
        }
    };
    let anonymous = get(None).await;
    assert!(anonymous.starts_with("HTTP/1.1 200"), "{anonymous}");
    assert!(anonymous.contains("breakers_by_state"), "{anonymous}");
    assert!(
        !anonymous.contains("secret.project"),
        "subjects leak: {anonymous}"
    );
    let someone = get(Some(hs256(&claims("bob", 300), SECRET))).await;
    assert!(!someone.contains("secret.project"), "{someone}");
    let ops = get(Some(hs256(&claims("ops", 300), SECRET))).await;
    assert!(ops.contains("secret.project"), "{ops}");
    let forged = get(Some(hs256(&claims("ops", 300), WRONG_SECRET))).await;
    assert!(forged.starts_with("HTTP/1.1 401"), "{forged}");
    // /health, /ready and /metrics stay open.
    assert_eq!(gateway.get("/health").await.0, 200);
    assert_eq!(gateway.get("/metrics").await.0, 200);
}

#[tokio::test]
async fn the_audit_log_records_every_kind_of_event_with_its_identity_and_loses_nothing_at_shutdown()
{
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { any = true }
request = { allow = ["demo.>"] }
publish = { allow = ["events.>"] }
subscribe = { allow = ["events.>"] }
"#,
    );
    let mut gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--audit-file",
            audit.to_str().unwrap(),
            "--policy",
            policy.arg(),
        ],
    );
    let mut conn = gateway.json().await;
    let reply = conn
        .call(r#"{"id":1,"subject":"demo.echo","data":"hi"}"#)
        .await;
    assert_eq!(reply["data"], "hi");
    let ack = conn
        .call(r#"{"op":"publish","id":2,"subject":"events.a","data":"x"}"#)
        .await;
    assert_eq!(ack["ok"], true);
    let ack = conn
        .call(r#"{"op":"subscribe","id":3,"subject":"events.>"}"#)
        .await;
    assert_eq!(ack["ok"], true);
    let ack = conn.call(r#"{"op":"unsubscribe","id":3}"#).await;
    assert_eq!(ack["ok"], true);
    let refused = conn.call(r#"{"id":4,"subject":"secret.x"}"#).await;
    assert_eq!(refused["error"]["code"], "FORBIDDEN");
    let bad = conn.call(r#"{"id":5,"subject":"a b"}"#).await;
    assert_eq!(bad["error"]["code"], "BAD_REQUEST");
    gateway.signal("HUP");
    wait_metric(
        &gateway,
        "ipc_gateway_policy_reloads_total{outcome=\"ok\"}",
        1.0,
    )
    .await;
    drop(conn);
    // Everything answered before the stop is on disk once the process has exited.
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let records = audit_records(&audit);
    let uid = nix_uid();
    let find = |op: &str, outcome: &str| {
        records
            .iter()
            .find(|r| r["op"] == op && r["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {op} {outcome} record in {records:#?}"))
            .clone()
    };
    let request = find("request", "ok");
    assert_eq!(request["subject"], "demo.echo");
    assert_eq!(request["frontend"], "uds");
    assert_eq!(request["identity"]["uid"], uid);
    assert_eq!(request["bytes_in"], 2);
    assert_eq!(request["bytes_out"], 2);
    assert!(request["latency_us"].as_u64().is_some());
    assert!(request["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(find("publish", "ok")["subject"], "events.a");
    assert_eq!(find("subscribe", "ok")["subject"], "events.>");
    assert_eq!(find("unsubscribe", "ok")["id"], 3);
    assert_eq!(find("request", "FORBIDDEN")["subject"], "secret.x");
    find("request", "BAD_REQUEST");
    find("connect", "ok");
    find("policy_reload", "ok");
    let closed = records
        .iter()
        .find(|r| r["op"] == "disconnect" && r["identity"]["uid"] == uid)
        .expect("a disconnect record");
    assert!(closed["reason"].as_str().is_some(), "{closed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_at_sigterm_on_every_front_end_have_their_disconnect_records() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gateway =
        GatewayProcess::start(&nats.url(), &["--audit-file", audit.to_str().unwrap()]);
    let mut uds = gateway.json().await;
    let reply = uds
        .call(r#"{"id":1,"subject":"demo.echo","data":"u"}"#)
        .await;
    assert_eq!(reply["data"], "u", "{reply}");
    let mut ws = ws::connect(&gateway, None).await.unwrap();
    let reply = ws_request(&mut ws, "demo.echo", "w").await;
    assert_eq!(reply["data"], "w", "{reply}");
    let mut grpc = gateway.grpc().await;
    let reply = grpc
        .request(pb::RequestMessage {
            subject: "demo.echo".into(),
            payload: b"g".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(&reply.get_ref().payload[..], b"g");
    // Each holds a subscription too.
    let subscribed = uds
        .call(r#"{"op":"subscribe","id":2,"subject":"news.u"}"#)
        .await;
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    let subscribed = ws::call(&mut ws, r#"{"op":"subscribe","id":2,"subject":"news.w"}"#).await;
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    let stream = grpc
        .subscribe(pb::SubscribeRequest {
            subject: "news.g".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // All three stay open while the gateway stops.
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let records = audit_records(&audit);
    for frontend in ["uds", "ws", "grpc"] {
        let count = |op: &str| {
            records
                .iter()
                .filter(|r| r["op"] == op && r["frontend"] == frontend)
                .count()
        };
        // The harness's start-up probe of the gRPC port is a connection of its own.
        let counts = [count("connect"), count("request"), count("disconnect")];
        assert!(
            counts[0] >= 1,
            "{frontend} connect, request, disconnect: {counts:?}"
        );
        assert_eq!(
            counts[1..],
            [1, counts[0]],
            "{frontend} connect, request, disconnect: {counts:?}"
        );
    }
    drop((uds, ws, grpc, stream));
}

#[tokio::test]
async fn a_secret_file_every_user_can_read_is_named_in_a_warning_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let nats = NatsServer::start();
    let secret = SecretFile::new(&[SECRET, b"\n"].concat());
    let mode = |bits| std::fs::set_permissions(&secret.path, std::fs::Permissions::from_mode(bits));
    mode(0o644).unwrap();
    let flags = ["--auth-jwt-secret-file", secret.arg()];
    let open = GatewayProcess::start_logged(&nats.url(), &flags, &[]);
    let line = open.wait_log("every user of this host may read it").await;
    assert!(
        line.contains(&format!("--auth-jwt-secret-file {}: ", secret.arg()))
            && line.contains("mode 644"),
        "{line}"
    );
    mode(0o600).unwrap();
    let private = GatewayProcess::start_logged(&nats.url(), &flags, &[]);
    private.wait_log("ipc-gateway started").await;
    assert!(!private.log().contains("every user"), "{}", private.log());
}

#[tokio::test]
async fn the_audit_log_rotates_at_its_size_limit() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--audit-file",
            audit.to_str().unwrap(),
            "--audit-max-bytes",
            "2000",
            "--audit-keep",
            "2",
        ],
    );
    let mut conn = gateway.json().await;
    for id in 0..40 {
        let reply = conn
            .call(&json!({"id": id, "subject": "demo.echo", "data": "x"}).to_string())
            .await;
        assert_eq!(reply["data"], "x");
    }
    drop(conn);
    gateway.signal("TERM");
    assert_eq!(gateway.wait_exit(), Some(0));
    let rotated = dir.path().join("audit.jsonl.1");
    assert!(rotated.exists(), "no rotated file");
    assert!(
        !dir.path().join("audit.jsonl.3").exists(),
        "more than --audit-keep kept"
    );
    for file in [&audit, &rotated] {
        let size = std::fs::metadata(file).unwrap().len();
        assert!(size <= 2000, "{} is {size} bytes", file.display());
    }
    // The newest requests are all there, in the current file or the one before it.
    let mut ids: Vec<u64> = [rotated, audit]
        .iter()
        .flat_map(|file| audit_records(file))
        .filter(|r| r["op"] == "request")
        .filter_map(|r| r["id"].as_u64())
        .collect();
    ids.sort();
    assert_eq!(ids.last(), Some(&39));
}

fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(0, |m| std::os::unix::fs::MetadataExt::uid(&m))
}

#[tokio::test]
async fn a_reload_ends_one_member_of_a_shared_subscription_and_keeps_the_others() {
    let nats = NatsServer::start();
    // A local process and an anonymous WebSocket subscribe to the same subject: one NATS
    // subscription on the gateway, two members with different permissions.
    let policy = PolicyFile::new(
        r#"
[[grant]]
match = { anonymous = false }
subscribe = { allow = ["shared.>"] }

[[grant]]
match = { anonymous = true }
subscribe = { allow = ["shared.>"] }
"#,
    );
    let gateway = GatewayProcess::start(
        &nats.url(),
        &["--policy", policy.arg(), "--nats-connections", "1"],
    );
    let mut local = gateway.json().await;
    let ack = local
        .call(r#"{"op":"subscribe","id":"l","subject":"shared.news"}"#)
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let mut browser = ws::connect(&gateway, None).await.unwrap();
    let ack = ws::call(
        &mut browser,
        r#"{"op":"subscribe","id":"b","subject":"shared.news"}"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(nats.subscriptions_on("shared.news").await, 1);

    // Anonymous clients lose the subject.
    policy.write(
        r#"
[[grant]]
match = { anonymous = false }
subscribe = { allow = ["shared.>"] }
"#,
    );
    gateway.signal("HUP");
    wait_metric(&gateway, OK_RELOADS, 1.0).await;
    let notice = ws::next_json(&mut browser).await;
    assert_eq!(
        (&notice["op"], &notice["sid"], &notice["error"]["code"]),
        (&json!("unsubscribed"), &json!("b"), &json!("FORBIDDEN")),
        "{notice}"
    );
    // The local member still has the shared NATS subscription and its messages.
    assert_eq!(nats.subscriptions_on("shared.news").await, 1);
    let publisher = nats.client().await;
    publisher
        .publish("shared.news", "hello".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let message = local.recv().await;
    assert_eq!(
        (message["sid"].as_str(), message["data"].as_str()),
        (Some("l"), Some("hello")),
        "{message}"
    );
    let silent =
        tokio::time::timeout(Duration::from_millis(300), ws::next_json(&mut browser)).await;
    assert!(silent.is_err(), "the ended member got more: {silent:?}");
}
