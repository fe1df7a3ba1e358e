//! The client process (this bench binary started again with FANOUT_ROLE=client): it holds its
//! share of the K subscribers, one task each on one current-thread runtime, all subscribed to
//! `fan.x`, and counts what they receive.
//!
//! Environment from the parent: FANOUT_CLIENT_PATH (`gateway` or `native`), FANOUT_CLIENT_PORT
//! (the gateway's HTTP port, or nats-server's WebSocket port), FANOUT_CLIENT_COUNT,
//! FANOUT_CLIENT_FIRST (index of its first connection, for the source addresses),
//! FANOUT_SOURCES, FANOUT_HANDSHAKES.
//!
//! - gateway: `GET /ws`, `{"op":"subscribe","id":"s","subject":"fan.x"}`, waits for
//!   `{"id":"s","ok":true}`; then counts `{"op":"msg",...}` and adds up the `count` of
//!   `{"op":"dropped",...}` notices;
//! - native: nats-server's WebSocket listener, `CONNECT {"verbose":false,"pedantic":false}`,
//!   `SUB fan.x 1`, `PING` → `PONG`; then counts `MSG`s (and answers the server's `PING`s).
//!
//! Each message's payload starts `t=<ns since the epoch>;`, the publisher's send time; a
//! delivery's latency is now − t (same host, same clock).
//!
//! It prints `ready ok=N failed=N secs=S error=<first error or ->` once every connection has
//! subscribed (or failed), then answers the parent's commands, one a line on stdin:
//! `reset` (zero the counters; answer `reset alive=N`), `count` (`count delivered=N dropped=N
//! alive=N`), `report <expected per connection>` (the counters, per-connection completeness and
//! the latency histogram) and `close` (answer `closed` and exit).

use std::cell::RefCell;
use std::io::{BufRead, Write as _};
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{
    NatsEvent, NatsReader, Ws, connect, gateway_subscribe, nats_open, source_address,
};
use crate::hist::Hist;
use crate::settings::Path;
use crate::{STEP_PATIENCE, SUBJECT};

struct ClientEnv {
    path: Path,
    port: u16,
    count: usize,
    first: usize,
    sources: usize,
    handshakes: usize,
}

fn env_usize(name: &str) -> Result<usize, String> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set"))?
        .parse()
        .map_err(|_| format!("{name} is not a number"))
}

#[derive(Default, Clone, Copy)]
struct ConnStats {
    opened: bool,
    alive: bool,
    delivered: u64,
    dropped: u64,
}

/// What this process's connections received since the last `reset`.
#[derive(Default)]
struct Stats {
    delivered: u64,
    dropped: u64,
    /// Messages whose payload had no send time.
    unparsed: u64,
    /// `dropped` notices with `"gap":true` (an unknown number lost: the gateway's NATS
    /// connection was cut).
    gaps: u64,
    hist: Hist,
    conns: Vec<ConnStats>,
    lost: u64,
    first_error: Option<String>,
}

impl Stats {
    fn reset(&mut self) {
        self.delivered = 0;
        self.dropped = 0;
        self.unparsed = 0;
        self.gaps = 0;
        self.hist.clear();
        self.lost = 0;
        self.first_error = None;
        for conn in &mut self.conns {
            conn.delivered = 0;
            conn.dropped = 0;
        }
    }

    fn alive(&self) -> usize {
        self.conns.iter().filter(|c| c.alive).count()
    }

    fn deliver(&mut self, conn: usize, payload: &[u8]) {
        self.delivered += 1;
        self.conns[conn].delivered += 1;
        match send_time(payload) {
            Some(sent) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                self.hist.record(now.saturating_sub(sent) / 1000);
            }
            None => self.unparsed += 1,
        }
    }

    fn note(&mut self, error: String) {
        self.first_error.get_or_insert(error);
    }

    fn lose(&mut self, conn: usize, reason: String) {
        if self.conns[conn].alive {
            self.conns[conn].alive = false;
            self.lost += 1;
        }
        self.note(reason);
    }

    fn report_line(&self, expected: u64) -> String {
        let opened = || self.conns.iter().filter(|c| c.opened);
        let complete = opened()
            .filter(|c| c.delivered + c.dropped == expected)
            .count();
        let short = opened()
            .filter(|c| c.delivered + c.dropped < expected)
            .count();
        let over = opened()
            .filter(|c| c.delivered + c.dropped > expected)
            .count();
        let min = opened().map(|c| c.delivered).min().unwrap_or(0);
        let max = opened().map(|c| c.delivered).max().unwrap_or(0);
        format!(
            "report delivered={} dropped={} alive={} lost={} complete={complete} short={short} over={over} min={min} max={max} unparsed={} gaps={} hist={} error={}",
            self.delivered,
            self.dropped,
            self.alive(),
            self.lost,
            self.unparsed,
            self.gaps,
            self.hist.encode(),
            self.first_error
                .as_deref()
                .unwrap_or("-")
                .replace('\n', " ")
        )
    }
}

/// The send time at the start of a payload: `t=<ns>;`.
fn send_time(payload: &[u8]) -> Option<u64> {
    let digits = payload.strip_prefix(b"t=")?;
    let end = memchr::memchr(b';', digits)?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// A whole number right after `key` in `text`.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(text, key)? + key.len();
    let digits = &text[at..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

pub fn client_main() -> Result<(), String> {
    let path = std::env::var("FANOUT_CLIENT_PATH").unwrap_or_default();
    let env = ClientEnv {
        path: Path::parse(&path).ok_or(format!("FANOUT_CLIENT_PATH={path:?}"))?,
        port: env_usize("FANOUT_CLIENT_PORT")? as u16,
        count: env_usize("FANOUT_CLIENT_COUNT")?,
        first: env_usize("FANOUT_CLIENT_FIRST")?,
        sources: env_usize("FANOUT_SOURCES")?,
        handshakes: env_usize("FANOUT_HANDSHAKES")?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(env));
    Ok(())
}

async fn serve(env: ClientEnv) {
    let stats = Rc::new(RefCell::new(Stats {
        conns: vec![ConnStats::default(); env.count],
        ..Stats::default()
    }));
    let handshakes = Rc::new(Semaphore::new(env.handshakes));
    let (opened_tx, mut opened) = mpsc::unbounded_channel();
    let started = Instant::now();
    for conn in 0..env.count {
        tokio::task::spawn_local(connection(
            conn,
            source_address(env.first + conn, env.sources),
            env.path,
            env.port,
            stats.clone(),
            handshakes.clone(),
            opened_tx.clone(),
        ));
    }
    drop(opened_tx);
    let mut commands = read_commands();

    let (mut ok, mut failed, mut first_error) = (0, 0, None);
    while ok + failed < env.count {
        match opened.recv().await {
            Some(Ok(())) => ok += 1,
            Some(Err(err)) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
            None => break,
        }
    }
    say(format!(
        "ready ok={ok} failed={failed} secs={:.2} error={}",
        started.elapsed().as_secs_f64(),
        first_error.as_deref().unwrap_or("-").replace('\n', " ")
    ));

    while let Some(command) = commands.recv().await {
        let mut words = command.split_whitespace();
        match words.next() {
            Some("reset") => {
                let mut stats = stats.borrow_mut();
                stats.reset();
                say(format!("reset alive={}", stats.alive()));
            }
            Some("count") => {
                let stats = stats.borrow();
                say(format!(
                    "count delivered={} dropped={} alive={}",
                    stats.delivered,
                    stats.dropped,
                    stats.alive()
                ));
            }
            Some("report") => {
                let expected = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                say(stats.borrow().report_line(expected));
            }
            Some("close") => {
                say("closed".into());
                return;
            }
            _ => {}
        }
    }
}

/// One subscriber: connect, subscribe, then count what arrives until the connection ends.
async fn connection(
    conn: usize,
    source: std::net::Ipv4Addr,
    path: Path,
    port: u16,
    stats: Rc<RefCell<Stats>>,
    handshakes: Rc<Semaphore>,
    opened: mpsc::UnboundedSender<Result<(), String>>,
) {
    let permit = handshakes.acquire().await;
    let result = open(path, port, source).await;
    drop(permit);
    let (mut ws, reader) = match result {
        Ok(opened) => opened,
        Err(err) => {
            let _ = opened.send(Err(err));
            return;
        }
    };
    {
        let mut stats = stats.borrow_mut();
        stats.conns[conn].opened = true;
        stats.conns[conn].alive = true;
    }
    let _ = opened.send(Ok(()));
    let reason = match reader {
        None => read_gateway(&mut ws, conn, &stats).await,
        Some(reader) => read_native(&mut ws, reader, conn, &stats).await,
    };
    stats.borrow_mut().lose(conn, reason);
}

/// Connects and subscribes to `fan.x`; for the native path also returns the NATS reader.
async fn open(
    path: Path,
    port: u16,
    source: std::net::Ipv4Addr,
) -> Result<(Ws, Option<NatsReader>), String> {
    match path {
        Path::Gateway => {
            // `/ws?batch=true` unless the parent said otherwise (FANOUT_WS_BATCH).
            let ws_path = std::env::var("FANOUT_CLIENT_WS_PATH").unwrap_or("/ws".into());
            let mut ws = connect(port, source, &ws_path, STEP_PATIENCE).await?;
            gateway_subscribe(&mut ws, "s", SUBJECT, STEP_PATIENCE).await?;
            Ok((ws, None))
        }
        Path::Native => {
            let mut ws = connect(port, source, "/", STEP_PATIENCE).await?;
            let reader = nats_open(&mut ws, &[SUBJECT], STEP_PATIENCE).await?;
            Ok((ws, Some(reader)))
        }
    }
}

fn close_reason(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(frame) => format!(
            "closed by the server: {} {}",
            u16::from(frame.code),
            frame.reason
        ),
        None => "closed by the server".into(),
    }
}

/// The gateway's JSON envelopes, one per message or (batched) one per line: `msg` is a
/// delivery, `dropped` carries a count, an `unsubscribed` notice ends the subscription.
async fn read_gateway(ws: &mut Ws, conn: usize, stats: &Rc<RefCell<Stats>>) -> String {
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => return close_reason(frame),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return format!("read: {err}"),
            None => return "the connection ended".into(),
        };
        let mut stats = stats.borrow_mut();
        for line in text.as_bytes().split(|b| *b == b'\n') {
            if line.starts_with(br#"{"op":"msg""#) {
                match memchr::memmem::find(line, br#""data":""#) {
                    Some(at) => stats.deliver(conn, &line[at + 8..]),
                    None => stats.deliver(conn, b""),
                }
            } else if line.starts_with(br#"{"op":"dropped""#) {
                let count = number_after(line, br#""count":"#).unwrap_or(0);
                stats.dropped += count;
                stats.conns[conn].dropped += count;
                if memchr::memmem::find(line, br#""gap":true"#).is_some() {
                    stats.gaps += 1;
                }
            } else if line.starts_with(br#"{"op":"unsubscribed""#) {
                return format!(
                    "the gateway ended the subscription: {}",
                    String::from_utf8_lossy(line)
                );
            }
        }
    }
}

/// NATS protocol: MSG is a delivery, PING gets a PONG, -ERR is noted.
async fn read_native(
    ws: &mut Ws,
    mut reader: NatsReader,
    conn: usize,
    stats: &Rc<RefCell<Stats>>,
) -> String {
    loop {
        let mut ping = false;
        while let Some(event) = reader.next_event() {
            match event {
                NatsEvent::Msg(payload) => stats.borrow_mut().deliver(conn, payload),
                NatsEvent::Ping => ping = true,
                NatsEvent::Err(err) => stats.borrow_mut().note(format!("-ERR {err}")),
                _ => {}
            }
        }
        if ping && let Err(err) = ws.send(Message::binary(&b"PONG\r\n"[..])).await {
            return format!("send PONG: {err}");
        }
        match ws.next().await {
            Some(Ok(Message::Binary(bytes))) => reader.feed(&bytes),
            Some(Ok(Message::Text(text))) => reader.feed(text.as_bytes()),
            Some(Ok(Message::Close(frame))) => return close_reason(frame),
            Some(Ok(_)) => {}
            Some(Err(err)) => return format!("read: {err}"),
            None => return "the connection ended".into(),
        }
    }
}

/// Commands from the parent, one a line.
fn read_commands() -> mpsc::UnboundedReceiver<String> {
    let (command_tx, commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if command_tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    commands
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
