//! File descriptor hygiene: only the fds meant for a child reach it.

use std::os::fd::RawFd;

/// Marks every fd above stderr that the master inherited from its parent
/// close-on-exec, so none of them leaks into workers (systemd does the same
/// for its services). Must run before any thread starts.
pub fn close_on_exec_inherited() -> std::io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // The directory listing's own fd is closed by now: EBADF is expected.
        match nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) {
            Ok(flags) => {
                let flags =
                    nix::fcntl::FdFlag::from_bits_truncate(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags))?;
            }
            Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Names, in a new master's environment at an upgrade, the open-files soft
/// limit that the first master started with: the one workers get back.
pub const NOFILE_ENV: &str = "BATON_NOFILE_SOFT";

/// The open-files limits (soft, hard) that workers get when `[worker]
/// rlimit_nofile` is unset: what the master was started with.
static WORKERS_NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Raises the master's open-files soft limit to its hard limit, so that
/// the admin endpoint's and the workers' connections never run it out of
/// fds (the admin endpoint holds at most a quarter of it); workers keep the
/// soft limit the master was started with (a program using `select(2)`
/// needs 1024), unless `rlimit_nofile` says otherwise. Must run before any
/// thread starts.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // A master started by an upgrade: its parent had raised it already.
    let original = std::env::var(NOFILE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v <= soft)
        .unwrap_or(soft);
    let _ = WORKERS_NOFILE.set((original, hard));
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            // Logging is not set up yet: said once, on stderr.
            eprintln!("baton: cannot raise the open-files limit from {soft} to {hard}: {e}");
        }
    }
}

/// The open-files limits workers get by default, when the master raised
/// its own.
pub fn workers_nofile() -> Option<(u64, u64)> {
    let (soft, hard) = *WORKERS_NOFILE.get()?;
    (soft < hard).then_some((soft, hard))
}

/// Tells a new master (at an upgrade) the workers' soft limit.
pub fn hand_nofile_to(command: &mut std::process::Command) {
    if let Some((soft, _)) = WORKERS_NOFILE.get() {
        command.env(NOFILE_ENV, soft.to_string());
    }
}

/// Keeps out of `command`'s environment every variable naming what this
/// process was handed at its start ([`crate::keeper::HANDED_ENV`]): a new
/// master or image sees only what it is handed itself (set after this),
/// never fd numbers that no longer mean what they did.
pub fn scrub_handed(command: &mut std::process::Command) {
    for name in crate::keeper::HANDED_ENV {
        command.env_remove(name);
    }
}

/// The fd a previous master, image or keeper handed this process, named by
/// the environment variable `name`: `None` when it is not set; an error
/// naming the variable when it is not an open fd above 2. The fd is this
/// process's from then on, close-on-exec.
pub fn inherited(name: &str) -> anyhow::Result<Option<std::os::fd::OwnedFd>> {
    use anyhow::Context;
    let Ok(value) = std::env::var(name) else {
        return Ok(None);
    };
    let fd: std::os::fd::RawFd = value
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .with_context(|| format!("{name}={value:?} is not an fd number"))?;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .with_context(|| format!("{name}={fd} is not an open fd"))?;
    set_cloexec(fd, true)?;
    // SAFETY: handed to this process alone at this number, by whoever set
    // the variable, and open (checked above): nothing else here owns it.
    Ok(Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: std::os::fd::RawFd, on: bool) -> std::io::Result<()> {
    let flags = if on {
        nix::fcntl::FdFlag::FD_CLOEXEC
    } else {
        nix::fcntl::FdFlag::empty()
    };
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags))?;
    Ok(())
}
