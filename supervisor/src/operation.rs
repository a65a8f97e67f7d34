//! What the master is doing: one value, [`Operation`], the one place that
//! says whether a request may start, is coalesced into a follow-up, or is
//! refused ([`Summary::admit`]), and the one that says what a worker's exit
//! means ([`Summary::on_worker_exit`]).
//!
//! A reload, an in-place reload, a probation, an upgrade and a stop exclude
//! each other: each is a variant holding what only it needs. A request
//! travels as a value ([`ReloadRequest`]) from the control socket or the
//! signal to the operation it starts; requests that come while a reload
//! runs become one [`FollowUp`], which answers all their waiters.

use crate::audit::Requester;
use crate::config::Share;
use crate::inplace::{InPlace, Mode};
use crate::master::{Stop, Waiter};
use crate::reload::{Outcome, Reload, Trigger, Validating};
use crate::rollout::Rollout;
use crate::upgrade::Upgrade;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

mod worker_exit;
pub use worker_exit::{exit_reason, Exited, ForOperation, ForWorker, Reaction};

/// The operation under way.
#[derive(Default)]
pub enum Operation {
    /// Serving; nothing else.
    #[default]
    Idle,
    /// A reload's configuration being read, off the event loop.
    Reading(Validating),
    /// A new generation being bound, spawned and waited for.
    Starting(Reload),
    /// An in-place reload: workers preparing, then committing.
    InPlace(InPlace),
    /// A new generation past cutover, on probation or a canary, the
    /// replaced one on standby.
    Probation(Rollout),
    /// A binary upgrade: waiting for the new master or the check, about to
    /// exec, or aborting a failed new master.
    Upgrading(Upgrade),
    /// Stopping. A failed upgrade's new master being stopped when the stop
    /// began stays here until it has exited.
    Stopping {
        /// Gracefully or fast.
        how: Stop,
        /// An aborting upgrade's child, still to be killed and reaped.
        upgrade: Option<Upgrade>,
        /// `baton drain`: the workers serve until then (readiness already
        /// says no), then drain.
        serving_until: Option<Instant>,
    },
}

macro_rules! accessors {
    ($variant:ident, $ty:ty, $get:ident, $get_mut:ident, $take:ident) => {
        #[doc = concat!("The [`", stringify!($ty), "`] if this is `", stringify!($variant), "`.")]
        pub fn $get(&self) -> Option<&$ty> {
            match self {
                Operation::$variant(inner) => Some(inner),
                _ => None,
            }
        }

        #[doc = concat!("The [`", stringify!($ty), "`] if this is `", stringify!($variant), "`, to change.")]
        pub fn $get_mut(&mut self) -> Option<&mut $ty> {
            match self {
                Operation::$variant(inner) => Some(inner),
                _ => None,
            }
        }

        #[doc = concat!("Ends a `", stringify!($variant), "` (the master is idle after it) and gives its state back; anything else stays.")]
        pub fn $take(&mut self) -> Option<$ty> {
            match std::mem::take(self) {
                Operation::$variant(inner) => Some(inner),
                other => {
                    *self = other;
                    None
                }
            }
        }
    };
}

impl Operation {
    accessors!(Reading, Validating, reading, reading_mut, take_reading);
    accessors!(Starting, Reload, reload, reload_mut, take_reload);
    accessors!(InPlace, InPlace, in_place, in_place_mut, take_in_place);
    accessors!(Probation, Rollout, rollout, rollout_mut, take_rollout);

    /// The upgrade under way, or a failed one still aborting during a stop.
    pub fn upgrade(&self) -> Option<&Upgrade> {
        match self {
            Operation::Upgrading(upgrade) => Some(upgrade),
            Operation::Stopping { upgrade, .. } => upgrade.as_ref(),
            _ => None,
        }
    }

    /// [`Operation::upgrade`], to change.
    pub fn upgrade_mut(&mut self) -> Option<&mut Upgrade> {
        match self {
            Operation::Upgrading(upgrade) => Some(upgrade),
            Operation::Stopping { upgrade, .. } => upgrade.as_mut(),
            _ => None,
        }
    }

    /// Ends the upgrade (a stop stays a stop) and gives it back.
    pub fn take_upgrade(&mut self) -> Option<Upgrade> {
        match self {
            Operation::Stopping { upgrade, .. } => upgrade.take(),
            Operation::Upgrading(_) => match std::mem::take(self) {
                Operation::Upgrading(upgrade) => Some(upgrade),
                _ => unreachable!("matched above"),
            },
            _ => None,
        }
    }

    /// The generation whose new workers wait for the in-place reload under
    /// way to end (they start with the version it leaves in service).
    pub fn spawns_held(&self) -> Option<u64> {
        self.in_place().map(|t| t.generation())
    }

    /// How the master is stopping, if it is.
    pub fn stopping(&self) -> Option<Stop> {
        match self {
            Operation::Stopping { how, .. } => Some(*how),
            _ => None,
        }
    }

    /// Starts `next` in place of idle. An operation is only started once
    /// [`Summary::admit`] said so, or by the step before it (reading →
    /// starting → probation): anything else is a bug, loud in tests.
    pub fn begin(&mut self, next: Operation) {
        debug_assert!(
            matches!(self, Operation::Idle),
            "{} started during {}",
            next.summary().name(),
            self.summary().name()
        );
        *self = next;
    }

    /// Becomes a stop, keeping a failed upgrade that is still aborting;
    /// whatever else ran must have been ended (abandoned) before.
    pub fn become_stopping(&mut self, how: Stop, serving_until: Option<Instant>) {
        let upgrade = self.take_upgrade();
        debug_assert!(
            matches!(self, Operation::Idle | Operation::Stopping { .. }),
            "stop began during {}",
            self.summary().name()
        );
        *self = Operation::Stopping {
            how,
            upgrade,
            serving_until,
        };
    }

    /// A drain's workers serve until then (see [`Operation::Stopping`]).
    pub fn serving_until(&self) -> Option<Instant> {
        match self {
            Operation::Stopping { serving_until, .. } => *serving_until,
            _ => None,
        }
    }

    /// A drain's grace is over: the workers drain from now on.
    pub fn stop_serving(&mut self) {
        if let Operation::Stopping { serving_until, .. } = self {
            *serving_until = None;
        }
    }

    /// What the admission decisions need to know of it.
    pub fn summary(&self) -> Summary {
        match self {
            Operation::Idle => Summary::Idle,
            Operation::Reading(_) => Summary::Reading,
            Operation::Starting(_) => Summary::Starting,
            Operation::InPlace(in_place) => Summary::InPlace(in_place.phase()),
            Operation::Probation(rollout) => Summary::Probation {
                generation: rollout.generation(),
                standby: rollout.standby(),
                left: rollout.left(),
            },
            Operation::Upgrading(upgrade) => Summary::Upgrading {
                child: upgrade.child(),
                elapsed: upgrade.elapsed(),
            },
            Operation::Stopping { how, .. } => Summary::Stopping(*how),
        }
    }
}

/// An operation as the decisions see it: which one, and the few facts a
/// refusal names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Summary {
    /// Serving; nothing else.
    Idle,
    /// A reload's configuration being read.
    Reading,
    /// A new generation being started.
    Starting,
    /// An in-place reload, in [`Phase::Prepare`](crate::reload::Phase)
    /// or `Commit`.
    InPlace(crate::reload::Phase),
    /// Probation.
    Probation {
        /// The generation on probation.
        generation: u64,
        /// The generation on standby.
        standby: u64,
        /// Time left (`None`: a canary waiting for `baton promote`).
        left: Option<Duration>,
    },
    /// A binary upgrade.
    Upgrading {
        /// The new master's or the check's pid.
        child: i32,
        /// Since it started.
        elapsed: Duration,
    },
    /// Stopping.
    Stopping(Stop),
}

/// What a request asks of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// A reload (SIGHUP, `baton reload`).
    Reload,
    /// A binary upgrade (SIGUSR2, `baton upgrade`).
    Upgrade,
    /// A new worker count (`baton scale`, SIGTTIN, SIGTTOU).
    Scale,
    /// A stop.
    Stop(Stop),
    /// `baton promote`.
    Promote,
    /// `baton rollback`.
    Rollback,
}

/// The fleet's facts an upgrade request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// A generation serves.
    pub serving: bool,
    /// Workers of a failed reload are still being started.
    pub spawns_pending: bool,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// It starts now.
    Start,
    /// It waits for the operation under way, as one follow-up.
    Coalesce,
    /// It is refused, for this reason.
    Refuse(Refusal),
    /// It is what is already happening (a second graceful stop).
    Already,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The master is stopping.
    Stopping,
    /// A reload during an upgrade.
    Upgrading,
    /// An upgrade during an upgrade.
    AlreadyUpgrading {
        /// The upgrade's child.
        child: i32,
        /// Since it started.
        elapsed: Duration,
    },
    /// An upgrade during probation.
    OnProbation {
        /// The generation on probation.
        generation: u64,
        /// The generation on standby.
        standby: u64,
        /// Time left.
        left: Option<Duration>,
    },
    /// An upgrade while a reload runs.
    ReloadForUpgrade,
    /// A scale while a reload starts a generation.
    ReloadForScale,
    /// An upgrade before any generation serves.
    NotServing,
    /// An upgrade while a failed reload's workers are still being started.
    SpawnsPending,
    /// A promote or rollback with nothing on probation.
    NotOnProbation,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Stopping => f.write_str("the master is stopping"),
            Refusal::Upgrading => f.write_str("a binary upgrade is in progress"),
            Refusal::AlreadyUpgrading { child, elapsed } => write!(
                f,
                "an upgrade is already in progress (pid {child}, started {elapsed:?} ago)"
            ),
            // Probation may last long (a canary without `probation` waits
            // for `baton promote`): an upgrade that waited for it would
            // leave its caller hanging, so it says what to do instead.
            Refusal::OnProbation {
                generation,
                standby,
                left,
            } => {
                let left = left
                    .map(|s| format!("{:.0}s left", s.as_secs_f64()))
                    .unwrap_or_else(|| "until promoted".into());
                write!(
                    f,
                    "generation {generation} is on probation ({left}, generation {standby} on standby); run `baton promote` or `baton rollback`, or upgrade once probation has ended"
                )
            }
            Refusal::ReloadForUpgrade => {
                f.write_str("a reload is in progress; upgrade once it has finished")
            }
            Refusal::ReloadForScale => {
                f.write_str("a reload is in progress; scale once it has finished")
            }
            Refusal::NotServing => f.write_str("no generation is serving yet"),
            // A failed reload's workers still being started: they are
            // stopped as they come back, within milliseconds.
            Refusal::SpawnsPending => {
                f.write_str("workers are being started; upgrade once they are")
            }
            Refusal::NotOnProbation => {
                f.write_str("no reload is on probation (nothing to promote or roll back)")
            }
        }
    }
}

impl Summary {
    /// Whether `ask` starts now, waits as the follow-up, or is refused:
    /// the one place that decides it.
    pub fn admit(self, ask: Ask, facts: Facts) -> Admission {
        use Admission::{Already, Coalesce, Refuse, Start};
        use Summary as S;
        match (self, ask) {
            // A fast stop overrides a graceful one; nothing overrides a fast one.
            (S::Stopping(Stop::Fast), Ask::Stop(_)) => Already,
            (S::Stopping(how), Ask::Stop(asked)) if how == asked => Already,
            (_, Ask::Stop(_)) => Start,
            (S::Stopping(_), Ask::Reload | Ask::Upgrade | Ask::Scale) => Refuse(Refusal::Stopping),
            (S::Probation { .. }, Ask::Promote | Ask::Rollback) => Start,
            (_, Ask::Promote | Ask::Rollback) => Refuse(Refusal::NotOnProbation),

            (S::Upgrading { .. }, Ask::Reload) => Refuse(Refusal::Upgrading),
            (S::Reading | S::Starting | S::InPlace(_) | S::Probation { .. }, Ask::Reload) => {
                Coalesce
            }
            (S::Idle, Ask::Reload) => Start,

            (S::Upgrading { child, elapsed }, Ask::Upgrade) => {
                Refuse(Refusal::AlreadyUpgrading { child, elapsed })
            }
            (
                S::Probation {
                    generation,
                    standby,
                    left,
                },
                Ask::Upgrade,
            ) => Refuse(Refusal::OnProbation {
                generation,
                standby,
                left,
            }),
            (S::Reading | S::Starting | S::InPlace(_), Ask::Upgrade) => {
                Refuse(Refusal::ReloadForUpgrade)
            }
            (S::Idle, Ask::Upgrade) if !facts.serving => Refuse(Refusal::NotServing),
            (S::Idle, Ask::Upgrade) if facts.spawns_pending => Refuse(Refusal::SpawnsPending),
            (S::Idle, Ask::Upgrade) => Start,

            // New workers of an in-place reload's generation start when it
            // ends (see `crate::inplace`); a probation's current generation
            // scales as any other.
            (S::Reading | S::Starting, Ask::Scale) => Refuse(Refusal::ReloadForScale),
            (S::Idle | S::InPlace(_) | S::Probation { .. } | S::Upgrading { .. }, Ask::Scale) => {
                Start
            }
        }
    }

    /// Its name, as logs and status show it.
    pub fn name(&self) -> &'static str {
        match self {
            Summary::Idle => "idle",
            Summary::Reading => "reading",
            Summary::Starting => "starting",
            Summary::InPlace(_) => "in_place",
            Summary::Probation { .. } => "probation",
            Summary::Upgrading { .. } => "upgrading",
            Summary::Stopping(_) => "stopping",
        }
    }
}

/// A reload request, from a signal or the control socket to the
/// transaction that serves it.
#[derive(Debug)]
pub struct ReloadRequest {
    /// What asked.
    pub trigger: Trigger,
    /// `baton reload --canary`.
    pub canary: Option<Share>,
    /// `baton reload --in-place` or `--new-generation`.
    pub mode: Mode,
    /// Who asked.
    pub requested_by: Option<Requester>,
    /// Where the outcome goes (a CLI request waits for it).
    pub waiters: Vec<Waiter>,
    /// The deploy tool's version (see `Request::Reload`).
    pub if_version: Option<String>,
}

impl ReloadRequest {
    /// A request by `trigger`, asked by `requested_by`.
    pub fn new(trigger: Trigger, requested_by: Option<Requester>) -> ReloadRequest {
        ReloadRequest {
            trigger,
            canary: None,
            mode: Mode::Auto,
            requested_by,
            waiters: Vec::new(),
            if_version: None,
        }
    }
}

/// The reload that runs after the one under way: every request that came
/// meanwhile, as one.
#[derive(Debug, Default)]
pub struct FollowUp(Option<ReloadRequest>);

impl FollowUp {
    /// Adds a request: the follow-up answers its waiters too, and takes its
    /// requester, canary and mode when it names them (the last one asked
    /// wins).
    pub fn absorb(&mut self, request: ReloadRequest) {
        let follow_up = self
            .0
            .get_or_insert_with(|| ReloadRequest::new(Trigger::Coalesced, None));
        follow_up.waiters.extend(request.waiters);
        follow_up.requested_by = request.requested_by.or(follow_up.requested_by.take());
        follow_up.canary = request.canary.or(follow_up.canary);
        if request.mode != Mode::Auto {
            follow_up.mode = request.mode;
        }
        if request.if_version.is_some() {
            follow_up.if_version = request.if_version;
        }
    }

    /// Whether one is waiting.
    pub fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    /// The follow-up, to start now.
    pub fn take(&mut self) -> Option<ReloadRequest> {
        self.0.take()
    }

    /// Drops it (the master is stopping); its waiters hear that.
    pub fn cancel(&mut self, reason: &str) {
        if let Some(request) = self.0.take() {
            for waiter in request.waiters {
                let _ = waiter.send(crate::control::protocol::Reply::error(format!(
                    "reload refused: {reason}"
                )));
            }
        }
    }
}

/// The reloads' bookkeeping: who waits for the one under way, the
/// follow-up that runs after it, and how the last one ended.
#[derive(Default)]
pub struct Reloads {
    /// `baton reload` clients waiting for the running transaction.
    waiters: Vec<Waiter>,
    follow_up: FollowUp,
    last: Option<Outcome>,
    /// The deploy version (`if_version`) of the transaction under way.
    deploying: Option<String>,
}

impl Reloads {
    /// `waiters` get the outcome of the transaction starting now.
    pub fn wait_for_running(&mut self, waiters: Vec<Waiter>) {
        self.waiters.extend(waiters);
    }

    /// `request` came during a transaction: it joins the follow-up.
    pub fn coalesce(&mut self, request: ReloadRequest) {
        self.follow_up.absorb(request);
    }

    /// Drops the follow-up (the master is stopping); its waiters hear why.
    pub fn cancel_follow_up(&mut self, reason: &str) {
        self.follow_up.cancel(reason);
    }

    /// The running transaction ended: its waiters, to be answered.
    pub fn take_waiters(&mut self) -> Vec<Waiter> {
        std::mem::take(&mut self.waiters)
    }

    /// The running transaction rolls out this deploy version.
    pub fn deploying(&mut self, version: Option<String>) {
        self.deploying = version;
    }

    /// The deploy version of the transaction that ended.
    pub fn take_deploying(&mut self) -> Option<String> {
        self.deploying.take()
    }

    /// Keeps how the transaction ended, for `baton status`.
    pub fn keep(&mut self, outcome: Outcome) {
        self.last = Some(outcome);
    }

    /// How the last transaction ended.
    pub fn last(&self) -> Option<&Outcome> {
        self.last.as_ref()
    }

    /// The follow-up, to start now.
    pub fn take_follow_up(&mut self) -> Option<ReloadRequest> {
        self.follow_up.take()
    }
}

mod deadlines;
pub use deadlines::{Deadline, Expiry};

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;
