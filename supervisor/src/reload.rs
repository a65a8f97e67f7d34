//! The reload transaction: validate → bind → spawn → ready → commit (see
//! docs/architecture.md). Any failure before commit stops the new generation and leaves
//! the current one serving untouched.

use crate::audit::Requester;
use crate::config::{Config, ListenerAddress, Protocol, ReadyMode};
use crate::control::protocol::{PhaseTime, ReloadOutcome, Reply};
use crate::generation::{Generation, Phase};
use crate::listener::{Listener, Shared};
use crate::master::{Event, Master, Waiter};
use crate::steering::Listening;
use crate::worker::State;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::Span;

/// A phase of the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
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

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Step {
    /// Its name, as logs, status and traces show it.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Validate => "validate",
            Step::Bind => "bind",
            Step::Spawn => "spawn",
            Step::Ready => "ready",
            Step::Prepare => "prepare",
            Step::Probation => "probation",
            Step::Commit => "commit",
        }
    }
}

/// Generation sockets made per turn of the event loop in the bind phase:
/// each takes tens of microseconds, plus two looks at the kernel's list of
/// listening sockets per chunk.
const BIND_CHUNK: usize = 128;

/// A TCP socket of its own on each port of `listeners`, for a generation of
/// workers that are not SDK workers (which stop accepting when told to
/// drain), or steered between generations (probes, probation, canaries; see
/// [`crate::rollout`]). A port new to this reload (not in `current`) is
/// steered to the new generation at once: nobody else serves it.
///
/// The kernel is asked which sockets listen on the ports twice per call,
/// before the new sockets are made and after, not twice per port.
fn generation_sockets(
    listeners: &[Shared],
    current: &HashSet<*const Listener>,
) -> anyhow::Result<Vec<Shared>> {
    let before = Listening::snapshot();
    let made = listeners
        .iter()
        .map(|l| Listener::for_generation(l, &before))
        .collect::<anyhow::Result<Vec<Shared>>>()?;
    let after = Listening::snapshot();
    let sockets: Vec<Shared> = made
        .into_iter()
        .map(|socket| Listener::confirm(socket, &after))
        .collect();
    for (listener, socket) in listeners.iter().zip(&sockets) {
        if !current.contains(&Rc::as_ptr(listener)) {
            socket.steer_here()?;
        }
    }
    Ok(sockets)
}

/// The child span of `reload` for phase `step` (named after the phase in
/// exported traces).
pub(crate) fn phase_span(reload: &Span, step: Step) -> Span {
    tracing::info_span!(parent: reload, "phase", otel.name = step.name(), phase = step.name())
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
    pub failure: Option<(Step, String)>,
    /// Each phase reached, with its duration.
    pub phases: Vec<(Step, Duration)>,
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
            kind: if self.phases.iter().any(|(p, _)| *p == Step::Prepare) {
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

/// The sockets among `old` that new connections no longer go to: those
/// whose port the new generation serves on a socket of its own.
pub fn steered_away(old: &[Shared], new: &[Shared]) -> Vec<Shared> {
    let new_by_port: HashMap<*const Listener, &Shared> = new
        .iter()
        .map(|n| (n.port() as *const Listener, n))
        .collect();
    old.iter()
        .filter(|o| o.steerable())
        .filter(|o| {
            new_by_port
                .get(&(o.port() as *const Listener))
                .is_some_and(|n| !Rc::ptr_eq(n, o))
        })
        .cloned()
        .collect()
}

/// Milliseconds, to the microsecond: readable in logs and status.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A reload whose configuration is being read, off the event loop.
#[derive(Debug)]
pub struct Validating {
    trigger: Trigger,
    /// `baton reload --canary`'s share for this reload.
    canary: Option<crate::config::Share>,
    /// `baton reload --in-place` or `--new-generation`.
    mode: crate::inplace::Mode,
    /// Who asked for it.
    requested_by: Option<Requester>,
}

/// A transaction waiting for its new workers to be ready.
#[derive(Debug)]
pub struct Reload {
    trigger: Trigger,
    generation: u64,
    span: Span,
    /// The child span of the phase under way (ready, probation, commit).
    phase_span: Span,
    phases: Vec<(Step, Duration)>,
    phase_started: Instant,
    ready_deadline: Instant,
    /// In the bind phase, for workers with sockets of their own: the
    /// generation sockets made so far, one per listener in order.
    binding: Option<Vec<Shared>>,
    /// The index of the next worker to spawn, until all are.
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
    pub fn take_phases(&mut self) -> Vec<(Step, Duration)> {
        std::mem::take(&mut self.phases)
    }

    /// The generation being started.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the transaction must be moved on: now while sockets are left to
    /// make or workers to spawn, then when the new workers must all be
    /// ready.
    pub fn deadline(&self) -> Instant {
        if self.binding.is_some() || self.spawning.is_some() {
            Instant::now()
        } else {
            self.ready_deadline
        }
    }

    /// Opens the child span of phase `step`.
    pub(crate) fn begin_phase(&mut self, step: Step) {
        self.phase_span = phase_span(&self.span, step);
    }

    pub(crate) fn end_phase(&mut self, step: Step) {
        self.phase_span = Span::none();
        let now = Instant::now();
        self.phases.push((step, now - self.phase_started));
        self.phase_started = now;
    }
}

impl Master {
    /// A reload request (signal or CLI): runs now, or is coalesced into one
    /// follow-up if a transaction is under way. `waiter` gets the outcome of
    /// the transaction that serves the request.
    pub fn request_reload(&mut self, trigger: Trigger, waiter: Option<Waiter>) {
        let refuse = if self.stopping.is_some() {
            Some("the master is stopping")
        } else if self.upgrade.is_some() {
            Some("a binary upgrade is in progress")
        } else {
            None
        };
        if let Some(reason) = refuse {
            tracing::warn!(%trigger, reason, "reload refused");
            // `Type=notify-reload` sent this SIGHUP and waits for RELOADING=1
            // and READY=1: a refused reload is one that ended at once.
            if trigger == Trigger::Signal && self.stopping.is_none() && self.control.is_some() {
                crate::sd_notify::reload_refused(self.current, reason);
            }
            if let Some(waiter) = waiter {
                let _ = waiter.send(Reply::error(format!("reload refused: {reason}")));
            }
        } else if self.transaction_running() || self.rollout.is_some() || self.in_place.is_some() {
            tracing::info!(%trigger, "reload requested during a reload: coalesced into one follow-up");
            self.reload_queued = true;
            self.queued_by = self.asked_by.clone();
            self.queued_waiters.extend(waiter);
        } else {
            self.reload_waiters.extend(waiter);
            // The canary asked for with this request, not one asked for by
            // a request coalesced while the file is read.
            self.validating = Some(Validating {
                trigger,
                canary: self.pending_canary.take(),
                mode: std::mem::take(&mut self.pending_mode),
                requested_by: self.asked_by.clone(),
            });
            // Reading the file may be slow (a network file system): off the
            // event loop, its result comes back as an event.
            let path = self.config_path.clone();
            let events = self.events.clone();
            tokio::task::spawn_blocking(move || {
                let loaded = Config::load(&path).map_err(|e| e.to_string());
                let _ = events.send(Event::ConfigLoaded(Box::new(loaded)));
            });
        }
    }

    /// Whether a transaction runs: its configuration being read, or its new
    /// generation being started.
    pub fn transaction_running(&self) -> bool {
        self.validating.is_some() || self.reload.is_some()
    }

    /// The configuration a reload asked for has been read: the transaction
    /// goes on, unless the master started stopping meanwhile.
    pub fn on_config_loaded(&mut self, loaded: Result<Config, String>) {
        if let Some(validating) = self.validating.take() {
            let outer = std::mem::replace(&mut self.asked_by, validating.requested_by);
            self.begin_reload(
                validating.trigger,
                loaded,
                validating.canary,
                validating.mode,
            );
            self.asked_by = outer;
        }
    }

    /// Runs validate and bind, and starts spawning; leaves the transaction
    /// running, or finishes it with a failure; or runs it in place (see
    /// [`crate::inplace`]). `canary` is the share `baton reload --canary`
    /// asked for with this reload, `mode` its `--in-place` or
    /// `--new-generation`.
    pub fn begin_reload(
        &mut self,
        trigger: Trigger,
        loaded: Result<Config, String>,
        canary: Option<crate::config::Share>,
        mode: crate::inplace::Mode,
    ) {
        let started = Instant::now();
        let reloading = matches!(trigger, Trigger::Signal | Trigger::Cli | Trigger::Coalesced);
        let loaded = match loaded {
            Ok(config) if reloading && mode != crate::inplace::Mode::NewGeneration => {
                match self.in_place_possible(&config) {
                    Ok(number) => {
                        let span = tracing::info_span!(parent: None, "reload", generation = number, %trigger, kind = "in_place", config_hash = %config.hash, version = %config.app.version);
                        span.in_scope(|| tracing::info!("reload started"));
                        crate::sd_notify::reloading(number);
                        return self.begin_in_place(
                            trigger,
                            number,
                            Rc::new(config),
                            span,
                            started.elapsed(),
                        );
                    }
                    Err(reason) if mode == crate::inplace::Mode::InPlace => {
                        let generation = self.current.unwrap_or(0);
                        let phases = vec![(Step::Validate, started.elapsed())];
                        let reason = format!("cannot reload in place: {reason}");
                        let by = self.asked_by.clone();
                        return self.record(
                            generation,
                            trigger,
                            by,
                            phases,
                            Some((Step::Validate, reason)),
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
        let generation = self.next_generation;
        self.next_generation += 1;
        // A root: a coalesced follow-up starts inside the previous reload.
        let span = tracing::info_span!(parent: None, "reload", generation, %trigger, config_hash = tracing::field::Empty);
        let mut phases = Vec::new();
        let _enter = span.clone().entered();
        let requested_by = self.asked_by.clone();
        match &requested_by {
            Some(by) => tracing::info!(requested_by = %by, "reload started"),
            None => tracing::info!("reload started"),
        }
        if trigger != Trigger::Start && trigger != Trigger::Upgrade {
            crate::sd_notify::reloading(generation);
        }

        let validating = phase_span(&span, Step::Validate);
        let config = match loaded {
            Ok(config) => Rc::new(config),
            Err(reason) => {
                phases.push((Step::Validate, started.elapsed()));
                let failure = Some((Step::Validate, reason));
                return self.record(generation, trigger, requested_by, phases, failure);
            }
        };
        span.record("config_hash", config.hash.as_str());
        let phase_started = Instant::now();
        phases.push((Step::Validate, phase_started - started));
        drop(validating);
        let binding = phase_span(&span, Step::Bind);

        let steered = config.worker.steers_generations() || canary.is_some();
        let bound = self
            .rebind_admin(&config)
            .and_then(|admin| Ok((self.bind(&config)?, admin)));
        let (listeners, admin) = match bound {
            Ok(bound) => bound,
            Err(e) => {
                phases.push((Step::Bind, phase_started.elapsed()));
                return self.record(
                    generation,
                    trigger,
                    requested_by,
                    phases,
                    Some((Step::Bind, format!("{e:#}"))),
                );
            }
        };
        let processes = match &self.scale {
            Some(scale) if scale.config_processes == config.worker.processes => scale.processes,
            _ => config.worker.processes,
        };
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
        self.reload = Some(reload);
    }

    /// Moves the transaction one step, from the loop's tick: a chunk of the
    /// bind phase, or one worker spawned.
    pub(crate) fn step_reload(&mut self) {
        match &self.reload {
            Some(reload) if reload.binding.is_some() => self.bind_next(),
            Some(_) => self.spawn_next(),
            None => {}
        }
    }

    /// Makes the next [`BIND_CHUNK`] generation sockets of the bind phase;
    /// the last chunk starts the generation. From the loop's tick: with
    /// many listeners the phase takes tens of milliseconds, and requests,
    /// signals and exits are served between chunks.
    fn bind_next(&mut self) {
        let Some(reload) = &mut self.reload else {
            return;
        };
        let Some(made) = reload.binding.as_mut() else {
            return;
        };
        let _enter = reload.span.clone().entered();
        let from = made.len();
        let to = (from + BIND_CHUNK).min(reload.listeners.len());
        let chunk = &reload.listeners[from..to];
        let current: HashSet<*const Listener> = self.listeners.iter().map(Rc::as_ptr).collect();
        match generation_sockets(chunk, &current) {
            Ok(sockets) => made.extend(sockets),
            Err(e) => {
                let reload = self.reload.take().expect("checked above");
                return self.abort(reload, Step::Bind, format!("{e:#}"));
            }
        }
        if to < reload.listeners.len() {
            return;
        }
        let mut reload = self.reload.take().expect("checked above");
        let sockets = reload.binding.take().unwrap_or_default();
        self.start_generation(reload, sockets);
    }

    /// The bind phase is over: the new generation starts with `sockets`,
    /// and its workers are spawned from the next turn on.
    fn start_generation(&mut self, mut reload: Reload, sockets: Vec<Shared>) {
        let _enter = reload.span.clone().entered();
        reload.end_phase(Step::Bind);
        reload.begin_phase(Step::Spawn);
        // The new sockets are last on their ports now, and not steered to:
        // any unused socket can go without moving the one that is.
        self.tidy_listeners();
        let (generation, config) = (reload.generation, reload.config.clone());
        let mut new = Generation::new(generation, config.clone(), sockets, reload.processes);
        new.join_trace(&reload.phase_span);
        let mut spawn_error = None;
        if config.worker.ready == ReadyMode::Notify {
            match self.notifier(generation, config.worker.credentials()) {
                Ok(notifier) => new.notify = Some(notifier),
                Err(e) => spawn_error = Some(format!("creating the notify socket: {e:#}")),
            }
        }
        self.generations.insert(generation, new);
        reload.spawning = Some(0);
        if let Some(reason) = spawn_error {
            return self.abort(reload, Step::Spawn, reason);
        }
        self.reload = Some(reload);
    }

    /// Spawns the new generation's next worker. One per turn of the event
    /// loop: with many listeners a spawn takes milliseconds, and requests,
    /// signals and exits are served between them.
    fn spawn_next(&mut self) {
        let Some(reload) = &mut self.reload else {
            return;
        };
        let Some(index) = reload.spawning else { return };
        let Some(new) = self.generations.get_mut(&reload.generation) else {
            return;
        };
        let _enter = reload.span.clone().entered();
        if index < reload.processes {
            if let Err(e) = new.spawn(index, 0, 0, &self.events, self.guardian.as_ref()) {
                let reload = self.reload.take().expect("checked above");
                return self.abort(reload, Step::Spawn, format!("worker {index}: {e:#}"));
            }
        }
        if index + 1 < reload.processes {
            reload.spawning = Some(index + 1);
            return;
        }
        reload.spawning = None;
        reload.end_phase(Step::Spawn);
        reload.begin_phase(Step::Ready);
        reload.ready_deadline = Instant::now() + reload.config.worker.ready_timeout.0;
        let generation = reload.generation;
        self.start_probing(generation);
        self.advance_reload();
    }

    /// The admin endpoint `config` asks for, when it differs from the one
    /// served: bound now, served from the commit (`None`: keep it).
    #[allow(clippy::type_complexity)]
    fn rebind_admin(
        &self,
        config: &Config,
    ) -> anyhow::Result<Option<Option<crate::admin::AdminSocket>>> {
        let wanted = config.supervisor.admin.as_ref();
        if wanted == self.admin.as_ref().map(|a| a.configured()) {
            return Ok(None);
        }
        Ok(Some(
            wanted.map(crate::admin::AdminSocket::bind).transpose()?,
        ))
    }

    /// Keeps every listener whose name and address are unchanged (same fd:
    /// this is what makes reloads drop nothing) and binds the others.
    fn bind(&self, config: &Config) -> anyhow::Result<Vec<Shared>> {
        let current: HashMap<(&str, &ListenerAddress), &Shared> = self
            .listeners
            .iter()
            .map(|l| ((l.config.name.as_str(), &l.config.address), l))
            .collect();
        let mut out = Vec::with_capacity(config.listeners.len());
        for wanted in &config.listeners {
            match current.get(&(wanted.name.as_str(), &wanted.address)) {
                Some(listener) => {
                    if listener.config.backlog != wanted.backlog {
                        listener.set_backlog(wanted.backlog)?;
                    }
                    out.push(Rc::clone(listener));
                }
                None => {
                    let listener = Rc::new(Listener::bind(wanted)?);
                    tracing::info!(
                        listener = %listener.info.name,
                        address = %listener.info.address,
                        kind = %listener.info.kind,
                        "listener bound"
                    );
                    out.push(listener);
                }
            }
        }
        Ok(out)
    }

    /// Moves the transaction on after an event: marks delay-ready workers,
    /// commits when all are ready, aborts past the deadline or when a new
    /// worker has exited.
    pub fn advance_reload(&mut self) {
        let Some(reload) = &self.reload else { return };
        // Binding and spawning go on from the loop's tick, a step a turn.
        if reload.binding.is_some() || reload.spawning.is_some() {
            return;
        }
        let generation = reload.generation;
        let deadline = reload.ready_deadline;
        let Some(new) = self.generations.get_mut(&generation) else {
            return;
        };
        if let ReadyMode::Delay(delay) = new.config.worker.ready {
            for worker in new.workers.values_mut() {
                if worker.state == State::Starting && worker.started.elapsed() >= delay {
                    worker.become_ready();
                }
            }
        }
        if new.all_ready() {
            let reload = self.reload.take().expect("checked above");
            return self.commit(reload);
        }
        if Instant::now() >= deadline {
            let reload = self.reload.take().expect("checked above");
            let waiting: Vec<String> = new
                .workers
                .values()
                .filter(|w| w.state != State::Ready)
                .map(|w| format!("worker {} (pid {})", w.index, w.pid))
                .collect();
            let timeout = new.config.worker.ready_timeout.0;
            let last_probe = self
                .probing
                .as_ref()
                .filter(|p| p.generation == generation)
                .and_then(|p| p.last_failure.as_ref())
                .map(|f| format!(" (last probe: {f})"))
                .unwrap_or_default();
            self.abort(
                reload,
                Step::Ready,
                format!(
                    "{} not ready within {timeout:?}{last_probe}",
                    waiting.join(", ")
                ),
            );
        }
    }

    /// A worker of the starting generation exited before it was ready.
    pub fn new_worker_exited(&mut self, reason: String) {
        if let Some(reload) = self.reload.take() {
            self.abort(reload, Step::Ready, reason);
        }
    }

    /// When a delay-ready worker becomes ready, for the event loop's timer.
    pub fn delay_ready_deadline(&self) -> Option<Instant> {
        let reload = self.reload.as_ref()?;
        let new = self.generations.get(&reload.generation)?;
        let ReadyMode::Delay(delay) = new.config.worker.ready else {
            return None;
        };
        new.workers
            .values()
            .filter(|w| w.state == State::Starting)
            .map(|w| w.started + delay)
            .min()
    }

    fn commit(&mut self, mut reload: Reload) {
        let _enter = reload.span.clone().entered();
        reload.end_phase(Step::Ready);
        if let Some(reload) = self.begin_rollout(reload) {
            self.settle(reload);
        }
    }

    /// Switches over for good: every new connection to the new generation,
    /// the replaced one drained, the master's settings switched.
    pub(crate) fn settle(&mut self, mut reload: Reload) {
        let _enter = reload.span.clone().entered();
        reload.begin_phase(Step::Commit);
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
        if config.supervisor.otlp_endpoint != self.config.supervisor.otlp_endpoint {
            tracing::warn!(
                "otlp_endpoint changes take effect when the master restarts or upgrades"
            );
        }
        if config.supervisor.control_socket != self.config.supervisor.control_socket
            || config.supervisor.pid_file != self.config.supervisor.pid_file
        {
            tracing::warn!(
                "control_socket and pid_file changes take effect when the master restarts"
            );
        }
        let mut new_sockets = Vec::new();
        if let Some(new) = self.generations.get_mut(&reload.generation) {
            new.phase = Phase::Current;
            new_sockets = new.listeners.clone();
        }
        for socket in &new_sockets {
            if let Err(e) = socket.steer_here() {
                tracing::error!(error = %format!("{e:#}"), "cannot steer new connections to the new generation");
            }
        }
        let drain_timeout = config.worker.drain_timeout.0;
        for old in self.generations.values_mut() {
            let replaced = old.phase == Phase::Current || old.phase == Phase::Standby;
            if replaced && old.number != reload.generation {
                tracing::info!(generation = old.number, "generation draining");
                let moved = steered_away(&old.listeners, &new_sockets);
                old.hand_over(moved, drain_timeout);
            }
        }
        self.current = Some(reload.generation);
        self.listeners = std::mem::take(&mut reload.listeners);
        if let Some(admin) = reload.admin.take() {
            self.admin = admin;
            self.serve_admin();
        }
        if self
            .scale
            .is_some_and(|s| s.config_processes != config.worker.processes)
        {
            tracing::info!(
                processes = reload.processes,
                "config changed processes: scale override dropped"
            );
            self.scale = None;
        }
        self.config = config;
        reload.end_phase(Step::Commit);
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
    fn limit_draining_generations(&mut self) {
        let max = self.config.supervisor.max_draining_generations as usize;
        let draining: Vec<u64> = self
            .generations
            .values()
            .filter(|g| g.phase == Phase::Draining && !g.workers.is_empty())
            .map(|g| g.number)
            .collect();
        let excess = draining.len().saturating_sub(max);
        for number in &draining[..excess] {
            let Some(generation) = self.generations.get_mut(number) else {
                continue;
            };
            generation.handover = None;
            let pids: Vec<i32> = generation.workers.keys().map(|p| p.as_raw()).collect();
            tracing::warn!(
                generation = number,
                max_draining_generations = max,
                ?pids,
                "too many draining generations: the oldest is killed"
            );
            for worker in generation.workers.values_mut() {
                worker.kill();
                worker.state = State::Killed;
            }
        }
    }

    fn abort(&mut self, reload: Reload, step: Step, reason: String) {
        let _enter = reload.span.clone().entered();
        self.probing = None;
        let mut phases = reload.phases;
        let elapsed = reload.phase_started.elapsed();
        match (step, reload.spawning) {
            (Step::Bind | Step::Spawn, _) => phases.push((step, elapsed)),
            // A new worker exited while others were still being spawned.
            (Step::Ready, Some(_)) => {
                phases.push((Step::Spawn, elapsed));
                phases.push((Step::Ready, Duration::ZERO));
            }
            (Step::Ready, None) => phases.push((Step::Ready, elapsed)),
            _ => {}
        }
        if let Some(failed) = self.generations.get_mut(&reload.generation) {
            failed.drain(Phase::Failed, reload.config.worker.drain_timeout.0);
        }
        self.record(
            reload.generation,
            reload.trigger,
            reload.requested_by,
            phases,
            Some((step, reason)),
        );
        self.reap_finished_generations();
    }

    /// Logs and keeps the outcome, then starts the coalesced follow-up.
    pub(crate) fn record(
        &mut self,
        generation: u64,
        trigger: Trigger,
        requested_by: Option<Requester>,
        phases: Vec<(Step, Duration)>,
        failure: Option<(Step, String)>,
    ) {
        if let Some(g) = self.generations.get_mut(&generation) {
            g.leave_trace();
        }
        let ms = |step| {
            phases
                .iter()
                .find(|(s, _)| *s == step)
                .map(|(_, d)| millis(*d))
        };
        let (validate_ms, bind_ms, spawn_ms, ready_ms, commit_ms) = (
            ms(Step::Validate),
            ms(Step::Bind),
            ms(Step::Spawn),
            ms(Step::Ready),
            ms(Step::Commit),
        );
        match &failure {
            None => tracing::info!(
                outcome = "committed",
                validate_ms,
                bind_ms,
                spawn_ms,
                ready_ms,
                commit_ms,
                "reload committed"
            ),
            Some((phase, reason)) => tracing::error!(
                outcome = "failed",
                phase = %phase,
                reason = %reason,
                kept_generation = self.current,
                validate_ms, bind_ms, spawn_ms, ready_ms,
                "reload failed"
            ),
        }
        let version = self
            .generations
            .get(&generation)
            .filter(|_| failure.is_none())
            .map(|g| g.config.app.version.clone());
        let outcome = Outcome {
            generation,
            trigger,
            failure,
            phases,
            finished: SystemTime::now(),
            version,
            requested_by,
        };
        let pids = self
            .generations
            .get(&generation)
            .filter(|_| outcome.failure.is_none())
            .map(|g| g.workers.keys().map(|p| p.as_raw()).collect())
            .unwrap_or_default();
        let report = outcome.report(pids);
        let committed = outcome.failure.is_none();
        self.metrics.reload(
            &report.trigger,
            &report.kind,
            if committed { "committed" } else { "failed" },
            &outcome.phases,
        );
        if trigger == Trigger::Upgrade && committed {
            self.metrics.upgrade("committed");
        }
        for waiter in self.reload_waiters.drain(..) {
            let reply = match &outcome.failure {
                None => Reply::ok(&report),
                Some((phase, reason)) => {
                    Reply::failed(format!("reload failed in phase {phase}: {reason}"), &report)
                }
            };
            let _ = waiter.send(reply);
        }
        // READY=1 after every reload, committed or failed: systemd must not
        // see the unit "reloading" forever. Not from a new master started by
        // an upgrade, which is not systemd's main pid yet (the old one
        // announces it with MAINPID= at the handover), nor when the first
        // generation failed and the master exits.
        if self.takeover.is_none() && self.current.is_some() {
            crate::sd_notify::reload_finished(self.current, &outcome);
        }
        self.last_reload = Some(outcome);
        if self.reload_queued && self.reload.is_none() && self.stopping.is_none() {
            self.reload_queued = false;
            self.reload_waiters = std::mem::take(&mut self.queued_waiters);
            let outer = std::mem::replace(&mut self.asked_by, self.queued_by.take());
            self.request_reload(Trigger::Coalesced, None);
            self.asked_by = outer;
        }
    }
}
