//! The client process (this bench binary started again with WSIDLE_ROLE=client): it holds its
//! share of the idle connections, one task each, and moves them through the stages the parent
//! asks for.
//!
//! Environment from the parent: WSIDLE_PORT, WSIDLE_COUNT, WSIDLE_FIRST (index of its first
//! connection, for the source addresses and own subjects), WSIDLE_SOURCES, WSIDLE_BIG_BYTES,
//! WSIDLE_HANDSHAKES, WSIDLE_SERVER (`gateway`, or `native`: nats-server's own WebSocket
//! listener) and WSIDLE_MODE (`idle`, `shared`: one subscription each on one subject, `own`:
//! one each on its own subject). On a native connection it answers the server's PINGs.
//! It prints one status line per stage on stdout: `<stage> ok=N failed=N lost=N secs=S
//! error=<first error or ->`, stages `opened`, `big` and `closed`; it reads the commands `big`
//! and `close` from stdin, one a line.

use std::io::{BufRead, Write as _};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use futures_util::SinkExt;

use crate::BIG_IN_FLIGHT;
use crate::ws::{Mode, Server, big_request, close, open, source_address};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Big,
    Close,
}

enum Event {
    Opened(Result<(), String>),
    Big(Result<(), String>),
    Closed(Result<(), String>),
    /// The connection ended while idle.
    Lost(String),
}

struct Conn {
    port: u16,
    index: usize,
    source: Ipv4Addr,
    server: Server,
    mode: Mode,
    big_bytes: usize,
    handshakes: Arc<Semaphore>,
    big_slots: Arc<Semaphore>,
    phase: watch::Receiver<Phase>,
    events: mpsc::UnboundedSender<Event>,
}

/// One connection's life: open, then idle (reading, so pings get their pongs) until told to
/// send its big message, then to close.
async fn connection(mut c: Conn) {
    let permit = c.handshakes.acquire().await;
    let opened = open(c.port, c.source, c.server, c.mode, c.index).await;
    drop(permit);
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(err) => {
            let _ = c.events.send(Event::Opened(Err(err)));
            return;
        }
    };
    let _ = c.events.send(Event::Opened(Ok(())));
    loop {
        tokio::select! {
            changed = c.phase.changed() => {
                if changed.is_err() {
                    return;
                }
                let phase = *c.phase.borrow_and_update();
                match phase {
                    Phase::Idle => {}
                    Phase::Big => {
                        let slot = c.big_slots.acquire().await;
                        let result = big_request(&mut ws, c.big_bytes).await;
                        drop(slot);
                        let failed = result.is_err();
                        let _ = c.events.send(Event::Big(result));
                        if failed {
                            return;
                        }
                    }
                    Phase::Close => {
                        let _ = c.events.send(Event::Closed(close(ws).await));
                        return;
                    }
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Close(frame))) => {
                    let _ = c.events.send(Event::Lost(format!("closed by the gateway: {frame:?}")));
                    return;
                }
                Some(Ok(Message::Binary(data))) if c.server == Server::Native => {
                    if memchr::memmem::find(&data, b"PING\r\n").is_some()
                        && let Err(err) = ws.send(Message::binary(&b"PONG\r\n"[..])).await
                    {
                        let _ = c.events.send(Event::Lost(format!("send PONG: {err}")));
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    let _ = c.events.send(Event::Lost(format!("read: {err}")));
                    return;
                }
                None => {
                    let _ = c.events.send(Event::Lost("the connection ended".into()));
                    return;
                }
            },
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    lost: usize,
    first_error: Option<String>,
}

impl Tally {
    fn line(&self, stage: &str, started: Instant) -> String {
        format!(
            "{stage} ok={} failed={} lost={} secs={:.2} error={}",
            self.ok,
            self.failed,
            self.lost,
            started.elapsed().as_secs_f64(),
            self.first_error
                .as_deref()
                .unwrap_or("-")
                .replace('\n', " ")
        )
    }

    fn fail(&mut self, err: String) {
        self.failed += 1;
        self.first_error.get_or_insert(err);
    }
}

fn env_usize(name: &str) -> Result<usize, String> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set"))?
        .parse()
        .map_err(|_| format!("{name} is not a number"))
}

/// What the parent told this process.
struct ClientEnv {
    port: u16,
    count: usize,
    first: usize,
    sources: usize,
    big_bytes: usize,
    handshakes: usize,
    server: Server,
    mode: Mode,
}

pub fn client_main() -> Result<(), String> {
    let env = ClientEnv {
        port: env_usize("WSIDLE_PORT")? as u16,
        count: env_usize("WSIDLE_COUNT")?,
        first: env_usize("WSIDLE_FIRST")?,
        sources: env_usize("WSIDLE_SOURCES")?,
        big_bytes: env_usize("WSIDLE_BIG_BYTES")?,
        handshakes: env_usize("WSIDLE_HANDSHAKES")?,
        server: std::env::var("WSIDLE_SERVER")
            .ok()
            .as_deref()
            .map_or(Some(Server::Gateway), Server::parse)
            .ok_or("WSIDLE_SERVER must be gateway or native")?,
        mode: std::env::var("WSIDLE_MODE")
            .ok()
            .as_deref()
            .map_or(Some(Mode::Idle), Mode::parse)
            .ok_or("WSIDLE_MODE must be idle, shared or own")?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("runtime: {err}"))?;
    runtime.block_on(serve(env));
    Ok(())
}

/// Opens every connection, reports, then runs the stages the parent asks for.
async fn serve(env: ClientEnv) {
    let (phase, phase_rx) = watch::channel(Phase::Idle);
    let (events, mut event_rx) = mpsc::unbounded_channel();
    let handshakes = Arc::new(Semaphore::new(env.handshakes));
    let big_slots = Arc::new(Semaphore::new(BIG_IN_FLIGHT));
    let started = Instant::now();
    for index in env.first..env.first + env.count {
        tokio::spawn(connection(Conn {
            port: env.port,
            index,
            source: source_address(index, env.sources),
            server: env.server,
            mode: env.mode,
            big_bytes: env.big_bytes,
            handshakes: handshakes.clone(),
            big_slots: big_slots.clone(),
            phase: phase_rx.clone(),
            events: events.clone(),
        }));
    }
    drop(events);
    let mut commands = read_commands();

    // Stage 1: open. Every connection reports once.
    let opened = count_opened(&mut event_rx, env.count).await;
    say(opened.line("opened", started));
    // Connections still running: each reports exactly one Big/Closed or Lost per stage.
    let mut running = opened.ok - opened.lost;
    let mut lost_idle = 0;
    while let Some(command) = commands.recv().await {
        let (next, stage) = match command.as_str() {
            "big" => (Phase::Big, "big"),
            "close" => (Phase::Close, "closed"),
            _ => continue,
        };
        // Connections lost while idle, since the last stage.
        while let Ok(event) = event_rx.try_recv() {
            if let Event::Lost(_) = event {
                lost_idle += 1;
                running -= 1;
            }
        }
        let started = Instant::now();
        let _ = phase.send(next);
        let tally = run_stage(&mut event_rx, &mut running, lost_idle).await;
        say(tally.line(stage, started));
        if next == Phase::Close {
            break;
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

async fn count_opened(events: &mut mpsc::UnboundedReceiver<Event>, count: usize) -> Tally {
    let mut tally = Tally::default();
    while tally.ok + tally.failed < count {
        match events.recv().await {
            Some(Event::Opened(Ok(()))) => tally.ok += 1,
            Some(Event::Opened(Err(err))) => tally.fail(err),
            Some(Event::Lost(err)) => {
                tally.lost += 1;
                tally.first_error.get_or_insert(err);
            }
            Some(_) => {}
            None => break,
        }
    }
    tally
}

/// Waits for one answer from every running connection; those that fail stop running.
async fn run_stage(
    events: &mut mpsc::UnboundedReceiver<Event>,
    running: &mut usize,
    lost_idle: usize,
) -> Tally {
    let mut tally = Tally {
        lost: lost_idle,
        ..Tally::default()
    };
    let expected = *running;
    let mut done = 0;
    while done < expected {
        match events.recv().await {
            Some(Event::Big(Ok(()))) | Some(Event::Closed(Ok(()))) => tally.ok += 1,
            Some(Event::Big(Err(err))) | Some(Event::Closed(Err(err))) | Some(Event::Lost(err)) => {
                tally.fail(err);
                *running -= 1;
            }
            Some(Event::Opened(_)) => continue,
            None => break,
        }
        done += 1;
    }
    tally
}
