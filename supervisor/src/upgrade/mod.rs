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

use crate::control::protocol::Reply;
use crate::endpoints::Endpoints;
use crate::fleet::Fleet;
use crate::master::{Event, Events, Waiter};
use crate::operation::Deadline;
use anyhow::Context;
use baton_wire::channel::{self, Channel};
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
    /// Started by the keeper to adopt the workers of a master that died.
    pub adopted: Option<crate::adopt::Adopted>,
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
            adopted: None,
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

/// What the master's part of an upgrade needs: its program, its config
/// file, the fleet (its listeners go to a new master), the endpoints (the
/// admin socket is inherited) and the inbox the new master's messages go
/// to.
pub struct Start<'a> {
    /// This master's binary.
    pub program: &'a Program,
    /// `-c`.
    pub config: &'a Path,
    /// The listeners and the next generation number, handed over.
    pub fleet: &'a Fleet,
    /// The admin socket, inherited.
    pub endpoints: &'a Endpoints,
    /// Where the new master's messages go.
    pub events: &'a Events,
}

/// Something that happened to an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happened {
    /// The new master says its generation serves.
    Ready,
    /// The new master says it gave up, or said what does not decode.
    GaveUp,
    /// Its child (the new master, or the new binary's check) exited.
    ChildExited {
        /// With status 0.
        success: bool,
    },
    /// The master is stopping.
    Stop,
}

/// What an upgrade does about what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The new master serves: this one hands over and drains.
    Commit,
    /// It fails: its child is stopped, new connections are steered back,
    /// the waiters hear why; the child is killed after a grace.
    Fail,
    /// It fails, and is over: its child is gone already.
    FailAndEnd,
    /// The check passed: the exec is due (in place).
    Exec,
    /// The exec does not happen: the master stops instead.
    CancelExec,
    /// Its failed child is gone: the upgrade is over.
    End,
    /// Nothing to do.
    Ignore,
}

/// The one decision of an upgrade: what it does about what `happened`,
/// by how it takes over (`in_place`: the master re-executes; else a new
/// master as a child) and where it is (`phase`).
fn verdict(in_place: bool, phase: &Phase, happened: Happened) -> Verdict {
    let waiting = matches!(phase, Phase::Waiting { .. });
    match (happened, in_place, waiting) {
        (Happened::Ready, false, true) => Verdict::Commit,
        (Happened::Ready, _, _) => Verdict::Ignore,
        (Happened::GaveUp, _, true) => Verdict::Fail,
        (Happened::GaveUp, _, false) => Verdict::Ignore,
        (Happened::ChildExited { success: true }, true, true) => Verdict::Exec,
        (Happened::ChildExited { .. }, _, true) => Verdict::FailAndEnd,
        (Happened::ChildExited { .. }, _, false) => Verdict::End,
        (Happened::Stop, _, true) => Verdict::Fail,
        (Happened::Stop, _, false) if matches!(phase, Phase::Exec { .. }) => Verdict::CancelExec,
        (Happened::Stop, _, false) => Verdict::Ignore,
    }
}

impl Upgrade {
    /// Starts an upgrade, in place (`NEW_BINARY check` first) or with a new
    /// master as a child; `waiters` hear how it ends. `Err`: the phase it
    /// failed in, and why, with the waiters back.
    #[allow(clippy::type_complexity)]
    pub fn start(
        start: Start<'_>,
        in_place: bool,
        timeout: Duration,
        waiters: Vec<Waiter>,
    ) -> Result<Upgrade, (&'static str, anyhow::Error, Vec<Waiter>)> {
        let started = if in_place {
            start_check(&start)
        } else {
            start_new_master(&start)
        };
        let (child, kind) = match started {
            Ok(started) => started,
            Err((phase, e)) => return Err((phase, e, waiters)),
        };
        Ok(Upgrade {
            child,
            kind,
            phase: Phase::Waiting {
                deadline: Instant::now() + timeout,
            },
            waiters,
            started: Instant::now(),
        })
    }

    /// Whether it re-executes this process (else: a new master).
    pub fn in_place(&self) -> bool {
        matches!(self.kind, Kind::InPlace { .. })
    }

    /// The channel to the new master (child mode).
    pub fn new_master_channel(&self) -> Option<Arc<Channel>> {
        match &self.kind {
            Kind::Child { channel, .. } => Some(channel.clone()),
            Kind::InPlace { .. } => None,
        }
    }

    /// The new master `new_pid` serves `generation` (see
    /// [`Verdict::Commit`]): the upgrade commits. The new master is told to
    /// take over, and the waiters hear it.
    pub fn commit(&mut self, new_pid: u32, generation: u64) {
        let Kind::Child { channel, .. } = &self.kind else {
            return;
        };
        if let Err(e) = channel.try_send(&OldMessage::Handover {}, &[]) {
            tracing::warn!(error = %e, "cannot tell the new master to take over");
        }
        tracing::info!(
            event = "upgrade.committed",
            new_pid,
            generation,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "upgrade committed: the new master serves; draining"
        );
        let old_pid = std::process::id();
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Reply::ok(serde_json::json!({
                "mode": "child",
                "old_pid": old_pid,
                "new_pid": new_pid,
                "generation": generation,
            })));
        }
    }

    /// It fails in `phase` for `reason`: the child is stopped, new
    /// connections go to `fleet`'s current generation again, the waiters
    /// hear why; the child is killed after a grace. False when it was not
    /// waiting (nothing done).
    pub fn fail(&mut self, fleet: &Fleet, phase: &str, reason: &str) -> bool {
        if !matches!(self.phase, Phase::Waiting { .. }) {
            return false;
        }
        tracing::error!(event = "upgrade.failed", phase, %reason, child = self.child.as_raw(), "upgrade failed; this master keeps serving");
        let _ = killpg(self.child, Signal::SIGTERM);
        // The new master may have steered new connections to its sockets.
        fleet.steer_to_current();
        self.phase = Phase::Aborting {
            kill_at: Instant::now() + ABORT_GRACE,
        };
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Reply::error(format!(
                "upgrade failed in phase {phase}: {reason}"
            )));
        }
        true
    }

    /// What the new master said last, queued behind its exit.
    pub fn last_words(&self) -> Option<NewMessage> {
        let Kind::Child { channel, .. } = &self.kind else {
            return None;
        };
        channel
            .try_recv::<NewMessage>()
            .ok()
            .flatten()
            .map(|m| m.message)
    }

    /// What it does about what `happened`: see [`verdict`].
    pub fn verdict(&self, happened: Happened) -> Verdict {
        verdict(self.in_place(), &self.phase, happened)
    }

    /// Why it fails now that its child exited with `status` (the check's
    /// output, in place).
    pub fn exit_reason(&mut self, status: &str) -> (&'static str, String) {
        let Kind::InPlace { output, .. } = &mut self.kind else {
            return (
                "start",
                format!("the new master exited with {status} before it was ready"),
            );
        };
        // The check has exited, so its whole output is in the pipe.
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(output, &mut text);
        (
            "check",
            format!(
                "the new binary rejected the config ({status}): {}",
                text.trim()
            ),
        )
    }

    /// In place: the check passed. The waiters hear it, and the exec is
    /// due once their replies are written.
    pub fn check_passed(&mut self) {
        if let Kind::InPlace { output, .. } = &mut self.kind {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(output, &mut text);
            tracing::info!(output = %text.trim(), "the new binary accepted the config; re-executing in place");
        }
        let reply = serde_json::json!({
            "mode": "exec",
            "old_pid": std::process::id(),
            "new_pid": std::process::id(),
            "requested_at": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        });
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Reply::ok(reply.clone()));
        }
        // Let the control connections write those replies first, and the
        // admin endpoint's connections finish: new ones wait in its queue
        // for the new image.
        self.phase = Phase::Exec {
            at: Instant::now() + Duration::from_millis(100),
        };
    }

    /// The new binary, to exec (in place).
    pub fn binary(&self) -> Option<&std::fs::File> {
        match &self.kind {
            Kind::InPlace { binary, .. } => Some(binary),
            Kind::Child { .. } => None,
        }
    }

    /// Its failed child had its grace: killed. Nothing more is due until
    /// it is reaped.
    pub fn kill_child(&mut self) {
        let _ = killpg(self.child, Signal::SIGKILL);
        let _ = kill(self.child, Signal::SIGKILL);
        self.phase = Phase::Aborting {
            kill_at: Instant::now() + Duration::from_secs(3600),
        };
    }
}

/// Child mode: opens the binary, checks it, starts it with the handshake
/// channel, and sends the listeners.
fn start_new_master(start: &Start<'_>) -> Result<(Pid, Kind), (&'static str, anyhow::Error)> {
    let program = start.program;
    let binary = open_executable(&program.path).map_err(|e| ("binary", e))?;
    let (ours, theirs) = channel::pair()
        .context("creating the upgrade channel")
        .map_err(|e| ("binary", e))?;
    let mut command = program.command(
        &binary,
        &["run".as_ref(), "-c".as_ref(), start.config.as_os_str()],
    );
    // A watching master's successor watches too.
    command.args(crate::watch::run_args());
    crate::fds::scrub_handed(&mut command);
    command
        .env(UPGRADE_FD_ENV, theirs.as_raw_fd().to_string())
        .env(handoff::BINARY_FD_ENV, binary.as_raw_fd().to_string())
        // Its own group: an abort stops whatever it started too.
        .process_group(0);
    let mut inherited = vec![binary.as_raw_fd(), theirs.as_raw_fd()];
    inherited.extend(start.endpoints.hand_admin_to(&mut command));
    crate::fds::hand_nofile_to(&mut command);
    inherit_in_child(&mut command, inherited);
    // The new master steers the ports it is handed: whatever happens to
    // it, this one attaches its programs again at its next steer.
    crate::steering::others_may_steer();
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", program.path.display()))
        .map_err(|e| ("binary", e))?;
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    let channel = Channel::new(ours)
        .map(Arc::new)
        .context("registering the upgrade channel")
        .map_err(|e| ("binary", e))?;
    if let Err(e) = handoff::send_takeover(
        &channel,
        start.fleet.peek_next_number(),
        start.fleet.listeners(),
    ) {
        // A child that is already gone is reaped and reported as such.
        if !e.is_peer_gone() {
            let _ = killpg(pid, Signal::SIGKILL);
            let error = anyhow::Error::new(e).context("sending the listeners");
            return Err(("handshake", error));
        }
    }
    let reader = crate::master::forward(start.events, channel.clone(), |message| Event::Upgrade {
        message,
    });
    Ok((pid, Kind::Child { channel, reader }))
}

/// In place: runs `NEW_BINARY check -c CONFIG` before anything changes.
fn start_check(start: &Start<'_>) -> Result<(Pid, Kind), (&'static str, anyhow::Error)> {
    let program = start.program;
    let binary = open_executable(&program.path).map_err(|e| ("binary", e))?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("creating a pipe")
        .map_err(|e| ("binary", e))?;
    let write = std::fs::File::from(write);
    let stdout = write.try_clone().map_err(|e| ("binary", e.into()))?;
    let mut command = program.command(
        &binary,
        &["check".as_ref(), "-c".as_ref(), start.config.as_os_str()],
    );
    command
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(write)
        .process_group(0);
    inherit_in_child(&mut command, vec![binary.as_raw_fd()]);
    let child = command
        .spawn()
        .with_context(|| format!("starting {} check", program.path.display()))
        .map_err(|e| ("binary", e))?;
    // Close our copies of the write end: the pipe ends when the check exits.
    drop(command);
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    let output = std::fs::File::from(read);
    Ok((pid, Kind::InPlace { binary, output }))
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

    const CHILD: bool = false;
    const IN_PLACE: bool = true;
    const OK: Happened = Happened::ChildExited { success: true };
    const FAILED: Happened = Happened::ChildExited { success: false };

    fn waiting() -> Phase {
        Phase::Waiting {
            deadline: Instant::now(),
        }
    }

    fn exec() -> Phase {
        Phase::Exec { at: Instant::now() }
    }

    fn aborting() -> Phase {
        Phase::Aborting {
            kill_at: Instant::now(),
        }
    }

    macro_rules! verdicts {
        ($($name:ident: $in_place:expr, $phase:expr, $happened:expr => $expected:expr;)*) => {$(
            #[test]
            fn $name() {
                assert_eq!(verdict($in_place, &$phase, $happened), $expected);
            }
        )*};
    }

    use Happened::{GaveUp, Ready, Stop};
    use Verdict::{CancelExec, Commit, End, Exec, Fail, FailAndEnd, Ignore};

    verdicts! {
        new_master_ready_while_waiting_commits: CHILD, waiting(), Ready => Commit;
        new_master_ready_after_it_failed_is_ignored: CHILD, aborting(), Ready => Ignore;
        new_master_giving_up_while_waiting_fails: CHILD, waiting(), GaveUp => Fail;
        new_master_giving_up_after_it_failed_is_ignored: CHILD, aborting(), GaveUp => Ignore;
        new_master_exiting_before_ready_fails_and_ends: CHILD, waiting(), OK => FailAndEnd;
        new_master_crashing_before_ready_fails_and_ends: CHILD, waiting(), FAILED => FailAndEnd;
        failed_new_master_exiting_ends_the_upgrade: CHILD, aborting(), FAILED => End;
        stop_while_waiting_for_the_new_master_fails: CHILD, waiting(), Stop => Fail;
        stop_while_a_failed_new_master_is_stopped_changes_nothing: CHILD, aborting(), Stop => Ignore;

        check_passing_schedules_the_exec: IN_PLACE, waiting(), OK => Exec;
        check_rejecting_the_config_fails_and_ends: IN_PLACE, waiting(), FAILED => FailAndEnd;
        check_exiting_after_it_timed_out_ends: IN_PLACE, aborting(), FAILED => End;
        ready_is_no_message_an_in_place_upgrade_hears: IN_PLACE, waiting(), Ready => Ignore;
        a_bad_message_in_place_while_waiting_fails: IN_PLACE, waiting(), GaveUp => Fail;
        stop_while_the_check_runs_fails: IN_PLACE, waiting(), Stop => Fail;
        stop_before_the_exec_cancels_it: IN_PLACE, exec(), Stop => CancelExec;
        nothing_said_before_the_exec_matters: IN_PLACE, exec(), GaveUp => Ignore;
        stop_while_a_failed_check_is_stopped_changes_nothing: IN_PLACE, aborting(), Stop => Ignore;
    }

    #[test]
    fn a_fifo_at_the_binary_path_is_refused_at_once() {
        let dir = baton_tests::harness::TempDir::new();
        let path = dir.path().join("baton");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = open_executable(&path).unwrap_err().to_string();
        assert!(e.contains("is not an executable file"), "{e}");
    }
}
