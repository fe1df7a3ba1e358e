//! The processes and servers a run measures against: one nats-server, one echo service, one
//! gateway per worker-thread count (child processes, stopped at the end), and the bare echo, a
//! thread in this process that answers v1 frames on a Unix socket without NATS or a gateway.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ipc_gateway::protocol::binary::{FrameHeader, HEADER_LEN, frame_type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::SUBJECT;
use crate::common::{Proc, TempDir, free_port, log_file, start_echo, start_nats, wait_ready};
use crate::settings::Settings;

/// One gateway child process and where it listens.
pub struct GatewayProc {
    pub workers: usize,
    pub socket: PathBuf,
    /// The HTTP port, where `GET /ws` is.
    pub http: u16,
    /// The gRPC port (each gateway needs its own).
    pub grpc: u16,
    /// The `ipc-gateway` arguments it was started with.
    pub args: Vec<String>,
    pub proc: Proc,
}

/// Everything a run talks to, started in `start` and stopped in `stop`.
pub struct Servers {
    pub nats: Proc,
    pub nats_url: String,
    pub echo: Proc,
    pub gateways: Vec<GatewayProc>,
    pub bare: BareEcho,
    pub bare_socket: PathBuf,
}

impl Servers {
    pub fn start(bin: &Path, dir: &TempDir, settings: &Settings) -> Result<Servers, String> {
        let (nats, nats_url) = start_nats(&dir.0)?;
        let echo = start_echo(bin, &nats_url, SUBJECT, &dir.0)?;
        let mut gateways = Vec::new();
        for &workers in &settings.workers {
            gateways.push(start_gateway(
                bin,
                &nats_url,
                &dir.0,
                workers,
                &settings.gateway_args,
            )?);
        }
        let bare_socket = dir.0.join("bare-echo.sock");
        let bare = BareEcho::start(&bare_socket)?;
        Ok(Servers {
            nats,
            nats_url,
            echo,
            gateways,
            bare,
            bare_socket,
        })
    }

    pub fn gateway(&self, workers: usize) -> Result<&GatewayProc, String> {
        self.gateways
            .iter()
            .find(|g| g.workers == workers)
            .ok_or_else(|| format!("no gateway with {workers} worker threads"))
    }

    /// Stops everything; returns each gateway's worker threads and arguments for the report.
    pub fn stop(self) -> Vec<(usize, String)> {
        let Servers {
            mut nats,
            mut echo,
            mut gateways,
            bare,
            ..
        } = self;
        drop(bare);
        for gateway in &mut gateways {
            gateway.proc.stop();
        }
        echo.stop();
        nats.stop();
        gateways
            .iter()
            .map(|g| (g.workers, g.args.join(" ")))
            .collect()
    }
}

fn start_gateway(
    bin: &Path,
    nats_url: &str,
    dir: &Path,
    workers: usize,
    extra_args: &[String],
) -> Result<GatewayProc, String> {
    let socket = dir.join(format!("gateway-w{workers}.sock"));
    let http = free_port()?;
    let grpc = free_port()?;
    let args: Vec<String> = [
        "serve",
        "--nats-url",
        nats_url,
        "--socket",
        &socket.display().to_string(),
        "--http",
        &format!("127.0.0.1:{http}"),
        "--grpc",
        &format!("127.0.0.1:{grpc}"),
        "--worker-threads",
        &workers.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(extra_args.iter().cloned())
    .collect();
    let log = format!("gateway-w{workers}.log");
    let mut proc = Proc::spawn(
        "ipc-gateway serve",
        Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(dir, &log)?),
    )?;
    wait_ready(
        http,
        &mut proc,
        &format!(
            "the gateway (--worker-threads {workers}) did not become ready; see {}",
            dir.join(&log).display()
        ),
    )?;
    Ok(GatewayProc {
        workers,
        socket,
        http,
        grpc,
        args,
        proc,
    })
}

/// The bare Unix-socket echo: a thread with its own runtime that sends every v1 frame back as
/// a REPLY with the same id and payload, as soon as it has whole frames.
pub struct BareEcho {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareEcho {
    fn start(path: &Path) -> Result<BareEcho, String> {
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|err| format!("bind {}: {err}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|err| format!("{err}"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bare-echo".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(accept(listener, stopped));
            })
            .map_err(|err| format!("bare echo thread: {err}"))?;
        Ok(BareEcho {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for BareEcho {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: std::os::unix::net::UnixListener, mut stopped: oneshot::Receiver<()>) {
    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(echo_frames(stream));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Echoes the frames as they come: every whole frame goes back with its type byte set to
/// REPLY, in one write per read; a partial frame waits for the rest.
async fn echo_frames(mut stream: UnixStream) {
    const BATCH_BYTES: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(BATCH_BYTES);
    loop {
        let mut whole = 0;
        while buf.len() - whole >= HEADER_LEN {
            let header = FrameHeader::parse(&buf[whole..]);
            let total = HEADER_LEN + header.body_len as usize;
            if buf.len() - whole < total {
                break;
            }
            // Byte 2 of the fixed header is the frame type (docs/protocol.md).
            buf[whole + 2] = frame_type::REPLY;
            whole += total;
        }
        if whole > 0 {
            if stream.write_all(&buf[..whole]).await.is_err() {
                return;
            }
            buf.advance(whole);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(BATCH_BYTES);
        }
        match stream.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}
