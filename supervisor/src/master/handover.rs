//! The master's side of connection handovers (see [`crate::handover`]):
//! passing a draining worker's idle connections to a worker of the current
//! generation, and each answer back.

use super::Master;
use crate::handover::Pending;
use crate::worker::State;
use baton_wire::protocol::{HandedConnection, MasterMessage, WorkerMessage};
use nix::unistd::Pid;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// A handover as it arrived.
pub(super) struct Offer {
    /// The offering worker's id for it.
    pub(super) id: u64,
    /// The listener's address.
    pub(super) address: String,
    /// Each connection's pending bytes.
    pub(super) connections: Vec<HandedConnection>,
    /// Their sockets.
    pub(super) fds: Vec<OwnedFd>,
    /// Whether some sockets were lost on the way (this master's fd limit).
    pub(super) fds_truncated: bool,
}

impl Master {
    /// A message about handovers from worker `pid` of `generation`.
    pub(super) fn on_handover(
        &mut self,
        pid: Pid,
        generation: u64,
        message: WorkerMessage,
        fds: Vec<OwnedFd>,
        fds_truncated: bool,
    ) {
        match message {
            WorkerMessage::Adopts { address } => {
                tracing::debug!(generation, pid = pid.as_raw(), %address, "worker takes connections handed over");
                self.handovers.adopts(pid, address);
            }
            WorkerMessage::Handover {
                id,
                address,
                connections,
            } => {
                let offer = Offer {
                    id,
                    address,
                    connections,
                    fds,
                    fds_truncated,
                };
                self.pass_on(pid, generation, offer);
            }
            WorkerMessage::Adopted { id } => self.adoption_answered(pid, id, None),
            WorkerMessage::AdoptRefused { id, reason } => {
                self.adoption_answered(pid, id, Some(reason))
            }
            WorkerMessage::ClosedAtDrain { count } => {
                let more = self.handovers.closed_at_drain(pid, generation, count);
                self.metrics.connections_closed_at_drain.inc_by(more);
            }
            _ => {}
        }
    }

    /// Passes worker `from`'s offer to a worker of the current generation
    /// that takes connections on its listener, or refuses it.
    fn pass_on(&mut self, from: Pid, generation: u64, offer: Offer) {
        let count = offer.connections.len() as u64;
        let refuse = |master: &mut Master, reason: String| {
            tracing::info!(
                event = "connections.handover_refused",
                generation,
                pid = from.as_raw(),
                connections = count,
                %reason,
                "connections not handed over: the worker closes them between requests"
            );
            let answer = MasterMessage::HandoverRefused {
                id: offer.id,
                reason,
            };
            master.tell_worker(from, &answer);
        };
        if offer.fds_truncated {
            return refuse(
                self,
                "their sockets did not reach the master (at its fd limit)".into(),
            );
        }
        if offer.fds.len() != offer.connections.len() {
            let reason = format!("{count} connections came with {} sockets", offer.fds.len());
            return refuse(self, reason);
        }
        let Some(current) = self.fleet.current() else {
            return refuse(self, "no generation serves".into());
        };
        let number = current.number();
        if !current.config().worker.handover {
            return refuse(
                self,
                format!("generation {number} has [worker] handover = false"),
            );
        }
        let candidates: Vec<Pid> = current
            .workers()
            .values()
            .filter(|w| {
                w.pid() != from
                    && w.state() == State::Ready
                    && w.channel().is_some()
                    && self.handovers.takes(w.pid(), &offer.address)
            })
            .map(|w| w.pid())
            .collect();
        let Some(to) = self.handovers.choose(&candidates) else {
            let reason = format!(
                "no ready worker of generation {number} takes connections on {}",
                offer.address
            );
            return refuse(self, reason);
        };
        let Some(channel) = current
            .workers()
            .get(&to)
            .and_then(|w| w.channel())
            .cloned()
        else {
            return refuse(self, format!("worker pid {to} has no channel"));
        };
        let id = self.handovers.passed(Pending {
            from,
            id: offer.id,
            count,
            generation,
            to,
        });
        let fds: Vec<BorrowedFd<'_>> = offer.fds.iter().map(|fd| fd.as_fd()).collect();
        let adopt = MasterMessage::Adopt {
            id,
            address: offer.address.clone(),
            connections: offer.connections.clone(),
        };
        if let Err(e) = channel.try_send(&adopt, &fds) {
            self.handovers.answered(to, id, false);
            return refuse(self, format!("sending them to worker pid {to}: {e}"));
        }
        // The master's copies go; the taker and the offerer hold theirs.
        drop(fds);
    }

    /// Worker `to` answered handover `id`: tells the offerer.
    fn adoption_answered(&mut self, to: Pid, id: u64, refused: Option<String>) {
        let Some(pending) = self.handovers.answered(to, id, refused.is_none()) else {
            return;
        };
        let answer = match refused {
            None => {
                self.metrics.connections_handed_over.inc_by(pending.count);
                tracing::info!(
                    event = "connections.handed_over",
                    generation = pending.generation,
                    pid = pending.from.as_raw(),
                    to = to.as_raw(),
                    connections = pending.count,
                    "idle connections handed over to the current generation"
                );
                MasterMessage::HandedOver { id: pending.id }
            }
            Some(reason) => {
                tracing::info!(
                    event = "connections.handover_refused",
                    generation = pending.generation,
                    pid = pending.from.as_raw(),
                    connections = pending.count,
                    %reason,
                    "connections not handed over: the worker closes them between requests"
                );
                MasterMessage::HandoverRefused {
                    id: pending.id,
                    reason: format!("worker pid {to}: {reason}"),
                }
            }
        };
        self.tell_worker(pending.from, &answer);
    }

    /// Worker `pid` exited: handovers it had not answered are refused.
    pub(super) fn handovers_of_exited(&mut self, pid: Pid) {
        for pending in self.handovers.worker_gone(pid) {
            let answer = MasterMessage::HandoverRefused {
                id: pending.id,
                reason: format!("worker pid {pid} exited before taking them"),
            };
            self.tell_worker(pending.from, &answer);
        }
    }

    /// Sends `message` to worker `pid`, wherever it is, if it can hear.
    fn tell_worker(&self, pid: Pid, message: &MasterMessage) {
        let channel = self
            .fleet
            .iter()
            .find_map(|g| g.workers().get(&pid))
            .and_then(|w| w.channel());
        if let Some(channel) = channel {
            if let Err(e) = channel.try_send(message, &[]) {
                tracing::warn!(pid = pid.as_raw(), error = %e, "cannot answer the worker's handover");
            }
        }
    }
}
