//! The operator's HTTP port: health, readiness, status, metrics and the browser page. The
//! server composes it with the WebSocket route; it names no front-end. Beside it, systemd's
//! socket activation and readiness notification (`systemd`), and what SIGHUP reloads
//! (`reload`).

pub mod http;
pub mod page;
pub mod reload;
pub mod status;
pub mod status_page;
pub mod systemd;
