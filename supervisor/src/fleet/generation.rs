//! A generation: the workers started from one configuration, and the
//! listeners they were given (kept open while any of them lives).

use crate::children::{Children, Owner};
use crate::config::Config;
use crate::listener::Shared;
use crate::master::{Event, Events};
use crate::notify::Notifier;
use crate::worker::{self, SpawnSpec, State, Worker};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use tokio::time::Instant;

/// First respawn delay after a crash; doubled per consecutive crash.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest respawn delay.
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// A worker that stayed up this long is healthy: its crash count resets.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Consecutive crashes from which the respawns are logged as a crash loop.
const CRASH_LOOP: u32 = 5;
/// How often a handing-over generation's accept queues are looked at.
const HANDOVER_POLL: Duration = Duration::from_millis(1);
/// How long its accept queues must have stayed empty: a connection whose
/// handshake began before the switch still joins the old socket's queue
/// when it completes, which under load can take some milliseconds.
const HANDOVER_QUIET: Duration = Duration::from_millis(10);
/// The longest a generation keeps accepting after new connections went
/// elsewhere, waiting for its accept queues to empty.
const HANDOVER_LIMIT: Duration = Duration::from_secs(1);

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationState {
    /// Being started by a reload; not serving yet.
    Starting,
    /// The generation that serves.
    Current,
    /// Replaced; its workers finish and exit.
    Draining,
    /// Its reload failed; its workers are being stopped.
    Failed,
    /// Replaced by a generation on probation: accepts nothing new, stays
    /// warm to take the traffic back.
    Standby,
}

impl GenerationState {
    /// The name shown in logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            GenerationState::Starting => "starting",
            GenerationState::Current => "current",
            GenerationState::Draining => "draining",
            GenerationState::Failed => "failed",
            GenerationState::Standby => "standby",
        }
    }
}

/// A respawn waiting for its backoff to pass.
#[derive(Debug, Clone, Copy)]
pub struct PendingRespawn {
    /// When to spawn.
    pub at: Instant,
    /// Consecutive crashes of this index so far.
    pub crashes: u32,
    /// Respawns of this index so far, this one included.
    pub restarts: u32,
}

/// A replaced generation that still accepts what was queued on its own
/// sockets before new connections were steered away from them.
#[derive(Debug)]
pub struct Handover {
    /// Its sockets that no longer get new connections.
    pub sockets: Vec<Shared>,
    /// Since when its queues have been seen empty, every time.
    pub quiet_since: Instant,
    /// When it drains even if connections are still queued.
    pub give_up: Instant,
    /// Its drain timeout, once it drains.
    pub drain_timeout: Duration,
}

/// The workers of one configuration.
#[derive(Debug)]
pub struct Generation {
    /// 1, 2, 3, ...
    number: u64,
    /// The configuration it was started from.
    config: Rc<Config>,
    /// The listeners it was given, in configuration order.
    listeners: Vec<Shared>,
    /// Where it is in its life.
    state: GenerationState,
    /// How many workers it runs (the config's `processes`, or a scale).
    processes: u32,
    /// When it was started.
    started: Instant,
    /// Live workers by pid.
    workers: BTreeMap<Pid, Worker>,
    /// Worker indexes waiting to be respawned.
    respawns: BTreeMap<u32, PendingRespawn>,
    /// Its notify socket (`ready = "notify"`).
    notify: Option<Notifier>,
    /// Replaced, and accepting the rest of its queues before it drains.
    handover: Option<Handover>,
    /// When each worker index crashed, within `crash_loop_window`.
    crashes: BTreeMap<u32, std::collections::VecDeque<Instant>>,
    /// Indexes the crash-loop breaker stopped respawning.
    crash_looped: std::collections::BTreeSet<u32>,
    /// The worker's executable as it was when the generation started, to
    /// tell a replaced binary (see [`crate::inplace`]).
    executable: Option<crate::inplace::Identity>,
    /// When it was replaced (or stopped): its drain began.
    draining_since: Option<Instant>,
    /// The reload that starts it, while it runs: its spawn phase's span
    /// (each worker's startup span is a child) and W3C `traceparent` (the
    /// workers' `TRACEPARENT` and hello), when traces are exported.
    trace: Option<(tracing::Span, String)>,
    /// Workers being started off the event loop, by index.
    pending: BTreeMap<u32, worker::Prepared>,
    /// The version a deploy tool said it runs (`if_version` of the reload
    /// that committed it).
    deploy_version: Option<String>,
    /// Its SDK workers' sockets on QUIC listeners' ports.
    quic: super::quic::QuicSockets,
}

impl Generation {
    /// A generation with no workers yet.
    pub fn new(
        number: u64,
        config: Rc<Config>,
        listeners: Vec<Shared>,
        processes: u32,
    ) -> Generation {
        let executable = crate::inplace::executable_identity(&config);
        Generation {
            number,
            config,
            listeners,
            state: GenerationState::Starting,
            processes,
            started: Instant::now(),
            workers: BTreeMap::new(),
            respawns: BTreeMap::new(),
            crashes: BTreeMap::new(),
            crash_looped: Default::default(),
            deploy_version: None,
            executable,
            notify: None,
            handover: None,
            draining_since: None,
            trace: None,
            pending: BTreeMap::new(),
            quic: Default::default(),
        }
    }

    /// 1, 2, 3, ...
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The configuration it was started from.
    pub fn config(&self) -> &Rc<Config> {
        &self.config
    }

    /// The listeners it was given, in configuration order.
    pub fn listeners(&self) -> &[Shared] {
        &self.listeners
    }

    /// Where it is in its life.
    pub fn state(&self) -> GenerationState {
        self.state
    }

    /// Its state changes only through the [`super::Fleet`].
    pub(super) fn set_state(&mut self, state: GenerationState) {
        self.state = state;
        if state == GenerationState::Current {
            super::quic::make_current(&self.listeners, self.number);
        }
    }

    /// How many workers it runs (the config's `processes`, or a scale).
    pub fn processes(&self) -> u32 {
        self.processes
    }

    /// Adopted from a master that died: it was started at `at`.
    pub fn started_at(&mut self, at: Instant) {
        self.started = at;
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Live workers by pid.
    pub fn workers(&self) -> &BTreeMap<Pid, Worker> {
        &self.workers
    }

    /// Its live workers, to tell them something.
    pub fn workers_mut(&mut self) -> impl Iterator<Item = &mut Worker> {
        self.workers.values_mut()
    }

    /// Worker `pid`, to tell it something.
    pub fn worker_mut(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.workers.get_mut(&pid)
    }

    /// Takes in a worker a previous image of this master ran.
    pub fn adopt_worker(&mut self, pid: Pid, worker: Worker, children: &mut Children) {
        children.register(pid, Owner::Worker(self.number));
        self.workers.insert(pid, worker);
    }

    /// Worker `pid` exited: its record, taken out.
    pub fn remove_worker(&mut self, pid: Pid) -> Option<Worker> {
        self.quic.exited(pid);
        self.workers.remove(&pid)
    }

    /// Forgets every pending respawn.
    pub fn cancel_respawns(&mut self) {
        self.respawns.clear();
    }

    /// Its notify socket (`ready = "notify"`).
    pub fn notify(&self) -> Option<&Notifier> {
        self.notify.as_ref()
    }

    /// Its notify socket, to hold or take datagrams.
    pub fn notify_mut(&mut self) -> Option<&mut Notifier> {
        self.notify.as_mut()
    }

    /// An in-place reload committed `config` on it (its workers run it).
    pub fn set_config(&mut self, config: Rc<Config>) {
        self.config = config;
    }

    /// Gives it its notify socket.
    pub fn set_notify(&mut self, notifier: Notifier) {
        self.notify = Some(notifier);
    }

    /// Whether it is replaced and still accepting the rest of its queues.
    pub fn handing_over(&self) -> bool {
        self.handover.is_some()
    }

    /// Indexes the crash-loop breaker stopped respawning.
    pub fn crash_looped(&self) -> &std::collections::BTreeSet<u32> {
        &self.crash_looped
    }

    /// The version a deploy tool said it runs, if any.
    pub fn deploy_version(&self) -> Option<&str> {
        self.deploy_version.as_deref()
    }

    /// Records the version a deploy tool said it runs (`if_version`).
    pub fn set_deploy_version(&mut self, version: Option<String>) {
        self.deploy_version = version;
    }

    /// The worker's executable as it was when the generation started.
    pub fn executable(&self) -> Option<&crate::inplace::Identity> {
        self.executable.as_ref()
    }

    /// When it was replaced (or stopped): its drain began.
    pub fn draining_since(&self) -> Option<Instant> {
        self.draining_since
    }

    /// Terminates every worker, killed after `grace` (a fast stop).
    pub fn terminate(&mut self, grace: Duration) {
        self.handover = None;
        for worker in self.workers.values_mut() {
            worker.terminate(grace);
        }
    }

    /// Kills every worker now.
    pub fn kill_all(&mut self) {
        self.handover = None;
        for worker in self.workers.values_mut() {
            worker.kill();
            worker.mark_killed();
        }
    }

    /// Runs `wanted` workers from now on: surplus ones (highest indexes)
    /// drain and their pending respawns are forgotten; missing ones start
    /// now, or once spawns are no longer `held` (an in-place reload runs).
    pub fn scale_to(
        &mut self,
        wanted: u32,
        held: bool,
        events: &Events,
        children: &mut Children,
    ) -> Result<(), String> {
        self.processes = wanted;
        let drain_timeout = self.config.worker.drain_timeout.0;
        self.respawns.retain(|index, _| *index < wanted);
        for worker in self.workers.values_mut() {
            if worker.index() >= wanted && super::in_service(worker.state()) {
                worker.drain(drain_timeout);
            }
        }
        // Every index below the count that has no live, non-draining
        // worker and no pending respawn.
        for index in 0..wanted {
            let present = self.respawns.contains_key(&index)
                || self
                    .workers
                    .values()
                    .any(|w| w.index() == index && super::in_service(w.state()));
            if present {
                continue;
            }
            if held {
                tracing::info!(
                    generation = self.number,
                    worker = index,
                    "worker to start once the in-place reload ends"
                );
                let now = PendingRespawn {
                    at: Instant::now(),
                    crashes: 0,
                    restarts: 0,
                };
                self.respawns.insert(index, now);
            } else if let Err(e) = self.spawn(index, 0, 0, events, children) {
                return Err(format!("starting worker {index}: {e:#}"));
            }
        }
        Ok(())
    }

    /// Becoming current again: every worker index not running nor waiting
    /// is respawned now.
    pub fn respawn_missing(&mut self) {
        let running: Vec<u32> = self
            .workers
            .values()
            .filter(|w| super::in_service(w.state()))
            .map(|w| w.index())
            .collect();
        for index in 0..self.processes {
            if !running.contains(&index) && !self.respawns.contains_key(&index) {
                self.respawns.insert(
                    index,
                    PendingRespawn {
                        at: Instant::now(),
                        crashes: 0,
                        restarts: 1,
                    },
                );
            }
        }
    }

    /// Its workers' startup joins the trace of the reload starting it,
    /// under `spawn_phase`, when that span is exported.
    pub fn join_trace(&mut self, spawn_phase: &tracing::Span) {
        self.trace = crate::traces::traceparent(spawn_phase).map(|t| (spawn_phase.clone(), t));
    }

    /// The reload ended: workers started from now on (respawns) are not
    /// part of its trace.
    pub fn leave_trace(&mut self) {
        self.trace = None;
    }

    /// What worker `index` of this generation is started with.
    fn spec(&self, index: u32) -> SpawnSpec<'_> {
        SpawnSpec {
            config: &self.config.worker,
            generation: self.number,
            index,
            listeners: self.quic.starting(index).unwrap_or(&self.listeners),
            notify_socket: self.notify.as_ref().map(|n| n.socket.path()),
            app: &self.config.app,
            traceparent: self.trace.as_ref().map(|(_, t)| t.as_str()),
            config_hash: &self.config.hash,
        }
    }

    /// Spawns worker `index`, waiting for its `execve` (forked by the main
    /// thread, see [`crate::forker`]); an SDK worker's channel is forwarded
    /// to `events` from now on, and the keeper watches it.
    pub fn spawn(
        &mut self,
        index: u32,
        restarts: u32,
        crashes: u32,
        events: &Events,
        children: &mut Children,
    ) -> anyhow::Result<&mut Worker> {
        self.prepare_quic(index)?;
        let spawned = worker::prepare(&self.spec(index), restarts, crashes)
            .and_then(|(plan, prepared)| Ok((crate::forker::spawn_and_wait(plan)?, prepared)));
        let (child, prepared) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                self.quic.not_started(index);
                return Err(e);
            }
        };
        self.take_in(index, prepared, child, events, children)
    }

    /// Worker `index`'s own sockets on QUIC ports, for an SDK worker.
    fn prepare_quic(&mut self, index: u32) -> anyhow::Result<()> {
        if self.config.worker.protocol != crate::config::Protocol::Sdk {
            return Ok(());
        }
        self.quic.prepare(index, &self.listeners, self.number)
    }

    /// Starts worker `index` without waiting for it: the main thread forks
    /// it ([`crate::forker`]) and waits for its `execve` (milliseconds with
    /// many listeners on a busy machine), and [`Event::Spawned`] brings the
    /// child back to [`Generation::spawned`]. The generation is kept, and
    /// with it the listeners the child inherits by fd number, until then.
    pub fn spawn_off_loop(&mut self, index: u32, events: &Events) -> anyhow::Result<()> {
        self.prepare_quic(index)?;
        let (plan, prepared) = worker::prepare(&self.spec(index), 0, 0).inspect_err(|_| {
            self.quic.not_started(index);
        })?;
        let (events, generation) = (events.clone(), self.number);
        crate::forker::spawn(plan, move |result| {
            let _ = events.send(Event::Spawned {
                generation,
                index,
                result: result.map_err(|e| format!("{e:#}")),
            });
        });
        self.pending.insert(index, prepared);
        Ok(())
    }

    /// Whether workers started by [`Generation::spawn_off_loop`] are still
    /// to come back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Forgets a worker started off the loop that is not wanted any more.
    pub fn forget_pending(&mut self, index: u32) {
        self.quic.not_started(index);
        self.pending.remove(&index);
    }

    /// Worker `index`, started by [`Generation::spawn_off_loop`], exec'd
    /// as `child`: registered as [`Generation::spawn`] does.
    pub fn spawned(
        &mut self,
        index: u32,
        child: std::process::Child,
        events: &Events,
        children: &mut Children,
    ) -> anyhow::Result<&mut Worker> {
        let prepared = self
            .pending
            .remove(&index)
            .ok_or_else(|| anyhow::anyhow!("worker {index} was not being started"))?;
        self.take_in(index, prepared, child, events, children)
    }

    /// Takes in worker `index`, exec'd as `child`: its channel registered
    /// and (for an SDK worker) sent the hello, its startup span, the
    /// keeper's watch, its channel forwarded to `events`, and its pid
    /// among the master's `children`.
    fn take_in(
        &mut self,
        index: u32,
        prepared: worker::Prepared,
        child: std::process::Child,
        events: &Events,
        children: &mut Children,
    ) -> anyhow::Result<&mut Worker> {
        let mut worker = prepared.finish(child, &self.spec(index))?;
        let pid = worker.pid();
        self.quic.started(index, pid);
        if let Some((spawn_phase, _)) = &self.trace {
            worker.trace_startup(tracing::info_span!(parent: spawn_phase, "worker startup", generation = self.number, worker = index, pid = pid.as_raw(), outcome = tracing::field::Empty));
        }
        if let Some(channel) = worker.channel().cloned() {
            worker.forwarded_by(crate::master::forward_worker(events, pid, channel));
        }
        tracing::info!(
            event = "worker.started",
            generation = self.number,
            worker = index,
            pid = pid.as_raw(),
            "worker started"
        );
        children.worker_started(
            pid,
            self.number,
            self.config.worker.drain_timeout.0,
            self.config.worker.stop_signal.0,
        );
        Ok(self.workers.entry(pid).or_insert(worker))
    }

    /// A readiness probe passed: its starting workers are ready.
    pub fn probe_passed(&mut self) {
        for worker in self.workers.values_mut() {
            if worker.state() == State::Starting {
                worker.become_ready();
                tracing::info!(
                    event = "worker.ready",
                    generation = self.number,
                    worker = worker.index(),
                    pid = worker.pid().as_raw(),
                    "worker ready"
                );
            }
        }
    }

    /// Whether every configured worker is up and ready.
    pub fn all_ready(&self) -> bool {
        self.workers.len() == self.processes as usize
            && self.workers.values().all(|w| w.state() == State::Ready)
    }

    /// Tells every worker to drain within `timeout`; no more respawns.
    pub(super) fn drain(&mut self, state: GenerationState, timeout: Duration) {
        self.state = state;
        self.draining_since.get_or_insert_with(Instant::now);
        self.respawns.clear();
        self.handover = None;
        for worker in self.workers.values_mut() {
            worker.drain(timeout);
        }
    }

    /// Replaced: drains once what is queued on `sockets` (steered away
    /// from) has been accepted, or at once if there is nothing to wait for.
    pub(super) fn hand_over(&mut self, sockets: Vec<Shared>, drain_timeout: Duration) {
        if sockets.is_empty() || self.workers.is_empty() {
            return self.drain(GenerationState::Draining, drain_timeout);
        }
        self.state = GenerationState::Draining;
        self.draining_since = Some(Instant::now());
        self.respawns.clear();
        self.handover = Some(Handover {
            sockets,
            quiet_since: Instant::now(),
            give_up: Instant::now() + HANDOVER_LIMIT.min(drain_timeout),
            drain_timeout,
        });
    }

    /// Drains a handing-over generation whose queues have stayed empty for
    /// `HANDOVER_QUIET`, or that waited long enough.
    pub fn check_handover(&mut self) {
        let Some(handover) = &mut self.handover else {
            return;
        };
        let now = Instant::now();
        let queued: u32 = handover.sockets.iter().map(|s| s.queued()).sum();
        let timeout = handover.drain_timeout;
        if queued > 0 {
            handover.quiet_since = now;
        }
        if queued == 0 && now - handover.quiet_since >= HANDOVER_QUIET {
            tracing::debug!(generation = self.number, "accept queues empty: draining");
        } else if now >= handover.give_up {
            tracing::warn!(
                generation = self.number,
                queued,
                "connections still queued on the replaced generation's sockets: draining anyway"
            );
        } else {
            return;
        }
        self.drain(GenerationState::Draining, timeout);
    }

    /// Runs what is due at `now`: kills the workers past their drain
    /// deadline (returns how many), drains a handing-over generation
    /// whose queues emptied, and, when it may `respawn`, starts the
    /// workers whose respawn is due.
    pub fn tick(
        &mut self,
        now: Instant,
        respawn: bool,
        events: &Events,
        children: &mut Children,
    ) -> u64 {
        self.check_handover();
        // Listed once per generation, on its own ports, if one of its
        // workers is to be killed.
        let mut connections = None;
        let mut killed = 0;
        for worker in self.workers.values_mut() {
            let State::Draining { kill_at } = worker.state() else {
                continue;
            };
            if kill_at > now {
                continue;
            }
            // What it still had open says who kept it alive.
            let open = connections
                .get_or_insert_with(|| {
                    let addresses = self.listeners.iter().map(|l| l.info.address.as_str());
                    crate::connections::Connections::on(addresses)
                })
                .of_worker(worker.pid().as_raw());
            tracing::warn!(
                event = "worker.killed_at_deadline",
                generation = self.number,
                worker = worker.index(),
                pid = worker.pid().as_raw(),
                open_connections = open.len(),
                open = %crate::connections::describe(&open),
                "worker still running at its drain deadline: killed"
            );
            worker.kill();
            worker.mark_killed();
            killed += 1;
        }
        if !respawn {
            return killed;
        }
        let due: Vec<u32> = self
            .respawns
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(i, _)| *i)
            .collect();
        for index in due {
            let pending = self.respawns.remove(&index).expect("listed above");
            let (restarts, crashes) = (pending.restarts, pending.crashes);
            if let Err(e) = self.spawn(index, restarts, crashes, events, children) {
                tracing::error!(generation = self.number, worker = index, error = %format!("{e:#}"), "respawn failed");
                self.respawns.insert(
                    index,
                    PendingRespawn {
                        at: now + Duration::from_secs(1),
                        ..pending
                    },
                );
            }
        }
        killed
    }

    /// Counts a crash of `index` at `now`: whether it crashed
    /// `crash_loop_limit` times within `crash_loop_window`, and so is not
    /// to be respawned any more (the crash-loop breaker; a reload starts it
    /// afresh).
    pub fn crash_loop(&mut self, index: u32, now: Instant) -> bool {
        let window = self.config.worker.crash_loop_window.0;
        let limit = self.config.worker.crash_loop_limit as usize;
        let times = self.crashes.entry(index).or_default();
        if crash_loop(times, now, window, limit) {
            self.crash_looped.insert(index);
            return true;
        }
        false
    }

    /// Whether [`Generation::crash_loop`] would say so of a crash of
    /// `index` at `now`, without counting it.
    pub fn would_crash_loop(&self, index: u32, now: Instant) -> bool {
        let window = self.config.worker.crash_loop_window.0;
        let limit = self.config.worker.crash_loop_limit as usize;
        let mut times = self.crashes.get(&index).cloned().unwrap_or_default();
        crash_loop(&mut times, now, window, limit)
    }

    /// Schedules a respawn of the worker that just exited, with exponential
    /// backoff; returns the delay.
    pub fn schedule_respawn(&mut self, exited: &Worker) -> Duration {
        let crashes = crashes_in_a_row(exited.started().elapsed(), exited.crashes());
        let delay = respawn_delay(crashes);
        if crashes >= CRASH_LOOP {
            tracing::warn!(
                generation = self.number,
                worker = exited.index(),
                crashes,
                delay_ms = delay.as_millis() as u64,
                "worker crash loop: respawn delayed"
            );
        }
        self.respawns.insert(
            exited.index(),
            PendingRespawn {
                at: Instant::now() + delay,
                crashes,
                restarts: exited.restarts() + 1,
            },
        );
        delay
    }

    /// The earliest time something of this generation is due; with
    /// `spawns_held` (an in-place reload runs on it), its respawns wait
    /// for the reload's end, not for a time.
    pub fn next_deadline(&self, spawns_held: bool) -> Option<Instant> {
        let kills = self.workers.values().flat_map(|w| {
            let drain = match w.state() {
                State::Draining { kill_at } => Some(kill_at),
                _ => None,
            };
            drain.into_iter().chain(w.answer_due())
        });
        let respawns = self
            .respawns
            .values()
            .map(|r| r.at)
            .filter(|_| !spawns_held);
        let handover = self
            .handover
            .as_ref()
            .map(|_| Instant::now() + HANDOVER_POLL);
        kills.chain(respawns).chain(handover).min()
    }
}

/// The crash-loop breaker: records a crash at `now` in `times` (the
/// worker's recent crashes) and says whether `limit` crashes fell within
/// `window`: the worker is then not respawned any more.
pub fn crash_loop(
    times: &mut std::collections::VecDeque<Instant>,
    now: Instant,
    window: Duration,
    limit: usize,
) -> bool {
    times.push_back(now);
    while times.front().is_some_and(|t| now - *t > window) {
        times.pop_front();
    }
    times.len() >= limit
}

/// A worker's crashes in a row, counting the exit of one that ran for
/// `ran` after `before` crashes: one that ran [`HEALTHY_AFTER`] starts a
/// new count.
pub fn crashes_in_a_row(ran: Duration, before: u32) -> u32 {
    if ran >= HEALTHY_AFTER {
        1
    } else {
        before + 1
    }
}

/// The respawn delay after `crashes` in a row: exponential from
/// [`BACKOFF_START`], capped at [`BACKOFF_CAP`].
pub fn respawn_delay(crashes: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1 << crashes.saturating_sub(1).min(16))
        .min(BACKOFF_CAP)
}
