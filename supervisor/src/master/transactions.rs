//! What the master does when a transaction decides: the transaction types
//! ([`Rollout`], ...) decide and act on the parts they are given; the
//! master moves the operation on and records how it ended.

use super::Master;
use crate::config::Config;
use crate::inplace::{Advance, InPlace, Move};
use crate::operation::Operation;
use crate::reload::{Ended, Started, Trigger};
use crate::rollout::{Cutover, Rollout};
use baton_wire::protocol::WorkerMessage;
use nix::unistd::Pid;
use std::rc::Rc;
use std::time::Duration;
use tracing::Span;

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

    /// Starts the in-place reload of generation `number` to `config` (see
    /// [`crate::inplace`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn begin_in_place(
        &mut self,
        trigger: Trigger,
        requested_by: Option<crate::audit::Requester>,
        number: u64,
        config: Rc<Config>,
        span: Span,
        validated: Duration,
    ) {
        let begun = InPlace::begin(
            &mut self.fleet,
            trigger,
            requested_by,
            number,
            config,
            span,
            validated,
        );
        match begun {
            Started::Running(transaction) => self.operation.begin(Operation::InPlace(transaction)),
            Started::Ended(ended) => self.end(ended),
        }
    }

    /// A worker answered prepare or commit.
    pub(crate) fn on_app_answer(&mut self, pid: Pid, answer: WorkerMessage) {
        // It answers: it is not hung, and hears a drain again.
        if let Some(worker) = self.fleet.of_worker(pid).and_then(|g| g.worker_mut(pid)) {
            worker.answer_by(None);
        }
        let Some(transaction) = self.operation.in_place_mut() else {
            return;
        };
        match transaction.on_answer(&mut self.fleet, pid, answer) {
            Some(refusal) => self.abort_in_place(refusal),
            None => self.advance_in_place(),
        }
    }

    /// Worker `pid`, which owed its answer to prepare, exited: the
    /// transaction aborts, for `reason` (see
    /// [`crate::operation::Summary::on_worker_exit`]).
    pub(crate) fn abort_in_place_on_exit(&mut self, pid: Pid, reason: String) {
        if let Some(transaction) = self.operation.in_place_mut() {
            transaction.stop_waiting_for(pid);
            self.abort_in_place(reason);
        }
    }

    /// Worker `pid`, which owed its answer to commit, exited: it is waited
    /// for no more (its respawn starts with the committed version).
    pub(crate) fn stop_waiting_for(&mut self, pid: Pid) {
        if let Some(transaction) = self.operation.in_place_mut() {
            transaction.stop_waiting_for(pid);
        }
        self.advance_in_place();
    }

    /// Moves the in-place reload on when every answer is in.
    pub(crate) fn advance_in_place(&mut self) {
        if let Some(next) = self.operation.in_place().map(InPlace::next) {
            self.move_in_place(next);
        }
    }

    /// Does what [`crate::inplace::next_move`] (or the deadline table)
    /// decided.
    pub(crate) fn move_in_place(&mut self, next: Move) {
        let Some(transaction) = self.operation.in_place_mut() else {
            return;
        };
        match transaction.advance(&mut self.fleet, next) {
            Advance::Wait => {}
            Advance::Committing(config) => {
                if config.supervisor.log_filter != self.config.supervisor.log_filter {
                    if let Err(e) = self.log.set_filter(&config.supervisor.log_filter) {
                        tracing::error!(error = %e, "cannot switch log filter");
                    }
                }
                self.config = config;
                self.advance_in_place();
            }
            Advance::Abort(reason) => self.abort_in_place(reason),
            Advance::Finish => {
                let transaction = self.operation.take_in_place().expect("matched above");
                self.end(transaction.finish());
            }
        }
    }

    /// The in-place reload fails for `reason`.
    fn abort_in_place(&mut self, reason: String) {
        if let Some(transaction) = self.operation.take_in_place() {
            let ended = transaction.abort(&mut self.fleet, reason);
            self.end(ended);
        }
    }

    /// The master is stopping: the in-place reload is abandoned (aborted).
    pub(crate) fn abandon_in_place(&mut self) {
        self.abort_in_place("the master is stopping".into());
    }
}
