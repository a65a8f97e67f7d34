//! Listeners when no master supervises the worker: systemd socket
//! activation's fds, else the declared addresses, bound here.

use crate::listener::Listener;
use crate::{Error, ListenerInfo, ListenerKind};
use baton_wire::listener::describe;
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Socket-activation listeners, then each of `declared` (name, address)
/// not among them, bound.
pub(crate) fn listeners(
    declared: &[(String, String)],
) -> Result<BTreeMap<String, Listener>, Error> {
    let mut listeners = socket_activation_listeners()?;
    for (name, address) in declared {
        if !listeners.contains_key(name) {
            listeners.insert(name.clone(), bind(name, address)?);
        }
    }
    Ok(listeners)
}

/// Binds a listener for standalone use.
fn bind(name: &str, address: &str) -> Result<Listener, Error> {
    let bind_error = |source: std::io::Error| Error::Bind {
        name: name.to_string(),
        address: address.to_string(),
        source,
    };
    let (kind, fd): (ListenerKind, OwnedFd) = if let Some(path) = address.strip_prefix("unix:") {
        let l = std::os::unix::net::UnixListener::bind(path).map_err(bind_error)?;
        (ListenerKind::Unix, l.into())
    } else if let Some(addr) = address.strip_prefix("udp:") {
        let s = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
        (ListenerKind::Udp, s.into())
    } else {
        let l = std::net::TcpListener::bind(address).map_err(bind_error)?;
        (ListenerKind::Tcp, l.into())
    };
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| bind_error(e.into()))?;
    let info = ListenerInfo {
        name: name.to_string(),
        kind,
        address: describe(&addr).unwrap_or_else(|| address.to_string()),
        quic_slot: None,
    };
    Ok(Listener { info, fd })
}

/// Listeners passed by systemd socket activation, when `LISTEN_PID` is ours.
fn socket_activation_listeners() -> Result<BTreeMap<String, Listener>, Error> {
    let mut out = BTreeMap::new();
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = match std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(n) if pid_matches => n,
        _ => return Ok(out),
    };
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    for i in 0..count {
        let raw = 3 + i;
        if nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Err(Error::Protocol(format!(
                "LISTEN_FDS names fd {raw}, which is not open"
            )));
        }
        // SAFETY: systemd's convention hands fds 3..3+LISTEN_FDS to this
        // process (LISTEN_PID matched); they are open (checked) and owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let _ = nix::fcntl::fcntl(
            raw,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let name = names
            .next()
            .filter(|n| !n.is_empty())
            .map_or_else(|| format!("fd{raw}"), str::to_string);
        let kind = match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::Datagram) => ListenerKind::Udp,
            Ok(SockType::Stream) => {
                let addr: Option<SockaddrStorage> = getsockname(raw).ok();
                if addr.as_ref().and_then(|a| a.as_unix_addr()).is_some() {
                    ListenerKind::Unix
                } else {
                    ListenerKind::Tcp
                }
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "LISTEN_FDS fd {raw} is not a socket"
                )))
            }
        };
        let address = getsockname::<SockaddrStorage>(raw)
            .ok()
            .and_then(|a| describe(&a))
            .unwrap_or_default();
        out.insert(
            name.clone(),
            Listener {
                info: ListenerInfo {
                    name,
                    kind,
                    address,
                    quic_slot: None,
                },
                fd,
            },
        );
    }
    Ok(out)
}
