//! The control socket: the CLI's way into the running master.
//!
//! A Unix stream socket, mode 0600. Each connection is checked with
//! `SO_PEERCRED` (only root and the master's own uid may speak), then carries
//! newline-delimited JSON requests; each becomes an event of the master's loop
//! and gets one reply line. A bad request gets an error reply and changes
//! nothing.

pub mod client;
pub mod protocol;

use crate::master::Event;
use anyhow::{bail, Context};
use protocol::{decode_request, encode_line, Reply, MAX_LINE};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Names the control socket's fd in an exec upgrade's new image.
pub const CONTROL_FD_ENV: &str = "BATON_CONTROL_FD";

/// The control socket a previous image of this master handed over across
/// an exec ([`CONTROL_FD_ENV`]), if any.
pub fn inherited_fd() -> Option<std::os::fd::OwnedFd> {
    crate::fds::inherited(CONTROL_FD_ENV).ok().flatten()
}

/// Whether a master listens on the control socket at `path`.
pub fn live(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// How long a connection may take to send a full request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound control socket; removed on drop while it is still ours.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    inode: u64,
    listener: Option<std::os::unix::net::UnixListener>,
    /// The socket of the master that died, whose queue is still answered.
    previous: Option<std::os::unix::net::UnixListener>,
    /// The listening socket's fd, while the server task holds it.
    fd: std::os::fd::RawFd,
    server: Option<tokio::task::AbortHandle>,
}

impl ControlSocket {
    /// Binds `path` with mode 0600. A socket file left by a dead master is
    /// replaced; a live master's socket is never taken over.
    pub fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
        // Two masters started at the same moment must not both find no
        // live socket and both bind one, the later renaming its own over
        // the earlier's: the check, the bind and the rename happen under
        // an exclusive lock on the socket's directory, so the second one
        // finds the first one's socket live and refuses.
        let _lock = lock_dir(path)?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!(
                    "control socket {} exists and is not a socket",
                    path.display()
                );
            }
            if live(path) {
                bail!(
                    "another baton master is running on control socket {} (stop it first, or set another control_socket)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale control socket {}", path.display()))?;
        }
        ControlSocket::bind_here(path, None)
    }

    /// Binds `path` (the directory locked, nothing live there).
    fn bind_here(
        path: &Path,
        previous: Option<std::os::unix::net::UnixListener>,
    ) -> anyhow::Result<ControlSocket> {
        // Bind under a temporary name, restrict it, then rename: the socket is
        // never reachable with looser permissions.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .with_context(|| format!("binding control socket {}", tmp.display()))?;
        let result = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("creating control socket {}", path.display()));
        }
        listener.set_nonblocking(true)?;
        let inode = std::fs::symlink_metadata(path)?.ino();
        Ok(ControlSocket {
            path: path.to_path_buf(),
            inode,
            fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
            listener: Some(listener),
            previous,
            server: None,
        })
    }

    /// The socket a master that died listened on, handed over by the
    /// keeper (see [`crate::adopt`]): requests that came meanwhile wait in
    /// its queue. Bound anew if its file is gone.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> anyhow::Result<ControlSocket> {
        // A new socket replaces it at the path, so that the kernel names
        // this master as the one listening (`baton -s`, `baton stop`); the
        // requests queued on the old one are answered, then it is closed.
        let _lock = lock_dir(path)?;
        let previous = std::os::unix::net::UnixListener::from(fd);
        previous.set_nonblocking(true)?;
        ControlSocket::bind_here(path, Some(previous))
    }

    /// The listening socket's fd (for the keeper's snapshot).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts accepting connections; requests go to `events`.
    pub fn serve(&mut self, events: mpsc::UnboundedSender<Event>) -> anyhow::Result<()> {
        let listener = self
            .listener
            .take()
            .context("control socket already served")?;
        let listener = UnixListener::from_std(listener)?;
        if let Some(previous) = self.previous.take() {
            let previous = UnixListener::from_std(previous)?;
            let events = events.clone();
            // What was queued on it is there now; nothing new comes.
            tokio::spawn(async move {
                while let Ok(Ok((stream, _))) =
                    tokio::time::timeout(Duration::from_secs(1), previous.accept()).await
                {
                    tokio::spawn(connection(stream, events.clone()));
                }
            });
        }
        let server = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(connection(stream, events.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        self.server = Some(server.abort_handle());
        Ok(())
    }
}

/// An exclusive lock on the control socket's directory, held while a
/// master checks and binds it.
fn lock_dir(path: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let locking = || {
        format!(
            "locking directory {} to bind the control socket",
            dir.display()
        )
    };
    let dir_file = std::fs::File::open(dir).with_context(locking)?;
    nix::fcntl::Flock::lock(dir_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(locking)
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Connections already accepted keep their tasks (a waiting `baton
        // upgrade` still gets its answer); no new ones are accepted.
        if let Some(server) = &self.server {
            server.abort();
        }
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn connection(mut stream: UnixStream, events: mpsc::UnboundedSender<Event>) {
    let my_uid = nix::unistd::geteuid().as_raw();
    let peer = match stream.peer_cred() {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials refused");
            return;
        }
    };
    if peer.uid() != 0 && peer.uid() != my_uid {
        tracing::warn!(
            peer_uid = peer.uid(),
            peer_pid = peer.pid(),
            "control connection refused: not root nor the master's uid"
        );
        let reply = Reply::error(format!(
            "permission denied: uid {} may not control this master (only root and uid {my_uid})",
            peer.uid()
        ));
        let _ = stream.write_all(&encode_line(reply)).await;
        return;
    }
    let mut buffer = Vec::new();
    loop {
        let line = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut stream, &mut buffer))
            .await
        {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(LineError::TooLong)) => {
                let reply = Reply::error(format!("request line longer than {MAX_LINE} bytes"));
                let _ = stream.write_all(&encode_line(reply)).await;
                return;
            }
            Ok(Err(LineError::Io)) => return,
        };
        let reply = match decode_request(&line) {
            Err(message) => {
                tracing::warn!(peer_pid = peer.pid(), error = %message, "bad control request");
                Reply::error(message)
            }
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                let from = crate::audit::Requester::control(peer.pid(), peer.uid());
                let event = Event::Control {
                    request,
                    reply: tx,
                    from,
                };
                if events.send(event).is_err() {
                    return;
                }
                match rx.await {
                    Ok(reply) => reply,
                    Err(_) => Reply::error("the master is exiting"),
                }
            }
        };
        if stream.write_all(&encode_line(reply)).await.is_err() {
            return;
        }
    }
}

enum LineError {
    TooLong,
    Io,
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes; `None` at
/// end of file.
async fn read_line(
    stream: &mut UnixStream,
    buffer: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, LineError> {
    loop {
        if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line = buffer.drain(..=end).collect::<Vec<u8>>();
            return Ok(Some(line[..line.len() - 1].to_vec()));
        }
        if buffer.len() > MAX_LINE {
            return Err(LineError::TooLong);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) => return Ok(None),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(LineError::Io),
        }
    }
}
