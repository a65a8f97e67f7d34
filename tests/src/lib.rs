//! End-to-end test support for baton: the harness that runs the real
//! binaries, and the strict HTTP/1.1 and HTTP/2 load clients.
#![forbid(unsafe_code)]

pub mod crowd;
pub mod h2load;
pub mod harness;
pub mod http2;
pub mod keepalive;
pub mod load;
pub mod otlp;
pub mod tools;

/// The Rust snippets of the README and of every page under `docs/` (listed
/// by `build.rs`), compiled as doc tests (`cargo test --doc -p baton-tests`)
/// so that none of them goes stale.
#[cfg(doctest)]
pub mod docs {
    include!(concat!(env!("OUT_DIR"), "/doc_pages.rs"));
}
