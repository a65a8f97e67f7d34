//! What the master does when a transaction decides: the transaction types
//! ([`Rollout`], ...) decide and act on the parts they are given; the
//! master moves the operation on and records how it ended.

use super::Master;
use crate::operation::Operation;
use crate::reload::Ended;
use crate::rollout::{Cutover, Rollout};

impl Master {
    /// Records how a transaction ended (see `record`), and lets go of the
    /// generations it finished.
    pub(crate) fn end(&mut self, ended: Ended) {
        let Ended {
            generation,
            trigger,
            requested_by,
            phases,
            failure,
        } = ended;
        self.record(generation, trigger, requested_by, phases, failure);
        self.reap_finished_generations();
    }

    /// At commit: probation when the reload asks for it, else it settles.
    pub(crate) fn cut_over(&mut self, reload: crate::reload::Reload) {
        match Rollout::begin(reload, &mut self.fleet) {
            Cutover::Probation(rollout) => self.operation.begin(Operation::Probation(rollout)),
            Cutover::Settle(reload) => self.settle(reload),
        }
    }

    /// Ends probation with the new generation in service: the reload
    /// settles. Returns whether there was one.
    pub(crate) fn promote(&mut self) -> bool {
        let Some(rollout) = self.operation.take_rollout() else {
            return false;
        };
        self.settle(rollout.promote());
        true
    }

    /// Rolls the probation back because of `reason`. Returns whether there
    /// was one.
    pub(crate) fn roll_back(&mut self, reason: &str) -> bool {
        let Some(rollout) = self.operation.take_rollout() else {
            return false;
        };
        self.probing = None;
        let ended = rollout.roll_back(&mut self.fleet, reason);
        self.end(ended);
        true
    }

    /// A worker of the generation on probation exited (`exited` says which,
    /// and how): that rolls back (see
    /// [`crate::operation::Summary::on_worker_exit`]).
    pub(crate) fn roll_back_on_exit(&mut self, exited: &str) {
        if let Some(reason) = self.operation.rollout().map(|r| r.exit_reason(exited)) {
            self.roll_back(&reason);
        }
    }

    /// A probe of the generation on probation failed: past
    /// `probation_failures` in a row, that rolls back.
    pub(crate) fn probe_failed(&mut self) {
        let reason = self
            .operation
            .rollout()
            .zip(self.probing.as_ref())
            .and_then(|(rollout, probing)| rollout.probes_failed(probing));
        if let Some(reason) = reason {
            self.roll_back(&reason);
        }
    }
}
