//! The UDP sockets a generation's SDK workers have of their own on QUIC
//! listeners' ports (`quic = true`), each with a slot its connection IDs
//! name: made before a worker starts, kept while it lives, so that the
//! port's group routes its connections' datagrams to it until it exits
//! (see [`crate::steering::quic`]).

use crate::listener::{Listener, Shared};
use nix::unistd::Pid;
use std::collections::BTreeMap;

/// One generation's QUIC worker sockets.
#[derive(Debug, Default)]
pub struct QuicSockets {
    /// A starting worker's listeners by index: the generation's, a QUIC
    /// listener's replaced by the worker's own socket.
    starting: BTreeMap<u32, Vec<Shared>>,
    /// The same for each running worker, until it exits.
    running: BTreeMap<Pid, Vec<Shared>>,
}

impl QuicSockets {
    /// Makes worker `index`'s sockets on the QUIC listeners among
    /// `listeners` (none: nothing is kept, the worker gets `listeners`).
    pub fn prepare(
        &mut self,
        index: u32,
        listeners: &[Shared],
        generation: u64,
    ) -> anyhow::Result<()> {
        self.starting.remove(&index);
        if !listeners.iter().any(|l| l.is_quic()) {
            return Ok(());
        }
        let own = listeners
            .iter()
            .map(|l| Ok(Listener::for_quic_worker(l, generation)?.unwrap_or_else(|| l.clone())))
            .collect::<anyhow::Result<Vec<Shared>>>()?;
        self.starting.insert(index, own);
        Ok(())
    }

    /// Worker `index`'s listeners, if it has sockets of its own.
    pub fn starting(&self, index: u32) -> Option<&[Shared]> {
        self.starting.get(&index).map(Vec::as_slice)
    }

    /// Worker `index` started as `pid`: its sockets live as long as it.
    pub fn started(&mut self, index: u32, pid: Pid) {
        if let Some(own) = self.starting.remove(&index) {
            for socket in own.iter().filter(|s| s.primary().is_some()) {
                socket.set_quic_owner(pid.as_raw() as u32);
            }
            self.running.insert(pid, own);
        }
    }

    /// Worker `index` is not started after all: its sockets go.
    pub fn not_started(&mut self, index: u32) {
        self.starting.remove(&index);
    }

    /// Worker `pid` exited: its sockets leave their ports at the next
    /// tidy.
    pub fn exited(&mut self, pid: Pid) {
        self.running.remove(&pid);
    }
}

/// New connections on `listeners`' QUIC ports go to `generation`'s
/// workers' sockets.
pub fn make_current(listeners: &[Shared], generation: u64) {
    for listener in listeners.iter().filter(|l| l.is_quic()) {
        listener.quic_current(generation);
    }
}
