//! The drain signal: fires once, when the master (or, standalone, SIGTERM)
//! tells the worker to stop accepting and finish.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Cloneable handle on the worker's drain state.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Drain {
    /// A drain signal that has not fired.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Starts draining with `within` left until the deadline. Later calls only
    /// move the deadline earlier.
    pub fn start(&self, within: Duration) {
        let deadline = Instant::now() + within;
        {
            let mut slot = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(slot.map_or(deadline, |d| d.min(deadline)));
        }
        self.token.cancel();
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when draining starts; returns the deadline by which the
    /// worker must have exited.
    pub async fn wait(&self) -> Instant {
        self.token.cancelled().await;
        self.deadline().unwrap_or_else(Instant::now)
    }

    /// The deadline, once draining.
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token cancelled when draining starts, for `select!` or to hand to
    /// code that already speaks `tokio_util`.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}
