//! The SDK's one error type.

use crate::ListenerKind;
use baton_wire::channel::ChannelError;
use baton_wire::protocol::{DecodeError, CONTROL_FD_ENV, PROTOCOL_VERSION};

/// What can go wrong for a worker: every fallible call of the SDK returns
/// it, and its message names the listener, address or variable concerned.
///
/// ```no_run
/// # async fn run() {
/// use baton_worker::{Error, Worker};
///
/// match Worker::builder().listener("http", "127.0.0.1:8080").start().await {
///     Ok(worker) => { /* serve */ }
///     Err(Error::Bind { address, source, .. }) => {
///         eprintln!("cannot listen on {address} ({source}): is another copy running?");
///     }
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `BATON_CONTROL_FD` does not name an open `SOCK_SEQPACKET` socket.
    #[error("{CONTROL_FD_ENV}={0:?} does not name an open SOCK_SEQPACKET socket")]
    BadControlFd(String),
    /// The control channel to the master failed; its kind is `BrokenPipe`
    /// or `ConnectionReset` when the master is gone.
    #[error(transparent)]
    Channel(std::io::Error),
    /// The master speaks another protocol version.
    #[error(
        "the master speaks protocol version {master}, this SDK speaks version {PROTOCOL_VERSION}"
    )]
    Version {
        /// The master's version.
        master: u32,
    },
    /// The master sent something out of order or inconsistent.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A received fd is not the socket its metadata describes.
    #[error("listener `{name}`: expected {expected}, the fd is {found}")]
    ListenerMismatch {
        /// Listener name.
        name: String,
        /// What the metadata said.
        expected: String,
        /// What the fd is.
        found: String,
    },
    /// No listener of that name was received or declared (or it was taken).
    #[error("no listener named `{0}`")]
    NoSuchListener(String),
    /// The listener exists but is of another kind.
    #[error("listener `{name}` is {kind}, not {wanted}")]
    WrongKind {
        /// Listener name.
        name: String,
        /// Its kind.
        kind: ListenerKind,
        /// The kind asked for.
        wanted: ListenerKind,
    },
    /// Binding a standalone listener failed.
    #[error("binding listener `{name}` on {address}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// The address.
        address: String,
        /// The bind error.
        source: std::io::Error,
    },
    /// Another I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The application's configuration could not be built.
    #[error("app config: {0}")]
    AppConfig(String),
}

impl Error {
    /// The control channel's failure: a master of another version is
    /// [`Error::Version`]; anything else is [`Error::Channel`], an
    /// `io::Error` whose message says it is the control channel.
    pub(crate) fn channel(error: ChannelError) -> Error {
        let kind = match &error {
            ChannelError::Decode(DecodeError::Version { peer }) => {
                return Error::Version { master: *peer }
            }
            ChannelError::Io(e) => e.kind(),
            ChannelError::Full => std::io::ErrorKind::WouldBlock,
            ChannelError::Decode(_) | ChannelError::MessageTruncated => {
                std::io::ErrorKind::InvalidData
            }
            ChannelError::TooManyFds(_) => std::io::ErrorKind::Other,
        };
        Error::Channel(std::io::Error::new(kind, error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_failure_keeps_its_kind_and_says_it_is_the_control_channel() {
        let broken = ChannelError::Io(std::io::ErrorKind::BrokenPipe.into());
        let Error::Channel(e) = Error::channel(broken) else {
            panic!("not a channel error");
        };
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(e.to_string().starts_with("control channel: "), "{e}");
        let other = Error::channel(ChannelError::Decode(DecodeError::Version { peer: 7 }));
        assert!(matches!(other, Error::Version { master: 7 }), "{other:?}");
    }
}
