//! One worker process: spawning it with its listeners (over the SDK's
//! control channel, or inherited as systemd or args protocols want), and its
//! life as the master sees it.

use crate::config::{substitute, Output, Protocol, WorkerConfig};
use crate::exec::{self, Fds};
use crate::listener::Shared;
use crate::output;
use anyhow::Context;
use baton_wire::channel::{self, Channel, ChannelError};
use baton_wire::protocol::{AppPhase, MasterMessage, CONTROL_FD_ENV, MAX_FDS_PER_MESSAGE};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Variables a worker inherits from the master's environment; everything
/// else is dropped, and `[worker] env` is added on top.
pub const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
];

/// Variables only the master sets (per protocol and readiness mode); the
/// same names in `[worker] env` are dropped.
pub const MASTER_ENV: &[&str] = &[
    "BATON_GENERATION",
    "BATON_WORKER",
    "BATON_CONFIG_HASH",
    CONTROL_FD_ENV,
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
];

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned, not yet ready.
    Starting,
    /// Serving.
    Ready,
    /// Told to drain; killed at the deadline.
    Draining {
        /// When the master kills it.
        kill_at: Instant,
    },
    /// Sent SIGKILL; waiting to be reaped.
    Killed,
}

impl State {
    /// The name shown in logs and status.
    pub fn name(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining { .. } => "draining",
            State::Killed => "killed",
        }
    }
}

/// A live worker process.
#[derive(Debug)]
pub struct Worker {
    /// Its pid, also its process group.
    pid: Pid,
    /// Index within the generation.
    index: u32,
    /// Where it is in its life.
    state: State,
    /// When it was spawned.
    started: Instant,
    /// How many times this index was respawned before this process.
    restarts: u32,
    /// Consecutive crashes of this index before this process.
    crashes: u32,
    /// Last reported count of open connections.
    connections: Option<u64>,
    /// The master's end of its control channel (`protocol = "sdk"` only).
    channel: Option<Arc<Channel>>,
    /// The task forwarding the channel's messages into the event loop.
    reader: Option<tokio::task::AbortHandle>,
    /// The last `STATUS=` it sent to the notify socket.
    status: Option<String>,
    /// What tells it to drain when it has no channel.
    stop_signal: Signal,
    /// The config version its reload handle runs, once it registered one
    /// (`AppRegistered`, then each `AppCommitted`).
    app_version: Option<String>,
    /// The listener addresses on which it takes connections handed over
    /// (`Adopts`): kept with the worker, so that a master adopting it
    /// (after an exec, or the death of the last) knows them too.
    adopts: std::collections::BTreeSet<String>,
    /// An in-place reload ended (aborted, or abandoned at a stop) while
    /// this worker still owed its answer: it is killed at this instant
    /// unless it answers first. A worker busy in its parser, or stopped,
    /// cannot hear a drain either (see [`crate::inplace`]).
    answer_due: Option<Instant>,
    /// Its startup span in the reload's trace, from spawn until ready,
    /// when traces are exported.
    startup: tracing::Span,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.state == State::Starting {
            self.startup.record("outcome", "exited before ready");
        }
        if let Some(reader) = &self.reader {
            reader.abort();
        }
        // The record goes once the process was reaped: whatever it left
        // behind in its process group (a server's own children) goes too.
        // The group's id cannot have been reused while any member lives.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }
}

/// The program `config` runs, found as a spawn finds it (in the worker's
/// `PATH`), checked to exist and be executable.
pub fn resolve_command(config: &WorkerConfig) -> anyhow::Result<std::path::PathBuf> {
    let path = config
        .env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    let env: Vec<(OsString, OsString)> = path.map(|p| ("PATH".into(), p)).into_iter().collect();
    exec::resolve_program(&config.command[0], &env, config.cwd.as_deref())
}

/// What the worker needs to know at spawn.
pub struct SpawnSpec<'a> {
    /// The generation's worker settings.
    pub config: &'a WorkerConfig,
    /// Generation number.
    pub generation: u64,
    /// Index within the generation.
    pub index: u32,
    /// Every listener, in configuration order.
    pub listeners: &'a [Shared],
    /// The generation's notify socket (`ready = "notify"`).
    pub notify_socket: Option<&'a Path>,
    /// `[worker] app_config`, read, for an SDK worker.
    pub app: &'a crate::config::AppFiles,
    /// The W3C `traceparent` of the reload that started the generation.
    pub traceparent: Option<&'a str>,
    /// The short hash of the generation's config file.
    pub config_hash: &'a str,
}

/// A worker being started: what the master keeps of it while
/// [`exec::spawn`] runs its plan, possibly on another thread.
#[derive(Debug)]
pub struct Prepared {
    restarts: u32,
    crashes: u32,
    /// The master's end of the SDK control channel.
    master_end: Option<OwnedFd>,
}

/// Starting one worker in a new process group, before the fork: the plan
/// for [`exec::spawn`] (which refers to `spec`'s listeners by fd number:
/// they must stay open until it returns) and what [`Prepared::finish`]
/// needs afterwards. An SDK worker gets the worker end of a fresh control
/// channel at `BATON_CONTROL_FD`, then the hello and the listeners; a
/// systemd or args worker inherits the listeners at fds 3, 4, ...
pub fn prepare(
    spec: &SpawnSpec<'_>,
    restarts: u32,
    crashes: u32,
) -> anyhow::Result<(exec::Plan, Prepared)> {
    let config = spec.config;
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            env.push((name.into(), value));
        }
    }
    // `{fd:NAME}` is where the listener lands (fd 3, 4, ... in listener
    // order) for the protocols that place them; `{generation}` is this one.
    let fd_of = |name: &str| {
        let i = spec.listeners.iter().position(|l| l.info.name == name)?;
        Some(3 + i as i32)
    };
    let expand = |text: &str| substitute(text, fd_of, spec.generation);
    env.extend(config.env.iter().map(|(k, v)| (k.into(), expand(v).into())));
    // The master sets these; the config cannot override them.
    env.retain(|(k, _)| !MASTER_ENV.iter().any(|m| k == m));
    // A reload's trace context replaces one the config may set.
    if spec.traceparent.is_some() {
        env.retain(|(k, _)| k != "TRACEPARENT");
    }
    let mut set = |key: &str, value: String| env.push((key.into(), value.into()));
    set("BATON_GENERATION", spec.generation.to_string());
    set("BATON_WORKER", spec.index.to_string());
    set("BATON_CONFIG_HASH", spec.config_hash.to_string());
    if let Some(traceparent) = spec.traceparent {
        set("TRACEPARENT", traceparent.to_string());
    }
    if let Some(path) = spec.notify_socket {
        set("NOTIFY_SOCKET", path.display().to_string());
    }
    let placed = || spec.listeners.iter().map(|l| l.fd().as_raw_fd()).collect();
    let command: Vec<String> = config.command.iter().map(|a| expand(a)).collect();
    let (fds, channel_ends) = match config.protocol {
        Protocol::Sdk => {
            let (master_end, worker_end) = channel::pair().context("creating control channel")?;
            set(CONTROL_FD_ENV, worker_end.as_raw_fd().to_string());
            (Fds::Keep(worker_end), Some(master_end))
        }
        Protocol::Systemd => {
            set("LISTEN_FDS", spec.listeners.len().to_string());
            let names: Vec<&str> = spec
                .listeners
                .iter()
                .map(|l| l.info.name.as_str())
                .collect();
            set("LISTEN_FDNAMES", names.join(":"));
            (Fds::Place(placed()), None)
        }
        Protocol::Args => (Fds::Place(placed()), None),
    };
    let plan = exec::Plan {
        command,
        env,
        listen_pid: config.protocol == Protocol::Systemd,
        fds,
        cwd: config.cwd.clone(),
        credentials: config.credentials(),
        rlimit_nofile: config.rlimit_nofile,
        nonblocking: config.nonblocking,
        // The master's death stops no worker: the keeper starts another
        // master, which adopts it, or stops it if none can be started.
        death_signal: None,
        capture_output: config.output == Output::Capture,
        exe: None,
        process_group: true,
    };
    let prepared = Prepared {
        restarts,
        crashes,
        master_end: channel_ends,
    };
    Ok((plan, prepared))
}

impl Prepared {
    /// The worker [`exec::spawn`] started as `child`: its output captured,
    /// its control channel registered, and an SDK worker sent its hello and
    /// listeners.
    pub fn finish(
        self,
        mut child: std::process::Child,
        spec: &SpawnSpec<'_>,
    ) -> anyhow::Result<Worker> {
        let config = spec.config;
        let Prepared {
            restarts,
            crashes,
            master_end,
        } = self;
        let pid = Pid::from_raw(child.id() as i32);
        let origin = |stream| output::Origin {
            generation: spec.generation,
            worker: spec.index,
            pid: pid.as_raw(),
            stream,
        };
        let pipes = [
            child
                .stdout
                .take()
                .map(|p| (OwnedFd::from(p), origin("stdout"))),
            child
                .stderr
                .take()
                .map(|p| (OwnedFd::from(p), origin("stderr"))),
        ];
        // The master reaps its children itself (waitpid on SIGCHLD).
        drop(child);
        for (pipe, origin) in pipes.into_iter().flatten() {
            if let Err(e) = output::capture(pipe, origin) {
                tracing::warn!(pid = pid.as_raw(), error = %e, "cannot capture worker output");
            }
        }
        let channel = match master_end {
            Some(master_end) => Some(Arc::new(
                Channel::new(master_end).context("registering control channel")?,
            )),
            None => None,
        };
        let worker = Worker {
            pid,
            index: spec.index,
            state: State::Starting,
            started: Instant::now(),
            restarts,
            crashes,
            connections: None,
            channel,
            reader: None,
            status: None,
            stop_signal: config.stop_signal.0,
            app_version: None,
            adopts: Default::default(),
            answer_due: None,
            startup: tracing::Span::none(),
        };
        let Some(channel) = &worker.channel else {
            return Ok(worker);
        };
        match send_hello(channel, spec) {
            // Already gone: its exit, reaped by the master, tells why.
            Err(e) if e.is_peer_gone() => Ok(worker),
            Err(e) => {
                worker.kill();
                Err(anyhow::Error::new(e).context(format!("sending hello to worker pid {pid}")))
            }
            Ok(()) => Ok(worker),
        }
    }
}

fn send_hello(channel: &Channel, spec: &SpawnSpec<'_>) -> Result<(), ChannelError> {
    channel.try_send(
        &MasterMessage::Hello {
            generation: spec.generation,
            worker_index: spec.index,
            listener_count: spec.listeners.len() as u32,
            drain_timeout_ms: spec.config.drain_timeout.0.as_millis() as u64,
            app_config: spec.config.reloads_in_place(),
            traceparent: spec.traceparent.map(str::to_string),
            handover: spec.config.handover,
        },
        &[],
    )?;
    for (batch, chunk) in spec.listeners.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|l| l.fd()).collect();
        channel.try_send(
            &MasterMessage::Listeners {
                offset: (batch * MAX_FDS_PER_MESSAGE) as u32,
                listeners: chunk.iter().map(|l| l.info.clone()).collect(),
            },
            &fds,
        )?;
    }
    if spec.config.reloads_in_place() {
        send_app_files(
            channel,
            spec.app,
            AppPhase::Initial,
            spec.config.log_filter.clone(),
        )?;
    }
    Ok(())
}

/// Sends the app config files in a memfd: what a new worker starts with, or
/// what an in-place reload prepares.
pub fn send_app_files(
    channel: &Channel,
    app: &crate::config::AppFiles,
    phase: AppPhase,
    log_filter: Option<String>,
) -> Result<(), ChannelError> {
    let (memfd, files) = baton_wire::app_files::to_memfd(&app.files)?;
    channel.try_send(
        &MasterMessage::AppFiles {
            phase,
            version: app.version.clone(),
            files,
            log_filter,
        },
        &[std::os::fd::AsFd::as_fd(&memfd)],
    )
}

impl Worker {
    /// A worker a previous image of this master ran (an upgrade's exec),
    /// taken in as it was: its state, restarts, channel and last status.
    /// The new image starts a generation of its own, so no config version.
    pub fn adopted(
        pid: Pid,
        index: u32,
        state: State,
        restarts: u32,
        channel: Option<Arc<Channel>>,
        status: Option<String>,
        stop_signal: Signal,
    ) -> Worker {
        Worker {
            pid,
            index,
            state,
            started: Instant::now(),
            restarts,
            crashes: 0,
            connections: None,
            channel,
            reader: None,
            status,
            stop_signal,
            app_version: None,
            adopts: Default::default(),
            answer_due: None,
            startup: tracing::Span::none(),
        }
    }

    /// Its pid, also its process group.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Index within the generation.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Where it is in its life.
    pub fn state(&self) -> State {
        self.state
    }

    /// When it was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Adopted from a master that died: it was started at `at`.
    pub fn started_at(&mut self, at: Instant) {
        self.started = at;
    }

    /// How many times this index was respawned before this process.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Consecutive crashes of this index before this process.
    pub fn crashes(&self) -> u32 {
        self.crashes
    }

    /// Last reported count of open connections.
    pub fn connections(&self) -> Option<u64> {
        self.connections
    }

    /// What tells it to drain when it has no channel.
    pub fn stop_signal(&self) -> Signal {
        self.stop_signal
    }

    /// When it is killed unless it answers the in-place reload that ended.
    pub fn answer_due(&self) -> Option<Instant> {
        self.answer_due
    }

    /// The master's end of its control channel (`protocol = "sdk"` only).
    pub fn channel(&self) -> Option<&Arc<Channel>> {
        self.channel.as_ref()
    }

    /// The last `STATUS=` it sent to the notify socket.
    pub fn status(&self) -> Option<&str> {
        self.status.as_deref()
    }

    /// The config version its reload handle runs, once it registered one.
    pub fn app_version(&self) -> Option<&str> {
        self.app_version.as_deref()
    }

    /// It takes connections handed over on the listener at `address`.
    pub fn adopts(&mut self, address: String) {
        self.adopts.insert(address);
    }

    /// Whether it takes connections handed over on `address`.
    pub fn takes(&self, address: &str) -> bool {
        self.adopts.contains(address)
    }

    /// The addresses it takes connections on.
    pub fn adopted_addresses(&self) -> impl Iterator<Item = &str> {
        self.adopts.iter().map(String::as_str)
    }

    /// It reported `count` open connections.
    pub fn report_connections(&mut self, count: u64) {
        self.connections = Some(count);
    }

    /// It sent `STATUS=` to the notify socket.
    pub fn report_status(&mut self, status: String) {
        self.status = Some(status);
    }

    /// Its reload handle runs config `version` (registered or committed).
    pub fn runs_version(&mut self, version: String) {
        self.app_version = Some(version);
    }

    /// It owes its answer to an in-place reload that ended: killed at
    /// `due` unless it answers first (`None`: it answered).
    pub fn answer_by(&mut self, due: Option<Instant>) {
        self.answer_due = due;
    }

    /// It broke the protocol: its channel is closed and no longer read.
    pub fn close_channel(&mut self) {
        self.channel = None;
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }

    /// It was sent SIGKILL and is not to be replaced: it is waited for.
    pub fn mark_killed(&mut self) {
        self.state = State::Killed;
    }

    /// Its channel's messages are forwarded into the event loop by `reader`.
    pub fn forwarded_by(&mut self, reader: tokio::task::AbortHandle) {
        self.reader = Some(reader);
    }

    /// Its startup span in the reload's trace.
    pub fn trace_startup(&mut self, span: tracing::Span) {
        self.startup = span;
    }

    /// It is serving: its startup span ends.
    pub fn become_ready(&mut self) {
        self.state = State::Ready;
        self.startup.record("outcome", "ready");
        self.startup = tracing::Span::none();
    }

    /// Tells the worker to drain and sets its kill deadline.
    pub fn drain(&mut self, timeout: Duration) {
        let kill_at = Instant::now() + timeout;
        match self.state {
            State::Draining { kill_at: earlier } if earlier <= kill_at => return,
            State::Killed => return,
            _ => {}
        }
        self.state = State::Draining { kill_at };
        let Some(channel) = &self.channel else {
            // Like systemd's KillMode=mixed: the stop signal to the main
            // process, which stops its own children as it sees fit;
            // SIGKILL to the whole group at the deadline.
            if let Err(e) = kill(self.pid, self.stop_signal) {
                if e != nix::errno::Errno::ESRCH {
                    tracing::warn!(pid = self.pid.as_raw(), error = %e, "cannot send stop signal to worker");
                }
            }
            return;
        };
        let message = MasterMessage::Drain {
            deadline_ms: timeout.as_millis() as u64,
        };
        if let Err(e) = channel.try_send(&message, &[]) {
            // It cannot hear us; it is killed at the deadline all the same.
            tracing::warn!(pid = self.pid.as_raw(), error = %e, "cannot send drain to worker");
        }
    }

    /// Fast stop: `SIGTERM` now, `SIGKILL` after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        let kill_at = Instant::now() + grace;
        self.state = match self.state {
            State::Draining { kill_at: earlier } if earlier < kill_at => self.state,
            State::Killed => State::Killed,
            _ => State::Draining { kill_at },
        };
    }

    /// Sends `signal` to the worker's whole process group.
    pub fn signal(&self, signal: Signal) {
        if let Err(e) = killpg(self.pid, signal) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pid = self.pid.as_raw(), error = %e, ?signal, "cannot signal worker");
            }
        }
    }

    /// Kills the worker's process group at once.
    pub fn kill(&self) {
        self.signal(Signal::SIGKILL);
    }
}
