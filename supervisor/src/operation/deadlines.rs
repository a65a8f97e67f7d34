//! What a passed deadline does, in each operation: one table
//! ([`Summary::on_deadline`]), fed by the one place that knows each
//! operation's deadlines ([`Operation::due`], [`Operation::wakeup`]).

use super::{Operation, Summary};
use crate::inplace::{next_move, Move};
use tokio::time::Instant;

/// A deadline of the operation under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// `ready_timeout`: every worker of the new generation must be ready.
    Ready,
    /// An in-place reload's timeout for its phase (prepare or commit):
    /// every worker must have answered.
    Answers,
    /// `probation` is over: the new generation has proven itself.
    ProbationEnd,
    /// `upgrade_timeout`: the new master must be ready (or the new
    /// binary's check done).
    Handshake,
    /// An in-place upgrade's replies are written: time to exec.
    Exec,
    /// A failed upgrade's child has had its grace: it is killed.
    AbortGrace,
    /// `baton drain`'s grace is over: the workers stop serving.
    ServingEnds,
}

/// What a passed deadline does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The reload fails: workers not ready in time.
    FailReload,
    /// The in-place reload moves as [`next_move`] says for a late phase:
    /// abort (prepare), or kill the late workers and finish (commit).
    InPlace(Move),
    /// Probation ends: the new generation is promoted.
    Promote,
    /// The upgrade fails: the new master was not ready in time.
    FailUpgrade,
    /// The new image is exec'd.
    Exec,
    /// The failed upgrade's child is killed.
    KillUpgradeChild,
    /// The drained master's workers drain, as in a graceful stop.
    StopServing,
    /// The deadline of an operation that is not the one under way: nothing.
    Nothing,
}

impl Summary {
    /// What `deadline` does in this operation: the one place that decides
    /// it.
    pub fn on_deadline(self, deadline: Deadline) -> Expiry {
        use Deadline as D;
        use Summary as S;
        match (self, deadline) {
            (S::Starting, D::Ready) => Expiry::FailReload,
            (S::InPlace(phase), D::Answers) => Expiry::InPlace(next_move(phase, false, true)),
            (S::Probation { .. }, D::ProbationEnd) => Expiry::Promote,
            (S::Upgrading { .. }, D::Handshake) => Expiry::FailUpgrade,
            (S::Upgrading { .. }, D::Exec) => Expiry::Exec,
            // A stop keeps a failed upgrade's child until it is gone.
            (S::Upgrading { .. } | S::Stopping(_), D::AbortGrace) => Expiry::KillUpgradeChild,
            (S::Stopping(crate::master::Stop::Graceful), D::ServingEnds) => Expiry::StopServing,
            _ => Expiry::Nothing,
        }
    }
}

impl Operation {
    /// The deadline of the operation under way that has passed at `now`.
    /// `spawning`: the new generation's workers are not all started and
    /// back yet (its ready time is counted from then).
    pub fn due(&self, now: Instant, spawning: bool) -> Option<Deadline> {
        match self {
            Operation::Starting(reload)
                if !spawning && reload.ready_by().is_some_and(|by| now >= by) =>
            {
                Some(Deadline::Ready)
            }
            Operation::InPlace(transaction) if now >= transaction.deadline() => {
                Some(Deadline::Answers)
            }
            Operation::Probation(rollout) if rollout.until().is_some_and(|u| now >= u) => {
                Some(Deadline::ProbationEnd)
            }
            Operation::Stopping {
                serving_until: Some(until),
                ..
            } if now >= *until => Some(Deadline::ServingEnds),
            _ => self.upgrade().and_then(|u| u.due(now)),
        }
    }

    /// When the operation under way next needs the loop: now while a
    /// reload has sockets to make or workers to start, else its next
    /// deadline.
    pub fn wakeup(&self) -> Option<Instant> {
        match self {
            Operation::Starting(reload) => Some(reload.deadline()),
            Operation::InPlace(transaction) => Some(transaction.deadline()),
            Operation::Probation(rollout) => rollout.until(),
            Operation::Stopping { serving_until, .. } => serving_until
                .iter()
                .copied()
                .chain(self.upgrade().map(|u| u.deadline()))
                .min(),
            _ => self.upgrade().map(|u| u.deadline()),
        }
    }
}

#[cfg(test)]
mod tests;
