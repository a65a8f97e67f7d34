//! What the master sends a new worker before anything else, checked as it
//! arrives: the hello, then every listener with its fd. Shared by the async
//! [`Worker`](crate::Worker) and the [`blocking`](crate::blocking) one, which
//! differ only in how they wait for the next message.

use crate::app_config::Files;
use crate::listener::Listener;
use crate::Error;
use baton_wire::channel::{ChannelError, Received};
use baton_wire::protocol::{AppPhase, MasterMessage, CONTROL_FD_ENV};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// How long a worker waits for the master's hello before giving up.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The control channel's fd named by `BATON_CONTROL_FD`, checked to be an
/// open `SOCK_SEQPACKET` socket and made close-on-exec.
pub(crate) fn control_fd_from_env() -> Result<OwnedFd, Error> {
    let value = std::env::var(CONTROL_FD_ENV).unwrap_or_default();
    let raw: RawFd = value
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| Error::BadControlFd(value.clone()))?;
    if nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err(Error::BadControlFd(value));
    }
    // SAFETY: the fd is open (checked above) and the master handed it to
    // this process for the SDK alone; nothing else in the process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if getsockopt(&fd, sockopt::SockType).ok() != Some(SockType::SeqPacket) {
        return Err(Error::BadControlFd(value));
    }
    // The worker's own children must not inherit the channel.
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(std::io::Error::from)?;
    Ok(fd)
}

/// A received message, or why there is none.
pub(crate) fn received(
    result: Result<Option<Received<MasterMessage>>, ChannelError>,
) -> Result<Received<MasterMessage>, Error> {
    match result {
        Ok(Some(received)) => Ok(received),
        Ok(None) => Err(Error::Protocol(
            "the master closed the control channel".into(),
        )),
        Err(e) => Err(Error::channel(e)),
    }
}

/// The handshake once complete.
pub(crate) struct Hello {
    pub(crate) generation: u64,
    pub(crate) worker_index: u32,
    pub(crate) drain_timeout: Duration,
    pub(crate) listeners: BTreeMap<String, Listener>,
    /// With `[worker] app_config`: the files' version and the files.
    pub(crate) app_files: Option<(String, Files)>,
    /// With `[worker] app_config`: the workers' log filter.
    pub(crate) log_filter: Option<String>,
    /// The reload's W3C `traceparent`, when well-formed.
    pub(crate) traceparent: Option<String>,
    /// Whether idle connections move at a drain (`[worker] handover`).
    pub(crate) handover: bool,
}

/// What the hello said.
#[derive(Clone, Copy)]
struct Greeting {
    generation: u64,
    worker_index: u32,
    listener_count: u32,
    drain_timeout: Duration,
    app_config: bool,
    handover: bool,
}

/// The handshake so far.
#[derive(Default)]
pub(crate) struct Handshake {
    hello: Option<Greeting>,
    listeners: BTreeMap<String, Listener>,
    app_files: Option<(String, Files)>,
    log_filter: Option<String>,
    traceparent: Option<String>,
}

impl Handshake {
    /// Takes the next message; `Ok(true)` once the handshake is complete:
    /// the hello, the listeners, then with `[worker] app_config` the
    /// initial app config files.
    pub(crate) fn feed(&mut self, received: Received<MasterMessage>) -> Result<bool, Error> {
        let Some(hello) = self.hello else {
            let MasterMessage::Hello {
                generation,
                worker_index,
                listener_count,
                drain_timeout_ms,
                app_config,
                traceparent,
                handover,
            } = received.message
            else {
                return Err(Error::Protocol(format!(
                    "expected hello, got {:?}",
                    received.message
                )));
            };
            self.hello = Some(Greeting {
                generation,
                worker_index,
                listener_count,
                drain_timeout: Duration::from_millis(drain_timeout_ms),
                app_config,
                handover,
            });
            // As W3C Trace Context says of a malformed header: ignored.
            self.traceparent = traceparent.filter(|t| crate::context::is_traceparent(t));
            return Ok(listener_count == 0 && !app_config);
        };
        if self.listeners.len() < hello.listener_count as usize {
            self.feed_listeners(received, hello.listener_count)?;
            return Ok(self.listeners.len() == hello.listener_count as usize && !hello.app_config);
        }
        let MasterMessage::AppFiles {
            phase: AppPhase::Initial,
            version,
            files,
            log_filter,
        } = received.message
        else {
            return Err(Error::Protocol(format!(
                "expected the initial app config files, got {:?}",
                received.message
            )));
        };
        let fd = received
            .fds
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol("app config files without their memfd".into()))?;
        let files = crate::app_config::from_memfd(fd, &files).map_err(Error::Protocol)?;
        self.app_files = Some((version, files));
        self.log_filter = log_filter;
        Ok(true)
    }

    fn feed_listeners(
        &mut self,
        received: Received<MasterMessage>,
        listener_count: u32,
    ) -> Result<(), Error> {
        let listeners = &mut self.listeners;
        let MasterMessage::Listeners {
            offset,
            listeners: infos,
        } = received.message
        else {
            return Err(Error::Protocol(format!(
                "expected listeners, got {:?}",
                received.message
            )));
        };
        if offset as usize != listeners.len()
            || infos.len() != received.fds.len()
            || listeners.len() + infos.len() > listener_count as usize
        {
            return Err(Error::Protocol(format!(
                "listener batch at offset {offset} with {} entries and {} fds does not fit \
                 ({} of {listener_count} received)",
                infos.len(),
                received.fds.len(),
                listeners.len()
            )));
        }
        for (info, fd) in infos.into_iter().zip(received.fds) {
            let name = info.name.clone();
            if listeners
                .insert(name.clone(), Listener::verify(info, fd)?)
                .is_some()
            {
                return Err(Error::Protocol(format!("listener `{name}` sent twice")));
            }
        }
        Ok(())
    }

    /// The completed handshake. Panics if [`feed`](Handshake::feed) never
    /// said it was complete.
    pub(crate) fn finish(self) -> Hello {
        let hello = self.hello.expect("the handshake is complete");
        Hello {
            generation: hello.generation,
            worker_index: hello.worker_index,
            drain_timeout: hello.drain_timeout,
            listeners: self.listeners,
            app_files: self.app_files,
            log_filter: self.log_filter,
            traceparent: self.traceparent,
            handover: hello.handover,
        }
    }
}
