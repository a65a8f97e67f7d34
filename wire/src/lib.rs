//! `baton-wire`: the protocol between the baton master and the processes it
//! talks to over a control channel. **Not for worker authors**: a worker
//! links [`baton-worker`](../baton_worker/index.html), whose API hides all
//! of this; the master (`supervisor/`) and the SDK (`worker-sdk/`) depend on
//! this crate so that the protocol has one definition, and both always come
//! from the same commit.
//!
//! - [`protocol`]: the master–worker messages, their versioned JSON
//!   encoding (decoding never panics on bad bytes), listener metadata and
//!   the environment variables a worker is started with.
//! - [`channel`]: one `SOCK_SEQPACKET` socket carrying those messages and,
//!   by `SCM_RIGHTS`, fds; the master also uses it towards its keeper and
//!   towards the new master of a binary upgrade.
//! - [`listener`]: checking that a received fd is the socket its metadata
//!   describes, and describing a bound address in the protocol's notation.
//! - [`app_files`]: the sealed memfd that carries `[worker] app_config`
//!   files with an `app_files` message.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod app_files;
pub mod channel;
pub mod listener;
pub mod protocol;
pub mod quic;
