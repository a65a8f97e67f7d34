//! A master's link to the master before it and the one after it across a
//! binary upgrade: the one owner of what a handover keeps.
//!
//! A new master started by an upgrade is *taking over* from the old one
//! until the old master hands over (or vanishes), and keeps the old
//! master's generation sockets on the ports until the old master has
//! exited. An old master whose upgrade committed in child mode has a
//! *successor*: a child of its own that must outlive it.

use super::handoff::{report_failure, NewMessage, OldMessage};
use baton_wire::channel::Channel;
use nix::unistd::Pid;
use std::rc::Rc;
use std::sync::Arc;

/// See the [module documentation](self).
#[derive(Default)]
pub struct Lineage {
    /// In a new master: the old master, until it hands over.
    takeover: Option<Takeover>,
    /// In a new master: lives until the old master has exited; the old
    /// master's generation sockets are kept on the ports until then.
    old_master: Option<Rc<()>>,
    /// After a committed upgrade (child mode): the new master.
    successor: Option<Pid>,
}

/// A new master's link to the old one until the handover.
struct Takeover {
    channel: Arc<Channel>,
    old_pid: u32,
    ready_sent: bool,
    reader: tokio::task::AbortHandle,
}

impl Drop for Takeover {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Lineage {
    /// Starts taking over from old master `old_pid`, which speaks on
    /// `channel` (read by `reader` into the event loop).
    pub fn take_over_from(
        &mut self,
        old_pid: u32,
        channel: Arc<Channel>,
        reader: tokio::task::AbortHandle,
    ) {
        self.takeover = Some(Takeover {
            channel,
            old_pid,
            ready_sent: false,
            reader,
        });
    }

    /// Whether this master is still taking over (the old one has not
    /// handed over yet).
    pub fn taking_over(&self) -> bool {
        self.takeover.is_some()
    }

    /// Tells the old master, if this one is taking over from one, that it
    /// failed in `phase`, so that `baton upgrade` shows why.
    pub fn report_failure(&self, phase: &str, reason: &str) {
        if let Some(takeover) = &self.takeover {
            report_failure(&takeover.channel, phase, reason);
        }
    }

    /// Tells the old master this one serves, once: `ready` makes the
    /// message.
    pub fn report_ready(&mut self, ready: impl FnOnce() -> NewMessage) {
        let Some(takeover) = self.takeover.as_mut().filter(|t| !t.ready_sent) else {
            return;
        };
        takeover.ready_sent = true;
        if let Err(e) = takeover.channel.try_send(&ready(), &[]) {
            tracing::warn!(error = %e, "cannot tell the old master this one is ready");
        }
    }

    /// What the old master said (`None`: it is gone). True when this
    /// master now takes over the control socket and the pid file.
    pub fn on_old_master(&mut self, message: Option<OldMessage>) -> bool {
        let Some(takeover) = &self.takeover else {
            return false;
        };
        let old_pid = takeover.old_pid;
        match message {
            Some(OldMessage::Handover {}) => {
                tracing::info!(old_pid, "old master handed over")
            }
            None if takeover.ready_sent => {
                tracing::warn!(old_pid, "old master gone before the handover; taking over")
            }
            // Not ready yet and nobody to hand over: keep starting, and
            // take over when ready.
            None => tracing::warn!(old_pid, "old master gone during the upgrade; taking over"),
            Some(other) => {
                tracing::warn!(message = ?other, "unexpected message from the old master ignored");
                return false;
            }
        }
        self.takeover = None;
        true
    }

    /// Keeps `token` (and with it the old master's generation sockets on
    /// the ports) until [`Lineage::old_master_exited`].
    pub fn keep_old_sockets(&mut self, token: Rc<()>) {
        self.old_master = Some(token);
    }

    /// The old master has exited: its sockets may go.
    pub fn old_master_exited(&mut self) {
        self.old_master = None;
    }

    /// This master's upgrade committed: `pid` is the new master, which
    /// serves from now on.
    pub fn hand_over_to(&mut self, pid: Pid) {
        self.successor = Some(pid);
    }

    /// The new master this one handed over to, if it did.
    pub fn successor(&self) -> Option<Pid> {
        self.successor
    }
}
