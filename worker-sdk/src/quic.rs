//! QUIC through [quinn](https://docs.rs/quinn): an endpoint on a UDP
//! listener whose connection IDs keep reaching this worker across reloads.
//!
//! With `quic = true` on a UDP listener, every worker gets a socket of its
//! own on the port, with a **slot** (1 to 255) the master steers to: the
//! port's reuseport program sends each datagram whose destination
//! connection ID starts with a slot to the socket that has it, and Initial
//! packets (new connections) to the current generation. So a draining
//! worker keeps every datagram of its connections while the next
//! generation takes the new ones. [`SlotConnectionIds`] issues such IDs;
//! [`endpoint`] builds a `quinn::Endpoint` with it on the listener's
//! socket.
//!
//! A drain ends as quinn users expect: [`accept`] takes no connection once
//! the worker drains, each connection tells its peer to go away (an
//! HTTP/3 GOAWAY, say) and ends when its peer is done, and [`drain`] waits
//! for that, closing what is left at the drain deadline.
//!
//! ```no_run
//! # async fn run(mut worker: baton_worker::Worker, server: quinn::ServerConfig) -> Result<(), baton_worker::Error> {
//! use baton_worker::quic;
//!
//! let endpoint = quic::endpoint(&mut worker, "h3", server)?;
//! worker.ready().await?;
//! let drain = worker.drain();
//! while let Some(incoming) = quic::accept(&endpoint, &drain).await {
//!     let drain = drain.clone();
//!     tokio::spawn(async move {
//!         let Ok(connection) = incoming.await else { return };
//!         tokio::select! {
//!             // Serve it; on drain, tell the peer to go away and serve on
//!             // until it closes the connection.
//!             _ = drain.wait() => {}
//!             _ = connection.closed() => {}
//!         }
//!     });
//! }
//! quic::drain(&endpoint, &drain, 0u32.into(), b"drain deadline").await;
//! # Ok(()) }
//! ```

use crate::{Drain, Error, ListenerKind, Worker};
use quinn::{ConnectionId, ConnectionIdGenerator};
use quinn_proto::InvalidCid;
use std::sync::Arc;
use std::time::Duration;

/// The shortest connection ID [`SlotConnectionIds`] issues: the slot byte,
/// the mark ([`baton_wire::quic::ID_MARK`]) and 4 random bytes.
pub const MIN_LEN: usize = 8;
/// The longest connection ID QUIC allows (RFC 9000, section 17.2).
pub const MAX_LEN: usize = 20;

/// Connection IDs whose first byte is this worker's slot, then the mark
/// that tells them from IDs a client chose ([`baton_wire::quic::ID_MARK`]),
/// and the rest random, as the master's steering program reads them.
#[derive(Debug, Clone, Copy)]
pub struct SlotConnectionIds {
    slot: u8,
    len: usize,
    lifetime: Option<Duration>,
}

impl SlotConnectionIds {
    /// IDs of `len` bytes (8 to 20) starting with `slot` (1 to 255).
    pub fn new(slot: u8, len: usize) -> Result<SlotConnectionIds, Error> {
        if slot == 0 {
            return Err(Error::Protocol("QUIC slot 0 names no socket".into()));
        }
        if !(MIN_LEN..=MAX_LEN).contains(&len) {
            return Err(Error::Protocol(format!(
                "QUIC connection IDs of {len} bytes: {MIN_LEN} to {MAX_LEN} are allowed"
            )));
        }
        Ok(SlotConnectionIds {
            slot,
            len,
            lifetime: None,
        })
    }

    /// Retires each ID after `lifetime` (quinn issues a new one).
    pub fn with_lifetime(mut self, lifetime: Duration) -> SlotConnectionIds {
        self.lifetime = Some(lifetime);
        self
    }

    /// The slot the IDs start with.
    pub fn slot(&self) -> u8 {
        self.slot
    }
}

impl ConnectionIdGenerator for SlotConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; MAX_LEN];
        bytes[0] = self.slot;
        bytes[1..4].copy_from_slice(&baton_wire::quic::ID_MARK);
        rand::fill(&mut bytes[4..self.len]);
        ConnectionId::new(&bytes[..self.len])
    }

    /// Whether `cid` could be one of this worker's: quinn drops a
    /// short-header packet for an unknown connection whose ID fails this
    /// instead of answering it with a stateless reset, so a datagram that
    /// reached the wrong worker (steering off, or a slot reused after its
    /// worker exited) costs nothing.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() == self.len
            && cid.first() == Some(&self.slot)
            && cid[1..4] == baton_wire::quic::ID_MARK
        {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        self.len
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

/// The `quinn::EndpointConfig` for a worker with `slot`: connection IDs
/// from [`SlotConnectionIds`] (8 bytes); without a slot (standalone, or a
/// listener without `quic = true`), quinn's defaults.
pub fn endpoint_config(slot: Option<u8>) -> Result<quinn::EndpointConfig, Error> {
    let mut config = quinn::EndpointConfig::default();
    if let Some(slot) = slot {
        let ids = SlotConnectionIds::new(slot, MIN_LEN)?;
        config.cid_generator(move || Box::new(ids));
    }
    Ok(config)
}

/// A quinn endpoint serving `server` on the UDP listener `name`, issuing
/// connection IDs with the listener's slot (see [`endpoint_config`]). Call
/// it within a tokio runtime.
pub fn endpoint(
    worker: &mut Worker,
    name: &str,
    server: quinn::ServerConfig,
) -> Result<quinn::Endpoint, Error> {
    let slot = worker
        .listeners()
        .find(|l| l.name == name && l.kind == ListenerKind::Udp)
        .and_then(|l| l.quic_slot);
    let socket = worker.udp_socket(name)?.into_std()?;
    let runtime = Arc::new(quinn::TokioRuntime);
    Ok(quinn::Endpoint::new(
        endpoint_config(slot)?,
        Some(server),
        socket,
        runtime,
    )?)
}

/// The next connection `endpoint` takes, or `None` once the worker
/// drains (or the endpoint is closed): the accept loop of a QUIC server.
/// A drain that has started already returns `None` at once.
pub async fn accept(endpoint: &quinn::Endpoint, drain: &Drain) -> Option<quinn::Incoming> {
    if drain.is_draining() {
        return None;
    }
    tokio::select! {
        biased;
        _ = drain.wait() => None,
        incoming = endpoint.accept() => incoming,
    }
}

/// Drains `endpoint` when the worker is told to (returns then, not
/// before): takes no new connection, waits until every open connection has
/// ended, and at the drain deadline closes those left with `code` and
/// `reason` (for HTTP/3, `H3_NO_ERROR`, `0x100`).
///
/// A client whose first packet reached this worker while its generation
/// was current, but which [`accept`] did not take before the drain (or
/// whose first packets still arrive), gets no answer rather than a refusal:
/// the master sends its next try to the new generation. (Standalone, the
/// client times out instead of being refused; the process is going away
/// either way.)
///
/// Telling each connection's peer to go away is the protocol's business,
/// in the connection's own task: an HTTP/3 server sends GOAWAY, answers
/// the requests it accepted and lets the client close the connection.
/// Closing it from the server side as soon as the last response is sent
/// would discard whatever of it the client has not acknowledged yet.
///
/// ```no_run
/// # async fn run(worker: baton_worker::Worker, endpoint: quinn::Endpoint) {
/// let drain = worker.drain();
/// while let Some(incoming) = baton_worker::quic::accept(&endpoint, &drain).await {
///     // serve it in a task of its own
///     # drop(incoming);
/// }
/// baton_worker::quic::drain(&endpoint, &drain, 0x100u32.into(), b"").await;
/// # }
/// ```
pub async fn drain(endpoint: &quinn::Endpoint, drain: &Drain, code: quinn::VarInt, reason: &[u8]) {
    let deadline = drain.wait().await;
    let turn_away = async {
        while let Some(incoming) = endpoint.accept().await {
            incoming.ignore();
        }
        // Closed: `wait_idle` says when the connections are gone.
        std::future::pending::<()>().await
    };
    let ended = async {
        tokio::select! {
            _ = endpoint.wait_idle() => {}
            _ = turn_away => {}
        }
    };
    if tokio::time::timeout_at(deadline, ended).await.is_err() {
        endpoint.close(code, reason);
        endpoint.wait_idle().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_with_the_slot_and_the_rest_is_random() {
        let mut ids = SlotConnectionIds::new(42, 8).unwrap();
        let issued: Vec<ConnectionId> = (0..64).map(|_| ids.generate_cid()).collect();
        for id in &issued {
            assert_eq!((id.len(), id[0]), (8, 42));
            assert_eq!(id[1..4], baton_wire::quic::ID_MARK);
            assert!(ids.validate(id).is_ok());
        }
        let distinct: std::collections::HashSet<&[u8]> = issued.iter().map(|id| &id[4..]).collect();
        assert_eq!(distinct.len(), 64);
        assert_eq!(ids.cid_len(), 8);
        let mut long = SlotConnectionIds::new(255, MAX_LEN).unwrap();
        let id = long.generate_cid();
        assert_eq!((id.len(), id[0]), (20, 255));
    }

    #[test]
    fn another_slots_or_lengths_ids_are_not_ours() {
        let ids = SlotConnectionIds::new(7, 8).unwrap();
        let mut other = SlotConnectionIds::new(8, 8).unwrap();
        assert!(ids.validate(&other.generate_cid()).is_err());
        assert!(ids.validate(&ConnectionId::new(&[7; 9])).is_err());
        assert!(ids.validate(&ConnectionId::new(&[])).is_err());
        // The slot without the mark: a client's random ID.
        assert!(ids.validate(&ConnectionId::new(&[7; 8])).is_err());
        let [m0, m1, m2] = baton_wire::quic::ID_MARK;
        assert!(ids
            .validate(&ConnectionId::new(&[7, m0, m1, m2, 0, 0, 0, 0]))
            .is_ok());
    }

    #[test]
    fn slot_zero_and_bad_lengths_are_refused() {
        assert!(SlotConnectionIds::new(0, 8)
            .unwrap_err()
            .to_string()
            .contains("slot 0"));
        for len in [0, 7, 21] {
            let e = SlotConnectionIds::new(1, len).unwrap_err().to_string();
            assert!(e.contains(&format!("{len} bytes")), "{e}");
        }
        assert!(SlotConnectionIds::new(9, 8)
            .unwrap()
            .with_lifetime(Duration::from_secs(60))
            .cid_lifetime()
            .is_some());
    }
}
