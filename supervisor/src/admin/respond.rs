//! What the admin endpoint asks the master, and the answers it gets (see
//! `master/requests.rs`).

/// What was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/metrics`, in OpenMetrics or else the classic text format.
    Metrics {
        /// The scraper accepts OpenMetrics.
        openmetrics: bool,
    },
    /// `/healthz`.
    Healthz,
    /// `/readyz`.
    Readyz,
    /// `/status`.
    Status,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Answer {
    /// A plain-text answer.
    pub fn text(status: u16, body: String) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}
