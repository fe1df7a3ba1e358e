//! The operator's view of a real gateway: every `ipc_gateway_*` family `/metrics` exposes after
//! some traffic is in docs/operations.md's table with its type, and every family there is
//! exposed (so the list cannot rot); no label value names a subject or an identity; `/status`
//! as JSON and as HTML, counts for everyone and detail only when granted; the alerting rules in
//! dist/prometheus pass `promtool`, name only metrics that exist, and a real Prometheus scrapes
//! the gateway with them loaded.
//!
//! promtool and prometheus come from Debian's `prometheus` package (scripts/install-deps); a
//! test that needs one says SKIPPED, with the reason, where it is not installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const STATUS_POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/open-with-status.toml"
);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// GET with extra request headers: (status, headers with lower-case names, body).
async fn get(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the HTTP port");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, value)| value.as_str())
}

/// The metrics table of docs/operations.md: family name → type.
fn documented() -> BTreeMap<String, String> {
    let docs = std::fs::read_to_string(repo("docs/operations.md")).expect("docs/operations.md");
    let section = docs
        .split("\n### Metrics\n")
        .nth(1)
        .expect("a Metrics section in docs/operations.md");
    let section = section.split("\n#").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|line| {
            let mut cells = line.strip_prefix("| `")?.split('|');
            let name = cells.next()?.trim().trim_end_matches('`');
            let kind = cells.next()?.trim();
            name.starts_with("ipc_gateway_")
                .then(|| (name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// `# TYPE` lines of a scrape: family name → type.
fn exposed(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// Every sample's labels: (metric, [(name, value)]).
fn samples(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let Some((name, rest)) = line.split_once('{') else {
                return (line.split(' ').next().unwrap_or("").to_owned(), vec![]);
            };
            let labels = rest.rsplit_once('}').map_or("", |(labels, _)| labels);
            let mut parsed = Vec::new();
            let mut chars = labels.chars().peekable();
            while chars.peek().is_some() {
                let label: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "a quoted value in {line}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
                if chars.peek() == Some(&',') {
                    chars.next();
                }
                parsed.push((label.trim().to_owned(), value));
            }
            (name.to_owned(), parsed)
        })
        .collect()
}

/// The label values the gateway may use: a fixed vocabulary per label.
fn allowed(label: &str, value: &str) -> bool {
    const OPS: &[&str] = &[
        "request",
        "publish",
        "subscribe",
        "unsubscribe",
        "ping",
        "credit",
        "auth",
        "register",
        "unregister",
        "presence",
        "presence_watch",
        "publish_durable",
        "subscribe_replay",
        "invalid",
    ];
    match label {
        "frontend" => ["uds", "ws", "grpc"].contains(&value),
        "op" => OPS.contains(&value),
        "outcome" => {
            value == "ok"
                || value == "failed"
                || ipc_gateway::protocol::ErrorCode::ALL
                    .iter()
                    .any(|code| code.as_str() == value)
        }
        "direction" => ["in", "out"].contains(&value),
        "reason" => ["slow_client", "idle", "heartbeat"].contains(&value),
        "state" => ["closed", "open", "half_open"].contains(&value),
        "le" => value == "+Inf" || value.parse::<f64>().is_ok(),
        _ => false,
    }
}

/// Some of everything: requests answered and not, a publish, a durable publish and a replay
/// (refused: this nats-server has no JetStream, which still counts and times them), a
/// subscription, bad input, a gRPC request. The connection is returned, its subscription open.
async fn traffic(nats: &NatsServer, gateway: &GatewayProcess) -> JsonConn {
    let _echo = spawn_echo(&nats.url(), "metrics.probe.echo", Duration::ZERO).await;
    let mut conn = gateway.json().await;
    let ok = conn
        .call(r#"{"id":1,"subject":"metrics.probe.echo","data":"hi"}"#)
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let none = conn
        .call(r#"{"id":2,"subject":"metrics.nobody.here"}"#)
        .await;
    assert_eq!(none["error"]["code"], "NO_RESPONDERS", "{none}");
    let published = conn
        .call(r#"{"op":"publish","id":3,"subject":"metrics.probe.event","data":"x"}"#)
        .await;
    assert_eq!(published["ok"], true, "{published}");
    let subscribed = conn
        .call(r#"{"op":"subscribe","id":"s1","subject":"metrics.probe.>"}"#)
        .await;
    assert_eq!(subscribed["ok"], true, "{subscribed}");
    let bad = conn.call(r#"{"op":"no-such-op","id":4}"#).await;
    assert_eq!(bad["ok"], false, "{bad}");
    let durable = conn
        .call(r#"{"op":"publish","id":5,"subject":"metrics.stored.x","data":"x","durable":true}"#)
        .await;
    assert_eq!(durable["ok"], false, "no JetStream here: {durable}");
    let replay = conn
        .call(r#"{"op":"subscribe","id":"r1","subject":"metrics.stored.x","since_seq":0}"#)
        .await;
    assert_eq!(replay["ok"], false, "no JetStream here: {replay}");
    let mut grpc = gateway.grpc().await;
    let reply = grpc
        .request(ipc_gateway::frontend::grpc::pb::RequestMessage {
            subject: "metrics.probe.echo".into(),
            payload: b"hi".to_vec().into(),
            ..Default::default()
        })
        .await;
    assert!(reply.is_ok(), "{reply:?}");
    conn
}

#[tokio::test]
async fn every_exposed_metric_is_documented_with_its_type_and_every_documented_one_is_exposed() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let _conn = traffic(&nats, &gateway).await;
    let (status, _, text) = get(gateway.http_port, "/metrics", &[]).await;
    assert_eq!(status, 200);
    let exposed: BTreeMap<_, _> = exposed(&text)
        .into_iter()
        .filter(|(name, _)| name.starts_with("ipc_gateway_"))
        .collect();
    let documented = documented();
    assert!(
        documented.len() > 20,
        "the docs table was not found: {documented:?}"
    );
    let undocumented: Vec<_> = exposed
        .keys()
        .filter(|n| !documented.contains_key(*n))
        .collect();
    // Exposed only with TLS: tests/it/tls.rs checks it after a reload.
    let only_with_tls = "ipc_gateway_tls_cert_expiry_timestamp_seconds";
    let missing: Vec<_> = documented
        .keys()
        .filter(|n| !exposed.contains_key(*n) && *n != only_with_tls)
        .collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not in docs/operations.md's Metrics table: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in docs/operations.md but not exposed after traffic: {missing:?}\n{text}"
    );
    for (name, kind) in &exposed {
        assert_eq!(
            &documented[name], kind,
            "{name}'s type in docs/operations.md"
        );
    }
    // The latency histogram has the op and outcome of each timed operation.
    for series in [
        r#"ipc_gateway_request_duration_seconds_count{frontend="uds",op="request",outcome="ok"} 1"#,
        r#"ipc_gateway_request_duration_seconds_count{frontend="uds",op="request",outcome="NO_RESPONDERS"} 1"#,
        r#"ipc_gateway_request_duration_seconds_count{frontend="uds",op="publish",outcome="ok"} 1"#,
        r#"ipc_gateway_request_duration_seconds_count{frontend="uds",op="subscribe",outcome="ok"} 1"#,
        r#"ipc_gateway_request_duration_seconds_count{frontend="grpc",op="request",outcome="ok"} 1"#,
        r#"ipc_gateway_requests_total{frontend="uds",op="invalid",outcome="BAD_REQUEST"} 1"#,
        r#"ipc_gateway_request_duration_seconds_count{frontend="uds",op="publish_durable",outcome=""#,
        r#"ipc_gateway_request_duration_seconds_count{frontend="uds",op="subscribe_replay",outcome=""#,
        "ipc_gateway_ready 1",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    // Prometheus's own linter (names, HELP, TYPE, counter suffixes) on the same scrape.
    match promtool() {
        Ok(promtool) => {
            let mut check = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run promtool");
            std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), text.as_bytes())
                .expect("write the scrape to promtool");
            let out = check.wait_with_output().expect("promtool's answer");
            assert!(
                out.status.success(),
                "promtool check metrics:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(reason) => println!("SKIPPED (promtool check metrics only): {reason}"),
    }
}

#[tokio::test]
async fn no_label_value_names_a_subject_or_an_identity() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let _conn = traffic(&nats, &gateway).await;
    let text = gateway.get("/metrics").await.1;
    let uid = nix::unistd::Uid::current();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_default();
    let mut labelled = 0;
    for (metric, labels) in samples(&text) {
        if !metric.starts_with("ipc_gateway_") {
            continue;
        }
        for (label, value) in labels {
            labelled += 1;
            assert!(
                allowed(&label, &value),
                "{metric}: label {label}={value:?} is not from the fixed vocabulary"
            );
            assert!(
                !value.contains("metrics."),
                "{metric}: a subject in {label}={value:?}"
            );
            assert!(
                value != uid.to_string() && (user.is_empty() || value != user),
                "{metric}: an identity in {label}={value:?}"
            );
        }
    }
    assert!(
        labelled > 50,
        "too few labelled samples parsed: {labelled}\n{text}"
    );
    // The subjects used are nowhere in the exposition.
    assert!(
        ["metrics.probe", "metrics.nobody", "metrics.stored"]
            .iter()
            .all(|subject| !text.contains(subject)),
        "{text}"
    );
}

#[tokio::test]
async fn status_gives_counts_to_everyone_and_subjects_and_servers_only_when_granted() {
    let nats = NatsServer::start();
    let plain = GatewayProcess::start(&nats.url(), &["--gateway-id", "gw-plain"]);
    let granted = GatewayProcess::start(
        &nats.url(),
        &["--policy", STATUS_POLICY, "--gateway-id", "gw-granted"],
    );
    let mut conns = Vec::new();
    for gateway in [&plain, &granted] {
        let mut conn = gateway.json().await;
        // A breaker group named with markup: it must come out escaped in HTML.
        let none = conn.call(r#"{"id":1,"subject":"x<i&'q\".nobody"}"#).await;
        assert_eq!(none["error"]["code"], "NO_RESPONDERS", "{none}");
        let subscribed = conn
            .call(r#"{"op":"subscribe","id":"s1","subject":"status.probe.>"}"#)
            .await;
        assert_eq!(subscribed["ok"], true, "{subscribed}");
        conns.push(conn); // open for the status reads below
    }

    // JSON, anonymous, no grant: counts only.
    let (code, headers, body) = get(plain.http_port, "/status", &[]).await;
    assert_eq!(code, 200);
    assert!(
        header(&headers, "content-type")
            .unwrap_or("")
            .starts_with("application/json")
    );
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["gateway_id"], "gw-plain");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["readiness"]["ready"], true, "{status}");
    assert_eq!(status["connections"]["uds"], 1, "{status}");
    assert_eq!(status["connections"]["grpc"], 0, "{status}");
    assert_eq!(status["subscriptions"]["clients"]["uds"], 1, "{status}");
    assert_eq!(status["subscriptions"]["nats_shared"], 1, "{status}");
    assert_eq!(
        status["nats"]["pool_size"],
        status["nats"]["connections"].as_array().unwrap().len()
    );
    assert_eq!(status["nats"]["connected"], status["nats"]["pool_size"]);
    assert_eq!(status["nats"]["connections"][0]["connected"], true);
    assert!(
        status["nats"]["connections"][0].get("server").is_none(),
        "{status}"
    );
    assert_eq!(status["breakers_by_state"]["closed"], 1, "{status}");
    assert!(status.get("breakers").is_none(), "{status}");
    assert_eq!(status["policy_version"], 1);
    assert_eq!(status["names_held"], 0);
    assert_eq!(status["audit"]["enabled"], false);
    assert!(status["uptime_seconds"].is_u64());
    assert!(!body.contains("nobody"), "a subject leaks: {body}");

    // JSON, granted: the groups and the servers.
    let body = granted.get("/status").await.1;
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        status["breakers"][0]["group"], "x<i&'q\".nobody",
        "{status}"
    );
    let server = status["nats"]["connections"][0]["server"]
        .as_str()
        .unwrap_or("");
    assert_eq!(server, format!("127.0.0.1:{}", nats.port), "{status}");

    // HTML, for a browser's Accept and for ?format=html.
    let browser = [("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
    for (gateway, path, headers) in [
        (&plain, "/status", &browser[..]),
        (&granted, "/status?format=html", &[][..]),
    ] {
        let (code, response_headers, html) = get(gateway.http_port, path, headers).await;
        assert_eq!(code, 200);
        assert!(
            header(&response_headers, "content-type")
                .unwrap_or("")
                .starts_with("text/html"),
            "{response_headers:?}"
        );
        let csp = header(&response_headers, "content-security-policy").unwrap_or("");
        assert!(
            csp.contains("default-src 'none'") && !csp.contains("script-src"),
            "{csp}"
        );
        assert_eq!(
            header(&response_headers, "x-content-type-options"),
            Some("nosniff")
        );
        assert!(
            html.contains("<table") && !html.contains("<script"),
            "{html}"
        );
        assert!(
            !html.contains("x<i"),
            "unescaped markup from a subject: {html}"
        );
    }
    let html = get(granted.http_port, "/status?format=html", &[]).await.2;
    assert!(html.contains("x&lt;i&amp;&#39;q&quot;"), "{html}");
    assert!(html.contains(&format!("127.0.0.1:{}", nats.port)), "{html}");
    let html = get(plain.http_port, "/status", &browser).await.2;
    assert!(
        !html.contains("x&lt;i") && !html.contains("nobody"),
        "{html}"
    );
    assert!(html.contains("gw-plain"), "{html}");
    // ?format=json wins over a browser's Accept.
    let (_, headers, _) = get(plain.http_port, "/status?format=json", &browser).await;
    assert!(
        header(&headers, "content-type")
            .unwrap_or("")
            .starts_with("application/json")
    );
    // The browser page links to it.
    let page = plain.get("/").await.1;
    assert!(page.contains("href=\"status?format=html\""), "{page}");
}

/// promtool, or why it is missing.
fn promtool() -> Result<&'static str, String> {
    tool("promtool")
}

fn tool(name: &'static str) -> Result<&'static str, String> {
    match Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(name),
        Ok(status) => Err(format!("{name} --version failed ({status})")),
        Err(error) => Err(format!(
            "{name} is not installed ({error}); scripts/install-deps installs Debian's prometheus package"
        )),
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = match promtool() {
        Ok(promtool) => promtool,
        Err(reason) => return println!("SKIPPED: {reason}"),
    };
    let dir = repo("dist/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn alert_rules_name_only_documented_metrics() {
    let rules = std::fs::read_to_string(repo("dist/prometheus/alerts.yml")).expect("alerts.yml");
    let documented = documented();
    let mut named = BTreeSet::new();
    for (at, _) in rules.match_indices("ipc_gateway_") {
        let name: String = rules[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // A histogram's series are its family's name plus a suffix.
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_owned();
        if !family.ends_with('_') {
            named.insert(family); // not `ipc_gateway_*` in a comment
        }
    }
    assert!(named.len() >= 10, "{named:?}");
    for family in &named {
        assert!(
            documented.contains_key(family),
            "alerts.yml names {family}, which is not a metric"
        );
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_with_the_alert_rules_loaded() {
    let prometheus = match tool("prometheus") {
        Ok(prometheus) => prometheus,
        Err(reason) => return println!("SKIPPED: {reason}"),
    };
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: ipc-gateway\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            repo("dist/prometheus/alerts.yml").display(),
            gateway.http_port
        ),
    )
    .expect("write the config");
    let port = free_port();
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Kill(child);
    let query = |q: &'static str| async move {
        let (code, body) = http_get(port, &format!("/api/v1/query?query={q}")).await;
        (code == 200)
            .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
            .flatten()
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_owned)
            })
    };
    // Generous: it only guards a hang (Prometheus starts, then scrapes every second).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query("up%7Bjob%3D%22ipc-gateway%22%7D").await;
        let ready = query("ipc_gateway_ready").await;
        if up.as_deref() == Some("1") && ready.as_deref() == Some("1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the gateway: up={up:?} ready={ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, rules) = http_get(port, "/api/v1/rules").await;
    assert_eq!(code, 200, "{rules}");
    let rules: serde_json::Value = serde_json::from_str(&rules).expect("rules JSON");
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(loaded >= 10, "{rules}");
}
