//! One worker process: spawning it with its control channel and listeners,
//! and its life as the master sees it.

use crate::config::WorkerConfig;
use crate::listener::Shared;
use anyhow::Context;
use baton_worker::channel::{self, Channel, ChannelError};
use baton_worker::protocol::{MasterMessage, CONTROL_FD_ENV, MAX_FDS_PER_MESSAGE};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Variables a worker inherits from the master's environment; everything
/// else is dropped, and `[worker] env` is added on top.
pub const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
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
    pub pid: Pid,
    /// Index within the generation.
    pub index: u32,
    /// Where it is in its life.
    pub state: State,
    /// When it was spawned.
    pub started: Instant,
    /// How many times this index was respawned before this process.
    pub restarts: u32,
    /// Consecutive crashes of this index before this process.
    pub crashes: u32,
    /// Last reported count of open connections.
    pub connections: Option<u64>,
    /// The master's end of its control channel.
    pub channel: Arc<Channel>,
    /// The task forwarding the channel's messages into the event loop.
    pub reader: Option<tokio::task::AbortHandle>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
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
}

/// Starts one worker: a new process group running `command`, with the worker
/// end of a fresh control channel at `BATON_CONTROL_FD`, then sends the hello
/// and the listeners. Never waits on the worker.
pub fn spawn(spec: &SpawnSpec<'_>, restarts: u32, crashes: u32) -> anyhow::Result<Worker> {
    let (master_end, worker_end) = channel::pair().context("creating control channel")?;
    let config = spec.config;
    let mut command = Command::new(&config.command[0]);
    command.args(&config.command[1..]);
    command.env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(&config.env);
    command.env(CONTROL_FD_ENV, worker_end.as_raw_fd().to_string());
    if let Some(cwd) = &config.cwd {
        command.current_dir(cwd);
    }
    // Its own process group: a terminal's Ctrl-C reaches only the master,
    // and the master can signal a worker with everything it started.
    command.process_group(0);
    let inherit = worker_end.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only calls fcntl,
    // which is async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(inherit, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting worker command {:?}", config.command[0]))?;
    drop(worker_end);
    let pid = Pid::from_raw(child.id() as i32);
    // The master reaps its children itself (waitpid on SIGCHLD).
    drop(child);
    let channel = Arc::new(Channel::new(master_end).context("registering control channel")?);
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
    };
    match send_hello(&worker, spec) {
        // Already gone: its exit, reaped by the master, tells why.
        Err(e) if e.is_peer_gone() => Ok(worker),
        Err(e) => {
            worker.kill();
            Err(anyhow::Error::new(e).context(format!("sending hello to worker pid {pid}")))
        }
        Ok(()) => Ok(worker),
    }
}

fn send_hello(worker: &Worker, spec: &SpawnSpec<'_>) -> Result<(), ChannelError> {
    worker.channel.try_send(
        &MasterMessage::Hello {
            generation: spec.generation,
            worker_index: spec.index,
            listener_count: spec.listeners.len() as u32,
            drain_timeout_ms: spec.config.drain_timeout.0.as_millis() as u64,
        },
        &[],
    )?;
    for (batch, chunk) in spec.listeners.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|l| l.fd()).collect();
        worker.channel.try_send(
            &MasterMessage::Listeners {
                offset: (batch * MAX_FDS_PER_MESSAGE) as u32,
                listeners: chunk.iter().map(|l| l.info.clone()).collect(),
            },
            &fds,
        )?;
    }
    Ok(())
}

impl Worker {
    /// Tells the worker to drain and sets its kill deadline.
    pub fn drain(&mut self, timeout: Duration) {
        let kill_at = Instant::now() + timeout;
        match self.state {
            State::Draining { kill_at: earlier } if earlier <= kill_at => return,
            State::Killed => return,
            _ => {}
        }
        self.state = State::Draining { kill_at };
        let message = MasterMessage::Drain {
            deadline_ms: timeout.as_millis() as u64,
        };
        if let Err(e) = self.channel.try_send(&message, &[]) {
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
