//! The master and its keeper (see [`crate::keeper`]): the snapshots that
//! let another master adopt the workers if this one dies, a keeper that
//! died replaced, and the adoption itself (see [`crate::adopt`]).

use super::Master;
use crate::adopt::{Adoption, Service, Snapshot};
use crate::audit::Requester;
use crate::fleet::GenerationState;
use crate::operation::{Admission, Ask, Facts};
use crate::reload::Trigger;
use tokio::time::Instant;

impl Master {
    /// After a turn of the loop: the keeper gets a snapshot of what
    /// changed (see [`crate::keeper::Keeper::due`]).
    pub(crate) fn keep(&mut self) {
        let now = Instant::now();
        let Some(keeper) = self.children.keeper_mut() else {
            return;
        };
        keeper.store_main(self.endpoints.main_process());
        if !keeper.due(now) {
            return;
        }
        let keeper = self.children.keeper().expect("checked above");
        let started = |pid| keeper.started(pid);
        let service = Service {
            fleet: &self.fleet,
            endpoints: self.endpoints.kept_fds(),
            probation: self
                .operation
                .rollout()
                .map(|r| (r.generation(), r.standby())),
            upgrade_child: self.operation.upgrade().map(|u| u.child()),
            adoptions: self.program.adopted.as_ref().map_or(0, |a| a.count),
            started: &started,
        };
        match Snapshot::take(service) {
            Ok((json, places)) => {
                // SAFETY: the fleet and the endpoints hold these fds open
                // until this turn ends.
                let fds = unsafe { crate::adopt::borrow_all(&places) };
                if let Some(keeper) = self.children.keeper_mut() {
                    keeper.sync(json, &fds);
                    keeper.took(now, now.elapsed(), fds.len());
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot snapshot the master for its keeper")
            }
        }
    }

    /// When the next snapshot is due, if one was put off.
    pub(crate) fn keep_wakeup(&self) -> Option<Instant> {
        self.children.keeper().and_then(|k| k.wakeup())
    }

    /// The keeper is gone: another one is started and told everything.
    pub(crate) fn keeper_gone(&mut self) {
        if self.operation.stopping().is_some() {
            return;
        }
        tracing::warn!(
            event = "keeper.restarted",
            "the keeper is gone; starting another"
        );
        let budget = self.config.supervisor.master_restarts.0;
        self.children.start_keeper(None, budget, &self.events);
        self.guard_every_worker();
    }

    /// This master stops, or hands over to an upgrade's: the keeper will
    /// not start another when it is gone.
    pub(crate) fn retire_keeper(&mut self) {
        if let Some(keeper) = self.children.keeper_mut() {
            keeper.retire();
        }
    }

    /// This master stops for good: under systemd with an fd store, the
    /// store keeps only the listening sockets, for the master systemd
    /// starts next (see [`crate::fdstore`]); their socket files stay. One
    /// that handed over to an upgrade's new master (systemd's main process
    /// now, which alone may change the store) lets its keeper go: the store
    /// holds its channel, so it would not see this master's end.
    pub(crate) fn leave_store(&mut self) {
        let Some(keeper) = self.children.keeper_mut() else {
            return;
        };
        if !keeper.stores() {
            return;
        }
        if self.lineage.successor().is_some() {
            keeper.release();
            return;
        }
        let listeners: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = self
            .fleet
            .listeners()
            .iter()
            .map(|l| (l.info.name.as_str(), l.fd()))
            .collect();
        keeper.leave_store(&listeners);
        for listener in self.fleet.listeners() {
            listener.hand_over();
        }
    }

    /// Adopts what a master that died left (see [`crate::adopt`]). Returns
    /// the reload to begin, if any: none when a generation serves and this
    /// is not a restart.
    pub(crate) fn adopt(&mut self, adoption: Adoption) -> anyhow::Result<Option<Trigger>> {
        let Adoption {
            state,
            probation,
            upgrade_child,
            adopted,
            watched,
            restart,
            ..
        } = adoption;
        tracing::warn!(
            event = "master.adopted",
            previous_pid = adopted.previous_pid,
            died = %adopted.how,
            adoptions = adopted.count,
            "adopting the workers of the previous master"
        );
        let workers: Vec<(i32, Option<u64>)> = state.workers().collect();
        state.adopt(
            &mut self.fleet,
            &self.config,
            &self.events,
            &mut self.children,
        )?;
        // Not its children: each exit is seen through a pidfd.
        for (pid, start) in &workers {
            let pidfd = crate::adopt::verify(*pid, *start);
            if let (Some(start), Some(keeper)) = (start, self.children.keeper_mut()) {
                keeper.remember_start(*pid, *start);
            }
            if pidfd.is_none() {
                tracing::warn!(
                    pid,
                    "an adopted worker is not the process the snapshot named: taken as exited"
                );
            }
            crate::adopt::watch_exit(&self.events, *pid, pidfd);
        }
        // Started after the last snapshot: nobody knows it now.
        for pid in watched {
            if workers.iter().any(|(p, _)| *p == pid) {
                continue;
            }
            if let Some(pidfd) = crate::adopt::verify(pid, None) {
                tracing::warn!(pid, "a worker started after the last snapshot: stopped");
                let signal = self.config.worker.stop_signal.0 as i32;
                let _ = crate::keeper::pidfd_signal(&pidfd, signal);
            }
        }
        self.guard_every_worker();
        self.tell_workers_of_new_master();
        self.resolve_adopted(probation, upgrade_child);
        // A generation left with no worker (its spawns had not come back
        // when the snapshot was taken) is gone now.
        self.reap_finished_generations();
        self.fleet.steer_to_current();
        self.metrics.adopted(adopted.count);
        self.program.adopted = Some(adopted);
        if restart == Some(true) {
            // A hard restart: the old workers stop now; new connections
            // wait in the listeners' queues for the new generation.
            let numbers: Vec<u64> = self.fleet.iter().map(|g| g.number()).collect();
            for number in numbers {
                self.fleet.fail(number, std::time::Duration::ZERO);
            }
        }
        let current = self.fleet.current_number();
        // A master systemd started (`Restart=`, the fd store) is waited
        // for: ready now, as no reload will say it (without a current
        // generation, or at a restart, the first reload does).
        if let (Some(generation), None) = (current, restart) {
            crate::sd_notify::notify(&format!(
                "READY=1\nSTATUS=generation {generation} serving; adopted from a master that died"
            ));
        }
        Ok(match (restart, current) {
            (Some(_), _) => Some(Trigger::Restart),
            (None, None) => Some(Trigger::Start),
            (None, Some(_)) => None,
        })
    }

    /// `baton restart`: the keeper starts a new master from the binary at
    /// this one's path, which adopts the workers and replaces them; this
    /// one exits at the end of the turn.
    pub(crate) fn restart(&mut self, hard: bool, by: &Requester) -> Result<(), String> {
        let facts = Facts {
            serving: self.fleet.current_number().is_some(),
            spawns_pending: self.fleet.spawns_pending(),
        };
        if let Admission::Refuse(reason) = self.operation.summary().admit(Ask::Upgrade, facts) {
            return Err(reason.to_string());
        }
        match self.children.keeper_mut() {
            Some(keeper) if !keeper.restarting() => keeper.due_now(),
            _ => return Err("no keeper runs to start the new master (see the log)".into()),
        }
        // The snapshot the new master adopts: as of now.
        self.keep();
        let path = self.program.path.clone();
        let keeper = self.children.keeper_mut().expect("checked above");
        if !keeper.restart(&path, hard) {
            return Err("the keeper could not be told (see the log)".into());
        }
        tracing::info!(
            event = "master.restarting",
            hard,
            requested_by = %by,
            binary = %path.display(),
            "master restarting: a new master adopts the workers and replaces them"
        );
        Ok(())
    }

    /// Whether this master exits for `baton restart`.
    pub(crate) fn restarting(&self) -> bool {
        self.children.keeper().is_some_and(|k| k.restarting())
    }

    /// What was in progress when the previous master died: a probation
    /// rolls back, a generation still starting is stopped, an upgrade's
    /// new master is stopped.
    fn resolve_adopted(
        &mut self,
        probation: Option<(u64, u64)>,
        upgrade: Option<(i32, Option<u64>)>,
    ) {
        if let Some((number, standby)) = probation {
            if self.fleet.get(standby).is_some() {
                tracing::warn!(
                    event = "rollout.rolled_back",
                    generation = number,
                    restored = standby,
                    reason = "the master died during probation",
                    "rolled back after cutover"
                );
                self.fleet.roll_back(number, standby);
            }
        }
        let unfinished: Vec<(u64, std::time::Duration)> = self
            .fleet
            .iter()
            .filter(|g| {
                matches!(
                    g.state(),
                    GenerationState::Starting | GenerationState::Standby
                )
            })
            .map(|g| (g.number(), g.config().worker.drain_timeout.0))
            .collect();
        for (number, drain) in unfinished {
            tracing::warn!(
                generation = number,
                "a generation the master that died left unfinished: stopped"
            );
            self.fleet.fail(number, drain);
        }
        if let Some((pid, start)) = upgrade {
            if let Some(pidfd) = crate::adopt::verify(pid, start) {
                tracing::warn!(
                    pid,
                    "the new master of an upgrade the master that died left unfinished: stopped"
                );
                let _ = crate::keeper::pidfd_signal(&pidfd, libc::SIGTERM);
            }
        }
    }
}
