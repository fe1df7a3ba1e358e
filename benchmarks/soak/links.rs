//! How a soak client reaches the gateway: `Dial` says where and as whom (the Unix socket with
//! binary frames or JSON lines, the WebSocket with a bearer token, gRPC with a bearer token),
//! `Link` is one open connection that sends a request and gives back its answer as
//! `ipc_gateway::client` errors, so that the request tasks treat every front-end alike.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use ipc_gateway::client::{Client, ClientError, WireFormat};
use ipc_gateway::frontend::grpc::pb::{self, gateway_client::GatewayClient};
use ipc_gateway::protocol::{ErrorCode, Frontend, GatewayError};
use tonic::metadata::MetadataMap;

use crate::common::gateway_ws_client;

pub type Grpc = GatewayClient<tonic::transport::Channel>;

/// Where a client connects, in which format, with which token.
#[derive(Clone)]
pub enum Dial {
    Socket(PathBuf, WireFormat),
    Ws { port: u16, token: String },
    Grpc { port: u16, token: String },
}

/// One open connection.
pub enum Link {
    Gateway(Client),
    Grpc(Grpc, String),
}

impl Dial {
    pub fn frontend(&self) -> Frontend {
        match self {
            Dial::Socket(..) => Frontend::Uds,
            Dial::Ws { .. } => Frontend::Ws,
            Dial::Grpc { .. } => Frontend::Grpc,
        }
    }

    pub async fn connect(&self) -> Result<Link, String> {
        match self {
            Dial::Socket(path, format) => Client::connect_with(path, *format)
                .await
                .map(Link::Gateway)
                .map_err(|err| format!("connect {}: {err}", path.display())),
            // JSON text messages: what a browser sends.
            Dial::Ws { port, token } => {
                gateway_ws_client(*port, WireFormat::JsonLines, Some(token))
                    .await
                    .map(Link::Gateway)
            }
            Dial::Grpc { port, token } => {
                let url = format!("http://127.0.0.1:{port}");
                let client = GatewayClient::connect(url.clone())
                    .await
                    .map_err(|err| format!("connect {url}: {err}"))?;
                Ok(Link::Grpc(client, format!("Bearer {token}")))
            }
        }
    }
}

impl Link {
    /// The gateway client (the Unix socket and the WebSocket), for subscriptions and publishes.
    pub fn client(&self) -> Option<&Client> {
        match self {
            Link::Gateway(client) => Some(client),
            Link::Grpc(..) => None,
        }
    }

    /// Answers nobody waited for (see `Client::stray_answers`); a gRPC call has one answer by
    /// construction.
    pub fn stray_answers(&self) -> u64 {
        self.client().map_or(0, Client::stray_answers)
    }

    pub async fn request(
        &self,
        subject: &str,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        match self {
            Link::Gateway(client) => client
                .request(subject, data, Some(timeout))
                .await
                .map(|reply| reply.data),
            Link::Grpc(client, bearer) => {
                let mut request = tonic::Request::new(pb::RequestMessage {
                    subject: subject.into(),
                    payload: Bytes::copy_from_slice(data),
                    timeout_ms: Some(timeout.as_millis() as u32),
                    ..Default::default()
                });
                authorize(request.metadata_mut(), bearer);
                client
                    .clone()
                    .request(request)
                    .await
                    .map(|reply| reply.into_inner().payload)
                    .map_err(|status| status_error(&status))
            }
        }
    }
}

pub fn authorize(metadata: &mut MetadataMap, bearer: &str) {
    if let Ok(value) = bearer.parse() {
        metadata.insert("authorization", value);
    }
}

/// A gRPC status as the client error the other front-ends give: the gateway's code from the
/// `ipc-gateway-error` entry; a status without one did not come from the gateway (the
/// connection failed).
pub fn status_error(status: &tonic::Status) -> ClientError {
    let metadata = status.metadata();
    let code = metadata
        .get("ipc-gateway-error")
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::parse);
    match code {
        Some(code) => ClientError::Gateway(GatewayError {
            code,
            message: status.message().to_owned(),
            retry_after_ms: metadata
                .get("ipc-gateway-retry-after-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        }),
        None => ClientError::Io(std::io::Error::other(status.to_string())),
    }
}
