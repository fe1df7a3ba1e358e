//! The client process (this bench binary again, MEMBENCH_ROLE=client): it opens its share of
//! the WebSocket connections, one task each, and runs the commands the parent writes on its
//! stdin, one a line; after each it prints one status line on stdout:
//! `<command> ok=N failed=N msgs=N dropped=N secs=S error=<first error or ->`.
//!
//! - (at start) `opened`: every connection is open and did one ping → pong.
//! - `sub SUBJECT` : every connection subscribes to SUBJECT (sid 1); ok = acknowledged.
//! - `own PREFIX K`: connection i subscribes to PREFIX.i.0 .. PREFIX.i.(K-1) (sids 1..=K).
//! - `unsub`: every connection unsubscribes all it holds; ok = acknowledged.
//! - `expect M SECS`: waits until every connection has had M messages (or `dropped` counts)
//!   since it opened; ok = connections that did, msgs/dropped = totals.
//! - `pub SUBJECT COUNT BYTES`: connection 0 publishes COUNT messages of BYTES (for runs
//!   by hand; the parent publishes from a NATS client of its own).
//! - `close`: closes every connection.
//!
//! Environment from the parent: MEMBENCH_PORT, MEMBENCH_COUNT, MEMBENCH_FIRST (index of its
//! first connection: subjects and source addresses), MEMBENCH_SOURCES, MEMBENCH_HANDSHAKES.

use std::io::{BufRead, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::STEP_PATIENCE;

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Clone)]
enum Command {
    Start,
    Sub(String),
    Own(String, usize),
    Unsub,
    Expect(u64, Duration),
    /// The first connection of the first process publishes COUNT messages of BYTES.
    Publish(String, usize, usize),
    Close,
}

/// What one connection did for one command.
#[derive(Default)]
struct Done {
    ok: usize,
    failed: usize,
    msgs: u64,
    dropped: u64,
    error: Option<String>,
    /// The connection is gone.
    ended: bool,
}

pub fn source_address(index: usize, sources: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (index % sources) as u8)
}

fn env_usize(name: &str) -> Result<usize, String> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set"))?
        .parse()
        .map_err(|_| format!("{name} is not a number"))
}

pub fn client_main() -> Result<(), String> {
    let port = env_usize("MEMBENCH_PORT")? as u16;
    let count = env_usize("MEMBENCH_COUNT")?;
    let first = env_usize("MEMBENCH_FIRST")?;
    let sources = env_usize("MEMBENCH_SOURCES")?;
    let handshakes = Arc::new(Semaphore::new(env_usize("MEMBENCH_HANDSHAKES")?));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(async move {
        let (commands, command_rx) = watch::channel((0u64, Command::Start));
        let (events, mut event_rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        for index in first..first + count {
            let conn = Conn {
                index,
                port,
                source: source_address(index, sources),
                handshakes: handshakes.clone(),
                commands: command_rx.clone(),
                events: events.clone(),
                msgs: 0,
                dropped: 0,
                sids: 0,
            };
            tokio::spawn(conn.run());
        }
        drop(events);
        let mut alive = count;
        let opened = collect(&mut event_rx, &mut alive, count).await;
        say("opened", &opened, started);
        let mut lines = read_stdin();
        let mut seq = 0;
        while let Some(line) = lines.recv().await {
            let words: Vec<&str> = line.split_whitespace().collect();
            let command = match words.as_slice() {
                ["sub", subject] => Command::Sub((*subject).to_owned()),
                ["own", prefix, k] => Command::Own((*prefix).to_owned(), k.parse().unwrap_or(1)),
                ["unsub"] => Command::Unsub,
                ["expect", m, secs] => Command::Expect(
                    m.parse().unwrap_or(0),
                    Duration::from_secs_f64(secs.parse().unwrap_or(60.0)),
                ),
                ["close"] => Command::Close,
                ["pub", subject, count, bytes] => Command::Publish(
                    (*subject).to_owned(),
                    count.parse().unwrap_or(1),
                    bytes.parse().unwrap_or(0),
                ),
                _ => continue,
            };
            let started = Instant::now();
            seq += 1;
            let close = matches!(command, Command::Close);
            let _ = commands.send((seq, command));
            let expected = alive;
            let done = collect(&mut event_rx, &mut alive, expected).await;
            say(words[0], &done, started);
            if close {
                break;
            }
        }
    });
    Ok(())
}

/// Adds up one answer from each of `expected` connections.
async fn collect(
    events: &mut mpsc::UnboundedReceiver<Done>,
    alive: &mut usize,
    expected: usize,
) -> Done {
    let mut total = Done::default();
    for _ in 0..expected {
        let Some(done) = events.recv().await else {
            break;
        };
        total.ok += done.ok;
        total.failed += done.failed;
        total.msgs += done.msgs;
        total.dropped += done.dropped;
        if done.ended {
            *alive -= 1;
        }
        if total.error.is_none() {
            total.error = done.error;
        }
    }
    total
}

fn say(stage: &str, done: &Done, started: Instant) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{stage} ok={} failed={} msgs={} dropped={} secs={:.2} error={}",
        done.ok,
        done.failed,
        done.msgs,
        done.dropped,
        started.elapsed().as_secs_f64(),
        done.error.as_deref().unwrap_or("-").replace('\n', " ")
    );
    let _ = out.flush();
}

fn read_stdin() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

struct Conn {
    index: usize,
    port: u16,
    source: Ipv4Addr,
    handshakes: Arc<Semaphore>,
    commands: watch::Receiver<(u64, Command)>,
    events: mpsc::UnboundedSender<Done>,
    /// Messages (and dropped counts) received since the connection opened.
    msgs: u64,
    dropped: u64,
    /// Subscriptions held: sids 1..=sids.
    sids: usize,
}

/// What a text message from the gateway is, told without parsing all of it.
enum Event {
    Msg,
    Dropped(u64),
    Ok,
    Failed(String),
    Other,
}

fn classify(text: &str) -> Event {
    if text.starts_with(r#"{"op":"msg""#) {
        Event::Msg
    } else if text.starts_with(r#"{"op":"dropped""#) {
        let count = text
            .split_once(r#""count":"#)
            .and_then(|(_, rest)| {
                let end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            })
            .unwrap_or(1);
        Event::Dropped(count)
    } else if text.starts_with(r#"{"id":"#) && text.contains(r#""ok":true"#) {
        Event::Ok
    } else if text.starts_with(r#"{"id":"#) {
        Event::Failed(text.chars().take(200).collect())
    } else {
        Event::Other
    }
}

impl Conn {
    async fn run(mut self) {
        let handshakes = self.handshakes.clone();
        let permit = handshakes.acquire().await;
        let opened = self.open().await;
        drop(permit);
        let mut ws = match opened {
            Ok(ws) => ws,
            Err(err) => {
                self.report(0, 1, Some(err), true);
                return;
            }
        };
        self.report(1, 0, None, false);
        loop {
            tokio::select! {
                changed = self.commands.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let (_, command) = self.commands.borrow_and_update().clone();
                    match self.command(&mut ws, command).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(err) => {
                            self.report(0, 1, Some(err), true);
                            return;
                        }
                    }
                }
                message = ws.next() => {
                    if let Err(err) = self.take(message) {
                        // Reported with the next command.
                        let _ = self.commands.changed().await;
                        self.report(0, 1, Some(err), true);
                        return;
                    }
                }
            }
        }
    }

    fn report(&self, ok: usize, failed: usize, error: Option<String>, ended: bool) {
        let _ = self.events.send(Done {
            ok,
            failed,
            msgs: self.msgs,
            dropped: self.dropped,
            error,
            ended,
        });
    }

    async fn open(&mut self) -> Result<Ws, String> {
        let socket = TcpSocket::new_v4().map_err(|err| format!("socket: {err}"))?;
        socket
            .bind(SocketAddr::from((self.source, 0)))
            .map_err(|err| format!("bind {}: {err}", self.source))?;
        let stream = tokio::time::timeout(
            STEP_PATIENCE,
            socket.connect(SocketAddr::from(([127, 0, 0, 1], self.port))),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|err| format!("connect: {err}"))?;
        let _ = stream.set_nodelay(true);
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut ws, _) = tokio::time::timeout(
            STEP_PATIENCE,
            tokio_tungstenite::client_async_with_config(
                format!("ws://127.0.0.1:{}/ws", self.port),
                stream,
                Some(config),
            ),
        )
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|err| format!("handshake: {err}"))?;
        send(&mut ws, r#"{"op":"ping","id":0}"#.into()).await?;
        let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
        loop {
            let message = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| "no pong in time".to_string())?;
            if let Some(Ok(Message::Text(text))) = &message
                && text.as_str().starts_with(r#"{"op":"pong""#)
            {
                return Ok(ws);
            }
            self.take(message)?;
        }
    }

    /// Counts a message that is not an answer; fails when the connection ended.
    fn take(
        &mut self,
        message: Option<Result<Message, impl std::fmt::Display>>,
    ) -> Result<(), String> {
        match message {
            Some(Ok(Message::Text(text))) => {
                match classify(text.as_str()) {
                    Event::Msg => self.msgs += 1,
                    Event::Dropped(n) => self.dropped += n,
                    _ => {}
                }
                Ok(())
            }
            Some(Ok(Message::Close(frame))) => Err(format!("closed by the gateway: {frame:?}")),
            Some(Ok(_)) => Ok(()),
            Some(Err(err)) => Err(format!("read: {err}")),
            None => Err("the connection ended".into()),
        }
    }

    /// Runs one command; Ok(false) once the connection is closed.
    async fn command(&mut self, ws: &mut Ws, command: Command) -> Result<bool, String> {
        match command {
            Command::Start => Ok(true),
            Command::Sub(subject) => {
                let requests = vec![format!(
                    r#"{{"op":"subscribe","id":1,"subject":"{subject}"}}"#
                )];
                self.sids = 1;
                self.answered(ws, requests).await
            }
            Command::Own(prefix, k) => {
                let requests = (0..k)
                    .map(|n| {
                        format!(
                            r#"{{"op":"subscribe","id":{},"subject":"{prefix}.{}.{n}"}}"#,
                            n + 1,
                            self.index
                        )
                    })
                    .collect();
                self.sids = k;
                self.answered(ws, requests).await
            }
            Command::Unsub => {
                let requests = (1..=self.sids)
                    .map(|sid| format!(r#"{{"op":"unsubscribe","id":{sid}}}"#))
                    .collect();
                self.sids = 0;
                self.answered(ws, requests).await
            }
            Command::Expect(want, patience) => {
                let deadline = tokio::time::Instant::now() + patience;
                while self.msgs + self.dropped < want {
                    match tokio::time::timeout_at(deadline, ws.next()).await {
                        Ok(message) => self.take(message)?,
                        Err(_) => break,
                    }
                }
                let ok = self.msgs + self.dropped >= want;
                self.report(usize::from(ok), usize::from(!ok), None, false);
                Ok(true)
            }
            Command::Publish(subject, count, bytes) => {
                if self.index == 0 {
                    let data = "x".repeat(bytes);
                    for _ in 0..count {
                        ws.feed(Message::text(format!(
                            r#"{{"op":"publish","subject":"{subject}","data":"{data}"}}"#
                        )))
                        .await
                        .map_err(|err| format!("send: {err}"))?;
                    }
                    ws.flush().await.map_err(|err| format!("send: {err}"))?;
                }
                self.report(1, 0, None, false);
                Ok(true)
            }
            Command::Close => {
                let closed = close(ws).await;
                let failed = closed.is_err();
                self.report(
                    usize::from(!failed),
                    usize::from(failed),
                    closed.err(),
                    true,
                );
                Ok(false)
            }
        }
    }

    /// Sends the requests (pipelined) and waits for an answer to each.
    async fn answered(&mut self, ws: &mut Ws, requests: Vec<String>) -> Result<bool, String> {
        let want = requests.len();
        for request in requests {
            ws.feed(Message::text(request))
                .await
                .map_err(|err| format!("send: {err}"))?;
        }
        ws.flush().await.map_err(|err| format!("send: {err}"))?;
        let (mut ok, mut failed, mut error) = (0, 0, None);
        let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
        while ok + failed < want {
            let message = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| format!("{} of {want} answers in time", ok + failed))?;
            if let Some(Ok(Message::Text(text))) = &message {
                match classify(text.as_str()) {
                    Event::Ok => {
                        ok += 1;
                        continue;
                    }
                    Event::Failed(answer) => {
                        failed += 1;
                        error.get_or_insert(answer);
                        continue;
                    }
                    _ => {}
                }
            }
            self.take(message)?;
        }
        self.report(ok, failed, error, false);
        Ok(true)
    }
}

async fn send(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|err| format!("send: {err}"))
}

async fn close(ws: &mut Ws) -> Result<(), String> {
    ws.close(None)
        .await
        .map_err(|err| format!("close: {err}"))?;
    let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("the gateway did not close in time".into()),
            Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}
