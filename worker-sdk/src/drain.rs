//! The drain signal: fires once, when the master (or, standalone, SIGTERM)
//! tells the worker to stop accepting and finish.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// When to stop accepting and finish: the master's drain request (or,
/// standalone, SIGTERM or SIGINT), with the deadline by which the worker
/// must have exited. Cheap to clone; every clone sees the same drain.
///
/// ```no_run
/// # async fn run(worker: baton_worker::Worker, listener: tokio::net::TcpListener) {
/// let drain = worker.drain();
/// loop {
///     tokio::select! {
///         _ = drain.wait() => break,
///         Ok((stream, _)) = listener.accept() => { /* serve it in a task */ }
///     }
/// }
/// // Stop accepting; finish what is open before `drain.deadline()`.
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Drain {
    token: CancellationToken,
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Drain {
    /// A drain signal that has not fired.
    pub(crate) fn new() -> Drain {
        Drain {
            token: CancellationToken::new(),
            deadline: Arc::default(),
        }
    }

    /// Starts draining with `within` left until the deadline. Later calls only
    /// move the deadline earlier.
    pub(crate) fn start(&self, within: Duration) {
        let deadline = Instant::now() + within;
        {
            let mut slot = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(slot.map_or(deadline, |d| d.min(deadline)));
        }
        self.token.cancel();
    }

    /// Whether draining has started.
    ///
    /// ```no_run
    /// # fn accept_one(drain: &baton_worker::Drain) {
    /// if !drain.is_draining() {
    ///     // still taking new work
    /// }
    /// # }
    /// ```
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when draining starts; returns the deadline by which the
    /// worker must have exited.
    ///
    /// ```no_run
    /// # async fn run(worker: baton_worker::Worker) {
    /// let deadline = worker.drain().wait().await;
    /// // Close idle connections now; cut the rest at `deadline`.
    /// tokio::time::sleep_until(deadline).await;
    /// # }
    /// ```
    pub async fn wait(&self) -> Instant {
        self.token.cancelled().await;
        self.deadline().unwrap_or_else(Instant::now)
    }

    /// The deadline, once draining.
    ///
    /// ```no_run
    /// # fn left(drain: &baton_worker::Drain) {
    /// if let Some(deadline) = drain.deadline() {
    ///     let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    ///     println!("draining, {left:?} left");
    /// }
    /// # }
    /// ```
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A token cancelled when draining starts, for `select!` or to hand to
    /// code that already speaks `tokio_util`.
    ///
    /// ```no_run
    /// # async fn run(worker: baton_worker::Worker) {
    /// let token = worker.drain().token();
    /// tokio::spawn(async move {
    ///     token.cancelled().await;
    ///     // stop a background job
    /// });
    /// # }
    /// ```
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_drain_only_moves_the_deadline_earlier() {
        let drain = Drain::new();
        assert!(!drain.is_draining());
        assert_eq!(drain.deadline(), None);
        drain.start(Duration::from_secs(10));
        let first = drain.wait().await;
        drain.start(Duration::from_secs(60));
        assert_eq!(drain.deadline(), Some(first));
        drain.start(Duration::from_secs(1));
        assert!(drain.deadline().unwrap() < first);
        assert!(drain.token().is_cancelled());
    }
}
