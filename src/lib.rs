//! ipc-gateway: brings local processes (Unix socket), browsers (WebSocket) and services (gRPC)
//! onto a NATS bus through one core. This file only re-exports.

pub mod client;
pub mod config;
pub mod core;
pub mod demo;
pub mod frontend;
pub mod ops;
pub mod protocol;
pub mod server;
pub mod telemetry;
pub mod tls;

pub use crate::config::Config;
pub use crate::core::Gateway;
