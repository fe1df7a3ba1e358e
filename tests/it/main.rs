//! Every integration test, in one test binary: the harness in `common/` and the dependency
//! graph are compiled and linked once instead of once per file (measured in
//! artifacts/ci-time.md). Each module is one area, as each file under `tests/` used to be its
//! own binary; every test starts its own nats-server and gateway on free ports and its socket
//! in its own temporary directory, so tests of different modules run side by side in the
//! harness's threads.
//!
//! Run one module, one test, or everything whose name matches:
//!
//! ```text
//! cargo test --test it uds_errors::
//! cargo test --test it -- --exact grpc::health_reports_serving_only_while_nats_is_connected
//! cargo test --test it idle                     # any test with "idle" in its path
//! cargo test --test it page::                   # the browser page in headless Chromium
//! PAGE_SCREENSHOT=docs/page.png cargo test --test it page::   # also retakes the screenshot
//! cargo test --test it -- --list                # every test, as module::name
//! ```

mod common;

mod breakers;
mod cluster;
mod durable;
mod fanout;
mod first_run;
mod grpc;
mod http_hardening;
mod nats_auth;
mod ops_metrics;
mod page;
mod pool_replacement;
mod presence;
mod priority;
mod resilience;
mod systemd;
mod tls;
mod trace;
mod trust;
mod uds_errors;
mod uds_lifecycle;
mod uds_requests;
mod ws;
mod ws_flow;
mod ws_protocol;
