//! Binary upgrade (SIGUSR2, `baton upgrade`).
//!
//! By default the old master starts the new binary as a child, hands it the
//! listeners, and once the new master's generation is ready, releases the
//! control socket and the pid file and drains its own workers. As PID 1, or
//! with `upgrade = "exec"`, the master instead has the new binary check the
//! config and then re-executes itself in place ([`exec`]). Any failure before
//! the switch stops what was started, restores the pid file, and leaves this
//! master serving, untouched.

pub mod exec;
pub mod handoff;
pub mod lineage;

use crate::audit::Requester;
use crate::control::protocol::Reply;
use crate::master::{Event, Master, Stop, Waiter};
use crate::operation::{Admission, Ask, Deadline, Facts};
use anyhow::Context;
use baton_wire::channel::{self, Channel, ChannelError};
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
    /// Waiting for the new master's generation to be ready (child mode), or
    /// for the new binary's `check` to exit (in place).
    Waiting { deadline: Instant },
    /// In place: the check passed; exec once the replies are written.
    Exec { at: Instant },
    /// Failed; waiting for the child to exit (killed at the deadline).
    Aborting { kill_at: Instant },
}

/// How the new binary takes over.
enum Kind {
    /// A new master process: `Upgrade::child` is the new master.
    Child {
        channel: Arc<Channel>,
        reader: tokio::task::AbortHandle,
    },
    /// This process re-executes: `Upgrade::child` is the pre-flight check.
    InPlace {
        binary: std::fs::File,
        output: std::fs::File,
    },
}

/// An upgrade under way.
pub struct Upgrade {
    child: Pid,
    kind: Kind,
    phase: Phase,
    waiters: Vec<Waiter>,
    started: Instant,
}

impl Upgrade {
    /// The new master's or the check's pid.
    pub fn child(&self) -> i32 {
        self.child.as_raw()
    }

    /// Since it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// When it next needs the loop.
    pub fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Waiting { deadline } => deadline,
            Phase::Exec { at } => at,
            Phase::Aborting { kill_at } => kill_at,
        }
    }

    /// Its deadline, if passed at `now`.
    pub fn due(&self, now: Instant) -> Option<Deadline> {
        (now >= self.deadline()).then_some(match self.phase {
            Phase::Waiting { .. } => Deadline::Handshake,
            Phase::Exec { .. } => Deadline::Exec,
            Phase::Aborting { .. } => Deadline::AbortGrace,
        })
    }
}

impl Drop for Upgrade {
    fn drop(&mut self) {
        if let Kind::Child { reader, .. } = &self.kind {
            reader.abort();
        }
    }
}

/// What the master was started as, to start the same program again, and
/// when.
#[derive(Debug, Clone)]
pub struct Program {
    /// The binary's absolute path, resolved at start.
    pub path: PathBuf,
    /// `argv[0]` as given.
    pub argv0: String,
    /// When this process (this image of it) started.
    pub started: std::time::Instant,
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
        Program {
            path,
            argv0,
            started: std::time::Instant::now(),
        }
    }

    /// A command that runs the binary opened as `binary` (so that the file
    /// cannot change between check and exec) with `args`.
    fn command(&self, binary: &std::fs::File, args: &[&std::ffi::OsStr]) -> std::process::Command {
        let mut command =
            std::process::Command::new(format!("/proc/self/fd/{}", binary.as_raw_fd()));
        command.arg0(&self.argv0).args(args);
        command
    }
}

impl Master {
    /// SIGUSR2 or `baton upgrade`.
    pub fn request_upgrade(&mut self, waiter: Option<Waiter>, by: Option<&Requester>) {
        let facts = Facts {
            serving: self.fleet.current_number().is_some(),
            spawns_pending: self.spawns_pending(),
        };
        let refuse = match self.operation.summary().admit(Ask::Upgrade, facts) {
            Admission::Refuse(reason) => Some(reason),
            _ => None,
        };
        if let Some(reason) = refuse {
            tracing::error!(event = "upgrade.refused", %reason, "upgrade refused");
            if let Some(waiter) = waiter {
                let _ = waiter.send(Reply::error(format!("upgrade refused: {reason}")));
            }
            return;
        }
        let in_place = exec::in_place(&self.config);
        let span = tracing::info_span!("upgrade", binary = %self.program.path.display(), in_place);
        let _enter = span.enter();
        match by {
            Some(by) => {
                tracing::info!(event = "upgrade.started", requested_by = %by, "upgrade started")
            }
            None => tracing::info!(event = "upgrade.started", "upgrade started"),
        }
        let started = if in_place {
            self.start_check()
        } else {
            self.start_new_master()
        };
        let (child, kind) = match started {
            Ok(started) => started,
            Err((phase, e)) => {
                let reason = format!("{e:#}");
                tracing::error!(event = "upgrade.failed", phase, %reason, "upgrade failed; this master keeps serving");
                self.metrics.upgrade("failed");
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Reply::error(format!(
                        "upgrade failed in phase {phase}: {reason}"
                    )));
                }
                return;
            }
        };
        self.children
            .register(child, crate::children::Owner::Upgrade);
        let deadline = Instant::now() + self.config.supervisor.upgrade_timeout.0;
        self.operation
            .begin(crate::operation::Operation::Upgrading(Upgrade {
                child,
                kind,
                phase: Phase::Waiting { deadline },
                waiters: waiter.into_iter().collect(),
                started: Instant::now(),
            }));
        if in_place {
            tracing::info!(check_pid = child.as_raw(), "checking the new binary");
            return;
        }
        self.endpoints.pid_file_to_oldbin();
        tracing::info!(new_pid = child.as_raw(), "new master started");
    }

    /// Child mode: opens the binary, checks it, starts it with the handshake
    /// channel, and sends the listeners.
    fn start_new_master(&self) -> Result<(Pid, Kind), (&'static str, anyhow::Error)> {
        let binary = open_executable(&self.program.path).map_err(|e| ("binary", e))?;
        let (ours, theirs) = channel::pair()
            .context("creating the upgrade channel")
            .map_err(|e| ("binary", e))?;
        let mut command = self.program.command(
            &binary,
            &["run".as_ref(), "-c".as_ref(), self.config.path.as_os_str()],
        );
        command
            .env(UPGRADE_FD_ENV, theirs.as_raw_fd().to_string())
            .env(handoff::BINARY_FD_ENV, binary.as_raw_fd().to_string())
            // Its own group: an abort stops whatever it started too.
            .process_group(0);
        let mut inherited = vec![binary.as_raw_fd(), theirs.as_raw_fd()];
        inherited.extend(self.endpoints.hand_admin_to(&mut command));
        crate::fds::hand_nofile_to(&mut command);
        inherit_in_child(&mut command, inherited);
        // The new master steers the ports it is handed: whatever happens to
        // it, this one attaches its programs again at its next steer.
        crate::steering::others_may_steer();
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
        if let Err(e) = handoff::send_takeover(
            &channel,
            self.fleet.peek_next_number(),
            self.fleet.listeners(),
        ) {
            // A child that is already gone is reaped and reported as such.
            if !e.is_peer_gone() {
                let _ = killpg(pid, Signal::SIGKILL);
                let error = anyhow::Error::new(e).context("sending the listeners");
                return Err(("handshake", error));
            }
        }
        let reader = crate::master::forward(&self.events, channel.clone(), |message| {
            Event::Upgrade { message }
        });
        Ok((pid, Kind::Child { channel, reader }))
    }

    /// In place: runs `NEW_BINARY check -c CONFIG` before anything changes.
    fn start_check(&self) -> Result<(Pid, Kind), (&'static str, anyhow::Error)> {
        let binary = open_executable(&self.program.path).map_err(|e| ("binary", e))?;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("creating a pipe")
            .map_err(|e| ("binary", e))?;
        let write = std::fs::File::from(write);
        let stdout = write.try_clone().map_err(|e| ("binary", e.into()))?;
        let mut command = self.program.command(
            &binary,
            &[
                "check".as_ref(),
                "-c".as_ref(),
                self.config.path.as_os_str(),
            ],
        );
        command
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(write)
            .process_group(0);
        inherit_in_child(&mut command, vec![binary.as_raw_fd()]);
        let child = command
            .spawn()
            .with_context(|| format!("starting {} check", self.program.path.display()))
            .map_err(|e| ("binary", e))?;
        // Close our copies of the write end: the pipe ends when the check exits.
        drop(command);
        let pid = Pid::from_raw(child.id() as i32);
        drop(child);
        let output = std::fs::File::from(read);
        Ok((pid, Kind::InPlace { binary, output }))
    }

    /// A message from the new master.
    pub(crate) fn on_upgrade_message(&mut self, message: Result<NewMessage, ChannelError>) {
        match message {
            Ok(NewMessage::Ready {
                pid,
                generation,
                steered,
            }) => self.complete_upgrade(pid, generation, &steered),
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
    fn complete_upgrade(&mut self, new_pid: u32, generation: u64, steered: &[String]) {
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return;
        };
        let Kind::Child { channel, .. } = &upgrade.kind else {
            return;
        };
        if !matches!(upgrade.phase, Phase::Waiting { .. }) {
            return;
        }
        // Release the control socket first: the new master binds it when it
        // hears the handover.
        self.endpoints.hand_over();
        for listener in self.fleet.sockets() {
            listener.hand_over();
        }
        if let Err(e) = channel.try_send(&OldMessage::Handover {}, &[]) {
            tracing::warn!(error = %e, "cannot tell the new master to take over");
        }
        let old_pid = std::process::id();
        tracing::info!(
            event = "upgrade.committed",
            new_pid,
            generation,
            elapsed_ms = upgrade.started.elapsed().as_millis() as u64,
            "upgrade committed: the new master serves; draining"
        );
        crate::sd_notify::notify(&format!("MAINPID={new_pid}\nREADY=1"));
        for waiter in upgrade.waiters.drain(..) {
            let _ = waiter.send(Reply::ok(serde_json::json!({
                "mode": "child",
                "old_pid": old_pid,
                "new_pid": new_pid,
                "generation": generation,
            })));
        }
        // The new master is on its own now; this one drains and exits. What
        // is queued on the sockets the new master steered away from is
        // accepted first: this master's generation sockets, and listeners
        // the new generation has sockets of its own on.
        self.operation.take_upgrade();
        self.lineage
            .hand_over_to(nix::unistd::Pid::from_raw(new_pid as i32));
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
        if !matches!(upgrade.phase, Phase::Waiting { .. }) {
            return;
        }
        tracing::error!(event = "upgrade.failed", phase, %reason, child = upgrade.child.as_raw(), "upgrade failed; this master keeps serving");
        self.metrics.upgrade("failed");
        let _ = killpg(upgrade.child, Signal::SIGTERM);
        // The new master may have steered new connections to its sockets.
        if let Some(current) = self.fleet.current() {
            for socket in current.listeners() {
                if let Err(e) = socket.steer_here() {
                    tracing::error!(error = %format!("{e:#}"), "cannot steer new connections back");
                }
            }
        }
        upgrade.phase = Phase::Aborting {
            kill_at: Instant::now() + ABORT_GRACE,
        };
        for waiter in upgrade.waiters.drain(..) {
            let _ = waiter.send(Reply::error(format!(
                "upgrade failed in phase {phase}: {reason}"
            )));
        }
        self.endpoints.restore_pid_file();
    }

    /// A child exited: if it is the upgrade's, the upgrade moves on (a
    /// passed check leads to the exec; anything else fails). Returns whether
    /// it was.
    pub(crate) fn upgrade_child_exited(&mut self, pid: Pid, status: &str, success: bool) -> bool {
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return false;
        };
        if upgrade.child != pid {
            return false;
        }
        let waiting = matches!(upgrade.phase, Phase::Waiting { .. });
        if let (Kind::InPlace { output, .. }, true) = (&mut upgrade.kind, waiting) {
            // The check has exited, so its whole output is in the pipe.
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(output, &mut text);
            if !success {
                let reason = format!(
                    "the new binary rejected the config ({status}): {}",
                    text.trim()
                );
                self.fail_upgrade("check", reason);
                self.operation.take_upgrade();
                return true;
            }
            tracing::info!(output = %text.trim(), "the new binary accepted the config; re-executing in place");
            let reply = serde_json::json!({
                "mode": "exec",
                "old_pid": std::process::id(),
                "new_pid": std::process::id(),
                "requested_at": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            });
            for waiter in upgrade.waiters.drain(..) {
                let _ = waiter.send(Reply::ok(reply.clone()));
            }
            // Let the control connections write those replies first, and
            // the admin endpoint's connections finish: new ones wait in its
            // queue for the new image.
            upgrade.phase = Phase::Exec {
                at: Instant::now() + Duration::from_millis(100),
            };
            self.endpoints.pause_admin();
            return true;
        }
        // Its last words may still be queued behind the exit.
        if let Kind::Child { channel, .. } = &upgrade.kind {
            if let Ok(Some(last)) = channel.try_recv::<NewMessage>() {
                self.on_upgrade_message(Ok(last.message));
            }
        }
        let reason = format!("the new master exited with {status} before it was ready");
        self.fail_upgrade("start", reason);
        tracing::info!(pid = pid.as_raw(), %status, "upgrade child exited");
        self.operation.take_upgrade();
        true
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
        if let Kind::InPlace { binary, .. } = &upgrade.kind {
            // The new image starts a guardian of its own.
            if let Some(guardian) = self.children.guardian() {
                guardian.release();
            }
            let image = exec::Image {
                program: &self.program,
                config: &self.config.path,
                endpoints: &self.endpoints,
                log: &self.log,
            };
            let error = exec::exec_in_place(binary, &self.fleet, image)
                .expect_err("exec returns only on failure");
            tracing::error!(error = %format!("{error:#}"), "upgrade failed; this master keeps serving");
            self.metrics.upgrade("failed");
            self.endpoints.serve_admin();
            self.children.start_guardian();
            self.guard_every_worker();
        }
    }

    /// A failed upgrade's child had its grace: killed.
    pub(crate) fn kill_upgrade_child(&mut self) {
        let Some(upgrade) = self.operation.upgrade_mut() else {
            return;
        };
        let _ = killpg(upgrade.child, Signal::SIGKILL);
        let _ = kill(upgrade.child, Signal::SIGKILL);
        // Nothing more is due until it is reaped.
        upgrade.phase = Phase::Aborting {
            kill_at: Instant::now() + Duration::from_secs(3600),
        };
    }

    /// A stop during an upgrade abandons it: one waiting for its new
    /// master fails (the child is stopped); an in-place upgrade about to
    /// exec does not exec (a new image would not know it was stopping),
    /// and the admin endpoint, paused for the exec, serves again.
    pub(crate) fn abandon_upgrade(&mut self) {
        let exec = |u: &Upgrade| matches!(u.phase, Phase::Exec { .. });
        if self.operation.upgrade().is_some_and(exec) {
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
        self.fail_upgrade("handshake", "the old master is stopping".into());
    }
}

/// Makes `fds` inheritable in the child only, between fork and exec.
fn inherit_in_child(command: &mut std::process::Command, fds: Vec<i32>) {
    // SAFETY: runs between fork and exec and only calls fcntl, which is
    // async-signal-safe; it allocates nothing (`fds` was built before).
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                // The binary's fd stays open so that a script's interpreter
                // can read /proc/self/fd/N.
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Opens the binary to exec and checks it is an executable regular file.
/// Without a waiting open: a FIFO at the path is refused, not waited on.
fn open_executable(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        anyhow::bail!("{} is not an executable file", path.display());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_at_the_binary_path_is_refused_at_once() {
        let dir = baton_tests::harness::TempDir::new();
        let path = dir.path().join("baton");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = open_executable(&path).unwrap_err().to_string();
        assert!(e.contains("is not an executable file"), "{e}");
    }
}
