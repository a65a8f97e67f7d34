//! Socket activation of the master itself: started by systemd (a `.socket`
//! unit) or `systemd-socket-activate` with `LISTEN_FDS` and `LISTEN_PID`,
//! the master adopts those sockets for the listeners they match instead of
//! binding, and keeps them across reloads and upgrades like any listener.
//!
//! A socket matches the listener its `LISTEN_FDNAMES` entry names
//! (systemd's `FileDescriptorName=`; its address must then fit the
//! listener's), otherwise the one with its kind and address. An inherited
//! socket that matches no listener is an error: the unit and the config
//! disagree, and guessing would serve on the wrong socket.
//!
//! A listening socket a master left in systemd's fd store when it stopped
//! (`baton-listener-NAME`, see [`crate::fdstore`]) is taken the same way,
//! except that one no listener matches any more (the config changed) is
//! closed, and one that is also a `.socket` unit's is taken once. Other
//! `baton-*` fds are not sockets to serve: closed.

use crate::config::{ListenerAddress, ListenerConfig};
use crate::listener::Listener;
use anyhow::{bail, Context};
use baton_wire::protocol::ListenerKind;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// A socket passed by the service manager.
#[derive(Debug)]
pub struct Inherited {
    /// The socket.
    pub fd: OwnedFd,
    /// Its `LISTEN_FDNAMES` entry, if any.
    pub name: Option<String>,
    /// Left in systemd's fd store by a master that stopped: closed, not an
    /// error, when no listener matches it.
    stored: bool,
    kind: ListenerKind,
    address: Bound,
}

/// Where an inherited socket is bound.
#[derive(Debug, PartialEq)]
enum Bound {
    Ip(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fd {} ({} ", self.fd.as_raw_fd(), self.kind)?;
        match &self.address {
            Bound::Ip(a) => write!(f, "{a}")?,
            Bound::Unix(p) => write!(f, "unix:{}", p.display())?,
        }
        match &self.name {
            Some(name) => write!(f, ", named {name:?})"),
            None => f.write_str(")"),
        }
    }
}

/// Takes the sockets in `LISTEN_FDS` if `LISTEN_PID` is this process;
/// none otherwise. Call once, before anything else could use fds 3 and up.
pub fn take_from_env() -> anyhow::Result<Vec<Inherited>> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let Some(count) = std::env::var("LISTEN_FDS").ok().filter(|_| ours) else {
        return Ok(Vec::new());
    };
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .with_context(|| format!("LISTEN_FDS={count:?} is not a count of sockets"))?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut out = Vec::with_capacity(count as usize);
    let mut inodes = std::collections::HashSet::new();
    for raw in FIRST_FD..FIRST_FD + count {
        nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD)
            .with_context(|| format!("LISTEN_FDS names fd {raw}, which is not open"))?;
        // SAFETY: by the socket-activation convention fds 3..3+LISTEN_FDS
        // belong to this process (LISTEN_PID matched); the fd is open
        // (checked above) and nothing else in the master takes it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        nix::fcntl::fcntl(
            raw,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        // systemd names unnamed sockets after their unit, or "unknown".
        let mut name = names
            .next()
            .filter(|n| !n.is_empty() && *n != "unknown")
            .map(str::to_string);
        let stored = match name
            .as_deref()
            .map(|n| (n, crate::fdstore::stored_listener(n)))
        {
            Some((_, Some(listener))) => {
                name = listener.map(str::to_string);
                true
            }
            Some((other, None)) if other.starts_with(crate::fdstore::PREFIX) => {
                tracing::warn!(
                    fd = raw,
                    name = other,
                    "a stored fd without the snapshot that names it: closed"
                );
                continue;
            }
            _ => false,
        };
        // The same socket from a `.socket` unit and from the fd store
        // (which comes after): taken once.
        if !inodes.insert(crate::steering::inode(fd.as_fd())?) {
            continue;
        }
        let (kind, address) = match describe(&fd) {
            Ok(described) => described,
            Err(e) if stored => {
                tracing::warn!(fd = raw, error = %format!("{e:#}"), "a socket left in the fd store is not usable: closed");
                continue;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "inherited fd {raw} (LISTEN_FDS) is not a usable socket"
                )))
            }
        };
        out.push(Inherited {
            fd,
            name,
            stored,
            kind,
            address,
        });
    }
    Ok(out)
}

fn describe(fd: &OwnedFd) -> anyhow::Result<(ListenerKind, Bound)> {
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let bound = if let Some(v4) = addr.as_sockaddr_in() {
        Bound::Ip(SocketAddr::V4((*v4).into()))
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        Bound::Ip(SocketAddr::V6((*v6).into()))
    } else if let Some(path) = addr.as_unix_addr().and_then(|u| u.path()) {
        Bound::Unix(path.to_path_buf())
    } else {
        bail!("not an IP or Unix socket bound to an address");
    };
    let kind = match (getsockopt(fd, sockopt::SockType)?, &bound) {
        (SockType::Stream, Bound::Ip(_)) => ListenerKind::Tcp,
        (SockType::Stream, Bound::Unix(_)) => ListenerKind::Unix,
        (SockType::Datagram, Bound::Ip(_)) => ListenerKind::Udp,
        (other, _) => bail!("socket type {other:?} is not one baton serves"),
    };
    if kind != ListenerKind::Udp && !getsockopt(fd, sockopt::AcceptConn)? {
        bail!("a stream socket that is not listening");
    }
    Ok((kind, bound))
}

impl Inherited {
    /// Whether this socket can serve `listener`: same kind, and the same
    /// address (any port where the config asks for port 0).
    fn fits(&self, listener: &ListenerConfig) -> bool {
        match (&listener.address, &self.address) {
            (ListenerAddress::Tcp(want), Bound::Ip(have)) if self.kind == ListenerKind::Tcp => {
                ip_fits(want, have)
            }
            (ListenerAddress::Udp(want), Bound::Ip(have)) if self.kind == ListenerKind::Udp => {
                ip_fits(want, have)
            }
            (ListenerAddress::Unix(want), Bound::Unix(have)) => want == have,
            _ => false,
        }
    }
}

fn ip_fits(want: &SocketAddr, have: &SocketAddr) -> bool {
    want.ip() == have.ip() && (want.port() == 0 || want.port() == have.port())
}

/// Pairs each inherited socket with the listener it serves: by name first,
/// then by kind and address. Every socket must find one, and no listener
/// takes two.
pub fn assign(
    inherited: Vec<Inherited>,
    listeners: &[ListenerConfig],
) -> anyhow::Result<Vec<(ListenerConfig, Inherited, &'static str)>> {
    let mut out: Vec<(ListenerConfig, Inherited, &'static str)> = Vec::new();
    let taken = |out: &[(ListenerConfig, Inherited, &str)], name: &str| {
        out.iter().any(|(l, _, _)| l.name == name)
    };
    for socket in inherited {
        let named = socket
            .name
            .as_deref()
            .and_then(|n| listeners.iter().find(|l| l.name == n));
        let unmatched = named.is_some_and(|l| !socket.fits(l))
            || (named.is_none()
                && !listeners
                    .iter()
                    .any(|l| !taken(&out, &l.name) && socket.fits(l)))
            || named.is_some_and(|l| taken(&out, &l.name));
        if socket.stored && unmatched {
            tracing::warn!(socket = %socket, "a socket left in the fd store that no listener takes now: closed");
            continue;
        }
        let (listener, by) = match named {
            Some(listener) if !socket.fits(listener) => bail!(
                "socket-activated {socket} is named after listener `{}`, whose address is {}",
                listener.name,
                listener.address
            ),
            Some(listener) => (listener, "name"),
            None => match listeners
                .iter()
                .find(|l| !taken(&out, &l.name) && socket.fits(l))
            {
                Some(listener) => (listener, "address"),
                None => bail!(
                    "socket-activated {socket} matches no [[listener]] (by LISTEN_FDNAMES name or by kind and address): add one, or remove the socket from the unit"
                ),
            },
        };
        if taken(&out, &listener.name) {
            bail!(
                "socket-activated {socket}: listener `{}` already has an inherited socket",
                listener.name
            );
        }
        out.push((listener.clone(), socket, by));
    }
    Ok(out)
}

/// The sockets of socket activation as the listeners of `listeners` they
/// match, for the master to start with: the first reload keeps them as it
/// keeps any unchanged listener.
pub fn adopt(
    activated: Vec<Inherited>,
    listeners: &[ListenerConfig],
) -> anyhow::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for (config, socket, by) in assign(activated, listeners)? {
        let fd = socket.fd.as_raw_fd();
        let listener = Listener::inherited(config, socket.fd)?;
        tracing::info!(
            listener = %listener.info.name,
            address = %listener.info.address,
            kind = %listener.info.kind,
            fd,
            matched_by = by,
            steered = listener.steerable(),
            "listener adopted from socket activation"
        );
        out.push(listener);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str, address: &str) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            address: address.parse().unwrap(),
            backlog: 16,
            nodelay: None,
            quic: false,
        }
    }

    fn tcp(name: Option<&str>) -> (std::net::TcpListener, Inherited) {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = OwnedFd::from(socket.try_clone().unwrap());
        let (kind, address) = describe(&fd).unwrap();
        let inherited = Inherited {
            fd,
            name: name.map(str::to_string),
            stored: false,
            kind,
            address,
        };
        (socket, inherited)
    }

    #[test]
    fn sockets_match_by_name_then_by_address() {
        let (a, by_name) = tcp(Some("admin"));
        let (b, by_address) = tcp(None);
        let port = b.local_addr().unwrap().port();
        let listeners = [
            listener("http", &format!("127.0.0.1:{port}")),
            listener("admin", "127.0.0.1:0"),
        ];
        let assigned = assign(vec![by_name, by_address], &listeners).unwrap();
        let names: Vec<(&str, &str)> = assigned
            .iter()
            .map(|(l, _, by)| (l.name.as_str(), *by))
            .collect();
        assert_eq!(names, [("admin", "name"), ("http", "address")]);
        drop(a);
    }

    #[test]
    fn a_unix_socket_matches_the_listener_on_its_path() {
        let path =
            std::env::temp_dir().join(format!("baton-activation-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd = OwnedFd::from(socket);
        let (kind, address) = describe(&fd).unwrap();
        let inherited = Inherited {
            fd,
            name: None,
            stored: false,
            kind,
            address,
        };
        let listeners = [
            listener("http", "127.0.0.1:0"),
            listener("app", &format!("unix:{}", path.display())),
        ];
        let assigned = assign(vec![inherited], &listeners).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(assigned[0].0.name, "app");
    }

    #[test]
    fn a_stored_socket_no_listener_takes_is_closed_not_an_error() {
        let (_a, mut stray) = tcp(Some("gone"));
        stray.stored = true;
        let (b, mut kept) = tcp(Some("http"));
        kept.stored = true;
        let port = b.local_addr().unwrap().port();
        let listeners = [listener("http", &format!("127.0.0.1:{port}"))];
        let assigned = assign(vec![stray, kept], &listeners).unwrap();
        let names: Vec<(&str, &str)> = assigned
            .iter()
            .map(|(l, _, by)| (l.name.as_str(), *by))
            .collect();
        assert_eq!(names, [("http", "name")]);
    }

    #[test]
    fn an_unmatched_or_misnamed_socket_is_an_error() {
        let (_a, stray) = tcp(None);
        let e = assign(vec![stray], &[listener("http", "127.0.0.1:1")]).unwrap_err();
        assert!(e.to_string().contains("matches no [[listener]]"), "{e}");
        let (_b, misnamed) = tcp(Some("http"));
        let e = assign(vec![misnamed], &[listener("http", "10.0.0.1:80")]).unwrap_err();
        assert!(e.to_string().contains("named after listener `http`"), "{e}");
    }
}
