//! The command line: `serve` runs the daemon; `request`, `publish` and `subscribe` talk to a
//! running gateway over its socket; `demo-echo` runs the quick start's echo service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures_util::Stream;
use ipc_gateway::client::{Client, ClientError, SubscriptionEvent};
use ipc_gateway::config::{Config, Flags, LogFormat};
use tokio::signal::unix::{SignalKind, signal};

mod allocator;

#[derive(Parser)]
#[command(
    name = "ipc-gateway",
    version,
    about = "Unix socket, WebSocket and gRPC clients onto NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (settings: defaults < --config file < environment < flags).
    ///
    /// Each flag below is also a TOML key (`--max-frame-bytes` is `max_frame_bytes`) and an
    /// environment variable (`IPC_GATEWAY_MAX_FRAME_BYTES`); `NATS_URL` sets `nats_url` too.
    Serve(ServeArgs),
    /// Send a request through a running gateway and print the reply's data.
    Request {
        subject: String,
        data: String,
        /// Deadline in milliseconds (capped by the gateway's ceiling).
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Publish a message through a running gateway.
    Publish {
        subject: String,
        data: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Subscribe through a running gateway and print "SUBJECT DATA" per message.
    Subscribe {
        subject: String,
        /// Queue group: messages are shared among its members.
        #[arg(long)]
        queue: Option<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Run the demo NATS echo service (answers each request with its own payload).
    DemoEcho {
        #[arg(long, env = "NATS_URL", default_value_t = Config::default().nats_url)]
        nats_url: String,
        #[arg(long, default_value = "demo.echo")]
        subject: String,
        /// Also make a JetStream stream for durable publishes and replays, as NAME:SUBJECT
        /// (`ORDERS:orders.>`), unless one by that name exists.
        #[arg(long)]
        stream: Option<String>,
    },
}

#[derive(Args)]
struct SocketArg {
    /// The gateway's Unix socket.
    #[arg(long, env = "IPC_GATEWAY_SOCKET", default_value_os_t = Config::default().socket)]
    socket: PathBuf,
}

/// Flags of `serve`: `--config`, and one flag per setting (`config::SETTINGS`), with its help
/// and default taken from the setting's definition. Only the flags given are merged over the
/// file and the environment.
#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Flags,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        command => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => return fail(2, &format!("cannot start the runtime: {err}")),
            };
            runtime.block_on(run_client(command))
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("ipc-gateway: {message}");
    ExitCode::from(code)
}

fn serve(args: ServeArgs) -> ExitCode {
    // SAFETY: first thing, while the process has one thread (nothing has started any yet).
    let systemd = match unsafe { ipc_gateway::ops::systemd::Systemd::from_env() } {
        Ok(systemd) => systemd,
        Err(err) => return fail(2, &err),
    };
    let config = match Config::load(args.config.as_deref(), &args.settings) {
        Ok(config) => config,
        Err(err) => return fail(2, &err.to_string()),
    };
    ipc_gateway::telemetry::logging::init_with(config.log_format, config.log_filter.as_deref());
    tracing::debug!(allocator = allocator::NAME, "memory allocator");
    allocator::start_trimming();
    let mut builder = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.worker_threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(2, &format!("cannot start the runtime: {err}")),
    };
    let served = runtime.block_on(async {
        // Installed before start-up, so a signal during it is not lost.
        let stop = stop_signals()?;
        let reloads = reload_signals()?;
        // SIGHUP reads the configuration again, the same way.
        let load: ipc_gateway::ops::reload::LoadConfig = Box::new(move || {
            Config::load(args.config.as_deref(), &args.settings).map_err(|e| e.to_string())
        });
        ipc_gateway::server::run_with(config, systemd, Some(load), stop, reloads).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(1, &err),
    }
}

/// SIGTERM and SIGINT as the daemon's stop requests, each named for the log: the first starts
/// the drain, another one during the drain cuts it short.
fn stop_signals() -> Result<impl Stream<Item = &'static str> + Unpin, String> {
    let terminate = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let interrupt = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let signals = futures_util::stream::unfold(
        (terminate, interrupt),
        |(mut terminate, mut interrupt)| async move {
            let cause = tokio::select! {
                Some(()) = terminate.recv() => "SIGTERM",
                Some(()) = interrupt.recv() => "SIGINT",
                else => return None,
            };
            Some((cause, (terminate, interrupt)))
        },
    );
    Ok(Box::pin(signals))
}

/// SIGHUP as the daemon's reload requests (the configuration's live settings, the policy
/// file, the audit log's file).
fn reload_signals() -> Result<impl Stream<Item = ()> + Unpin + Send + 'static, String> {
    let hangup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP handler: {e}"))?;
    let signals = futures_util::stream::unfold(hangup, |mut hangup| async move {
        hangup.recv().await?;
        Some(((), hangup))
    });
    Ok(Box::pin(signals))
}

async fn run_client(command: Command) -> ExitCode {
    match command {
        Command::Request {
            subject,
            data,
            timeout_ms,
            socket,
        } => {
            let client = match connect(&socket.socket).await {
                Ok(client) => client,
                Err(code) => return code,
            };
            let timeout = timeout_ms.map(Duration::from_millis);
            match client.request(&subject, data.as_bytes(), timeout).await {
                Ok(reply) => {
                    println!("{}", String::from_utf8_lossy(&reply.data));
                    ExitCode::SUCCESS
                }
                Err(err) => report(err),
            }
        }
        Command::Publish {
            subject,
            data,
            socket,
        } => {
            let client = match connect(&socket.socket).await {
                Ok(client) => client,
                Err(code) => return code,
            };
            match client.publish(&subject, data.as_bytes()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => report(err),
            }
        }
        Command::Subscribe {
            subject,
            queue,
            count,
            socket,
        } => {
            let client = match connect(&socket.socket).await {
                Ok(client) => client,
                Err(code) => return code,
            };
            let mut subscription = match client.subscribe(&subject, queue.as_deref()).await {
                Ok(subscription) => subscription,
                Err(err) => return report(err),
            };
            let mut received = 0u64;
            while let Some(event) = subscription.events.recv().await {
                match event {
                    SubscriptionEvent::Message { subject, data, .. } => {
                        println!("{subject} {}", String::from_utf8_lossy(&data));
                        received += 1;
                        if count.is_some_and(|count| received >= count) {
                            return ExitCode::SUCCESS;
                        }
                    }
                    SubscriptionEvent::Dropped { count, gap: false } => {
                        eprintln!("ipc-gateway: {count} messages dropped")
                    }
                    SubscriptionEvent::Dropped { count, gap: true } => eprintln!(
                        "ipc-gateway: {count} messages dropped, and more lost while the gateway's NATS connection was cut"
                    ),
                }
            }
            fail(1, "the gateway closed the connection")
        }
        Command::DemoEcho {
            nats_url,
            subject,
            stream,
        } => {
            ipc_gateway::telemetry::logging::init(LogFormat::Text);
            let stream = match stream.as_deref().map(|spec| spec.split_once(':')) {
                None => None,
                Some(Some((name, subject))) => Some((name, subject)),
                Some(None) => return fail(2, "--stream takes NAME:SUBJECT (ORDERS:orders.>)"),
            };
            match ipc_gateway::demo::echo(&nats_url, &subject, stream).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(1, &format!("demo echo: {err}")),
            }
        }
        Command::Serve(_) => unreachable!("serve runs its own runtime"),
    }
}

async fn connect(socket: &std::path::Path) -> Result<Client, ExitCode> {
    Client::connect(socket).await.map_err(|err| {
        fail(
            2,
            &format!(
                "cannot connect to {}: {err} (is `ipc-gateway serve` running?)",
                socket.display()
            ),
        )
    })
}

fn report(err: ClientError) -> ExitCode {
    match err {
        ClientError::Gateway(error) => {
            eprintln!("{}: {}", error.code, error.message);
            ExitCode::from(1)
        }
        other => fail(2, &other.to_string()),
    }
}
