//! Telemetry: what the gateway tells operators about itself (Prometheus metrics, the audit log,
//! logging set-up, W3C trace context). Core and front-ends use it; it uses neither.

pub mod audit;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod trace;
