//! The in-place reload: when a reload changes only the application's own
//! configuration (`[worker] app_config` files, `[worker] log_filter`, and
//! the master's `log_filter`), every worker of the current generation swaps
//! it in, and no process is replaced.
//!
//! ```text
//! validate ──→ prepare ──all prepared──→ commit ──all committed──→ committed
//!                 │                         │
//!   refused, timed out, died               a worker that does not confirm
//!                 ▼                         is killed: it is respawned with
//!               abort (each worker drops    the committed version
//!               what it prepared): failed
//! ```
//!
//! All or nothing: if one worker refuses, does not answer within
//! `prepare_timeout` or dies while preparing, every worker is told to abort
//! and none changes (a worker that did not answer is killed, and respawned
//! with the version in service). Once all have prepared, the generation's configuration
//! is the new one (a worker respawned from then on starts with it) and each
//! worker is told to commit; one that does not confirm within
//! `prepare_timeout` (or answers that it had nothing prepared) is killed,
//! so nothing serves a half-applied state.
//!
//! No worker joins the generation while the transaction runs: a worker a
//! scale (`baton scale`, SIGTTIN) adds, or a crashed worker's respawn, is
//! started once it ends, with the version it leaves in service (the new
//! one if committed, the old one if aborted). Each worker's own version is
//! what it last registered or confirmed committing; status and metrics show
//! that one.
//!
//! A worker still owing its answer when the transaction ends (aborted by
//! another worker's refusal or exit, or abandoned because the master
//! stops) is busy in its parser or not running: it cannot hear a drain
//! either. It is killed at the transaction's deadline unless it answers
//! first, and respawned (unless the master is stopping) with the version
//! in service; a stop does not wait for its `drain_timeout`.
//!
//! It runs when the reload's `[worker]` settings (but for those), listeners
//! and `[supervisor]` settings (but `log_filter`) are unchanged, the
//! worker's executable on disk is still the file its generation started
//! (same device, inode, size and modification time), some `app_config`
//! file or a log filter did change, and every live worker of the
//! generation registered a reload handle. Otherwise a new generation runs,
//! as always. `baton reload --in-place` insists, `--new-generation` forces a
//! new generation.

use crate::config::Config;
use crate::fleet::Fleet;
use crate::reload::{phase_span, Ended, Phase, Started, Trigger};
use baton_wire::protocol::{AppPhase, MasterMessage, WorkerMessage};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Span;

/// What `baton reload` asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// The cheapest safe transaction.
    #[default]
    Auto,
    /// In place, or fail with the reason.
    InPlace,
    /// Always a new generation.
    NewGeneration,
}

impl Mode {
    /// Parses the control protocol's `mode`.
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "in_place" => Ok(Mode::InPlace),
            "new_generation" => Ok(Mode::NewGeneration),
            other => Err(format!(
                "invalid reload mode {other:?}: expected \"auto\", \"in_place\" or \"new_generation\""
            )),
        }
    }
}

/// An in-place reload under way.
#[derive(Debug)]
pub struct InPlace {
    trigger: Trigger,
    /// The generation whose workers swap.
    generation: u64,
    span: Span,
    /// The child span of the phase under way (prepare, commit).
    phase_span: Span,
    config: Rc<Config>,
    phases: Vec<(Phase, Duration)>,
    phase_started: Instant,
    /// [`Phase::Prepare`] or [`Phase::Commit`].
    phase: Phase,
    /// Workers whose answer is awaited.
    waiting: BTreeSet<Pid>,
    deadline: Instant,
    /// Who asked for it.
    requested_by: Option<crate::audit::Requester>,
}

impl InPlace {
    /// When every awaited worker must have answered.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The generation whose workers swap.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// [`Phase::Prepare`] or [`Phase::Commit`].
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether worker `pid` still owes its answer.
    pub fn owes(&self, pid: Pid) -> bool {
        self.waiting.contains(&pid)
    }
}

/// A file's identity, to tell a replaced executable.
pub type Identity = (u64, u64, u64, i64);

/// The identity of the file `command[0]` runs (looked up in `PATH` when it
/// has no slash).
pub fn executable_identity(config: &Config) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let program = &config.worker.command[0];
    let path = if program.contains('/') {
        std::path::PathBuf::from(program)
    } else {
        let path = config
            .worker
            .env
            .get("PATH")
            .cloned()
            .or_else(|| std::env::var("PATH").ok())?;
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())?
    };
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.size(), meta.mtime()))
}

/// Whether `new` differs from `old` only where an in-place reload applies
/// it: `Err` says what else changed.
fn only_app_changed(old: &Config, new: &Config) -> Result<(), String> {
    let mut worker = new.worker.clone();
    worker.app_config.clone_from(&old.worker.app_config);
    worker.log_filter.clone_from(&old.worker.log_filter);
    if worker != old.worker {
        return Err("the [worker] settings changed (beyond app_config and log_filter)".into());
    }
    if new.worker.app_config != old.worker.app_config {
        return Err("the list of app_config files changed".into());
    }
    if new.listeners != old.listeners {
        return Err("the listeners changed".into());
    }
    let mut supervisor = new.supervisor.clone();
    supervisor.log_filter.clone_from(&old.supervisor.log_filter);
    if supervisor != old.supervisor {
        return Err("the [supervisor] settings changed (beyond log_filter)".into());
    }
    if new.app.same_files(&old.app)
        && new.worker.log_filter == old.worker.log_filter
        && new.supervisor.log_filter == old.supervisor.log_filter
    {
        return Err("nothing changed that can be applied in place".into());
    }
    Ok(())
}

/// What a worker's answer to prepare or commit means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It prepared the version: one fewer to wait for.
    Prepared,
    /// It refused to prepare: the reload fails, nothing changed.
    Abort,
    /// It refused to commit (it had not prepared it): it is killed and
    /// respawned with the new version.
    Kill,
    /// It committed: it serves the new version.
    Committed,
    /// For another version or phase: ignored.
    Ignore,
}

/// The decision for `answer` during `phase` (prepare or commit) of a reload to `version`.
pub fn answer_verdict(phase: Phase, answer: &WorkerMessage, version: &str) -> Answer {
    match (phase, answer) {
        (Phase::Prepare, WorkerMessage::AppPrepared { version: v }) if v == version => {
            Answer::Prepared
        }
        (Phase::Prepare, WorkerMessage::AppRefused { version: v, .. }) if v == version => {
            Answer::Abort
        }
        (Phase::Commit, WorkerMessage::AppRefused { version: v, .. }) if v == version => {
            Answer::Kill
        }
        (Phase::Commit, WorkerMessage::AppCommitted { version: v }) if v == version => {
            Answer::Committed
        }
        _ => Answer::Ignore,
    }
}

/// What the transaction does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Every worker prepared: commit.
    Commit,
    /// Prepare timed out: the reload fails.
    AbortLate,
    /// Every worker committed: done.
    Finish,
    /// Commit timed out: the late ones are killed (respawned with the new
    /// version), and it is done.
    KillLateAndFinish,
    /// Answers are still due.
    Wait,
}

/// The decision, by phase (prepare or commit), whether every answer is in,
/// and whether the phase's deadline has passed.
pub fn next_move(phase: Phase, all_answered: bool, past_deadline: bool) -> Move {
    match (phase, all_answered, past_deadline) {
        (Phase::Prepare, true, _) => Move::Commit,
        (Phase::Prepare, false, true) => Move::AbortLate,
        // Commit, the only other phase an in-place reload has.
        (_, true, _) => Move::Finish,
        (_, false, true) => Move::KillLateAndFinish,
        (_, false, false) => Move::Wait,
    }
}

/// What an in-place reload does after a [`Move`].
#[derive(Debug)]
pub enum Advance {
    /// Answers are still due.
    Wait,
    /// Every worker prepared: the generation runs `config` now, and the
    /// master switches to it (its log filter too); every worker was told to
    /// commit.
    Committing(Rc<Config>),
    /// It fails, for this reason.
    Abort(String),
    /// Every worker committed (or the late ones were killed): it is done.
    Finish,
}

impl InPlace {
    /// Whether `config` can be applied in place to `fleet`'s current
    /// generation: its number, or why not.
    pub fn possible(fleet: &Fleet, config: &Config) -> Result<u64, String> {
        if !config.worker.reloads_in_place() {
            return Err("there is no [worker] app_config nor log_filter for SDK workers".into());
        }
        let number = fleet.current_number().ok_or("no generation serves")?;
        let current = fleet.get(number).ok_or("no generation serves")?;
        only_app_changed(current.config(), config)?;
        if current.executable() != executable_identity(config).as_ref() {
            return Err(format!(
                "the worker's executable {:?} is not the file its generation started",
                config.worker.command[0]
            ));
        }
        if current.workers().is_empty() {
            return Err("the current generation has no live worker".into());
        }
        if let Some(w) = current
            .workers()
            .values()
            .find(|w| w.app_version().is_none())
        {
            return Err(format!(
                "worker {} (pid {}) registered no reload handle",
                w.index(),
                w.pid()
            ));
        }
        if let Some(w) = current
            .workers()
            .values()
            .find(|w| w.answer_due().is_some())
        {
            return Err(format!(
                "worker {} (pid {}) has not answered the last in-place reload",
                w.index(),
                w.pid()
            ));
        }
        Ok(number)
    }

    /// Starts the transaction for `config` on `fleet`'s generation
    /// `number`: every worker is told to prepare; it ends at once if a
    /// worker could not be told.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        fleet: &mut Fleet,
        trigger: Trigger,
        requested_by: Option<crate::audit::Requester>,
        number: u64,
        config: Rc<Config>,
        span: Span,
        validated: Duration,
    ) -> Started<InPlace> {
        let _enter = span.clone().entered();
        drop(phase_span(&span, Phase::Validate));
        let preparing = phase_span(&span, Phase::Prepare);
        let timeout = config.worker.prepare_timeout.0;
        tracing::info!(generation = number, version = %config.app.version, "reload in place: preparing");
        let mut waiting = BTreeSet::new();
        let mut failure = None;
        for worker in fleet
            .get(number)
            .into_iter()
            .flat_map(|g| g.workers().values())
        {
            let Some(channel) = &worker.channel() else {
                continue;
            };
            let sent = crate::worker::send_app_files(
                channel,
                &config.app,
                AppPhase::Prepare,
                config.worker.log_filter.clone(),
            );
            match sent {
                Ok(()) => {
                    waiting.insert(worker.pid());
                }
                Err(e) => {
                    failure = Some(format!(
                        "cannot send the files to worker {} (pid {}): {e}",
                        worker.index(),
                        worker.pid()
                    ));
                    break;
                }
            }
        }
        let transaction = InPlace {
            trigger,
            generation: number,
            span,
            phase_span: preparing,
            config,
            phases: vec![(Phase::Validate, validated)],
            phase_started: Instant::now(),
            phase: Phase::Prepare,
            waiting,
            deadline: Instant::now() + timeout,
            requested_by,
        };
        match failure {
            Some(reason) => Started::Ended(Box::new(transaction.abort(fleet, reason))),
            None => Started::Running(transaction),
        }
    }

    /// Worker `pid` answered prepare or commit: `Some` is a refusal to
    /// prepare, which fails the transaction.
    pub fn on_answer(
        &mut self,
        fleet: &mut Fleet,
        pid: Pid,
        answer: WorkerMessage,
    ) -> Option<String> {
        let version = self.config.app.version.clone();
        let (index, raw) = fleet
            .get(self.generation)
            .and_then(|g| g.workers().get(&pid))
            .map_or((u32::MAX, pid.as_raw()), |w| (w.index(), pid.as_raw()));
        match (answer_verdict(self.phase, &answer, &version), answer) {
            (Answer::Prepared, _) => {
                self.waiting.remove(&pid);
            }
            (Answer::Abort, WorkerMessage::AppRefused { reason, .. }) => {
                self.waiting.remove(&pid);
                return Some(format!("refused by worker {index} (pid {raw}): {reason}"));
            }
            (Answer::Kill, WorkerMessage::AppRefused { reason, .. }) => {
                // It had not prepared it (or not with every handle): it
                // would go on serving what it has.
                self.waiting.remove(&pid);
                tracing::error!(pid = raw, worker = index, %reason, "worker cannot commit: killed, to be respawned with the new version");
                if let Some(worker) = fleet
                    .get(self.generation)
                    .and_then(|g| g.workers().get(&pid))
                {
                    worker.kill();
                }
            }
            (Answer::Committed, WorkerMessage::AppCommitted { version: v }) => {
                self.waiting.remove(&pid);
                if let Some(worker) = fleet
                    .get_mut(self.generation)
                    .and_then(|g| g.worker_mut(pid))
                {
                    worker.runs_version(v);
                }
            }
            (_, other) => {
                tracing::warn!(pid = raw, answer = ?other, "in-place answer for another version or phase ignored");
            }
        }
        None
    }

    /// Worker `pid` is waited for no more (it exited while committing: its
    /// respawn starts with the committed version).
    pub fn stop_waiting_for(&mut self, pid: Pid) {
        self.waiting.remove(&pid);
    }

    /// What comes next on the answers alone (its deadline is the loop's:
    /// see [`crate::operation::Summary::on_deadline`]).
    pub fn next(&self) -> Move {
        next_move(self.phase, self.waiting.is_empty(), false)
    }

    /// Does what [`next_move`] decided, on `fleet`.
    pub fn advance(&mut self, fleet: &mut Fleet, next: Move) -> Advance {
        match next {
            Move::Commit => Advance::Committing(self.commit(fleet)),
            // A worker that cannot answer is not trusted to serve: the
            // abort marks it due now, and it is killed, and respawned with
            // the version in service.
            Move::AbortLate => Advance::Abort(format!(
                "{} did not answer prepare within {:?}",
                describe(fleet, self.generation, &self.waiting),
                self.config.worker.prepare_timeout.0
            )),
            Move::Finish => Advance::Finish,
            Move::KillLateAndFinish => {
                // Each is killed and respawned with the committed version:
                // nothing keeps serving the old one.
                let late = std::mem::take(&mut self.waiting);
                tracing::error!(workers = %describe(fleet, self.generation, &late), "no commit confirmed in time: killed, to be respawned with the new version");
                if let Some(g) = fleet.get(self.generation) {
                    for pid in &late {
                        if let Some(w) = g.workers().get(pid) {
                            w.kill();
                        }
                    }
                }
                Advance::Finish
            }
            Move::Wait => Advance::Wait,
        }
    }

    /// Every worker prepared: the generation's configuration becomes the
    /// new one, and every worker is told to swap. Returns that
    /// configuration.
    fn commit(&mut self, fleet: &mut Fleet) -> Rc<Config> {
        let _enter = self.span.clone().entered();
        let now = Instant::now();
        self.phases.push((Phase::Prepare, now - self.phase_started));
        self.phase_started = now;
        self.phase_span = phase_span(&self.span, Phase::Commit);
        self.phase = Phase::Commit;
        self.deadline = now + self.config.worker.prepare_timeout.0;
        let config = self.config.clone();
        let version = config.app.version.clone();
        let Some(generation) = fleet.get_mut(self.generation) else {
            return config;
        };
        generation.set_config(config.clone());
        self.waiting = generation.workers().keys().copied().collect();
        for worker in generation.workers().values() {
            let sent = worker.channel().as_ref().map(|c| {
                c.try_send(
                    &MasterMessage::AppCommit {
                        version: version.clone(),
                    },
                    &[],
                )
            });
            if let Some(Err(e)) = sent {
                tracing::error!(pid = worker.pid().as_raw(), error = %e, "cannot tell the worker to commit: killed, to be respawned with the new version");
                worker.kill();
                self.waiting.remove(&worker.pid());
            }
        }
        config
    }

    /// Every worker swapped: how it ended.
    pub fn finish(mut self) -> Ended {
        let _enter = self.span.clone().entered();
        self.phases
            .push((Phase::Commit, self.phase_started.elapsed()));
        tracing::info!(version = %self.config.app.version, "reload in place committed");
        Ended {
            generation: self.generation,
            trigger: self.trigger,
            requested_by: self.requested_by,
            phases: self.phases,
            failure: None,
        }
    }

    /// It fails for `reason`: every worker of `fleet`'s generation is told
    /// to drop what it prepared; those that owe their answer are killed at
    /// the deadline unless they answer first (see
    /// [`Fleet::kill_unanswered`]).
    pub fn abort(mut self, fleet: &mut Fleet, reason: String) -> Ended {
        let _enter = self.span.clone().entered();
        self.phases
            .push((Phase::Prepare, self.phase_started.elapsed()));
        let version = self.config.app.version.clone();
        if let Some(g) = fleet.get_mut(self.generation) {
            for pid in &self.waiting {
                if let Some(worker) = g.worker_mut(*pid) {
                    worker.answer_by(Some(self.deadline));
                }
            }
            for worker in g.workers().values() {
                if let Some(channel) = &worker.channel() {
                    let _ = channel.try_send(
                        &MasterMessage::AppAbort {
                            version: version.clone(),
                        },
                        &[],
                    );
                }
            }
        }
        Ended {
            generation: self.generation,
            trigger: self.trigger,
            requested_by: self.requested_by,
            phases: self.phases,
            failure: Some((Phase::Prepare, reason)),
        }
    }
}

/// `worker 1 (pid 4242), worker 2 (pid 4243)`.
fn describe(fleet: &Fleet, generation: u64, pids: &BTreeSet<Pid>) -> String {
    let g = fleet.get(generation);
    pids.iter()
        .map(|pid| match g.and_then(|g| g.workers().get(pid)) {
            Some(w) => format!("worker {} (pid {pid})", w.index()),
            None => format!("pid {pid}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
