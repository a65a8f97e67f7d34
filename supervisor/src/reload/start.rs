//! The bind and spawn phases: the generation's sockets made a chunk of
//! ports a turn of the loop, then its workers spawned one a turn.

use super::{Phase, Reload};
use crate::config::{Config, ListenerAddress, ReadyMode};
use crate::fleet::Generation;
use crate::listener::{Listener, Shared};
use crate::master::Master;
use crate::probe::Probing;
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use tokio::time::Instant;

/// Generation sockets made per turn of the event loop in the bind phase:
/// each takes tens of microseconds, plus two looks at the kernel's
/// listening sockets on the chunk's ports; a few milliseconds in all.
const BIND_CHUNK: usize = 64;

/// A TCP socket of its own on each port of `listeners`, for a generation of
/// workers that are not SDK workers (which stop accepting when told to
/// drain), or steered between generations (probes, probation, canaries; see
/// [`crate::rollout`]). A port new to this reload (not in `current`) is
/// steered to the new generation at once: nobody else serves it.
///
/// The kernel is asked which sockets listen on the ports twice per call,
/// before the new sockets are made and after, not twice per port.
fn generation_sockets(
    listeners: &[Shared],
    current: &HashSet<*const Listener>,
) -> anyhow::Result<Vec<Shared>> {
    let before = crate::listener::kernel_view(listeners);
    let made = listeners
        .iter()
        .map(|l| Listener::for_generation(l, &before))
        .collect::<anyhow::Result<Vec<Shared>>>()?;
    let after = crate::listener::kernel_view(listeners);
    let sockets: Vec<Shared> = made
        .into_iter()
        .map(|socket| Listener::confirm(socket, &after))
        .collect();
    for (listener, socket) in listeners.iter().zip(&sockets) {
        if !current.contains(&Rc::as_ptr(listener)) {
            socket.steer_here()?;
        }
    }
    Ok(sockets)
}

impl Master {
    /// Makes the next [`BIND_CHUNK`] generation sockets of the bind phase;
    /// the last chunk starts the generation. From the loop's tick: with
    /// many listeners the phase takes tens of milliseconds, and requests,
    /// signals and exits are served between chunks.
    pub(super) fn bind_next(&mut self) {
        let Some(reload) = self.operation.reload_mut() else {
            return;
        };
        let Some(made) = reload.binding.as_mut() else {
            return;
        };
        let _enter = reload.span.clone().entered();
        let from = made.len();
        let to = (from + BIND_CHUNK).min(reload.listeners.len());
        let chunk = &reload.listeners[from..to];
        let current: HashSet<*const Listener> =
            self.fleet.listeners().iter().map(Rc::as_ptr).collect();
        match generation_sockets(chunk, &current) {
            Ok(sockets) => made.extend(sockets),
            Err(e) => {
                let reload = self.operation.take_reload().expect("checked above");
                return self.abort(reload, Phase::Bind, format!("{e:#}"));
            }
        }
        if to < reload.listeners.len() {
            return;
        }
        let mut reload = self.operation.take_reload().expect("checked above");
        let sockets = reload.binding.take().unwrap_or_default();
        self.start_generation(reload, sockets);
    }

    /// The bind phase is over: the new generation starts with `sockets`,
    /// and its workers are spawned from the next turn on.
    pub(super) fn start_generation(&mut self, mut reload: Reload, sockets: Vec<Shared>) {
        let _enter = reload.span.clone().entered();
        reload.end_phase(Phase::Bind);
        reload.begin_phase(Phase::Spawn);
        // The new sockets are last on their ports now, and not steered to:
        // any unused socket can go without moving the one that is.
        self.fleet.tidy();
        let (generation, config) = (reload.generation, reload.config.clone());
        let mut new = Generation::new(generation, config.clone(), sockets, reload.processes);
        new.join_trace(&reload.phase_span);
        let mut spawn_error = None;
        if config.worker.ready == ReadyMode::Notify {
            match self.notifier(generation, config.worker.credentials()) {
                Ok(notifier) => new.set_notify(notifier),
                Err(e) => spawn_error = Some(format!("creating the notify socket: {e:#}")),
            }
        }
        self.fleet.start(new);
        reload.spawning = Some(0);
        if let Some(reason) = spawn_error {
            return self.abort(reload, Phase::Spawn, reason);
        }
        self.operation
            .begin(crate::operation::Operation::Starting(reload));
    }

    /// Starts the new generation's next worker. One per turn of the event
    /// loop, and off it: the fork and the wait for the child's `execve` run
    /// on the main thread ([`Generation::spawn_off_loop`]), and
    /// [`Master::on_spawned`] takes the worker in. The spawn phase ends
    /// when every worker has come back.
    pub(super) fn spawn_next(&mut self) {
        let Some(reload) = self.operation.reload_mut() else {
            return;
        };
        let Some(index) = reload.spawning else { return };
        let Some(new) = self.fleet.get_mut(reload.generation) else {
            return;
        };
        let _enter = reload.span.clone().entered();
        if index < reload.processes {
            if let Err(e) = new.spawn_off_loop(index, &self.events) {
                let reload = self.operation.take_reload().expect("checked above");
                return self.abort(reload, Phase::Spawn, format!("worker {index}: {e:#}"));
            }
        }
        if index + 1 < reload.processes {
            reload.spawning = Some(index + 1);
            return;
        }
        reload.spawning = None;
        self.end_spawn_phase();
    }

    /// Worker `index` of generation `number`, started off the loop, has
    /// exec'd (or failed to): taken into its generation while the reload
    /// that started it runs, stopped otherwise.
    pub(crate) fn on_spawned(
        &mut self,
        number: u64,
        index: u32,
        result: Result<std::process::Child, String>,
    ) {
        let pid = result
            .as_ref()
            .ok()
            .map(|child| Pid::from_raw(child.id() as i32));
        // It may have exited already, reaped before it came back here.
        let exited = pid.and_then(|pid| self.children.claim(pid));
        let wanted = self
            .operation
            .reload()
            .is_some_and(|r| r.generation == number)
            && self.fleet.get(number).is_some();
        let taken = match (self.fleet.get_mut(number), result) {
            (Some(generation), Ok(child)) if wanted => generation
                .spawned(index, child, &self.events, &mut self.children)
                .map(|_| ())
                .map_err(|e| format!("{e:#}")),
            (generation, result) => {
                if let Some(generation) = generation {
                    generation.forget_pending(index);
                }
                // Not wanted any more (or failed): killed, unless gone
                // already; its exit is reaped as any other.
                if let (Some(pid), None, true) = (pid, &exited, result.is_ok()) {
                    tracing::info!(
                        pid = pid.as_raw(),
                        "worker started for a reload that has ended: killed"
                    );
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                }
                result.map(|_| ())
            }
        };
        // Once no worker is still to come back, no unknown exit can be one
        // of theirs.
        if !self.spawns_pending() {
            self.children.drop_unclaimed();
        }
        // It may have notified already, before it was taken in.
        if let Some(g) = self.fleet.get_mut(number) {
            if crate::notify::replay(g) {
                self.advance_reload();
            }
        }
        if !wanted {
            return self.reap_finished_generations();
        }
        let _enter = self.operation.reload().map(|r| r.span.clone().entered());
        if let Err(reason) = taken {
            let reload = self.operation.take_reload().expect("wanted: a reload runs");
            return self.abort(reload, Phase::Spawn, format!("worker {index}: {reason}"));
        }
        if let (Some(pid), Some(exit)) = (pid, exited) {
            return self.on_exit(pid, exit.status, exit.success);
        }
        self.end_spawn_phase();
    }

    /// Whether workers started off the loop are still to come back, in any
    /// generation (a failed reload's too).
    pub(crate) fn spawns_pending(&self) -> bool {
        self.fleet.iter().any(Generation::has_pending)
    }

    /// Whether `reload`'s spawn phase is open: workers left to start, or
    /// started and not back yet.
    pub(crate) fn spawn_phase_open(&self, reload: &Reload) -> bool {
        reload.spawning.is_some()
            || self
                .fleet
                .get(reload.generation)
                .is_some_and(Generation::has_pending)
    }

    /// Ends the spawn phase once every worker was started and has come
    /// back; the ready phase begins.
    fn end_spawn_phase(&mut self) {
        match self.operation.reload() {
            Some(reload) if !self.spawn_phase_open(reload) => {}
            _ => return,
        }
        let reload = self.operation.reload_mut().expect("matched above");
        reload.end_phase(Phase::Spawn);
        reload.begin_phase(Phase::Ready);
        reload.ready_deadline = Instant::now() + reload.config.worker.ready_timeout.0;
        let generation = reload.generation;
        self.probing = self.fleet.get(generation).and_then(Probing::of);
        self.advance_reload();
    }

    /// Keeps every listener whose name and address are unchanged (same fd:
    /// this is what makes reloads drop nothing) and binds the others.
    pub(super) fn bind(&self, config: &Config) -> anyhow::Result<Vec<Shared>> {
        let current: HashMap<(&str, &ListenerAddress), &Shared> = self
            .fleet
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
}
