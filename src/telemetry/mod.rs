//! Telemetry: what the gateway tells operators about itself (Prometheus metrics, logging set-up;
//! the audit log and trace context join here). Core and front-ends use it; it uses neither.

pub mod logging;
pub mod metrics;
