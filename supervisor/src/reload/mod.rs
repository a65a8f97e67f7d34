//! The reload transaction: validate → bind → spawn → ready → commit (see
//! docs/architecture.md). Any failure before commit stops the new generation and leaves
//! the current one serving untouched.

use crate::audit::Requester;
use crate::config::{Config, Protocol, ReadyMode};
use crate::control::protocol::{PhaseTime, ReloadOutcome};
use crate::endpoints::Endpoints;
use crate::fleet::Fleet;
use crate::listener::Shared;
use crate::operation::ReloadRequest;
use crate::probe::Probing;
use crate::worker::State;
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::Span;

mod finish;
mod start;

pub use finish::Settled;

/// A phase of the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Parse and check the configuration.
    Validate,
    /// Keep unchanged listeners, bind new ones.
    Bind,
    /// Start the new generation.
    Spawn,
    /// Wait until every new worker is ready.
    Ready,
    /// In place: every worker builds the new application config.
    Prepare,
    /// After cutover: the replaced generation on standby until the new one
    /// has proven itself (or is rolled back).
    Probation,
    /// Switch over; drain the old generation.
    Commit,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Phase {
    /// Its name, as logs, status and traces show it.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Validate => "validate",
            Phase::Bind => "bind",
            Phase::Spawn => "spawn",
            Phase::Ready => "ready",
            Phase::Prepare => "prepare",
            Phase::Probation => "probation",
            Phase::Commit => "commit",
        }
    }
}

/// The child span of `reload` for `phase` (named after the phase in
/// exported traces).
pub(crate) fn phase_span(reload: &Span, phase: Phase) -> Span {
    tracing::info_span!(parent: reload, "phase", otel.name = phase.name(), phase = phase.name())
}

/// What started a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The master's own start (generation 1).
    Start,
    /// SIGHUP.
    Signal,
    /// `baton reload`.
    Cli,
    /// `POST /reload` on the admin endpoint.
    Admin,
    /// A reload requested while another ran, run after it.
    Coalesced,
    /// A new master's first generation, after a binary upgrade.
    Upgrade,
    /// A new master's first generation, after `baton restart`.
    Restart,
    /// A watched file changed (`baton run --watch`).
    Watch,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Start => "start",
            Trigger::Signal => "signal",
            Trigger::Cli => "cli",
            Trigger::Admin => "admin",
            Trigger::Coalesced => "coalesced",
            Trigger::Upgrade => "upgrade",
            Trigger::Restart => "restart",
            Trigger::Watch => "watch",
        })
    }
}

/// How a finished transaction ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The generation it started (or would have).
    pub generation: u64,
    /// What started it.
    pub trigger: Trigger,
    /// `None` when committed; otherwise the failing phase and reason.
    pub failure: Option<(Phase, String)>,
    /// Each phase reached, with its duration.
    pub phases: Vec<(Phase, Duration)>,
    /// When it ended.
    pub finished: SystemTime,
    /// The config version it applied (when committed).
    pub version: Option<String>,
    /// The deploy tool's version (`if_version`) it committed.
    pub deploy_version: Option<String>,
    /// Who asked for it.
    pub requested_by: Option<Requester>,
}

impl Outcome {
    /// The outcome as the control protocol reports it.
    pub fn report(&self, pids: Vec<i32>) -> ReloadOutcome {
        ReloadOutcome {
            generation: self.generation,
            trigger: self.trigger.to_string(),
            outcome: if self.failure.is_none() {
                "committed"
            } else {
                "failed"
            }
            .into(),
            failed_phase: self.failure.as_ref().map(|(p, _)| p.to_string()),
            reason: self.failure.as_ref().map(|(_, r)| r.clone()),
            phases: self
                .phases
                .iter()
                .map(|(p, d)| PhaseTime {
                    phase: p.to_string(),
                    ms: millis(*d),
                })
                .collect(),
            kind: if self.phases.iter().any(|(p, _)| *p == Phase::Prepare) {
                "in_place"
            } else {
                "new_generation"
            }
            .into(),
            version: self.version.clone(),
            deploy_version: self.deploy_version.clone(),
            pids,
            requested_by: self.requested_by.clone(),
            finished_at: self
                .finished
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
}

/// Milliseconds, to the microsecond: readable in logs and status.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// How a transaction ended: what its [`Outcome`] is made of, for the
/// master to record.
#[derive(Debug)]
pub struct Ended {
    /// The generation it started (or would have).
    pub generation: u64,
    /// What started it.
    pub trigger: Trigger,
    /// Who asked for it.
    pub requested_by: Option<Requester>,
    /// Each phase's duration.
    pub phases: Vec<(Phase, Duration)>,
    /// The phase it failed in, and why; `None`: committed.
    pub failure: Option<(Phase, String)>,
}

/// A transaction as it starts: running, or ended at once.
#[derive(Debug)]
pub enum Started<T> {
    /// Under way.
    Running(T),
    /// Over already (it failed before anything was under way).
    Ended(Box<Ended>),
}

/// A reload whose configuration is being read, off the event loop.
#[derive(Debug)]
pub struct Validating {
    /// What was asked (its waiters already wait for the transaction).
    request: ReloadRequest,
}

impl Validating {
    /// `request`'s configuration is being read.
    pub fn new(request: ReloadRequest) -> Validating {
        Validating { request }
    }

    /// The configuration has been read: what was asked.
    pub fn into_request(self) -> ReloadRequest {
        self.request
    }
}

/// A transaction waiting for its new workers to be ready.
#[derive(Debug)]
pub struct Reload {
    trigger: Trigger,
    generation: u64,
    span: Span,
    /// The child span of the phase under way (ready, probation, commit).
    phase_span: Span,
    phases: Vec<(Phase, Duration)>,
    phase_started: Instant,
    ready_deadline: Instant,
    /// In the bind phase, for workers with sockets of their own: the
    /// generation sockets made so far, one per listener in order.
    binding: Option<Vec<Shared>>,
    /// The index of the next worker to spawn, until all are (those started
    /// and not back yet are the generation's pending ones).
    spawning: Option<u32>,
    config: Rc<Config>,
    listeners: Vec<Shared>,
    processes: u32,
    /// `baton reload --canary`.
    canary: Option<crate::config::Share>,
    /// Who asked for it.
    requested_by: Option<Requester>,
    /// A new admin endpoint, when the reload changes `[supervisor] admin`.
    admin: Option<Option<crate::admin::AdminSocket>>,
}

impl Reload {
    /// The configuration it starts.
    pub fn config(&self) -> &Rc<Config> {
        &self.config
    }

    /// The canary share asked for with `baton reload --canary`.
    pub fn canary(&self) -> Option<crate::config::Share> {
        self.canary
    }

    /// Its span.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// What started it.
    pub fn trigger(&self) -> Trigger {
        self.trigger
    }

    /// Who asked for it, taken out.
    pub fn take_requested_by(&mut self) -> Option<Requester> {
        self.requested_by.take()
    }

    /// Its phases so far, taken out.
    pub fn take_phases(&mut self) -> Vec<(Phase, Duration)> {
        std::mem::take(&mut self.phases)
    }

    /// The generation being started.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether it binds or spawns a step a turn now.
    fn stepping(&self) -> bool {
        self.binding.is_some() || self.spawning.is_some()
    }

    /// When the transaction must be moved on: now while sockets are left to
    /// make or workers to spawn, then when the new workers must all be
    /// ready.
    pub fn deadline(&self) -> Instant {
        self.ready_by().unwrap_or_else(Instant::now)
    }

    /// When its workers must all be ready: not while it binds or spawns a
    /// step a turn.
    pub fn ready_by(&self) -> Option<Instant> {
        (!self.stepping()).then_some(self.ready_deadline)
    }

    /// Opens the child span of `phase`.
    pub(crate) fn begin_phase(&mut self, phase: Phase) {
        self.phase_span = phase_span(&self.span, phase);
    }

    pub(crate) fn end_phase(&mut self, phase: Phase) {
        self.phase_span = Span::none();
        let now = Instant::now();
        self.phases.push((phase, now - self.phase_started));
        self.phase_started = now;
    }
}

impl Reload {
    /// Starts a new generation's transaction, as `request` asked, for the
    /// configuration read (`loaded`): validate, then bind (the listeners
    /// `fleet` keeps, new ones bound, a new admin endpoint if `endpoints`
    /// has another). It ends at once, failed, when the configuration or a
    /// bind fails. `started`: when the request began, `validated` counted
    /// from then.
    pub fn begin(
        request: ReloadRequest,
        loaded: Result<Config, String>,
        started: Instant,
        fleet: &mut Fleet,
        endpoints: &Endpoints,
    ) -> Started<Reload> {
        let ReloadRequest {
            trigger,
            canary,
            requested_by,
            ..
        } = request;
        let generation = fleet.next_number();
        // A root: a coalesced follow-up starts inside the previous reload.
        let span = tracing::info_span!(parent: None, "reload", generation, %trigger, config_hash = tracing::field::Empty);
        let mut phases = Vec::new();
        let _enter = span.clone().entered();
        match &requested_by {
            Some(by) => {
                tracing::info!(event = "reload.started", requested_by = %by, "reload started")
            }
            None => tracing::info!(event = "reload.started", "reload started"),
        }
        if trigger != Trigger::Start && trigger != Trigger::Upgrade {
            crate::sd_notify::reloading(generation);
        }
        let failed = |phases, phase, reason| {
            Started::Ended(Box::new(Ended {
                generation,
                trigger,
                requested_by: requested_by.clone(),
                phases,
                failure: Some((phase, reason)),
            }))
        };
        let validating = phase_span(&span, Phase::Validate);
        let config = match loaded {
            Ok(config) => Rc::new(config),
            Err(reason) => {
                phases.push((Phase::Validate, started.elapsed()));
                return failed(phases, Phase::Validate, reason);
            }
        };
        span.record("config_hash", config.hash.as_str());
        let phase_started = Instant::now();
        phases.push((Phase::Validate, phase_started - started));
        drop(validating);
        let binding = phase_span(&span, Phase::Bind);
        let steered = config.worker.steers_generations() || canary.is_some();
        let bound = endpoints
            .rebind_admin(&config)
            .and_then(|admin| Ok((start::bind(fleet, &config)?, admin)));
        let (listeners, admin) = match bound {
            Ok(bound) => bound,
            Err(e) => {
                phases.push((Phase::Bind, phase_started.elapsed()));
                return failed(phases, Phase::Bind, format!("{e:#}"));
            }
        };
        let processes = fleet.processes_for(&config);
        // SDK workers share the listeners; others get sockets of their own,
        // made a few ports a turn.
        let shared = config.worker.protocol == Protocol::Sdk && !steered;
        drop(_enter);
        Started::Running(Reload {
            trigger,
            generation,
            phase_span: binding,
            span,
            phases,
            phase_started,
            ready_deadline: Instant::now() + config.worker.ready_timeout.0,
            binding: (!shared).then(Vec::new),
            spawning: None,
            config,
            listeners,
            processes,
            canary,
            admin,
            requested_by,
        })
    }

    /// Whether it makes generation sockets of its own a chunk a turn (else
    /// its workers share the listeners, and its generation starts at once).
    pub fn binds(&self) -> bool {
        self.binding.is_some()
    }

    /// The listeners, when its workers share them (it does not bind).
    pub fn shared_sockets(&self) -> Option<Vec<Shared>> {
        (!self.binds()).then(|| self.listeners.clone())
    }

    /// Once its workers are all started and back: marks the delay-ready
    /// ones of `fleet`'s new generation ready, and says whether every new
    /// worker is ready (the reload commits).
    pub fn ready(&self, fleet: &mut Fleet) -> bool {
        if self.binds() || self.spawn_phase_open(fleet) {
            return false;
        }
        let Some(new) = fleet.get_mut(self.generation) else {
            return false;
        };
        if let ReadyMode::Delay(delay) = new.config().worker.ready {
            for worker in new.workers_mut() {
                if worker.state() == State::Starting && worker.started().elapsed() >= delay {
                    worker.become_ready();
                }
            }
        }
        new.all_ready()
    }

    /// Why it fails at `ready_timeout`: the workers not ready (and the last
    /// failure of `probing`, if it probes this generation).
    pub fn not_ready(&self, fleet: &Fleet, probing: Option<&Probing>) -> String {
        let waiting: Vec<String> = fleet
            .get(self.generation)
            .into_iter()
            .flat_map(|new| new.workers().values())
            .filter(|w| w.state() != State::Ready)
            .map(|w| format!("worker {} (pid {})", w.index(), w.pid()))
            .collect();
        let timeout = self.config.worker.ready_timeout.0;
        let last_probe = probing
            .filter(|p| p.generation == self.generation)
            .and_then(|p| p.last_failure.as_ref())
            .map(|f| format!(" (last probe: {f})"))
            .unwrap_or_default();
        format!(
            "{} not ready within {timeout:?}{last_probe}",
            waiting.join(", ")
        )
    }

    /// When a delay-ready worker of its generation becomes ready, for the
    /// event loop's timer.
    pub fn delay_ready_at(&self, fleet: &Fleet) -> Option<Instant> {
        let new = fleet.get(self.generation)?;
        let ReadyMode::Delay(delay) = new.config().worker.ready else {
            return None;
        };
        new.workers()
            .values()
            .filter(|w| w.state() == State::Starting)
            .map(|w| w.started() + delay)
            .min()
    }
}
