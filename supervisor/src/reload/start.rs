//! The bind and spawn phases: the generation's sockets made a chunk of
//! ports a turn of the loop, then its workers spawned one a turn.

use super::{Phase, Reload};
use crate::config::{Config, ListenerAddress, ReadyMode};
use crate::fleet::{Fleet, Generation};
use crate::listener::{Listener, Shared};
use crate::master::Events;
use crate::notify::Notifier;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use tokio::time::Instant;

/// Generation sockets made per turn of the event loop in the bind phase:
/// each takes tens of microseconds, plus two looks at the kernel's
/// listening sockets on the chunk's ports; a few milliseconds in all.
const BIND_CHUNK: usize = 64;

impl Reload {
    /// Makes the next [`BIND_CHUNK`] generation sockets of the bind phase
    /// (the ports in service are `fleet`'s): all of them, once the last
    /// chunk is made. From the loop's tick: with many listeners the phase
    /// takes tens of milliseconds, and requests, signals and exits are
    /// served between chunks.
    pub fn bind_next(&mut self, fleet: &Fleet) -> Result<Option<Vec<Shared>>, String> {
        let Some(made) = self.binding.as_mut() else {
            return Ok(None);
        };
        let _enter = self.span.clone().entered();
        let from = made.len();
        let to = (from + BIND_CHUNK).min(self.listeners.len());
        let chunk = &self.listeners[from..to];
        made.extend(
            fleet
                .generation_sockets(chunk)
                .map_err(|e| format!("{e:#}"))?,
        );
        if to < self.listeners.len() {
            return Ok(None);
        }
        Ok(self.binding.take())
    }

    /// The bind phase is over: the new generation starts in `fleet` with
    /// `sockets` (and, for `ready = "notify"`, a notify socket beside
    /// `control_socket` whose datagrams go to `events`); its workers are
    /// spawned from the next turn on.
    pub fn start_generation(
        &mut self,
        fleet: &mut Fleet,
        sockets: Vec<Shared>,
        control_socket: &Path,
        events: &Events,
    ) -> Result<(), String> {
        let _enter = self.span.clone().entered();
        self.end_phase(Phase::Bind);
        self.begin_phase(Phase::Spawn);
        // The new sockets are last on their ports now, and not steered to:
        // any unused socket can go without moving the one that is.
        fleet.tidy();
        let (generation, config) = (self.generation, self.config.clone());
        let mut new = Generation::new(generation, config.clone(), sockets, self.processes);
        new.join_trace(&self.phase_span);
        let mut spawn_error = None;
        if config.worker.ready == ReadyMode::Notify {
            match Notifier::bind(
                control_socket,
                generation,
                config.worker.credentials(),
                events,
            ) {
                Ok(notifier) => new.set_notify(notifier),
                Err(e) => spawn_error = Some(format!("creating the notify socket: {e:#}")),
            }
        }
        fleet.start(new);
        self.spawning = Some(0);
        spawn_error.map_or(Ok(()), Err)
    }

    /// Starts the new generation's next worker. One per turn of the event
    /// loop, and off it: the fork and the wait for the child's `execve` run
    /// on the main thread ([`Generation::spawn_off_loop`]), and the master
    /// takes the worker in when it comes back (`Event::Spawned`). The spawn
    /// phase ends when every worker has come back. `Ok(false)`: it was not
    /// spawning; `Err` names the worker that could not be started.
    pub fn spawn_next(&mut self, fleet: &mut Fleet, events: &Events) -> Result<bool, String> {
        let Some(index) = self.spawning else {
            return Ok(false);
        };
        let Some(new) = fleet.get_mut(self.generation) else {
            return Ok(false);
        };
        let _enter = self.span.clone().entered();
        if index < self.processes {
            new.spawn_off_loop(index, events)
                .map_err(|e| format!("worker {index}: {e:#}"))?;
        }
        self.spawning = (index + 1 < self.processes).then_some(index + 1);
        Ok(true)
    }

    /// Whether its spawn phase is open: workers left to start, or started
    /// and not back yet.
    pub fn spawn_phase_open(&self, fleet: &Fleet) -> bool {
        self.spawning.is_some()
            || fleet
                .get(self.generation)
                .is_some_and(Generation::has_pending)
    }

    /// Every worker was started and has come back: the ready phase begins,
    /// `ready_timeout` from now.
    pub fn begin_ready(&mut self) {
        self.end_phase(Phase::Spawn);
        self.begin_phase(Phase::Ready);
        self.ready_deadline = Instant::now() + self.config.worker.ready_timeout.0;
    }
}

/// Keeps every listener of `fleet` whose name and address `config` keeps
/// (same fd: this is what makes reloads drop nothing) and binds the others.
pub fn bind(fleet: &Fleet, config: &Config) -> anyhow::Result<Vec<Shared>> {
    let current: HashMap<(&str, &ListenerAddress), &Shared> = fleet
        .listeners()
        .iter()
        .map(|l| ((l.config.name.as_str(), &l.config.address), l))
        .collect();
    let mut out = Vec::with_capacity(config.listeners.len());
    for wanted in &config.listeners {
        match current.get(&(wanted.name.as_str(), &wanted.address)) {
            Some(listener) => {
                listener.apply(wanted)?;
                out.push(Rc::clone(listener));
            }
            None => {
                let listener = Rc::new(Listener::bind(wanted)?);
                tracing::info!(
                    event = "listener.bound",
                    listener = %listener.info.name,
                    address = %listener.info.address,
                    kind = %listener.info.kind,
                    "listener bound"
                );
                out.push(listener);
            }
        }
    }
    Ok(out)
}
