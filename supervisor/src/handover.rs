//! Connections moving between generations: the master's relay between a
//! draining SDK worker that offers its idle HTTP/1.1 connections
//! (`Handover`) and a worker of the current generation that takes them
//! (`Adopt`). The master only passes sockets along; a draining worker keeps
//! its own copy of each until the taker confirmed, so that a connection
//! nobody takes is closed between requests as without a handover.
//!
//! This file holds the relay's state and decisions; `master/handover.rs`
//! does the sending.

use baton_wire::channel::Channel;
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The most generations whose counts are kept: a report that arrives after
/// its generation finished must not grow the map for ever.
const KEPT: usize = 64;

/// Who offered connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offerer {
    /// A draining worker of this master.
    Worker(Pid),
    /// The master this one took over from (a binary upgrade), for its
    /// draining workers.
    OldMaster,
}

/// Who was given connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taker {
    /// A worker of this master's current generation.
    Worker(Pid),
    /// The master this one handed over to (a binary upgrade).
    NewMaster,
}

/// A handover passed on and not yet answered by its taker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Who offered the connections.
    pub from: Offerer,
    /// Its id for the offer.
    pub id: u64,
    /// How many connections.
    pub count: u64,
    /// The generation they come from (`None`: the old master's).
    pub generation: Option<u64>,
    /// Who they went to.
    pub to: Taker,
}

/// The connections of one generation that moved, and those closed at its
/// drain instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Handed over to a worker of a newer generation.
    pub handed_over: u64,
    /// Closed at the drain (told to go) instead.
    pub closed_at_drain: u64,
}

/// The relay's state.
#[derive(Debug, Default)]
pub struct Handovers {
    /// Where the next handover goes among the candidates.
    cursor: usize,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    counts: BTreeMap<u64, Counts>,
    /// Each worker's last total of connections closed at drain.
    closed: HashMap<Pid, u64>,
    /// The last generation that finished having moved or closed any, and
    /// its counts (`baton status`).
    last_finished: Option<(u64, Counts)>,
    /// The `handover` span of each generation draining since a reload, in
    /// that reload's trace: from its drain until it finished.
    spans: HashMap<u64, tracing::Span>,
    /// After a committed upgrade (child mode): the channel to the new
    /// master, where connections no worker here takes go, and the task
    /// reading its answers.
    new_master: Option<(Arc<Channel>, Reader)>,
}

/// A task reading a channel, stopped when dropped.
#[derive(Debug)]
struct Reader(tokio::task::AbortHandle);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Handovers {
    /// The worker of `candidates` (those able to take connections on the
    /// address) that gets the next handover: each in turn.
    pub fn choose(&mut self, candidates: &[Pid]) -> Option<Pid> {
        if candidates.is_empty() {
            return None;
        }
        let chosen = candidates[self.cursor % candidates.len()];
        self.cursor = self.cursor.wrapping_add(1);
        Some(chosen)
    }

    /// Files a handover passed on; the id to send with it.
    pub fn passed(&mut self, pending: Pending) -> u64 {
        self.next_id += 1;
        self.pending.insert(self.next_id, pending);
        self.next_id
    }

    /// The taker answered handover `id`: what it was, if it was one of its.
    pub fn answered(&mut self, to: Taker, id: u64, taken: bool) -> Option<Pending> {
        let pending = self.pending.get(&id).filter(|p| p.to == to)?.clone();
        self.pending.remove(&id);
        if let (true, Some(generation)) = (taken, pending.generation) {
            self.counts_mut(generation).handed_over += pending.count;
        }
        Some(pending)
    }

    /// Worker `pid` is gone: the handovers it had not answered, to refuse
    /// to their offerers (its copies of the sockets died with it).
    pub fn worker_gone(&mut self, pid: Pid) -> Vec<Pending> {
        self.closed.remove(&pid);
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.to == Taker::Worker(pid))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .collect()
    }

    /// Worker `pid` of `generation` has closed `total` connections at its
    /// drain so far: how many more than it said before.
    pub fn closed_at_drain(&mut self, pid: Pid, generation: u64, total: u64) -> u64 {
        let before = self.closed.insert(pid, total).unwrap_or(0);
        let more = total.saturating_sub(before);
        self.counts_mut(generation).closed_at_drain += more;
        more
    }

    /// The counts of `generation`, to add to.
    fn counts_mut(&mut self, generation: u64) -> &mut Counts {
        if !self.counts.contains_key(&generation) && self.counts.len() >= KEPT {
            self.counts.pop_first();
        }
        self.counts.entry(generation).or_default()
    }

    /// The last generation that finished having moved or closed
    /// connections, and its counts.
    pub fn last_finished(&self) -> Option<(u64, Counts)> {
        self.last_finished
    }

    /// The counts of `generation`.
    pub fn counts(&self, generation: u64) -> Counts {
        self.counts.get(&generation).copied().unwrap_or_default()
    }

    /// This master handed over to a new one (child mode) reached on
    /// `channel`, whose answers `reader` forwards: connections no worker
    /// here takes go there.
    pub fn hand_to_new_master(&mut self, channel: Arc<Channel>, reader: tokio::task::AbortHandle) {
        self.new_master = Some((channel, Reader(reader)));
    }

    /// The channel to the new master, after a committed upgrade.
    pub fn new_master(&self) -> Option<&Arc<Channel>> {
        self.new_master.as_ref().map(|(channel, _)| channel)
    }

    /// Generation `generation` drains since `reload` (its span) settled:
    /// its connections' moves show as a `handover` span of that reload.
    pub fn draining(&mut self, generation: u64, reload: &tracing::Span) {
        let span = tracing::info_span!(
            parent: reload,
            "handover",
            generation,
            handed_over = tracing::field::Empty,
            closed_at_drain = tracing::field::Empty,
        );
        self.spans.insert(generation, span);
    }

    /// Generation `generation` has finished: its counts, forgotten, and its
    /// `handover` span ended with them.
    pub fn finished(&mut self, generation: u64) -> Counts {
        let counts = self.counts.remove(&generation).unwrap_or_default();
        if counts != Counts::default() {
            self.last_finished = Some((generation, counts));
        }
        if let Some(span) = self.spans.remove(&generation) {
            span.record("handed_over", counts.handed_over);
            span.record("closed_at_drain", counts.closed_at_drain);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    #[test]
    fn handovers_go_to_each_candidate_in_turn() {
        let mut h = Handovers::default();
        let candidates = [pid(10), pid(11)];
        let chosen: Vec<Pid> = (0..4).filter_map(|_| h.choose(&candidates)).collect();
        assert_eq!(chosen, [pid(10), pid(11), pid(10), pid(11)]);
        assert_eq!(h.choose(&[]), None);
    }

    #[test]
    fn only_the_taker_answers_and_a_taken_handover_counts_for_its_generation() {
        let mut h = Handovers::default();
        let pending = Pending {
            from: Offerer::Worker(pid(1)),
            id: 7,
            count: 3,
            generation: Some(4),
            to: Taker::Worker(pid(2)),
        };
        let id = h.passed(pending.clone());
        assert_eq!(
            h.answered(Taker::Worker(pid(9)), id, true),
            None,
            "not the taker"
        );
        assert_eq!(
            h.answered(Taker::NewMaster, id, true),
            None,
            "not the taker"
        );
        assert_eq!(h.answered(Taker::Worker(pid(2)), id, true), Some(pending));
        assert_eq!(
            h.answered(Taker::Worker(pid(2)), id, true),
            None,
            "answered once"
        );
        assert_eq!(h.counts(4).handed_over, 3);
        let refused = h.passed(Pending {
            from: Offerer::OldMaster,
            id: 8,
            count: 2,
            generation: None,
            to: Taker::Worker(pid(2)),
        });
        h.answered(Taker::Worker(pid(2)), refused, false);
        assert_eq!(h.counts(4).handed_over, 3);
    }

    #[test]
    fn a_taker_gone_leaves_its_handovers_to_be_refused() {
        let mut h = Handovers::default();
        let pending = Pending {
            from: Offerer::Worker(pid(1)),
            id: 1,
            count: 1,
            generation: Some(1),
            to: Taker::Worker(pid(2)),
        };
        h.passed(pending.clone());
        assert_eq!(h.worker_gone(pid(2)), [pending]);
    }

    #[test]
    fn closed_at_drain_adds_what_each_worker_reports_anew() {
        let mut h = Handovers::default();
        assert_eq!(h.closed_at_drain(pid(1), 3, 2), 2);
        assert_eq!(h.closed_at_drain(pid(1), 3, 5), 3);
        assert_eq!(h.closed_at_drain(pid(2), 3, 1), 1);
        assert_eq!(h.counts(3).closed_at_drain, 6);
        assert_eq!(h.finished(3).closed_at_drain, 6);
        assert_eq!(h.counts(3), Counts::default(), "forgotten");
        for generation in 0..KEPT as u64 + 10 {
            h.closed_at_drain(pid(generation as i32 + 10), generation, 1);
        }
        assert_eq!(h.counts.len(), KEPT);
        assert_eq!(h.counts(0), Counts::default(), "the oldest go first");
    }
}
