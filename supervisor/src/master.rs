//! The master: one event loop that owns all state. Signals, child exits and
//! worker messages arrive as events; timers are derived from the state.

mod handover;
mod inbox;
mod keeping;
mod requests;
mod transactions;

pub use inbox::{forward, forward_worker, Event, Events, Waiter, MESSAGES_PER_SECOND};
use inbox::{next_event, REQUESTS_IN_A_ROW};

use crate::children::{Exit, Owner};
use crate::config::{Config, ReadyMode};
use crate::control::protocol::Request;
use crate::control::ControlSocket;
use crate::endpoints::Endpoints;
use crate::fleet::{Fleet, GenerationState};
use crate::logging::LogHandle;
use crate::operation::{exit_reason, Exited, ForOperation, ForWorker};
use crate::operation::{Admission, Ask, Deadline, Expiry, Facts, Operation, Reloads};
use crate::pidfile::PidFile;
use crate::probe::Probing;
use crate::reload::Trigger;
use crate::scale::ScaleChange;
use crate::signals::{SignalEvent, Signals};
use crate::upgrade::exec::ExecState;
use crate::upgrade::handoff::Takeover;
use crate::upgrade::lineage::Lineage;
use crate::upgrade::Program;
use crate::worker::State;
use anyhow::Context;
use baton_wire::protocol::WorkerMessage;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long workers get between SIGTERM and SIGKILL in a fast stop.
const FAST_STOP_GRACE: Duration = Duration::from_secs(5);

/// How this master came to be.
pub enum Origin {
    /// `baton run`, with the sockets the service manager passed, if any.
    Fresh(Vec<crate::activation::Inherited>),
    /// Started by an old master's upgrade (child mode).
    Takeover(Takeover),
    /// Re-executed in place by an upgrade.
    Exec(ExecState),
    /// Started by the keeper to adopt the workers of a master that died
    /// (see [`crate::adopt`]).
    Adopted(Box<crate::adopt::Adoption>),
}

/// How the master is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Drain every generation, then exit.
    Graceful,
    /// Terminate workers now, exit.
    Fast,
}

/// The master's whole state: twelve owners (see `docs/architecture.md`,
/// "Who owns what"); the transactions decide, the master does what they
/// decide (`master/transactions.rs`) and answers requests
/// (`master/requests.rs`).
pub struct Master {
    /// The configuration in service (switched when a reload commits).
    config: Rc<Config>,
    /// Every generation and the listeners in service (see
    /// [`crate::fleet`]).
    fleet: Fleet,
    /// What the master is doing (see [`crate::operation`]).
    operation: Operation,
    /// Who waits for the reload under way, the follow-up, the last outcome.
    reloads: Reloads,
    /// The log's filter, file and trace exporter.
    log: LogHandle,
    /// The main inbox: workers' messages, spawns, probes, config reads
    /// (see `master/inbox.rs`).
    events: Events,
    /// The control socket, the admin endpoint and the pid file (see
    /// [`crate::endpoints`]). Their requests come in inboxes of their own,
    /// served before the main one's events (but for one event after
    /// `REQUESTS_IN_A_ROW` requests in a row), so that a burst of worker
    /// messages does not delay `baton status`; `/healthz` and `/readyz`
    /// before every other request, so that a probe never waits behind
    /// scrapes or CLI requests.
    endpoints: Endpoints,
    /// This master's binary and start time, for upgrades and uptime.
    program: Program,
    /// The masters before and after this one across an upgrade (see
    /// [`crate::upgrade::lineage`]).
    lineage: Lineage,
    /// The generation whose readiness probes run (see [`crate::probe`]).
    probing: Option<crate::probe::Probing>,
    /// What `/metrics` shows.
    metrics: crate::metrics::Metrics,
    /// Every child and what started it, and the reaping still to do (see
    /// [`crate::children`]).
    children: crate::children::Children,
    /// Connections moving from draining workers to the current generation
    /// (see [`crate::handover`]).
    handovers: crate::handover::Handovers,
}

/// Runs the master until it stops (watching files with `watch`: see
/// [`crate::watch`]). Returns an error if generation 1 could not be
/// started.
pub async fn run(
    config: Config,
    log: LogHandle,
    program: Program,
    origin: Origin,
    watch: Option<crate::watch::Watch>,
) -> anyhow::Result<()> {
    let (takeover, exec_state, activated, mut adoption) = match origin {
        Origin::Fresh(activated) => (None, None, activated, None),
        Origin::Takeover(takeover) => (Some(takeover), None, Vec::new(), None),
        Origin::Exec(state) => (None, Some(state), Vec::new(), None),
        Origin::Adopted(adoption) => (None, None, Vec::new(), Some(adoption)),
    };
    let (events, mut inbox) = mpsc::unbounded_channel();
    let (requests, mut requests_inbox) = mpsc::unbounded_channel();
    let (probes, mut probes_inbox) = mpsc::unbounded_channel();
    // The watcher asks as the control socket does.
    let watch = watch.map(|watch| (watch, requests.clone()));
    // Signal handlers before the pid file: a SIGHUP sent as soon as the pid
    // file names this master must not kill it.
    // Until it serves, a new master started by an upgrade tells the old one
    // why it gives up, so that `baton upgrade` shows the reason.
    let told = |e: anyhow::Error| {
        if let Some(takeover) = &takeover {
            takeover.fail("start", &format!("{e:#}"));
        }
        e
    };
    // The senders' action first: actions run in the order installed, and
    // tokio's wakes the loop, which reads the sender at once.
    crate::audit::record_signal_senders()
        .context("installing signal handlers")
        .map_err(told)?;
    let mut signals = Signals::new()
        .context("installing signal handlers")
        .map_err(told)?;
    crate::orphans::become_subreaper();
    // The control socket comes first, so that a second master on the same
    // config stops here, before it touches anything. A new master started by
    // an upgrade takes it (and the pid file) over at the handover.
    let (control, pid_file) = if takeover.is_none() {
        // A master that died, or this one's previous image, left its
        // socket, with the requests sent meanwhile in its queue.
        let inherited = adoption
            .as_mut()
            .and_then(|a| a.control.take())
            .or_else(crate::control::inherited_fd);
        let mut control = match inherited {
            Some(fd) => ControlSocket::adopt(fd, &config.supervisor.control_socket)?,
            None => ControlSocket::bind(&config.supervisor.control_socket)?,
        };
        control.serve(requests.clone())?;
        let pid_file = config
            .supervisor
            .pid_file
            .as_deref()
            .map(PidFile::write)
            .transpose()?;
        (Some(control), pid_file)
    } else {
        (None, None)
    };
    // Inherited from the previous master at an upgrade, or bound now; a new
    // master of a child-mode upgrade serves it once the old one hands over.
    let inherited = match adoption.as_mut().and_then(|a| a.admin.take()) {
        Some(fd) => crate::admin::AdminSocket::adopt(fd, config.supervisor.admin.as_ref()),
        None => crate::admin::AdminSocket::inherited(config.supervisor.admin.as_ref()),
    };
    let admin = match (inherited, &config.supervisor.admin) {
        (Some(admin), _) => Some(admin),
        (None, Some(address)) => Some(crate::admin::AdminSocket::bind(address).map_err(told)?),
        (None, None) => None,
    };
    let mut master = Master {
        config: Rc::new(config.clone()),
        fleet: Fleet::default(),
        operation: Operation::Idle,
        reloads: Reloads::default(),
        log,
        events,
        endpoints: Endpoints::new(
            control,
            admin,
            pid_file,
            crate::admin::Inboxes {
                requests,
                probes,
                writes: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(
                    config.admin_writes.clone(),
                )),
            },
        ),
        program,
        lineage: Lineage::default(),
        probing: None,
        metrics: crate::metrics::Metrics::new(),
        children: Default::default(),
        handovers: Default::default(),
    };
    if takeover.is_none() {
        master.endpoints.serve_admin();
    }
    let budget = master.config.supervisor.master_restarts.0;
    // A keeper that started this master, kept it across an exec, or is
    // its container's PID 1; else a new one.
    let attach = adoption
        .as_mut()
        .and_then(|a| a.keeper.take())
        .or_else(crate::keeper::inherited_channel);
    master.children.start_keeper(attach, budget, &master.events);
    if let Some(takeover) = takeover {
        let (fleet, events) = (&mut master.fleet, &master.events);
        master.lineage.take_over(takeover, fleet, events);
    }
    for listener in crate::activation::adopt(activated, &master.config.listeners)? {
        master.fleet.adopt_listener(Rc::new(listener));
    }
    let kernel_tls = crate::ktls::detect();
    tracing::info!(event = "master.starting", pid = std::process::id(), config = %config.path.display(), hash = %config.hash, %kernel_tls, "master starting");
    let upgraded = master.lineage.taking_over() || exec_state.is_some();
    if let Some(state) = exec_state {
        state.adopt(
            &mut master.fleet,
            &master.config,
            &master.events,
            &mut master.children,
        )?;
        master.guard_every_worker();
        master.tell_workers_of_new_master();
        // Workers that exited while this image started are waiting to be reaped.
        master.reap();
    }
    let first = if upgraded {
        Trigger::Upgrade
    } else {
        Trigger::Start
    };
    let begin = match adoption {
        Some(adoption) => master.adopt(*adoption)?,
        None => Some(first),
    };
    // A first generation that fails stops the master (after an adoption,
    // only when none was serving).
    let first = begin.unwrap_or(first);
    if let Some(trigger) = begin {
        master.begin_reload(
            crate::operation::ReloadRequest::new(trigger, None),
            Ok(config),
        );
    }
    if let Some((watch, requests)) = watch {
        watch.start(&master.config, requests);
    }
    let mut watchdog = crate::sd_notify::Watchdog::from_env(upgraded);
    let mut requests_in_a_row = 0;
    loop {
        if let Some(outcome) = master.reloads.last() {
            if outcome.trigger == first
                && master.fleet.current_number().is_none()
                && master.operation.reload().is_none()
            {
                let (phase, reason) = outcome
                    .failure
                    .clone()
                    .unwrap_or((crate::reload::Phase::Commit, "unknown".into()));
                let generation = outcome.generation;
                master.lineage.report_failure(&phase.to_string(), &reason);
                master.stop(Stop::Fast, None);
                master.wait_for_workers(&mut signals).await;
                master.stop_orphans();
                master.log.shutdown_traces();
                anyhow::bail!("starting generation {generation} failed in phase {phase}: {reason}");
            }
        }
        master.lineage.report_ready(&master.fleet);
        if master.operation.stopping().is_some() && master.fleet.is_empty() {
            break;
        }
        // The tasks that read the control socket, the admin endpoint and
        // the workers' channels run on this thread: they get their turn
        // before the next event is picked, so a request that came in during
        // a long turn is in its inbox now.
        tokio::task::yield_now().await;
        let deadline = master.next_deadline();
        let answered = tokio::select! {
            // Messages first: what a child said before it exited is read
            // before its exit is reaped (a new master's `failed`, say). The
            // inbox carries a few messages per worker and second: signals
            // are not starved.
            biased;
            (request, event) = next_event(&mut inbox, [&mut probes_inbox, &mut requests_inbox], requests_in_a_row < REQUESTS_IN_A_ROW) => {
                requests_in_a_row = if request { requests_in_a_row + 1 } else { 0 };
                master.on_event(event);
                request
            }
            signal = signals.recv() => {
                master.on_signal(signal);
                false
            }
            // Only systemd's main pid pets: the master holding the control
            // socket, not an old one that handed over.
            _ = watchdog.due() => {
                if master.endpoints.main_process() {
                    crate::sd_notify::notify("WATCHDOG=1");
                }
                false
            }
            _ = sleep_until(deadline) => false,
        };
        // A request's reply goes out before the tick's work.
        if answered {
            tokio::task::yield_now().await;
        }
        master.on_tick();
        if master.restarting() {
            // The reply to `baton restart` goes out first; the keeper
            // holds everything else, and starts the new master when this
            // one is gone. Nothing is stopped or removed.
            tokio::time::sleep(Duration::from_millis(50)).await;
            tracing::info!("master exiting for a restart");
            master.log.shutdown_traces();
            std::process::exit(0);
        }
    }
    master.stop_orphans();
    master.leave_store();
    tracing::info!("master exiting");
    master.log.shutdown_traces();
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Master {
    fn on_signal(&mut self, signal: SignalEvent) {
        if signal == SignalEvent::Child {
            // Reaped from the tick, a slice a turn.
            self.children.signalled();
            return;
        }
        let from = crate::audit::signal_requester(signal);
        match &from {
            Some(from) => tracing::info!(?signal, requested_by = %from, "signal received"),
            None => tracing::info!(?signal, "signal received"),
        }
        match signal {
            SignalEvent::Reload => {
                self.request_reload(crate::operation::ReloadRequest::new(Trigger::Signal, from))
            }
            SignalEvent::GracefulStop => self.stop(Stop::Graceful, from.as_ref()),
            SignalEvent::Terminate | SignalEvent::Interrupt => {
                self.stop(self.stop_for(signal), from.as_ref())
            }
            SignalEvent::Reopen => {
                self.reopen();
            }
            SignalEvent::Upgrade => self.request_upgrade(None, from.as_ref()),
            SignalEvent::ScaleUp => self.scale_logged(ScaleChange::By(1), from.as_ref()),
            SignalEvent::ScaleDown => self.scale_logged(ScaleChange::By(-1), from.as_ref()),
            SignalEvent::Child => {}
        }
    }

    fn on_event(&mut self, event: Event) {
        let (pid, message, fds, fds_truncated) = match event {
            Event::Message {
                pid,
                message,
                fds,
                fds_truncated,
            } => (pid, message, fds, fds_truncated),
            Event::Control {
                request,
                reply,
                from,
            } => {
                if !matches!(request, Request::Status {}) {
                    tracing::info!(?request, requested_by = %from, "control request");
                }
                return self.on_control(request, reply, from);
            }
            Event::Admin { endpoint, reply } => return self.on_admin(endpoint, reply),
            Event::ConfigLoaded(loaded) => return self.on_config_loaded(*loaded),
            Event::Upgrade { message } => return self.on_upgrade_message(message),
            // In a new master: the old master handed over (or vanished):
            // this one takes the socket files, the control socket and the
            // pid file.
            Event::OldMaster { message, fds } => {
                if let Some(connections @ crate::upgrade::handoff::OldMessage::Connections { .. }) =
                    message
                {
                    return self.on_old_master_connections(connections, fds);
                }
                if self.lineage.on_old_master(message) {
                    // The old master died mid-upgrade and its keeper's new
                    // master adopted its workers: that one serves; this
                    // upgrade is abandoned.
                    if crate::control::live(&self.config.supervisor.control_socket) {
                        tracing::warn!(
                            "another master serves the control socket (the old master's keeper started one): this upgrade's new master stops"
                        );
                        return self.stop(Stop::Graceful, None);
                    }
                    for listener in self.fleet.sockets() {
                        listener.own_path();
                    }
                    self.endpoints.take_over(&self.config.supervisor);
                }
                return;
            }
            Event::OldMasterExited => {
                tracing::info!("old master exited");
                self.lineage.old_master_exited();
                return self.fleet.tidy();
            }
            Event::AdoptedExit { pid } => {
                if self.children.owner(pid).is_some() {
                    self.on_exit(pid, "exited (status unknown: adopted)".into(), false);
                }
                return;
            }
            Event::KeeperGone => return self.keeper_gone(),
            Event::Notify {
                generation,
                datagram,
            } => {
                if let Some(g) = self.fleet.get_mut(generation) {
                    if crate::notify::deliver(g, datagram) {
                        self.advance_reload();
                    }
                }
                return;
            }
            Event::Probe { generation, result } => return self.probed(generation, result),
            Event::Spawned {
                generation,
                index,
                result,
            } => return self.on_spawned(generation, index, result),
        };
        let Some(generation) = self.fleet.of_worker(pid) else {
            return;
        };
        let number = generation.number();
        // With `ready = "delay:..."` only the delay decides.
        let sdk_ready = generation.config().worker.ready == ReadyMode::Sdk;
        let Some(worker) = generation.worker_mut(pid) else {
            return;
        };
        let (index, raw) = (worker.index(), pid.as_raw());
        match message {
            Ok(WorkerMessage::Ready) => {
                if worker.state() == State::Starting && sdk_ready {
                    worker.become_ready();
                    tracing::info!(
                        event = "worker.ready",
                        generation = number,
                        worker = index,
                        pid = raw,
                        "worker ready"
                    );
                }
            }
            Ok(WorkerMessage::Connections { count }) => worker.report_connections(count),
            Ok(WorkerMessage::AppRegistered { version }) => {
                tracing::info!(generation = number, worker = index, pid = raw, %version, "worker registered its reload handle");
                worker.runs_version(version);
            }
            Ok(
                answer @ (WorkerMessage::AppPrepared { .. }
                | WorkerMessage::AppRefused { .. }
                | WorkerMessage::AppCommitted { .. }),
            ) => return self.on_app_answer(pid, answer),
            Ok(
                message @ (WorkerMessage::Adopts { .. }
                | WorkerMessage::Handover { .. }
                | WorkerMessage::Adopted { .. }
                | WorkerMessage::AdoptRefused { .. }
                | WorkerMessage::ClosedAtDrain { .. }),
            ) => return self.on_handover(pid, number, message, fds, fds_truncated),
            Ok(WorkerMessage::Error { message }) => {
                tracing::error!(generation = number, worker = index, pid = raw, error = %message, "worker reported an error")
            }
            Err(e) => {
                // Whatever it says next cannot be trusted either: it is
                // treated as failed, as if it had crashed (its exit is
                // reaped as any other's).
                tracing::error!(generation = number, worker = index, pid = raw, error = %e, "worker broke the control protocol: closing its channel and killing it");
                worker.close_channel();
                worker.kill();
                if generation.state() == GenerationState::Starting {
                    let reason =
                        format!("worker {index} (pid {raw}) broke the control protocol: {e}");
                    self.new_worker_exited(reason);
                }
            }
        }
        self.advance_reload();
    }

    /// How SIGTERM or SIGINT stops the master: SIGTERM as `[supervisor]
    /// sigterm` says (graceful by default, as containers and systemd
    /// expect), SIGINT fast; either one during a stop makes it fast, so a
    /// second Ctrl-C or `docker stop` cuts a long drain short.
    fn stop_for(&self, signal: SignalEvent) -> Stop {
        let graceful = self.config.supervisor.sigterm == crate::config::SigtermMode::Graceful;
        if signal == SignalEvent::Terminate && graceful && self.operation.stopping().is_none() {
            Stop::Graceful
        } else {
            Stop::Fast
        }
    }

    /// Starts a graceful or fast stop (a fast stop overrides a graceful
    /// one), abandoning the operation under way.
    pub(crate) fn stop(&mut self, how: Stop, by: Option<&crate::audit::Requester>) {
        self.stop_after(how, by, None);
    }

    /// `baton drain` (a `preStop` hook): the master stops gracefully after
    /// `grace`, during which `/readyz` answers 503 (so that load balancers
    /// and Kubernetes take the pod out) while the workers go on serving.
    /// Err when a stop is under way already.
    pub(crate) fn drain(
        &mut self,
        grace: Duration,
        by: Option<&crate::audit::Requester>,
    ) -> Result<(), String> {
        if self.stop_after(Stop::Graceful, by, Some(grace)) {
            Ok(())
        } else {
            Err("the master is stopping already".into())
        }
    }

    /// Starts a stop, at once or once the workers have served `grace` more
    /// (a drain); whether it started.
    fn stop_after(
        &mut self,
        how: Stop,
        by: Option<&crate::audit::Requester>,
        grace: Option<Duration>,
    ) -> bool {
        let admission = self
            .operation
            .summary()
            .admit(Ask::Stop(how), Facts::default());
        if admission != Admission::Start {
            return false;
        }
        let grace_ms = grace.map(|g| g.as_millis() as u64);
        match by {
            Some(by) => {
                tracing::info!(event = "master.stopping", ?how, grace_ms, requested_by = %by, "master stopping")
            }
            None => tracing::info!(event = "master.stopping", ?how, grace_ms, "master stopping"),
        }
        // Only the master holding the control socket is systemd's main pid:
        // not an old one that handed over, nor a new one before the handover.
        if self.endpoints.main_process() {
            crate::sd_notify::notify("STOPPING=1");
        }
        // Dying from now on, it is not restarted: its workers are stopped.
        self.retire_keeper();
        self.abandon_upgrade();
        self.abandon_in_place();
        self.probing = None;
        if self.operation.take_rollout().is_some() {
            tracing::warn!("probation abandoned: the master is stopping");
        }
        if self.operation.take_reload().is_some() || self.operation.take_reading().is_some() {
            tracing::warn!("reload abandoned: the master is stopping");
        }
        let serving_until = grace.map(|g| Instant::now() + g);
        self.operation.become_stopping(how, serving_until);
        self.reloads.cancel_follow_up("the master is stopping");
        if serving_until.is_none() {
            self.stop_serving(how);
        }
        true
    }

    /// The workers stop serving: they drain (or, `Stop::Fast`, are
    /// terminated).
    fn stop_serving(&mut self, how: Stop) {
        self.operation.stop_serving();
        // systemd's fd store keeps the listening sockets for the next
        // master: nothing may be left queued on a socket that goes.
        let stored = self.children.keeper().is_some_and(|k| k.stores());
        if stored && how == Stop::Graceful && self.endpoints.main_process() {
            self.fleet.steer_home();
        }
        self.fleet.stop(how == Stop::Graceful, FAST_STOP_GRACE);
        self.reap_finished_generations();
    }

    /// Tells the keeper of every worker (a new keeper, or a new image
    /// of this master that adopted them).
    pub(crate) fn guard_every_worker(&mut self) {
        let Some(keeper) = self.children.keeper_mut() else {
            return;
        };
        for generation in self.fleet.iter() {
            let worker_config = &generation.config().worker;
            for worker in generation.workers().values() {
                keeper.watch(
                    worker.pid(),
                    worker_config.drain_timeout.0,
                    worker_config.stop_signal.0,
                );
            }
        }
    }

    /// Stops what workers left outside their process groups (see
    /// [`crate::orphans`]); never the new master of an upgrade, nor a later
    /// one re-parented here when its own old master exited first.
    fn stop_orphans(&self) {
        let keeper = self.children.keeper().and_then(|k| k.pid());
        let spare: Vec<Pid> = self
            .lineage
            .successor()
            .into_iter()
            .chain(keeper)
            .chain(crate::orphans::lineage_masters())
            .collect();
        crate::orphans::stop_all(&spare, crate::orphans::GRACE);
    }

    /// Waits (serving signals and reaping) until every worker is gone.
    async fn wait_for_workers(&mut self, signals: &mut Signals) {
        while !self.fleet.is_empty() {
            let deadline = self.next_deadline();
            tokio::select! {
                signal = signals.recv() => {
                    if signal == SignalEvent::Child { self.reap() }
                }
                _ = sleep_until(deadline) => {}
            }
            self.on_tick();
        }
    }

    /// Runs whatever is due: reload deadlines, drain kills, respawns.
    fn on_tick(&mut self) {
        // Reaping, tidying and the reload's bind and spawn steps are each
        // sliced to a few milliseconds; one of them a turn, so that a turn
        // stays that short. Each makes the next deadline now while it has
        // work left. Tidying goes before the reload's steps: a port's
        // retired sockets are let go of before a new one joins behind them
        // (with spawns let go first, `many_listeners` found a fourth
        // socket left on a port).
        if self.children.reap_pending() {
            self.reap_some();
        } else if self.fleet.tidy_pending() {
            self.tidy_step();
        } else {
            self.step_reload();
        }
        self.advance_reload();
        self.advance_in_place();
        self.fleet.kill_unanswered(Instant::now());
        self.probe_tick();
        self.keep();
        let now = Instant::now();
        let spawning = self
            .operation
            .reload()
            .is_some_and(|r| r.spawn_phase_open(&self.fleet));
        if let Some(deadline) = self.operation.due(now, spawning) {
            self.on_deadline(deadline);
        }
        let stopping = self.operation.stopping().is_some();
        let held = self.operation.spawns_held();
        for generation in self.fleet.iter_mut() {
            let respawn = !stopping
                && generation.state() == GenerationState::Current
                && held != Some(generation.number());
            let killed = generation.tick(now, respawn, &self.events, &mut self.children);
            self.metrics.killed_at_drain_deadline.inc_by(killed);
        }
    }

    /// Starts a probe attempt when one is due; one past its deadline, or
    /// unable to start, ends here.
    fn probe_tick(&mut self) {
        let Some(probing) = &mut self.probing else {
            return;
        };
        let number = probing.generation;
        let Some(generation) = self.fleet.get(number) else {
            self.probing = None;
            return;
        };
        let now = Instant::now();
        if let Some(result) = probing.tick(now, generation, &self.events, &mut self.children) {
            self.probed(number, result);
        }
    }

    /// A readiness probe of `generation` ended with `result`: a pass makes
    /// its starting workers ready; a failure may roll a probation back.
    pub(crate) fn probed(&mut self, generation: u64, result: Result<(), String>) {
        let Some(probing) = self.probing.as_mut().filter(|p| p.generation == generation) else {
            return;
        };
        if probing.record(result) {
            if let Some(g) = self.fleet.get_mut(generation) {
                g.probe_passed();
            }
        } else {
            self.probe_failed();
        }
        self.advance_reload();
    }

    /// A deadline of the operation under way passed: does what
    /// [`Summary::on_deadline`](crate::operation::Summary::on_deadline)
    /// decides.
    fn on_deadline(&mut self, deadline: Deadline) {
        match self.operation.summary().on_deadline(deadline) {
            Expiry::FailReload => self.fail_not_ready(),
            Expiry::InPlace(next) => self.move_in_place(next),
            Expiry::Promote => {
                self.promote();
            }
            Expiry::FailUpgrade => self.upgrade_timed_out(),
            Expiry::Exec => self.exec_upgrade(),
            Expiry::KillUpgradeChild => self.kill_upgrade_child(),
            Expiry::StopServing => {
                tracing::info!("drain grace over: the workers drain");
                self.stop_serving(Stop::Graceful)
            }
            Expiry::Nothing => {}
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let held = self.operation.spawns_held();
        let generations = self.fleet.next_deadline(held);
        let operation = self.operation.wakeup();
        // Work left for the next turns: now.
        let busy = (self.fleet.tidy_pending() || self.children.reap_pending()).then(Instant::now);
        generations
            .into_iter()
            .chain(operation)
            .chain(busy)
            .chain(self.delay_ready_deadline())
            .chain(self.probing.as_ref().map(Probing::deadline))
            .chain(self.keep_wakeup())
            .chain(self.fleet.tidy_wakeup())
            .min()
    }
}

/// Children reaped per turn of the event loop: the kernel charges the
/// reaper for the fds an exited child still held, about a millisecond per
/// thousand.
const REAP_CHUNK: usize = 2;

/// The most messages read from an exited worker's channel for its last
/// count ([`Master::read_last_count`]).
const LAST_WORDS: usize = 64;

/// Child exits: every exited child reaped, its exit handed to what started
/// it (see [`crate::children`]); a worker's exit done as
/// [`crate::operation::Summary::on_worker_exit`] decides.
impl Master {
    /// Collects every exited child.
    pub(crate) fn reap(&mut self) {
        while self.reap_one() {}
    }

    /// Reaps at most [`REAP_CHUNK`] exited children, and leaves the rest
    /// for the next turn of the loop
    /// ([`crate::children::Children::reap_pending`]): reaping a worker
    /// with many fds takes about a millisecond, and a generation's workers
    /// all exit at once at the end of a drain.
    pub(crate) fn reap_some(&mut self) {
        for _ in 0..REAP_CHUNK {
            if !self.reap_one() {
                return self.children.reaped(false);
            }
        }
        self.children.reaped(true);
    }

    /// Reaps one exited child; false when none was left.
    fn reap_one(&mut self) -> bool {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                self.on_exit(pid, format!("exit status {code}"), code == 0)
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) => {
                self.on_exit(pid, format!("signal {signal}"), false)
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return false,
            Ok(_) => {}
        }
        true
    }

    /// Child `pid` exited: the exit goes straight to what started it.
    pub(crate) fn on_exit(&mut self, pid: Pid, status: String, success: bool) {
        match self.children.take(pid) {
            Some(Owner::Worker(generation)) => self.worker_exited(generation, pid, status, success),
            Some(Owner::Probe) => {
                let probed = self.probing.as_mut().and_then(|p| {
                    let result = p.exited(pid, &status, success)?;
                    Some((p.generation, result))
                });
                if let Some((generation, result)) = probed {
                    self.probed(generation, result);
                }
            }
            Some(Owner::Upgrade) => {
                self.upgrade_child_exited(pid, &status, success);
            }
            // Its channel's end starts another (`Event::KeeperGone`).
            Some(Owner::Keeper) => {
                tracing::warn!(pid = pid.as_raw(), %status, "the keeper exited");
            }
            // Maybe a worker whose start has not come back to the loop yet.
            None if self.fleet.spawns_pending() => {
                self.children.hold(pid, Exit { status, success })
            }
            // An orphan re-parented to this subreaper, or a child released.
            None => {}
        }
    }

    /// Worker `pid` of generation `number` exited: what that means is
    /// decided by `Summary::on_worker_exit` (see [`crate::operation`]), and
    /// done here.
    fn worker_exited(&mut self, number: u64, pid: Pid, status: String, success: bool) {
        self.children.worker_exited(pid);
        self.read_last_count(number, pid);
        self.handovers_of_exited(pid);
        let Some(generation) = self.fleet.get_mut(number) else {
            return;
        };
        let Some(worker) = generation.remove_worker(pid) else {
            return;
        };
        let index = worker.index();
        // Its sockets on QUIC ports are let go of at the next tidy.
        let quic = generation.listeners().iter().any(|l| l.is_quic());
        let reason = exit_reason(generation.state(), worker.state(), success);
        tracing::info!(
            event = "worker.exited",
            generation = number,
            worker = index,
            pid = pid.as_raw(),
            %status,
            state = worker.state().name(),
            "worker exited"
        );
        self.metrics.worker_exited(reason);
        let now = Instant::now();
        let exited = Exited {
            generation: generation.state(),
            draining: matches!(worker.state(), State::Draining { .. } | State::Killed),
            within: index < generation.processes(),
            owed_answer: self.operation.in_place().is_some_and(|t| t.owes(pid)),
            crash_loop: generation.would_crash_loop(index, now),
        };
        let reaction = self.operation.summary().on_worker_exit(exited);
        if quic {
            self.fleet.tidy();
        }
        let what = format!("worker {index} (pid {pid}) exited with {status}");
        match reaction.operation {
            ForOperation::Nothing => {}
            ForOperation::FailReload => {
                self.new_worker_exited(format!("{what} before it was ready"))
            }
            ForOperation::AbortInPlace => {
                self.abort_in_place_on_exit(pid, format!("{what} while preparing"))
            }
            ForOperation::StopWaiting => self.stop_waiting_for(pid),
            ForOperation::RollBack => self.roll_back_on_exit(&what),
        }
        let generation = self.fleet.get_mut(number);
        match (reaction.worker, generation) {
            (ForWorker::Forget, _) | (_, None) => {}
            (ForWorker::StopRespawning, Some(generation)) => {
                generation.crash_loop(index, now);
                tracing::error!(
                    event = "worker.crash_looped",
                    generation = number,
                    worker = index,
                    pid = pid.as_raw(),
                    crashes = generation.config().worker.crash_loop_limit,
                    window_ms = generation.config().worker.crash_loop_window.0.as_millis() as u64,
                    "worker crash loop: not respawned any more; capacity is lost until a reload"
                );
            }
            (ForWorker::Respawn, Some(generation)) => {
                generation.crash_loop(index, now);
                let delay = generation.schedule_respawn(&worker);
                self.metrics.worker_restarted(reason);
                tracing::warn!(
                    event = "worker.respawning",
                    generation = number,
                    worker = index,
                    pid = pid.as_raw(),
                    delay_ms = delay.as_millis() as u64,
                    "worker died; respawning"
                );
            }
        }
        self.reap_finished_generations();
    }

    /// Reads what worker `pid` of generation `number` sent just before it
    /// exited and the loop has not read yet, for the count of connections it
    /// closed at its drain: a draining worker says it last, and its exit
    /// can be heard first. At most [`LAST_WORDS`] messages; the others are
    /// of no use once it is gone.
    fn read_last_count(&mut self, number: u64, pid: Pid) {
        let Some(channel) = self
            .fleet
            .get(number)
            .and_then(|g| g.workers().get(&pid))
            .and_then(|w| w.channel().cloned())
        else {
            return;
        };
        for _ in 0..LAST_WORDS {
            match channel.try_recv::<WorkerMessage>() {
                Ok(Some(received)) => {
                    if let message @ WorkerMessage::ClosedAtDrain { .. } = received.message {
                        self.on_handover(pid, number, message, Vec::new(), false);
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Drops generations that have nothing left to run; their listeners close
    /// when no other generation holds them.
    pub(crate) fn reap_finished_generations(&mut self) {
        let stopping = self.operation.stopping().is_some();
        let reloading = self.operation.reload().map(|r| r.generation());
        for retired in self.fleet.retire_finished(reloading, stopping) {
            if let Some(drained) = retired.drained {
                self.metrics.drained(drained);
            }
            let moved = self.handovers.finished(retired.number);
            tracing::info!(
                event = "generation.finished",
                generation = retired.number,
                state = retired.state.name(),
                handed_over = moved.handed_over,
                closed_at_drain = moved.closed_at_drain,
                "generation finished"
            );
        }
    }

    /// Tidies the next ports queued. Not while an upgrade runs (a new
    /// master may have sockets of its own on the ports, which this one's
    /// bookkeeping does not know), nor once stopping (everything goes at
    /// exit; after an upgrade the ports are the new master's).
    pub(crate) fn tidy_step(&mut self) {
        if self.operation.upgrade().is_some() || self.operation.stopping().is_some() {
            return self.fleet.cancel_tidy();
        }
        self.fleet.tidy_step();
    }
}
