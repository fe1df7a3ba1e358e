//! The command line: `serve` runs the daemon; `check-config` shows the settings it would
//! run with; `request`, `publish` and `subscribe` talk to a running gateway over its socket;
//! `demo-echo` runs the quick start's echo service; `completions` and `man` print shell
//! completions and the man page from this same command definition.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use futures_util::Stream;
use ipc_gateway::client::{Client, ClientError, ReplayFrom, SubscriptionEvent};
use ipc_gateway::config::{Config, Flags, LogFormat, Sources};
use tokio::signal::unix::{SignalKind, signal};

mod allocator;

/// Exit statuses, the same for every subcommand (also in `--help` and the README).
mod exit {
    /// The gateway answered with an error (its code on stderr), or the daemon stopped on a
    /// failure.
    pub const FAILED: u8 = 1;
    /// A usage error on the command line (clap's) or in the configuration.
    pub const USAGE: u8 = 2;
    /// The gateway's socket cannot be reached, or the gateway closed the connection.
    pub const UNREACHABLE: u8 = 3;
    /// Anything else on this side: standard input unreadable, no runtime.
    pub const LOCAL: u8 = 4;
}

const EXIT_STATUS_HELP: &str = "Exit status: 0 success; 1 the gateway answered with an error \
(its code on stderr) or the daemon stopped on a failure; 2 usage or configuration error; \
3 the gateway's socket cannot be reached or the gateway closed the connection; 4 other local \
failure (standard input unreadable).";

#[derive(Parser)]
#[command(
    name = "ipc-gateway",
    version,
    about = "Unix socket, WebSocket and gRPC clients onto NATS",
    after_help = EXIT_STATUS_HELP
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
    /// Check a configuration (file, environment, flags) and print the effective settings,
    /// each with where it came from: default, file, env VAR or flag. Exit 0, or 2 with the
    /// error.
    CheckConfig {
        /// TOML configuration file (the same as --config).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Send a request through a running gateway and print the reply's data.
    #[command(after_help = EXIT_STATUS_HELP)]
    Request {
        /// The subject to send the request to (`demo.echo`).
        subject: String,
        /// The request's data; `-` reads it from standard input (to its end).
        data: String,
        /// Deadline in milliseconds (capped by the gateway's ceiling).
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Publish a message through a running gateway.
    #[command(after_help = EXIT_STATUS_HELP)]
    Publish {
        /// The subject to publish to.
        subject: String,
        /// The message's data; `-` reads it from standard input (to its end).
        data: String,
        /// Store it in the JetStream stream that captures the subject and print
        /// "STREAM SEQ" once the stream has it.
        #[arg(long)]
        durable: bool,
        /// With --durable: the deduplication id (`Nats-Msg-Id`). Run again with the same id
        /// within the stream's duplicate window, the message is stored once. Default: a new
        /// random id.
        #[arg(long, requires = "durable")]
        msg_id: Option<String>,
        /// With --durable: how long to wait for the stream, in milliseconds.
        #[arg(long, requires = "durable")]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Subscribe through a running gateway and print "SUBJECT DATA" per message
    /// ("SEQ SUBJECT DATA" when replaying a stream).
    #[command(after_help = EXIT_STATUS_HELP)]
    Subscribe {
        /// The subject, wildcards allowed (`orders.>`, `demo.*`).
        subject: String,
        /// Queue group: messages are shared among its members.
        #[arg(long)]
        queue: Option<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// First replay what the subject's JetStream stream holds after this sequence (0: all
        /// of it), then go on live.
        #[arg(long, conflicts_with_all = ["since_time", "queue"])]
        since_seq: Option<u64>,
        /// First replay what the subject's JetStream stream holds from this RFC 3339 time
        /// (`2026-12-06T05:00:00Z`), then go on live.
        #[arg(long, conflicts_with = "queue")]
        since_time: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Run the demo NATS echo service (answers each request with its own payload).
    DemoEcho {
        /// The NATS server to connect to.
        #[arg(long, env = "NATS_URL", default_value_t = Config::default().nats_url)]
        nats_url: String,
        /// The subject it answers requests on.
        #[arg(long, default_value = "demo.echo")]
        subject: String,
        /// Also make a JetStream stream for durable publishes and replays, as NAME:SUBJECT
        /// (`ORDERS:orders.>`), unless one by that name exists.
        #[arg(long)]
        stream: Option<String>,
        /// The gateway's configuration file, for its NATS credential and TLS settings
        /// (`nats_creds`, `nats_token`, `nats_tls_ca`, ...); the `IPC_GATEWAY_NATS_*` environment
        /// variables are read either way.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print shell completions: `ipc-gateway completions bash > /etc/bash_completion.d/ipc-gateway`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `ipc-gateway man | man -l -`.
    Man,
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
        Command::CheckConfig { file, serve } => {
            check_config(file.or(serve.config), &serve.settings)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ipc-gateway",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => {
            let mut page = Vec::new();
            if let Err(err) = clap_mangen::Man::new(Cli::command()).render(&mut page) {
                return fail(exit::LOCAL, &format!("man page: {err}"));
            }
            use std::io::Write;
            match std::io::stdout().write_all(&page) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(exit::LOCAL, &format!("man page: {err}")),
            }
        }
        command => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => return fail(exit::LOCAL, &format!("cannot start the runtime: {err}")),
            };
            runtime.block_on(run_client(command))
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("ipc-gateway: {message}");
    ExitCode::from(code)
}

/// Loads the configuration as `serve` would and prints every effective setting as a TOML
/// line with its source in a comment.
fn check_config(file: Option<PathBuf>, flags: &Flags) -> ExitCode {
    let config = match Config::load(file.as_deref(), flags) {
        Ok(config) => config,
        Err(err) => return fail(exit::USAGE, &err.to_string()),
    };
    // The certificates and keys too: serve would not start without them.
    if let Err(err) = ipc_gateway::tls::TlsPorts::load(&config) {
        return fail(exit::USAGE, &format!("configuration: {err}"));
    }
    let sources = Sources::read(file.as_deref(), flags);
    let values = match serde_json::to_value(&config) {
        Ok(serde_json::Value::Object(values)) => values,
        _ => return fail(exit::LOCAL, "the settings cannot be shown"),
    };
    println!("# The configuration is valid. Effective settings, each with where it came from:");
    for key in ipc_gateway::config::KEYS {
        let value = values.get(*key).cloned().unwrap_or_default();
        let source = sources.of(key);
        let line = match value {
            serde_json::Value::Null => format!("# {key} is not set"),
            value => format!("{key} = {value}"),
        };
        println!("{line:<60} # {source}");
    }
    ExitCode::SUCCESS
}

fn serve(args: ServeArgs) -> ExitCode {
    // SAFETY: first thing, while the process has one thread (nothing has started any yet).
    let systemd = match unsafe { ipc_gateway::ops::systemd::Systemd::from_env() } {
        Ok(systemd) => systemd,
        Err(err) => return fail(2, &err),
    };
    let config = match Config::load(args.config.as_deref(), &args.settings) {
        Ok(config) => config,
        Err(err) => return fail(exit::USAGE, &err.to_string()),
    };
    // A certificate or key that does not load is a configuration error, found before start.
    let tls = match ipc_gateway::tls::TlsPorts::load(&config) {
        Ok(tls) => tls,
        Err(err) => return fail(exit::USAGE, &format!("configuration: {err}")),
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
        Err(err) => return fail(exit::LOCAL, &format!("cannot start the runtime: {err}")),
    };
    let served = runtime.block_on(async {
        // Installed before start-up, so a signal during it is not lost.
        let stop = stop_signals()?;
        let reloads = reload_signals()?;
        // SIGHUP reads the configuration again, the same way.
        let load: ipc_gateway::ops::reload::LoadConfig = Box::new(move || {
            Config::load(args.config.as_deref(), &args.settings).map_err(|e| e.to_string())
        });
        ipc_gateway::server::run_with(config, tls, systemd, Some(load), stop, reloads).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(exit::FAILED, &err),
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
            let data = match read_data(data) {
                Ok(data) => data,
                Err(code) => return code,
            };
            let timeout = timeout_ms.map(Duration::from_millis);
            match client.request(&subject, &data, timeout).await {
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
            durable,
            msg_id,
            timeout_ms,
            socket,
        } => {
            let client = match connect(&socket.socket).await {
                Ok(client) => client,
                Err(code) => return code,
            };
            let data = match read_data(data) {
                Ok(data) => data,
                Err(code) => return code,
            };
            if !durable {
                return match client.publish(&subject, &data).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => report(err),
                };
            }
            let msg_id = msg_id.unwrap_or_else(ipc_gateway::client::unique_msg_id);
            let timeout = timeout_ms.map(Duration::from_millis);
            match client
                .publish_durable(&subject, &data, &msg_id, timeout)
                .await
            {
                Ok(stored) => {
                    println!("{} {}", stored.stream, stored.seq.unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(err) => report(err),
            }
        }
        Command::Subscribe {
            subject,
            queue,
            count,
            since_seq,
            since_time,
            socket,
        } => {
            let client = match connect(&socket.socket).await {
                Ok(client) => client,
                Err(code) => return code,
            };
            let replay = match (since_seq, since_time) {
                (Some(after), _) => Some(ReplayFrom::Seq(after)),
                (None, Some(time)) => Some(ReplayFrom::Time(time)),
                (None, None) => None,
            };
            let subscribed = match &replay {
                None => client.subscribe(&subject, queue.as_deref()).await,
                Some(from) => client
                    .subscribe_since(&subject, from)
                    .await
                    .map(|(subscription, answer)| {
                        if let Some(first) = answer.first_seq {
                            eprintln!(
                                "ipc-gateway: stream {} no longer holds all that was asked for; replaying from seq {first}",
                                answer.stream
                            );
                        }
                        subscription
                    }),
            };
            let mut subscription = match subscribed {
                Ok(subscription) => subscription,
                Err(err) => return report(err),
            };
            let mut received = 0u64;
            while let Some(event) = subscription.events.recv().await {
                match event {
                    SubscriptionEvent::Message {
                        subject, data, seq, ..
                    } => {
                        let data = String::from_utf8_lossy(&data);
                        match seq {
                            Some(seq) => println!("{seq} {subject} {data}"),
                            None => println!("{subject} {data}"),
                        }
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
            fail(exit::UNREACHABLE, "the gateway closed the connection")
        }
        Command::DemoEcho {
            nats_url,
            subject,
            stream,
            config,
        } => {
            // The gateway's own NATS credentials and TLS, checked the same way.
            let settings = match Config::load(config.as_deref(), &Flags::default()) {
                Ok(settings) => settings,
                Err(err) => return fail(exit::USAGE, &err.to_string()),
            };
            let options = ipc_gateway::core::credentials::Credentials::new(&settings).options();
            ipc_gateway::telemetry::logging::init(LogFormat::Text);
            let stream = match stream.as_deref().map(|spec| spec.split_once(':')) {
                None => None,
                Some(Some((name, subject))) => Some((name, subject)),
                Some(None) => {
                    return fail(exit::USAGE, "--stream takes NAME:SUBJECT (ORDERS:orders.>)");
                }
            };
            match ipc_gateway::demo::echo(options, &nats_url, &subject, stream).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(exit::FAILED, &format!("demo echo: {err}")),
            }
        }
        Command::Serve(_)
        | Command::CheckConfig { .. }
        | Command::Completions { .. }
        | Command::Man => unreachable!("run without the client runtime"),
    }
}

/// The data argument, or standard input to its end when it is `-`.
fn read_data(data: String) -> Result<Vec<u8>, ExitCode> {
    if data != "-" {
        return Ok(data.into_bytes());
    }
    let mut bytes = Vec::new();
    use std::io::Read;
    match std::io::stdin().read_to_end(&mut bytes) {
        Ok(_) => Ok(bytes),
        Err(err) => Err(fail(exit::LOCAL, &format!("reading standard input: {err}"))),
    }
}

async fn connect(socket: &std::path::Path) -> Result<Client, ExitCode> {
    Client::connect(socket).await.map_err(|err| {
        fail(
            exit::UNREACHABLE,
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
            ExitCode::from(exit::FAILED)
        }
        other => fail(exit::UNREACHABLE, &other.to_string()),
    }
}
