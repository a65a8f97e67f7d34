//! A `tracing-subscriber` setup whose filter is a reload handle: `[worker]
//! log_filter` switches in the same in-place transaction as the app config
//! files (prepare validates the directive, commit swaps it). Feature
//! `tracing`.

use crate::app_config::{Files, Prepared, Reloadable};
use crate::{Error, Worker};
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Installs a global `fmt` subscriber (to stderr) whose filter is `[worker] log_filter`
/// (under baton), else `RUST_LOG`, else `info`, and registers it as a
/// reload handle of `worker`. Call it once, early.
///
/// ```no_run
/// # async fn run() -> Result<(), baton_worker::Error> {
/// let mut worker = baton_worker::Worker::builder().start().await?;
/// baton_worker::logging::init(&mut worker)?;
/// tracing::info!(generation = worker.generation(), "starting");
/// # Ok(()) }
/// ```
pub fn init(worker: &mut Worker) -> Result<(), Error> {
    let initial = worker
        .initial_log_filter()
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&initial)
        .map_err(|e| Error::AppConfig(format!("invalid log filter {initial:?}: {e}")))?;
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init()
        .map_err(|e| Error::AppConfig(format!("installing the log subscriber: {e}")))?;
    worker.register(Arc::new(LogFilter {
        handle,
        prepared: Prepared::default(),
    }));
    Ok(())
}

struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    prepared: Prepared<EnvFilter>,
}

impl Reloadable for LogFilter {
    fn prepare(&self, version: &str, _: &Files, log_filter: Option<&str>) -> Result<(), String> {
        let directive = log_filter.unwrap_or("info");
        let filter = EnvFilter::try_new(directive)
            .map_err(|e| format!("invalid log_filter {directive:?}: {e}"))?;
        self.prepared.set(version, filter);
        Ok(())
    }

    fn commit(&self, version: &str) -> bool {
        self.prepared
            .take(version)
            .is_some_and(|filter| self.handle.reload(filter).is_ok())
    }

    fn abort(&self) {
        self.prepared.clear();
    }
}
