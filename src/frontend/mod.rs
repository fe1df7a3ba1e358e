//! Front-ends: each speaks one wire and calls the shared core through a `Session`.

pub mod grpc;
pub mod lifecycle;
pub mod named;
pub mod outbox;
pub mod session;
pub mod uds;
pub mod ws;
