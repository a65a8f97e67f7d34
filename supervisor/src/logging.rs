//! The master's log: `tracing` to stderr or a file, text or JSON, with a
//! filter that a reload switches in its commit phase and a file that
//! `baton reopen` reopens (for logrotate).

use crate::config::LogFormat;
use anyhow::Context;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Switches the active log filter and reopens the log file.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    format: LogFormat,
    file: Option<LogFile>,
    /// The OTLP trace exporter, with `otlp_endpoint`.
    traces: Option<crate::traces::Export>,
}

/// Where log lines go: stderr, or a file that can be reopened.
#[derive(Clone)]
enum Sink {
    Stderr,
    File(LogFile),
}

/// A log file shared by the subscriber and the handle.
#[derive(Clone)]
struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl LogFile {
    fn open(path: &Path) -> anyhow::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(open_append(path)?)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opens the log file for appending. Without a waiting open: a FIFO
/// nobody reads is an error, not a master hung until a reader comes (also
/// at `baton reopen`); once open, writes block as usual.
fn open_append(path: &Path) -> anyhow::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let opening = || format!("opening log file {}", path.display());
    let file = match OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            anyhow::bail!("{}: it is a FIFO that no process reads", opening())
        }
        other => other.with_context(opening)?,
    };
    let flags = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK),
    )
    .with_context(opening)?;
    Ok(file)
}

/// One log line's writer.
pub enum SinkWriter<'a> {
    /// To stderr.
    Stderr(std::io::Stderr),
    /// To the file, locked for the line.
    File(MutexGuard<'a, File>),
}

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SinkWriter::Stderr(w) => w.write(buf),
            SinkWriter::File(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SinkWriter::Stderr(w) => w.flush(),
            SinkWriter::File(w) => w.flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> SinkWriter<'a> {
        match self {
            Sink::Stderr => SinkWriter::Stderr(std::io::stderr()),
            Sink::File(file) => SinkWriter::File(file.lock()),
        }
    }
}

/// Installs the global subscriber; with `otlp`, spans are also
/// exported there (see [`crate::traces`]).
pub fn init(
    filter: &str,
    format: LogFormat,
    file: Option<&Path>,
    otlp: Option<crate::traces::Settings>,
) -> anyhow::Result<LogHandle> {
    let (filter_layer, handle) = reload::Layer::new(EnvFilter::try_new(filter)?);
    let file = file.map(LogFile::open).transpose()?;
    let sink = file.clone().map_or(Sink::Stderr, Sink::File);
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (tracer, traces) = match otlp.as_ref().map(crate::traces::tracer).transpose()? {
        Some((tracer, export)) => (Some(tracer), Some(export)),
        None => (None, None),
    };
    // `GET /events` on the admin endpoint (see [`crate::events`]): the key
    // events, as JSON lines, whatever the log's format.
    let events = fmt::layer()
        .json()
        .with_writer(crate::events::Writer)
        .with_current_span(true)
        .with_span_list(false)
        .with_filter(tracing_subscriber::filter::filter_fn(
            crate::events::is_key_event,
        ));
    let registry = tracing_subscriber::registry()
        .with(filter_layer)
        .with(tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t)))
        .with(events);
    match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(sink)
                    .with_ansi(ansi)
                    .with_target(false),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(sink)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()?,
    }
    Ok(LogHandle {
        filter: handle,
        format,
        file,
        traces,
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

    /// The log file, if logging to one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Sends the spans not exported yet and stops the exporter.
    pub fn shutdown_traces(&self) {
        if let Some(traces) = &self.traces {
            traces.shutdown();
        }
    }

    /// OTLP spans not sent so far (0 without an exporter).
    pub fn otlp_spans_dropped(&self) -> u64 {
        self.traces.as_ref().map_or(0, |t| t.dropped())
    }

    /// Reopens the log file at its path (after logrotate moved it away).
    pub fn reopen(&self) -> anyhow::Result<()> {
        if let Some(file) = &self.file {
            let new = open_append(&file.path)?;
            *file.lock() = new;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_nobody_reads_is_an_error_not_a_hang() {
        let dir = baton_tests::harness::TempDir::new();
        let path = dir.path().join("baton.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = format!("{:#}", open_append(&path).unwrap_err());
        assert!(e.contains("it is a FIFO that no process reads"), "{e}");
        assert!(e.contains("baton.log"), "{e}");
    }

    /// Every `event` name the master logs is listed in
    /// docs/observability.md, and every name listed there is logged.
    #[test]
    fn every_event_name_is_documented() {
        fn names(dir: &std::path::Path, found: &mut std::collections::BTreeSet<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    names(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for piece in text.split("event = \"").skip(1) {
                        found.insert(piece.split('"').next().unwrap().to_string());
                    }
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut logged = std::collections::BTreeSet::new();
        names(&root.join("src"), &mut logged);
        assert!(logged.contains("reload.committed"), "{logged:?}");
        let docs = std::fs::read_to_string(root.join("../docs/observability.md")).unwrap();
        let section = docs
            .split("The names:")
            .nth(1)
            .expect("the list of event names");
        let section = section.split("\n\n").next().unwrap();
        let documented: std::collections::BTreeSet<String> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert_eq!(logged, documented, "event names logged vs documented");
    }
}
