//! Helpers shared by the benchmarks (`gateway/`, `soak/`, `ws_idle/`, `fanout/`, `memory/`). Each includes this
//! folder with `#[path = "../common/mod.rs"] mod common;`, so helpers a bench does not use are
//! not dead code.
//!
//! - `meta`: the run metadata every report carries (command, date, machine, nats-server
//!   version, git state, gateway binary), collected in one place;
//! - `report`: writing a report's JSON and its Markdown (made from the same structure), and
//!   the formatting helpers the renderers share;
//! - `procs`: child processes that stop when dropped, the client processes a bench talks
//!   to line by line (`LineProc`), nats-server (bare, or from a config file with a
//!   monitoring port and its own WebSocket listener), the gateway, the echo service, ports;
//! - `http`: a tiny HTTP GET for /ready and /metrics, Prometheus text readers;
//! - `procfs`: what /proc says about a process (memory, FDs, CPU, limits);
//! - `settings`: numbers and lists from the environment;
//! - `ws`: WebSocket client connections by the thousand: the gateway's JSON ping and
//!   subscribe, and the NATS protocol over nats-server's own WebSocket listener.
#![allow(dead_code, unused_imports)]

mod http;
mod meta;
mod procfs;
mod procs;
mod report;
mod settings;
mod ws;

pub use http::*;
pub use meta::*;
pub use procfs::*;
pub use procs::*;
pub use report::*;
pub use settings::*;
pub use ws::*;
