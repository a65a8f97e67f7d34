//! A master's link to the master before it and the one after it across a
//! binary upgrade: the one owner of what a handover keeps.
//!
//! A new master started by an upgrade is *taking over* from the old one
//! until the old master hands over (or vanishes), and keeps the old
//! master's generation sockets on the ports until the old master has
//! exited. An old master whose upgrade committed in child mode has a
//! *successor*: a child of its own that must outlive it.

use super::handoff::{report_failure, NewMessage, OldMessage, Takeover as Handed};
use crate::fleet::Fleet;
use crate::listener::Shared;
use crate::master::{Event, Events};
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
    /// In a new master: the channel to the old master and its reader, kept
    /// after the handover until the old master exits, for the connections
    /// its draining workers hand over.
    old_channel: Option<(Arc<Channel>, Reader)>,
}

/// A task reading a channel, stopped when dropped.
struct Reader(tokio::task::AbortHandle);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A new master's link to the old one until the handover.
struct Takeover {
    channel: Arc<Channel>,
    old_pid: u32,
    ready_sent: bool,
}

impl Lineage {
    /// In a new master: `fleet` adopts what the old master handed over,
    /// and this master takes over from it: the old master's messages (and
    /// its exit) come to `events`.
    pub fn take_over(&mut self, handed: Handed, fleet: &mut Fleet, events: &Events) {
        tracing::info!(
            old_pid = handed.old_pid,
            listeners = handed.listeners.len(),
            next_generation = handed.next_generation,
            "taking over from the old master"
        );
        let listeners: Vec<Shared> = handed.listeners.into_iter().map(Rc::new).collect();
        // The old master's generation sockets stay on the ports (steered
        // away from) until it is gone.
        let old_master = Rc::new(());
        for (index, layout) in handed.groups {
            if let Err(e) = listeners[index].adopt_group(layout, &[], &old_master) {
                tracing::error!(error = %format!("{e:#}"), "cannot adopt a port group");
            }
        }
        fleet.take_over(listeners, handed.next_generation);
        self.watch_old_master(handed.old_pid, old_master, events);
        let (forward, channel) = (events.clone(), handed.channel.clone());
        let reader = tokio::spawn(async move {
            loop {
                let (message, fds) = match channel.recv::<OldMessage>().await {
                    Ok(Some(received)) if received.fds_truncated => (Some(received.message), None),
                    Ok(Some(received)) => (Some(received.message), Some(received.fds)),
                    // The old master is gone (or broken): take over anyway.
                    Ok(None) | Err(_) => (None, None),
                };
                let last = message.is_none();
                if forward.send(Event::OldMaster { message, fds }).is_err() || last {
                    return;
                }
            }
        })
        .abort_handle();
        self.old_channel = Some((handed.channel.clone(), Reader(reader)));
        self.takeover = Some(Takeover {
            channel: handed.channel,
            old_pid: handed.old_pid,
            ready_sent: false,
        });
    }

    /// Keeps `token` until process `pid` (the old master, not a child of
    /// this one) has exited, which [`Event::OldMasterExited`] says.
    fn watch_old_master(&mut self, pid: u32, token: Rc<()>, events: &Events) {
        self.old_master = Some(token);
        let exited = match crate::steering::pidfd(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(old_pid = pid, error = %e, "cannot watch the old master: its sockets stay open");
                return;
            }
        };
        let events = events.clone();
        tokio::spawn(async move {
            // SAFETY: the pidfd is open, moves into the `AsyncFd` and stays
            // there, unchanged, until the `AsyncFd` is dropped.
            if let Ok(fd) = unsafe { tokio::io::unix::AsyncFd::register(exited) } {
                let _ = fd.readable().await;
            }
            let _ = events.send(Event::OldMasterExited);
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

    /// In a new master: once `fleet`'s first generation serves, tells the
    /// old master, once.
    pub fn report_ready(&mut self, fleet: &Fleet) {
        let Some(generation) = fleet.current_number() else {
            return;
        };
        let Some(takeover) = self.takeover.as_mut().filter(|t| !t.ready_sent) else {
            return;
        };
        takeover.ready_sent = true;
        let ready = NewMessage::Ready {
            pid: std::process::id(),
            generation,
            steered: fleet
                .get(generation)
                .map(|g| {
                    g.listeners()
                        .iter()
                        .filter(|s| s.primary().is_some())
                        .map(|s| s.info.name.clone())
                        .collect()
                })
                .unwrap_or_default(),
        };
        if let Err(e) = takeover.channel.try_send(&ready, &[]) {
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

    /// The old master has exited: its sockets may go.
    pub fn old_master_exited(&mut self) {
        self.old_master = None;
        self.old_channel = None;
    }

    /// In a new master: the channel to the old master, while it lives.
    pub fn old_master_channel(&self) -> Option<&Arc<Channel>> {
        self.old_channel.as_ref().map(|(channel, _)| channel)
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
