//! What a QUIC connection ID issued by an SDK worker looks like to the
//! master's steering program: both sides read it from here.
//!
//! `[slot, MARK[0], MARK[1], MARK[2], random...]`: the slot names the
//! worker's socket in its port's group (1 to 255, see
//! [`crate::protocol::ListenerInfo::quic_slot`]), and the mark tells an ID
//! the server issued from one a client chose at random for its first
//! Initial packets. A client's later Initial and 0-RTT packets carry the
//! server's ID (RFC 9000 section 7.2), and must reach the worker that
//! answered even when a reload has made another generation current in the
//! meantime; its first ones carry a random ID, which goes to the current
//! generation. A random ID passes for a worker's once in 2^24 times (and
//! only while its slot is in use): that client's connection starts on the
//! worker the slot names.

/// The three bytes after the slot in every connection ID an SDK worker
/// issues.
pub const ID_MARK: [u8; 3] = [0xba, 0x70, 0x4e];
