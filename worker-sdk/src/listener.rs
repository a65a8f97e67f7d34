//! Listeners as the worker receives them: checked against their metadata and
//! handed out by name.

use crate::{Error, ListenerInfo, ListenerKind};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

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

/// A listener received from the master or bound standalone.
#[derive(Debug)]
pub(crate) struct Listener {
    /// What the master said this socket is.
    pub(crate) info: ListenerInfo,
    pub(crate) fd: OwnedFd,
}

impl Listener {
    /// Checks that `fd` really is the socket `info` describes: its type, that
    /// a stream socket is listening, and its bound address.
    pub(crate) fn verify(info: ListenerInfo, fd: OwnedFd) -> Result<Listener, Error> {
        match baton_wire::listener::verify(info, fd) {
            Ok((info, fd)) => Ok(Listener { info, fd }),
            Err(m) => Err(Error::ListenerMismatch {
                name: m.name,
                expected: m.expected,
                found: m.found,
            }),
        }
    }
}
