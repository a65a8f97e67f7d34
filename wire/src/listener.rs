//! Listener fds checked against their metadata, on either side: a worker
//! checks what the master sent, a new master what the old one handed over.

use crate::protocol::{ListenerInfo, ListenerKind};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
use std::os::fd::{AsRawFd, OwnedFd};

/// A received fd that is not the socket its metadata describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener `{name}`: expected {expected}, the fd is {found}")]
pub struct Mismatch {
    /// The listener's name.
    pub name: String,
    /// What the metadata said: kind and address.
    pub expected: String,
    /// What the fd is.
    pub found: String,
}

/// Checks that `fd` is the socket `info` describes: its type, that a stream
/// socket is listening, and its bound address. Returns both on success; on
/// failure `fd` is closed.
pub fn verify(info: ListenerInfo, fd: OwnedFd) -> Result<(ListenerInfo, OwnedFd), Mismatch> {
    let mismatch = |found: String| Mismatch {
        name: info.name.clone(),
        expected: format!("{} {}", info.kind, info.address),
        found,
    };
    let sock_type =
        getsockopt(&fd, sockopt::SockType).map_err(|e| mismatch(format!("not a socket ({e})")))?;
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
    Ok((info, fd))
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
/// IP sockets, the path for Unix sockets; `None` for another family or an
/// unnamed Unix socket.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: ListenerKind, address: String) -> ListenerInfo {
        ListenerInfo {
            name: "http".into(),
            kind,
            address,
            quic_slot: None,
        }
    }

    #[test]
    fn a_listening_socket_at_the_announced_address_passes() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = tcp.local_addr().unwrap().to_string();
        let (checked, _) = verify(info(ListenerKind::Tcp, address.clone()), tcp.into()).unwrap();
        assert_eq!(checked.address, address);
    }

    #[test]
    fn another_address_kind_or_type_is_a_mismatch_naming_what_the_fd_is() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let actual = tcp.local_addr().unwrap();
        let wrong = format!("127.0.0.1:{}", actual.port() ^ 1);
        let error = verify(info(ListenerKind::Tcp, wrong), tcp.into()).unwrap_err();
        assert_eq!(error.found, actual.to_string());

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = tcp.local_addr().unwrap().to_string();
        let error = verify(info(ListenerKind::Udp, address), tcp.into()).unwrap_err();
        assert!(error.found.starts_with("socket type"), "{error}");

        let file = std::fs::File::open("/dev/null").unwrap();
        let error = verify(info(ListenerKind::Tcp, "x".into()), file.into()).unwrap_err();
        assert!(error.found.starts_with("not a socket"), "{error}");
        assert_eq!(
            error.to_string(),
            format!("listener `http`: expected tcp x, the fd is {}", error.found)
        );
    }
}
