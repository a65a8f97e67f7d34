//! The guardian: a small process that outlives a master killed with
//! `SIGKILL` (or crashed) just long enough to enforce its last promise, that
//! no worker outlives `drain_timeout` after its master is gone.
//!
//! A worker learns of its master's death by itself: an SDK worker from the
//! end of its control channel, a `systemd` or `args` worker from its
//! parent-death signal (its `stop_signal`). Both then drain. A worker that
//! ignores that would live forever, holding the ports, and every `baton run`
//! after it would fail with `EADDRINUSE`. So each master starts a guardian
//! (this binary again, `baton __guardian`, with a control channel as its
//! stdin) and tells it of every worker it spawns, with a pidfd, and of every
//! worker it reaps. When the channel ends without a goodbye, the master is
//! gone: the guardian kills, at its drain deadline, the process group of
//! every worker still running, then exits. A master that exits cleanly has
//! no workers left, so its guardian just exits; one that re-executes itself
//! says goodbye first, and its new image starts a guardian of its own.
//!
//! The guardian ignores the signals a terminal or an init system sends to a
//! whole process group (it is in the master's): only the channel matters.

use anyhow::Context;
use baton_wire::channel::{self, Channel};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

/// The first argument that makes the `baton` binary a guardian.
pub const ARG: &str = "__guardian";

/// What the master tells its guardian.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    /// A new worker, with a pidfd for it: kill its process group
    /// `drain_ms` after the master is gone.
    Watch { pid: i32, drain_ms: u64 },
    /// A worker was reaped.
    Forget { pid: i32 },
    /// The master execs itself and its workers live on: exit.
    Release,
}

/// The master's end: a running guardian.
#[derive(Debug)]
pub struct Guardian {
    pid: Pid,
    channel: Channel,
}

impl Guardian {
    /// Starts a guardian. Must run inside the master's tokio runtime.
    pub fn start() -> anyhow::Result<Guardian> {
        let (mine, theirs) = channel::pair().context("creating the guardian's channel")?;
        let child = std::process::Command::new("/proc/self/exe")
            .arg(ARG)
            .stdin(std::process::Stdio::from(theirs))
            .env_clear()
            .spawn()
            .context("starting the guardian")?;
        let pid = Pid::from_raw(child.id() as i32);
        // The master reaps its children itself.
        drop(child);
        let channel = Channel::new(mine).context("registering the guardian's channel")?;
        tracing::debug!(pid = pid.as_raw(), "guardian started");
        Ok(Guardian { pid, channel })
    }

    /// Its pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Has the guardian kill `pid`'s process group `drain_timeout` after the
    /// master is gone. `pid` must be an unreaped child of this process.
    pub fn watch(&self, pid: Pid, drain_timeout: Duration) {
        let pidfd = match crate::steering::pidfd(pid.as_raw() as u32) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(pid = pid.as_raw(), error = %e, "cannot open a pidfd for the guardian");
                return;
            }
        };
        let message = Message::Watch {
            pid: pid.as_raw(),
            drain_ms: drain_timeout.as_millis() as u64,
        };
        self.send(&message, Some(pidfd));
    }

    /// The worker `pid` was reaped.
    pub fn forget(&self, pid: Pid) {
        self.send(&Message::Forget { pid: pid.as_raw() }, None);
    }

    /// Tells the guardian to exit and leave every worker alone (before this
    /// master execs itself).
    pub fn release(&self) {
        self.send(&Message::Release, None);
    }

    fn send(&self, message: &Message, fd: Option<OwnedFd>) {
        let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = self.channel.try_send(message, &fds) {
            // Its exit, reaped by the master, starts a new one.
            if !e.is_peer_gone() {
                tracing::warn!(guardian = self.pid.as_raw(), error = %e, "cannot tell the guardian");
            }
        }
    }
}

/// A watched worker.
struct Watched {
    pidfd: OwnedFd,
    drain: Duration,
}

/// `baton __guardian`: runs until the master releases it or is gone and
/// every worker it left has exited or been killed. Returns the exit code.
pub fn main() -> i32 {
    for signal in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGWINCH,
    ] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this
        // process touches signal dispositions.
        let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn) };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baton guardian: {e}");
            return 1;
        }
    };
    runtime.block_on(guard())
}

async fn guard() -> i32 {
    let stdin = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("baton guardian: {e}");
            return 1;
        }
    };
    let channel = match Channel::new(stdin) {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("baton guardian: stdin is not a control channel: {e}");
            return 1;
        }
    };
    let mut watched: BTreeMap<i32, Watched> = BTreeMap::new();
    loop {
        match channel.recv::<Message>().await {
            Ok(Some(received)) => match received.message {
                Message::Watch { pid, drain_ms } => {
                    if let Some(pidfd) = received.fds.into_iter().next() {
                        let drain = Duration::from_millis(drain_ms);
                        watched.insert(pid, Watched { pidfd, drain });
                    }
                }
                Message::Forget { pid } => {
                    watched.remove(&pid);
                }
                Message::Release => return 0,
            },
            // The master is gone.
            Ok(None) => break,
            Err(e) if e.is_peer_gone() => break,
            Err(channel::ChannelError::Io(e)) => {
                eprintln!("baton guardian: reading the master's channel: {e}");
                break;
            }
            // A message it cannot decode: from a master of another
            // version, or garbage. Ignore it.
            Err(_) => continue,
        }
    }
    drop(channel);
    enforce(watched).await;
    0
}

/// The master is gone: waits until each watched worker has exited or its
/// drain deadline passed, then kills its process group.
async fn enforce(mut watched: BTreeMap<i32, Watched>) {
    let start = tokio::time::Instant::now();
    loop {
        watched.retain(|pid, w| {
            if exited(&w.pidfd) {
                return false;
            }
            if start.elapsed() < w.drain {
                return true;
            }
            eprintln!(
                "baton guardian: the master is gone and worker {pid} still runs after its drain timeout ({:?}): killed",
                w.drain
            );
            // The pidfd says the process leading the group still lives,
            // so the group id is still its.
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            let _ = pidfd_kill(&w.pidfd);
            false
        });
        if watched.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll on one pollfd on the stack, without waiting.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    rc > 0 && fds[0].revents != 0
}

/// `SIGKILL` through the pidfd: never reaches a process that reused the pid.
fn pidfd_kill(pidfd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a null siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
