//! Child exits: reaping every exited child, what a worker's exit means for
//! its generation (a respawn, a failed reload, a finished drain), and
//! letting go of the sockets of generations that are finished.
//!
//! A finished generation's sockets are let go of [`TIDY_CHUNK`] ports a
//! turn of the loop: with a thousand ports that takes tens of
//! milliseconds, and requests are served between chunks.

use crate::generation::{Generation, Phase};
use crate::listener::Shared;
use crate::master::Master;
use crate::worker::State;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::rc::Rc;

/// Ports tidied per turn of the event loop: a few milliseconds.
const TIDY_CHUNK: usize = 64;

/// Children reaped per turn of the event loop: the kernel charges the
/// reaper for the fds an exited child still held, about a millisecond per
/// thousand.
const REAP_CHUNK: usize = 2;

/// Why a worker exited, as the `baton_worker_exits_total` metric counts it.
pub fn exit_reason(phase: Phase, state: State, success: bool) -> &'static str {
    match (phase, state) {
        (Phase::Starting, _) => "failed_start",
        (_, State::Killed) => "killed",
        (_, State::Draining { .. }) => "drained",
        _ if success => "exited",
        _ => "crashed",
    }
}

/// What a worker's exit means for its generation (probation and in-place
/// reloads hear of it first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitVerdict {
    /// The generation was starting: its reload fails.
    FailReload,
    /// A serving worker died: it is respawned (unless it crash-loops).
    Respawn,
    /// Nothing to do: it was draining, surplus, or its generation is done.
    Forget,
}

/// The decision for a worker's exit: by its generation's phase, whether
/// it was draining (or killed), whether the master is stopping, and
/// whether its index is within the generation's worker count (a surplus
/// worker after `baton scale` down is not replaced).
pub fn exit_verdict(phase: Phase, draining: bool, stopping: bool, within: bool) -> ExitVerdict {
    match phase {
        Phase::Starting => ExitVerdict::FailReload,
        Phase::Current if !stopping && !draining && within => ExitVerdict::Respawn,
        Phase::Current | Phase::Draining | Phase::Failed | Phase::Standby => ExitVerdict::Forget,
    }
}

impl Master {
    pub(crate) fn generation_of(&mut self, pid: Pid) -> Option<&mut Generation> {
        self.generations
            .values_mut()
            .find(|g| g.workers.contains_key(&pid))
    }

    /// Collects every exited child.
    pub(crate) fn reap(&mut self) {
        while self.reap_one() {}
    }

    /// Reaps at most [`REAP_CHUNK`] exited children, and leaves the rest
    /// for the next turn of the loop ([`Master::reap_more`]): reaping a
    /// worker with many fds takes about a millisecond, and a generation's
    /// workers all exit at once at the end of a drain.
    pub(crate) fn reap_some(&mut self) {
        for _ in 0..REAP_CHUNK {
            if !self.reap_one() {
                self.reap_more = false;
                return;
            }
        }
        self.reap_more = true;
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

    pub(crate) fn on_exit(&mut self, pid: Pid, status: String, success: bool) {
        if self.upgrade_child_exited(pid, &status, success) {
            return;
        }
        if self.probe_exited(pid, &status, success) {
            return;
        }
        if self.guardian.as_ref().is_some_and(|g| g.pid() == pid) {
            tracing::warn!(pid = pid.as_raw(), %status, "the guardian exited; starting another");
            self.start_guardian();
            self.guard_every_worker();
            return;
        }
        if let Some(guardian) = &self.guardian {
            guardian.forget(pid);
        }
        let stopping = self.operation.stopping().is_some();
        let Some(generation) = self.generation_of(pid) else {
            // Maybe a worker whose start has not come back to the loop yet.
            if self.spawns_pending() {
                self.unclaimed_exits.insert(pid, (status, success));
            }
            return;
        };
        let Some(worker) = generation.workers.remove(&pid) else {
            return;
        };
        let number = generation.number;
        let draining = matches!(worker.state, State::Draining { .. } | State::Killed);
        let reason = exit_reason(generation.phase, worker.state, success);
        tracing::info!(
            generation = number,
            worker = worker.index,
            pid = pid.as_raw(),
            %status,
            state = worker.state.name(),
            "worker exited"
        );
        self.metrics.worker_exited(reason);
        let index = worker.index;
        if self
            .operation
            .in_place()
            .is_some_and(|t| t.generation() == number)
        {
            self.in_place_worker_exited(pid, index, &status);
        }
        if !draining && self.probation_worker_exited(number, index, pid, &status) {
            return self.reap_finished_generations();
        }
        let Some(generation) = self.generations.get_mut(&number) else {
            return;
        };
        let within = worker.index < generation.processes;
        match exit_verdict(generation.phase, draining, stopping, within) {
            ExitVerdict::FailReload => {
                let reason = format!(
                    "worker {} (pid {pid}) exited with {status} before it was ready",
                    worker.index
                );
                self.new_worker_exited(reason);
            }
            ExitVerdict::Respawn => {
                if generation.crash_loop(worker.index) {
                    tracing::error!(
                        generation = number,
                        worker = worker.index,
                        pid = pid.as_raw(),
                        crashes = generation.config.worker.crash_loop_limit,
                        window_ms = generation.config.worker.crash_loop_window.0.as_millis() as u64,
                        "worker crash loop: not respawned any more; capacity is lost until a reload"
                    );
                    return self.reap_finished_generations();
                }
                let delay = generation.schedule_respawn(&worker);
                self.metrics.worker_restarted(reason);
                tracing::warn!(
                    generation = number,
                    worker = worker.index,
                    pid = pid.as_raw(),
                    delay_ms = delay.as_millis() as u64,
                    "worker died; respawning"
                );
            }
            ExitVerdict::Forget => {}
        }
        self.reap_finished_generations();
    }

    /// Drops generations that have nothing left to run; their listeners close
    /// when no other generation holds them.
    pub(crate) fn reap_finished_generations(&mut self) {
        let current = self.current;
        let stopping = self.operation.stopping().is_some();
        let reloading = self.operation.reload().map(|r| r.generation());
        let before = self.generations.len();
        self.generations.retain(|&number, g| {
            let keep = !g.workers.is_empty()
                || g.has_pending()
                || (Some(number) == current && !stopping)
                || Some(number) == reloading;
            if !keep {
                if let (Some(since), Phase::Draining) = (g.draining_since, g.phase) {
                    self.metrics.drained(since.elapsed());
                }
                tracing::info!(
                    generation = number,
                    phase = g.phase.name(),
                    "generation finished"
                );
            }
            keep
        });
        // A finished generation's sockets may be unused now.
        if self.generations.len() != before {
            self.tidy_listeners();
        }
    }

    /// Asks for a pass over the ports, letting go of generation sockets no
    /// generation uses any more: from the next turn of the loop, the ports
    /// that have some are listed and tidied [`TIDY_CHUNK`] a turn (with a
    /// thousand ports, a finished generation's sockets take tens of
    /// milliseconds to let go). Asked while a pass runs, another pass
    /// follows it.
    pub(crate) fn tidy_listeners(&mut self) {
        self.tidy_again = true;
    }

    /// Whether a tidying pass is under way or asked for.
    pub(crate) fn tidy_pending(&self) -> bool {
        !self.tidying.is_empty() || self.tidy_again
    }

    /// Tidies the next ports queued. Not while an upgrade runs (a new
    /// master may have sockets of its own on the ports, which this one's
    /// bookkeeping does not know), nor once stopping (everything goes at
    /// exit; after an upgrade the ports are the new master's).
    pub(crate) fn tidy_step(&mut self) {
        if self.operation.upgrade().is_some() || self.operation.stopping().is_some() {
            self.tidying.clear();
            self.tidy_again = false;
            return;
        }
        if self.tidying.is_empty() {
            if !std::mem::take(&mut self.tidy_again) {
                return;
            }
            self.tidying = self.ports_to_tidy();
        }
        let chunk: Vec<Shared> = self
            .tidying
            .drain(..TIDY_CHUNK.min(self.tidying.len()))
            .collect();
        if chunk.is_empty() {
            return;
        }
        // The kernel is asked about a chunk's ports in one look.
        let kernel = crate::listener::kernel_view(&chunk);
        for port in &chunk {
            port.tidy(&kernel);
        }
    }

    /// Each port once, and only ports with something to let go of.
    fn ports_to_tidy(&self) -> Vec<Shared> {
        let sockets = self.generations.values().flat_map(|g| g.listeners.iter());
        let mut seen = std::collections::HashSet::new();
        self.listeners
            .iter()
            .chain(sockets)
            .map(|listener| listener.primary().unwrap_or(listener))
            .filter(|port| seen.insert(Rc::as_ptr(port)))
            .filter(|port| port.has_retired())
            .cloned()
            .collect()
    }
}
