//! TLS on the HTTP port (https, wss://) and the gRPC port, with certificates made here by rcgen:
//! a CA, the gateway's certificate for localhost/127.0.0.1, client certificates from that CA
//! and from another one the gateway does not trust. Checks round trips, client certificate
//! identities (policy, the service's headers, the audit log), handshake refusals, the
//! handshake timeout, SIGHUP's reload, and start-up errors.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ipc_gateway::frontend::grpc::pb::{self, gateway_client::GatewayClient};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{
    GatewayProcess, NatsServer, RecordingService, audit_records, hs256, spawn_echo, unix_now,
};

const PATIENCE: Duration = Duration::from_secs(10);

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf: (certificate PEM, key PEM). `names` are its DNS/IP names (a server's).
    fn leaf(&self, cn: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages.push(usage);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self, cn: &str) -> (String, String) {
        self.leaf(
            cn,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, cn: &str) -> (String, String) {
        self.leaf(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The files a test gateway reads, in one directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("ipc-gateway test CA"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.path(name), text).unwrap();
        self.path(name).display().to_string()
    }

    /// Writes the server's pair (CN `cn`) and the client CA; returns the gateway's flags.
    fn server_flags(&self, cn: &str) -> Vec<String> {
        let (cert, key) = self.ca.server(cn);
        vec![
            "--tls-cert".into(),
            self.write("server.pem", &cert),
            "--tls-key".into(),
            self.write("server.key", &key),
            "--tls-client-ca".into(),
            self.write("ca.pem", &self.ca.pem),
        ]
    }
}

fn start(nats: &NatsServer, flags: &[String]) -> GatewayProcess {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    GatewayProcess::start(&nats.url(), &flags)
}

/// A client configuration trusting `ca_pem`, with a client certificate or without, offering
/// `alpn`.
fn client_config(
    ca_pem: &str,
    client: Option<&(String, String)>,
    alpn: &[u8],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A TLS connection to `port`, the handshake and the first exchange done: rustls completes a
/// TLS 1.3 client handshake before the server has judged the client certificate, so a refusal
/// shows on the first read.
async fn tls_connect(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// The leaf certificate the gateway served on this connection.
fn served_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// `GET path` over HTTPS: (status, body).
async fn https_get(port: u16, config: Arc<rustls::ClientConfig>, path: &str) -> (u16, String) {
    let mut stream = tls_connect(port, config).await.expect("HTTPS connects");
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The gateway closes without close_notify after `connection: close`: what came is enough.
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

/// A WebSocket over TLS at /ws.
async fn wss(port: u16, config: Arc<rustls::ClientConfig>) -> Result<Wss, String> {
    let stream = tls_connect(port, config)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let url = format!("wss://localhost:{port}/ws");
    tokio_tungstenite::client_async(url, stream)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| format!("WebSocket: {e}"))
}

/// Sends one JSON message and returns the answer.
async fn call(ws: &mut Wss, message: Value) -> Value {
    ws.send(Message::text(message.to_string())).await.unwrap();
    loop {
        let answer = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("an answer in time")
            .expect("the WebSocket is open")
            .expect("a message");
        if let Message::Text(text) = answer {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// A gRPC client over TLS.
async fn grpc(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> Result<GatewayClient<tonic::transport::Channel>, String> {
    let connector = tower::service_fn(move |_uri| {
        let config = config.clone();
        async move {
            let stream = tls_connect(port, config).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The scheme is http: the connector above does the TLS.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(GatewayClient::new(channel))
}

/// One request to demo.echo on a new gRPC connection over TLS; `Err` says where it failed.
async fn grpc_request(port: u16, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut client = grpc(port, config).await?;
    client
        .request(request("demo.echo", "x"))
        .await
        .map(|_| ())
        .map_err(|status| status.to_string())
}

fn request(subject: &str, payload: &str) -> pb::RequestMessage {
    pb::RequestMessage {
        subject: subject.into(),
        payload: payload.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_wss_request_gets_its_reply_and_plain_ws_to_the_tls_port_fails() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let pki = Pki::new();
    let gateway = start(&nats, &pki.server_flags("gateway"));
    let config = client_config(&pki.ca.pem, None, b"http/1.1");

    let mut ws = wss(gateway.http_port, config.clone()).await.unwrap();
    let reply = call(
        &mut ws,
        json!({"op": "request", "id": 1, "subject": "demo.echo", "data": "over tls"}),
    )
    .await;
    assert_eq!(reply, json!({"id": 1, "ok": true, "data": "over tls"}));

    let plain =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gateway.http_port));
    let plain = tokio::time::timeout(PATIENCE, plain)
        .await
        .expect("an answer in time");
    assert!(plain.is_err(), "plain ws:// on the TLS port must fail");

    // The operator routes are on the TLS port too.
    let (status, body) = https_get(gateway.http_port, config, "/health").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
}

#[tokio::test]
async fn a_grpc_call_over_tls_works_and_the_service_sees_the_client_certificate() {
    let nats = NatsServer::start();
    let mut service = RecordingService::start(&nats, "svc.who").await;
    let pki = Pki::new();
    // One pair, given as the HTTP port's, turns TLS on for gRPC too.
    let gateway = start(&nats, &pki.server_flags("gateway"));

    let alice = pki.ca.client("alice");
    let mut client = grpc(
        gateway.grpc_port,
        client_config(&pki.ca.pem, Some(&alice), b"h2"),
    )
    .await
    .unwrap();
    let reply = client.request(request("svc.who", "hi")).await.unwrap();
    assert_eq!(&reply.get_ref().payload[..], b"hi");
    let seen = service.next().await;
    let headers = seen.headers.expect("identity headers");
    assert_eq!(
        headers.get("Ipc-Gateway-Cert").map(|v| v.as_str()),
        Some("CN=alice")
    );
    assert_eq!(
        headers.get("Ipc-Gateway-Identity").map(|v| v.as_str()),
        Some(r#"cert="CN=alice""#)
    );

    // Without a client certificate: anonymous, as before.
    let mut anonymous = grpc(gateway.grpc_port, client_config(&pki.ca.pem, None, b"h2"))
        .await
        .unwrap();
    anonymous.request(request("svc.who", "anon")).await.unwrap();
    let seen = service.next().await;
    let headers = seen.headers.expect("identity headers");
    assert_eq!(headers.get("Ipc-Gateway-Cert"), None);
    assert_eq!(
        headers.get("Ipc-Gateway-Identity").map(|v| v.as_str()),
        Some("anonymous")
    );
}

#[tokio::test]
async fn a_client_certificate_from_an_untrusted_ca_is_refused_at_the_handshake_on_both_ports() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let pki = Pki::new();
    let gateway = start(&nats, &pki.server_flags("gateway"));
    let mallory = Ca::new("untrusted CA").client("mallory");

    let refused = wss(
        gateway.http_port,
        client_config(&pki.ca.pem, Some(&mallory), b"http/1.1"),
    )
    .await;
    assert!(refused.is_err(), "wss with an untrusted certificate");
    let refused = grpc_request(
        gateway.grpc_port,
        client_config(&pki.ca.pem, Some(&mallory), b"h2"),
    )
    .await;
    assert!(refused.is_err(), "gRPC with an untrusted certificate");

    // The same client without a certificate is let in on both.
    let mut ws = wss(
        gateway.http_port,
        client_config(&pki.ca.pem, None, b"http/1.1"),
    )
    .await
    .unwrap();
    let reply = call(
        &mut ws,
        json!({"op": "request", "id": 1, "subject": "demo.echo", "data": "x"}),
    )
    .await;
    assert_eq!(reply["ok"], true);
    let mut client = grpc(gateway.grpc_port, client_config(&pki.ca.pem, None, b"h2"))
        .await
        .unwrap();
    client.request(request("demo.echo", "x")).await.unwrap();
}

#[tokio::test]
async fn a_cert_grant_lets_alice_publish_while_bob_and_anonymous_are_forbidden_and_audited() {
    let nats = NatsServer::start();
    let pki = Pki::new();
    let policy = pki.write(
        "policy.toml",
        r#"
        [[grant]]
        match = { cert = "CN=alice" }
        publish = { allow = ["x.>"] }

        [[grant]]
        match = { any = true }
        publish = { allow = ["public.>"] }
        "#,
    );
    let audit = pki.path("audit.jsonl");
    let mut flags = pki.server_flags("gateway");
    flags.extend([
        "--policy".into(),
        policy,
        "--audit-file".into(),
        audit.display().to_string(),
    ]);
    let gateway = start(&nats, &flags);
    let publish = json!({"op": "publish", "id": 1, "subject": "x.a", "data": "d"});

    let alice = pki.ca.client("alice");
    let config = client_config(&pki.ca.pem, Some(&alice), b"http/1.1");
    let mut ws = wss(gateway.http_port, config).await.unwrap();
    assert_eq!(
        call(&mut ws, publish.clone()).await,
        json!({"id": 1, "ok": true})
    );

    let bob = pki.ca.client("bob");
    for client in [Some(&bob), None] {
        let config = client_config(&pki.ca.pem, client, b"http/1.1");
        let mut ws = wss(gateway.http_port, config).await.unwrap();
        let answer = call(&mut ws, publish.clone()).await;
        assert_eq!(answer["error"]["code"], "FORBIDDEN", "{client:?}: {answer}");
    }

    let deadline = Instant::now() + PATIENCE;
    let records = loop {
        let records = audit_records(&audit);
        if records.iter().filter(|r| r["op"] == "publish").count() >= 3 {
            break records;
        }
        assert!(Instant::now() < deadline, "audit records: {records:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let find = |outcome: &str, cert: Option<&str>| {
        records.iter().any(|r| {
            r["op"] == "publish"
                && r["outcome"] == outcome
                && r["identity"]["cert"].as_str() == cert
        })
    };
    assert!(find("ok", Some("CN=alice")), "{records:#?}");
    assert!(find("FORBIDDEN", Some("CN=bob")), "{records:#?}");
    assert!(find("FORBIDDEN", None), "{records:#?}");
}

#[tokio::test]
async fn sighup_serves_a_new_certificate_to_new_connections_and_keeps_open_ones() {
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let pki = Pki::new();
    let flags = pki.server_flags("certificate A");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gateway = GatewayProcess::start_logged(&nats.url(), &flags, &[]);
    let config = client_config(&pki.ca.pem, None, b"http/1.1");
    let cert_a = der_of(&std::fs::read_to_string(pki.path("server.pem")).unwrap());

    let first = tls_connect(gateway.http_port, config.clone())
        .await
        .unwrap();
    assert_eq!(served_leaf(&first), cert_a);
    let url = format!("wss://localhost:{}/ws", gateway.http_port);
    let (mut client_1, _) = tokio_tungstenite::client_async(url, first).await.unwrap();

    let (cert_b, key_b) = pki.ca.server("certificate B");
    pki.write("server.pem", &cert_b);
    pki.write("server.key", &key_b);
    gateway.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stream = tls_connect(gateway.http_port, config.clone())
            .await
            .unwrap();
        if served_leaf(&stream) == der_of(&cert_b) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still certificate A after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = call(
        &mut client_1,
        json!({"op": "request", "id": 7, "subject": "demo.echo", "data": "still here"}),
    )
    .await;
    assert_eq!(reply, json!({"id": 7, "ok": true, "data": "still here"}));

    // The gauge tells certificate B's not-after.
    let (_, metrics) = https_get(gateway.http_port, config.clone(), "/metrics").await;
    let not_after = x509_not_after(&der_of(&cert_b));
    assert!(
        metrics.contains(&format!(
            "ipc_gateway_tls_cert_expiry_timestamp_seconds{{port=\"http\"}} {not_after}"
        )),
        "{metrics}"
    );

    // A broken file keeps certificate B, and the log says which file and why.
    pki.write("server.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    gateway.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    let server_pem = pki.path("server.pem").display().to_string();
    loop {
        let text = gateway.log();
        if text.contains("TLS reload failed") {
            assert!(text.contains(&format!("--tls-cert {server_pem}")), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no reload error in the log: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stream = tls_connect(gateway.http_port, config).await.unwrap();
    assert_eq!(served_leaf(&stream), der_of(&cert_b));
}

#[tokio::test]
async fn a_certificate_is_credentials_enough_and_a_token_beside_it_adds_its_subject() {
    let nats = NatsServer::start();
    let mut service = RecordingService::start(&nats, "svc.who").await;
    let pki = Pki::new();
    let secret = b"a secret of at least thirty-two bytes, for HS256";
    let mut flags = pki.server_flags("gateway");
    flags.extend([
        "--auth-required".into(),
        "--auth-jwt-secret-file".into(),
        pki.write("jwt.secret", std::str::from_utf8(secret).unwrap()),
    ]);
    let gateway = start(&nats, &flags);
    let alice = pki.ca.client("alice");
    let with_cert = client_config(&pki.ca.pem, Some(&alice), b"h2");
    let token = hs256(&json!({"sub": "bob", "exp": unix_now() + 600}), secret);

    // Neither: refused, as before.
    let mut nobody = grpc(gateway.grpc_port, client_config(&pki.ca.pem, None, b"h2"))
        .await
        .unwrap();
    let refused = nobody.request(request("svc.who", "x")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");

    // A certificate alone is credentials.
    let mut client = grpc(gateway.grpc_port, with_cert).await.unwrap();
    client.request(request("svc.who", "cert")).await.unwrap();
    let headers = service.next().await.headers.unwrap();
    assert_eq!(
        headers.get("Ipc-Gateway-Identity").map(|v| v.as_str()),
        Some(r#"cert="CN=alice""#)
    );

    // With a token too, the caller is both.
    let mut call = tonic::Request::new(request("svc.who", "both"));
    call.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.request(call).await.unwrap();
    let headers = service.next().await.headers.unwrap();
    assert_eq!(
        headers.get("Ipc-Gateway-Identity").map(|v| v.as_str()),
        Some(r#"sub=bob cert="CN=alice""#)
    );
    assert_eq!(
        headers.get("Ipc-Gateway-Sub").map(|v| v.as_str()),
        Some("bob")
    );
    assert_eq!(
        headers.get("Ipc-Gateway-Cert").map(|v| v.as_str()),
        Some("CN=alice")
    );

    // The WebSocket upgrade likewise: a certificate passes --auth-required.
    let config = client_config(&pki.ca.pem, Some(&alice), b"http/1.1");
    wss(gateway.http_port, config).await.unwrap();
    let config = client_config(&pki.ca.pem, None, b"http/1.1");
    let refused = wss(gateway.http_port, config).await.unwrap_err();
    assert!(refused.contains("401"), "{refused}");
}

#[tokio::test]
async fn with_client_auth_required_a_client_without_a_certificate_fails_its_handshake() {
    let nats = NatsServer::start();
    // Answered, so that only the handshake can fail a call.
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let pki = Pki::new();
    let mut flags = pki.server_flags("gateway");
    flags.extend(["--tls-client-auth".into(), "required".into()]);
    let gateway = start(&nats, &flags);
    let none = client_config(&pki.ca.pem, None, b"http/1.1");
    assert!(wss(gateway.http_port, none).await.is_err());
    let refused = grpc_request(gateway.grpc_port, client_config(&pki.ca.pem, None, b"h2")).await;
    assert!(refused.is_err(), "gRPC without a certificate");
    let alice = pki.ca.client("alice");
    let config = client_config(&pki.ca.pem, Some(&alice), b"http/1.1");
    wss(gateway.http_port, config).await.unwrap();
    let config = client_config(&pki.ca.pem, Some(&alice), b"h2");
    grpc_request(gateway.grpc_port, config).await.unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_client_ca_for_new_handshakes() {
    let nats = NatsServer::start();
    let pki = Pki::new();
    let gateway = start(&nats, &pki.server_flags("gateway"));
    let other = Ca::new("second CA");
    let carol = other.client("carol");
    let config = client_config(&pki.ca.pem, Some(&carol), b"http/1.1");
    assert!(wss(gateway.http_port, config.clone()).await.is_err());

    pki.write("ca.pem", &format!("{}{}", pki.ca.pem, other.pem));
    gateway.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    while let Err(err) = wss(gateway.http_port, config.clone()).await {
        assert!(Instant::now() < deadline, "carol still refused: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A certificate's not-after in seconds since the epoch, as the gateway's gauge shows it.
fn x509_not_after(der: &[u8]) -> u64 {
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(der)
        .unwrap()
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs()
}

#[tokio::test]
async fn a_client_that_never_starts_its_handshake_is_closed_after_the_header_timeout() {
    let nats = NatsServer::start();
    let pki = Pki::new();
    let mut flags = pki.server_flags("gateway");
    flags.extend(["--http-header-timeout-ms".into(), "300".into()]);
    let gateway = start(&nats, &flags);
    for port in [gateway.http_port, gateway.grpc_port] {
        let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 64];
        // Closed by the gateway (EOF or a reset), not left open: PATIENCE is far beyond 300 ms.
        let read = tokio::time::timeout(PATIENCE, silent.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("port {port}: a silent client was kept open"));
        assert!(matches!(read, Ok(0) | Err(_)), "port {port}: {read:?}");
    }
}

#[test]
fn a_certificate_file_that_does_not_load_stops_start_up_naming_the_flag_and_the_file() {
    let pki = Pki::new();
    let (cert, key) = pki.ca.server("gateway");
    let cert = pki.write("server.pem", &cert);
    let key = pki.write("server.key", &key);
    let junk = pki.write("junk.pem", "no PEM here\n");
    let missing = pki.path("missing.pem").display().to_string();
    let socket = pki.path("gw.sock").display().to_string();
    let run = |flags: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
            .args([
                "serve",
                "--nats-url",
                "nats://127.0.0.1:1",
                "--socket",
                &socket,
            ])
            .args(flags)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (flags, says) in [
        (
            vec!["--tls-cert", &missing, "--tls-key", &key],
            format!("--tls-cert {missing}"),
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &junk],
            format!("--tls-key {junk}"),
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &junk,
            ],
            format!("--tls-client-ca {junk}"),
        ),
        (vec!["--tls-cert", &cert], "tls_key is missing".to_owned()),
        (
            vec!["--grpc-tls-key", &key],
            "grpc_tls_cert is missing".to_owned(),
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-auth",
                "required",
            ],
            "needs tls_client_ca".to_owned(),
        ),
    ] {
        let (code, stderr) = run(&flags);
        assert_eq!(code, Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(&says), "{flags:?}: {stderr}");
    }
    // check-config reads the files as serve would.
    let checked = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args(["check-config", "--tls-cert", &cert, "--tls-key", &junk])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("--tls-key {junk}")), "{stderr}");
}

/// A gateway certificate for localhost and 127.0.0.1 and the flags that serve it, in a
/// directory of its own (kept while the `TempDir` lives), for the browser test over https.
pub fn page_tls() -> (tempfile::TempDir, Vec<String>) {
    let pki = Pki::new();
    let (cert, key) = pki.ca.server("gateway");
    let flags = vec![
        "--tls-cert".into(),
        pki.write("server.pem", &cert),
        "--tls-key".into(),
        pki.write("server.key", &key),
    ];
    (pki.dir, flags)
}
