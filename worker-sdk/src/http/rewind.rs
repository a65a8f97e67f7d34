//! The stream an HTTP/1.1 connection is served on, such that it can stop
//! being served without being closed: bytes already read are replayed first
//! ([`Rewind`]: those read to tell HTTP/2 from HTTP/1.1, or that came with a
//! connection handed over), and hyper's shutdown of the socket can be held
//! back so that the connection ends between two requests with its
//! socket intact.

use hyper::body::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose first reads return `prefix`, and whose shutdown does
/// nothing while held: hyper shuts the socket down when a connection ends,
/// and a connection ended to be handed over must reach the next worker as it
/// was.
pub(super) struct Rewind<I> {
    prefix: Bytes,
    io: I,
    held: Arc<AtomicBool>,
}

impl<I> Rewind<I> {
    pub(super) fn new(prefix: Bytes, io: I) -> Rewind<I> {
        Rewind {
            prefix,
            io,
            held: Arc::default(),
        }
    }

    /// The switch that holds its shutdown back.
    pub(super) fn hold(&self) -> Arc<AtomicBool> {
        self.held.clone()
    }

    /// The stream, and what of the prefix was not read.
    pub(super) fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.io)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_read_first_and_what_is_left_of_it_comes_back() {
        let (client, server) = tokio::io::duplex(64);
        let mut client = client;
        client.write_all(b" world").await.unwrap();
        let mut rewind = Rewind::new(Bytes::from_static(b"hello"), server);
        let mut first = [0u8; 3];
        rewind.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hel");
        let (left, _) = rewind.into_parts();
        assert_eq!(&left[..], b"lo");
    }

    #[tokio::test]
    async fn a_held_shutdown_leaves_the_stream_open() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut hold = Rewind::new(Bytes::new(), server);
        let held = hold.hold();
        held.store(true, Ordering::Release);
        hold.shutdown().await.unwrap();
        hold.write_all(b"still here").await.unwrap();
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still here");
        held.store(false, Ordering::Release);
        hold.shutdown().await.unwrap();
        assert_eq!(client.read(&mut got).await.unwrap(), 0, "end of stream");
    }
}
