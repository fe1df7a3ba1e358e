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
use tonic::codegen::http;

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
    GrpcUnaryH2 {
        client: Arc<H2Unary>,
        payload_len: usize,
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
            Target::GrpcUnaryH2 {
                client,
                payload_len,
            } => (client.call().await?, *payload_len),
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
        Mode::GrpcUnaryH2 => Target::GrpcUnaryH2 {
            client: Arc::new(H2Unary::connect(gateway()?.2, &payload).await?),
            payload_len: payload.len(),
        },
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
    let identity = ipc_gateway::core::auth::local_identity(
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
        Some(std::process::id() as i32),
    );
    let gateway_id = ipc_gateway::config::Config::default().resolved_gateway_id();
    let headers = ipc_gateway::core::identity_headers(&identity, form, &gateway_id);
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

/// `Request` calls from a client on h2 alone: the request message is encoded once, each call
/// is one HTTP/2 stream, and the reply's gRPC frame and trailers are read by hand. What tonic's
/// client adds per call (its codec, a tower buffer with a task hop, hyper) is left out.
pub struct H2Unary {
    send: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
    /// The gRPC message frame: a zero compression flag, the length, the protobuf bytes.
    body: Bytes,
}

impl H2Unary {
    async fn connect(port: u16, payload: &Bytes) -> Result<Self, String> {
        use prost::Message as _;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|err| format!("connect 127.0.0.1:{port}: {err}"))?;
        tcp.set_nodelay(true).map_err(|err| err.to_string())?;
        // hyper's (so tonic's) client windows, not h2's 64 KiB: with a few hundred replies in
        // flight, a small connection window has the server send them in slivers, and h2 ends
        // a connection that receives too many DATA frames for its data.
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .handshake(tcp)
            .await
            .map_err(|err| format!("HTTP/2 handshake: {err}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let message = pb::RequestMessage {
            subject: SUBJECT.into(),
            payload: payload.clone(),
            timeout_ms: Some(REQUEST_TIMEOUT.as_millis() as u32),
            ..Default::default()
        }
        .encode_to_vec();
        let mut body = bytes::BytesMut::with_capacity(5 + message.len());
        body.extend_from_slice(&[0]);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let uri = format!(
            "http://127.0.0.1:{port}/{}/Request",
            ipc_gateway::frontend::grpc::SERVICE_NAME
        );
        Ok(H2Unary {
            send,
            uri: uri.parse().map_err(|err| format!("{uri}: {err}"))?,
            body: body.freeze(),
        })
    }

    /// One call; the reply's payload length.
    async fn call(&self) -> Result<usize, String> {
        use prost::Message as _;
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|err| err.to_string())?;
        let request = http::Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|err| err.to_string())?;
        let (response, mut stream) = send
            .send_request(request, false)
            .map_err(|err| err.to_string())?;
        stream
            .send_data(self.body.clone(), true)
            .map_err(|err| err.to_string())?;
        let response = response.await.map_err(|err| err.to_string())?;
        if let Some(refused) = grpc_error(response.headers()) {
            return Err(refused);
        }
        let mut body = response.into_body();
        let mut frame = bytes::BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|err| err.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            frame.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(|err| err.to_string())?;
        match trailers.as_ref().map(|t| t.get("grpc-status")) {
            Some(Some(status)) if status == "0" => {}
            _ => {
                return Err(trailers
                    .as_ref()
                    .and_then(grpc_error)
                    .unwrap_or_else(|| "no grpc-status in the trailers".into()));
            }
        }
        let message = match frame.get(..5) {
            Some([0, len @ ..]) => {
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                frame.get(5..5 + len).ok_or("a truncated reply frame")?
            }
            _ => return Err("a reply without an uncompressed gRPC frame".into()),
        };
        let reply = pb::ReplyMessage::decode(message).map_err(|err| err.to_string())?;
        Ok(reply.payload.len())
    }
}

/// `grpc-status` and `grpc-message` when the status is not OK.
fn grpc_error(headers: &http::HeaderMap) -> Option<String> {
    let status = headers.get("grpc-status")?;
    (status != "0").then(|| {
        format!(
            "grpc-status {:?}: {:?}",
            status,
            headers.get("grpc-message")
        )
    })
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
