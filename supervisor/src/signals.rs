//! Signals as events of the master's loop.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// What a signal asks of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// HUP.
    Reload,
    /// USR2.
    Upgrade,
    /// QUIT.
    GracefulStop,
    /// TERM: graceful or fast, as `[supervisor] sigterm` says.
    Terminate,
    /// INT (a terminal's Ctrl-C).
    Interrupt,
    /// USR1.
    Reopen,
    /// TTIN.
    ScaleUp,
    /// TTOU.
    ScaleDown,
    /// CHLD: a child changed state.
    Child,
}

/// The master's signal streams. Installing them replaces the default actions
/// (TTIN/TTOU would stop the process, USR1/USR2 would kill it).
pub struct Signals {
    streams: Vec<(Signal, SignalEvent)>,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> std::io::Result<Signals> {
        let table = [
            (SignalKind::hangup(), SignalEvent::Reload),
            (SignalKind::user_defined2(), SignalEvent::Upgrade),
            (SignalKind::quit(), SignalEvent::GracefulStop),
            (SignalKind::terminate(), SignalEvent::Terminate),
            (SignalKind::interrupt(), SignalEvent::Interrupt),
            (SignalKind::user_defined1(), SignalEvent::Reopen),
            (SignalKind::from_raw(libc::SIGTTIN), SignalEvent::ScaleUp),
            (SignalKind::from_raw(libc::SIGTTOU), SignalEvent::ScaleDown),
            (SignalKind::child(), SignalEvent::Child),
        ];
        let mut streams = Vec::with_capacity(table.len());
        for (kind, event) in table {
            streams.push((signal(kind)?, event));
        }
        Ok(Signals { streams })
    }

    /// The next signal. Child exits come first so that a worker's death is
    /// known before a reload or stop decides anything.
    pub async fn recv(&mut self) -> SignalEvent {
        std::future::poll_fn(|cx| {
            for (stream, event) in self.streams.iter_mut().rev() {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*event);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
