//! Operations beside the core: metrics, the HTTP port (health, readiness, metrics) and logging.

pub mod http;
pub mod logging;
pub mod metrics;
