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
use crate::control::protocol::RolloutStatus;
use crate::fleet::Fleet;
use crate::probe::Probing;
use crate::reload::{Ended, Phase, Reload};
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

/// What a reload's commit leads to.
#[derive(Debug)]
pub enum Cutover {
    /// Probation (or a canary), the replaced generation on standby.
    Probation(Rollout),
    /// The reload settles at once.
    Settle(Reload),
}

impl Rollout {
    /// At commit: the rollout `reload` asks for (`probation`, a canary),
    /// with `fleet` cut over on probation and the generation it replaced on
    /// standby; or `reload` back, to settle at once, when it asks for none
    /// or no generation serves that could stand by.
    pub fn begin(reload: Reload, fleet: &mut Fleet) -> Cutover {
        let config = reload.config().clone();
        let probation = config.worker.probation.map(|p| p.0);
        let canary = reload.canary().or(config.worker.canary);
        if probation.is_none() && canary.is_none() {
            return Cutover::Settle(reload);
        }
        let number = reload.generation();
        let Some(standby) = fleet.cut_over_on_probation(number, canary) else {
            return Cutover::Settle(reload);
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
        reload.begin_phase(Phase::Probation);
        Cutover::Probation(Rollout {
            reload,
            standby,
            cut_over: now,
            until,
            canary,
        })
    }

    /// Probation is over (its time is up, or `baton promote`): the new
    /// generation stays; the reload, to settle.
    pub fn promote(self) -> Reload {
        let mut reload = self.reload;
        let _enter = reload.span().clone().entered();
        tracing::info!(
            event = "rollout.promoted",
            generation = reload.generation(),
            "probation over: the new generation stays, the standby generation drains"
        );
        reload.end_phase(Phase::Probation);
        reload
    }

    /// Rolls back: new connections go to the standby generation again,
    /// which `fleet` makes current once more, and the new generation
    /// drains. The reload ends, failed in phase probation because of
    /// `reason`.
    pub fn roll_back(self, fleet: &mut Fleet, reason: &str) -> Ended {
        let mut reload = self.reload;
        let _enter = reload.span().clone().entered();
        let number = reload.generation();
        fleet.roll_back(number, self.standby);
        reload.end_phase(Phase::Probation);
        tracing::warn!(
            event = "rollout.rolled_back",
            generation = number,
            restored = self.standby,
            %reason,
            "rolled back after cutover"
        );
        Ended {
            generation: number,
            trigger: reload.trigger(),
            requested_by: reload.take_requested_by(),
            phases: reload.take_phases(),
            failure: Some((
                Phase::Probation,
                format!("rolled back after cutover: {reason}"),
            )),
        }
    }

    /// Why a worker's exit rolls it back: `exited` says which worker and
    /// how, and this when, counted from the cutover.
    pub fn exit_reason(&self, exited: &str) -> String {
        let at = self.cut_over.elapsed().as_secs_f64();
        format!("{exited} at +{at:.1}s")
    }

    /// After a failed probe of its generation: the reason to roll back,
    /// once `probation_failures` failed in a row.
    pub fn probes_failed(&self, probing: &Probing) -> Option<String> {
        let limit = self.reload.config().worker.probation_failures;
        (probing.generation == self.generation() && probing.failures >= limit).then(|| {
            format!(
                "{} probes failed in a row, the last: {}",
                probing.failures,
                probing.last_failure.as_deref().unwrap_or("unknown")
            )
        })
    }
}
