//! Where connections come from: a listening socket, and optionally a
//! handshake (TLS, say) that turns an accepted stream into the one HTTP is
//! spoken on.

use std::future::{ready, Future};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A listener [`serve`](super::serve) accepts connections from.
///
/// Implemented for tokio's [`TcpListener`] and [`UnixListener`], and for
/// [`WithAcceptor`], which adds a handshake such as TLS.
///
/// Implemented here for the listeners [`Worker`](crate::Worker) hands out;
/// a function generic over what [`serve`](super::serve) accepts:
///
/// ```no_run
/// use baton_worker::http::{Accept, ServeOptions};
///
/// async fn serve_hello(listener: impl Accept, drain: baton_worker::Drain) -> std::io::Result<()> {
///     let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
///     baton_worker::http::serve_tower(listener, app, drain, ServeOptions::default()).await
/// }
/// ```
pub trait Accept: Send + 'static {
    /// What `accept` returns.
    type Stream: Send + 'static;
    /// What HTTP is spoken on, once the handshake is done.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Accepts the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send + '_;

    /// Turns an accepted stream into the one HTTP is spoken on. Runs in the
    /// connection's own task, so a slow handshake never holds up `accept`.
    fn handshake(
        &self,
        stream: Self::Stream,
    ) -> impl Future<Output = io::Result<Self::Io>> + Send + 'static;

    /// The address connections are handed over under at a reload: the
    /// listening socket's own (`IP:PORT`, or a Unix socket's path), the same
    /// in every generation. `None` (the default) for a listener whose
    /// connections cannot move to another process, such as one behind a TLS
    /// acceptor (the session's keys live in this process).
    fn handover_address(&self) -> Option<String> {
        None
    }

    /// The socket of a connection, to hand it over; `Err` gives the stream
    /// back when it cannot move. Only called when
    /// [`handover_address`](Accept::handover_address) is `Some`.
    fn release(io: Self::Io) -> Result<OwnedFd, Self::Io> {
        Err(io)
    }

    /// A connection's stream from its socket: one handed over by another
    /// worker, or one this worker offered and got back. Only called when
    /// [`handover_address`](Accept::handover_address) is `Some`.
    fn restore(fd: OwnedFd) -> io::Result<Self::Io> {
        drop(fd);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this listener's connections are not handed over",
        ))
    }
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    type Io = TcpStream;

    async fn accept(&self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Responses are written whole; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    fn handshake(
        &self,
        stream: TcpStream,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send + 'static {
        ready(Ok(stream))
    }

    fn handover_address(&self) -> Option<String> {
        self.local_addr().ok().map(|a| a.to_string())
    }

    fn release(io: TcpStream) -> Result<OwnedFd, TcpStream> {
        release(io)
    }

    fn restore(fd: OwnedFd) -> io::Result<TcpStream> {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        let stream = TcpStream::from_std(std)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Ok(UnixListener::accept(self).await?.0)
    }

    fn handshake(
        &self,
        stream: UnixStream,
    ) -> impl Future<Output = io::Result<UnixStream>> + Send + 'static {
        ready(Ok(stream))
    }

    fn handover_address(&self) -> Option<String> {
        let address = self.local_addr().ok()?;
        Some(address.as_pathname()?.display().to_string())
    }

    fn release(io: UnixStream) -> Result<OwnedFd, UnixStream> {
        release(io)
    }

    fn restore(fd: OwnedFd) -> io::Result<UnixStream> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        UnixStream::from_std(std)
    }
}

/// A copy of `io`'s socket, `io` itself dropped (its fd closed and its
/// registration with the runtime gone; the socket lives on in the copy), or
/// `io` back when no fd is left for the copy.
fn release<T: AsFd>(io: T) -> Result<OwnedFd, T> {
    match io.as_fd().try_clone_to_owned() {
        Ok(fd) => Ok(fd),
        Err(_) => Err(io),
    }
}

/// A listener whose connections go through `acceptor` before HTTP is spoken
/// on them; made by [`with_acceptor`].
///
/// ```no_run
/// # async fn run(mut worker: baton_worker::Worker, tls: tokio_rustls::TlsAcceptor, app: axum::Router) -> Result<(), baton_worker::Error> {
/// use baton_worker::http::{with_acceptor, WithAcceptor};
///
/// let listener = worker.tcp_listener("https")?;
/// let listener: WithAcceptor<_, _> = with_acceptor(listener, move |stream| tls.accept(stream));
/// worker.ready().await?;
/// baton_worker::http::serve_tower(listener, app, worker.drain(), worker.serve_options()).await?;
/// # Ok(()) }
/// ```
pub struct WithAcceptor<L, F> {
    listener: L,
    acceptor: Arc<F>,
}

/// Runs every connection accepted from `listener` through `acceptor` (a TLS
/// handshake, typically) before serving HTTP on what it returns. The SDK does
/// not pick a TLS stack: with `tokio-rustls` (the whole program is in
/// `examples/tls`),
///
/// ```no_run
/// # async fn run(mut worker: baton_worker::Worker, server_config: rustls::ServerConfig, app: axum::Router) -> Result<(), baton_worker::Error> {
/// use baton_worker::http::with_acceptor;
/// use std::sync::Arc;
///
/// let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
/// let listener = with_acceptor(worker.tcp_listener("https")?, move |stream| tls.accept(stream));
/// worker.ready().await?;
/// baton_worker::http::serve_tower(listener, app, worker.drain(), worker.serve_options()).await?;
/// # Ok(()) }
/// ```
///
/// Offer `h2` and `http/1.1` by ALPN in the server config: the server tells
/// HTTP/2 from HTTP/1.1 by the first bytes the client sends, so both work.
/// A connection whose handshake fails or outlasts
/// [`ServeOptions::header_read_timeout`](super::ServeOptions::header_read_timeout)
/// is dropped.
pub fn with_acceptor<L, F, Fut, Io>(listener: L, acceptor: F) -> WithAcceptor<L, F>
where
    L: Accept,
    F: Fn(L::Io) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    WithAcceptor {
        listener,
        acceptor: Arc::new(acceptor),
    }
}

impl<L, F, Fut, Io> Accept for WithAcceptor<L, F>
where
    L: Accept,
    F: Fn(L::Io) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = L::Stream;
    type Io = Io;

    fn accept(&self) -> impl Future<Output = io::Result<L::Stream>> + Send + '_ {
        self.listener.accept()
    }

    fn handshake(
        &self,
        stream: L::Stream,
    ) -> impl Future<Output = io::Result<Io>> + Send + 'static {
        let inner = self.listener.handshake(stream);
        let acceptor = self.acceptor.clone();
        async move { acceptor(inner.await?).await }
    }
}
