//! Headless Chromium for the page test: finds the browser (installing Debian's `chromium` when
//! it is missing and that is possible), starts it with a throwaway profile, and drives one tab
//! over the Chrome DevTools Protocol (JSON over a WebSocket). The browser's whole process group
//! is killed when `Browser` is dropped, also when a test panics.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// How long one DevTools call or one wait in the page may take before the test fails.
pub const PAGE_PATIENCE: Duration = Duration::from_secs(30);

const NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];

/// The browser binary: found on `PATH`, or installed with apt-get now. `Err` says why not.
pub fn find_or_install() -> Result<PathBuf, String> {
    if let Some(path) = find() {
        return Ok(path);
    }
    say("chromium is not installed: installing Debian's chromium with apt-get...");
    let started = Instant::now();
    install()?;
    let path = find().ok_or("apt-get succeeded but no chromium binary is on PATH")?;
    say(&format!("installed chromium in {:.0?}", started.elapsed()));
    Ok(path)
}

/// Writes a line to the real stderr: libtest captures `eprintln!`, and a skip or an install
/// must show in a quiet `cargo test` run.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    NAMES.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

fn install() -> Result<(), String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    let apt = |args: &[&str]| -> Result<(), String> {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        // Waits for a dpkg lock held by another apt instead of failing at once.
        command
            .args(["-o", "DPkg::Lock::Timeout=300", "-qq"])
            .args(args);
        let out = command
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|err| {
                format!(
                    "cannot run apt-get{}: {err}",
                    if root { "" } else { " through sudo -n" }
                )
            })?;
        if out.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!(
                "apt-get {} failed ({}): {last}",
                args.join(" "),
                out.status
            ))
        }
    };
    let install = ["install", "-y", "--no-install-recommends", "chromium"];
    apt(&install).or_else(|first| {
        // The package lists may be missing or stale on a fresh machine.
        apt(&["update"]).map_err(|update| format!("{first}; then {update}"))?;
        apt(&install)
    })
}

/// A running headless Chromium with its own temporary profile.
pub struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    /// The DevTools HTTP and WebSocket port.
    pub port: u16,
}

impl Browser {
    pub fn launch(binary: &Path, width: u32, height: u32) -> Browser {
        Browser::launch_with(binary, width, height, &[])
    }

    /// `launch`, with more command-line switches (`--ignore-certificate-errors`).
    pub fn launch_with(binary: &Path, width: u32, height: u32, extra: &[&str]) -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("log file");
        let child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-extensions",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                "--password-store=basic",
                "--hide-scrollbars",
                // Port 0: Chromium picks a free port and writes it to DevToolsActivePort.
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group, so that Drop can end the renderer and helpers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        let mut browser = Browser {
            child,
            profile,
            port: 0,
        };
        let active = browser.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + PAGE_PATIENCE;
        browser.port = loop {
            if let Some(port) = std::fs::read_to_string(&active)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok())
            {
                break port;
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!("chromium exited at start ({status}):\n{}", browser.log());
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port:\n{}",
                browser.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        browser
    }

    /// What Chromium printed, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default()
    }

    /// Attaches to the tab Chromium opened at start.
    pub async fn first_tab(&self) -> Tab {
        let deadline = Instant::now() + PAGE_PATIENCE;
        let url = loop {
            let (status, body) = http_get(self.port, "/json/list").await;
            let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|list| {
                list.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            });
            if status == 200
                && let Some(url) = page
            {
                break url.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no page target in /json/list ({status}): {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to the tab's DevTools WebSocket");
        let mut tab = Tab {
            ws,
            next_id: 0,
            problems: Vec::new(),
        };
        tab.call("Runtime.enable", json!({})).await;
        tab.call("Log.enable", json!({})).await;
        tab
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group id is the browser's pid (process_group(0) above).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type DevTools =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One tab under remote control.
pub struct Tab {
    ws: DevTools,
    next_id: u64,
    /// Uncaught exceptions and console or network errors the page reported, as text.
    pub problems: Vec<String>,
}

impl Tab {
    /// Sends one DevTools command and returns its result; DevTools errors fail the test.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .expect("send to DevTools");
        let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools did not answer {method} in time"))
                .expect("the DevTools socket is open")
                .expect("read from DevTools");
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if value["id"] == id {
                if let Some(error) = value.get("error") {
                    panic!("DevTools {method} failed: {error}");
                }
                return value["result"].clone();
            }
            self.note_event(&value);
        }
    }

    fn note_event(&mut self, event: &Value) {
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let details = &event["params"]["exceptionDetails"];
                let text = details["exception"]["description"]
                    .as_str()
                    .or(details["text"].as_str())
                    .unwrap_or("?");
                self.problems.push(format!("uncaught exception: {text}"));
            }
            Some("Runtime.consoleAPICalled") if event["params"]["type"] == "error" => {
                self.problems
                    .push(format!("console.error: {}", event["params"]["args"]));
            }
            Some("Log.entryAdded") if event["params"]["entry"]["level"] == "error" => {
                let entry = &event["params"]["entry"];
                self.problems
                    .push(format!("{}: {}", entry["source"], entry["text"]));
            }
            _ => {}
        }
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Some(details) = result.get("exceptionDetails") {
            panic!("the page threw on {expression}: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it gives something other than null, undefined or false.
    pub async fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        let deadline = Instant::now() + PAGE_PATIENCE;
        loop {
            let value = self.eval(expression).await;
            if !value.is_null() && value != Value::Bool(false) {
                return value;
            }
            if Instant::now() >= deadline {
                let log = self
                    .eval("document.getElementById('log')?.innerText ?? '(no log)'")
                    .await;
                panic!(
                    "the page never showed {what} (waited {PAGE_PATIENCE:?} for `{expression}`).\nThe page's log:\n{}",
                    log.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = result.get("errorText") {
            panic!("navigating to {url} failed: {error}");
        }
        self.wait_for("document.readyState === 'complete'", "a loaded document")
            .await;
    }

    /// Sets an input's value as typing would.
    pub async fn fill(&mut self, id: &str, value: &str) {
        let expression = format!(
            "(() => {{ const e = document.getElementById({id}); e.value = {value}; \
             e.dispatchEvent(new Event('input', {{ bubbles: true }})); return true; }})()",
            id = json!(id),
            value = json!(value),
        );
        self.eval(&expression).await;
    }

    /// Clicks a button once it is enabled.
    pub async fn click(&mut self, id: &str) {
        let expression = format!(
            "(() => {{ const e = document.getElementById({id}); \
             if (!e || e.disabled) return false; e.click(); return true; }})()",
            id = json!(id)
        );
        self.wait_for(&expression, &format!("an enabled #{id} to click"))
            .await;
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let result = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

/// A minimal HTTP GET on loopback that also returns the headers: (status, headers, body).
pub async fn http_get_full(port: u16, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new(), String::new());
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new(), String::new());
    }
    // DevTools keeps the connection open whatever the request says: read up to Content-Length.
    let mut response = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse::<usize>().ok());
                if length.is_some_and(|length| response.len() >= end + 4 + length) {
                    return;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(PAGE_PATIENCE, read).await;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

async fn http_get(port: u16, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_full(port, path).await;
    (status, body)
}
