//! Processes: what /proc says about them, and a guard that kills every
//! process a scenario started, with its group and its descendants, even
//! when the bench panics.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{sysconf, Pid, SysconfVar};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

// The test harness reads /proc the same way: one definition for both.
pub use baton_tests::harness::{
    alive, children_of, descendants, is_keeper, stat_field, ticks_to_duration,
};

/// The children of `master` that serve: all but its keeper (`baton
/// __keeper`), which lives as long as the master, not a generation.
pub fn workers_of(master: Pid) -> Vec<Pid> {
    children_of(master)
        .into_iter()
        .filter(|pid| !is_keeper(*pid))
        .collect()
}

/// The live processes whose working directory is `dir`: everything a
/// scenario started there, wherever it was re-parented to (the orphaned
/// workers of a killed master). Only processes of the bench's own user can
/// be read.
pub fn running_in(dir: &Path) -> Vec<Pid> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
                && alive(*pid)
        })
        .collect()
}

/// CPU time used so far by the processes of other sessions than the
/// bench's: other people's builds and tests on a shared machine. Per pid,
/// in clock ticks, own time plus that of reaped children (so a compiler
/// run by a cargo that is still running counts); kernel threads excluded.
pub fn other_sessions_cpu() -> HashMap<i32, u64> {
    let mut out = HashMap::new();
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_field(&stat, 3)?.parse::<i32>().ok());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let number = |n| stat_field(&stat, n).and_then(|f| f.parse::<u64>().ok());
        let session = number(3).map(|s| s as i32);
        if session == own || session == Some(0) {
            continue;
        }
        // utime, stime, cutime, cstime.
        let ticks: Option<u64> = (11..=14).map(number).sum();
        if let Some(ticks) = ticks {
            out.insert(pid, ticks);
        }
    }
    out
}

/// CPU seconds the other sessions used between two
/// [`other_sessions_cpu`] readings.
pub fn cpu_seconds_between(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>) -> f64 {
    let ticks: u64 = after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    ticks as f64 / per_second as f64
}

/// The CPU time (user and system) used so far by `root` and every process
/// below it, a keeper included: each one's own time plus that of the
/// children it has waited for, so that a worker that exited and was reaped
/// still counts, in its parent's. A process re-parented away from the tree
/// (none of the servers measured leaves one) would not count.
pub fn tree_cpu_time(root: Pid) -> Duration {
    let mut ticks = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // utime, stime, cutime, cstime.
            ticks += (11..=14)
                .filter_map(|n| stat_field(&stat, n)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        stack.extend(children_of(pid));
    }
    ticks_to_duration(ticks)
}

/// Memory of a process, from /proc/PID/status.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS), KiB.
    pub peak_kib: u64,
}

/// `pid`'s resident memory, `None` once it is gone.
pub fn memory(pid: Pid) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kib: kib("VmRSS:")?,
        peak_kib: kib("VmHWM:")?,
    })
}

/// How many fds `pid` holds, `None` if it cannot be read.
pub fn fd_count(pid: Pid) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// `name` on PATH, else the first of `fallbacks` that exists.
pub fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| fallbacks.iter().map(PathBuf::from).find(|p| p.is_file()))
}

/// A free TCP port on 127.0.0.1 for a server that cannot be told to bind
/// port 0 and report it (nginx, HAProxy): bound and released at once.
pub fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

/// Waits until something accepts connections on `addr`, polling every 10
/// ms, or a process of `guard` exits, or `timeout` passes.
pub fn wait_listening(addr: SocketAddr, guard: &mut Guard, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Some(status) = guard.exited() {
            return Err(io::Error::other(format!("it exited ({status})")));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "nothing listening on {addr} after {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The processes of one scenario. Each is started in a process group of
/// its own; on drop every one of them, every process below it and every
/// process group among them get SIGKILL, and the direct children are
/// reaped.
#[derive(Default)]
pub struct Guard {
    children: Vec<Child>,
    /// Processes the bench did not start but must not leave behind: a
    /// master started by a binary upgrade.
    adopted: Vec<Pid>,
}

impl Guard {
    /// Starts `command` in a new process group.
    pub fn spawn(&mut self, command: &mut Command) -> io::Result<Pid> {
        let child = command.process_group(0).spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        self.children.push(child);
        Ok(pid)
    }

    /// The direct child `pid`, if it is one of ours.
    pub fn child_mut(&mut self, pid: Pid) -> Option<&mut Child> {
        self.children
            .iter_mut()
            .find(|c| c.id() as i32 == pid.as_raw())
    }

    /// Kills nothing on drop for `pid` any more: it exited and was reaped.
    pub fn forget(&mut self, pid: Pid) {
        self.children.retain(|c| c.id() as i32 != pid.as_raw());
    }

    /// Also kills `pid` (and what runs below it) on drop.
    pub fn adopt(&mut self, pid: Pid) {
        if !self.adopted.contains(&pid) {
            self.adopted.push(pid);
        }
    }

    /// The exit status of the first direct child that has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.children
            .iter_mut()
            .find_map(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` to the direct child `pid` and waits up to `grace` for
    /// it to exit, then kills it; reaps it either way.
    pub fn stop_child(&mut self, pid: Pid, signal: Signal, grace: Duration) -> io::Result<()> {
        let child = self
            .child_mut(pid)
            .ok_or_else(|| io::Error::other(format!("{pid} is not a child of the bench")))?;
        let _ = kill(pid, signal);
        let deadline = Instant::now() + grace;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = child.kill();
                child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.forget(pid);
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let roots: Vec<Pid> = self
            .children
            .iter()
            .map(|c| Pid::from_raw(c.id() as i32))
            .chain(self.adopted.iter().copied())
            .collect();
        // The whole tree first: once a master dies its workers are
        // reparented and can no longer be found below it.
        let mut all = roots.clone();
        for root in &roots {
            all.extend(descendants(*root));
        }
        for pid in &all {
            let _ = killpg(*pid, Signal::SIGKILL);
            let _ = kill(*pid, Signal::SIGKILL);
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

/// A temp dir for one scenario, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory under the system temp dir.
    pub fn new(label: &str) -> io::Result<TempDir> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("baton-bench-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
