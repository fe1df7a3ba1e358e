//! Logging set-up: the `log_filter` setting, else `RUST_LOG`, filters (default `info`; the NATS
//! client library's own events at `warn` unless the filter names its target: the gateway logs
//! what they mean); text or JSON lines on stderr. Text has ANSI colours only when stderr is a
//! terminal and `NO_COLOR` is unset or empty (<https://no-color.org>). The filter can be
//! replaced while the gateway runs (`set_filter`, on SIGHUP).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, NATS_CLIENT_LOG_TARGET};

/// Replaces the installed subscriber's filter; set by `init_with`.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static RELOAD: OnceLock<Reload> = OnceLock::new();

pub fn init(format: LogFormat) {
    init_with(format, None);
}

/// `filter` (a `log_filter` setting, validated already) over `RUST_LOG`.
pub fn init_with(format: LogFormat, filter: Option<&str>) {
    let filter = match filter.map(parse) {
        Some(Ok(filter)) => filter,
        _ => default_filter(),
    };
    // The format changes the builder's type, so each is built whole.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder
                .with_env_filter(filter)
                .with_ansi(colour(
                    std::io::stderr().is_terminal(),
                    std::env::var_os("NO_COLOR"),
                ))
                .with_writer(std::io::stderr)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder
                .try_init()
                .map(|()| Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) as Reload)
        }};
    }
    // A second call (tests start several gateways) keeps the first subscriber.
    let installed = match format {
        LogFormat::Text => install!(tracing_subscriber::fmt()),
        LogFormat::Json => install!(tracing_subscriber::fmt().json()),
    };
    if let Ok(reload) = installed {
        let _ = RELOAD.set(reload);
    }
}

/// A filter in `RUST_LOG`'s syntax, or why it is not one; the NATS client's events held at
/// `warn` unless it names the client's target.
pub fn parse(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives)
        .map(|filter| quiet_nats_client(filter, directives))
        .map_err(|e| format!("not a log filter ({e}): {directives:?}"))
}

/// `RUST_LOG`, else `info`.
fn default_filter() -> EnvFilter {
    let directives = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    quiet_nats_client(filter, &directives)
}

/// The NATS client reports each failed connect attempt at info, and a refused credential at
/// error, on every attempt (dozens a second with a pool of connections retrying): the gateway
/// logs what they mean itself, rate-limited, so its connector is silenced and the rest held at
/// `warn`, unless the filter names the client's target.
fn quiet_nats_client(filter: EnvFilter, directives: &str) -> EnvFilter {
    if directives.contains(NATS_CLIENT_LOG_TARGET) {
        return filter;
    }
    [
        format!("{NATS_CLIENT_LOG_TARGET}=warn"),
        format!("{NATS_CLIENT_LOG_TARGET}::connector=off"),
    ]
    .iter()
    .filter_map(|directive| directive.parse().ok())
    .fold(filter, EnvFilter::add_directive)
}

/// Colours for a terminal, unless `NO_COLOR` is set to anything but the empty string.
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Puts `filter` (None: `RUST_LOG`, else `info`) in force; an error when logging was not set up
/// by `init_with`.
pub fn set_filter(filter: Option<&str>) -> Result<(), String> {
    let filter = match filter {
        Some(directives) => parse(directives)?,
        None => default_filter(),
    };
    let reload = RELOAD
        .get()
        .ok_or("logging was not set up by this process")?;
    reload(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn a_log_filter_that_does_not_parse_is_a_configuration_error_naming_it() {
        assert!(super::parse("warn,ipc_gateway::core=debug").is_ok());
        let config = crate::config::Config {
            log_filter: Some("info,[{".into()),
            ..Default::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("log_filter: not a log filter"), "{error}");
    }
}
