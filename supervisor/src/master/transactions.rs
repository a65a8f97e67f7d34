//! What the master does when a transaction decides: the transaction types
//! ([`Reload`], [`InPlace`], [`Rollout`], [`Upgrade`]) decide and act on
//! the parts they are given (the fleet, the endpoints, the inbox); the
//! master moves the operation on, switches its own settings and records
//! how each ended.

use super::{Master, Stop, Waiter};
use crate::audit::Requester;
use crate::children::Owner;
use crate::config::Config;
use crate::control::protocol::{ReloadOutcome, Reply};
use crate::inplace::{Advance, InPlace, Mode, Move};
use crate::listener::Shared;
use crate::master::Event;
use crate::operation::{Admission, Ask, Facts, Operation, ReloadRequest};
use crate::probe::Probing;
use crate::reload::{Ended, Phase, Reload, Started, Trigger, Validating};
use crate::rollout::{Cutover, Rollout};
use crate::upgrade::handoff::NewMessage;
use crate::upgrade::{Happened, Start, Upgrade, Verdict};
use baton_wire::channel::ChannelError;
use baton_wire::protocol::WorkerMessage;
use nix::unistd::Pid;
use std::rc::Rc;
use tokio::time::Instant;

impl Master {
    /// Records how a transaction ended (see
    /// [`crate::operation::Reloads::record`]), lets go of the generations
    /// it finished, and starts the coalesced follow-up once nothing runs
    /// (not when the transaction handed over to a probation, nor during a
    /// stop).
    pub(crate) fn end(&mut self, ended: Ended) {
        // Not from a new master started by an upgrade, which is not
        // systemd's main pid yet (the old one announces it with MAINPID= at
        // the handover).
        let tell_systemd = !self.lineage.taking_over();
        self.reloads
            .record(ended, &mut self.fleet, &self.metrics, tell_systemd);
        self.reap_finished_generations();
        if matches!(self.operation, Operation::Idle) {
            if let Some(follow_up) = self.reloads.take_follow_up() {
                self.request_reload(follow_up);
            }
        }
    }

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
                if let Some(unchanged) = self.already_deployed(&request) {
                    tracing::info!(
                        event = "reload.unchanged",
                        generation = unchanged.generation,
                        deploy_version = unchanged.deploy_version.as_deref().unwrap_or_default(),
                        requested_by = %request.requested_by.as_ref().map(ToString::to_string).unwrap_or_default(),
                        "reload not needed: the current generation already runs this version"
                    );
                    for waiter in request.waiters {
                        let _ = waiter.send(Reply::ok(&unchanged));
                    }
                    return;
                }
                self.reloads.deploying(request.if_version.take());
                self.reloads
                    .wait_for_running(std::mem::take(&mut request.waiters));
                self.operation
                    .begin(Operation::Reading(Validating::new(request)));
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

    /// The outcome of a reload that `request` does not need: the current
    /// generation was committed by a reload with the same `if_version`.
    fn already_deployed(&self, request: &ReloadRequest) -> Option<ReloadOutcome> {
        let wanted = request.if_version.as_deref()?;
        let current = self.fleet.current()?;
        if current.deploy_version() != Some(wanted) {
            return None;
        }
        Some(ReloadOutcome {
            generation: current.number(),
            trigger: request.trigger.to_string(),
            outcome: "unchanged".into(),
            failed_phase: None,
            reason: None,
            phases: Vec::new(),
            kind: "none".into(),
            version: Some(current.config().app.version.clone()),
            deploy_version: Some(wanted.to_string()),
            pids: current.workers().keys().map(|p| p.as_raw()).collect(),
            finished_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            requested_by: request.requested_by.clone(),
        })
    }

    /// The configuration a reload asked for has been read: the transaction
    /// goes on, unless the master started stopping meanwhile.
    pub(crate) fn on_config_loaded(&mut self, loaded: Result<Config, String>) {
        if let Some(validating) = self.operation.take_reading() {
            self.begin_reload(validating.into_request(), loaded);
        }
    }

    /// Runs the reload `request` asked for with the configuration read: in
    /// place (see [`crate::inplace`]) when it can and was not told
    /// otherwise (`--in-place`, `--new-generation`), else a new generation
    /// (see [`Reload::begin`]).
    pub(crate) fn begin_reload(&mut self, request: ReloadRequest, loaded: Result<Config, String>) {
        let started = Instant::now();
        let trigger = request.trigger;
        let mode = request.mode;
        let reloading = matches!(
            trigger,
            Trigger::Signal | Trigger::Cli | Trigger::Admin | Trigger::Coalesced | Trigger::Watch
        );
        let loaded = match loaded {
            Ok(config) if reloading && mode != Mode::NewGeneration => {
                match InPlace::possible(&self.fleet, &config) {
                    Ok(number) => {
                        let span = tracing::info_span!(parent: None, "reload", generation = number, %trigger, kind = "in_place", config_hash = %config.hash, version = %config.app.version);
                        span.in_scope(|| {
                            tracing::info!(event = "reload.started", "reload started")
                        });
                        crate::sd_notify::reloading(number);
                        let begun = InPlace::begin(
                            &mut self.fleet,
                            trigger,
                            request.requested_by,
                            number,
                            Rc::new(config),
                            span,
                            started.elapsed(),
                        );
                        return match begun {
                            Started::Running(transaction) => {
                                self.operation.begin(Operation::InPlace(transaction))
                            }
                            Started::Ended(ended) => self.end(*ended),
                        };
                    }
                    Err(reason) if mode == Mode::InPlace => {
                        return self.end(Ended {
                            generation: self.fleet.current_number().unwrap_or(0),
                            trigger,
                            requested_by: request.requested_by,
                            phases: vec![(Phase::Validate, started.elapsed())],
                            failure: Some((
                                Phase::Validate,
                                format!("cannot reload in place: {reason}"),
                            )),
                        });
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
        match Reload::begin(request, loaded, started, &mut self.fleet, &self.endpoints) {
            Started::Ended(ended) => self.end(*ended),
            Started::Running(reload) => match reload.shared_sockets() {
                Some(sockets) => self.start_generation(reload, sockets),
                None => self.operation.begin(Operation::Starting(reload)),
            },
        }
    }

    /// The bind phase is over: the new generation starts with `sockets`.
    fn start_generation(&mut self, mut reload: Reload, sockets: Vec<Shared>) {
        let control_socket = &self.config.supervisor.control_socket;
        match reload.start_generation(&mut self.fleet, sockets, control_socket, &self.events) {
            Ok(()) => self.operation.begin(Operation::Starting(reload)),
            Err(reason) => self.abort(reload, Phase::Spawn, reason),
        }
    }

    /// Moves the reload one step, from the loop's tick: a chunk of the bind
    /// phase, or one worker spawned.
    pub(crate) fn step_reload(&mut self) {
        let Some(reload) = self.operation.reload_mut() else {
            return;
        };
        if reload.binds() {
            match reload.bind_next(&self.fleet) {
                Ok(None) => {}
                Ok(Some(sockets)) => {
                    let reload = self.operation.take_reload().expect("matched above");
                    self.start_generation(reload, sockets);
                }
                Err(reason) => {
                    let reload = self.operation.take_reload().expect("matched above");
                    self.abort(reload, Phase::Bind, reason);
                }
            }
            return;
        }
        match reload.spawn_next(&mut self.fleet, &self.events) {
            Ok(true) => self.end_spawn_phase(),
            Ok(false) => {}
            Err(reason) => {
                let reload = self.operation.take_reload().expect("matched above");
                self.abort(reload, Phase::Spawn, reason);
            }
        }
    }

    /// Worker `index` of generation `number`, started off the loop, has
    /// exec'd (or failed to): taken into its generation while the reload
    /// that started it runs, stopped otherwise.
    pub(crate) fn on_spawned(
        &mut self,
        number: u64,
        index: u32,
        result: Result<std::process::Child, String>,
    ) {
        let pid = result
            .as_ref()
            .ok()
            .map(|child| Pid::from_raw(child.id() as i32));
        // It may have exited already, reaped before it came back here.
        let exited = pid.and_then(|pid| self.children.claim(pid));
        let wanted = self
            .operation
            .reload()
            .is_some_and(|r| r.generation() == number)
            && self.fleet.get(number).is_some();
        let taken = match (self.fleet.get_mut(number), result) {
            (Some(generation), Ok(child)) if wanted => generation
                .spawned(index, child, &self.events, &mut self.children)
                .map(|_| ())
                .map_err(|e| format!("{e:#}")),
            (generation, result) => {
                if let Some(generation) = generation {
                    generation.forget_pending(index);
                }
                // Not wanted any more (or failed): killed, unless gone
                // already; its exit is reaped as any other.
                if let (Some(pid), None, true) = (pid, &exited, result.is_ok()) {
                    tracing::info!(
                        pid = pid.as_raw(),
                        "worker started for a reload that has ended: killed"
                    );
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                }
                result.map(|_| ())
            }
        };
        // Once no worker is still to come back, no unknown exit can be one
        // of theirs.
        if !self.fleet.spawns_pending() {
            self.children.drop_unclaimed();
        }
        // It may have notified already, before it was taken in.
        if let Some(g) = self.fleet.get_mut(number) {
            if crate::notify::replay(g) {
                self.advance_reload();
            }
        }
        if !wanted {
            return self.reap_finished_generations();
        }
        let _enter = self.operation.reload().map(|r| r.span().clone().entered());
        if let Err(reason) = taken {
            let reload = self.operation.take_reload().expect("wanted: a reload runs");
            return self.abort(reload, Phase::Spawn, format!("worker {index}: {reason}"));
        }
        if let (Some(pid), Some(exit)) = (pid, exited) {
            return self.on_exit(pid, exit.status, exit.success);
        }
        self.end_spawn_phase();
    }

    /// Ends the spawn phase once every worker was started and has come
    /// back; the ready phase begins, and the probes with it.
    fn end_spawn_phase(&mut self) {
        let Some(reload) = self.operation.reload_mut() else {
            return;
        };
        if reload.spawn_phase_open(&self.fleet) {
            return;
        }
        reload.begin_ready();
        let generation = reload.generation();
        self.probing = self.fleet.get(generation).and_then(Probing::of);
        self.advance_reload();
    }

    /// Moves the reload on after an event: commits when every new worker
    /// is ready (its deadline is the loop's: see
    /// [`Master::fail_not_ready`]).
    pub(crate) fn advance_reload(&mut self) {
        let Some(reload) = self.operation.reload() else {
            return;
        };
        if reload.ready(&mut self.fleet) {
            let reload = self.operation.take_reload().expect("checked above");
            self.commit(reload);
        }
    }

    /// `ready_timeout` passed: the reload fails, naming the workers not
    /// ready (and the last probe's failure).
    pub(crate) fn fail_not_ready(&mut self) {
        if let Some(reload) = self.operation.take_reload() {
            let reason = reload.not_ready(&self.fleet, self.probing.as_ref());
            self.abort(reload, Phase::Ready, reason);
        }
    }

    /// A worker of the starting generation exited before it was ready (or
    /// broke the protocol).
    pub(crate) fn new_worker_exited(&mut self, reason: String) {
        if let Some(reload) = self.operation.take_reload() {
            self.abort(reload, Phase::Ready, reason);
        }
    }

    /// When a delay-ready worker becomes ready, for the event loop's timer.
    pub(crate) fn delay_ready_deadline(&self) -> Option<Instant> {
        self.operation.reload()?.delay_ready_at(&self.fleet)
    }

    /// Every new worker is ready: probation when the reload asks for it,
    /// else it settles.
    fn commit(&mut self, mut reload: Reload) {
        let _enter = reload.span().clone().entered();
        reload.end_phase(Phase::Ready);
        drop(_enter);
        self.cut_over(reload);
    }

    /// Switches over for good: every new connection to the new generation,
    /// the replaced one drained, the master's settings switched.
    pub(crate) fn settle(&mut self, reload: Reload) {
        let span = reload.span().clone();
        let _enter = span.enter();
        self.probing = None;
        let config = reload.config().clone();
        let supervisor = &self.config.supervisor;
        if config.supervisor.log_filter != supervisor.log_filter {
            if let Err(e) = self.log.set_filter(&config.supervisor.log_filter) {
                tracing::error!(error = %e, "cannot switch log filter");
            }
        }
        if config.supervisor.log_format != self.log.format()
            || config.supervisor.log_file.as_deref() != self.log.file()
        {
            tracing::warn!("log_format and log_file changes take effect when the master restarts");
        }
        if config.supervisor.otlp() != supervisor.otlp() {
            tracing::warn!(
                "otlp_endpoint, otlp_export_timeout and otlp_flush_timeout changes take effect when the master restarts or upgrades"
            );
        }
        if config.supervisor.control_socket != supervisor.control_socket
            || config.supervisor.pid_file != supervisor.pid_file
        {
            tracing::warn!(
                "control_socket and pid_file changes take effect when the master restarts"
            );
        }
        let settling = tokio::time::Instant::now();
        let settled = reload.settle(&mut self.fleet);
        // The replaced SDK generation's connections move in this reload's
        // trace.
        for replaced in self.fleet.iter() {
            let worker = &replaced.config().worker;
            let moves = worker.protocol == crate::config::Protocol::Sdk && worker.handover;
            if moves && replaced.draining_since().is_some_and(|at| at >= settling) {
                self.handovers.draining(replaced.number(), &span);
            }
        }
        if let Some(admin) = settled.admin {
            self.endpoints.replace_admin(admin);
        }
        self.config = settled.config;
        self.endpoints.allow_writes(&self.config);
        // Kills the oldest draining generations past
        // `[supervisor] max_draining_generations`, as HAProxy's
        // `mworker-max-reloads` does: workers that ignore their stop
        // signal under a long `drain_timeout` must not pile up.
        let max = self.config.supervisor.max_draining_generations as usize;
        self.fleet.limit_draining(max);
        // A replaced generation may have had no live worker (all waiting
        // to be respawned): it is finished now.
        self.end(settled.ended);
    }

    /// The reload fails in `phase` for `reason`.
    fn abort(&mut self, reload: Reload, phase: Phase, reason: String) {
        self.probing = None;
        let ended = reload.abort(&mut self.fleet, phase, reason);
        self.end(ended);
    }

    /// At commit: probation when the reload asks for it, else it settles.
    pub(crate) fn cut_over(&mut self, reload: Reload) {
        match Rollout::begin(reload, &mut self.fleet) {
            Cutover::Probation(rollout) => self.operation.begin(Operation::Probation(rollout)),
            Cutover::Settle(reload) => self.settle(reload),
        }
    }

    /// Ends probation with the new generation in service: the reload
    /// settles. Returns whether there was one.
    pub(crate) fn promote(&mut self) -> bool {
        let Some(rollout) = self.operation.take_rollout() else {
            return false;
        };
        self.settle(rollout.promote());
        true
    }

    /// Rolls the probation back because of `reason`. Returns whether there
    /// was one.
    pub(crate) fn roll_back(&mut self, reason: &str) -> bool {
        let Some(rollout) = self.operation.take_rollout() else {
            return false;
        };
        self.probing = None;
        let ended = rollout.roll_back(&mut self.fleet, reason);
        self.end(ended);
        true
    }

    /// A worker of the generation on probation exited (`exited` says which,
    /// and how): that rolls back (see
    /// [`crate::operation::Summary::on_worker_exit`]).
    pub(crate) fn roll_back_on_exit(&mut self, exited: &str) {
        if let Some(reason) = self.operation.rollout().map(|r| r.exit_reason(exited)) {
            self.roll_back(&reason);
        }
    }

    /// A probe of the generation on probation failed: past
    /// `probation_failures` in a row, that rolls back.
    pub(crate) fn probe_failed(&mut self) {
        let reason = self
            .operation
            .rollout()
            .zip(self.probing.as_ref())
            .and_then(|(rollout, probing)| rollout.probes_failed(probing));
        if let Some(reason) = reason {
            self.roll_back(&reason);
        }
    }

    /// A worker answered prepare or commit.
    pub(crate) fn on_app_answer(&mut self, pid: Pid, answer: WorkerMessage) {
        // It answers: it is not hung, and hears a drain again.
        if let Some(worker) = self.fleet.of_worker(pid).and_then(|g| g.worker_mut(pid)) {
            worker.answer_by(None);
        }
        let Some(transaction) = self.operation.in_place_mut() else {
            return;
        };
        match transaction.on_answer(&mut self.fleet, pid, answer) {
            Some(refusal) => self.abort_in_place(refusal),
            None => self.advance_in_place(),
        }
    }

    /// Worker `pid`, which owed its answer to prepare, exited: the
    /// transaction aborts, for `reason` (see
    /// [`crate::operation::Summary::on_worker_exit`]).
    pub(crate) fn abort_in_place_on_exit(&mut self, pid: Pid, reason: String) {
        if let Some(transaction) = self.operation.in_place_mut() {
            transaction.stop_waiting_for(pid);
            self.abort_in_place(reason);
        }
    }

    /// Worker `pid`, which owed its answer to commit, exited: it is waited
    /// for no more (its respawn starts with the committed version).
    pub(crate) fn stop_waiting_for(&mut self, pid: Pid) {
        if let Some(transaction) = self.operation.in_place_mut() {
            transaction.stop_waiting_for(pid);
        }
        self.advance_in_place();
    }

    /// Moves the in-place reload on when every answer is in.
    pub(crate) fn advance_in_place(&mut self) {
        if let Some(next) = self.operation.in_place().map(InPlace::next) {
            self.move_in_place(next);
        }
    }

    /// Does what [`crate::inplace::next_move`] (or the deadline table)
    /// decided.
    pub(crate) fn move_in_place(&mut self, next: Move) {
        let Some(transaction) = self.operation.in_place_mut() else {
            return;
        };
        match transaction.advance(&mut self.fleet, next) {
            Advance::Wait => {}
            Advance::Committing(config) => {
                if config.supervisor.log_filter != self.config.supervisor.log_filter {
                    if let Err(e) = self.log.set_filter(&config.supervisor.log_filter) {
                        tracing::error!(error = %e, "cannot switch log filter");
                    }
                }
                self.config = config;
                self.endpoints.allow_writes(&self.config);
                self.advance_in_place();
            }
            Advance::Abort(reason) => self.abort_in_place(reason),
            Advance::Finish => {
                let transaction = self.operation.take_in_place().expect("matched above");
                self.end(transaction.finish());
            }
        }
    }

    /// The in-place reload fails for `reason`.
    fn abort_in_place(&mut self, reason: String) {
        if let Some(transaction) = self.operation.take_in_place() {
            let ended = transaction.abort(&mut self.fleet, reason);
            self.end(ended);
        }
    }

    /// The master is stopping: the in-place reload is abandoned (aborted).
    pub(crate) fn abandon_in_place(&mut self) {
        self.abort_in_place("the master is stopping".into());
    }

    /// SIGUSR2 or `baton upgrade`.
    pub fn request_upgrade(&mut self, waiter: Option<Waiter>, by: Option<&Requester>) {
        let facts = Facts {
            serving: self.fleet.current_number().is_some(),
            spawns_pending: self.fleet.spawns_pending(),
        };
        if let Admission::Refuse(reason) = self.operation.summary().admit(Ask::Upgrade, facts) {
            tracing::error!(event = "upgrade.refused", %reason, "upgrade refused");
            if let Some(waiter) = waiter {
                let _ = waiter.send(Reply::error(format!("upgrade refused: {reason}")));
            }
            return;
        }
        let in_place = crate::upgrade::exec::in_place(&self.config);
        let span = tracing::info_span!("upgrade", binary = %self.program.path.display(), in_place);
        let _enter = span.enter();
        match by {
            Some(by) => {
                tracing::info!(event = "upgrade.started", requested_by = %by, "upgrade started")
            }
            None => tracing::info!(event = "upgrade.started", "upgrade started"),
        }
        let start = Start {
            program: &self.program,
            config: &self.config.path,
            fleet: &self.fleet,
            endpoints: &self.endpoints,
            events: &self.events,
        };
        let timeout = self.config.supervisor.upgrade_timeout.0;
        let upgrade = match Upgrade::start(start, in_place, timeout, waiter.into_iter().collect()) {
            Ok(upgrade) => upgrade,
            Err((phase, e, waiters)) => {
                let reason = format!("{e:#}");
                tracing::error!(event = "upgrade.failed", phase, %reason, "upgrade failed; this master keeps serving");
                self.metrics.upgrade("failed");
                for waiter in waiters {
                    let _ = waiter.send(Reply::error(format!(
                        "upgrade failed in phase {phase}: {reason}"
                    )));
                }
                return;
            }
        };
        let child = Pid::from_raw(upgrade.child());
        self.children.register(child, Owner::Upgrade);
        self.operation.begin(Operation::Upgrading(upgrade));
        if in_place {
            tracing::info!(check_pid = child.as_raw(), "checking the new binary");
            return;
        }
        self.endpoints.pid_file_to_oldbin();
        tracing::info!(new_pid = child.as_raw(), "new master started");
    }

    /// A message from the new master.
    pub(crate) fn on_upgrade_message(&mut self, message: Result<NewMessage, ChannelError>) {
        // After the commit: the answers to connections handed to the new
        // master.
        if message.as_ref().is_ok_and(|m| self.on_new_master_answer(m)) {
            return;
        }
        let happened = match &message {
            Ok(NewMessage::Ready { .. }) => Happened::Ready,
            _ => Happened::GaveUp,
        };
        let verdict = self.operation.upgrade().map(|u| u.verdict(happened));
        match (verdict, message) {
            (
                Some(Verdict::Commit),
                Ok(NewMessage::Ready {
                    pid,
                    generation,
                    steered,
                }),
            ) => self.complete_upgrade(pid, generation, &steered),
            (Some(Verdict::Fail), Ok(NewMessage::Failed { phase, reason })) => {
                self.fail_upgrade(&phase, format!("the new master gave up: {reason}"))
            }
            (Some(Verdict::Fail), Err(e)) => {
                self.fail_upgrade("handshake", format!("bad message from the new master: {e}"))
            }
            _ => {}
        }
    }

    /// The new master serves: hand over the control socket and the pid
    /// file, and drain every generation of this master.
    fn complete_upgrade(&mut self, new_pid: u32, generation: u64, steered: &[String]) {
        // Release the control socket first: the new master binds it when it
        // hears the handover.
        self.endpoints.hand_over();
        for listener in self.fleet.sockets() {
            listener.hand_over();
        }
        // The keeper lets go of the QUIC worker sockets this master let go
        // of (the new master's keeper holds them now); then, as the new
        // master and its keeper serve, this one's death is not restarted.
        if let Some(keeper) = self.children.keeper_mut() {
            keeper.due_now();
        }
        self.keep();
        self.retire_keeper();
        // Connections of this master's draining workers that no worker here
        // takes go to the new master, whose answers come on the same channel.
        if let Some(channel) = self
            .operation
            .upgrade()
            .and_then(|u| u.new_master_channel())
        {
            let reader = super::forward(&self.events, channel.clone(), |message| Event::Upgrade {
                message,
            });
            self.handovers.hand_to_new_master(channel, reader);
        }
        if let Some(mut upgrade) = self.operation.take_upgrade() {
            upgrade.commit(new_pid, generation);
        }
        crate::sd_notify::notify(&format!("MAINPID={new_pid}\nREADY=1"));
        // The new master is on its own now; this one drains and exits. What
        // is queued on the sockets the new master steered away from is
        // accepted first: this master's generation sockets, and listeners
        // the new generation has sockets of its own on.
        self.lineage.hand_over_to(Pid::from_raw(new_pid as i32));
        self.fleet.hand_over_current(|s| {
            s.steerable() && (s.primary().is_some() || steered.contains(&s.info.name))
        });
        self.stop(Stop::Graceful, None);
    }

    /// Stops what the upgrade started and keeps serving.
    fn fail_upgrade(&mut self, phase: &str, reason: String) {
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return;
        };
        if upgrade.fail(&self.fleet, phase, &reason) {
            self.metrics.upgrade("failed");
            self.endpoints.restore_pid_file();
        }
    }

    /// The upgrade's child exited: a passed check leads to the exec;
    /// anything else fails.
    pub(crate) fn upgrade_child_exited(&mut self, pid: Pid, status: &str, success: bool) {
        let Some(upgrade) = self.operation.upgrade() else {
            return;
        };
        if upgrade.child() != pid.as_raw() {
            return;
        }
        // Its last words may still be queued behind the exit.
        if let Some(last) = upgrade.last_words() {
            self.on_upgrade_message(Ok(last));
        }
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return;
        };
        match upgrade.verdict(Happened::ChildExited { success }) {
            Verdict::Exec => {
                upgrade.check_passed();
                self.endpoints.pause_admin();
            }
            Verdict::FailAndEnd => {
                let in_place = upgrade.in_place();
                let (phase, reason) = upgrade.exit_reason(status);
                self.fail_upgrade(phase, reason);
                if !in_place {
                    tracing::info!(pid = pid.as_raw(), %status, "upgrade child exited");
                }
                self.operation.take_upgrade();
            }
            Verdict::End => {
                self.operation.take_upgrade();
            }
            _ => {}
        }
    }

    /// `upgrade_timeout` passed before the new master was ready.
    pub(crate) fn upgrade_timed_out(&mut self) {
        let timeout = self.config.supervisor.upgrade_timeout.0;
        self.fail_upgrade(
            "handshake",
            format!("the new master was not ready within upgrade_timeout ({timeout:?})"),
        );
    }

    /// In place: the replies are written; the new image replaces this one
    /// (this returns only if the exec failed, and this master keeps
    /// serving).
    pub(crate) fn exec_upgrade(&mut self) {
        let Some(upgrade) = self.operation.take_upgrade() else {
            return;
        };
        let Some(binary) = upgrade.binary() else {
            return;
        };
        // The new image greets the same keeper: its channel stays open
        // across the exec, so the keeper never sees a master die.
        let image = crate::upgrade::exec::Image {
            program: &self.program,
            config: &self.config.path,
            endpoints: &self.endpoints,
            log: &self.log,
            keeper: self.children.keeper().map(|k| k.channel_fd()),
        };
        let error = crate::upgrade::exec::exec_in_place(binary, &self.fleet, image)
            .expect_err("exec returns only on failure");
        tracing::error!(error = %format!("{error:#}"), "upgrade failed; this master keeps serving");
        self.metrics.upgrade("failed");
        self.endpoints.serve_admin();
    }

    /// A failed upgrade's child had its grace: killed.
    pub(crate) fn kill_upgrade_child(&mut self) {
        if let Some(upgrade) = self.operation.upgrade_mut() {
            upgrade.kill_child();
        }
    }

    /// A stop during an upgrade abandons it: one waiting for its new
    /// master fails (the child is stopped); an in-place upgrade about to
    /// exec does not exec (a new image would not know it was stopping),
    /// and the admin endpoint, paused for the exec, serves again.
    pub(crate) fn abandon_upgrade(&mut self) {
        let verdict = self.operation.upgrade().map(|u| u.verdict(Happened::Stop));
        if verdict == Some(Verdict::CancelExec) {
            self.operation.take_upgrade();
            tracing::error!(
                event = "upgrade.failed",
                phase = "exec",
                reason = "the master is stopping",
                "upgrade cancelled before its exec; this master stops"
            );
            self.metrics.upgrade("failed");
            self.endpoints.serve_admin();
            return;
        }
        if verdict == Some(Verdict::Fail) {
            self.fail_upgrade("handshake", "the old master is stopping".into());
        }
    }
}
