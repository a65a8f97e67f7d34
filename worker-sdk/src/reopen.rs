//! Reopen requests: the master's `baton reopen` (or SIGUSR1 standalone) asks
//! workers to reopen their log files, e.g. after logrotate moved them.

use tokio::sync::watch;

/// A stream of reopen requests; clone it for each task that cares.
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
    pub async fn requested(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

pub(crate) fn request(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n += 1);
}
