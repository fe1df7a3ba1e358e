//! What a new user sees first, with the real binary: `check-config`, configuration errors that
//! name the flag, variable or key as written, listen errors that name the flag, the log of an
//! unreachable NATS (rate-limited, no colour off a terminal), `request`/`publish` reading
//! standard input, the exit statuses, shell completions and the man page.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{GatewayProcess, NatsServer, PATIENCE, free_port};

fn gateway() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ipc-gateway"));
    // The tests' own environment must not leak into the settings.
    command.env_remove("NATS_URL").env_remove("NO_COLOR");
    for (name, _) in std::env::vars() {
        if name.starts_with("IPC_GATEWAY_") {
            command.env_remove(name);
        }
    }
    command
}

fn run(args: &[&str]) -> Output {
    gateway().args(args).output().expect("run ipc-gateway")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_prints_every_setting_with_its_source_or_exits_2_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, "nats_connections = 3\n").unwrap();
    let output = gateway()
        .args(["check-config"])
        .arg(&file)
        .args(["--http", "localhost:9091"])
        .env("IPC_GATEWAY_MAX_FRAME_BYTES", "4096")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let shown = text(&output.stdout);
    let line = |key: &str| {
        shown
            .lines()
            .find(|line| line.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} is not shown:\n{shown}"))
            .to_owned()
    };
    assert!(line("nats_connections").contains(&format!("# file {}", file.display())));
    assert!(line("max_frame_bytes").contains("# env IPC_GATEWAY_MAX_FRAME_BYTES"));
    let http = line("http");
    assert!(
        http.contains("\"127.0.0.1:9091\"") && http.contains("# flag --http"),
        "the host name is resolved: {http}"
    );
    assert!(line("request_timeout_ms").ends_with("# default"));
    for key in ipc_gateway::config::KEYS {
        assert!(shown.contains(&format!("{key} ")), "{key}:\n{shown}");
    }

    std::fs::write(&file, "request_timeout = 10\n").unwrap();
    let output = gateway().arg("check-config").arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = text(&output.stderr);
    assert!(
        err.contains("unknown key \"request_timeout\"")
            && err.contains("did you mean \"request_timeout_ms\"?"),
        "{err}"
    );
    assert!(!err.contains("gateway_id"), "not every key: {err}");
}

#[test]
fn configuration_errors_name_the_flag_variable_or_key_as_written_and_the_value() {
    let output = run(&["serve", "--http", "no-such-host.invalid:8080"]);
    assert_eq!(output.status.code(), Some(2));
    let err = text(&output.stderr);
    assert!(
        err.contains("--http") && err.contains("no-such-host.invalid:8080"),
        "{err}"
    );
    assert!(err.contains("use an IP address"), "{err}");
    let output = gateway()
        .args(["check-config"])
        .env("IPC_GATEWAY_GRPC", "somewhere")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let err = text(&output.stderr);
    assert!(err.contains("IPC_GATEWAY_GRPC=somewhere"), "{err}");
    let output = run(&["check-config", "--max-frame-bytes", "10"]);
    assert_eq!(output.status.code(), Some(2));
    let err = text(&output.stderr);
    assert!(err.contains("--max-frame-bytes 10: must be"), "{err}");
    assert!(
        !err.contains("default.") && !err.contains(".rs:") && !err.contains("ServeArgs"),
        "{err}"
    );
}

#[test]
fn a_listen_address_in_use_names_its_flag_and_a_missing_socket_directory_is_named() {
    let nats = NatsServer::start();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    for (flag, http, grpc) in [("--http", port, free_port()), ("--grpc", free_port(), port)] {
        let output = gateway()
            .args(["serve", "--nats-url", &nats.url()])
            .arg("--socket")
            .arg(dir.path().join(format!("{http}.sock")))
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--grpc", &format!("127.0.0.1:{grpc}")])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let err = text(&output.stderr);
        assert!(
            err.contains(&format!("{flag} 127.0.0.1:{port}: address already in use")),
            "{err}"
        );
    }
    let missing = dir.path().join("no-such-dir");
    let output = gateway()
        .args(["serve", "--nats-url", &nats.url()])
        .arg("--socket")
        .arg(missing.join("gw.sock"))
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .args(["--grpc", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = text(&output.stderr);
    assert!(
        err.contains(&format!(
            "the directory {} does not exist",
            missing.display()
        )),
        "{err}"
    );
}

/// async-nats retries every 0-2 s on each pool connection and reports each failure; the
/// gateway logs one line per 10 s with the URL and the cause, and no colour into a pipe.
#[test]
fn an_unreachable_nats_is_logged_with_its_url_and_cause_at_most_once_per_period() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let url = format!("nats://127.0.0.1:{}", free_port());
    let mut child = gateway()
        .args(["serve", "--nats-url", &url, "--nats-connections", "4"])
        .arg("--socket")
        .arg(dir.path().join("gw.sock"))
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .args(["--grpc", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let elapsed = started.elapsed();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("NATS unreachable"))
        .collect();
    let allowed = elapsed.as_secs() as usize / 10 + 1;
    assert!(
        !lines.is_empty() && lines.len() <= allowed,
        "{} lines in {elapsed:?}:\n{stderr}",
        lines.len()
    );
    assert!(
        lines[0].contains(&url) && lines[0].contains("Connection refused"),
        "{}",
        lines[0]
    );
    assert!(
        !stderr.contains(" async_nats:"),
        "async-nats's events: {stderr}"
    );
    assert!(
        stderr.lines().count() < 20,
        "the log is not flooded:\n{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "no ANSI colour into a file");
}

#[test]
fn request_and_publish_read_the_data_from_standard_input_for_a_dash() {
    let nats = NatsServer::start();
    let gateway_process = GatewayProcess::start(&nats.url(), &[]);
    let socket = gateway_process.socket.to_str().unwrap().to_owned();
    let mut echo = demo_echo(&nats, "t.echo");
    let request = |subject: &str| {
        let mut child = gateway()
            .args(["request", subject, "-", "--socket", &socket])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"line one\nline two").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    // The echo service answers once its subscription is in place.
    let deadline = Instant::now() + PATIENCE;
    let output = loop {
        let output = request("t.echo");
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        text(&output.stdout),
        "line one\nline two\n",
        "{}",
        text(&output.stderr)
    );
    let output = request("t.nobody");
    assert_eq!(
        output.status.code(),
        Some(1),
        "the gateway answered an error"
    );
    assert!(text(&output.stderr).contains("NO_RESPONDERS"));
    let output = run(&["request", "t.echo", "x", "--socket", "/nonexistent/gw.sock"]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "the gateway cannot be reached"
    );
    let _ = echo.kill();
    let _ = echo.wait();

    let subscriber = gateway()
        .args(["subscribe", "t.news", "--count", "1", "--socket", &socket])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let subscriber_pid = subscriber.id();
    // Publish until the subscriber (whose subscription may not be in place yet) has one.
    let waiter = std::thread::spawn(move || subscriber.wait_with_output().unwrap());
    let deadline = Instant::now() + PATIENCE;
    while !waiter.is_finished() {
        assert!(Instant::now() < deadline, "the subscriber got nothing");
        let mut child = gateway()
            .args(["publish", "t.news", "-", "--socket", &socket])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"from stdin")
            .unwrap();
        assert!(child.wait().unwrap().success());
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = waiter.join().unwrap();
    assert_eq!(
        text(&output.stdout),
        "t.news from stdin\n",
        "{subscriber_pid}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let output = run(&["completions", shell]);
        assert!(output.status.success(), "{shell}");
        let script = text(&output.stdout);
        assert!(
            script.contains("serve")
                && script.contains("nats-url")
                && script.contains("check-config"),
            "{shell}: {script}"
        );
    }
    assert_eq!(run(&["completions", "tcsh"]).status.code(), Some(2));
    let output = run(&["man"]);
    assert!(output.status.success());
    let roff = text(&output.stdout);
    assert!(roff.contains(".TH ipc-gateway 1"), "{roff}");
    assert!(roff.contains("check\\-config"), "{roff}");
    // Rendered by man(1) where it is installed.
    if Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let mut man = Command::new("man")
            .args(["-l", "-P", "cat", "-"])
            .env("MANWIDTH", "100")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        man.stdin
            .take()
            .unwrap()
            .write_all(roff.as_bytes())
            .unwrap();
        let rendered = man.wait_with_output().unwrap();
        assert!(rendered.status.success(), "{}", text(&rendered.stderr));
        let page = text(&rendered.stdout);
        assert!(
            page.contains("NAME") && page.contains("ipc-gateway"),
            "{page}"
        );
        assert!(!page.contains(".TH"), "rendered, not raw: {page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_echo_returns_the_clients_headers_and_not_the_gateways() {
    let nats = NatsServer::start();
    let gateway_process = GatewayProcess::start(&nats.url(), &[]);
    let mut echo = demo_echo(&nats, "t.echo");
    let mut client = gateway_process.json().await;
    let with_headers =
        r#"{"op":"request","id":1,"subject":"t.echo","data":"hi","headers":{"X-Trace":"abc"}}"#;
    // The echo service answers once its subscription is in place.
    let deadline = Instant::now() + PATIENCE;
    let answer = loop {
        let answer = client.call(with_headers).await;
        if answer["ok"] == true || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answer["data"], "hi", "{answer}");
    let headers = answer["headers"].as_object().expect("headers");
    assert_eq!(
        headers.len(),
        1,
        "only the client's header comes back: {answer}"
    );
    assert!(headers.contains_key("X-Trace"), "{answer}");
    // Without headers of its own, the answer has none: the identity stays with the service.
    let bare = client
        .call(r#"{"op":"request","id":2,"subject":"t.echo","data":"hi"}"#)
        .await;
    assert_eq!(bare["data"], "hi", "{bare}");
    assert!(bare.get("headers").is_none(), "{bare}");
    let _ = echo.kill();
    let _ = echo.wait();
}

/// `ipc-gateway demo-echo` answering `subject` on `nats`.
fn demo_echo(nats: &NatsServer, subject: &str) -> std::process::Child {
    crate::common::die_with_the_test(&mut gateway())
        .args(["demo-echo", "--nats-url", &nats.url(), "--subject", subject])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
