//! What SIGHUP reloads, beyond the policy and the audit file (`Gateway::reload`): the
//! configuration is read again the way it was at start (defaults < `--config` file <
//! environment < flags). The settings a running gateway can change (`core::live::LIVE`) are
//! applied; any other setting that differs is named in the log as needing a restart and is not
//! applied; a configuration that does not load or validate changes nothing, and the log says
//! why. (The process's environment and flags cannot change while it runs: in practice the file
//! is what changes.)

use tracing::{error, info, warn};

use crate::config::Config;
use crate::core::Gateway;
use crate::core::live;

/// Loads the configuration again, as `main` did at start.
pub type LoadConfig = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Reloads the configuration (when there is a loader), then the policy and the audit file.
/// `current` is the configuration in force; it takes the settings applied.
pub async fn reload(gateway: &Gateway, current: &mut Config, load: Option<&LoadConfig>) {
    if let Some(load) = load {
        match load() {
            Err(error) => {
                error!(%error, "configuration reload failed; the settings in force stay")
            }
            Ok(new) => {
                let (applied, restart) = live::changes(current, &new);
                if !restart.is_empty() {
                    warn!(
                        settings = %restart.join(", "),
                        "changed settings need a restart; not applied"
                    );
                }
                if applied.is_empty() {
                    info!("configuration reloaded; no live setting changed");
                } else {
                    // Logged first: a new log filter may silence it.
                    info!(settings = %applied.join(", "), "configuration reloaded; applied");
                    gateway.apply_live(&new);
                    if applied.iter().any(|name| name == "log_filter")
                        && let Err(error) =
                            crate::telemetry::logging::set_filter(new.log_filter.as_deref())
                    {
                        error!(%error, "the log filter could not be changed");
                    }
                    *current = with_live(current, &new);
                }
            }
        }
    }
    let _ = gateway.reload().await;
}

/// `old` with the live settings of `new`: what is in force after applying them.
fn with_live(old: &Config, new: &Config) -> Config {
    let mut next = old.clone();
    next.request_timeout_ms = new.request_timeout_ms;
    next.max_subscriptions_per_connection = new.max_subscriptions_per_connection;
    next.rate_limit_requests_per_sec = new.rate_limit_requests_per_sec;
    next.rate_limit_bytes_per_sec = new.rate_limit_bytes_per_sec;
    next.idle_timeout_ms = new.idle_timeout_ms;
    next.slow_client_stall_ms = new.slow_client_stall_ms;
    next.drain_timeout_ms = new.drain_timeout_ms;
    next.max_connections_per_identity = new.max_connections_per_identity;
    next.max_connections = new.max_connections;
    next.log_filter = new.log_filter.clone();
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_applying_only_restart_only_changes_remain() {
        let old = Config::default();
        let mut new = old.clone();
        new.request_timeout_ms = 7;
        new.max_subscriptions_per_connection = 1;
        new.rate_limit_requests_per_sec = 2;
        new.rate_limit_bytes_per_sec = 3;
        new.idle_timeout_ms = 4;
        new.slow_client_stall_ms = 5;
        new.drain_timeout_ms = 6;
        new.max_connections_per_identity = 8;
        new.max_connections = 9;
        new.log_filter = Some("debug".into());
        new.max_frame_bytes = 99;
        let next = with_live(&old, &new);
        // with_live copies every LIVE setting: nothing live is left to apply.
        assert_eq!(
            live::changes(&next, &new),
            (vec![], vec!["max_frame_bytes".into()])
        );
    }
}
