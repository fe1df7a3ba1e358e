//! Operations beside the core: metrics, the HTTP port (health, readiness, metrics, the browser
//! page) and logging.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod page;
