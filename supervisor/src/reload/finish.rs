//! The end of a transaction: commit (the new generation serves, the
//! replaced one drains), abort, and the outcome recorded.

use super::{millis, Ended, Outcome, Phase, Reload};
use crate::admin::AdminSocket;
use crate::config::Config;
use crate::control::protocol::Reply;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::operation::Reloads;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// A reload that settled: how it ended, and what the master switches to.
#[derive(Debug)]
pub struct Settled {
    /// How it ended (committed).
    pub ended: Ended,
    /// The configuration in service now.
    pub config: Rc<Config>,
    /// A new admin endpoint, when the reload changed `[supervisor] admin`.
    pub admin: Option<Option<AdminSocket>>,
}

impl Reload {
    /// Switches over for good: every new connection to the new
    /// generation, the replaced one drained (see [`Fleet::cut_over`]).
    pub fn settle(mut self, fleet: &mut Fleet) -> Settled {
        let _enter = self.span.clone().entered();
        self.begin_phase(Phase::Commit);
        let config = self.config.clone();
        let listeners = std::mem::take(&mut self.listeners);
        if fleet
            .cut_over(self.generation, listeners, &config)
            .is_some()
        {
            tracing::info!(
                processes = self.processes,
                "config changed processes: scale override dropped"
            );
        }
        self.end_phase(Phase::Commit);
        Settled {
            ended: Ended {
                generation: self.generation,
                trigger: self.trigger,
                requested_by: self.requested_by.take(),
                phases: std::mem::take(&mut self.phases),
                failure: None,
            },
            config,
            admin: self.admin.take(),
        }
    }

    /// It fails in `phase` for `reason`: its generation fails in `fleet`
    /// (its workers stopped). The phase's time is counted; a new worker
    /// that exited while others were still being spawned ends the spawn
    /// phase and fails the ready one at once.
    pub fn abort(self, fleet: &mut Fleet, phase: Phase, reason: String) -> Ended {
        let _enter = self.span.clone().entered();
        let spawning = self.spawn_phase_open(fleet);
        let mut phases = self.phases;
        let elapsed = self.phase_started.elapsed();
        match (phase, spawning) {
            (Phase::Bind | Phase::Spawn, _) => phases.push((phase, elapsed)),
            (Phase::Ready, true) => {
                phases.push((Phase::Spawn, elapsed));
                phases.push((Phase::Ready, Duration::ZERO));
            }
            (Phase::Ready, false) => phases.push((Phase::Ready, elapsed)),
            _ => {}
        }
        fleet.fail(self.generation, self.config.worker.drain_timeout.0);
        Ended {
            generation: self.generation,
            trigger: self.trigger,
            requested_by: self.requested_by,
            phases,
            failure: Some((phase, reason)),
        }
    }
}

impl Reloads {
    /// Makes the transaction's one outcome from how it `ended` and hands it
    /// to each observer: the log, the `metrics`, the waiting `baton reload`
    /// clients, and systemd (when `tell_systemd`: this master is systemd's
    /// main process, or will be); keeps it for `baton status`.
    pub fn record(
        &mut self,
        ended: Ended,
        fleet: &mut Fleet,
        metrics: &Metrics,
        tell_systemd: bool,
    ) {
        let Ended {
            generation,
            trigger,
            requested_by,
            phases,
            failure,
        } = ended;
        let deploying = self.take_deploying();
        if let Some(g) = fleet.get_mut(generation) {
            g.leave_trace();
            if failure.is_none() && deploying.is_some() {
                g.set_deploy_version(deploying);
            }
        }
        let served = fleet.get(generation).filter(|_| failure.is_none());
        let deploy_version = served.and_then(|g| g.deploy_version().map(str::to_string));
        let version = served.map(|g| g.config().app.version.clone());
        let pids = served
            .map(|g| g.workers().keys().map(|p| p.as_raw()).collect())
            .unwrap_or_default();
        let outcome = Outcome {
            generation,
            trigger,
            failure,
            phases,
            finished: SystemTime::now(),
            version,
            deploy_version,
            requested_by,
        };
        let report = outcome.report(pids);
        let current = fleet.current_number();
        log_outcome(&outcome, current);
        metrics.outcome(&outcome, &report);
        answer_waiters(self.take_waiters(), &outcome, &report);
        // READY=1 after every reload, committed or failed: systemd must not
        // see the unit "reloading" forever. Not when the first generation
        // failed and the master exits.
        if tell_systemd && current.is_some() {
            crate::sd_notify::reload_finished(current, &outcome);
        }
        self.keep(outcome);
    }
}

/// The log's view of an outcome: `reload.committed` or `reload.failed`
/// with each phase's duration (and, failed, the generation kept serving).
fn log_outcome(outcome: &Outcome, kept_generation: Option<u64>) {
    let ms = |phase| {
        outcome
            .phases
            .iter()
            .find(|(s, _)| *s == phase)
            .map(|(_, d)| millis(*d))
    };
    let (validate_ms, bind_ms, spawn_ms, ready_ms, commit_ms) = (
        ms(Phase::Validate),
        ms(Phase::Bind),
        ms(Phase::Spawn),
        ms(Phase::Ready),
        ms(Phase::Commit),
    );
    match &outcome.failure {
        None => tracing::info!(
            event = "reload.committed",
            outcome = "committed",
            validate_ms,
            bind_ms,
            spawn_ms,
            ready_ms,
            commit_ms,
            "reload committed"
        ),
        Some((phase, reason)) => tracing::error!(
            event = "reload.failed",
            outcome = "failed",
            phase = %phase,
            reason = %reason,
            kept_generation,
            validate_ms, bind_ms, spawn_ms, ready_ms,
            "reload failed"
        ),
    }
}

/// The waiting `baton reload` clients' view: each gets the outcome of the
/// transaction that covered its request.
fn answer_waiters(
    waiters: Vec<crate::master::Waiter>,
    outcome: &Outcome,
    report: &super::ReloadOutcome,
) {
    for waiter in waiters {
        let reply = match &outcome.failure {
            None => Reply::ok(report),
            Some((phase, reason)) => {
                Reply::failed(format!("reload failed in phase {phase}: {reason}"), report)
            }
        };
        let _ = waiter.send(reply);
    }
}
