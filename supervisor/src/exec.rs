//! Starting a worker process. Everything the child needs is prepared before
//! fork — the resolved program, argv, the environment, which fds go where,
//! credentials and limits — and applied between fork and exec with
//! async-signal-safe calls only: the master has threads, so the child of its
//! fork may not allocate, lock or touch `std::env`.
//!
//! std's `Command` does the fork, the process group, the working directory,
//! stdio and the signal mask; its `pre_exec` hook then runs [`Child::exec`],
//! which finishes the setup and calls `execve` itself, with argv and envp
//! arrays it owns. std never gets to exec. That is what makes `LISTEN_PID`
//! possible: the worker's pid is known only after fork, and std builds its
//! envp from immutable strings before fork, so the entry is a fixed-size
//! buffer allocated here, into which the child writes `getpid()`'s digits
//! right before `execve`. The alternative, a hand-written fork, would redo
//! what std already does correctly (stdio, pgid, cwd, signal mask and
//! SIGPIPE reset, exec-error reporting).
//!
//! Placing listeners on fds 3, 4, ... may overwrite any close-on-exec fd
//! sitting there in the child, std's own exec-error pipe included, so the
//! child reports its failures through a pipe of ours, first moved above the
//! target range, and exits; the parent reads that pipe after `spawn`.

use crate::config::Credentials;
use anyhow::{bail, Context};
use nix::sys::signal::Signal;
use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which of the master's fds the worker inherits, and where.
#[derive(Debug)]
pub enum Fds {
    /// This fd, at its own number (the worker's end of the SDK's control
    /// channel, closed in the master once the worker has it).
    Keep(OwnedFd),
    /// These fds, at 3, 4, ... in order (systemd and args protocols): the
    /// listeners', which the master keeps open until [`spawn`] returns.
    Place(Vec<RawFd>),
}

/// Everything needed to start one worker.
#[derive(Debug)]
pub struct Plan {
    /// `command`: program (looked up in the worker's `PATH` if it has no
    /// slash) and arguments.
    pub command: Vec<String>,
    /// The whole environment, in order; later entries win.
    pub env: Vec<(OsString, OsString)>,
    /// Whether to add `LISTEN_PID=<the worker's own pid>`.
    pub listen_pid: bool,
    /// Inherited fds.
    pub fds: Fds,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Identity to switch to.
    pub credentials: Option<Credentials>,
    /// `RLIMIT_NOFILE`.
    pub rlimit_nofile: Option<u64>,
    /// Set `O_NONBLOCK` on the placed listener fds.
    pub nonblocking: bool,
    /// Sent to the worker if the master dies (`PR_SET_PDEATHSIG`).
    pub death_signal: Option<Signal>,
    /// Pipe stdout and stderr to the master instead of inheriting them.
    pub capture_output: bool,
    /// Run this file, with `command` as the arguments (`argv[0]` too),
    /// instead of looking `command[0]` up.
    pub exe: Option<PathBuf>,
    /// In a process group of its own (a worker), or in the parent's.
    pub process_group: bool,
}

/// What the child was doing when it failed, reported through the pipe.
const ACTIONS: [&str; 8] = [
    "placing the listener fds",
    "making the listener fds non-blocking",
    "setting rlimit_nofile",
    "dropping supplementary groups",
    "setting the group id",
    "setting the user id",
    "setting the parent-death signal",
    "executing the command",
];

/// Starts the worker. Returns once it has exec'd, or with the step it
/// failed at.
pub fn spawn(plan: Plan) -> anyhow::Result<std::process::Child> {
    // Checked here, not left to the child: a missing directory would
    // otherwise be reported as a failure to run the command.
    if let Some(cwd) = &plan.cwd {
        check_cwd(cwd)?;
    }
    let program = match &plan.exe {
        Some(exe) => exe.clone(),
        None => resolve_program(&plan.command[0], &plan.env, plan.cwd.as_deref())?,
    };
    let (error_read, error_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the exec-error pipe")?;
    let mut env: Vec<CString> = Vec::with_capacity(plan.env.len());
    for (i, (key, value)) in plan.env.iter().enumerate() {
        if plan.env[i + 1..].iter().any(|(k, _)| k == key) {
            continue;
        }
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env.push(CString::new(entry).context("environment variable contains a NUL byte")?);
    }
    let argv = plan
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("command contains a NUL byte")?;
    let (sources, keep) = match &plan.fds {
        Fds::Keep(fd) => (Vec::new(), Some(fd.as_raw_fd())),
        Fds::Place(fds) => (fds.clone(), None),
    };
    let mut child = Child {
        program: CString::new(program.as_os_str().as_bytes())?,
        argv_ptrs: PtrArray(Vec::with_capacity(argv.len() + 1)),
        envp_ptrs: PtrArray(Vec::with_capacity(env.len() + 2)),
        argv,
        env,
        listen_pid: plan.listen_pid.then_some([0; 32]),
        temps: vec![-1; sources.len()],
        sources,
        keep,
        credentials: plan.credentials,
        // Unset, the worker gets back the soft limit the master started
        // with (the master raised its own).
        rlimit_nofile: plan
            .rlimit_nofile
            .map(|n| (n, n))
            .or_else(crate::fds::workers_nofile),
        nonblocking: plan.nonblocking,
        death_signal: plan.death_signal,
        master: nix::unistd::getpid().as_raw(),
        error: error_write,
    };
    let mut command = Command::new(&program);
    if let Some(cwd) = &plan.cwd {
        command.current_dir(cwd);
    }
    if plan.capture_output {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    // Its own process group: a terminal's Ctrl-C reaches only the master,
    // and the master can signal a worker with everything it started.
    if plan.process_group {
        command.process_group(0);
    }
    // SAFETY: the closure runs in the child between fork and exec. It only
    // calls async-signal-safe functions (fcntl, dup2, setrlimit, setgroups,
    // setgid, setuid, prctl, getppid, getpid, execve, write, _exit) and
    // writes into memory the closure owns, allocating nothing.
    unsafe {
        command.pre_exec(move || child.exec());
    }
    let spawned = command
        .spawn()
        .with_context(|| format!("starting worker command {:?}", plan.command[0]))?;
    // Drops the closure, and with it the parent's end of the error pipe, so
    // that the read below ends at the child's exec.
    drop(command);
    let mut report = Vec::new();
    std::fs::File::from(error_read)
        .read_to_end(&mut report)
        .context("reading the worker's exec-error pipe")?;
    if let [action, a, b, c, d] = report[..] {
        let errno = std::io::Error::from_raw_os_error(i32::from_be_bytes([a, b, c, d]));
        let action = ACTIONS.get(action as usize).copied().unwrap_or("starting");
        bail!(
            "starting worker command {:?} (pid {}): {action}: {errno}",
            plan.command[0],
            spawned.id()
        );
    }
    Ok(spawned)
}

/// That the worker's working directory is one.
pub fn check_cwd(cwd: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => bail!("worker cwd {} is not a directory", cwd.display()),
        Err(e) => bail!("worker cwd {}: {e}", cwd.display()),
    }
}

/// `execvp`'s lookup, done before fork with the worker's own `PATH`, so that
/// the child can call `execve` and a missing program is a clear error. A
/// program named by a path must exist and be executable.
pub fn resolve_program(
    program: &str,
    env: &[(OsString, OsString)],
    cwd: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        match std::fs::metadata(&path) {
            Err(e) => bail!("worker command {program:?}: {e}"),
            Ok(meta) if meta.is_dir() => bail!("worker command {program:?} is a directory"),
            // access(2) says yes to root for any file with an x bit.
            Ok(_) if nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err() => {
                bail!("worker command {program:?} is not executable")
            }
            Ok(_) => return Ok(path),
        }
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let dir = match (dir.is_relative(), cwd) {
            (true, Some(cwd)) => cwd.join(dir),
            _ => dir,
        };
        let candidate = dir.join(program);
        let executable = nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok();
        if executable && candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "worker command {program:?} not found in PATH {:?}",
        OsStr::new(&path)
    )
}

/// argv or envp for `execve`, filled in the child.
struct PtrArray(Vec<*const libc::c_char>);

// SAFETY: the pointers are written and read only in the forked child, which
// has a single thread; in the parent the array is empty.
unsafe impl Send for PtrArray {}
// SAFETY: as above, nothing shares the array across threads.
unsafe impl Sync for PtrArray {}

/// What the child owns between fork and exec.
struct Child {
    program: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// `LISTEN_PID=` and room for the digits of a pid and a NUL.
    listen_pid: Option<[u8; 32]>,
    argv_ptrs: PtrArray,
    envp_ptrs: PtrArray,
    sources: Vec<RawFd>,
    temps: Vec<RawFd>,
    keep: Option<RawFd>,
    credentials: Option<Credentials>,
    /// (soft, hard).
    rlimit_nofile: Option<(u64, u64)>,
    nonblocking: bool,
    death_signal: Option<Signal>,
    master: libc::pid_t,
    error: OwnedFd,
}

impl Child {
    /// Runs in the child: finishes its setup and execs, or reports the
    /// failing step through the error pipe and exits.
    fn exec(&mut self) -> ! {
        let floor = 3 + self.sources.len() as RawFd;
        // SAFETY: fcntl on an fd this process owns.
        let error = unsafe { libc::fcntl(self.error.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
        if error < 0 {
            // Nowhere to report to; the exit status tells.
            // SAFETY: _exit is async-signal-safe and never returns.
            unsafe { libc::_exit(127) }
        }
        let action = match self.setup() {
            Ok(()) => {
                self.fill_arrays();
                // SAFETY: the program, argv and envp are NUL-terminated
                // strings owned by `self`, and both arrays end with a null
                // pointer (fill_arrays).
                unsafe {
                    libc::execve(
                        self.program.as_ptr(),
                        self.argv_ptrs.0.as_ptr(),
                        self.envp_ptrs.0.as_ptr(),
                    );
                }
                ACTIONS.len() - 1
            }
            Err(action) => action,
        };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let e = errno.to_be_bytes();
        let report = [action as u8, e[0], e[1], e[2], e[3]];
        // SAFETY: write and _exit are async-signal-safe; the buffer lives on
        // the stack.
        unsafe {
            libc::write(error, report.as_ptr().cast(), report.len());
            libc::_exit(127)
        }
    }

    /// Every step before exec; `Err` carries the failing step's index in
    /// [`ACTIONS`], with `errno` set.
    fn setup(&mut self) -> Result<(), usize> {
        let floor = 3 + self.sources.len() as RawFd;
        // Two passes, so that a source sitting in the target range is copied
        // before anything is placed over it.
        for (source, temp) in self.sources.iter().zip(self.temps.iter_mut()) {
            // SAFETY: fcntl on an fd inherited from the master.
            *temp = unsafe { libc::fcntl(*source, libc::F_DUPFD_CLOEXEC, floor) };
            if *temp < 0 {
                return Err(0);
            }
        }
        for (target, temp) in (3..).zip(self.temps.iter()) {
            // SAFETY: dup2 between fds of this process; the copy at `target`
            // is not close-on-exec, which is what makes it inherited.
            if unsafe { libc::dup2(*temp, target) } < 0 {
                return Err(0);
            }
        }
        if let Some(fd) = self.keep {
            // SAFETY: fcntl on the control channel's fd.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(0);
            }
        }
        if self.nonblocking {
            for target in 3..floor {
                // SAFETY: fcntl on a listener fd just placed. The flag is
                // the socket's, shared with every process holding it.
                let set = unsafe {
                    let flags = libc::fcntl(target, libc::F_GETFL);
                    flags >= 0 && libc::fcntl(target, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
                };
                if !set {
                    return Err(1);
                }
            }
        }
        if let Some((soft, hard)) = self.rlimit_nofile {
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: setrlimit with a pointer to a stack value.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
                return Err(2);
            }
        }
        if let Some(credentials) = self.credentials {
            // SAFETY: setgroups with an empty list, then setgid and setuid,
            // in the order that leaves no privilege behind.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) < 0 {
                    return Err(3);
                }
                if libc::setgid(credentials.gid) < 0 {
                    return Err(4);
                }
                if let Some(uid) = credentials.uid {
                    if libc::setuid(uid) < 0 {
                        return Err(5);
                    }
                }
            }
        }
        // After the identity change, which would clear it.
        if let Some(signal) = self.death_signal {
            // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid take no pointers.
            unsafe {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    signal as libc::c_int as libc::c_ulong,
                ) < 0
                {
                    return Err(6);
                }
                // The master died before the prctl: the signal never comes.
                if libc::getppid() != self.master {
                    libc::_exit(1);
                }
            }
        }
        if let Some(buffer) = &mut self.listen_pid {
            // SAFETY: getpid takes nothing and cannot fail.
            write_listen_pid(buffer, unsafe { libc::getpid() });
        }
        Ok(())
    }

    /// Points argv and envp at the strings, within the capacity reserved
    /// before fork (so nothing is allocated).
    fn fill_arrays(&mut self) {
        let argv = &mut self.argv_ptrs.0;
        argv.clear();
        for arg in &self.argv {
            argv.push(arg.as_ptr());
        }
        argv.push(std::ptr::null());
        let envp = &mut self.envp_ptrs.0;
        envp.clear();
        for entry in &self.env {
            envp.push(entry.as_ptr());
        }
        if let Some(buffer) = &self.listen_pid {
            envp.push(buffer.as_ptr().cast());
        }
        envp.push(std::ptr::null());
    }
}

/// Writes `LISTEN_PID=<pid>\0` into `buffer` without allocating.
fn write_listen_pid(buffer: &mut [u8; 32], pid: libc::pid_t) {
    const KEY: &[u8] = b"LISTEN_PID=";
    buffer[..KEY.len()].copy_from_slice(KEY);
    let mut digits = [0u8; 10];
    let mut n = pid.unsigned_abs();
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let end = KEY.len() + digits.len() - start;
    buffer[KEY.len()..end].copy_from_slice(&digits[start..]);
    buffer[end] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_pid_entry_is_written_in_place() {
        let mut buffer = [b'x'; 32];
        write_listen_pid(&mut buffer, 4_194_304);
        assert_eq!(
            std::ffi::CStr::from_bytes_until_nul(&buffer).unwrap(),
            c"LISTEN_PID=4194304"
        );
        write_listen_pid(&mut buffer, i32::MAX);
        assert_eq!(
            std::ffi::CStr::from_bytes_until_nul(&buffer).unwrap(),
            c"LISTEN_PID=2147483647"
        );
        write_listen_pid(&mut buffer, 7);
        assert_eq!(
            std::ffi::CStr::from_bytes_until_nul(&buffer).unwrap(),
            c"LISTEN_PID=7"
        );
    }

    #[test]
    fn programs_are_found_in_the_workers_path() {
        let env = vec![("PATH".into(), "/nonexistent:/bin:/usr/bin".into())];
        let sh = resolve_program("sh", &env, None).unwrap();
        assert!(sh.ends_with("sh") && sh.is_absolute(), "{sh:?}");
        let e = resolve_program("no-such-program-here", &env, None).unwrap_err();
        assert!(e.to_string().contains("not found in PATH"), "{e}");
        let e = resolve_program("./no-such-x", &env, None).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        let plain = std::env::temp_dir().join(format!("baton-plain-{}", std::process::id()));
        std::fs::write(&plain, "").unwrap();
        let e = resolve_program(plain.to_str().unwrap(), &env, None).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert!(e.to_string().ends_with("is not executable"), "{e}");
        assert!(check_cwd(Path::new("/nonexistent-cwd"))
            .unwrap_err()
            .to_string()
            .starts_with("worker cwd /nonexistent-cwd: No such file"));
    }
}
