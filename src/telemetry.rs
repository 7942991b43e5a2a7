//! Telemetry: sets up logging once per process.
//!
//! JSON lines on stderr by default (`log.format = "pretty"` for people),
//! levels from `RUST_LOG` (default `info`). Span fields such as `request_id`
//! and `task_id` appear on every line logged inside a request's span. This
//! module never logs anything itself and holds no secrets.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::LogFormat;

/// Default filter when `RUST_LOG` is unset: our own info, libraries' warnings.
const DEFAULT_FILTER: &str = "info,lapin=warn,amq_protocol=warn,hyper=warn,reqwest=warn";

/// Default filter for commands whose own output matters more than logs.
pub const QUIET_FILTER: &str = "warn";

/// Installs the global subscriber with the default filter; later calls are
/// no-ops.
pub fn init(format: LogFormat) {
    init_with_default(format, DEFAULT_FILTER);
}

/// Installs the global subscriber, using `default_filter` when `RUST_LOG`
/// is unset.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init(),
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
}
