//! The operator's HTTP port: health, readiness, status, metrics and the browser page. The
//! server composes it with the WebSocket route; it names no front-end.

mod gather;
pub mod http;
pub mod page;
pub mod status;
pub mod status_page;
