//! How many connections the admin endpoint holds, and which it lets go.
//!
//! Every connection is accepted (as nginx and Envoy do): a server that
//! stops accepting once full lets idle or slow clients keep a probe waiting
//! in the kernel's queue. Past a cap per peer address, and past a cap in
//! all, the connection that has waited longest without a request in
//! progress (silent since accepted, trickling its headers, or idle
//! keep-alive) is closed for the newcomer. A request being answered is
//! never cut; a newcomer is refused only when every other connection of
//! its kind is in the middle of one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where a connection comes from: its IP address (a Unix socket's peers
/// are one).
pub type Peer = Option<IpAddr>;

/// The caps.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Connections held at once from one peer address.
    pub per_peer: usize,
    /// Connections held at once in all.
    pub total: usize,
}

impl Caps {
    /// The caps for this process: [`MAX_TOTAL`] and [`MAX_PER_PEER`], or
    /// less where the open-files limit is low, so that the admin endpoint
    /// never takes more than a quarter of the master's fds.
    pub fn for_process() -> Caps {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Caps::within(soft)
    }

    /// The caps under an open-files limit of `nofile`.
    pub fn within(nofile: u64) -> Caps {
        let total = (nofile / 4).clamp(16, MAX_TOTAL as u64) as usize;
        Caps {
            per_peer: MAX_PER_PEER.min(total),
            total,
        }
    }
}

/// The most connections held in all.
pub const MAX_TOTAL: usize = 1024;

/// The most connections held from one peer address.
pub const MAX_PER_PEER: usize = 256;

/// The connections held.
#[derive(Debug, Clone)]
pub struct Table {
    inner: Arc<Mutex<Entries>>,
    caps: Caps,
}

#[derive(Debug, Default)]
struct Entries {
    next: u64,
    held: HashMap<u64, Entry>,
    /// Connections held per peer.
    peers: HashMap<Peer, usize>,
}

#[derive(Debug)]
struct Entry {
    peer: Peer,
    /// When it was accepted or last answered.
    since: Instant,
    /// A request is being answered.
    busy: bool,
    close: CancellationToken,
}

/// A held connection; dropping it lets go of its place.
#[derive(Debug)]
pub struct Held {
    table: Table,
    id: u64,
    /// Cancelled when the connection is to be closed for a newcomer.
    pub close: CancellationToken,
}

impl Table {
    /// An empty table with `caps`.
    pub fn new(caps: Caps) -> Table {
        Table {
            inner: Arc::new(Mutex::new(Entries::default())),
            caps,
        }
    }

    /// Takes a new connection from `peer`, closing the longest-waiting idle
    /// ones past the caps. Returns its place, and how many were closed; a
    /// place whose `close` is already cancelled means every other
    /// connection is busy: the newcomer is the one let go.
    pub fn admit(&self, peer: Peer) -> (Held, usize) {
        let mut entries = self.inner.lock().expect("admin table");
        let id = entries.next;
        entries.next += 1;
        let close = CancellationToken::new();
        entries.insert(
            id,
            Entry {
                peer,
                since: Instant::now(),
                busy: false,
                close: close.clone(),
            },
        );
        let mut closed = 0;
        while entries.of(peer) > self.caps.per_peer {
            if !entries.evict(id, |e| e.peer == peer) {
                break;
            }
            closed += 1;
        }
        while entries.held.len() > self.caps.total {
            if !entries.evict(id, |_| true) {
                break;
            }
            closed += 1;
        }
        let full = entries.of(peer) > self.caps.per_peer || entries.held.len() > self.caps.total;
        if full {
            entries.remove(id);
            close.cancel();
        }
        drop(entries);
        (
            Held {
                table: self.clone(),
                id,
                close,
            },
            closed,
        )
    }

    fn with(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.inner.lock().expect("admin table").held.get_mut(&id) {
            f(entry);
        }
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.inner.lock().expect("admin table").held.len()
    }
}

impl Entries {
    fn insert(&mut self, id: u64, entry: Entry) {
        *self.peers.entry(entry.peer).or_default() += 1;
        self.held.insert(id, entry);
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.held.remove(&id)?;
        if let std::collections::hash_map::Entry::Occupied(mut count) = self.peers.entry(entry.peer)
        {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        Some(entry)
    }

    /// Connections held from `peer`.
    fn of(&self, peer: Peer) -> usize {
        self.peers.get(&peer).copied().unwrap_or(0)
    }

    /// Closes the idle connection matching `which` that has waited
    /// longest, other than `keep`; false when there is none.
    fn evict(&mut self, keep: u64, which: impl Fn(&Entry) -> bool) -> bool {
        let oldest = self
            .held
            .iter()
            .filter(|(id, e)| **id != keep && !e.busy && which(e))
            .min_by_key(|(id, e)| (e.since, **id))
            .map(|(id, _)| *id);
        match oldest.and_then(|id| self.remove(id)) {
            Some(entry) => {
                entry.close.cancel();
                true
            }
            None => false,
        }
    }
}

impl Held {
    /// A request arrived: not to be closed until it is answered.
    pub fn busy(&self) {
        self.table.with(self.id, |e| e.busy = true);
    }

    /// Answered: idle again, waiting for its next request.
    pub fn idle(&self) {
        self.table.with(self.id, |e| {
            e.busy = false;
            e.since = Instant::now();
        });
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.table
            .inner
            .lock()
            .expect("admin table")
            .remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> Peer {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn past_the_cap_per_peer_the_oldest_idle_connection_of_that_peer_is_closed() {
        let table = Table::new(Caps {
            per_peer: 2,
            total: 10,
        });
        let (a, _) = table.admit(peer(1));
        let (b, _) = table.admit(peer(1));
        let (other, _) = table.admit(peer(2));
        let (c, closed) = table.admit(peer(1));
        assert_eq!(closed, 1);
        assert!(a.close.is_cancelled());
        assert!(!b.close.is_cancelled() && !c.close.is_cancelled());
        assert!(!other.close.is_cancelled());
        assert_eq!(table.held(), 3);
    }

    #[test]
    fn a_busy_connection_is_never_closed_for_a_newcomer() {
        let table = Table::new(Caps {
            per_peer: 2,
            total: 2,
        });
        let (a, _) = table.admit(peer(1));
        a.busy();
        let (b, _) = table.admit(peer(2));
        let (c, closed) = table.admit(peer(3));
        assert_eq!(closed, 1);
        assert!(!a.close.is_cancelled());
        assert!(b.close.is_cancelled());
        assert!(!c.close.is_cancelled());
        // Answered, a is idle again and now the one waiting longest... after
        // c, which was accepted before a's answer.
        a.idle();
        let (_d, _) = table.admit(peer(4));
        assert!(c.close.is_cancelled());
        assert!(!a.close.is_cancelled());
    }

    #[test]
    fn when_every_other_connection_is_busy_the_newcomer_is_let_go() {
        let table = Table::new(Caps {
            per_peer: 1,
            total: 1,
        });
        let (a, _) = table.admit(peer(1));
        a.busy();
        let (b, closed) = table.admit(peer(1));
        assert_eq!(closed, 0);
        assert!(b.close.is_cancelled());
        assert!(!a.close.is_cancelled());
        drop(b);
        assert_eq!(table.held(), 1);
    }

    #[test]
    fn the_caps_stay_well_under_the_open_files_limit() {
        assert_eq!(Caps::within(1024).total, 256);
        assert_eq!(Caps::within(1 << 20).total, MAX_TOTAL);
        assert_eq!(Caps::within(1 << 20).per_peer, MAX_PER_PEER);
        assert!(Caps::within(64).total <= 16);
    }
}
