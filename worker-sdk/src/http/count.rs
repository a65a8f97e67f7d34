//! The open-connection count, reported to
//! [`ServeOptions::on_connections`](super::ServeOptions::on_connections) at
//! most once per [`REPORT_INTERVAL`].

use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};

/// The least time between two reports.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

pub(super) type Hook = Arc<dyn Fn(u64) + Send + Sync>;

pub(super) struct ConnectionCount {
    hook: Option<Hook>,
    current: u64,
    reported: Option<u64>,
    next_report: Instant,
}

impl ConnectionCount {
    pub(super) fn new(hook: Option<Hook>) -> ConnectionCount {
        ConnectionCount {
            hook,
            current: 0,
            reported: None,
            next_report: Instant::now(),
        }
    }

    pub(super) fn set(&mut self, count: usize) {
        self.current = count as u64;
        if Instant::now() >= self.next_report {
            self.flush();
        }
    }

    fn pending(&self) -> bool {
        self.hook.is_some() && self.reported != Some(self.current)
    }

    pub(super) fn flush(&mut self) {
        if let (Some(hook), true) = (&self.hook, self.pending()) {
            hook(self.current);
            self.reported = Some(self.current);
            self.next_report = Instant::now() + REPORT_INTERVAL;
        }
    }

    /// Completes when a change held back by the throttle is due.
    pub(super) async fn due(&self) {
        if self.pending() {
            sleep_until(self.next_report).await;
        } else {
            std::future::pending::<()>().await;
        }
    }
}
