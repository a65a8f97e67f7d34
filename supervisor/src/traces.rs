//! Reload traces over OTLP: with `[supervisor] otlp_endpoint`, the master's
//! spans (each reload, with a child span per phase) are exported over
//! OTLP/HTTP with protobuf bodies (`opentelemetry-otlp`), batched by the
//! SDK's exporter thread so that the event loop never waits on a collector.
//! New workers get the reload's W3C `TRACEPARENT` in their environment.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exporter, flushed and stopped at exit.
pub struct Export {
    provider: SdkTracerProvider,
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

/// A tracer exporting to `endpoint`, and the exporter that owns it.
pub fn tracer(endpoint: &str) -> anyhow::Result<(Tracer, Export)> {
    let url = traces_url(endpoint);
    // The HTTP client runs a runtime of its own, which may be neither
    // created nor dropped on the master's: build it on a thread.
    let build = move || -> anyhow::Result<SdkTracerProvider> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(&url)
            .with_timeout(std::time::Duration::from_secs(5))
            .build()
            .with_context(|| format!("creating the OTLP exporter for {url}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("baton")
            .build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    };
    let provider = std::thread::spawn(build)
        .join()
        .map_err(|_| anyhow::anyhow!("the OTLP exporter's setup panicked"))??;
    let tracer = provider.tracer("baton");
    Ok((tracer, Export { provider }))
}

impl Export {
    /// Sends what is batched and stops the exporter (at exit, or before an
    /// in-place upgrade's exec).
    pub fn shutdown(&self) {
        let provider = self.provider.clone();
        let done = std::thread::spawn(move || provider.shutdown()).join();
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "cannot flush the trace exporter");
        }
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
