//! The gateway's own NATS connections against a secured nats-server, with the real binary:
//! token, user and password, nkey, creds (operator mode), TLS, mutual TLS and TLS-first. A
//! right credential serves requests; a wrong one leaves `/ready` at 503, requests get
//! `UNAVAILABLE`, and the log names the setting that holds it, never its value. Conflicting
//! settings and unreadable files stop start-up with exit code 2, naming the setting as written.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::secured::{Operator, Pki, write};
use crate::common::{GatewayProcess, NatsServer, spawn_echo_on};

/// Serves one request through the gateway's Unix socket and returns the reply.
async fn request(gateway: &GatewayProcess) -> serde_json::Value {
    let mut conn = gateway.json().await;
    conn.call(r#"{"id":1,"subject":"secured.echo","data":"hello","timeout_ms":3000}"#)
        .await
}

/// Waits for `/ready`, then checks that a request comes back through NATS.
async fn serves(gateway: &GatewayProcess) {
    gateway.wait_status("/ready", 200).await;
    let reply = request(gateway).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data"], "hello", "{reply}");
}

/// The refusal's log line appears, `/ready` is 503 after it, a request gets `UNAVAILABLE`,
/// and no `secret` is in the log or `/status`. Returns the line.
async fn refused(gateway: &GatewayProcess, says: &str, secrets: &[&str]) -> String {
    let started = Instant::now();
    let line = gateway.wait_log(says).await;
    let (status, body) = gateway.get("/ready").await;
    assert_eq!(status, 503, "{body}");
    let reply = request(gateway).await;
    assert_eq!(reply["error"]["code"], "UNAVAILABLE", "{reply}");
    let (_, status_page) = gateway.get("/status").await;
    let log = gateway.log();
    for secret in secrets {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
        assert!(!status_page.contains(secret), "{secret} is in /status");
    }
    // One line per 10 s over every pool connection, whatever the cause.
    let allowed = started.elapsed().as_secs() as usize / 10 + 2;
    let lines = log.lines().filter(|l| l.contains(says)).count();
    assert!(lines <= allowed, "{lines} lines:\n{log}");
    line
}

/// `ipc-gateway demo-echo` on `secured.echo`, with these environment variables; killed when
/// dropped.
struct DemoEcho(std::process::Child);

impl DemoEcho {
    fn start(nats: &NatsServer, env: &[(&str, &str)]) -> DemoEcho {
        let child = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
            .args([
                "demo-echo",
                "--nats-url",
                &nats.url(),
                "--subject",
                "secured.echo",
            ])
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start demo-echo");
        DemoEcho(child)
    }
}

impl Drop for DemoEcho {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn echo(options: async_nats::ConnectOptions, nats: &NatsServer) {
    let client = options
        .connect(nats.url())
        .await
        .expect("the echo connects");
    spawn_echo_on(client, "secured.echo", Duration::ZERO).await;
}

#[tokio::test]
async fn a_token_from_the_environment_serves_and_a_wrong_one_is_named_but_never_shown() {
    let right = "right-token-7f3a9c";
    let wrong = "wrong-token-51be0d";
    let nats = NatsServer::start_with_config(&format!("authorization {{ token: {right:?} }}"));
    echo(async_nats::ConnectOptions::with_token(right.into()), &nats).await;

    let good = GatewayProcess::start_logged(&nats.url(), &[], &[("IPC_GATEWAY_NATS_TOKEN", right)]);
    serves(&good).await;
    assert!(!good.log().contains(right), "{}", good.log());

    let bad = GatewayProcess::start_logged(&nats.url(), &["--nats-token", wrong], &[]);
    let line = refused(&bad, "refused the gateway's credentials", &[right, wrong]).await;
    assert!(
        line.contains(&format!(
            "NATS at {} refused the gateway's credentials (--nats-token): authorization violation",
            nats.url()
        )),
        "{line}"
    );
    drop(bad);

    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "gw.toml", &format!("nats_token = {wrong:?}\n"));
    let from_file =
        GatewayProcess::start_logged(&nats.url(), &["--config", file.to_str().unwrap()], &[]);
    let line = refused(
        &from_file,
        "refused the gateway's credentials",
        &[right, wrong],
    )
    .await;
    assert!(
        line.contains(&format!("(nats_token in {})", file.display())),
        "{line}"
    );

    // A changed token needs a restart; the reload's line names the setting, not the value.
    let changed = "changed-token-0c77e2";
    write(
        dir.path(),
        "gw.toml",
        &format!("nats_token = {changed:?}\n"),
    );
    from_file.signal("HUP");
    let line = from_file.wait_log("changed settings need a restart").await;
    assert!(line.contains("nats_token"), "{line}");
    let log = from_file.log();
    for secret in [right, wrong, changed] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}

#[tokio::test]
async fn a_user_and_password_serve_and_a_wrong_password_is_named_but_never_shown() {
    let right = "pw-right-2c81e4";
    let wrong = "pw-wrong-9d04aa";
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ user: gw, password: {right:?} }} ] }}"
    ));
    // The demo service takes the gateway's settings from the same variables.
    let _echo = DemoEcho::start(
        &nats,
        &[
            ("IPC_GATEWAY_NATS_USER", "gw"),
            ("IPC_GATEWAY_NATS_PASSWORD", right),
        ],
    );

    let good = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-user", "gw"],
        &[("IPC_GATEWAY_NATS_PASSWORD", right)],
    );
    good.wait_status("/ready", 200).await;
    // Until demo-echo has subscribed, NO_RESPONDERS.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = request(&good).await;
        if reply["ok"] == true {
            assert_eq!(reply["data"], "hello", "{reply}");
            break;
        }
        assert_eq!(reply["error"]["code"], "NO_RESPONDERS", "{reply}");
        assert!(Instant::now() < deadline, "demo-echo never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let bad = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-user", "gw"],
        &[("IPC_GATEWAY_NATS_PASSWORD", wrong)],
    );
    let line = refused(&bad, "refused the gateway's credentials", &[right, wrong]).await;
    assert!(
        line.contains("(--nats-user and IPC_GATEWAY_NATS_PASSWORD)"),
        "{line}"
    );
}

#[tokio::test]
async fn an_nkey_seed_file_serves_and_an_unknown_key_is_refused() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    echo(async_nats::ConnectOptions::with_nkey(seed.clone()), &nats).await;
    let dir = tempfile::tempdir().unwrap();
    let seed_file = write(dir.path(), "gateway.nk", &format!("{seed}\n"));
    let good = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-nkey", seed_file.to_str().unwrap()],
        &[],
    );
    serves(&good).await;

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let stranger_file = write(dir.path(), "stranger.nk", &stranger);
    let bad = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-nkey", stranger_file.to_str().unwrap()],
        &[],
    );
    let line = refused(
        &bad,
        "refused the gateway's credentials",
        &[&seed, &stranger],
    )
    .await;
    assert!(line.contains("(--nats-nkey)"), "{line}");
}

#[tokio::test]
async fn a_creds_file_of_an_operator_signed_user_serves_and_is_read_again_at_every_connect() {
    let operator = Operator::new();
    let nats = NatsServer::start_with_config(&operator.server_config());
    let service_creds = operator.user_creds("echo-service");
    echo(
        async_nats::ConnectOptions::with_credentials(&service_creds).unwrap(),
        &nats,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let creds = write(dir.path(), "gateway.creds", &operator.user_creds("gateway"));
    let good = GatewayProcess::start_logged(
        &nats.url(),
        &[],
        &[("IPC_GATEWAY_NATS_CREDS", creds.to_str().unwrap())],
    );
    serves(&good).await;

    // A user of another operator's account: nats-server does not know its issuer.
    let stranger_creds = Operator::new().user_creds("stranger");
    let seed = stranger_creds
        .lines()
        .skip_while(|line| !line.contains("BEGIN USER NKEY SEED"))
        .nth(1)
        .unwrap()
        .to_owned();
    let stranger = write(dir.path(), "stranger.creds", &stranger_creds);
    let bad = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-creds", stranger.to_str().unwrap()],
        &[],
    );
    let line = refused(&bad, "refused the gateway's credentials", &[&seed]).await;
    assert!(line.contains("(--nats-creds)"), "{line}");

    // The file is read again at every connect: a right one put in its place is taken at the
    // next attempt, without a restart.
    write(dir.path(), "stranger.creds", &operator.user_creds("fixed"));
    serves(&bad).await;
}

#[tokio::test]
async fn tls_with_the_ca_serves_and_without_it_fails_naming_the_certificate_problem() {
    let pki = Pki::new();
    let nats = NatsServer::start_with_config(&pki.server_tls(""));
    echo(
        async_nats::ConnectOptions::new().add_root_certificates(pki.ca.clone()),
        &nats,
    )
    .await;
    let good = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-tls-ca", pki.ca.to_str().unwrap()],
        &[],
    );
    serves(&good).await;

    let untrusted = GatewayProcess::start_logged(
        &nats.url(),
        &["--nats-tls-ca", pki.other_ca.to_str().unwrap()],
        &[],
    );
    let line = refused(&untrusted, "TLS failed", &[]).await;
    assert!(
        line.contains("TLS failed (--nats-tls-ca)") && line.contains("UnknownIssuer"),
        "{line}"
    );
}

#[tokio::test]
async fn mutual_tls_serves_with_the_client_certificate_and_fails_without_it() {
    let pki = Pki::new();
    let nats = NatsServer::start_with_config(
        &pki.server_tls(&format!("ca_file: {:?}\n  verify: true", pki.ca)),
    );
    echo(
        async_nats::ConnectOptions::new()
            .add_root_certificates(pki.ca.clone())
            .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone()),
        &nats,
    )
    .await;
    let ca = pki.ca.to_str().unwrap();
    let good = GatewayProcess::start_logged(
        &nats.url(),
        &[
            "--nats-tls-ca",
            ca,
            "--nats-tls-cert",
            pki.client_cert.to_str().unwrap(),
            "--nats-tls-key",
            pki.client_key.to_str().unwrap(),
        ],
        &[],
    );
    serves(&good).await;

    let anonymous = GatewayProcess::start_logged(&nats.url(), &["--nats-tls-ca", ca], &[]);
    let line = refused(&anonymous, "NATS at", &[]).await;
    assert!(line.contains("TLS failed (--nats-tls-ca)"), "{line}");
}

#[tokio::test]
async fn tls_first_serves_a_server_with_handshake_first() {
    let pki = Pki::new();
    let nats = NatsServer::start_with_config(&pki.server_tls("handshake_first: true"));
    echo(
        async_nats::ConnectOptions::new()
            .add_root_certificates(pki.ca.clone())
            .tls_first(),
        &nats,
    )
    .await;
    let good = GatewayProcess::start_logged(
        &nats.url(),
        &[
            "--nats-tls-first",
            "--nats-tls-ca",
            pki.ca.to_str().unwrap(),
        ],
        &[],
    );
    serves(&good).await;
}

fn serve(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"));
    for (name, _) in std::env::vars() {
        if name.starts_with("IPC_GATEWAY_") {
            command.env_remove(name);
        }
    }
    let output = command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run ipc-gateway");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn conflicting_settings_and_unreadable_files_exit_2_naming_the_setting_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let creds = write(dir.path(), "gw.creds", "not creds");
    let token = "conflict-token-88e1";
    let (code, err) = serve(
        &["serve", "--nats-creds", "/etc/none.creds"],
        &[("IPC_GATEWAY_NATS_TOKEN", token)],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "IPC_GATEWAY_NATS_TOKEN=***: cannot be used together with --nats-creds /etc/none.creds"
        ),
        "{err}"
    );
    assert!(!err.contains(token), "{err}");

    let (code, err) = serve(&["serve", "--nats-tls-cert", "/x/cert.pem"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--nats-tls-cert /x/cert.pem: needs nats_tls_key"),
        "{err}"
    );

    let (code, err) = serve(&["serve", "--nats-nkey", "/nowhere/gw.nk"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--nats-nkey /nowhere/gw.nk: cannot read /nowhere/gw.nk"),
        "{err}"
    );

    let (code, err) = serve(
        &["check-config"],
        &[("IPC_GATEWAY_NATS_CREDS", creds.to_str().unwrap())],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("IPC_GATEWAY_NATS_CREDS={}", creds.display()))
            && err.contains("is not a NATS credentials file"),
        "{err}"
    );
}

#[test]
fn check_config_shows_that_a_secret_is_set_never_its_value() {
    let password = "check-config-pw-4411";
    let output = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"))
        .args(["check-config", "--nats-user", "gw"])
        .env("IPC_GATEWAY_NATS_PASSWORD", password)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(!shown.contains(password), "{shown}");
    let line = shown
        .lines()
        .find(|line| line.starts_with("nats_password = "))
        .unwrap_or_else(|| panic!("no nats_password line:\n{shown}"));
    assert!(
        line.contains("\"***\"") && line.contains("# env IPC_GATEWAY_NATS_PASSWORD"),
        "{line}"
    );
}
