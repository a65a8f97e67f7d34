//! What the master does when a transaction decides: the transaction types
//! ([`Rollout`], ...) decide and act on the parts they are given; the
//! master moves the operation on and records how it ended.

use super::{Master, Stop, Waiter};
use crate::audit::Requester;
use crate::children::Owner;
use crate::config::Config;
use crate::control::protocol::Reply;
use crate::inplace::{Advance, InPlace, Move};
use crate::operation::Operation;
use crate::operation::{Admission, Ask, Facts};
use crate::reload::{Ended, Started, Trigger};
use crate::rollout::{Cutover, Rollout};
use crate::upgrade::handoff::NewMessage;
use crate::upgrade::{ChildExit, Start, Upgrade};
use baton_wire::channel::ChannelError;
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

    /// SIGUSR2 or `baton upgrade`.
    pub fn request_upgrade(&mut self, waiter: Option<Waiter>, by: Option<&Requester>) {
        let facts = Facts {
            serving: self.fleet.current_number().is_some(),
            spawns_pending: self.spawns_pending(),
        };
        if let Admission::Refuse(reason) = self.operation.summary().admit(Ask::Upgrade, facts) {
            tracing::error!(event = "upgrade.refused", %reason, "upgrade refused");
            if let Some(waiter) = waiter {
                let _ = waiter.send(Reply::error(format!("upgrade refused: {reason}")));
            }
            return;
        }
        let in_place = crate::upgrade::exec::in_place(&self.config);
        let span = tracing::info_span!("upgrade", binary = %self.program.path.display(), in_place);
        let _enter = span.enter();
        match by {
            Some(by) => {
                tracing::info!(event = "upgrade.started", requested_by = %by, "upgrade started")
            }
            None => tracing::info!(event = "upgrade.started", "upgrade started"),
        }
        let start = Start {
            program: &self.program,
            config: &self.config.path,
            fleet: &self.fleet,
            endpoints: &self.endpoints,
            events: &self.events,
        };
        let timeout = self.config.supervisor.upgrade_timeout.0;
        let upgrade = match Upgrade::start(start, in_place, timeout, waiter.into_iter().collect()) {
            Ok(upgrade) => upgrade,
            Err((phase, e, waiters)) => {
                let reason = format!("{e:#}");
                tracing::error!(event = "upgrade.failed", phase, %reason, "upgrade failed; this master keeps serving");
                self.metrics.upgrade("failed");
                for waiter in waiters {
                    let _ = waiter.send(Reply::error(format!(
                        "upgrade failed in phase {phase}: {reason}"
                    )));
                }
                return;
            }
        };
        let child = Pid::from_raw(upgrade.child());
        self.children.register(child, Owner::Upgrade);
        self.operation.begin(Operation::Upgrading(upgrade));
        if in_place {
            tracing::info!(check_pid = child.as_raw(), "checking the new binary");
            return;
        }
        self.endpoints.pid_file_to_oldbin();
        tracing::info!(new_pid = child.as_raw(), "new master started");
    }

    /// A message from the new master.
    pub(crate) fn on_upgrade_message(&mut self, message: Result<NewMessage, ChannelError>) {
        match message {
            Ok(NewMessage::Ready {
                pid,
                generation,
                steered,
            }) => self.complete_upgrade(pid, generation, &steered),
            Ok(NewMessage::Failed { phase, reason }) => {
                self.fail_upgrade(&phase, format!("the new master gave up: {reason}"))
            }
            Err(e) => {
                self.fail_upgrade("handshake", format!("bad message from the new master: {e}"))
            }
        }
    }

    /// The new master serves: hand over the control socket and the pid
    /// file, and drain every generation of this master.
    fn complete_upgrade(&mut self, new_pid: u32, generation: u64, steered: &[String]) {
        if !self
            .operation
            .upgrade()
            .is_some_and(Upgrade::awaits_new_master)
        {
            return;
        }
        // Release the control socket first: the new master binds it when it
        // hears the handover.
        self.endpoints.hand_over();
        for listener in self.fleet.sockets() {
            listener.hand_over();
        }
        if let Some(mut upgrade) = self.operation.take_upgrade() {
            upgrade.commit(new_pid, generation);
        }
        crate::sd_notify::notify(&format!("MAINPID={new_pid}\nREADY=1"));
        // The new master is on its own now; this one drains and exits. What
        // is queued on the sockets the new master steered away from is
        // accepted first: this master's generation sockets, and listeners
        // the new generation has sockets of its own on.
        self.lineage.hand_over_to(Pid::from_raw(new_pid as i32));
        self.fleet.hand_over_current(|s| {
            s.steerable() && (s.primary().is_some() || steered.contains(&s.info.name))
        });
        self.stop(Stop::Graceful, None);
    }

    /// Stops what the upgrade started and keeps serving.
    fn fail_upgrade(&mut self, phase: &str, reason: String) {
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return;
        };
        if upgrade.fail(&self.fleet, phase, &reason) {
            self.metrics.upgrade("failed");
            self.endpoints.restore_pid_file();
        }
    }

    /// The upgrade's child exited: a passed check leads to the exec;
    /// anything else fails.
    pub(crate) fn upgrade_child_exited(&mut self, pid: Pid, status: &str, success: bool) {
        let Some(upgrade) = self.operation.upgrade() else {
            return;
        };
        if upgrade.child() != pid.as_raw() {
            return;
        }
        // Its last words may still be queued behind the exit.
        if let Some(last) = upgrade.last_words() {
            self.on_upgrade_message(Ok(last));
        }
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return;
        };
        match upgrade.child_exited(status, success) {
            ChildExit::Exec => self.endpoints.pause_admin(),
            ChildExit::Failed(phase, reason) => {
                let in_place = upgrade.in_place();
                self.fail_upgrade(phase, reason);
                if !in_place {
                    tracing::info!(pid = pid.as_raw(), %status, "upgrade child exited");
                }
                self.operation.take_upgrade();
            }
            ChildExit::Gone => {
                self.operation.take_upgrade();
            }
        }
    }

    /// `upgrade_timeout` passed before the new master was ready.
    pub(crate) fn upgrade_timed_out(&mut self) {
        let timeout = self.config.supervisor.upgrade_timeout.0;
        self.fail_upgrade(
            "handshake",
            format!("the new master was not ready within upgrade_timeout ({timeout:?})"),
        );
    }

    /// In place: the replies are written; the new image replaces this one
    /// (this returns only if the exec failed, and this master keeps
    /// serving).
    pub(crate) fn exec_upgrade(&mut self) {
        let Some(upgrade) = self.operation.take_upgrade() else {
            return;
        };
        let Some(binary) = upgrade.binary() else {
            return;
        };
        // The new image starts a guardian of its own.
        if let Some(guardian) = self.children.guardian() {
            guardian.release();
        }
        let image = crate::upgrade::exec::Image {
            program: &self.program,
            config: &self.config.path,
            endpoints: &self.endpoints,
            log: &self.log,
        };
        let error = crate::upgrade::exec::exec_in_place(binary, &self.fleet, image)
            .expect_err("exec returns only on failure");
        tracing::error!(error = %format!("{error:#}"), "upgrade failed; this master keeps serving");
        self.metrics.upgrade("failed");
        self.endpoints.serve_admin();
        self.children.start_guardian();
        self.guard_every_worker();
    }

    /// A failed upgrade's child had its grace: killed.
    pub(crate) fn kill_upgrade_child(&mut self) {
        if let Some(upgrade) = self.operation.upgrade_mut() {
            upgrade.kill_child();
        }
    }

    /// A stop during an upgrade abandons it: one waiting for its new
    /// master fails (the child is stopped); an in-place upgrade about to
    /// exec does not exec (a new image would not know it was stopping),
    /// and the admin endpoint, paused for the exec, serves again.
    pub(crate) fn abandon_upgrade(&mut self) {
        if self.operation.upgrade().is_some_and(Upgrade::execs) {
            self.operation.take_upgrade();
            tracing::error!(
                event = "upgrade.failed",
                phase = "exec",
                reason = "the master is stopping",
                "upgrade cancelled before its exec; this master stops"
            );
            self.metrics.upgrade("failed");
            self.endpoints.serve_admin();
            return;
        }
        self.fail_upgrade("handshake", "the old master is stopping".into());
    }
}
