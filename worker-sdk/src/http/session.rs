//! What a long-lived session (a WebSocket, see [`ws`](super::ws)) is made of
//! below its protocol: its socket, taken out of hyper after the upgrade or
//! adopted from another worker, with the bytes already read from it and what
//! it needs to move on at the next drain.
//!
//! Present with the `http` feature so that the serve loop and the handover
//! hub can carry sessions; only the `ws` feature speaks WebSocket on them.
#![cfg_attr(not(feature = "ws"), allow(dead_code))]

use super::registry::{Counted, DrainNotice};
use super::rewind::Rewind;
use super::Accept;
use crate::handover::Handover;
use crate::Drain;
use hyper::body::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

/// A connected socket of either family a listener hands out, as tokio
/// drives it.
pub(crate) type FdStream = Either<TcpStream, UnixStream>;

/// The stream of a connected socket (non-blocking from here on).
pub(crate) fn fd_stream(fd: OwnedFd) -> io::Result<FdStream> {
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(io::Error::from)?
        .family();
    if family == Some(AddressFamily::Unix) {
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(Either::Right(UnixStream::from_std(stream)?))
    } else {
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        Ok(Either::Left(TcpStream::from_std(stream)?))
    }
}

/// The socket under a stream.
pub(crate) fn socket_of(stream: &FdStream) -> BorrowedFd<'_> {
    match stream {
        Either::Left(tcp) => tcp.as_fd(),
        Either::Right(unix) => unix.as_fd(),
    }
}

/// A session's socket that can move to another worker, and what moving it
/// takes.
pub(crate) struct Raw {
    /// The socket, counted among the server's connections.
    pub(crate) socket: Counted<FdStream>,
    /// Bytes read from it that the session has not seen yet.
    pub(crate) pending: Bytes,
    /// The worker's drain: a session moves when it starts.
    pub(crate) drain: Drain,
    /// The connection's own turn in the close spread, for a session that
    /// ends up not moving.
    pub(crate) notice: DrainNotice,
    /// The worker's handovers.
    pub(crate) handover: Handover,
    /// The listener's address, under which the session is handed over.
    pub(crate) address: Arc<str>,
}

/// A stream a session is spoken on.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<I: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for I {}

/// What an upgraded connection turns into.
pub(crate) enum Taken {
    /// A socket that can move.
    Moving(Raw),
    /// A stream that cannot, with the bytes read from it already.
    Staying(Box<dyn Io>, Bytes),
    /// Nothing: the socket could not be kept.
    Lost,
}

/// Turns an upgraded connection back into its socket, for a listener whose
/// connections move: put in every request's extensions by the server, and
/// taken by the session's upgrade.
#[derive(Clone)]
pub(crate) struct SessionKit(Arc<dyn Fn(Upgraded) -> Taken + Send + Sync>);

impl SessionKit {
    /// The kit of a listener of type `L` served with `drain`, whose
    /// connections move through `handover` under `address`.
    pub(super) fn new<L: Accept>(
        drain: Drain,
        handover: Handover,
        address: Arc<str>,
    ) -> SessionKit {
        SessionKit(Arc::new(move |upgraded| {
            let parts = match upgraded.downcast::<TokioIo<Rewind<Counted<L::Io>>>>() {
                Ok(parts) => parts,
                Err(upgraded) => {
                    return Taken::Staying(Box::new(TokioIo::new(upgraded)), Bytes::new())
                }
            };
            let (left, counted) = parts.io.into_inner().into_parts();
            let pending = if left.is_empty() {
                parts.read_buf
            } else {
                [left, parts.read_buf].concat().into()
            };
            let (io, registration) = counted.into_parts();
            let fd = match L::release(io) {
                Ok(fd) => fd,
                // It stays where it is.
                Err(io) => {
                    return Taken::Staying(Box::new(Counted::new(io, registration)), pending)
                }
            };
            // Only fails when the runtime cannot take the socket: it closes.
            let Ok(stream) = fd_stream(fd) else {
                return Taken::Lost;
            };
            Taken::Moving(Raw {
                notice: registration.notice(drain.clone()),
                socket: Counted::new(stream, registration),
                pending,
                drain: drain.clone(),
                handover: handover.clone(),
                address: address.clone(),
            })
        }))
    }

    /// What `upgraded` turns into.
    pub(crate) fn take(&self, upgraded: Upgraded) -> Taken {
        (self.0)(upgraded)
    }
}

/// Starts the app's handler for a session adopted from another worker, with
/// the state the app gave for it there.
pub(crate) type Resume =
    Arc<dyn Fn(Raw, Vec<u8>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;
