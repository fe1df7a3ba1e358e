//! One connected client per row, cloned into every task of the row: async-nats for the direct
//! rows; `ipc_gateway::client::Client` for the gateway's Unix socket (binary frames or JSON
//! lines), its WebSocket (the same client over tokio-tungstenite messages) and the bare echo;
//! and the tonic client generated from proto/gateway.proto for the gRPC rows (unary calls, or
//! requests pipelined on one `Exchange` stream by `ExchangeClient`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ipc_gateway::client::{Client, WireFormat};
use ipc_gateway::config::IdentityHeaders;
use ipc_gateway::frontend::grpc::pb::{self, exchange_reply, gateway_client::GatewayClient};
use tokio::sync::{mpsc, oneshot};

use crate::settings::{Case, Mode};
use crate::{REQUEST_TIMEOUT, SUBJECT};

type Grpc = GatewayClient<tonic::transport::Channel>;

/// A connected client for one row; cloned into every task.
#[derive(Clone)]
pub enum Target {
    Direct {
        client: async_nats::Client,
        subject: async_nats::Subject,
        payload: Bytes,
        /// Sent with every request (`direct + identity headers`).
        headers: Option<async_nats::HeaderMap>,
    },
    /// The gateway's socket or WebSocket, or the bare echo.
    Client {
        client: Arc<Client>,
        payload: Bytes,
    },
    GrpcUnary {
        client: Grpc,
        payload: Bytes,
    },
    GrpcExchange {
        client: Arc<ExchangeClient>,
        payload: Bytes,
    },
}

impl Target {
    /// One request and its reply, which must carry the payload back.
    pub async fn once(&self) -> Result<(), String> {
        let (got, expected) = match self {
            Target::Direct {
                client,
                subject,
                payload,
                headers,
            } => {
                let reply = match headers {
                    Some(headers) => {
                        client
                            .request_with_headers(subject.clone(), headers.clone(), payload.clone())
                            .await
                    }
                    None => client.request(subject.clone(), payload.clone()).await,
                }
                .map_err(|err| err.to_string())?;
                (reply.payload.len(), payload.len())
            }
            Target::Client { client, payload } => {
                let reply = client
                    .request(SUBJECT, payload, Some(REQUEST_TIMEOUT))
                    .await
                    .map_err(|err| err.to_string())?;
                (reply.data.len(), payload.len())
            }
            Target::GrpcUnary { client, payload } => {
                (grpc_request(client, payload).await?, payload.len())
            }
            Target::GrpcExchange { client, payload } => {
                (client.call(payload).await?, payload.len())
            }
        };
        if got == expected {
            Ok(())
        } else {
            Err(format!("reply of {got} bytes, expected {expected}"))
        }
    }
}

/// Where the clients of a row connect to.
pub struct Endpoints<'a> {
    pub nats_url: &'a str,
    pub bare_socket: &'a Path,
    /// The gateway of the row's worker-thread count: socket, HTTP port, gRPC port.
    pub gateway: Option<(&'a Path, u16, u16)>,
    /// The identity headers the gateways stamp, for `direct + identity headers`.
    pub identity: IdentityHeaders,
}

/// ASCII letters: valid UTF-8 and JSON-string-safe, so that every mode carries the same bytes.
pub fn payload_text(size: usize) -> Bytes {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Connects the row's client and sends one request, so that connection set-up is not in the
/// row.
pub async fn connect(case: Case, at: &Endpoints<'_>) -> Result<Target, String> {
    let payload = payload_text(case.payload);
    let gateway = || {
        at.gateway
            .ok_or_else(|| "no gateway for this row".to_string())
    };
    let client = |client: Client| Target::Client {
        client: Arc::new(client),
        payload: payload.clone(),
    };
    let target = match case.mode {
        Mode::Direct | Mode::DirectMulti => {
            connect_direct(at.nats_url, payload.clone(), None).await?
        }
        Mode::DirectStamped => {
            connect_direct(at.nats_url, payload.clone(), identity_headers(at.identity)).await?
        }
        Mode::GatewayBinary => client(connect_socket(gateway()?.0, WireFormat::Binary).await?),
        Mode::GatewayJson => client(connect_socket(gateway()?.0, WireFormat::JsonLines).await?),
        Mode::Bare => client(connect_socket(at.bare_socket, WireFormat::Binary).await?),
        Mode::WsBinary => client(connect_ws(gateway()?.1, WireFormat::Binary).await?),
        Mode::WsJson => client(connect_ws(gateway()?.1, WireFormat::JsonLines).await?),
        Mode::GrpcUnary | Mode::GrpcExchange => {
            connect_grpc(case.mode, gateway()?.2, payload.clone()).await?
        }
    };
    first_request(&target, case.mode).await?;
    Ok(target)
}

pub async fn connect_direct(
    url: &str,
    payload: Bytes,
    headers: Option<async_nats::HeaderMap>,
) -> Result<Target, String> {
    Ok(Target::Direct {
        client: async_nats::ConnectOptions::new()
            .name("ipc-gateway-bench")
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(url)
            .await
            .map_err(|err| format!("connect {url}: {err}"))?,
        subject: async_nats::Subject::from_static(SUBJECT),
        payload,
        headers,
    })
}

/// The headers the gateway stamps (in `form`) on every message of a Unix-socket caller that
/// is this process (the identity the gateway gives a peer, then `Ipc-Gateway-Id` in the
/// gateway's default form when `full`), so that `direct + identity headers` carries the same
/// block as the gateway rows; none when the gateways stamp none.
pub fn identity_headers(form: IdentityHeaders) -> Option<async_nats::HeaderMap> {
    use ipc_gateway::protocol::identity::GATEWAY_ID_HEADER;
    let identity = ipc_gateway::core::auth::local_identity(
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
        Some(std::process::id() as i32),
    );
    let headers = match form {
        IdentityHeaders::Full => {
            let gateway_id = ipc_gateway::config::Config::default().resolved_gateway_id();
            let mut all = identity.headers();
            all.push((GATEWAY_ID_HEADER, gateway_id));
            all
        }
        IdentityHeaders::Minimal => identity.minimal_headers(),
        IdentityHeaders::Off => Vec::new(),
    };
    (!headers.is_empty()).then(|| {
        headers
            .into_iter()
            .map(|(name, value)| (name.parse().unwrap(), value.parse().unwrap()))
            .collect()
    })
}

/// One request first, so that connection set-up is not in the row.
pub async fn first_request(target: &Target, mode: Mode) -> Result<(), String> {
    let check = tokio::time::timeout(REQUEST_TIMEOUT, target.once())
        .await
        .map_err(|_| format!("{}: first request timed out", mode.name()))?;
    check.map_err(|err| format!("{}: first request failed: {err}", mode.name()))
}

async fn connect_socket(path: &Path, format: WireFormat) -> Result<Client, String> {
    Client::connect_with(path, format)
        .await
        .map_err(|err| format!("connect {}: {err}", path.display()))
}

async fn connect_ws(port: u16, format: WireFormat) -> Result<Client, String> {
    crate::common::gateway_ws_client(port, format, None).await
}

/// A gRPC target on one HTTP/2 connection to the gateway's gRPC port.
async fn connect_grpc(mode: Mode, port: u16, payload: Bytes) -> Result<Target, String> {
    let url = format!("http://127.0.0.1:{port}");
    let client = GatewayClient::connect(url.clone())
        .await
        .map_err(|err| format!("connect {url}: {err}"))?;
    Ok(match mode {
        Mode::GrpcExchange => Target::GrpcExchange {
            client: Arc::new(ExchangeClient::open(client).await?),
            payload,
        },
        _ => Target::GrpcUnary { client, payload },
    })
}

/// One `Request` call; the reply's payload length.
async fn grpc_request(client: &Grpc, payload: &Bytes) -> Result<usize, String> {
    let message = pb::RequestMessage {
        subject: SUBJECT.into(),
        payload: payload.clone(),
        timeout_ms: Some(REQUEST_TIMEOUT.as_millis() as u32),
        ..Default::default()
    };
    let reply = client
        .clone()
        .request(message)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok(reply.into_inner().payload.len())
}

type ExchangeWaiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<usize, String>>>>>;

/// Requests pipelined on one `Exchange` stream; a reader task hands each answer to the request
/// with its id.
pub struct ExchangeClient {
    next_id: AtomicU64,
    waiting: ExchangeWaiting,
    requests: mpsc::Sender<pb::ExchangeRequest>,
}

impl ExchangeClient {
    async fn open(mut client: Grpc) -> Result<Self, String> {
        let (requests, outgoing) = mpsc::channel(1024);
        let answers = client
            .exchange(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
            .map_err(|status| format!("Exchange: {status}"))?
            .into_inner();
        let waiting = ExchangeWaiting::default();
        tokio::spawn(read_answers(answers, waiting.clone()));
        Ok(ExchangeClient {
            next_id: AtomicU64::new(1),
            waiting,
            requests,
        })
    }

    async fn call(&self, payload: &Bytes) -> Result<usize, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, answer) = oneshot::channel();
        lock(&self.waiting).insert(id, sender);
        let request = pb::ExchangeRequest {
            id,
            subject: SUBJECT.into(),
            payload: payload.clone(),
            timeout_ms: Some(REQUEST_TIMEOUT.as_millis() as u32),
            ..Default::default()
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| "the Exchange stream is closed".to_string())?;
        answer
            .await
            .map_err(|_| "the Exchange stream ended before the answer".to_string())?
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_answers(mut answers: tonic::Streaming<pb::ExchangeReply>, waiting: ExchangeWaiting) {
    while let Ok(Some(answer)) = answers.message().await {
        let result = match answer.result {
            Some(exchange_reply::Result::Reply(reply)) => Ok(reply.payload.len()),
            Some(exchange_reply::Result::Error(error)) => {
                Err(format!("{}: {}", error.code, error.message))
            }
            None => Err("an answer with neither reply nor error".into()),
        };
        let sender = lock(&waiting).remove(&answer.id);
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }
    // The stream ended: whoever still waits gets an error (their senders drop).
    lock(&waiting).clear();
}
