//! The control channel: one `SOCK_SEQPACKET` socket carrying protocol
//! messages and, with `SCM_RIGHTS`, listener fds.
//!
//! Used by the master towards its workers, its keeper and the new master of
//! a binary upgrade, and by the SDK. The socket is non-blocking and driven
//! by tokio; sends never wait for the peer (the master must never block on a
//! worker), they fail with [`ChannelError::Full`] instead.

use crate::protocol::{self, DecodeError, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::unix::AsyncFd;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A system call on the channel failed.
    #[error("control channel: {0}")]
    Io(std::io::Error),
    /// The peer's socket buffer is full; the message was not sent.
    #[error("control channel: peer is not reading (send buffer full)")]
    Full,
    /// More fds were offered than one message may carry.
    #[error("control channel: {0} fds in one message, the limit is {MAX_FDS_PER_MESSAGE}")]
    TooManyFds(usize),
    /// A message was larger than the receive buffer (`MSG_TRUNC`).
    #[error("control channel: message larger than {MAX_MESSAGE_SIZE} bytes")]
    MessageTruncated,
    /// The message could not be decoded.
    #[error("control channel: {0}")]
    Decode(#[from] DecodeError),
}

impl From<std::io::Error> for ChannelError {
    fn from(e: std::io::Error) -> Self {
        ChannelError::Io(e)
    }
}

impl ChannelError {
    /// Whether the peer is gone (its end closed or reset).
    pub fn is_peer_gone(&self) -> bool {
        matches!(self, ChannelError::Io(e) if matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ))
    }
}

/// One end of a control channel.
#[derive(Debug)]
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

/// A received message with the fds it carried.
#[derive(Debug)]
pub struct Received<T> {
    /// The decoded message.
    pub message: T,
    /// The fds, close-on-exec, owned.
    pub fds: Vec<OwnedFd>,
    /// The kernel could not pass every fd the message carried (`MSG_CTRUNC`:
    /// this process is at its fd limit): those that did arrive were closed
    /// and `fds` is empty. The message is delivered all the same, so that
    /// the receiver can answer it (refuse a handover, say).
    pub fds_truncated: bool,
}

/// Creates a connected pair of blocking, close-on-exec `SOCK_SEQPACKET`
/// sockets: one for the master, one for the worker.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

impl Channel {
    /// Wraps a `SOCK_SEQPACKET` socket; makes it non-blocking. Must be called
    /// inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> std::io::Result<Channel> {
        set_nonblocking(fd.as_fd())?;
        // SAFETY: the `OwnedFd` is open, moves into the `AsyncFd` and stays
        // there, unchanged, until the `AsyncFd` is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Channel { fd })
    }

    /// Sends one message with up to [`MAX_FDS_PER_MESSAGE`] fds without
    /// waiting: a full peer buffer is [`ChannelError::Full`].
    pub fn try_send<T: Serialize>(
        &self,
        message: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        send_raw(self.fd.get_ref().as_fd(), &protocol::encode(message), fds)
    }

    /// Sends one message, waiting while the peer's buffer is full.
    pub async fn send<T: Serialize>(&self, message: &T) -> Result<(), ChannelError> {
        let bytes = protocol::encode(message);
        loop {
            let mut guard = self.fd.writable().await?;
            match send_raw(self.fd.get_ref().as_fd(), &bytes, &[]) {
                Err(ChannelError::Full) => guard.clear_ready(),
                other => return other,
            }
        }
    }

    /// Receives a message already queued, without waiting: `Ok(None)` when
    /// there is none (or the peer is gone).
    pub fn try_recv<T: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Option<Received<T>>, ChannelError> {
        match recv_raw(self.fd.get_ref().as_fd()) {
            Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.is_peer_gone() => Ok(None),
            Err(e) => Err(e),
            Ok(None) => Ok(None),
            Ok(Some(raw)) => Ok(Some(Received {
                message: protocol::decode(&raw.bytes)?,
                fds: raw.fds,
                fds_truncated: raw.fds_truncated,
            })),
        }
    }

    /// Receives one message; `Ok(None)` at end of file (the peer is gone).
    pub async fn recv<T: for<'de> Deserialize<'de>>(
        &self,
    ) -> Result<Option<Received<T>>, ChannelError> {
        loop {
            let mut guard = self.fd.readable().await?;
            match recv_raw(self.fd.get_ref().as_fd()) {
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready()
                }
                Err(e) => return Err(e),
                Ok(None) => return Ok(None),
                Ok(Some(raw)) => {
                    return Ok(Some(Received {
                        message: protocol::decode(&raw.bytes)?,
                        fds: raw.fds,
                        fds_truncated: raw.fds_truncated,
                    }));
                }
            }
        }
    }
}

/// One end of a control channel driven by blocking calls, for workers
/// without an async runtime (the SDK's blocking worker). Safe to use
/// from several threads at once: one may wait in [`recv`](Self::recv) while
/// another sends.
#[derive(Debug)]
pub struct BlockingChannel {
    fd: OwnedFd,
}

impl BlockingChannel {
    /// Wraps a `SOCK_SEQPACKET` socket; makes it non-blocking (waits are
    /// `poll(2)`s, so that sends never block behind a receive).
    pub fn new(fd: OwnedFd) -> std::io::Result<BlockingChannel> {
        set_nonblocking(fd.as_fd())?;
        Ok(BlockingChannel { fd })
    }

    /// Sends one message without waiting: a full peer buffer is
    /// [`ChannelError::Full`].
    pub fn try_send<T: Serialize>(&self, message: &T) -> Result<(), ChannelError> {
        send_raw(self.fd.as_fd(), &protocol::encode(message), &[])
    }

    /// Sends one message, waiting while the peer's buffer is full.
    pub fn send<T: Serialize>(&self, message: &T) -> Result<(), ChannelError> {
        let bytes = protocol::encode(message);
        loop {
            match send_raw(self.fd.as_fd(), &bytes, &[]) {
                Err(ChannelError::Full) => wait_for(self.fd.as_fd(), PollFlags::POLLOUT, None)?,
                other => return other,
            }
        }
    }

    /// Receives one message, waiting at most `timeout` (forever with
    /// `None`): `Ok(None)` at end of file (the peer is gone), an error of
    /// kind `TimedOut` when the time ran out.
    pub fn recv<T: for<'de> Deserialize<'de>>(
        &self,
        timeout: Option<std::time::Duration>,
    ) -> Result<Option<Received<T>>, ChannelError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            match recv_raw(self.fd.as_fd()) {
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left =
                        deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
                    wait_for(self.fd.as_fd(), PollFlags::POLLIN, left)?;
                }
                Err(e) if e.is_peer_gone() => return Ok(None),
                Err(e) => return Err(e),
                Ok(None) => return Ok(None),
                Ok(Some(raw)) => {
                    return Ok(Some(Received {
                        message: protocol::decode(&raw.bytes)?,
                        fds: raw.fds,
                        fds_truncated: raw.fds_truncated,
                    }));
                }
            }
        }
    }
}

/// Waits until `fd` is ready for `events` (or hung up), at most `timeout`.
fn wait_for(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    timeout: Option<std::time::Duration>,
) -> Result<(), ChannelError> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
    };
    loop {
        match poll(&mut [PollFd::new(fd, events)], timeout) {
            Ok(0) => return Err(ChannelError::Io(std::io::ErrorKind::TimedOut.into())),
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ChannelError::Io(e.into())),
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn send_raw(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(ChannelError::TooManyFds(fds.len()));
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(bytes)];
    // MSG_NOSIGNAL: a vanished peer is an EPIPE error, not a SIGPIPE.
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, flags, None) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EAGAIN) => Err(ChannelError::Full),
        Err(e) => Err(ChannelError::Io(e.into())),
    }
}

struct RawMessage {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
}

fn recv_raw(fd: BorrowedFd<'_>) -> Result<Option<RawMessage>, ChannelError> {
    // The datagram's size first, so that the frequent small messages do not
    // cost a zeroed buffer of MAX_MESSAGE_SIZE each. A larger one gets
    // MAX_MESSAGE_SIZE and is reported as truncated below.
    let size = nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut [],
        MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(|e| ChannelError::Io(e.into()))?;
    let mut buf = vec![0u8; size.clamp(1, MAX_MESSAGE_SIZE)];
    let (len, fds, flags) = recv_with_fds(fd, &mut buf)?;
    // Whatever fds arrived are owned above and closed on any error return.
    let fds_truncated = flags & libc::MSG_CTRUNC != 0;
    let fds = if fds_truncated { Vec::new() } else { fds };
    if flags & libc::MSG_TRUNC != 0 {
        return Err(ChannelError::MessageTruncated);
    }
    if len == 0 && fds.is_empty() && !fds_truncated {
        // End of file, or an empty datagram from a peer still there.
        if peer_hung_up(fd)? {
            return Ok(None);
        }
        return Err(DecodeError::NotAMessage("empty message".into()).into());
    }
    buf.truncate(len);
    Ok(Some(RawMessage {
        bytes: buf,
        fds,
        fds_truncated,
    }))
}

/// `recvmsg(2)` into `buf`: the bytes received, the fds that came with them
/// (owned), and the message flags. By hand rather than with nix, whose
/// control-message iterator refuses a message flagged `MSG_CTRUNC`: the fds
/// the kernel did install before reaching this process's fd limit must be
/// owned (and closed) too, not leaked.
fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>, libc::c_int), ChannelError> {
    // Room for one fd more than a message may carry.
    let fds_len = (std::mem::size_of::<RawFd>() * (MAX_FDS_PER_MESSAGE + 1)) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fds_len) } as usize;
    // u64 words: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control.len() * 8) as _;
    // MSG_CMSG_CLOEXEC: received fds are never inherited by accident.
    let flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both alive
    // and as large as the lengths given.
    let received = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if received < 0 {
        return Err(ChannelError::Io(std::io::Error::last_os_error()));
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg.msg_controllen`; the
    // CMSG_* macros walk the headers within it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header CMSG_FIRSTHDR/NXTHDR found in `control`.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN(0) is the header's own length.
            let (data, empty) = unsafe { (libc::CMSG_DATA(cmsg), libc::CMSG_LEN(0) as usize) };
            let count =
                (header.cmsg_len as usize).saturating_sub(empty) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: the header's length says `count` fds follow it.
                let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel just installed this fd in our table for
                // us; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((received as usize, fds, msg.msg_flags))
}

/// Whether the peer has closed its end: the kernel then shuts the socket
/// down both ways, which `poll` reports as `POLLHUP`.
fn peer_hung_up(fd: BorrowedFd<'_>) -> Result<bool, ChannelError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).map_err(|e| ChannelError::Io(e.into()))?;
    let events = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(events.contains(PollFlags::POLLHUP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MasterMessage, WorkerMessage};

    #[tokio::test]
    async fn messages_and_fds_cross_the_channel() {
        let (a, b) = pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let files: Vec<OwnedFd> = (0..MAX_FDS_PER_MESSAGE)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        a.try_send(&MasterMessage::Drain { deadline_ms: 5 }, &borrowed)
            .unwrap();
        let got = b.recv::<MasterMessage>().await.unwrap().unwrap();
        assert_eq!(got.message, MasterMessage::Drain { deadline_ms: 5 });
        assert_eq!(got.fds.len(), MAX_FDS_PER_MESSAGE);
        for fd in &got.fds {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(
                flags & libc::FD_CLOEXEC,
                0,
                "received fds are close-on-exec"
            );
        }
        b.send(&WorkerMessage::Ready).await.unwrap();
        let got = a.recv::<WorkerMessage>().await.unwrap().unwrap();
        assert_eq!(got.message, WorkerMessage::Ready);
        drop(b);
        assert!(a.recv::<WorkerMessage>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn too_many_fds_is_refused_before_sending() {
        let (a, _b) = pair().unwrap();
        let a = Channel::new(a).unwrap();
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fds = vec![file.as_fd(); MAX_FDS_PER_MESSAGE + 1];
        assert!(matches!(
            a.try_send(&WorkerMessage::Ready, &fds),
            Err(ChannelError::TooManyFds(_))
        ));
    }

    #[tokio::test]
    async fn messages_up_to_the_limit_arrive_whole_and_larger_ones_are_refused() {
        let (a, b) = pair().unwrap();
        let a = Channel::new(a).unwrap();
        let fits = vec![b'x'; MAX_MESSAGE_SIZE];
        send_raw(b.as_fd(), &fits, &[]).unwrap();
        a.fd.readable().await.unwrap().clear_ready();
        let raw = recv_raw(a.fd.get_ref().as_fd()).unwrap().unwrap();
        assert_eq!(raw.bytes, fits);
        send_raw(b.as_fd(), &vec![b'x'; MAX_MESSAGE_SIZE + 1], &[]).unwrap();
        assert!(matches!(
            recv_raw(a.fd.get_ref().as_fd()),
            Err(ChannelError::MessageTruncated)
        ));
    }

    #[tokio::test]
    async fn garbage_from_the_peer_is_an_error() {
        let (a, b) = pair().unwrap();
        let a = Channel::new(a).unwrap();
        send_raw(b.as_fd(), b"\x00garbage", &[]).unwrap();
        assert!(matches!(
            a.recv::<WorkerMessage>().await,
            Err(ChannelError::Decode(_))
        ));
    }
}
