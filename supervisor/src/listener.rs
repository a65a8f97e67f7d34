//! Listeners: bound once by the master, shared by every generation that was
//! started with them, closed when the last one lets go.

use crate::config::{ListenerAddress, ListenerConfig};
use anyhow::{bail, Context};
use baton_worker::{ListenerInfo, ListenerKind};
use nix::sys::socket::{
    bind, getsockname, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, SockaddrIn, SockaddrIn6, SockaddrStorage, UnixAddr,
};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;

/// A bound socket. Dropping the last reference closes it (and removes the
/// socket file of a Unix listener).
#[derive(Debug)]
pub struct Listener {
    /// The configuration it was bound from.
    pub config: ListenerConfig,
    /// Name, kind and actual bound address, as workers are told.
    pub info: ListenerInfo,
    fd: OwnedFd,
    unix_path: Option<PathBuf>,
    /// Cleared when the socket is handed to a new master, which keeps using
    /// the path.
    remove_path: std::cell::Cell<bool>,
}

/// Listeners are shared between the master's current set and the
/// generations using them.
pub type Shared = Rc<Listener>;

impl Listener {
    /// Binds `config` with `SOCK_CLOEXEC` and starts listening.
    pub fn bind(config: &ListenerConfig) -> anyhow::Result<Listener> {
        bind_socket(config)
            .with_context(|| format!("binding listener `{}` on {}", config.name, config.address))
    }

    /// Adopts a socket handed over by a previous master, after checking it
    /// is what `info` says (type, listening, bound address). Its socket file
    /// stays the previous master's until [`Listener::own_path`]: a new master
    /// that fails must not remove the file the old one still serves on.
    pub fn adopt(
        config: ListenerConfig,
        info: ListenerInfo,
        fd: OwnedFd,
    ) -> anyhow::Result<Listener> {
        let verified = baton_worker::verify_listener(info, fd)
            .with_context(|| format!("adopting listener `{}`", config.name))?;
        let (info, fd) = verified;
        let unix_path = match &config.address {
            ListenerAddress::Unix(path) => Some(path.clone()),
            _ => None,
        };
        Ok(Listener {
            config,
            info,
            fd,
            unix_path,
            remove_path: std::cell::Cell::new(false),
        })
    }

    /// Takes over an adopted listener's socket file: it is removed when this
    /// master lets go of the socket.
    pub fn own_path(&self) {
        self.remove_path.set(true);
    }

    /// Keeps a Unix listener's socket file when this master lets go of it:
    /// the new master serves on it.
    pub fn hand_over(&self) {
        self.remove_path.set(false);
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Applies a changed backlog to the listening socket in place: Linux
    /// accepts `listen(2)` again on a listening socket.
    pub fn set_backlog(&self, backlog: i32) -> anyhow::Result<()> {
        if self.info.kind != ListenerKind::Udp {
            listen(&self.fd, Backlog::new(backlog)?)
                .with_context(|| format!("changing backlog of listener `{}`", self.info.name))?;
        }
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = self.unix_path.as_ref().filter(|_| self.remove_path.get()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_socket(config: &ListenerConfig) -> anyhow::Result<Listener> {
    let flags = SockFlag::SOCK_CLOEXEC;
    let (fd, kind, unix_path) = match &config.address {
        ListenerAddress::Tcp(addr) | ListenerAddress::Udp(addr) => {
            let (kind, ty) = match config.address {
                ListenerAddress::Udp(_) => (ListenerKind::Udp, SockType::Datagram),
                _ => (ListenerKind::Tcp, SockType::Stream),
            };
            let family = match addr {
                SocketAddr::V4(_) => AddressFamily::Inet,
                SocketAddr::V6(_) => AddressFamily::Inet6,
            };
            let fd = socket(family, ty, flags, None)?;
            setsockopt(&fd, sockopt::ReuseAddr, &true)?;
            match addr {
                SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(*a))?,
                SocketAddr::V6(a) => {
                    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                    bind(fd.as_raw_fd(), &SockaddrIn6::from(*a))?
                }
            }
            (fd, kind, None)
        }
        ListenerAddress::Unix(path) => {
            remove_stale_socket(path)?;
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            bind(fd.as_raw_fd(), &UnixAddr::new(path.as_path())?)?;
            (fd, ListenerKind::Unix, Some(path.clone()))
        }
    };
    if kind != ListenerKind::Udp {
        listen(&fd, Backlog::new(config.backlog)?)?;
    }
    let bound: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let info = ListenerInfo {
        name: config.name.clone(),
        kind,
        address: baton_worker::describe_address(&bound).unwrap_or_default(),
    };
    Ok(Listener {
        config: config.clone(),
        info,
        fd,
        unix_path,
        remove_path: std::cell::Cell::new(true),
    })
}

/// A socket file left by a dead process is removed; one that still accepts
/// connections is someone's live socket and is never stolen.
fn remove_stale_socket(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket", path.display());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("{} is in use by a running process", path.display()),
        Err(_) => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
            Ok(())
        }
    }
}
