//! Child exits: reaping every exited child and handing its exit to what
//! started it (see [`crate::children`]), and what a worker's exit means
//! for its generation (a respawn, a failed reload, a finished drain).

use crate::children::{Exit, Owner};
use crate::fleet::GenerationState;
use crate::master::Master;
use crate::operation::{Exited, ForOperation, ForWorker};
use crate::worker::State;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Children reaped per turn of the event loop: the kernel charges the
/// reaper for the fds an exited child still held, about a millisecond per
/// thousand.
const REAP_CHUNK: usize = 2;

/// Why a worker exited, as the `baton_worker_exits_total` metric counts it.
pub fn exit_reason(generation: GenerationState, worker: State, success: bool) -> &'static str {
    match (generation, worker) {
        (GenerationState::Starting, _) => "failed_start",
        (_, State::Killed) => "killed",
        (_, State::Draining { .. }) => "drained",
        _ if success => "exited",
        _ => "crashed",
    }
}

impl Master {
    /// Collects every exited child.
    pub(crate) fn reap(&mut self) {
        while self.reap_one() {}
    }

    /// Reaps at most [`REAP_CHUNK`] exited children, and leaves the rest
    /// for the next turn of the loop
    /// ([`crate::children::Children::reap_pending`]): reaping a worker
    /// with many fds takes about a millisecond, and a generation's workers
    /// all exit at once at the end of a drain.
    pub(crate) fn reap_some(&mut self) {
        for _ in 0..REAP_CHUNK {
            if !self.reap_one() {
                return self.children.reaped(false);
            }
        }
        self.children.reaped(true);
    }

    /// Reaps one exited child; false when none was left.
    fn reap_one(&mut self) -> bool {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                self.on_exit(pid, format!("exit status {code}"), code == 0)
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                self.on_exit(pid, format!("signal {signal}"), false)
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return false,
            Ok(_) => {}
        }
        true
    }

    /// Child `pid` exited: the exit goes straight to what started it.
    pub(crate) fn on_exit(&mut self, pid: Pid, status: String, success: bool) {
        match self.children.take(pid) {
            Some(Owner::Worker(generation)) => self.worker_exited(generation, pid, status, success),
            Some(Owner::Probe) => {
                let probed = self.probing.as_mut().and_then(|p| {
                    let result = p.exited(pid, &status, success)?;
                    Some((p.generation, result))
                });
                if let Some((generation, result)) = probed {
                    self.probed(generation, result);
                }
            }
            Some(Owner::Upgrade) => {
                self.upgrade_child_exited(pid, &status, success);
            }
            Some(Owner::Guardian) => {
                tracing::warn!(pid = pid.as_raw(), %status, "the guardian exited; starting another");
                self.children.start_guardian();
                self.guard_every_worker();
            }
            // Maybe a worker whose start has not come back to the loop yet.
            None if self.fleet.spawns_pending() => {
                self.children.hold(pid, Exit { status, success })
            }
            // An orphan re-parented to this subreaper, or a child released.
            None => {}
        }
    }

    /// Worker `pid` of generation `number` exited: what that means is
    /// decided by `Summary::on_worker_exit` (see [`crate::operation`]), and
    /// done here.
    fn worker_exited(&mut self, number: u64, pid: Pid, status: String, success: bool) {
        self.children.worker_exited(pid);
        let Some(generation) = self.fleet.get_mut(number) else {
            return;
        };
        let Some(worker) = generation.remove_worker(pid) else {
            return;
        };
        let index = worker.index();
        let reason = exit_reason(generation.state(), worker.state(), success);
        tracing::info!(
            event = "worker.exited",
            generation = number,
            worker = index,
            pid = pid.as_raw(),
            %status,
            state = worker.state().name(),
            "worker exited"
        );
        self.metrics.worker_exited(reason);
        let now = Instant::now();
        let exited = Exited {
            generation: generation.state(),
            draining: matches!(worker.state(), State::Draining { .. } | State::Killed),
            within: index < generation.processes(),
            owed_answer: self.operation.in_place().is_some_and(|t| t.owes(pid)),
            crash_loop: generation.would_crash_loop(index, now),
        };
        let reaction = self.operation.summary().on_worker_exit(exited);
        let what = format!("worker {index} (pid {pid}) exited with {status}");
        match reaction.operation {
            ForOperation::Nothing => {}
            ForOperation::FailReload => {
                self.new_worker_exited(format!("{what} before it was ready"))
            }
            ForOperation::AbortInPlace => {
                self.abort_in_place_on_exit(pid, format!("{what} while preparing"))
            }
            ForOperation::StopWaiting => self.stop_waiting_for(pid),
            ForOperation::RollBack => self.roll_back_on_exit(&what),
        }
        let generation = self.fleet.get_mut(number);
        match (reaction.worker, generation) {
            (ForWorker::Forget, _) | (_, None) => {}
            (ForWorker::StopRespawning, Some(generation)) => {
                generation.crash_loop(index, now);
                tracing::error!(
                    event = "worker.crash_looped",
                    generation = number,
                    worker = index,
                    pid = pid.as_raw(),
                    crashes = generation.config().worker.crash_loop_limit,
                    window_ms = generation.config().worker.crash_loop_window.0.as_millis() as u64,
                    "worker crash loop: not respawned any more; capacity is lost until a reload"
                );
            }
            (ForWorker::Respawn, Some(generation)) => {
                generation.crash_loop(index, now);
                let delay = generation.schedule_respawn(&worker);
                self.metrics.worker_restarted(reason);
                tracing::warn!(
                    event = "worker.respawning",
                    generation = number,
                    worker = index,
                    pid = pid.as_raw(),
                    delay_ms = delay.as_millis() as u64,
                    "worker died; respawning"
                );
            }
        }
        self.reap_finished_generations();
    }

    /// Drops generations that have nothing left to run; their listeners close
    /// when no other generation holds them.
    pub(crate) fn reap_finished_generations(&mut self) {
        let stopping = self.operation.stopping().is_some();
        let reloading = self.operation.reload().map(|r| r.generation());
        for retired in self.fleet.retire_finished(reloading, stopping) {
            if let Some(drained) = retired.drained {
                self.metrics.drained(drained);
            }
            tracing::info!(
                event = "generation.finished",
                generation = retired.number,
                state = retired.state.name(),
                "generation finished"
            );
        }
    }

    /// Tidies the next ports queued. Not while an upgrade runs (a new
    /// master may have sockets of its own on the ports, which this one's
    /// bookkeeping does not know), nor once stopping (everything goes at
    /// exit; after an upgrade the ports are the new master's).
    pub(crate) fn tidy_step(&mut self) {
        if self.operation.upgrade().is_some() || self.operation.stopping().is_some() {
            return self.fleet.cancel_tidy();
        }
        self.fleet.tidy_step();
    }
}
