//! Processes the master did not start but must not leave behind: a worker's
//! children that left its process group (`setsid`, a daemonizing server)
//! and so escape the SIGKILL of the group at the drain deadline.
//!
//! The master is a child subreaper (`PR_SET_CHILD_SUBREAPER`, Linux 3.4):
//! such a process is re-parented to the master, not to init, when the worker
//! that started it exits. The master reaps them with its other children
//! (`waitpid(-1)`), and before it exits it stops every child it still has,
//! as systemd's `KillMode=control-group` would: `SIGTERM`, then `SIGKILL`
//! after a grace period. A stopped baton leaves nothing holding its ports.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How long orphans get between `SIGTERM` and `SIGKILL` when the master exits.
pub const GRACE: Duration = Duration::from_secs(2);

/// Makes this process the reaper of its descendants' orphans.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot become a child subreaper: processes that leave a worker's process group may outlive baton");
    }
}

/// This process's children, as `/proc` lists them.
pub fn children() -> Vec<Pid> {
    processes_where(1, &std::process::id().to_string())
}

/// This process's children that run its command line but for the program
/// (`baton run -c CONFIG`): masters of its lineage. A child-mode upgrade's
/// new master is its old master's child; when that one exits, the new
/// master is re-parented to the nearest master still running (a
/// subreaper), which must not take it for a worker's leftover.
pub fn lineage_masters() -> Vec<Pid> {
    let args = |pid: &str| -> Option<Vec<u8>> {
        let line = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let program_end = line.iter().position(|b| *b == 0)?;
        Some(line[program_end..].to_vec())
    };
    let Some(own) = args("self") else {
        return Vec::new();
    };
    children()
        .into_iter()
        .filter(|pid| args(&pid.as_raw().to_string()).is_some_and(|a| a == own))
        .collect()
}

/// The processes whose `/proc/PID/stat` field `n` after `(comm)` (0: state,
/// 1: ppid, 2: process group, ...) is `value`.
pub fn processes_where(n: usize, value: &str) -> Vec<Pid> {
    process_stats()
        .filter(|(_, fields)| fields.split_whitespace().nth(n) == Some(value))
        .map(|(pid, _)| Pid::from_raw(pid))
        .collect()
}

/// Every process on the host, with the fields of its `/proc/PID/stat` after
/// `(comm)` (which may hold anything, spaces and parentheses included).
pub fn process_stats() -> impl Iterator<Item = (i32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
}

/// The fields of `/proc/PID/stat` after `(comm)` (which may hold anything,
/// spaces and parentheses included), whitespace-separated: 0 the state, 1
/// the parent, 2 the process group, ... 19 the start time, 49 the exit
/// code; `None` once the process is reaped.
pub fn stat(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, fields) = stat.rsplit_once(')')?;
    Some(fields.to_string())
}

/// Stops every child of this process but `spare`: `SIGTERM`, then `SIGKILL`
/// to what is left after `grace`, reaping all of them. Children of theirs
/// re-parented here meanwhile are stopped too. Blocks for at most about
/// twice `grace`: only for a master that is exiting.
pub fn stop_all(spare: &[Pid], grace: Duration) {
    let others = || -> Vec<Pid> {
        children()
            .into_iter()
            .filter(|p| !spare.contains(p))
            .collect()
    };
    let first = others();
    if first.is_empty() {
        return;
    }
    tracing::warn!(pids = ?first.iter().map(|p| p.as_raw()).collect::<Vec<_>>(), "processes left by workers outside their process groups: stopping them");
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let deadline = Instant::now() + grace;
        let mut signalled = Vec::new();
        loop {
            reap_others(spare);
            let left = others();
            if left.is_empty() {
                return;
            }
            for pid in left {
                if !signalled.contains(&pid) {
                    let _ = kill(pid, signal);
                    signalled.push(pid);
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let left = others();
    if !left.is_empty() {
        tracing::error!(pids = ?left.iter().map(|p| p.as_raw()).collect::<Vec<_>>(), "processes survived SIGKILL");
    }
}

/// Reaps exited children, but none of `spare`.
fn reap_others(spare: &[Pid]) {
    for pid in children() {
        if spare.contains(&pid) {
            continue;
        }
        let _: Result<WaitStatus, _> = waitpid(pid, Some(WaitPidFlag::WNOHANG));
    }
}
