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
use crate::master::Master;
use crate::reload::{phase_span, Phase, Trigger};
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

impl Master {
    /// Whether `config` can be applied in place to the current generation:
    /// `Err` says why not.
    pub(crate) fn in_place_possible(&self, config: &Config) -> Result<u64, String> {
        if !config.worker.reloads_in_place() {
            return Err("there is no [worker] app_config nor log_filter for SDK workers".into());
        }
        let number = self.fleet.current_number().ok_or("no generation serves")?;
        let current = self.fleet.get(number).ok_or("no generation serves")?;
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

    /// Starts the in-place transaction for `config` on generation `number`:
    /// every worker is told to prepare.
    pub(crate) fn begin_in_place(
        &mut self,
        trigger: Trigger,
        requested_by: Option<crate::audit::Requester>,
        number: u64,
        config: Rc<Config>,
        span: Span,
        validated: Duration,
    ) {
        let _enter = span.clone().entered();
        drop(phase_span(&span, Phase::Validate));
        let preparing = phase_span(&span, Phase::Prepare);
        let timeout = config.worker.prepare_timeout.0;
        tracing::info!(generation = number, version = %config.app.version, "reload in place: preparing");
        let Some(generation) = self.fleet.get(number) else {
            return;
        };
        let mut waiting = BTreeSet::new();
        let mut failure = None;
        for worker in generation.workers().values() {
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
            Some(reason) => self.abort_in_place(transaction, reason),
            None => self
                .operation
                .begin(crate::operation::Operation::InPlace(transaction)),
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
        let version = transaction.config.app.version.clone();
        let (index, raw) = self
            .fleet
            .get(transaction.generation)
            .and_then(|g| g.workers().get(&pid))
            .map_or((u32::MAX, pid.as_raw()), |w| (w.index(), pid.as_raw()));
        let verdict = answer_verdict(transaction.phase, &answer, &version);
        match (verdict, answer) {
            (Answer::Prepared, _) => {
                transaction.waiting.remove(&pid);
            }
            (Answer::Abort, WorkerMessage::AppRefused { reason, .. }) => {
                transaction.waiting.remove(&pid);
                let transaction = self.operation.take_in_place().expect("checked above");
                return self.abort_in_place(
                    transaction,
                    format!("refused by worker {index} (pid {raw}): {reason}"),
                );
            }
            (Answer::Kill, WorkerMessage::AppRefused { reason, .. }) => {
                // It had not prepared it (or not with every handle): it
                // would go on serving what it has.
                transaction.waiting.remove(&pid);
                tracing::error!(pid = raw, worker = index, %reason, "worker cannot commit: killed, to be respawned with the new version");
                if let Some(worker) = self
                    .fleet
                    .get(transaction.generation)
                    .and_then(|g| g.workers().get(&pid))
                {
                    worker.kill();
                }
            }
            (Answer::Committed, WorkerMessage::AppCommitted { version: v }) => {
                transaction.waiting.remove(&pid);
                if let Some(worker) = self
                    .fleet
                    .get_mut(transaction.generation)
                    .and_then(|g| g.worker_mut(pid))
                {
                    worker.runs_version(v);
                }
            }
            (_, other) => {
                tracing::warn!(pid = raw, answer = ?other, "in-place answer for another version or phase ignored");
            }
        }
        self.advance_in_place();
    }

    /// Worker `pid`, which owed its answer to prepare, exited: the
    /// transaction aborts, for `reason` (see
    /// [`crate::operation::Summary::on_worker_exit`]).
    pub(crate) fn abort_in_place_on_exit(&mut self, pid: Pid, reason: String) {
        let Some(mut transaction) = self.operation.take_in_place() else {
            return;
        };
        transaction.waiting.remove(&pid);
        self.abort_in_place(transaction, reason);
    }

    /// Worker `pid`, which owed its answer to commit, exited: it is waited
    /// for no more (its respawn starts with the committed version).
    pub(crate) fn stop_waiting_for(&mut self, pid: Pid) {
        if let Some(transaction) = self.operation.in_place_mut() {
            transaction.waiting.remove(&pid);
        }
        self.advance_in_place();
    }

    /// Moves on when every answer is in (its deadline is the loop's: see
    /// [`crate::operation::Summary::on_deadline`]).
    pub(crate) fn advance_in_place(&mut self) {
        let Some(transaction) = self.operation.in_place() else {
            return;
        };
        let next = next_move(transaction.phase, transaction.waiting.is_empty(), false);
        self.move_in_place(next);
    }

    /// Does what [`next_move`] decided.
    pub(crate) fn move_in_place(&mut self, next: Move) {
        let Some(transaction) = self.operation.in_place_mut() else {
            return;
        };
        match next {
            Move::Commit => self.commit_in_place(),
            Move::AbortLate => {
                let transaction = self.operation.take_in_place().expect("checked above");
                let late = self.describe(transaction.generation, &transaction.waiting);
                let timeout = transaction.config.worker.prepare_timeout.0;
                // A worker that cannot answer is not trusted to serve: the
                // abort marks it due now, and it is killed, and respawned
                // with the version in service.
                self.abort_in_place(
                    transaction,
                    format!("{late} did not answer prepare within {timeout:?}"),
                );
            }
            Move::Finish => self.finish_in_place(),
            Move::KillLateAndFinish => {
                // Each is killed and respawned with the committed version:
                // nothing keeps serving the old one.
                let (number, late) = (
                    transaction.generation,
                    std::mem::take(&mut transaction.waiting),
                );
                tracing::error!(workers = %self.describe(number, &late), "no commit confirmed in time: killed, to be respawned with the new version");
                if let Some(g) = self.fleet.get(number) {
                    for pid in &late {
                        if let Some(w) = g.workers().get(pid) {
                            w.kill();
                        }
                    }
                }
                self.finish_in_place();
            }
            Move::Wait => {}
        }
    }

    /// Every worker prepared: the generation's configuration becomes the
    /// new one, the master's log filter switches, and every worker swaps.
    fn commit_in_place(&mut self) {
        let Some(transaction) = self.operation.in_place_mut() else {
            return;
        };
        let _enter = transaction.span.clone().entered();
        let now = Instant::now();
        transaction
            .phases
            .push((Phase::Prepare, now - transaction.phase_started));
        transaction.phase_started = now;
        transaction.phase_span = phase_span(&transaction.span, Phase::Commit);
        transaction.phase = Phase::Commit;
        transaction.deadline = now + transaction.config.worker.prepare_timeout.0;
        let config = transaction.config.clone();
        let version = config.app.version.clone();
        if config.supervisor.log_filter != self.config.supervisor.log_filter {
            if let Err(e) = self.log.set_filter(&config.supervisor.log_filter) {
                tracing::error!(error = %e, "cannot switch log filter");
            }
        }
        self.config = config.clone();
        let Some(generation) = self.fleet.get_mut(transaction.generation) else {
            return;
        };
        generation.set_config(config);
        transaction.waiting = generation.workers().keys().copied().collect();
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
                transaction.waiting.remove(&worker.pid());
            }
        }
        self.advance_in_place();
    }

    fn finish_in_place(&mut self) {
        let Some(mut transaction) = self.operation.take_in_place() else {
            return;
        };
        let _enter = transaction.span.clone().entered();
        transaction
            .phases
            .push((Phase::Commit, transaction.phase_started.elapsed()));
        tracing::info!(version = %transaction.config.app.version, "reload in place committed");
        self.record(
            transaction.generation,
            transaction.trigger,
            transaction.requested_by,
            transaction.phases,
            None,
        );
    }

    fn abort_in_place(&mut self, mut transaction: InPlace, reason: String) {
        let _enter = transaction.span.clone().entered();
        transaction
            .phases
            .push((Phase::Prepare, transaction.phase_started.elapsed()));
        let version = transaction.config.app.version.clone();
        if let Some(g) = self.fleet.get_mut(transaction.generation) {
            // Those that owe their answer are killed at the deadline
            // unless they answer first ([`Master::kill_unanswered`]).
            for pid in &transaction.waiting {
                if let Some(worker) = g.worker_mut(*pid) {
                    worker.answer_by(Some(transaction.deadline));
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
        self.record(
            transaction.generation,
            transaction.trigger,
            transaction.requested_by,
            transaction.phases,
            Some((Phase::Prepare, reason)),
        );
    }

    /// `worker 1 (pid 4242), worker 2 (pid 4243)`.
    fn describe(&self, generation: u64, pids: &BTreeSet<Pid>) -> String {
        let g = self.fleet.get(generation);
        pids.iter()
            .map(|pid| match g.and_then(|g| g.workers().get(pid)) {
                Some(w) => format!("worker {} (pid {pid})", w.index()),
                None => format!("pid {pid}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The generation whose new workers wait for the transaction's end.
    pub(crate) fn spawns_held(&self) -> Option<u64> {
        self.operation.in_place().map(|t| t.generation)
    }

    /// Kills the workers that still owe the answer of a transaction that
    /// ended, once its deadline passed: hung in their parser or stopped,
    /// they hear neither the abort nor a drain.
    pub(crate) fn kill_unanswered(&mut self) {
        let now = Instant::now();
        for generation in self.fleet.iter_mut() {
            let number = generation.number();
            for worker in generation.workers_mut() {
                if !worker.answer_due().is_some_and(|due| due <= now) {
                    continue;
                }
                worker.answer_by(None);
                tracing::error!(
                    generation = number,
                    worker = worker.index(),
                    pid = worker.pid().as_raw(),
                    "worker did not answer the in-place reload in time: killed"
                );
                worker.kill();
                // A draining one is not respawned; a serving one is, as
                // after a crash.
                if matches!(worker.state(), crate::worker::State::Draining { .. }) {
                    worker.mark_killed();
                }
            }
        }
    }

    /// The master is stopping: the transaction is abandoned (aborted).
    pub(crate) fn abandon_in_place(&mut self) {
        if let Some(transaction) = self.operation.take_in_place() {
            self.abort_in_place(transaction, "the master is stopping".into());
        }
    }
}
