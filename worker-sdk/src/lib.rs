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
//!
//! What a worker calls:
//!
//! - [`Worker`] (made by a [`Builder`]): listeners by name, readiness,
//!   [`Drain`] and [`Reopen`] requests, connection reports;
//!   [`Worker::app_config`] gives an [`AppConfig`] handle that in-place
//!   reloads swap from new [`Files`].
//! - [`http`] (feature `http`, on by default): HTTP/1.1 and HTTP/2 serving
//!   that drains without failing a request; [`Worker::serve`] in one call.
//! - [`ws`] (feature `ws`): WebSocket sessions that move to the next
//!   generation at a reload, with the app's state.
//! - `logging` (feature `tracing`): a log filter that reloads in place.
//! - [`blocking`]: the same for std programs without an async runtime.
//! - [`traceparent`] and [`config_hash`]: what the worker's environment
//!   says of the reload that started it.
//!
//! The protocol between the master and this SDK is the `baton-wire` crate,
//! which a worker never needs.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod app_config;
pub mod blocking;
mod context;
mod control;
mod drain;
mod error;
mod handover;
mod handshake;
#[cfg(feature = "http")]
pub mod http;
mod listener;
#[cfg(feature = "tracing")]
pub mod logging;
#[cfg(feature = "quic")]
pub mod quic;
mod reopen;
mod standalone;
mod worker;

pub use app_config::{AppConfig, Files};
pub use baton_wire::protocol::{ListenerInfo, ListenerKind};
pub use context::{config_hash, traceparent};
pub use drain::Drain;
pub use error::Error;
#[cfg(feature = "ws")]
pub use http::ws;
pub use reopen::Reopen;
pub use worker::{Builder, Worker};
