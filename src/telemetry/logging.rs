//! Logging set-up: the `log_filter` setting, else `RUST_LOG`, filters (default `info`); text
//! or JSON lines on stderr. The filter can be replaced while the gateway runs (`set_filter`,
//! on SIGHUP).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

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
        _ => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // The format changes the builder's type, so each is built whole.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder
                .with_env_filter(filter)
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

/// A filter in `RUST_LOG`'s syntax, or why it is not one.
pub fn parse(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| format!("not a log filter ({e}): {directives:?}"))
}

/// Puts `filter` (None: `RUST_LOG`, else `info`) in force; an error when logging was not set up
/// by `init_with`.
pub fn set_filter(filter: Option<&str>) -> Result<(), String> {
    let filter = match filter {
        Some(directives) => parse(directives)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let reload = RELOAD
        .get()
        .ok_or("logging was not set up by this process")?;
    reload(filter)
}

#[cfg(test)]
mod tests {
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
