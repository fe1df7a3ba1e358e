//! The settings a reload (SIGHUP) changes in a running gateway, each an atomic read where it is
//! used (a relaxed load: as cheap as reading a field of `Config`). Everything else in `Config`
//! is read once at start, to size something (semaphores, pools, buffers) or to bind something,
//! and needs a restart; `changes` tells the two kinds apart by name.
//!
//! Where each takes effect: `request_timeout_ms` on the next request, subscribe or replay;
//! `max_subscriptions_per_connection` on the next subscribe (subscriptions held past a lowered
//! limit stay); the rate limits, `idle_timeout_ms` and `slow_client_stall_ms` on connections made
//! after the reload; `drain_timeout_ms` on the next drain; `max_connections_per_identity` on the
//! next connection (connections made while it was 0 do not count under a new limit);
//! `max_connections` on the next connection (connections held past a lowered limit stay; the
//! HTTP port's handshake limit, half of it by default, is sized at start).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::config::Config;

/// The settings a reload applies, by their configuration names (all but the last three held
/// here). `policy` (the file's contents)
/// and `audit_file` (reopened) are reloaded on SIGHUP too, but their paths need a restart.
pub const LIVE: &[&str] = &[
    "request_timeout_ms",
    "max_subscriptions_per_connection",
    "rate_limit_requests_per_sec",
    "rate_limit_bytes_per_sec",
    "idle_timeout_ms",
    "slow_client_stall_ms",
    "drain_timeout_ms",
    // Held by `access` and `slots` (`Gateway::apply_live`).
    "max_connections_per_identity",
    "max_connections",
    // Not the core's: `ops::reload` puts it in force in the logging subscriber.
    "log_filter",
];

#[derive(Debug)]
pub struct Live {
    request_timeout_ms: AtomicU64,
    max_subscriptions_per_connection: AtomicUsize,
    rate_limit_requests_per_sec: AtomicU64,
    rate_limit_bytes_per_sec: AtomicU64,
    idle_timeout_ms: AtomicU64,
    slow_client_stall_ms: AtomicU64,
    drain_timeout_ms: AtomicU64,
}

impl Live {
    pub fn new(config: &Config) -> Live {
        Live {
            request_timeout_ms: AtomicU64::new(config.request_timeout_ms),
            max_subscriptions_per_connection: AtomicUsize::new(
                config.max_subscriptions_per_connection,
            ),
            rate_limit_requests_per_sec: AtomicU64::new(config.rate_limit_requests_per_sec),
            rate_limit_bytes_per_sec: AtomicU64::new(config.rate_limit_bytes_per_sec),
            idle_timeout_ms: AtomicU64::new(config.idle_timeout_ms),
            slow_client_stall_ms: AtomicU64::new(config.slow_client_stall_ms),
            drain_timeout_ms: AtomicU64::new(config.drain_timeout_ms),
        }
    }

    /// Takes the live settings of `config` (validated already).
    pub fn apply(&self, config: &Config) {
        self.request_timeout_ms
            .store(config.request_timeout_ms, Relaxed);
        self.max_subscriptions_per_connection
            .store(config.max_subscriptions_per_connection, Relaxed);
        self.rate_limit_requests_per_sec
            .store(config.rate_limit_requests_per_sec, Relaxed);
        self.rate_limit_bytes_per_sec
            .store(config.rate_limit_bytes_per_sec, Relaxed);
        self.idle_timeout_ms.store(config.idle_timeout_ms, Relaxed);
        self.slow_client_stall_ms
            .store(config.slow_client_stall_ms, Relaxed);
        self.drain_timeout_ms
            .store(config.drain_timeout_ms, Relaxed);
    }

    /// Default request deadline and ceiling on a client's `timeout_ms`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Relaxed))
    }

    pub fn max_subscriptions_per_connection(&self) -> usize {
        self.max_subscriptions_per_connection.load(Relaxed)
    }

    /// (requests a second, bytes a second) for a new connection; 0 = off.
    pub fn rate_limits(&self) -> (u64, u64) {
        (
            self.rate_limit_requests_per_sec.load(Relaxed),
            self.rate_limit_bytes_per_sec.load(Relaxed),
        )
    }

    /// `None`: off.
    pub fn idle_timeout(&self) -> Option<Duration> {
        let ms = self.idle_timeout_ms.load(Relaxed);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    pub fn slow_client_stall(&self) -> Duration {
        Duration::from_millis(self.slow_client_stall_ms.load(Relaxed))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms.load(Relaxed))
    }
}

/// What differs between `old` and `new`, by setting name: (applied live, needs a restart).
pub fn changes(old: &Config, new: &Config) -> (Vec<String>, Vec<String>) {
    let as_map = |config: &Config| match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (old_config, new_config) = (old, new);
    let (old, new) = (as_map(old), as_map(new));
    let mut live = Vec::new();
    let mut restart = Vec::new();
    for (name, value) in &new {
        if old.get(name) != Some(value) {
            if LIVE.contains(&name.as_str()) {
                live.push(name.clone());
            } else {
                restart.push(name.clone());
            }
        }
    }
    // Secrets serialize as "***" whatever their value.
    for (key, (was, is)) in crate::config::SECRET_KEYS
        .iter()
        .zip(old_config.secrets().into_iter().zip(new_config.secrets()))
    {
        if was != is && !restart.iter().any(|name| name == key) {
            restart.push((*key).to_owned());
        }
    }
    live.sort();
    restart.sort();
    (live, restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_sorted_into_live_and_restart_only_by_name() {
        let old = Config::default();
        let mut new = old.clone();
        new.rate_limit_requests_per_sec = 5;
        new.max_subscriptions_per_connection = 2;
        new.http = "127.0.0.1:9999".parse().unwrap();
        new.nats_connections = 7;
        let (live, restart) = changes(&old, &new);
        assert_eq!(
            live,
            [
                "max_subscriptions_per_connection",
                "rate_limit_requests_per_sec"
            ]
        );
        assert_eq!(restart, ["http", "nats_connections"]);
        assert_eq!(changes(&old, &old), (vec![], vec![]));
        let token = |text: &str| Config {
            nats_token: Some(crate::config::Secret::new(text)),
            ..Config::default()
        };
        assert_eq!(
            changes(&token("a"), &token("b")),
            (vec![], vec!["nats_token".to_owned()]),
            "a secret's change is seen though both show as ***"
        );
    }

    #[test]
    fn apply_takes_every_live_setting() {
        let live = Live::new(&Config::default());
        let config = Config {
            request_timeout_ms: 1234,
            max_subscriptions_per_connection: 3,
            rate_limit_requests_per_sec: 10,
            rate_limit_bytes_per_sec: 20,
            idle_timeout_ms: 30,
            slow_client_stall_ms: 40,
            drain_timeout_ms: 50,
            ..Config::default()
        };
        live.apply(&config);
        assert_eq!(live.request_timeout(), Duration::from_millis(1234));
        assert_eq!(live.max_subscriptions_per_connection(), 3);
        assert_eq!(live.rate_limits(), (10, 20));
        assert_eq!(live.idle_timeout(), Some(Duration::from_millis(30)));
        assert_eq!(live.slow_client_stall(), Duration::from_millis(40));
        assert_eq!(live.drain_timeout(), Duration::from_millis(50));
        // Every name in LIVE is one of Config's settings.
        let names = serde_json::to_value(Config::default()).unwrap();
        for name in LIVE {
            assert!(names.get(name).is_some(), "{name}");
        }
    }
}
