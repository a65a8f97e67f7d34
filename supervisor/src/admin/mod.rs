//! The admin endpoint: `[supervisor] admin = "IP:PORT" | "unix:PATH"`, an
//! HTTP listener owned by the master for Prometheus, health probes and
//! on-call engineers (`/metrics`, `/healthz`, `/readyz`, `/status`).
//!
//! Like a listener, the socket is bound once and never closed while a
//! master serves: it is kept across reloads and handed to the next master
//! at a binary upgrade (inherited, its fd named in [`ADMIN_FD_ENV`]), so a
//! probe or a scrape never meets a refused connection. During a child-mode
//! upgrade the old master answers until the handover, then the new one.
//!
//! Requests are served by tasks of the master's runtime; each becomes an
//! event of the master's loop, which answers from its own state (see
//! [`respond`]), so that nothing is locked and nothing is stale. Health
//! and readiness probes go to the loop's first inbox, ahead of scrapes and
//! CLI requests, and wait for it at most a second (`/healthz` is the loop
//! answering). Every connection is accepted; the caps of [`limits`] and a
//! 5 s header deadline keep silent, slow and idle clients from holding a
//! probe back.

pub mod auth;
mod http;
pub mod limits;
pub mod respond;
mod write;

pub use http::Inboxes;

use crate::config::ListenerAddress;
use anyhow::{bail, Context};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

/// Names the inherited admin socket in a new master (both upgrade modes).
pub const ADMIN_FD_ENV: &str = "BATON_ADMIN_FD";

/// The bound admin socket.
#[derive(Debug)]
pub struct AdminSocket {
    /// What the configuration asked for.
    configured: ListenerAddress,
    /// Where it is bound (the actual port when the configuration said 0).
    bound: String,
    fd: OwnedFd,
    /// A Unix socket's file, removed on drop unless handed over.
    unix_path: Option<PathBuf>,
    /// An inherited Unix socket's file: the previous master's until this
    /// one serves (a new master that fails must not remove it).
    inherited_path: Option<PathBuf>,
    server: Option<(
        tokio::task::AbortHandle,
        tokio_util::sync::CancellationToken,
    )>,
}

impl AdminSocket {
    /// Binds `address` (close-on-exec, `SO_REUSEADDR` for TCP). A Unix
    /// socket file left by a dead process is replaced, a live one refused.
    pub fn bind(address: &ListenerAddress) -> anyhow::Result<AdminSocket> {
        let binding = || format!("binding the admin endpoint on {address}");
        let (fd, unix_path): (OwnedFd, _) = match address {
            ListenerAddress::Tcp(addr) => (
                std::net::TcpListener::bind(addr)
                    .with_context(binding)?
                    .into(),
                None,
            ),
            ListenerAddress::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        bail!(
                            "{}: {} exists and is not a socket",
                            binding(),
                            path.display()
                        );
                    }
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        bail!("{}: another process serves on it", binding());
                    }
                    std::fs::remove_file(path).with_context(binding)?;
                }
                let listener =
                    std::os::unix::net::UnixListener::bind(path).with_context(binding)?;
                (listener.into(), Some(path.clone()))
            }
            ListenerAddress::Udp(_) => bail!("{}: the admin endpoint is not UDP", binding()),
        };
        let bound = describe(fd.as_fd()).with_context(binding)?;
        tracing::info!(address = %bound, "admin endpoint bound");
        Ok(AdminSocket {
            configured: address.clone(),
            bound,
            fd,
            unix_path,
            inherited_path: None,
            server: None,
        })
    }

    /// The admin socket a previous master handed over, if any, when it is
    /// what `wanted` asks for (port 0 accepts any port on the same IP).
    /// A socket that does not fit is closed: the caller binds `wanted`.
    pub fn inherited(wanted: Option<&ListenerAddress>) -> Option<AdminSocket> {
        let fd = match crate::fds::inherited(ADMIN_FD_ENV)
            .and_then(|fd| fd.map(listening).transpose())
        {
            Ok(fd) => fd?,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "ignoring {ADMIN_FD_ENV}");
                return None;
            }
        };
        AdminSocket::adopt(fd, wanted)
    }

    /// `fd`, the admin socket of a previous master, when it is what
    /// `wanted` asks for (else it is closed).
    pub fn adopt(fd: OwnedFd, wanted: Option<&ListenerAddress>) -> Option<AdminSocket> {
        let bound = describe(fd.as_fd()).ok()?;
        let wanted = wanted?;
        let fits = match wanted {
            ListenerAddress::Tcp(want) => bound.parse().is_ok_and(|got: std::net::SocketAddr| {
                got == *want || (want.port() == 0 && got.ip() == want.ip())
            }),
            ListenerAddress::Unix(path) => bound == path.display().to_string(),
            ListenerAddress::Udp(_) => false,
        };
        if !fits {
            tracing::info!(inherited = %bound, configured = %wanted, "admin address changed: the inherited socket is closed");
            return None;
        }
        tracing::info!(address = %bound, "admin endpoint inherited");
        Some(AdminSocket {
            configured: wanted.clone(),
            bound,
            fd,
            unix_path: None,
            inherited_path: match wanted {
                ListenerAddress::Unix(path) => Some(path.clone()),
                _ => None,
            },
            server: None,
        })
    }

    /// Starts answering; each request becomes an event in `inboxes`.
    pub fn serve(&mut self, inboxes: Inboxes) -> anyhow::Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        let fd = self
            .fd
            .try_clone()
            .context("duplicating the admin socket")?;
        let unix = matches!(self.configured, ListenerAddress::Unix(_));
        let listener = http::Listener::new(fd, unix)?;
        if let Some(path) = self.inherited_path.take() {
            self.unix_path = Some(path);
        }
        let closing = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(http::serve(listener, inboxes, closing.clone()));
        self.server = Some((server.abort_handle(), closing));
        Ok(())
    }

    /// Stops accepting (connections already accepted finish); the socket
    /// stays bound, its queue waiting for whoever serves it next.
    pub fn stop_serving(&mut self) {
        if let Some((server, closing)) = self.server.take() {
            server.abort();
            closing.cancel();
        }
    }

    /// Lets go of the socket for a new master: its file stays.
    pub fn hand_over(&mut self) {
        self.stop_serving();
        self.unix_path = None;
    }

    /// The socket, to be inherited by the next master.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The configured address.
    pub fn configured(&self) -> &ListenerAddress {
        &self.configured
    }

    /// The bound address (`IP:PORT` or the Unix path).
    pub fn address(&self) -> &str {
        &self.bound
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.stop_serving();
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `fd`, if it is a listening stream socket.
fn listening(fd: OwnedFd) -> anyhow::Result<OwnedFd> {
    if getsockopt(&fd, sockopt::SockType)? != nix::sys::socket::SockType::Stream
        || !getsockopt(&fd, sockopt::AcceptConn)?
    {
        bail!("fd {} is not a listening stream socket", fd.as_raw_fd());
    }
    Ok(fd)
}

/// A socket's bound address as status shows it.
fn describe(fd: BorrowedFd<'_>) -> anyhow::Result<String> {
    let bound: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    baton_wire::listener::describe(&bound).context("the admin socket has no address")
}
