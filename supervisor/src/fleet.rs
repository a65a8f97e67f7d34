//! The fleet: every generation, which one serves, the listeners new
//! generations start from, the worker count `baton scale` chose, and the
//! ports whose unused sockets are still to be let go of.
//!
//! It is the one owner of that state. Its methods say intent (start a
//! generation, cut over wholly or by a share, roll back, fail, retire,
//! tick) and keep the invariants inside: at most one generation is
//! [`GenerationState::Current`], [`Fleet::current`] names it, and a generation's
//! state changes only here.

pub mod generation;
pub mod quic;

pub use generation::{
    crash_loop, crashes_in_a_row, respawn_delay, Generation, GenerationState, Handover,
    PendingRespawn,
};

use crate::config::Config;
use crate::config::Share;
use crate::listener::{Listener, Shared};
use crate::scale::ScaleOverride;
use crate::worker::State;
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;
use tokio::time::Instant;

/// Ports tidied per turn of the event loop.
const TIDY_CHUNK: usize = 64;
/// How soon a port still letting a QUIC worker socket go is looked at
/// again: the keeper closes its copy a turn later, a forked child at its
/// `execve`.
const TIDY_RETRY: Duration = Duration::from_millis(2);

/// Every generation and what they share.
#[derive(Debug)]
pub struct Fleet {
    generations: BTreeMap<u64, Generation>,
    /// The generation that serves.
    current: Option<u64>,
    /// The number the next generation gets.
    next_number: u64,
    /// The listeners of the configuration in service; a reload's new
    /// generation starts from them.
    listeners: Vec<Shared>,
    /// A worker count set by `baton scale`, kept across reloads while the
    /// config's `processes` stays what it was.
    scale: Option<ScaleOverride>,
    /// Ports whose unused sockets are still to be let go of, a chunk a turn.
    tidying: Vec<Shared>,
    /// Another pass over the ports is wanted once this one is done.
    tidy_again: bool,
    /// A pass is wanted then: a QUIC port is still letting a socket go
    /// (another process had not closed its copy yet).
    tidy_retry: Option<Instant>,
    /// Taken over from another master (an upgrade's, an exec's image):
    /// its generations may still serve on the listeners' own sockets.
    inherited: bool,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            generations: BTreeMap::new(),
            current: None,
            next_number: 1,
            listeners: Vec::new(),
            scale: None,
            tidying: Vec::new(),
            tidy_again: false,
            tidy_retry: None,
            inherited: false,
        }
    }
}

/// A generation that finished: nothing of it runs any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Its number.
    pub number: u64,
    /// Its state when it finished.
    pub state: GenerationState,
    /// How long it drained, if it was replaced.
    pub drained: Option<Duration>,
}

impl Fleet {
    /// The generation that serves, by number (once the master stopped,
    /// the one that served last, even when it is finished).
    pub fn current_number(&self) -> Option<u64> {
        self.current
    }

    /// The generation that serves.
    pub fn current(&self) -> Option<&Generation> {
        self.current.and_then(|c| self.generations.get(&c))
    }

    /// The generation that serves, to change its workers.
    pub fn current_mut(&mut self) -> Option<&mut Generation> {
        self.current.and_then(|c| self.generations.get_mut(&c))
    }

    /// Generation `number`.
    pub fn get(&self, number: u64) -> Option<&Generation> {
        self.generations.get(&number)
    }

    /// Generation `number`, to change its workers.
    pub fn get_mut(&mut self, number: u64) -> Option<&mut Generation> {
        self.generations.get_mut(&number)
    }

    /// Every generation, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Generation> {
        self.generations.values()
    }

    /// Every generation, oldest first, to change their workers.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Generation> {
        self.generations.values_mut()
    }

    /// Whether no generation is left.
    pub fn is_empty(&self) -> bool {
        self.generations.is_empty()
    }

    /// The number of the generation running worker `pid`.
    pub fn running(&self, pid: Pid) -> Option<u64> {
        self.iter()
            .find(|g| g.workers().contains_key(&pid))
            .map(Generation::number)
    }

    /// The generation running worker `pid`.
    pub fn of_worker(&mut self, pid: Pid) -> Option<&mut Generation> {
        let number = self.running(pid)?;
        self.generations.get_mut(&number)
    }

    /// The listeners of the configuration in service.
    pub fn listeners(&self) -> &[Shared] {
        &self.listeners
    }

    /// Every socket the fleet holds: the listeners in service and every
    /// generation's.
    pub fn sockets(&self) -> impl Iterator<Item = &Shared> {
        self.listeners
            .iter()
            .chain(self.generations.values().flat_map(|g| g.listeners().iter()))
    }

    /// The worker count `baton scale` chose, if any.
    pub fn scale(&self) -> Option<ScaleOverride> {
        self.scale
    }

    /// How many workers a generation of `config` runs: the scale override
    /// while the config's `processes` is what it was when it was chosen.
    pub fn processes_for(&self, config: &Config) -> u32 {
        match self.scale {
            Some(scale) if scale.config_processes == config.worker.processes => scale.processes,
            _ => config.worker.processes,
        }
    }

    /// A number for a new generation.
    pub fn next_number(&mut self) -> u64 {
        let number = self.next_number;
        self.next_number += 1;
        number
    }

    /// The number the next generation will get (handed to a new master).
    pub fn peek_next_number(&self) -> u64 {
        self.next_number
    }

    /// Takes in a new generation, [`GenerationState::Starting`].
    pub fn start(&mut self, generation: Generation) {
        debug_assert_eq!(generation.state(), GenerationState::Starting);
        self.generations.insert(generation.number(), generation);
    }

    /// Cuts over wholly to generation `number`, started from `listeners`:
    /// new connections go to its sockets, it is current, and every
    /// generation it replaces (the current one, one on standby) hands
    /// over what is queued on its own sockets and drains. A scale
    /// override chosen for another `processes` is dropped (returned).
    pub fn cut_over(
        &mut self,
        number: u64,
        listeners: Vec<Shared>,
        config: &Config,
    ) -> Option<ScaleOverride> {
        let mut new_sockets = Vec::new();
        if let Some(new) = self.generations.get_mut(&number) {
            new.set_state(GenerationState::Current);
            new_sockets = new.listeners().to_vec();
        }
        for socket in &new_sockets {
            if let Err(e) = socket.steer_here() {
                tracing::error!(error = %format!("{e:#}"), "cannot steer new connections to the new generation");
            }
        }
        let drain_timeout = config.worker.drain_timeout.0;
        for old in self.generations.values_mut() {
            let replaced = matches!(
                old.state(),
                GenerationState::Current | GenerationState::Standby
            );
            if replaced && old.number() != number {
                tracing::info!(
                    event = "generation.draining",
                    generation = old.number(),
                    "generation draining"
                );
                let moved = steered_away(old.listeners(), &new_sockets);
                old.hand_over(moved, drain_timeout);
            }
        }
        self.current = Some(number);
        self.listeners = listeners;
        self.scale
            .take_if(|s| s.config_processes != config.worker.processes)
    }

    /// Cuts over to generation `number` on probation: new connections go
    /// to it (all of them, or with `canary` the share of them), it is
    /// current, and the one it replaces stays warm on standby, accepting
    /// nothing new (or the rest of a canary's share). Returns the standby
    /// generation; `None` (and nothing changed) when none serves.
    pub fn cut_over_on_probation(&mut self, number: u64, canary: Option<Share>) -> Option<u64> {
        let standby = self.current.filter(|c| self.generations.contains_key(c))?;
        let new = self.generations.get_mut(&number)?;
        new.set_state(GenerationState::Current);
        let new_sockets = new.listeners().to_vec();
        let old = self.generations.get_mut(&standby).expect("checked above");
        old.set_state(GenerationState::Standby);
        old.cancel_respawns();
        for socket in &new_sockets {
            let result = match canary {
                Some(share) => match old
                    .listeners()
                    .iter()
                    .find(|o| std::ptr::eq(o.port(), socket.port()) && o.steerable())
                {
                    Some(main) if socket.primary().is_some() => {
                        main.split_with(socket, share.threshold())
                    }
                    _ => socket.steer_here(),
                },
                None => socket.steer_here(),
            };
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "cannot steer new connections to the new generation");
            }
        }
        // QUIC ports split by flow hash, their workers' sockets known to
        // the port's group.
        if let Some(share) = canary {
            for listener in new_sockets.iter().filter(|l| l.is_quic()) {
                listener.quic_canary(number, standby, share.threshold());
            }
        }
        self.current = Some(number);
        Some(standby)
    }

    /// Rolls back a probation: new connections go to `standby` again,
    /// which is current once more (its missing workers respawned), and
    /// generation `number` hands over and drains.
    pub fn roll_back(&mut self, number: u64, standby: u64) {
        let mut old_sockets = Vec::new();
        if let Some(old) = self.generations.get_mut(&standby) {
            old.set_state(GenerationState::Current);
            old_sockets = old.listeners().to_vec();
            old.respawn_missing();
        }
        for socket in &old_sockets {
            if let Err(e) = socket.steer_here() {
                tracing::error!(error = %format!("{e:#}"), "cannot steer new connections back to the standby generation");
            }
        }
        self.current = Some(standby);
        if let Some(new) = self.generations.get_mut(&number) {
            let moved = steered_away(new.listeners(), &old_sockets);
            let timeout = new.config().worker.drain_timeout.0;
            new.hand_over(moved, timeout);
        }
    }

    /// Another master's generation replaced the current one: it hands
    /// over what is queued on its sockets that `moved` selects (new
    /// connections go elsewhere now) and drains.
    pub fn hand_over_current(&mut self, moved: impl Fn(&Shared) -> bool) {
        if let Some(current) = self.current_mut() {
            let sockets = current
                .listeners()
                .iter()
                .filter(|s| moved(s))
                .cloned()
                .collect();
            let timeout = current.config().worker.drain_timeout.0;
            current.hand_over(sockets, timeout);
        }
    }

    /// The master stops, but its listening sockets outlive it (systemd's
    /// fd store keeps them for the next master): new connections go to
    /// the listeners' own sockets again, and the current generation
    /// accepts what is queued on its own sockets before it drains, so that
    /// nothing is left on a socket that closes with it.
    pub fn steer_home(&mut self) {
        for listener in &self.listeners {
            if let Err(e) = listener.steer_here() {
                tracing::error!(error = %format!("{e:#}"), "cannot steer new connections back to the listener's own socket");
            }
        }
        self.hand_over_current(|s| s.primary().is_some());
    }

    /// Generation `number`'s reload failed: its workers are stopped.
    pub fn fail(&mut self, number: u64, drain_timeout: Duration) {
        if let Some(failed) = self.generations.get_mut(&number) {
            failed.drain(GenerationState::Failed, drain_timeout);
        }
    }

    /// The master stops: no more respawns; gracefully, every generation
    /// drains (one handing over first accepts what is queued for it; one
    /// still starting fails); fast, every worker is terminated within
    /// `grace`.
    pub fn stop(&mut self, graceful: bool, grace: Duration) {
        for generation in self.generations.values_mut() {
            generation.cancel_respawns();
            if !graceful {
                generation.terminate(grace);
            } else if !generation.handing_over() {
                let timeout = generation.config().worker.drain_timeout.0;
                let state = match generation.state() {
                    GenerationState::Starting => GenerationState::Failed,
                    _ => GenerationState::Draining,
                };
                generation.drain(state, timeout);
            }
        }
    }

    /// Sets the current generation's worker count to `processes`, chosen
    /// for a config with `config_processes`.
    pub fn set_scale(&mut self, processes: u32, config_processes: u32) {
        self.scale = Some(ScaleOverride {
            processes,
            config_processes,
        });
    }

    /// Kills the oldest draining generations so that at most `max` drain,
    /// as HAProxy's `mworker-max-reloads` does; returns the ones killed.
    pub fn limit_draining(&mut self, max: usize) -> Vec<u64> {
        let draining: Vec<u64> = self
            .generations
            .values()
            .filter(|g| g.state() == GenerationState::Draining && !g.workers().is_empty())
            .map(|g| g.number())
            .collect();
        let killed = over_drain_cap(&draining, max).to_vec();
        for number in &killed {
            if let Some(generation) = self.generations.get_mut(number) {
                let pids: Vec<i32> = generation.workers().keys().map(|p| p.as_raw()).collect();
                tracing::warn!(
                    event = "generation.killed_over_cap",
                    generation = number,
                    max_draining_generations = max,
                    ?pids,
                    "too many draining generations: the oldest is killed"
                );
                generation.kill_all();
            }
        }
        killed
    }

    /// Drops the generations with nothing left to run (but the current
    /// one unless `stopping`, and `keep`, which a reload is starting);
    /// their sockets are let go of from the next turns.
    pub fn retire_finished(&mut self, keep: Option<u64>, stopping: bool) -> Vec<Retired> {
        let current = self.current.filter(|_| !stopping);
        let mut retired = Vec::new();
        self.generations.retain(|&number, g| {
            let live = !g.workers().is_empty() || g.has_pending();
            if live || Some(number) == current || Some(number) == keep {
                return true;
            }
            let drained = match (g.draining_since(), g.state()) {
                (Some(since), GenerationState::Draining) => Some(since.elapsed()),
                _ => None,
            };
            retired.push(Retired {
                number,
                state: g.state(),
                drained,
            });
            false
        });
        if !retired.is_empty() {
            self.tidy();
        }
        retired
    }

    /// Takes in a listener the master inherited (socket activation, a
    /// previous master or image): in service from now on.
    pub fn adopt_listener(&mut self, listener: Shared) {
        self.listeners.push(listener);
    }

    /// Takes over from an old master: its listeners are in service, and
    /// generations are numbered on from `next_number`.
    pub fn take_over(&mut self, listeners: Vec<Shared>, next_number: u64) {
        self.listeners = listeners;
        self.next_number = next_number;
        self.inherited = true;
    }

    /// Takes back the fleet a previous image of this master left (an
    /// upgrade's exec): `generations` with their states (and whether each
    /// was handing over: replaced, its workers not yet told), the current
    /// one, the next number and the scale override.
    pub fn restore(
        &mut self,
        generations: Vec<(Generation, GenerationState, bool)>,
        current: Option<u64>,
        next_number: u64,
        scale: Option<ScaleOverride>,
    ) {
        for (mut generation, state, handing_over) in generations {
            generation.set_state(state);
            if handing_over {
                let sockets = generation
                    .listeners()
                    .iter()
                    .filter(|s| s.steerable())
                    .cloned()
                    .collect();
                let timeout = generation.config().worker.drain_timeout.0;
                generation.hand_over(sockets, timeout);
            }
            self.generations.insert(generation.number(), generation);
        }
        self.current = current.filter(|c| self.generations.contains_key(c));
        self.next_number = next_number;
        self.inherited = true;
        self.scale = scale;
    }

    /// The earliest time something of a generation is due (the one whose
    /// spawns are `held` by an in-place reload waits for it, not a time).
    pub fn next_deadline(&self, held: Option<u64>) -> Option<Instant> {
        self.generations
            .values()
            .filter_map(|g| g.next_deadline(held == Some(g.number())))
            .min()
    }

    /// Asks for a pass over the ports, letting go of generation sockets no
    /// generation uses any more: from the next turn of the loop, the ports
    /// that have some are listed and tidied [`TIDY_CHUNK`] a turn (with a
    /// thousand ports, a finished generation's sockets take tens of
    /// milliseconds to let go). Asked while a pass runs, another pass
    /// follows it.
    pub fn tidy(&mut self) {
        self.tidy_again = true;
    }

    /// Whether a tidying pass is under way or asked for now.
    pub fn tidy_pending(&self) -> bool {
        !self.tidying.is_empty()
            || self.tidy_again
            || self.tidy_retry.is_some_and(|at| at <= Instant::now())
    }

    /// When the pass asked for by a port still letting a socket go is due.
    pub fn tidy_wakeup(&self) -> Option<Instant> {
        self.tidy_retry
    }

    /// Forgets the tidying asked for: an upgrade or a stop runs (a new
    /// master may have sockets of its own on the ports, which this one's
    /// bookkeeping does not know; at a stop everything goes at exit).
    pub fn cancel_tidy(&mut self) {
        self.tidying.clear();
        self.tidy_again = false;
        self.tidy_retry = None;
    }

    /// Tidies the next ports queued.
    pub fn tidy_step(&mut self) {
        if self.tidying.is_empty() {
            let retry = self.tidy_retry.is_some_and(|at| at <= Instant::now());
            if !std::mem::take(&mut self.tidy_again) && !retry {
                return;
            }
            self.tidy_retry = None;
            self.tidying = self.ports_to_tidy();
        }
        let chunk: Vec<Shared> = self
            .tidying
            .drain(..TIDY_CHUNK.min(self.tidying.len()))
            .collect();
        if chunk.is_empty() {
            return;
        }
        // The kernel is asked about a chunk's ports in one look.
        let kernel = crate::listener::kernel_view(&chunk);
        for port in &chunk {
            if port.tidy(&kernel) && self.tidy_retry.is_none() {
                self.tidy_retry = Some(Instant::now() + TIDY_RETRY);
            }
        }
    }

    /// Each port once, and only ports with something to let go of.
    fn ports_to_tidy(&self) -> Vec<Shared> {
        let mut seen = std::collections::HashSet::new();
        self.sockets()
            .map(|listener| listener.primary().unwrap_or(listener))
            .filter(|port| seen.insert(Rc::as_ptr(port)))
            .filter(|port| port.has_retired())
            .cloned()
            .collect()
    }
}

/// The sockets among `old` that new connections no longer go to: those
/// whose port the new generation serves on a socket of its own.
pub fn steered_away(old: &[Shared], new: &[Shared]) -> Vec<Shared> {
    let new_by_port: HashMap<*const Listener, &Shared> = new
        .iter()
        .map(|n| (n.port() as *const Listener, n))
        .collect();
    old.iter()
        .filter(|o| o.steerable())
        .filter(|o| {
            new_by_port
                .get(&(o.port() as *const Listener))
                .is_some_and(|n| !Rc::ptr_eq(n, o))
        })
        .cloned()
        .collect()
}

/// The draining generations to kill so that at most `max` drain: the
/// oldest (`draining` is in order, oldest first).
pub fn over_drain_cap(draining: &[u64], max: usize) -> &[u64] {
    &draining[..draining.len().saturating_sub(max)]
}

/// Whether a worker in `state` still counts toward its generation's
/// workers (it is neither draining nor killed).
pub fn in_service(state: State) -> bool {
    !matches!(state, State::Draining { .. } | State::Killed)
}

impl Fleet {
    /// A TCP socket of its own on each port of `listeners`, for a new
    /// generation of workers that are not SDK workers (which stop accepting
    /// when told to drain), or steered between generations (probes,
    /// probation, canaries; see [`crate::rollout`]). A port not in service
    /// yet is steered to the new generation at once: nobody else serves
    /// it.
    ///
    /// The kernel is asked which sockets listen on the ports twice per
    /// call, before the new sockets are made and after, not twice per
    /// port.
    pub fn generation_sockets(&self, listeners: &[Shared]) -> anyhow::Result<Vec<Shared>> {
        let current: HashSet<*const Listener> = self.listeners.iter().map(Rc::as_ptr).collect();
        let before = crate::listener::kernel_view(listeners);
        // A master's first generation serves on the sockets a service
        // manager passed (socket activation, systemd's fd store at a
        // restart): what queued there while no master ran is accepted;
        // the next generation gets sockets of its own.
        let first = self.generations.is_empty() && !self.inherited;
        let made = listeners
            .iter()
            .map(|l| match first && l.activated() {
                true => Ok(l.clone()),
                false => Listener::for_generation(l, &before),
            })
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

    /// New connections go to the current generation's sockets again (a new
    /// master that failed may have steered them to its own).
    pub fn steer_to_current(&self) {
        let Some(current) = self.current() else {
            return;
        };
        for socket in current.listeners() {
            if let Err(e) = socket.steer_here() {
                tracing::error!(error = %format!("{e:#}"), "cannot steer new connections back");
            }
        }
    }

    /// Whether workers started off the loop are still to come back, in any
    /// generation (a failed reload's too).
    pub fn spawns_pending(&self) -> bool {
        self.iter().any(Generation::has_pending)
    }

    /// Kills the workers that still owe the answer of an in-place reload
    /// that ended, once its deadline passed: hung in their parser or
    /// stopped, they hear neither the abort nor a drain.
    pub fn kill_unanswered(&mut self, now: Instant) {
        for generation in self.iter_mut() {
            let number = generation.number();
            for worker in generation.workers_mut() {
                if worker.answer_due().is_none_or(|due| due > now) {
                    continue;
                }
                worker.answer_by(None);
                tracing::error!(
                    generation = number,
                    worker = worker.index(),
                    pid = worker.pid().as_raw(),
                    "worker did not answer the in-place reload in time: killed"
                );
                worker.kill();
                // A draining one is not respawned; a serving one is, as
                // after a crash.
                if matches!(worker.state(), crate::worker::State::Draining { .. }) {
                    worker.mark_killed();
                }
            }
        }
    }
}
