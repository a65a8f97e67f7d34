//! `ready = "notify"`: systemd's notification protocol, for servers that do
//! not link the SDK. Each generation gets its own `SOCK_DGRAM` socket, named
//! to its workers by `NOTIFY_SOCKET`; a datagram is attributed to a worker
//! by the sender's pid, which the kernel attaches (`SO_PASSCRED`): the
//! worker itself or any of its descendants, as gunicorn's arbiter/worker
//! split needs. `READY=1` marks the worker ready, `STATUS=` is shown in
//! `baton status` and logged, `STOPPING=1` and `MAINPID=` are logged;
//! other keys are ignored.
//!
//! The sockets live in a directory of the master, `.baton-PID` next to the
//! control socket: mode 0711 (no listing), each socket mode 0600 and owned by
//! the workers' `user` when one is set, so that only the master and the
//! workers can send. The directory goes with the last socket, and one left
//! by a master that died is removed by the next master that creates its own.

use crate::config::Credentials;
use crate::fleet::Generation;
use crate::master::{Event, Events};
use crate::worker::State;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
use nix::unistd::Pid;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use tokio::io::Interest;

/// The longest datagram read; a longer one is ignored.
const MAX_DATAGRAM: usize = 8 * 1024;
/// How far up the process tree a sender is traced to a worker.
const MAX_ANCESTRY: usize = 16;
/// The longest `STATUS=` text kept.
const MAX_STATUS: usize = 512;

/// The master's directory of notify sockets, shared by them.
#[derive(Debug)]
struct RuntimeDir(PathBuf);

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

static RUNTIME_DIR: Mutex<Weak<RuntimeDir>> = Mutex::new(Weak::new());

/// The directories of masters that died whose notify sockets this master
/// adopted (see [`Notifier::adopt`]): not stale while one is in use.
static ADOPTED_DIRS: Mutex<Vec<Weak<RuntimeDir>>> = Mutex::new(Vec::new());

/// The directory `path` of a master that died, shared by the notify
/// sockets adopted from it.
fn adopted_dir(path: &Path) -> Arc<RuntimeDir> {
    let mut dirs = ADOPTED_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    dirs.retain(|d| d.strong_count() > 0);
    if let Some(dir) = dirs.iter().filter_map(Weak::upgrade).find(|d| d.0 == path) {
        return dir;
    }
    let dir = Arc::new(RuntimeDir(path.to_path_buf()));
    dirs.push(Arc::downgrade(&dir));
    dir
}

/// Whether `path` is the directory of notify sockets this master adopted.
fn in_use(path: &Path) -> bool {
    let dirs = ADOPTED_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    dirs.iter().filter_map(Weak::upgrade).any(|d| d.0 == path)
}

/// The runtime directory, created on first use next to `control_socket`.
fn runtime_dir(control_socket: &Path) -> io::Result<Arc<RuntimeDir>> {
    let mut shared = RUNTIME_DIR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = shared.upgrade() {
        return Ok(dir);
    }
    let parent = control_socket.parent().unwrap_or(Path::new("."));
    remove_stale_dirs(parent);
    let path = parent.join(format!(".baton-{}", std::process::id()));
    // A leftover of this pid is stale too: this master has no sockets yet.
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711))?;
    let dir = Arc::new(RuntimeDir(path));
    *shared = Arc::downgrade(&dir);
    Ok(dir)
}

/// Removes `.baton-PID` directories whose master is gone.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".baton-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone =
            nix::sys::signal::kill(Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH);
        if !gone || !entry.file_type().is_ok_and(|t| t.is_dir()) || in_use(&entry.path()) {
            continue;
        }
        // Only what a master leaves there: notify sockets.
        let ours = std::fs::read_dir(entry.path()).is_ok_and(|inside| {
            inside.flatten().all(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("notify-"))
            })
        });
        if ours {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One generation's notify socket; its file is removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    path: PathBuf,
    socket: tokio::net::UnixDatagram,
    _dir: Arc<RuntimeDir>,
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A generation's notify socket and the task reading it.
#[derive(Debug)]
pub struct Notifier {
    /// The socket.
    pub socket: Arc<NotifySocket>,
    /// The task forwarding its datagrams into the event loop.
    pub reader: tokio::task::AbortHandle,
    /// Datagrams from no known worker that arrived while workers were
    /// still being started off the loop: a new worker may notify before
    /// the loop has taken it in. Replayed as each one is.
    pub held: Vec<Datagram>,
}

impl Notifier {
    /// Binds generation `generation`'s notify socket beside the control
    /// socket, and forwards its datagrams into the event loop (`events`).
    pub fn bind(
        control_socket: &Path,
        generation: u64,
        credentials: Option<Credentials>,
        events: &Events,
    ) -> io::Result<Notifier> {
        let socket = Arc::new(NotifySocket::bind(control_socket, generation, credentials)?);
        Ok(Notifier::serve(socket, generation, events))
    }

    /// The notify socket of generation `generation` a master that died
    /// left (`fd`, bound at `path`, in that master's directory, which is
    /// kept while it is in use): its workers' `STATUS=` and `READY=1` go on
    /// reaching this master.
    pub fn adopt(
        fd: OwnedFd,
        path: PathBuf,
        generation: u64,
        events: &Events,
    ) -> io::Result<Notifier> {
        let dir = adopted_dir(path.parent().unwrap_or(Path::new(".")));
        let socket = std::os::unix::net::UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        let socket = Arc::new(NotifySocket {
            path,
            socket: tokio::net::UnixDatagram::from_std(socket)?,
            _dir: dir,
        });
        Ok(Notifier::serve(socket, generation, events))
    }

    fn serve(socket: Arc<NotifySocket>, generation: u64, events: &Events) -> Notifier {
        let events = events.clone();
        let reading = socket.clone();
        let reader = tokio::spawn(async move {
            loop {
                let datagram = match reading.recv().await {
                    Ok(datagram) => datagram,
                    Err(e) => {
                        tracing::error!(generation, error = %e, "cannot read the notify socket");
                        return;
                    }
                };
                if events
                    .send(Event::Notify {
                        generation,
                        datagram,
                    })
                    .is_err()
                {
                    return;
                }
            }
        })
        .abort_handle();
        Notifier {
            socket,
            reader,
            held: Vec::new(),
        }
    }
}

/// How many datagrams a generation holds for workers not yet taken in.
const MAX_HELD: usize = 64;

impl Drop for Notifier {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One datagram, with the sender and its ancestors, nearest first.
#[derive(Debug)]
pub struct Datagram {
    /// The sender's pid and those of its ancestors.
    pub lineage: Vec<Pid>,
    /// The text, or `None` if it was too long or not UTF-8.
    pub text: Option<String>,
}

impl NotifySocket {
    /// Binds generation `generation`'s socket, sendable by `credentials`'
    /// user or group when set. Must run inside the tokio runtime.
    pub fn bind(
        control_socket: &Path,
        generation: u64,
        credentials: Option<Credentials>,
    ) -> io::Result<NotifySocket> {
        let dir = runtime_dir(control_socket)?;
        let path = dir.0.join(format!("notify-{generation}"));
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path)?;
        let notify = NotifySocket {
            path,
            socket: {
                socket.set_nonblocking(true)?;
                tokio::net::UnixDatagram::from_std(socket)?
            },
            _dir: dir,
        };
        nix::sys::socket::setsockopt(&notify.socket, nix::sys::socket::sockopt::PassCred, &true)?;
        let mode = match credentials {
            Some(Credentials { uid: None, gid }) => {
                std::os::unix::fs::chown(&notify.path, None, Some(gid))?;
                0o620
            }
            Some(Credentials { uid, .. }) => {
                std::os::unix::fs::chown(&notify.path, uid, None)?;
                0o600
            }
            None => 0o600,
        };
        std::fs::set_permissions(&notify.path, std::fs::Permissions::from_mode(mode))?;
        Ok(notify)
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its fd (for the keeper's snapshot).
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// The next datagram.
    pub async fn recv(&self) -> io::Result<Datagram> {
        loop {
            self.socket.readable().await?;
            let fd = self.socket.as_raw_fd();
            match self.socket.try_io(Interest::READABLE, || receive(fd)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// Reads one datagram with its sender's credentials. Any fds sent along
/// (`FDSTORE=1`) are closed: baton keeps none.
fn receive(fd: RawFd) -> io::Result<Datagram> {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    // Room for the credentials and the most fds one message can carry
    // (SCM_MAX_FD), so that the control data is never truncated.
    let mut control = nix::cmsg_space!(UnixCredentials, [RawFd; 253]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_TRUNC,
    )?;
    let mut sender = None;
    for cmsg in message.cmsgs()? {
        match cmsg {
            ControlMessageOwned::ScmCredentials(credentials) => sender = Some(credentials.pid()),
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    // SAFETY: the kernel just installed this fd in this
                    // process for us; nothing else refers to it.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            _ => {}
        }
    }
    let (length, truncated) = (message.bytes, message.flags.contains(MsgFlags::MSG_TRUNC));
    let text = (!truncated && length <= MAX_DATAGRAM)
        .then(|| String::from_utf8(buffer[..length].to_vec()).ok())
        .flatten();
    Ok(Datagram {
        lineage: sender
            .map(|pid| lineage(Pid::from_raw(pid)))
            .unwrap_or_default(),
        text,
    })
}

/// `pid`, its parent, grandparent, ... from /proc, up to [`MAX_ANCESTRY`].
fn lineage(pid: Pid) -> Vec<Pid> {
    let mut out = vec![pid];
    while out.len() < MAX_ANCESTRY {
        let last = out[out.len() - 1];
        let ppid = crate::orphans::stat(last.as_raw())
            .and_then(|fields| fields.split_whitespace().nth(1)?.parse::<i32>().ok());
        match ppid {
            Some(ppid) if ppid > 1 => out.push(Pid::from_raw(ppid)),
            _ => break,
        }
    }
    out
}

/// What one notification says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Notification {
    /// `READY=1`.
    pub ready: bool,
    /// The last `STATUS=`.
    pub status: Option<String>,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `MAINPID=`.
    pub main_pid: Option<i32>,
}

/// Parses newline-separated `KEY=VALUE` assignments; unknown keys and
/// malformed lines are ignored, as systemd does.
pub fn parse(text: &str) -> Notification {
    let mut out = Notification::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => out.ready = true,
            Some(("STOPPING", "1")) => out.stopping = true,
            Some(("STATUS", status)) => {
                let mut status = status.to_string();
                if status.len() > MAX_STATUS {
                    let mut end = MAX_STATUS;
                    while !status.is_char_boundary(end) {
                        end -= 1;
                    }
                    status.truncate(end);
                }
                out.status = Some(status);
            }
            Some(("MAINPID", pid)) => out.main_pid = pid.parse().ok(),
            _ => {}
        }
    }
    out
}

/// A datagram on `generation`'s notify socket, delivered: true when it
/// came from one of its workers (a readiness may have changed), false when
/// it was held for a worker still being started, or ignored.
pub fn deliver(g: &mut Generation, datagram: Datagram) -> bool {
    let generation = g.number();
    let sender = datagram.lineage.first().map_or(0, |p| p.as_raw());
    let Some(pid) = datagram
        .lineage
        .iter()
        .copied()
        .find(|p| g.workers().contains_key(p))
    else {
        let pending = g.has_pending();
        if let Some(notifier) = g
            .notify_mut()
            .filter(|n| pending && n.held.len() < MAX_HELD)
        {
            notifier.held.push(datagram);
            return false;
        }
        tracing::warn!(
            generation,
            sender,
            "notification from a process that is not a worker of this generation: ignored"
        );
        return false;
    };
    let Some(text) = datagram.text else {
        tracing::warn!(
            generation,
            pid = pid.as_raw(),
            sender,
            "oversized or non-UTF-8 notification ignored"
        );
        return false;
    };
    let notification = parse(&text);
    let notify_ready = g.config().worker.ready == crate::config::ReadyMode::Notify;
    let worker = g.worker_mut(pid).expect("found above");
    let (index, raw) = (worker.index(), pid.as_raw());
    if let Some(status) = notification.status {
        tracing::info!(generation, worker = index, pid = raw, sender, %status, "worker status");
        worker.report_status(status);
    }
    if let Some(main_pid) = notification.main_pid {
        tracing::info!(
            generation,
            worker = index,
            pid = raw,
            main_pid,
            "worker announced MAINPID (noted; baton keeps supervising the process it started)"
        );
    }
    if notification.stopping {
        tracing::info!(generation, worker = index, pid = raw, "worker stopping");
    }
    if notification.ready && notify_ready && worker.state() == State::Starting {
        worker.become_ready();
        tracing::info!(
            event = "worker.ready",
            generation,
            worker = index,
            pid = raw,
            sender,
            "worker ready"
        );
    }
    true
}

/// Generation `g` took in a worker started off the loop (or gave up on
/// one): what was held for it is delivered now, and once no worker is
/// still to come, what is left is from no worker at all. True when any of
/// it came from a worker.
pub fn replay(g: &mut Generation) -> bool {
    let held = g.notify_mut().map(|n| std::mem::take(&mut n.held));
    let mut delivered = false;
    for datagram in held.into_iter().flatten() {
        delivered |= deliver(g, datagram);
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse_like_systemd() {
        assert_eq!(
            parse("READY=1\nSTATUS=Gunicorn arbiter booted\nMAINPID=42\nWATCHDOG=1\nnonsense"),
            Notification {
                ready: true,
                status: Some("Gunicorn arbiter booted".into()),
                stopping: false,
                main_pid: Some(42),
            }
        );
        assert!(!parse("READY=0\nSTOPPING=1\n").ready);
        assert!(parse("STOPPING=1").stopping);
        assert_eq!(parse("STATUS=a\nSTATUS=b").status.as_deref(), Some("b"));
        let long = format!("STATUS={}", "é".repeat(MAX_STATUS));
        assert!(parse(&long).status.unwrap().len() <= MAX_STATUS);
    }

    #[test]
    fn lineage_walks_up_to_the_test_process() {
        let me = Pid::this();
        let chain = lineage(me);
        assert_eq!(chain[0], me);
        assert_eq!(chain.get(1), Some(&Pid::parent()));
    }
}
