//! Listeners as the worker receives them: checked against their metadata and
//! handed out by name as tokio sockets.

use crate::protocol::{ListenerInfo, ListenerKind};
use crate::Error;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

/// Takes the listener `name` out of `listeners`, whatever its kind.
pub(crate) fn take_fd(
    listeners: &mut BTreeMap<String, Listener>,
    name: &str,
) -> Result<(ListenerInfo, OwnedFd), Error> {
    let listener = listeners
        .remove(name)
        .ok_or_else(|| Error::NoSuchListener(name.to_string()))?;
    Ok((listener.info, listener.fd))
}

/// Takes the listener `name` out of `listeners` if it is of `kind`.
pub(crate) fn take(
    listeners: &mut BTreeMap<String, Listener>,
    name: &str,
    kind: ListenerKind,
) -> Result<OwnedFd, Error> {
    match listeners.get(name) {
        Some(l) if l.info.kind != kind => Err(Error::WrongKind {
            name: name.to_string(),
            kind: l.info.kind,
            wanted: kind,
        }),
        _ => Ok(take_fd(listeners, name)?.1),
    }
}

/// Checks that `fd` is the socket `info` describes (type, listening, bound
/// address); returns both on success. The master uses it to adopt sockets a
/// previous master handed over.
pub fn verify(info: ListenerInfo, fd: OwnedFd) -> Result<(ListenerInfo, OwnedFd), Error> {
    let listener = Listener::verify(info, fd)?;
    Ok((listener.info, listener.fd))
}

/// A listener received from the master or bound standalone.
#[derive(Debug)]
pub struct Listener {
    /// What the master said this socket is.
    pub info: ListenerInfo,
    pub(crate) fd: OwnedFd,
}

impl Listener {
    /// Checks that `fd` really is the socket `info` describes: its type, that
    /// a stream socket is listening, and its bound address.
    pub(crate) fn verify(info: ListenerInfo, fd: OwnedFd) -> Result<Listener, Error> {
        let mismatch = |found: String| Error::ListenerMismatch {
            name: info.name.clone(),
            expected: format!("{} {}", info.kind, info.address),
            found,
        };
        let sock_type = getsockopt(&fd, sockopt::SockType)
            .map_err(|e| mismatch(format!("not a socket ({e})")))?;
        let want_type = match info.kind {
            ListenerKind::Tcp | ListenerKind::Unix => SockType::Stream,
            ListenerKind::Udp => SockType::Datagram,
        };
        if sock_type != want_type {
            return Err(mismatch(format!("socket type {sock_type:?}")));
        }
        if want_type == SockType::Stream && !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
            return Err(mismatch("a stream socket that is not listening".into()));
        }
        let addr: SockaddrStorage =
            getsockname(fd.as_raw_fd()).map_err(|e| mismatch(format!("no address ({e})")))?;
        let found = describe(&addr);
        if found.as_deref() != Some(info.address.as_str()) || !kind_matches(info.kind, &addr) {
            return Err(mismatch(
                found.unwrap_or_else(|| "an unknown address family".into()),
            ));
        }
        Ok(Listener { info, fd })
    }
}

fn kind_matches(kind: ListenerKind, addr: &SockaddrStorage) -> bool {
    match kind {
        ListenerKind::Tcp | ListenerKind::Udp => {
            addr.as_sockaddr_in().is_some() || addr.as_sockaddr_in6().is_some()
        }
        ListenerKind::Unix => addr.as_unix_addr().is_some(),
    }
}

/// The address of a bound socket in the protocol's notation: `IP:PORT` for
/// IP sockets, the path for Unix sockets.
pub fn describe(addr: &SockaddrStorage) -> Option<String> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(std::net::SocketAddrV4::from(*v4).to_string());
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Some(std::net::SocketAddrV6::from(*v6).to_string());
    }
    let unix = addr.as_unix_addr()?;
    unix.path().map(|p| p.display().to_string())
}
