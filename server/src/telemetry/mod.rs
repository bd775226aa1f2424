//! Structured logs through `tracing`, to stderr, as text or JSON; metrics in
//! [`metrics`].

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::error::{Error, Result};

/// Installs the global subscriber. Fails on an invalid filter rather than silently
/// logging nothing.
pub fn init(filter: &str, format: LogFormat) -> Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| Error::Config(format!("log filter {filter:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| Error::Config(format!("logging already initialized: {e}")))
}
