//! The command line: `serve` runs the daemon; `request`, `publish` and `subscribe` talk to a
//! running gateway over its socket; `demo-echo` runs the quick start's echo service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures_util::Stream;
use ipc_gateway::client::{Client, ClientError, SubscriptionEvent};
use ipc_gateway::config::{Config, LogFormat};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};

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
    Serve(Box<ServeArgs>),
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
        #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        #[arg(long, default_value = "demo.echo")]
        subject: String,
    },
}

#[derive(Args)]
struct SocketArg {
    /// The gateway's Unix socket.
    #[arg(
        long,
        env = "IPC_GATEWAY_SOCKET",
        default_value = "/tmp/ipc-gateway.sock"
    )]
    socket: PathBuf,
}

/// Flags of `serve`; only those given are merged over the file and the environment. Each has
/// a TOML key of the same name and an environment variable IPC_GATEWAY_<KEY>.
#[derive(Args, Serialize)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Unix socket path [default: /tmp/ipc-gateway.sock].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<PathBuf>,
    /// Socket file permissions, octal [default: 0660].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_mode: Option<String>,
    /// NATS URL; env NATS_URL [default: nats://127.0.0.1:4222].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_url: Option<String>,
    /// NATS connections in the pool [default: 2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    nats_connections: Option<usize>,
    /// HTTP address for /health, /ready, /status, /metrics and /ws [default: 127.0.0.1:8080].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    /// Subject for JSON objects that name neither op nor subject.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    default_subject: Option<String>,
    /// Largest frame or JSON line, in bytes [default: 1048576].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_frame_bytes: Option<usize>,
    /// Default request deadline and ceiling on timeout_ms [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    request_timeout_ms: Option<u64>,
    /// Client connections at once [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<usize>,
    /// Unanswered commands per connection before the gateway stops reading it [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_inflight_per_connection: Option<usize>,
    /// Payload bytes in flight before OVERLOADED [default: 268435456].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_inflight_bytes: Option<usize>,
    /// Subscription messages queued per connection before the oldest drop [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription_queue: Option<usize>,
    /// Time in-flight requests get on SIGTERM [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_ms: Option<u64>,
    /// Tokio worker threads; 1 = single-threaded [default: number of cores].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_threads: Option<usize>,
    /// Log format: text or json [default: text]. Filter with RUST_LOG.
    #[arg(long, value_parser = ["text", "json"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<String>,
    /// Disconnect a client whose answers cannot be written for this long [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_client_stall_ms: Option<u64>,
    /// Per-connection requests (and publishes, subscribes) a second; 0 = off [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit_requests_per_sec: Option<u64>,
    /// Per-connection payload bytes a second; 0 = off [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit_bytes_per_sec: Option<u64>,
    /// Close connections idle this long with no subscriptions; 0 = off [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout_ms: Option<u64>,
    /// Largest WebSocket message; 0 = --max-frame-bytes [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_max_message_bytes: Option<usize>,
    /// Browser origins allowed on /ws besides the gateway's own (repeat, or "*" for any).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_allowed_origins: Option<Vec<String>>,
    /// WebSocket ping interval; two missed pongs close the connection; 0 = off [default: 20000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_ping_interval_ms: Option<u64>,
    /// WebSocket read buffer per connection: idle memory vs reads per big message [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_read_buffer_bytes: Option<usize>,
    /// gRPC address [default: 127.0.0.1:50051].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc: Option<String>,
    /// HTTP/2 keepalive ping interval on gRPC connections; 0 = off [default: 20000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_keepalive_ms: Option<u64>,
    /// Concurrent gRPC calls per HTTP/2 connection [default: 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_max_concurrent_streams: Option<u32>,
    /// Subject tokens that name a circuit breaker group [default: 2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_group_tokens: Option<usize>,
    /// Consecutive failures that open a group's breaker [default: 5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_failures: Option<u32>,
    /// How long an open breaker refuses before one trial request [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_cooldown_ms: Option<u64>,
    /// Failure rate (0 to 1) over the window that opens a breaker; 0 = off [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_failure_rate: Option<f64>,
    /// Failure-rate window in ms [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_window_ms: Option<u64>,
    /// Requests a window needs before its failure rate counts [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_min_requests: Option<u32>,
    /// After NATS (re)connects, ms during which NO_RESPONDERS does not count; 0 = off [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_reconnect_grace_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
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
    let config = match Config::load(args.config.as_deref(), &args) {
        Ok(config) => config,
        Err(err) => return fail(2, &err.to_string()),
    };
    ipc_gateway::telemetry::logging::init(config.log_format);
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
        ipc_gateway::server::run(config, stop).await
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
                    SubscriptionEvent::Dropped(n) => eprintln!("ipc-gateway: {n} messages dropped"),
                }
            }
            fail(1, "the gateway closed the connection")
        }
        Command::DemoEcho { nats_url, subject } => {
            ipc_gateway::telemetry::logging::init(LogFormat::Text);
            match ipc_gateway::demo::echo(&nats_url, &subject).await {
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
