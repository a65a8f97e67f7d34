//! The end of a transaction: commit (the new generation serves, the
//! replaced one drains), abort, and the outcome recorded.

use super::{millis, Outcome, Phase, Reload, Trigger};
use crate::audit::Requester;
use crate::control::protocol::Reply;
use crate::master::Master;
use crate::operation::Operation;
use std::time::{Duration, SystemTime};

impl Master {
    pub(super) fn commit(&mut self, mut reload: Reload) {
        let _enter = reload.span.clone().entered();
        reload.end_phase(Phase::Ready);
        self.cut_over(reload);
    }

    /// Switches over for good: every new connection to the new generation,
    /// the replaced one drained, the master's settings switched.
    pub(crate) fn settle(&mut self, mut reload: Reload) {
        let _enter = reload.span.clone().entered();
        reload.begin_phase(Phase::Commit);
        self.probing = None;
        let config = reload.config.clone();
        if config.supervisor.log_filter != self.config.supervisor.log_filter {
            if let Err(e) = self.log.set_filter(&config.supervisor.log_filter) {
                tracing::error!(error = %e, "cannot switch log filter");
            }
        }
        if config.supervisor.log_format != self.log.format()
            || config.supervisor.log_file.as_deref() != self.log.file()
        {
            tracing::warn!("log_format and log_file changes take effect when the master restarts");
        }
        if config.supervisor.otlp() != self.config.supervisor.otlp() {
            tracing::warn!(
                "otlp_endpoint, otlp_export_timeout and otlp_flush_timeout changes take effect when the master restarts or upgrades"
            );
        }
        if config.supervisor.control_socket != self.config.supervisor.control_socket
            || config.supervisor.pid_file != self.config.supervisor.pid_file
        {
            tracing::warn!(
                "control_socket and pid_file changes take effect when the master restarts"
            );
        }
        let listeners = std::mem::take(&mut reload.listeners);
        if self
            .fleet
            .cut_over(reload.generation, listeners, &config)
            .is_some()
        {
            tracing::info!(
                processes = reload.processes,
                "config changed processes: scale override dropped"
            );
        }
        if let Some(admin) = reload.admin.take() {
            self.endpoints.replace_admin(admin);
        }
        self.config = config;
        reload.end_phase(Phase::Commit);
        let by = reload.requested_by.take();
        self.record(reload.generation, reload.trigger, by, reload.phases, None);
        self.limit_draining_generations();
        // A replaced generation may have had no live worker (all waiting
        // to be respawned): it is finished now.
        self.reap_finished_generations();
    }

    /// Kills the oldest draining generations past
    /// `[supervisor] max_draining_generations`, as HAProxy's
    /// `mworker-max-reloads` does: workers that ignore their stop signal
    /// under a long `drain_timeout` must not pile up.
    pub(super) fn limit_draining_generations(&mut self) {
        let max = self.config.supervisor.max_draining_generations as usize;
        self.fleet.limit_draining(max);
    }

    pub(super) fn abort(&mut self, reload: Reload, phase: Phase, reason: String) {
        let _enter = reload.span.clone().entered();
        self.probing = None;
        let spawning = self.spawn_phase_open(&reload);
        let mut phases = reload.phases;
        let elapsed = reload.phase_started.elapsed();
        match (phase, spawning) {
            (Phase::Bind | Phase::Spawn, _) => phases.push((phase, elapsed)),
            // A new worker exited while others were still being spawned.
            (Phase::Ready, true) => {
                phases.push((Phase::Spawn, elapsed));
                phases.push((Phase::Ready, Duration::ZERO));
            }
            (Phase::Ready, false) => phases.push((Phase::Ready, elapsed)),
            _ => {}
        }
        self.fleet
            .fail(reload.generation, reload.config.worker.drain_timeout.0);
        self.record(
            reload.generation,
            reload.trigger,
            reload.requested_by,
            phases,
            Some((phase, reason)),
        );
        self.reap_finished_generations();
    }

    /// Makes the transaction's one outcome and hands it to each observer
    /// (the log, the metrics, the waiting `baton reload` clients, systemd);
    /// keeps it for `baton status`, then starts the coalesced follow-up.
    pub(crate) fn record(
        &mut self,
        generation: u64,
        trigger: Trigger,
        requested_by: Option<Requester>,
        phases: Vec<(Phase, Duration)>,
        failure: Option<(Phase, String)>,
    ) {
        if let Some(g) = self.fleet.get_mut(generation) {
            g.leave_trace();
        }
        let served = self.fleet.get(generation).filter(|_| failure.is_none());
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
            requested_by,
        };
        let report = outcome.report(pids);
        let current = self.fleet.current_number();
        log_outcome(&outcome, current);
        self.metrics.outcome(&outcome, &report);
        answer_waiters(self.reloads.take_waiters(), &outcome, &report);
        // READY=1 after every reload, committed or failed: systemd must not
        // see the unit "reloading" forever. Not from a new master started by
        // an upgrade, which is not systemd's main pid yet (the old one announces it with MAINPID= at
        // the handover), nor when the first generation failed and the
        // master exits.
        if !self.lineage.taking_over() && current.is_some() {
            crate::sd_notify::reload_finished(current, &outcome);
        }
        self.reloads.keep(outcome);
        // The follow-up starts once nothing runs: not when the transaction
        // that ended here handed over to a probation, nor during a stop.
        if matches!(self.operation, Operation::Idle) {
            if let Some(follow_up) = self.reloads.take_follow_up() {
                self.request_reload(follow_up);
            }
        }
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
