//! Reopen requests: the master's `baton reopen` (or SIGUSR1 standalone) asks
//! workers to reopen their log files, e.g. after logrotate moved them.

use tokio::sync::watch;

/// A stream of reopen requests; clone it for each task that cares.
///
/// ```no_run
/// # async fn run(worker: baton_worker::Worker) -> std::io::Result<()> {
/// use std::fs::OpenOptions;
/// use std::sync::{Arc, Mutex};
///
/// let open = || OpenOptions::new().create(true).append(true).open("/var/log/app/access.log");
/// let log = Arc::new(Mutex::new(open()?));
/// let mut reopen = worker.reopen();
/// let reopened = log.clone();
/// tokio::spawn(async move {
///     while reopen.requested().await {
///         if let Ok(file) = open() {
///             *reopened.lock().unwrap() = file; // logrotate moved the old one
///         }
///     }
/// });
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Reopen {
    rx: watch::Receiver<u64>,
}

impl Reopen {
    pub(crate) fn channel() -> (watch::Sender<u64>, Reopen) {
        let (tx, rx) = watch::channel(0);
        (tx, Reopen { rx })
    }

    /// Completes at the next reopen request; returns `false` once no more can
    /// come (the control channel is gone).
    ///
    /// ```no_run
    /// # async fn run(worker: baton_worker::Worker) {
    /// let mut reopen = worker.reopen();
    /// while reopen.requested().await {
    ///     // reopen log files
    /// }
    /// // The master is gone: no more requests.
    /// # }
    /// ```
    pub async fn requested(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

pub(crate) fn request(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n += 1);
}
