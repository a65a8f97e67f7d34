//! After cutover: probation, canaries and rollback.
//!
//! With `[worker] probation` or a canary (`[worker] canary`, `baton reload
//! --canary N%`), a reload does not settle when its new generation is
//! ready. New connections go to the new generation (all of them, or the
//! canary's share, drawn per connection by the port's steering program),
//! while the generation it replaced is put on **standby**: its sockets get
//! nothing new (or the rest of the canary split), and its workers stay up
//! and warm. Then:
//!
//! - a new worker exits, the generation's probes fail `probation_failures`
//!   times in a row, or `baton rollback` is run: **roll back**. New
//!   connections go to the standby generation again, which is current once
//!   more, and the new one is handed over and drained. The reload fails in
//!   phase `probation`.
//! - probation ends, or `baton promote` is run: the reload **settles** as
//!   any other: every new connection to the new generation, the standby
//!   generation drained, the master's settings (log filter, listeners)
//!   switched, and the reload committed.
//!
//! Only TCP listeners can be steered between generations, so during a
//! rollout every generation has TCP sockets of its own, SDK workers
//! included. UDP and Unix listeners stay shared: a standby generation of
//! SDK workers keeps serving those until it drains.

use crate::config::Share;
use crate::control::protocol::{Reply, RolloutStatus};
use crate::master::{Master, Waiter};
use crate::reload::{Phase, Reload};
use tokio::time::Instant;

/// A reload past cutover, on probation.
#[derive(Debug)]
pub struct Rollout {
    /// The transaction; it ends when the rollout does.
    reload: Reload,
    /// The generation it replaced, on standby.
    standby: u64,
    /// When new connections went to the new generation.
    cut_over: Instant,
    /// When probation ends by itself (`None`: a canary waiting for `baton
    /// promote`).
    until: Option<Instant>,
    /// The new generation's share of new connections, if not all.
    canary: Option<Share>,
}

impl Rollout {
    /// What `baton status` shows of it, with the failures in a row of the
    /// probes of its generation.
    pub fn status(&self, probe_failures: Option<u32>) -> RolloutStatus {
        let now = Instant::now();
        RolloutStatus {
            generation: self.generation(),
            standby: self.standby,
            canary_percent: self.canary.map(|c| c.percent()),
            elapsed_s: (now - self.cut_over).as_secs_f64(),
            left_s: self
                .until
                .map(|u| u.saturating_duration_since(now).as_secs_f64()),
            probe_failures,
        }
    }

    /// The new generation.
    pub fn generation(&self) -> u64 {
        self.reload.generation()
    }

    /// When probation ends by itself (`None`: a canary waiting for
    /// `baton promote`).
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// The generation on standby.
    pub fn standby(&self) -> u64 {
        self.standby
    }

    /// Time left (`None`: a canary waiting for `baton promote`).
    pub fn left(&self) -> Option<std::time::Duration> {
        self.until
            .map(|u| u.saturating_duration_since(Instant::now()))
    }
}

impl Master {
    /// At commit: starts a rollout when the reload asks for one and a
    /// generation serves that can be put on standby; otherwise gives the
    /// transaction back to settle at once.
    pub(crate) fn begin_rollout(&mut self, reload: Reload) -> Option<Reload> {
        let config = reload.config().clone();
        let probation = config.worker.probation.map(|p| p.0);
        let canary = reload.canary().or(config.worker.canary);
        if probation.is_none() && canary.is_none() {
            return Some(reload);
        }
        let number = reload.generation();
        let Some(standby) = self.fleet.cut_over_on_probation(number, canary) else {
            return Some(reload);
        };
        let now = Instant::now();
        let until = probation.map(|p| now + p);
        tracing::info!(
            event = "rollout.started",
            generation = number,
            standby,
            probation_ms = probation.map(|p| p.as_millis() as u64),
            canary = canary.map(|c| c.to_string()),
            "cut over: probation started, the replaced generation stays on standby"
        );
        let mut reload = reload;
        reload.begin_phase(crate::reload::Phase::Probation);
        self.operation
            .begin(crate::operation::Operation::Probation(Rollout {
                reload,
                standby,
                cut_over: now,
                until,
                canary,
            }));
        None
    }

    /// Ends the rollout with the new generation in service: the reload
    /// settles. Returns whether there was one.
    pub(crate) fn promote(&mut self) -> bool {
        let Some(rollout) = self.operation.take_rollout() else {
            return false;
        };
        let mut reload = rollout.reload;
        let _enter = reload.span().clone().entered();
        tracing::info!(
            event = "rollout.promoted",
            generation = reload.generation(),
            "probation over: the new generation stays, the standby generation drains"
        );
        reload.end_phase(Phase::Probation);
        self.settle(reload);
        true
    }

    /// Rolls back: new connections to the standby generation again, which
    /// is current once more; the new generation drains. Returns whether
    /// there was a rollout.
    pub(crate) fn roll_back(&mut self, reason: &str) -> bool {
        let Some(rollout) = self.operation.take_rollout() else {
            return false;
        };
        self.probing = None;
        let mut reload = rollout.reload;
        let _enter = reload.span().clone().entered();
        let number = reload.generation();
        self.fleet.roll_back(number, rollout.standby);
        reload.end_phase(Phase::Probation);
        tracing::warn!(
            event = "rollout.rolled_back",
            generation = number,
            restored = rollout.standby,
            %reason,
            "rolled back after cutover"
        );
        let (trigger, phases) = (reload.trigger(), reload.take_phases());
        let by = reload.take_requested_by();
        self.record(
            number,
            trigger,
            by,
            phases,
            Some((
                Phase::Probation,
                format!("rolled back after cutover: {reason}"),
            )),
        );
        self.reap_finished_generations();
        true
    }

    /// A worker of the generation on probation exited (`exited` says
    /// which, and how): that rolls back (see
    /// [`crate::operation::Summary::on_worker_exit`]).
    pub(crate) fn roll_back_on_exit(&mut self, exited: &str) {
        let Some(rollout) = self.operation.rollout() else {
            return;
        };
        let at = rollout.cut_over.elapsed().as_secs_f64();
        self.roll_back(&format!("{exited} at +{at:.1}s"));
    }

    /// A probe of `generation` failed: past `probation_failures` in a row
    /// during its probation, that rolls back.
    pub(crate) fn probe_failed(&mut self, generation: u64) {
        let Some(probing) = &self.probing else {
            return;
        };
        let Some(rollout) = self
            .operation
            .rollout()
            .filter(|r| r.generation() == generation)
        else {
            return;
        };
        let limit = rollout.reload.config().worker.probation_failures;
        if probing.failures >= limit {
            let reason = format!(
                "{} probes failed in a row, the last: {}",
                probing.failures,
                probing.last_failure.as_deref().unwrap_or("unknown")
            );
            self.roll_back(&reason);
        }
    }

    /// `baton promote` and `baton rollback`.
    pub(crate) fn on_rollout_request(&mut self, promote: bool, reply: Waiter) {
        let generation = self.operation.rollout().map(|r| r.generation());
        let Some(generation) = generation else {
            let _ = reply.send(Reply::error(
                "no reload is on probation (nothing to promote or roll back)",
            ));
            return;
        };
        let done = if promote {
            self.promote()
        } else {
            self.roll_back("asked by baton rollback")
        };
        let _ = reply.send(if done {
            Reply::ok(serde_json::json!({ "generation": generation }))
        } else {
            Reply::error("no reload is on probation")
        });
    }
}
