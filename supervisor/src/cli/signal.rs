//! `baton -s SIGNAL`, nginx's spelling: a signal to the running master,
//! found through its control socket, or, when none answers, through a pid
//! file that is checked first: a stale one may name any process by now.

use super::{control_socket, process_alive, supervisor_path, NginxSignal};
use anyhow::Context;
use std::path::Path;

/// `-s SIGNAL`: signals the master that answers on the control socket;
/// only when none does, the pid in `pid_file`, once that pid is checked to
/// be a baton master (a stale pid file may name any process by now).
pub fn send(config: &Path, socket: Option<&Path>, signal: NginxSignal) -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let signal = match signal {
        NginxSignal::Reload => Signal::SIGHUP,
        NginxSignal::Stop => Signal::SIGINT,
        NginxSignal::Quit => Signal::SIGQUIT,
        NginxSignal::Reopen => Signal::SIGUSR1,
    };
    let socket = socket.map_or_else(|| control_socket(config), Path::to_path_buf);
    let pid = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(stream) => listening_pid(&stream)
            .with_context(|| format!("finding the master on {}", socket.display()))?,
        Err(_) => pid_from_file(config)?,
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .with_context(|| format!("sending {signal} to master {pid}"))?;
    Ok(())
}

/// The master listening on the control socket, as the kernel names it
/// (`SO_PEERCRED`): the pid as this process sees it, even from another pid
/// namespace than the master's, which the pid in a status reply is not.
pub(super) fn listening_pid(stream: &std::os::unix::net::UnixStream) -> anyhow::Result<i32> {
    let credentials =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    match credentials.pid() {
        pid if pid > 0 => Ok(pid),
        _ => anyhow::bail!("the master's pid is not visible from this pid namespace"),
    }
}

/// The pid in the config's `pid_file`, if it names a running baton master.
fn pid_from_file(config: &Path) -> anyhow::Result<i32> {
    let pid_file = supervisor_path(config, "pid_file").with_context(|| {
        format!(
            "no master answers on the control socket, and {} sets no [supervisor] pid_file",
            config.display()
        )
    })?;
    let text = std::fs::read_to_string(&pid_file).with_context(|| {
        format!(
            "no master answers on the control socket; reading pid file {}",
            pid_file.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 0)
        .with_context(|| format!("pid file {} does not hold a pid", pid_file.display()))?;
    if !is_baton_master(pid) {
        anyhow::bail!(
            "pid file {} names pid {pid}, which is not a running baton master (a stale pid file?): not signalling it",
            pid_file.display()
        );
    }
    Ok(pid)
}

/// Whether `pid` runs `baton run` (or an upgraded master, which runs the
/// same command line): its program is named like this one and one of its
/// arguments is `run`.
fn is_baton_master(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    let Some(program) = args.next() else {
        return false;
    };
    use std::os::unix::ffi::OsStrExt;
    let name = |p: &[u8]| {
        Path::new(std::ffi::OsStr::from_bytes(p))
            .file_name()
            .map(|n| n.to_owned())
    };
    let ours = std::env::current_exe()
        .ok()
        .and_then(|e| e.file_name().map(|n| n.to_owned()));
    let program = name(program);
    let named_like_baton = program.is_some()
        && (program == ours
            || program
                .as_deref()
                .is_some_and(|n| n.to_string_lossy().contains("baton")));
    named_like_baton && args.any(|a| a == b"run") && process_alive(pid)
}
