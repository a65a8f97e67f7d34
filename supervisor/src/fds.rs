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
