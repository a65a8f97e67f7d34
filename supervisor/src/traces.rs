//! Reload traces over OTLP: with `[supervisor] otlp_endpoint`, the master's
//! spans (each reload, with a child span per phase) are exported over
//! OTLP/HTTP with protobuf bodies (`opentelemetry-otlp`, over hyper's client:
//! see [`client`]), batched by the SDK's exporter thread so that the event
//! loop never waits on a collector.
//! New workers get the reload's W3C `TRACEPARENT` in their environment.
//!
//! A collector that accepts and never answers costs the loop nothing while
//! the master runs (each export waits on the exporter's thread, at most
//! `otlp_export_timeout`); at a stop or an exec-mode upgrade, the master
//! waits at most `otlp_flush_timeout` for what is batched. Every span that
//! was not sent (the export failed or timed out, the queue was full, or the
//! flush ran out of time) is counted: `baton_otlp_spans_dropped_total`, and
//! an `otlp.spans_dropped` event at exit.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor, Tracer,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing_opentelemetry::OpenTelemetrySpanExt;

mod client;

/// Spans the batch processor may hold; past this, a span is dropped (and
/// counted) rather than queued.
const QUEUE: usize = 2048;

/// The exporter, flushed and stopped at exit.
pub struct Export {
    provider: SdkTracerProvider,
    tally: Arc<Tally>,
    flush_timeout: Duration,
}

/// What became of the spans the master ended.
#[derive(Debug, Default)]
struct Tally {
    /// Handed to the batch processor.
    queued: AtomicU64,
    /// Accepted by the collector.
    sent: AtomicU64,
    /// In a batch whose export failed or timed out.
    failed: AtomicU64,
    /// Not queued: the queue was full.
    overflowed: AtomicU64,
    /// Still unsent when the flush at exit ran out of time.
    abandoned: AtomicU64,
}

impl Tally {
    fn dropped(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
            + self.overflowed.load(Ordering::Relaxed)
            + self.abandoned.load(Ordering::Relaxed)
    }

    /// Queued, and neither sent nor failed yet.
    fn pending(&self) -> u64 {
        self.queued
            .load(Ordering::Relaxed)
            .saturating_sub(self.sent.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed))
    }
}

/// The SDK's batch processor, counting what it is given and refusing
/// (counted) what its queue could not hold, which it would drop unseen.
#[derive(Debug)]
struct Counted {
    inner: BatchSpanProcessor,
    tally: Arc<Tally>,
}

impl SpanProcessor for Counted {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.tally.pending() >= QUEUE as u64 {
            self.tally.overflowed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.tally.queued.fetch_add(1, Ordering::Relaxed);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting the spans of each batch sent or not.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    tally: Arc<Tally>,
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.tally.sent.fetch_add(spans, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(event = "otlp.export_failed", spans, error = %e, "OTLP export failed: spans dropped");
                self.tally.failed.fetch_add(spans, Ordering::Relaxed)
            }
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The traces URL for `endpoint`: a collector's base URL gets OTLP's
/// `/v1/traces`; a URL with a path is used as it is.
pub fn traces_url(endpoint: &str) -> String {
    let path = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .split_once('/')
        .map_or("", |(_, path)| path);
    if path.is_empty() {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_string()
    }
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `[supervisor] otlp_endpoint`.
    pub endpoint: String,
    /// `otlp_export_timeout`: how long one export may wait on the collector
    /// (on the exporter's thread).
    pub export_timeout: Duration,
    /// `otlp_flush_timeout`: how long a stop or an exec-mode upgrade waits
    /// for what is batched.
    pub flush_timeout: Duration,
}

/// A tracer exporting as `settings` say, and the exporter that owns it.
pub fn tracer(settings: &Settings) -> anyhow::Result<(Tracer, Export)> {
    let url = traces_url(&settings.endpoint);
    let tally = Arc::new(Tally::default());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client::Client::new(settings.export_timeout))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(&url)
        .with_timeout(settings.export_timeout)
        .build()
        .with_context(|| format!("creating the OTLP exporter for {url}"))?;
    let exporter = Counting {
        inner: exporter,
        tally: tally.clone(),
    };
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(QUEUE)
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("baton")
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Counted {
            inner: batch,
            tally: tally.clone(),
        })
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("baton");
    Ok((
        tracer,
        Export {
            provider,
            tally,
            flush_timeout: settings.flush_timeout,
        },
    ))
}

impl Export {
    /// Sends what is batched and stops the exporter (at exit, or before an
    /// in-place upgrade's exec), waiting at most `otlp_flush_timeout`: what
    /// is not sent by then is dropped, counted and logged.
    pub fn shutdown(&self) {
        let provider = self.provider.clone();
        let timeout = self.flush_timeout;
        let (done, result) = std::sync::mpsc::channel();
        // The exporter's own wait is bounded by `timeout`; on a thread of
        // its own, it cannot hold the master longer even if it overruns.
        // Should it hang, it is left behind: exit or exec ends it.
        std::thread::spawn(move || {
            let _ = done.send(provider.shutdown_with_timeout(timeout));
        });
        let outcome = result.recv_timeout(timeout + Duration::from_millis(50));
        let unsent = self.tally.pending();
        if !matches!(outcome, Ok(Ok(()))) && unsent > 0 {
            self.tally.abandoned.fetch_add(unsent, Ordering::Relaxed);
        }
        match outcome {
            Ok(Ok(())) | Ok(Err(opentelemetry_sdk::error::OTelSdkError::AlreadyShutdown)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "the trace exporter's shutdown"),
            Err(_) => tracing::debug!("the trace exporter's shutdown did not return"),
        }
        let dropped = self.tally.dropped();
        if dropped > 0 {
            tracing::warn!(
                event = "otlp.spans_dropped",
                dropped,
                unsent_at_exit = self.tally.abandoned.load(Ordering::Relaxed),
                failed = self.tally.failed.load(Ordering::Relaxed),
                queue_full = self.tally.overflowed.load(Ordering::Relaxed),
                flush_timeout_ms = timeout.as_millis() as u64,
                "OTLP spans were not sent"
            );
        }
    }

    /// Spans not sent so far: export failed or timed out, queue full, or
    /// left unsent when the flush at exit ran out of time.
    pub fn dropped(&self) -> u64 {
        self.tally.dropped()
    }
}

/// `span`'s W3C `traceparent` (`00-TRACE-SPAN-FLAGS`), when it is exported.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gets_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector/custom/traces"),
            "http://collector/custom/traces"
        );
    }
}
