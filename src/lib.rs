//! ipc-gateway: brings local processes (Unix socket), browsers (WebSocket) and services (gRPC)
//! onto a NATS bus through one core. This file only re-exports.

pub mod protocol;
