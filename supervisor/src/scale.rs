//! Scaling the current generation (`baton scale`, SIGTTIN, SIGTTOU).

use crate::master::Master;
use crate::operation::{Admission, Ask};
use serde::Serialize;

/// The most workers a generation may have.
pub const MAX_PROCESSES: i64 = 1024;

/// A worker count chosen by `baton scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleOverride {
    /// The chosen count.
    pub processes: u32,
    /// The config's `processes` when it was chosen: a reload to a config
    /// that changes `processes` drops the override.
    pub config_processes: u32,
}

/// How to change the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleChange {
    /// Add (or, negative, remove) workers.
    By(i64),
    /// Set the count.
    To(i64),
}

/// What a scale did.
#[derive(Debug, Clone, Serialize)]
pub struct Scaled {
    /// The current generation.
    pub generation: u64,
    /// Its worker count before.
    pub from: u32,
    /// Its worker count now.
    pub processes: u32,
}

impl Master {
    /// Changes the current generation's worker count: new workers are started
    /// (and report ready as usual); surplus ones, highest index first, drain.
    /// While an in-place reload runs on the generation, new workers start
    /// when it ends, with the version it leaves in service.
    pub fn scale(
        &mut self,
        change: ScaleChange,
        by: Option<&crate::audit::Requester>,
    ) -> Result<Scaled, String> {
        let facts = Default::default();
        if let Admission::Refuse(reason) = self.operation.summary().admit(Ask::Scale, facts) {
            return Err(reason.to_string());
        }
        let config_processes = self.config.worker.processes;
        let held = self.spawns_held();
        let Some(generation) = self.fleet.current_mut() else {
            return Err("no current generation".into());
        };
        let from = generation.processes();
        let wanted = match change {
            // `by` comes from a client: any i64.
            ScaleChange::By(n) => i64::from(from).saturating_add(n),
            ScaleChange::To(n) => n,
        };
        if !(1..=MAX_PROCESSES).contains(&wanted) {
            return Err(format!(
                "cannot scale generation {} from {from} to {wanted} workers: the count must be between 1 and {MAX_PROCESSES}",
                generation.number()
            ));
        }
        let wanted = wanted as u32;
        let number = generation.number();
        // While an in-place reload runs, new workers start once it ends,
        // with the version it leaves in service.
        let hold = held == Some(number);
        let (events, guardian) = (&self.events, self.guardian.as_ref());
        generation.scale_to(wanted, hold, events, guardian, &mut self.children)?;
        self.fleet.set_scale(wanted, config_processes);
        let requested_by = by.map(ToString::to_string);
        tracing::info!(
            event = "generation.scaled",
            generation = number,
            from,
            processes = wanted,
            requested_by,
            "generation scaled"
        );
        Ok(Scaled {
            generation: number,
            from,
            processes: wanted,
        })
    }

    /// Scales from a signal: the outcome goes to the log only.
    pub fn scale_logged(&mut self, change: ScaleChange, by: Option<&crate::audit::Requester>) {
        if let Err(reason) = self.scale(change, by) {
            tracing::error!(%reason, "scale refused");
        }
    }
}
