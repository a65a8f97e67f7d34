//! What a worker's exit means, in each state of each operation: one
//! decision ([`Summary::on_worker_exit`]) from what the master is doing,
//! the state of the worker's generation and what the worker was doing. It
//! returns everything that must happen ([`Reaction`]); the driver
//! (`Master::worker_exited`, in `master.rs`) does it.

use super::Summary;
use crate::fleet::GenerationState;
use crate::reload::Phase;
use crate::worker::State;

/// What the decision knows of an exited worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    /// Its generation's state. The generation an operation is about is
    /// the `Starting` one while a new generation starts, and the `Current`
    /// one during an in-place reload and on probation (the one it replaced
    /// is on `Standby` then).
    pub generation: GenerationState,
    /// It had been told to drain, or was killed: its exit was expected.
    pub draining: bool,
    /// Its index is within its generation's worker count (not a surplus
    /// one after `baton scale` down).
    pub within: bool,
    /// It still owed the in-place reload its answer.
    pub owed_answer: bool,
    /// Counted, this crash trips the crash-loop breaker
    /// (`crash_loop_limit` crashes within `crash_loop_window`).
    pub crash_loop: bool,
}

/// What the exit does to the operation under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForOperation {
    /// Nothing.
    Nothing,
    /// A worker of the generation starting exited before it was ready:
    /// the reload fails, and the generation serving stays.
    FailReload,
    /// A worker that owed its answer to prepare exited: the in-place
    /// reload aborts, and nothing changed.
    AbortInPlace,
    /// A worker that owed its answer to commit exited: the in-place reload
    /// waits for it no more (its respawn starts with the committed
    /// version).
    StopWaiting,
    /// A worker of the generation on probation exited: new connections go
    /// to the standby generation again, and the reload fails.
    RollBack,
}

/// What becomes of the worker's place in its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForWorker {
    /// Nothing: it was draining or surplus, its generation does not serve
    /// (or was just rolled back), or the master is stopping.
    Forget,
    /// A serving worker died: it is respawned, after a backoff.
    Respawn,
    /// A serving worker died once too often: the crash-loop breaker counts
    /// it and stops respawning it (until a reload).
    StopRespawning,
}

/// Everything a worker's exit makes happen, to the operation first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaction {
    /// To the operation under way.
    pub operation: ForOperation,
    /// To the worker's place.
    pub worker: ForWorker,
}

impl Summary {
    /// What a worker's exit means during this operation: the one table.
    pub fn on_worker_exit(self, exited: Exited) -> Reaction {
        use GenerationState as G;
        use Summary as S;
        let operation = match (self, exited.generation) {
            (S::Starting, G::Starting) => ForOperation::FailReload,
            (S::InPlace(Phase::Prepare), _) if exited.owed_answer => ForOperation::AbortInPlace,
            (S::InPlace(_), _) if exited.owed_answer => ForOperation::StopWaiting,
            (S::Probation { .. }, G::Current) if !exited.draining => ForOperation::RollBack,
            _ => ForOperation::Nothing,
        };
        let serving = exited.generation == G::Current && !matches!(self, S::Stopping(_));
        let replaced = serving && !exited.draining && exited.within;
        let worker = match (operation, replaced) {
            // The generation it served in drains now.
            (ForOperation::RollBack, _) | (_, false) => ForWorker::Forget,
            _ if exited.crash_loop => ForWorker::StopRespawning,
            _ => ForWorker::Respawn,
        };
        Reaction { operation, worker }
    }
}

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
