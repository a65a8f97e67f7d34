//! Scaling the current generation (`baton scale`, SIGTTIN, SIGTTOU).

use serde::Serialize;

/// The most workers a generation may have.
pub const MAX_PROCESSES: i64 = 1024;

/// A worker count chosen by `baton scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleOverride {
    /// The chosen count.
    pub processes: u32,
    /// The config's `processes` when it was chosen: a reload to a config
    /// that changes `processes` drops the override.
    pub config_processes: u32,
}

/// How to change the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleChange {
    /// Add (or, negative, remove) workers.
    By(i64),
    /// Set the count.
    To(i64),
}

/// What a scale did.
#[derive(Debug, Clone, Serialize)]
pub struct Scaled {
    /// The current generation.
    pub generation: u64,
    /// Its worker count before.
    pub from: u32,
    /// Its worker count now.
    pub processes: u32,
}
