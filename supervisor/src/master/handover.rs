//! The master's side of connection handovers (see [`crate::handover`]):
//! passing a draining worker's idle connections to a worker of the current
//! generation (or, after a binary upgrade, to the new master), and each
//! answer back.

use super::Master;
use crate::handover::{Offerer, Pending, Taker};
use crate::upgrade::handoff::{NewMessage, OldMessage};
use crate::worker::State;
use baton_wire::protocol::{HandedConnection, HandoverOrigin, MasterMessage, WorkerMessage};
use nix::unistd::Pid;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// A handover as it arrived.
pub(super) struct Offer {
    /// The offerer's id for it.
    pub(super) id: u64,
    /// The listener's address.
    pub(super) address: String,
    /// Each connection's pending bytes.
    pub(super) connections: Vec<HandedConnection>,
    /// Their sockets; `None` when some were lost on the way (this master at
    /// its fd limit).
    pub(super) fds: Option<Vec<OwnedFd>>,
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
                if let Some(worker) = self
                    .fleet
                    .get_mut(generation)
                    .and_then(|g| g.worker_mut(pid))
                {
                    worker.adopts(address);
                }
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
                    fds: (!fds_truncated).then_some(fds),
                };
                self.pass_on(Offerer::Worker(pid), Some(generation), offer);
            }
            WorkerMessage::Adopted { id, origin } => {
                self.adoption_answered(Taker::Worker(pid), id, None, origin)
            }
            WorkerMessage::AdoptRefused { id, reason, origin } => {
                self.adoption_answered(Taker::Worker(pid), id, Some(reason), origin)
            }
            WorkerMessage::ClosedAtDrain { count } => {
                let more = self.handovers.closed_at_drain(pid, generation, count);
                self.metrics.connections_closed_at_drain.inc_by(more);
            }
            _ => {}
        }
    }

    /// In a new master: connections of the old master's draining workers.
    pub(super) fn on_old_master_connections(
        &mut self,
        message: OldMessage,
        fds: Option<Vec<OwnedFd>>,
    ) {
        if let OldMessage::Connections {
            id,
            address,
            connections,
        } = message
        {
            let offer = Offer {
                id,
                address,
                connections,
                fds,
            };
            self.pass_on(Offerer::OldMaster, None, offer);
        }
    }

    /// In an old master after a committed upgrade: the new master's answer.
    /// False for any other message.
    pub(super) fn on_new_master_answer(&mut self, message: &NewMessage) -> bool {
        match message {
            NewMessage::HandedOver { id } => {
                self.adoption_answered(Taker::NewMaster, *id, None, None)
            }
            NewMessage::HandoverRefused { id, reason } => {
                self.adoption_answered(Taker::NewMaster, *id, Some(reason.clone()), None)
            }
            _ => return false,
        }
        true
    }

    /// Passes an offer to a worker of the current generation that takes
    /// connections on its listener (after a committed upgrade, to the new
    /// master), or refuses it.
    fn pass_on(&mut self, from: Offerer, generation: Option<u64>, offer: Offer) {
        let count = offer.connections.len() as u64;
        let refuse = |master: &mut Master, reason: String| {
            tracing::info!(
                event = "connections.handover_refused",
                generation,
                connections = count,
                %reason,
                "connections not handed over: the worker closes them between requests"
            );
            master.tell(from, offer.id, Some(reason));
        };
        let Some(fds) = &offer.fds else {
            return refuse(
                self,
                "their sockets did not reach the master (at its fd limit)".into(),
            );
        };
        if fds.len() != offer.connections.len() {
            let reason = format!("{count} connections came with {} sockets", fds.len());
            return refuse(self, reason);
        }
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        let current = self.fleet.current().filter(|g| g.config().worker.handover);
        let candidates: Vec<Pid> = current
            .map(|g| {
                g.workers()
                    .values()
                    .filter(|w| {
                        Offerer::Worker(w.pid()) != from
                            && w.state() == State::Ready
                            && w.channel().is_some()
                            && w.takes(&offer.address)
                    })
                    .map(|w| w.pid())
                    .collect()
            })
            .unwrap_or_default();
        let to = match self.handovers.choose(&candidates) {
            Some(pid) => Taker::Worker(pid),
            None if self.handovers.new_master().is_some() => Taker::NewMaster,
            None => {
                let reason = match current {
                    Some(g) => format!(
                        "no ready worker of generation {} takes connections on {}",
                        g.number(),
                        offer.address
                    ),
                    None => "no generation serves with [worker] handover".into(),
                };
                return refuse(self, reason);
            }
        };
        let id = self.handovers.passed(Pending {
            from,
            id: offer.id,
            count,
            generation,
            to,
        });
        let sent = match to {
            Taker::Worker(pid) => {
                let channel = current
                    .and_then(|g| g.workers().get(&pid))
                    .and_then(|w| w.channel());
                let origin = match from {
                    Offerer::Worker(pid) => Some(HandoverOrigin {
                        pid: pid.as_raw() as u32,
                        id: offer.id,
                    }),
                    Offerer::OldMaster => None,
                };
                let adopt = MasterMessage::Adopt {
                    id,
                    address: offer.address.clone(),
                    connections: offer.connections.clone(),
                    origin,
                };
                channel.map(|c| c.try_send(&adopt, &fds).map_err(|e| e.to_string()))
            }
            Taker::NewMaster => {
                let message = OldMessage::Connections {
                    id,
                    address: offer.address.clone(),
                    connections: offer.connections.clone(),
                };
                let channel = self.handovers.new_master();
                channel.map(|c| c.try_send(&message, &fds).map_err(|e| e.to_string()))
            }
        };
        match sent {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                self.handovers.answered(to, id, false);
                refuse(self, format!("sending them on: {e}"));
            }
            None => {
                self.handovers.answered(to, id, false);
                refuse(self, "their taker has no channel".into());
            }
        }
        // The master's copies go; the taker and the offerer hold theirs.
    }

    /// The taker `to` answered handover `id`: tells the offerer. One this
    /// master did not pass on (the master that did died, or re-executed)
    /// is told to the worker its `origin` names, if it is one of ours.
    fn adoption_answered(
        &mut self,
        to: Taker,
        id: u64,
        refused: Option<String>,
        origin: Option<HandoverOrigin>,
    ) {
        let Some(pending) = self.handovers.answered(to, id, refused.is_none()) else {
            if let Some(origin) = origin {
                self.answer_for_a_previous_master(origin, refused);
            }
            return;
        };
        match &refused {
            None => {
                self.metrics.connections_handed_over.inc_by(pending.count);
                let to = match to {
                    Taker::Worker(pid) => pid.to_string(),
                    Taker::NewMaster => "new_master".into(),
                };
                tracing::info!(
                    event = "connections.handed_over",
                    generation = pending.generation,
                    %to,
                    connections = pending.count,
                    "idle connections handed over to the current generation"
                );
            }
            Some(reason) => {
                tracing::info!(
                    event = "connections.handover_refused",
                    generation = pending.generation,
                    connections = pending.count,
                    %reason,
                    "connections not handed over: the worker closes them between requests"
                );
            }
        }
        self.tell(pending.from, pending.id, refused);
    }

    /// A taker's answer to a handover a previous master passed on: told to
    /// the offering worker, if this master has it.
    fn answer_for_a_previous_master(&mut self, origin: HandoverOrigin, refused: Option<String>) {
        let pid = Pid::from_raw(origin.pid as i32);
        let Some(generation) = self.fleet.of_worker(pid).map(|g| g.number()) else {
            return;
        };
        tracing::info!(
            event = "connections.answer_relayed",
            generation,
            offerer = origin.pid,
            taken = refused.is_none(),
            "a taker answered a handover a previous master passed on: told to the offering worker"
        );
        self.tell(Offerer::Worker(pid), origin.id, refused);
    }

    /// Tells the offerer of handover `id` whether it was taken (`refused`:
    /// why not).
    fn tell(&self, offerer: Offerer, id: u64, refused: Option<String>) {
        let result = match offerer {
            Offerer::Worker(pid) => {
                let message = match refused {
                    None => MasterMessage::HandedOver { id },
                    Some(reason) => MasterMessage::HandoverRefused { id, reason },
                };
                let channel = self
                    .fleet
                    .iter()
                    .find_map(|g| g.workers().get(&pid))
                    .and_then(|w| w.channel());
                channel.map(|c| c.try_send(&message, &[]))
            }
            Offerer::OldMaster => {
                let message = match refused {
                    None => NewMessage::HandedOver { id },
                    Some(reason) => NewMessage::HandoverRefused { id, reason },
                };
                let channel = self.lineage.old_master_channel();
                channel.map(|c| c.try_send(&message, &[]))
            }
        };
        if let Some(Err(e)) = result {
            tracing::warn!(?offerer, error = %e, "cannot answer a handover");
        }
    }

    /// After adopting the workers of a previous master (re-executed, or
    /// dead): tells each SDK worker, whose offers that master had not
    /// answered may have been lost with it (see the SDK's `new_master`).
    pub(super) fn tell_workers_of_new_master(&self) {
        for worker in self.fleet.iter().flat_map(|g| g.workers().values()) {
            if let Some(channel) = worker.channel() {
                if let Err(e) = channel.try_send(&MasterMessage::NewMaster {}, &[]) {
                    tracing::warn!(pid = worker.pid().as_raw(), error = %e, "cannot tell an adopted worker of its new master");
                }
            }
        }
    }

    /// Worker `pid` exited: handovers it had not answered are refused.
    pub(super) fn handovers_of_exited(&mut self, pid: Pid) {
        for pending in self.handovers.worker_gone(pid) {
            let reason = format!("worker pid {pid} exited before taking them");
            self.tell(pending.from, pending.id, Some(reason));
        }
    }
}
