//! `baton-worker`: the library a worker links to run under the baton
//! hot-restart supervisor (this repository's `supervisor/`).
//!
//! Neither crate is published on crates.io: depend on the SDK by path (a
//! clone of the repository) or by git, and on tokio with the features
//! `#[tokio::main]` needs:
//!
//! ```toml
//! [dependencies]
//! baton-worker = { path = "../baton/worker-sdk" }  # or { git = "URL of the baton repository" }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! ```no_run
//! # async fn run() -> Result<(), baton_worker::Error> {
//! let mut worker = baton_worker::Worker::builder()
//!     .listener("http", "127.0.0.1:8080") // used only when run standalone
//!     .start()
//!     .await?;
//! let listener = worker.tcp_listener("http")?;
//! worker.ready().await?;
//! let drain = worker.drain();
//! loop {
//!     tokio::select! {
//!         _ = drain.wait() => break,
//!         conn = listener.accept() => { let _ = conn?; /* serve it */ }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Under baton the worker receives its listeners over the control channel
//! named by `BATON_CONTROL_FD`; standalone it takes systemd socket-activation
//! fds or binds the addresses it declares, so one binary serves in
//! development and in production.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod app_config;
pub mod blocking;
pub mod channel;
mod context;
mod drain;
mod handshake;
#[cfg(feature = "http")]
pub mod http;
mod listener;
#[cfg(feature = "tracing")]
pub mod logging;
pub mod protocol;
mod reopen;
mod standalone;
mod worker;

pub use app_config::{AppConfig, Files};
pub use context::{config_hash, traceparent};
pub use drain::Drain;
pub use listener::{describe as describe_address, verify as verify_listener};
pub use protocol::{DecodeError, ListenerInfo, ListenerKind};
pub use reopen::Reopen;
pub use worker::{Builder, Worker};

/// What can go wrong for a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `BATON_CONTROL_FD` does not name an open `SOCK_SEQPACKET` socket.
    #[error("{env}={0:?} does not name an open SOCK_SEQPACKET socket", env = protocol::CONTROL_FD_ENV)]
    BadControlFd(String),
    /// The control channel failed.
    #[error(transparent)]
    Channel(#[from] channel::ChannelError),
    /// The master speaks another protocol version.
    #[error(
        "the master speaks protocol version {master}, this SDK speaks version {}",
        protocol::PROTOCOL_VERSION
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
