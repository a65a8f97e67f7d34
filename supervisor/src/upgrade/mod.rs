//! Binary upgrade (SIGUSR2, `baton upgrade`): the old master starts the new
//! binary as a child, hands it the listeners, and once the new master's
//! generation is ready, releases the control socket and the pid file and
//! drains its own workers. Any failure before that stops the new master,
//! restores the pid file, and leaves this master serving, untouched.

pub mod handoff;

use crate::control::protocol::Reply;
use crate::master::{Event, Master, Stop, Waiter};
use anyhow::Context;
use baton_worker::channel::{self, Channel, ChannelError};
use handoff::{NewMessage, OldMessage, UPGRADE_FD_ENV};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a failed new master gets between SIGTERM and SIGKILL.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Where an upgrade is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the new master's generation to be ready.
    Waiting { deadline: Instant },
    /// Failed; waiting for the new master to exit (killed at the deadline).
    Aborting { kill_at: Instant },
}

/// An upgrade under way.
pub struct Upgrade {
    child: Pid,
    channel: Arc<Channel>,
    reader: tokio::task::AbortHandle,
    phase: Phase,
    waiters: Vec<Waiter>,
    started: Instant,
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// What the master was started as, to start the same program again.
#[derive(Debug, Clone)]
pub struct Program {
    /// The binary's absolute path, resolved at start.
    pub path: PathBuf,
    /// `argv[0]` as given.
    pub argv0: String,
}

impl Program {
    /// Resolves this process's binary from `argv[0]` the way the shell found
    /// it: a path (made absolute against the start directory) or a `PATH`
    /// lookup. `/proc/self/exe` is no substitute: it names the old inode once
    /// the file has been replaced.
    pub fn current() -> Program {
        let argv0 = std::env::args().next().unwrap_or_default();
        let path = if argv0.contains('/') {
            std::path::absolute(&argv0).unwrap_or_else(|_| PathBuf::from(&argv0))
        } else {
            std::env::var_os("PATH")
                .and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|dir| dir.join(&argv0))
                        .find(|candidate| candidate.is_file())
                })
                .or_else(|| std::fs::read_link("/proc/self/exe").ok())
                .unwrap_or_else(|| PathBuf::from(&argv0))
        };
        Program { path, argv0 }
    }
}

impl Master {
    /// SIGUSR2 or `baton upgrade`.
    pub fn request_upgrade(&mut self, waiter: Option<Waiter>) {
        let refuse = if self.stopping.is_some() {
            Some("the master is stopping".to_string())
        } else if let Some(upgrade) = &self.upgrade {
            Some(format!(
                "an upgrade is already in progress (new master pid {}, started {:?} ago)",
                upgrade.child,
                upgrade.started.elapsed()
            ))
        } else if self.reload.is_some() {
            Some("a reload is in progress; upgrade once it has finished".to_string())
        } else if self.current.is_none() {
            Some("no generation is serving yet".to_string())
        } else {
            None
        };
        if let Some(reason) = refuse {
            tracing::error!(%reason, "upgrade refused");
            if let Some(waiter) = waiter {
                let _ = waiter.send(Reply::error(format!("upgrade refused: {reason}")));
            }
            return;
        }
        let span = tracing::info_span!("upgrade", binary = %self.program.path.display());
        let _enter = span.enter();
        tracing::info!("upgrade started");
        match self.start_new_master() {
            Ok((child, channel)) => {
                let reader = self.watch_upgrade(channel.clone());
                let deadline = Instant::now() + self.config.supervisor.upgrade_timeout.0;
                self.upgrade = Some(Upgrade {
                    child,
                    channel,
                    reader,
                    phase: Phase::Waiting { deadline },
                    waiters: waiter.into_iter().collect(),
                    started: Instant::now(),
                });
                if let Some(pid_file) = &mut self.pid_file {
                    if let Err(e) = pid_file.rename_to_oldbin() {
                        tracing::warn!(error = %format!("{e:#}"), "cannot rename the pid file");
                    }
                }
                tracing::info!(new_pid = child.as_raw(), "new master started");
            }
            Err((phase, e)) => {
                let reason = format!("{e:#}");
                tracing::error!(phase, %reason, "upgrade failed; this master keeps serving");
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Reply::error(format!(
                        "upgrade failed in phase {phase}: {reason}"
                    )));
                }
            }
        }
    }

    /// Opens the binary, checks it, and starts it with the handshake
    /// channel; sends the listeners.
    fn start_new_master(&self) -> Result<(Pid, Arc<Channel>), (&'static str, anyhow::Error)> {
        let binary = open_executable(&self.program.path).map_err(|e| ("binary", e))?;
        let (ours, theirs) = channel::pair()
            .context("creating the upgrade channel")
            .map_err(|e| ("binary", e))?;
        // Exec what was opened and checked, whatever happens to the path.
        let mut command =
            std::process::Command::new(format!("/proc/self/fd/{}", binary.as_raw_fd()));
        command
            .arg0(&self.program.argv0)
            .arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .env(UPGRADE_FD_ENV, theirs.as_raw_fd().to_string())
            .env(handoff::BINARY_FD_ENV, binary.as_raw_fd().to_string())
            // Its own group: an abort stops whatever it started too.
            .process_group(0);
        let inherit = [binary.as_raw_fd(), theirs.as_raw_fd()];
        // SAFETY: runs between fork and exec and only calls fcntl, which is
        // async-signal-safe; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                for fd in inherit {
                    // The binary's fd stays open so that a script's
                    // interpreter can read /proc/self/fd/N.
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.program.path.display()))
            .map_err(|e| ("binary", e))?;
        let pid = Pid::from_raw(child.id() as i32);
        drop(child);
        let channel = Channel::new(ours)
            .map(Arc::new)
            .context("registering the upgrade channel")
            .map_err(|e| ("binary", e))?;
        if let Err(e) = handoff::send_takeover(&channel, self.next_generation, &self.listeners) {
            // A child that is already gone is reaped and reported as such.
            if !e.is_peer_gone() {
                let _ = kill(pid, Signal::SIGKILL);
                return Err((
                    "handshake",
                    anyhow::Error::new(e).context("sending the listeners"),
                ));
            }
        }
        Ok((pid, channel))
    }

    fn watch_upgrade(&self, channel: Arc<Channel>) -> tokio::task::AbortHandle {
        let events = self.events.clone();
        tokio::spawn(async move {
            loop {
                let message = match channel.recv::<NewMessage>().await {
                    Ok(Some(received)) => Ok(received.message),
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                let fatal = matches!(message, Err(ChannelError::Io(_)));
                if events.send(Event::Upgrade { message }).is_err() || fatal {
                    return;
                }
            }
        })
        .abort_handle()
    }

    /// A message from the new master.
    pub(crate) fn on_upgrade_message(&mut self, message: Result<NewMessage, ChannelError>) {
        match message {
            Ok(NewMessage::Ready { pid, generation }) => self.complete_upgrade(pid, generation),
            Ok(NewMessage::Failed { phase, reason }) => {
                self.fail_upgrade(&phase, format!("the new master gave up: {reason}"))
            }
            Err(e) => {
                self.fail_upgrade("handshake", format!("bad message from the new master: {e}"))
            }
        }
    }

    /// The new master serves: hand over the control socket and the pid
    /// file, and drain every generation of this master.
    fn complete_upgrade(&mut self, new_pid: u32, generation: u64) {
        let Some(upgrade) = &mut self.upgrade else {
            return;
        };
        if !matches!(upgrade.phase, Phase::Waiting { .. }) {
            return;
        }
        // Release the control socket first: the new master binds it when it
        // hears the handover.
        self.control = None;
        for listener in &self.listeners {
            listener.hand_over();
        }
        for generation in self.generations.values() {
            for listener in &generation.listeners {
                listener.hand_over();
            }
        }
        if let Err(e) = upgrade.channel.try_send(&OldMessage::Handover {}, &[]) {
            tracing::warn!(error = %e, "cannot tell the new master to take over");
        }
        let old_pid = std::process::id();
        tracing::info!(
            new_pid,
            generation,
            elapsed_ms = upgrade.started.elapsed().as_millis() as u64,
            "upgrade committed: the new master serves; draining"
        );
        crate::sd_notify::notify(&format!("MAINPID={new_pid}"));
        for waiter in upgrade.waiters.drain(..) {
            let _ = waiter.send(Reply::ok(serde_json::json!({
                "old_pid": old_pid,
                "new_pid": new_pid,
                "generation": generation,
            })));
        }
        // The new master is on its own now; this one drains and exits.
        self.upgrade = None;
        self.handed_over = true;
        self.stop(Stop::Graceful);
    }

    /// Stops the new master and keeps serving.
    fn fail_upgrade(&mut self, phase: &str, reason: String) {
        let Some(upgrade) = &mut self.upgrade else {
            return;
        };
        if !matches!(upgrade.phase, Phase::Waiting { .. }) {
            return;
        }
        tracing::error!(phase, %reason, new_pid = upgrade.child.as_raw(), "upgrade failed; this master keeps serving");
        let _ = killpg(upgrade.child, Signal::SIGTERM);
        upgrade.phase = Phase::Aborting {
            kill_at: Instant::now() + ABORT_GRACE,
        };
        for waiter in upgrade.waiters.drain(..) {
            let _ = waiter.send(Reply::error(format!(
                "upgrade failed in phase {phase}: {reason}"
            )));
        }
        if let Some(pid_file) = &mut self.pid_file {
            if let Err(e) = pid_file.restore() {
                tracing::error!(error = %format!("{e:#}"), "cannot restore the pid file");
            }
        }
    }

    /// A child exited: if it is the new master, the upgrade fails (or its
    /// abort is complete). Returns whether it was.
    pub(crate) fn upgrade_child_exited(&mut self, pid: Pid, status: &str) -> bool {
        match &self.upgrade {
            Some(upgrade) if upgrade.child == pid => {}
            _ => return false,
        }
        self.fail_upgrade(
            "start",
            format!("the new master exited with {status} before it was ready"),
        );
        tracing::info!(pid = pid.as_raw(), %status, "new master exited");
        self.upgrade = None;
        true
    }

    /// Deadlines: the handshake timeout, and the kill of an aborted new master.
    pub(crate) fn upgrade_tick(&mut self) {
        let now = Instant::now();
        let Some(upgrade) = &self.upgrade else { return };
        match upgrade.phase {
            Phase::Waiting { deadline } if now >= deadline => {
                let timeout = self.config.supervisor.upgrade_timeout.0;
                self.fail_upgrade(
                    "handshake",
                    format!("the new master was not ready within upgrade_timeout ({timeout:?})"),
                );
            }
            Phase::Aborting { kill_at } if now >= kill_at => {
                let _ = killpg(upgrade.child, Signal::SIGKILL);
                if let Some(upgrade) = &mut self.upgrade {
                    upgrade.phase = Phase::Aborting {
                        kill_at: now + Duration::from_secs(3600),
                    };
                }
            }
            _ => {}
        }
    }

    /// When the upgrade next needs attention.
    pub(crate) fn upgrade_deadline(&self) -> Option<Instant> {
        match self.upgrade.as_ref()?.phase {
            Phase::Waiting { deadline } => Some(deadline),
            Phase::Aborting { kill_at } => Some(kill_at),
        }
    }

    /// A stop during an upgrade abandons it.
    pub(crate) fn abandon_upgrade(&mut self) {
        if self.upgrade.is_some() {
            self.fail_upgrade("handshake", "the old master is stopping".into());
        }
    }
}

/// Opens the binary to exec and checks it is an executable regular file.
fn open_executable(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        anyhow::bail!("{} is not an executable file", path.display());
    }
    Ok(file)
}
