//! The reload transaction: validate → bind → spawn → ready → commit (see
//! docs/architecture.md). Any failure before commit stops the new generation and leaves
//! the current one serving untouched.

use crate::audit::Requester;
use crate::config::{Config, Protocol, ReadyMode};
use crate::control::protocol::{PhaseTime, ReloadOutcome, Reply};
use crate::listener::Shared;
use crate::master::{Event, Master};
use crate::operation::{Admission, Ask, Facts, Operation, ReloadRequest};
use crate::worker::State;
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::Span;

mod finish;
mod start;

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
    /// A reload requested while another ran, run after it.
    Coalesced,
    /// A new master's first generation, after a binary upgrade.
    Upgrade,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Start => "start",
            Trigger::Signal => "signal",
            Trigger::Cli => "cli",
            Trigger::Coalesced => "coalesced",
            Trigger::Upgrade => "upgrade",
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
    Ended(Ended),
}

/// A reload whose configuration is being read, off the event loop.
#[derive(Debug)]
pub struct Validating {
    /// What was asked (its waiters already wait for the transaction).
    request: ReloadRequest,
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

impl Master {
    /// A reload request (signal or CLI): runs now, or is coalesced into one
    /// follow-up if a transaction is under way. Its waiters get the outcome
    /// of the transaction that serves the request.
    pub fn request_reload(&mut self, mut request: ReloadRequest) {
        let trigger = request.trigger;
        match self
            .operation
            .summary()
            .admit(Ask::Reload, Facts::default())
        {
            Admission::Refuse(reason) => {
                tracing::warn!(%trigger, %reason, "reload refused");
                // `Type=notify-reload` sent this SIGHUP and waits for
                // RELOADING=1 and READY=1: a refused reload is one that
                // ended at once.
                let stopping = self.operation.stopping().is_some();
                if trigger == Trigger::Signal && !stopping && self.endpoints.main_process() {
                    crate::sd_notify::reload_refused(
                        self.fleet.current_number(),
                        &reason.to_string(),
                    );
                }
                for waiter in request.waiters {
                    let _ = waiter.send(Reply::error(format!("reload refused: {reason}")));
                }
            }
            Admission::Coalesce => {
                tracing::info!(%trigger, "reload requested during a reload: coalesced into one follow-up");
                self.reloads.coalesce(request);
            }
            Admission::Start | Admission::Already => {
                self.reloads
                    .wait_for_running(std::mem::take(&mut request.waiters));
                self.operation
                    .begin(Operation::Reading(Validating { request }));
                // Reading the file may be slow (a network file system): off
                // the event loop, its result comes back as an event.
                let path = self.config.path.clone();
                let events = self.events.clone();
                tokio::task::spawn_blocking(move || {
                    let loaded = Config::load(&path).map_err(|e| e.to_string());
                    let _ = events.send(Event::ConfigLoaded(Box::new(loaded)));
                });
            }
        }
    }

    /// Whether a transaction runs: its configuration being read, or its new
    /// generation being started.
    pub fn transaction_running(&self) -> bool {
        matches!(
            self.operation,
            Operation::Reading(_) | Operation::Starting(_)
        )
    }

    /// The configuration a reload asked for has been read: the transaction
    /// goes on, unless the master started stopping meanwhile.
    pub fn on_config_loaded(&mut self, loaded: Result<Config, String>) {
        if let Some(validating) = self.operation.take_reading() {
            self.begin_reload(validating.request, loaded);
        }
    }

    /// Runs validate and bind, and starts spawning; leaves the transaction
    /// running, or finishes it with a failure; or runs it in place (see
    /// [`crate::inplace`]), as `request` asked (its `--canary` share, its
    /// `--in-place` or `--new-generation`).
    pub fn begin_reload(&mut self, request: ReloadRequest, loaded: Result<Config, String>) {
        let ReloadRequest {
            trigger,
            canary,
            mode,
            requested_by,
            ..
        } = request;
        let started = Instant::now();
        let reloading = matches!(trigger, Trigger::Signal | Trigger::Cli | Trigger::Coalesced);
        let loaded = match loaded {
            Ok(config) if reloading && mode != crate::inplace::Mode::NewGeneration => {
                match crate::inplace::InPlace::possible(&self.fleet, &config) {
                    Ok(number) => {
                        let span = tracing::info_span!(parent: None, "reload", generation = number, %trigger, kind = "in_place", config_hash = %config.hash, version = %config.app.version);
                        span.in_scope(|| {
                            tracing::info!(event = "reload.started", "reload started")
                        });
                        crate::sd_notify::reloading(number);
                        return self.begin_in_place(
                            trigger,
                            requested_by,
                            number,
                            Rc::new(config),
                            span,
                            started.elapsed(),
                        );
                    }
                    Err(reason) if mode == crate::inplace::Mode::InPlace => {
                        let generation = self.fleet.current_number().unwrap_or(0);
                        let phases = vec![(Phase::Validate, started.elapsed())];
                        let reason = format!("cannot reload in place: {reason}");
                        return self.record(
                            generation,
                            trigger,
                            requested_by,
                            phases,
                            Some((Phase::Validate, reason)),
                        );
                    }
                    Err(reason) => {
                        if !config.worker.app_config.is_empty() {
                            tracing::info!(%reason, "reload with a new generation");
                        }
                        Ok(config)
                    }
                }
            }
            other => other,
        };
        let generation = self.fleet.next_number();
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

        let validating = phase_span(&span, Phase::Validate);
        let config = match loaded {
            Ok(config) => Rc::new(config),
            Err(reason) => {
                phases.push((Phase::Validate, started.elapsed()));
                let failure = Some((Phase::Validate, reason));
                return self.record(generation, trigger, requested_by, phases, failure);
            }
        };
        span.record("config_hash", config.hash.as_str());
        let phase_started = Instant::now();
        phases.push((Phase::Validate, phase_started - started));
        drop(validating);
        let binding = phase_span(&span, Phase::Bind);

        let steered = config.worker.steers_generations() || canary.is_some();
        let bound = self
            .endpoints
            .rebind_admin(&config)
            .and_then(|admin| Ok((self.bind(&config)?, admin)));
        let (listeners, admin) = match bound {
            Ok(bound) => bound,
            Err(e) => {
                phases.push((Phase::Bind, phase_started.elapsed()));
                return self.record(
                    generation,
                    trigger,
                    requested_by,
                    phases,
                    Some((Phase::Bind, format!("{e:#}"))),
                );
            }
        };
        let processes = self.fleet.processes_for(&config);
        // SDK workers share the listeners; others get sockets of their own,
        // made a few ports a turn.
        let shared = config.worker.protocol == Protocol::Sdk && !steered;
        let reload = Reload {
            trigger,
            generation,
            phase_span: binding,
            span: span.clone(),
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
        };
        if shared {
            let sockets = reload.listeners.clone();
            return self.start_generation(reload, sockets);
        }
        self.operation
            .begin(crate::operation::Operation::Starting(reload));
    }

    /// Moves the transaction one step, from the loop's tick: a chunk of the
    /// bind phase, or one worker spawned.
    pub(crate) fn step_reload(&mut self) {
        match self.operation.reload() {
            Some(reload) if reload.binding.is_some() => self.bind_next(),
            Some(_) => self.spawn_next(),
            None => {}
        }
    }

    /// Moves the transaction on after an event: marks delay-ready workers,
    /// commits when all are ready (its deadline is the loop's, see
    /// [`Master::fail_not_ready`]).
    pub fn advance_reload(&mut self) {
        let Some(reload) = self.operation.reload() else {
            return;
        };
        // Binding and spawning go on from the loop's tick, a step a turn,
        // and the spawn phase ends when every worker has come back.
        if reload.binding.is_some() || self.spawn_phase_open(reload) {
            return;
        }
        let generation = reload.generation;
        let Some(new) = self.fleet.get_mut(generation) else {
            return;
        };
        if let ReadyMode::Delay(delay) = new.config().worker.ready {
            for worker in new.workers_mut() {
                if worker.state() == State::Starting && worker.started().elapsed() >= delay {
                    worker.become_ready();
                }
            }
        }
        if new.all_ready() {
            let reload = self.operation.take_reload().expect("checked above");
            self.commit(reload);
        }
    }

    /// `ready_timeout` passed: the reload fails, naming the workers not
    /// ready (and the last probe's failure).
    pub(crate) fn fail_not_ready(&mut self) {
        let Some(reload) = self.operation.take_reload() else {
            return;
        };
        let generation = reload.generation;
        let waiting: Vec<String> = self
            .fleet
            .get(generation)
            .into_iter()
            .flat_map(|new| new.workers().values())
            .filter(|w| w.state() != State::Ready)
            .map(|w| format!("worker {} (pid {})", w.index(), w.pid()))
            .collect();
        let timeout = reload.config.worker.ready_timeout.0;
        let last_probe = self
            .probing
            .as_ref()
            .filter(|p| p.generation == generation)
            .and_then(|p| p.last_failure.as_ref())
            .map(|f| format!(" (last probe: {f})"))
            .unwrap_or_default();
        self.abort(
            reload,
            Phase::Ready,
            format!(
                "{} not ready within {timeout:?}{last_probe}",
                waiting.join(", ")
            ),
        );
    }

    /// A worker of the starting generation exited before it was ready.
    pub fn new_worker_exited(&mut self, reason: String) {
        if let Some(reload) = self.operation.take_reload() {
            self.abort(reload, Phase::Ready, reason);
        }
    }

    /// When a delay-ready worker becomes ready, for the event loop's timer.
    pub fn delay_ready_deadline(&self) -> Option<Instant> {
        let reload = self.operation.reload()?;
        let new = self.fleet.get(reload.generation)?;
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
