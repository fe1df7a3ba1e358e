//! The browser page at `GET /`, end to end in headless Chromium against a real nats-server, the
//! echo service and the real gateway binary: the page connects over `/ws`, shows an echoed
//! reply with its latency and a `NO_RESPONDERS` error, shows messages published from the page
//! and from a Unix-socket client on a live subscription, and counts the messages the gateway
//! dropped for the page while it was too busy to read. With `--auth-required`, the page
//! without a token (or with a forged one) shows the refusal, and with a valid token typed into
//! its field it connects and its requests reach the service as that token's `sub`. With
//! `PAGE_SCREENSHOT=docs/page.png` it also writes the screenshot the README shows.
//!
//! Chromium is installed with apt-get when missing; where that is impossible the browser test
//! prints `SKIPPED: ...` and passes.

mod chromium;

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use chromium::{Browser, Tab, http_get_full};
use serde_json::{Value, json};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 900;

#[tokio::test]
async fn root_serves_the_embedded_page_and_its_assets_without_caching() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    for (path, content_type, must_contain) in [
        ("/", "text/html; charset=utf-8", "page/app.js"),
        ("/page/app.js", "text/javascript; charset=utf-8", "\"ws\""),
        ("/page/style.css", "text/css; charset=utf-8", ".result.err"),
    ] {
        let (status, head, body) = http_get_full(gateway.http_port, path).await;
        let head = head.to_ascii_lowercase();
        assert_eq!(status, 200, "{path}: {head}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{path}: {head}"
        );
        assert!(head.contains("cache-control: no-cache"), "{path}: {head}");
        assert!(head.contains("content-security-policy:"), "{path}: {head}");
        assert!(body.contains(must_contain), "{path} lacks {must_contain}");
        // Nothing is loaded from elsewhere: the page works offline.
        assert!(
            !body.contains("http://") && !body.contains("https://") && !body.contains("//cdn"),
            "{path} refers to an outside resource"
        );
    }
}

#[tokio::test]
async fn page_requests_publishes_and_subscribes_in_headless_chromium() {
    let binary = match chromium::find_or_install() {
        Ok(binary) => binary,
        Err(why) => {
            chromium::say(&format!(
                "SKIPPED: chromium is not installed and could not be installed: {why}"
            ));
            return;
        }
    };
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let gateway = GatewayProcess::start(&nats.url(), &[]);
    let browser = Browser::launch(&binary, WIDTH, HEIGHT);
    let mut tab = browser.first_tab().await;
    tab.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await;

    // The page loads and connects to /ws on its own origin.
    tab.navigate(&format!("http://127.0.0.1:{}/", gateway.http_port))
        .await;
    tab.wait_for(
        "document.getElementById('state').dataset.state === 'connected'",
        "the connection state `connected`",
    )
    .await;

    // A request to the echo service: the echoed data and a latency.
    let reply = request(&mut tab, "demo.echo", "hello from chromium").await;
    assert_eq!(reply["class"], "result ok", "{reply}");
    assert_eq!(reply["badge"], "OK", "{reply}");
    assert_eq!(reply["body"], "hello from chromium", "{reply}");
    assert_latency(&reply);

    // A request nobody serves: the error code, in the error style.
    let error = request(&mut tab, "nobody.home", "anyone?").await;
    assert_eq!(error["class"], "result err", "{error}");
    assert_eq!(error["badge"], "NO_RESPONDERS", "{error}");
    assert!(
        error["body"]
            .as_str()
            .is_some_and(|m| m.contains("nobody.home")),
        "{error}"
    );

    // Subscribe, then publish from the page and from a Unix-socket client.
    tab.fill("sub-subject", "page.events.>").await;
    tab.click("sub-send").await;
    let sid = tab
        .wait_for(
            "document.querySelector('#subs .sub[data-state=\"active\"]')?.dataset.sid ?? null",
            "an active subscription",
        )
        .await;
    let sid = sid.as_str().expect("a sid").to_owned();
    assert_eq!(nats.subscriptions_on("page.events.>").await, 1);

    tab.fill("pub-subject", "page.events.from_page").await;
    tab.fill("pub-data", "published by the page").await;
    tab.click("pub-send").await;
    tab.wait_for(
        "document.getElementById('pub-result').className === 'outcome ok' \
         && document.getElementById('pub-result').textContent.includes('acknowledged')",
        "the publish acknowledged",
    )
    .await;
    let messages = wait_messages(&mut tab, &sid, 1).await;
    assert_eq!(
        messages[0],
        json!(["page.events.from_page", "published by the page"])
    );

    let mut outside = gateway.json().await;
    let mut publish_outside = async |id: u32, subject: &str, data: &str| {
        let line = json!({ "op": "publish", "id": id, "subject": subject, "data": data });
        assert_eq!(
            outside.call(&line.to_string()).await,
            json!({ "id": id, "ok": true })
        );
    };
    publish_outside(1, "page.events.order", r#"{"order":42,"status":"shipped"}"#).await;
    let messages = wait_messages(&mut tab, &sid, 2).await;
    assert_eq!(
        messages,
        vec![
            json!(["page.events.order", r#"{"order":42,"status":"shipped"}"#]),
            json!(["page.events.from_page", "published by the page"]),
        ]
    );

    if let Some(path) = std::env::var_os("PAGE_SCREENSHOT") {
        let path = PathBuf::from(path);
        // A fresh request on top, so the picture shows a reply and an error together.
        request(&mut tab, "demo.echo", "hello again").await;
        tab.screenshot(&path).await;
        eprintln!("wrote {}", path.display());
    }

    // Message data is rendered as text, never as markup.
    let markup = "<b>not bold</b> <img src=x onerror=alert(1)>";
    publish_outside(2, "page.events.markup", markup).await;
    let messages = wait_messages(&mut tab, &sid, 3).await;
    assert_eq!(messages[0], json!(["page.events.markup", markup]));
    assert_eq!(
        tab.eval(
            "document.querySelectorAll('#subs b:not(.count):not(.dropped), #subs img').length"
        )
        .await,
        json!(0)
    );
    assert_eq!(sub_counter(&mut tab, &sid, "count").await, "3");
    assert_eq!(sub_counter(&mut tab, &sid, "dropped").await, "0");

    // Unsubscribe: the card says so and the gateway's NATS subscription is gone.
    tab.eval(&format!(
        "document.querySelector('#subs .sub[data-sid={}] button.unsub').click()",
        json!(sid)
    ))
    .await;
    tab.wait_for(
        &format!(
            "document.querySelector('#subs .sub[data-sid={}]').dataset.state === 'unsubscribed'",
            json!(sid)
        ),
        "the subscription unsubscribed",
    )
    .await;
    wait_no_subscriptions(&nats, "page.events.>").await;

    // Disconnect and reconnect; requests work again.
    tab.click("disconnect").await;
    tab.wait_for(
        "document.getElementById('state').dataset.state === 'disconnected'",
        "the state `disconnected`",
    )
    .await;
    assert_eq!(
        tab.eval("document.getElementById('connect').textContent")
            .await,
        "Reconnect"
    );
    tab.click("connect").await;
    tab.wait_for(
        "document.getElementById('state').dataset.state === 'connected'",
        "the state `connected` again",
    )
    .await;
    let reply = request(&mut tab, "demo.echo", "after reconnecting").await;
    assert_eq!(reply["body"], "after reconnecting", "{reply}");

    // A reader too slow for its subscription: while the page's main thread is busy, Chromium
    // stops reading the socket, the gateway's queue (8 messages) overflows and the oldest are
    // dropped. Every published message is then either shown or counted as dropped.
    let small_queue = GatewayProcess::start(&nats.url(), &["--subscription-queue", "8"]);
    tab.navigate(&format!("http://127.0.0.1:{}/", small_queue.http_port))
        .await;
    tab.wait_for(
        "document.getElementById('state').dataset.state === 'connected'",
        "the connection state `connected` on the second gateway",
    )
    .await;
    tab.fill("sub-subject", "flood.>").await;
    tab.click("sub-send").await;
    let sid = tab
        .wait_for(
            "document.querySelector('#subs .sub[data-state=\"active\"]')?.dataset.sid ?? null",
            "an active subscription on flood.>",
        )
        .await;
    let sid = sid.as_str().expect("a sid").to_owned();
    tab.eval(
        "setTimeout(() => { const t = performance.now(); while (performance.now() - t < 3000) {} }, 0); true",
    )
    .await;
    const FLOOD: usize = 2000;
    let filler = "x".repeat(8 * 1024);
    let mut lines = String::new();
    for i in 0..FLOOD {
        let line =
            json!({ "op": "publish", "subject": "flood.x", "data": format!("{i} {filler}") });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    let mut flooder = small_queue.json().await;
    flooder.send_raw(lines.as_bytes()).await;
    assert_eq!(
        flooder
            .call(r#"{"op":"publish","id":"last","subject":"other.x","data":""}"#)
            .await,
        json!({ "id": "last", "ok": true })
    );
    let accounted = format!(
        "(() => {{ const card = document.querySelector('#subs .sub[data-sid={sid}]'); \
         const shown = Number(card.querySelector('.count').textContent); \
         const dropped = Number(card.querySelector('.dropped').textContent); \
         return shown + dropped === {FLOOD} ? [shown, dropped] : null; }})()",
        sid = json!(sid)
    );
    let counts = tab
        .wait_for(
            &accounted,
            &format!("all {FLOOD} messages shown or counted as dropped"),
        )
        .await;
    assert!(
        counts[1].as_u64().is_some_and(|dropped| dropped > 0),
        "{counts}"
    );
    assert_eq!(
        tab.eval(&format!(
            "document.querySelector('#subs .sub[data-sid={}]').classList.contains('lossy')",
            json!(sid)
        ))
        .await,
        json!(true)
    );

    // Flush the events still queued, then: no script errors, no CSP violations.
    tab.eval("1").await;
    assert!(
        tab.problems.is_empty(),
        "the page reported problems: {:#?}",
        tab.problems
    );
    drop(tab);
    drop(browser);
}

/// A HS256 secret for `--auth-jwt-secret-file` (32 bytes, the minimum).
const SECRET: &[u8] = b"page-tests-secret-0123456789abcd";
/// Alice may request `demo.>`; nobody else may do anything.
const ALICE_POLICY: &str = r#"
[[grant]]
match = { sub = "alice" }
request = { allow = ["demo.>"] }
"#;

#[tokio::test]
async fn page_over_https_connects_with_wss_and_gets_replies_in_headless_chromium() {
    let binary = match chromium::find_or_install() {
        Ok(binary) => binary,
        Err(why) => {
            chromium::say(&format!(
                "SKIPPED: chromium is not installed and could not be installed: {why}"
            ));
            return;
        }
    };
    let nats = NatsServer::start();
    let _echo = spawn_echo(&nats.url(), "demo.echo", Duration::ZERO).await;
    let (_pki, flags) = crate::tls::page_tls();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let gateway = GatewayProcess::start(&nats.url(), &flags);
    // The test CA is not in the browser's store.
    let browser = Browser::launch_with(&binary, WIDTH, HEIGHT, &["--ignore-certificate-errors"]);
    let mut tab = browser.first_tab().await;
    tab.navigate(&format!("https://127.0.0.1:{}/", gateway.http_port))
        .await;
    let protocol = tab.eval("location.protocol").await;
    assert_eq!(protocol, "https:");
    tab.wait_for(
        "document.getElementById('state').dataset.state === 'connected'",
        "the connection state `connected` over wss://",
    )
    .await;
    let reply = request(&mut tab, "demo.echo", "hello over https").await;
    assert_eq!(reply["class"], "result ok", "{reply}");
    assert_eq!(reply["body"], "hello over https", "{reply}");
}

#[tokio::test]
async fn page_with_auth_required_connects_only_with_a_valid_token_in_the_field() {
    let binary = match chromium::find_or_install() {
        Ok(binary) => binary,
        Err(why) => {
            chromium::say(&format!(
                "SKIPPED: chromium is not installed and could not be installed: {why}"
            ));
            return;
        }
    };
    let nats = NatsServer::start();
    // The echo service, written here as a plain NATS client so the test sees the headers the
    // gateway sent it.
    let mut service = RecordingEcho::start(&nats, "demo.echo").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).expect("write the secret");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, ALICE_POLICY).expect("write the policy");
    let gateway = GatewayProcess::start(
        &nats.url(),
        &[
            "--auth-jwt-secret-file",
            secret.to_str().unwrap(),
            "--auth-required",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    let browser = Browser::launch(&binary, WIDTH, HEIGHT);
    let mut tab = browser.first_tab().await;

    // Without a token the page connects on load as always, and is refused (HTTP 401).
    tab.navigate(&format!("http://127.0.0.1:{}/", gateway.http_port))
        .await;
    let refused = wait_refused(&mut tab, "the refusal without a token").await;
    assert_eq!(
        refused,
        "connection refused: a token may be required or invalid"
    );
    assert_eq!(
        tab.eval("document.getElementById('token').type").await,
        "password"
    );

    // A token signed with another secret is refused as well.
    let forged = hs256("alice", b"forgers-secret-00000000000000000");
    tab.fill("token", &forged).await;
    tab.click("connect").await;
    wait_refused(&mut tab, "the refusal of a forged token").await;

    // Alice's token, typed into the field: connected, with ipc-gateway.v1 selected.
    let valid = hs256("alice", SECRET);
    tab.fill("token", &valid).await;
    tab.click("connect").await;
    tab.wait_for(
        "document.getElementById('state').dataset.state === 'connected'",
        "the state `connected` with a token",
    )
    .await;
    assert_eq!(tab.eval("ws.protocol").await, "ipc-gateway.v1");

    let reply = request(&mut tab, "demo.echo", "hello from alice").await;
    assert_eq!(reply["class"], "result ok", "{reply}");
    assert_eq!(reply["body"], "hello from alice", "{reply}");
    let seen = service.next().await;
    assert_eq!(seen.payload.as_ref(), b"hello from alice");
    assert_eq!(header(&seen, "Ipc-Gateway-Sub").as_deref(), Some("alice"));
    assert!(
        !format!("{:?}", seen.headers).contains(&valid),
        "the service saw the token: {:?}",
        seen.headers
    );

    // The policy applies to alice: outside demo.> is FORBIDDEN.
    let forbidden = request(&mut tab, "other.echo", "not for alice").await;
    assert_eq!(forbidden["badge"], "FORBIDDEN", "{forbidden}");

    // The token is kept nowhere but the field, and never written to the page's log.
    assert_eq!(
        tab.eval("localStorage.length + sessionStorage.length")
            .await,
        json!(0)
    );
    let page_text = tab.eval("document.body.innerText").await;
    assert!(
        !page_text.as_str().unwrap_or("").contains(&valid),
        "the page shows the token"
    );

    // Flush the events still queued: only the refused handshakes were reported (Chromium
    // logs each as an error), no script errors and no CSP violations.
    tab.eval("1").await;
    let unexpected: Vec<&String> = tab
        .problems
        .iter()
        .filter(|problem| !problem.contains("WebSocket connection to"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the page reported problems: {:#?}",
        tab.problems
    );
    drop(tab);
    drop(browser);
}

/// Waits for the page to show a refused connection; returns the message it shows.
async fn wait_refused(tab: &mut Tab, what: &str) -> Value {
    tab.wait_for(
        "(() => { const detail = document.getElementById('state-detail'); \
         return document.getElementById('state').dataset.state === 'disconnected' \
           && detail.className === 'err' && detail.textContent.includes('refused') \
           ? detail.textContent : null; })()",
        what,
    )
    .await
}

/// A HS256 token for `sub`, valid for ten minutes.
fn hs256(sub: &str, secret: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": sub, "iat": now, "exp": now + 600 }),
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// The page test's service (see `RecordingService`).
type RecordingEcho = RecordingService;

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

/// Sends a request from the page's form and returns the finished result row as
/// `{class, badge, body, latency}`.
async fn request(tab: &mut Tab, subject: &str, data: &str) -> Value {
    let before = tab
        .eval("document.querySelectorAll('#req-results li').length")
        .await;
    tab.fill("req-subject", subject).await;
    tab.fill("req-data", data).await;
    tab.fill("req-timeout", "5000").await;
    tab.click("req-send").await;
    let expression = format!(
        "(() => {{ const rows = document.querySelectorAll('#req-results li'); \
         const li = rows[0]; \
         if (rows.length <= {before} && rows.length < 20) return null; \
         if (!li || li.classList.contains('pending')) return null; \
         return {{ class: li.className, badge: li.querySelector('.badge').textContent, \
                   body: li.querySelector('.body').textContent, \
                   latency: li.querySelector('.latency').textContent, \
                   subject: li.querySelector('.subject').textContent }}; }})()"
    );
    let row = tab
        .wait_for(
            &expression,
            &format!("the answer to a request on {subject}"),
        )
        .await;
    assert_eq!(row["subject"], subject, "{row}");
    row
}

fn assert_latency(row: &Value) {
    let latency = row["latency"].as_str().unwrap_or("");
    let ms = latency
        .strip_suffix(" ms")
        .and_then(|n| n.parse::<f64>().ok());
    assert!(
        ms.is_some_and(|ms| (0.0..10_000.0).contains(&ms)),
        "latency {latency:?}"
    );
}

/// Waits until the subscription's card lists `count` messages; returns `[subject, data]`,
/// newest first.
async fn wait_messages(tab: &mut Tab, sid: &str, count: usize) -> Vec<Value> {
    let expression = format!(
        "(() => {{ const rows = document.querySelectorAll('#subs .sub[data-sid={sid}] .messages li'); \
         if (rows.length < {count}) return null; \
         return Array.from(rows, li => [li.querySelector('.subject').textContent, \
                                        li.querySelector('.data').textContent]); }})()",
        sid = json!(sid)
    );
    let rows = tab
        .wait_for(&expression, &format!("{count} messages on {sid}"))
        .await;
    rows.as_array().expect("a list").clone()
}

async fn sub_counter(tab: &mut Tab, sid: &str, class: &str) -> String {
    tab.eval(&format!(
        "document.querySelector('#subs .sub[data-sid={}] .{class}').textContent",
        json!(sid)
    ))
    .await
    .as_str()
    .unwrap_or("")
    .to_owned()
}

async fn wait_no_subscriptions(nats: &NatsServer, subject: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while nats.subscriptions_on(subject).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway still subscribes to {subject}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
