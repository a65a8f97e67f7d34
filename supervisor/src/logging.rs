//! The master's log: `tracing` to stderr, text or JSON, with a filter that a
//! reload switches in its commit phase.

use crate::config::LogFormat;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Switches the active log filter.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    format: LogFormat,
}

/// Installs the global subscriber.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<LogHandle> {
    let (filter_layer, handle) = reload::Layer::new(EnvFilter::try_new(filter)?);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let writer = std::io::stderr;
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(writer).with_target(false))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(writer)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()?,
    }
    Ok(LogHandle {
        filter: handle,
        format,
    })
}

impl LogHandle {
    /// Replaces the filter (already validated by the config parser).
    pub fn set_filter(&self, filter: &str) -> anyhow::Result<()> {
        self.filter.reload(EnvFilter::try_new(filter)?)?;
        Ok(())
    }

    /// The format chosen at start; it cannot change without a restart.
    pub fn format(&self) -> LogFormat {
        self.format
    }
}
