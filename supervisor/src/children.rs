//! Every child of the master and what started it, so that each exit goes
//! straight to its owner.
//!
//! A child is registered where it is started or adopted: a worker where
//! its generation takes it in (spawned, respawned, or adopted from the
//! image before an exec upgrade), an exec probe where its attempt starts,
//! an upgrade's new master or check where the upgrade starts it, the
//! keeper where it starts. Its entry is taken out when its exit is
//! reaped. A pid is not reused before its exit is reaped, so an entry
//! names one process.
//!
//! Children are reaped a slice a turn (see [`crate::exits`]): a SIGCHLD
//! makes reaping pending until a slice finds none left. A worker forked off
//! the loop may exit, and be reaped, before its pid comes back to the loop:
//! while such spawns are pending, the exit of a pid nobody registered is
//! held, for the spawn to claim.
//!
//! The keeper (see [`crate::keeper`]) is a child too, and the one that
//! watches every worker for the case this master is killed: a worker
//! started here is watched from the moment it is registered.

use crate::keeper::{Budget, Keeper};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::time::Duration;

/// What started a child of the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A worker of this generation.
    Worker(u64),
    /// A readiness probe command.
    Probe,
    /// An upgrade's new master (or the new binary checking the config).
    Upgrade,
    /// The keeper (see [`crate::keeper`]).
    Keeper,
}

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// `exit status N` or `signal SIG...`, as the log says it.
    pub status: String,
    /// It exited with status 0.
    pub success: bool,
}

/// The master's children by pid, and the reaping still to do.
#[derive(Default)]
pub struct Children {
    /// What started each child not reaped yet.
    owners: HashMap<Pid, Owner>,
    /// Exits of pids nobody registered, reaped while workers were being
    /// started off the loop: their exit may come before their pid.
    unclaimed: HashMap<Pid, Exit>,
    /// Exited children may wait to be reaped.
    reap_pending: bool,
    /// Kills the workers a killed master leaves behind.
    keeper: Option<Keeper>,
}

impl Children {
    /// Starts a keeper (a new one replaces one that is gone), or greets
    /// the one that started this master, kept its previous image or is its
    /// container's PID 1 (`attach`, its channel). When its channel ends,
    /// `events` gets [`crate::master::Event::KeeperGone`].
    pub fn start_keeper(
        &mut self,
        attach: Option<std::os::fd::OwnedFd>,
        budget: Option<Budget>,
        events: &crate::master::Events,
    ) {
        let mut store = None;
        if let Some(mut old) = self.keeper.take() {
            if let Some(pid) = old.pid() {
                self.release(pid);
            }
            store = old.take_store();
        }
        let keeper = match attach {
            Some(fd) => Keeper::attach(fd, budget),
            None => Keeper::start(budget),
        };
        self.keeper = match keeper {
            Ok(mut keeper) => {
                keeper.carry_store(store);
                if let Some(pid) = keeper.pid() {
                    self.register(pid, Owner::Keeper);
                }
                let events = events.clone();
                keeper.on_gone(move || {
                    let _ = events.send(crate::master::Event::KeeperGone);
                });
                Some(keeper)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot start the keeper: workers will not outlive this master");
                None
            }
        };
    }

    /// The keeper, if one runs.
    pub fn keeper(&self) -> Option<&Keeper> {
        self.keeper.as_ref()
    }

    /// The keeper, to tell it something.
    pub fn keeper_mut(&mut self) -> Option<&mut Keeper> {
        self.keeper.as_mut()
    }

    /// Worker `pid` of `generation` was started: registered, and watched by
    /// the keeper, which stops it if this master dies and no other adopts
    /// it.
    pub fn worker_started(
        &mut self,
        pid: Pid,
        generation: u64,
        drain_timeout: Duration,
        stop_signal: nix::sys::signal::Signal,
    ) {
        if let Some(keeper) = &mut self.keeper {
            keeper.watch(pid, drain_timeout, stop_signal);
        }
        self.register(pid, Owner::Worker(generation));
    }

    /// Worker `pid` exited: the keeper stops watching it.
    pub fn worker_exited(&mut self, pid: Pid) {
        if let Some(keeper) = &mut self.keeper {
            keeper.forget(pid);
        }
    }

    /// Child `pid` was started (or adopted) by `owner`.
    pub fn register(&mut self, pid: Pid, owner: Owner) {
        self.owners.insert(pid, owner);
    }

    /// What started `pid`, if it is a child not reaped yet.
    pub fn owner(&self, pid: Pid) -> Option<Owner> {
        self.owners.get(&pid).copied()
    }

    /// Child `pid` was reaped: its owner, whose the exit is, taken out of
    /// the map.
    pub fn take(&mut self, pid: Pid) -> Option<Owner> {
        self.owners.remove(&pid)
    }

    /// No owner waits for `pid`'s exit any more (a keeper told to exit
    /// and replaced): it will be reaped as a stranger.
    pub fn release(&mut self, pid: Pid) {
        self.owners.remove(&pid);
    }

    /// The exit of `pid`, which nobody registered, reaped while workers
    /// are being started off the loop: held for [`Children::claim`].
    pub fn hold(&mut self, pid: Pid, exit: Exit) {
        self.unclaimed.insert(pid, exit);
    }

    /// A worker started off the loop came back as `pid`: its exit, if it
    /// was reaped before.
    pub fn claim(&mut self, pid: Pid) -> Option<Exit> {
        self.unclaimed.remove(&pid)
    }

    /// No worker is still to come back: no held exit can be one of
    /// theirs.
    pub fn drop_unclaimed(&mut self) {
        self.unclaimed.clear();
    }

    /// SIGCHLD came: children wait to be reaped, a slice a turn.
    pub fn signalled(&mut self) {
        self.reap_pending = true;
    }

    /// Whether exited children may still wait to be reaped.
    pub fn reap_pending(&self) -> bool {
        self.reap_pending
    }

    /// A slice was reaped: `more` when it was full, so that more may wait
    /// for the next turn; otherwise none is left.
    pub fn reaped(&mut self, more: bool) {
        self.reap_pending = more;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn exit(status: &str, success: bool) -> Exit {
        Exit {
            status: status.into(),
            success,
        }
    }

    #[test]
    fn each_exit_goes_to_the_owner_that_registered_it_once() {
        let mut children = Children::default();
        children.register(pid(100), Owner::Worker(3));
        children.register(pid(101), Owner::Probe);
        children.register(pid(102), Owner::Upgrade);
        children.register(pid(103), Owner::Keeper);
        assert_eq!(children.owner(pid(100)), Some(Owner::Worker(3)));
        assert_eq!(children.take(pid(101)), Some(Owner::Probe));
        assert_eq!(children.take(pid(102)), Some(Owner::Upgrade));
        assert_eq!(children.take(pid(103)), Some(Owner::Keeper));
        assert_eq!(children.take(pid(100)), Some(Owner::Worker(3)));
        // Reaped: the entry is gone.
        assert_eq!(children.take(pid(100)), None);
        assert_eq!(children.owner(pid(101)), None);
    }

    #[test]
    fn a_stranger_has_no_owner() {
        let mut children = Children::default();
        children.register(pid(100), Owner::Worker(1));
        assert_eq!(children.take(pid(4242)), None);
        assert_eq!(children.owner(pid(100)), Some(Owner::Worker(1)));
    }

    #[test]
    fn a_pid_reused_after_its_exit_belongs_to_its_new_owner() {
        let mut children = Children::default();
        children.register(pid(100), Owner::Probe);
        assert_eq!(children.take(pid(100)), Some(Owner::Probe));
        children.register(pid(100), Owner::Worker(2));
        assert_eq!(children.take(pid(100)), Some(Owner::Worker(2)));
    }

    #[test]
    fn a_released_child_exits_as_a_stranger() {
        let mut children = Children::default();
        children.register(pid(7), Owner::Keeper);
        children.register(pid(8), Owner::Keeper);
        children.release(pid(7));
        assert_eq!(children.take(pid(7)), None);
        assert_eq!(children.take(pid(8)), Some(Owner::Keeper));
    }

    #[test]
    fn an_exit_reaped_before_its_spawn_came_back_is_claimed_once() {
        let mut children = Children::default();
        children.hold(pid(200), exit("signal SIGKILL", false));
        assert_eq!(children.claim(pid(201)), None);
        assert_eq!(
            children.claim(pid(200)),
            Some(exit("signal SIGKILL", false))
        );
        assert_eq!(children.claim(pid(200)), None);
    }

    #[test]
    fn held_exits_go_once_no_spawn_is_pending() {
        let mut children = Children::default();
        children.hold(pid(200), exit("exit status 1", false));
        children.hold(pid(201), exit("exit status 0", true));
        children.drop_unclaimed();
        assert_eq!(children.claim(pid(200)), None);
        assert_eq!(children.claim(pid(201)), None);
    }

    #[test]
    fn holding_an_exit_registers_no_owner() {
        let mut children = Children::default();
        children.hold(pid(200), exit("exit status 1", false));
        assert_eq!(children.owner(pid(200)), None);
        assert_eq!(children.take(pid(200)), None);
        assert!(children.claim(pid(200)).is_some());
    }

    #[test]
    fn reaping_is_pending_from_sigchld_until_a_slice_finds_none_left() {
        let mut children = Children::default();
        assert!(!children.reap_pending());
        children.signalled();
        assert!(children.reap_pending());
        // A full slice: more may wait.
        children.reaped(true);
        assert!(children.reap_pending());
        children.reaped(false);
        assert!(!children.reap_pending());
    }
}
