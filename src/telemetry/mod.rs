//! Telemetry: what the gateway tells operators about itself (Prometheus metrics, the audit log,
//! logging set-up; trace context joins here). Core and front-ends use it; it uses neither.

pub mod audit;
pub mod logging;
pub mod metrics;
