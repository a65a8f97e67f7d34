//! `baton run --watch`: the master reloads by itself when what it runs
//! changes on disk, as `cargo watch` or nodemon restart a program, but
//! without dropping what is in flight.
//!
//! Watched: the config file the master was started with, each
//! `app_config` file, the worker's executable (`[worker] command[0]`,
//! found as a spawn finds it) and each `--watch PATH` (a file, or a
//! directory and everything under it). A change to the config or an app
//! file asks for a reload as `baton reload` does (`auto`: in place when
//! only app files or log filters changed); a change to the executable or
//! to a `--watch PATH` asks for a new generation. Changes are debounced
//! ([`settle`]) and told apart from events that changed nothing by content
//! ([`targets`]): a `touch` reloads nothing, a ConfigMap's `..data` swap
//! does. An executable is waited for until nobody writes it any more and
//! it may be executed.
//!
//! The watcher is a thread of its own (and notify's inotify thread): it
//! never runs on the master's loop, and asks for a reload the way the
//! control socket does, with an [`Event::Control`] whose requester says
//! `watch` and what changed; the reload's trigger is `watch`. A reload
//! asked for while another runs is coalesced by the master like any
//! other. Once a reload it asked for has ended, the watcher reads the
//! config file again for the files to watch (another app file, another
//! executable). A reload that fails leaves the running generation serving;
//! the watcher logs why (`watch.reload_failed`) beside the master's
//! `reload.failed`.

pub mod settle;
pub mod targets;
pub mod writers;

use crate::audit::Requester;
use crate::config::Config;
use crate::control::protocol::{Reply, Request};
use crate::master::{Event, Events};
use ::notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use ::notify::{RecursiveMode, Watcher};
use anyhow::bail;
use settle::{Activity, Settle, Stamp};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use targets::{chain, ignored, Print, Prints, Role, Target};
use tokio::sync::oneshot;

/// Events within this time of each other are one change.
pub const QUIET: Duration = Duration::from_millis(100);

/// How long a file still open for writing (or a target busy all along)
/// holds a reload back at most.
pub const WRITE_CAP: Duration = Duration::from_secs(10);

/// `baton run --watch`, as given on the command line.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The `--watch PATH`s, absolute.
    extra: Vec<PathBuf>,
}

/// The `--watch` arguments of this master, for a master that replaces it
/// (an upgrade's), which then watches too.
static ARGS: OnceLock<Vec<OsString>> = OnceLock::new();

/// The arguments that make a new master watch what this one does: none
/// when this one does not watch.
pub fn run_args() -> Vec<OsString> {
    ARGS.get().cloned().unwrap_or_default()
}

impl Watch {
    /// Watching with the extra `paths` (each must exist: a file or a
    /// directory).
    pub fn new(paths: &[PathBuf]) -> anyhow::Result<Watch> {
        let mut extra = Vec::new();
        for path in paths {
            let absolute = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            if let Err(e) = std::fs::metadata(&absolute) {
                bail!("--watch {}: {e}", absolute.display());
            }
            extra.push(absolute);
        }
        Ok(Watch { extra })
    }

    /// The arguments of `baton run` that ask for this watch.
    pub fn args(&self) -> Vec<OsString> {
        if self.extra.is_empty() {
            return vec!["--watch".into()];
        }
        self.extra
            .iter()
            .map(|path| {
                let mut arg = OsString::from("--watch=");
                arg.push(path);
                arg
            })
            .collect()
    }

    /// Starts watching for the master running `config`, asking it for
    /// reloads through `requests`. A watch that cannot start (no inotify
    /// instance left) is logged; the master runs on without it.
    pub fn start(self, config: &Config, requests: Events) {
        let _ = ARGS.set(self.args());
        let targets = targets_of(config, &self.extra);
        let running = running(config, &targets);
        let config_path = config.path.clone();
        let extra = self.extra;
        let spawned = std::thread::Builder::new()
            .name("baton-watch".into())
            .spawn(move || watch(config_path, extra, targets, running, requests));
        if let Err(e) = spawned {
            tracing::warn!(event = "watch.unavailable", error = %e, "cannot start the watch thread: not watching");
        }
    }
}

/// What `config` makes the watcher watch, with `extra`.
fn targets_of(config: &Config, extra: &[PathBuf]) -> Vec<Target> {
    let mut targets = vec![Target::file(Role::Config, config.path.clone())];
    let dir = config.path.parent().unwrap_or(Path::new("/"));
    targets.extend(
        config
            .worker
            .app_config
            .iter()
            .map(|name| Target::file(Role::App, tidy(&dir.join(name)))),
    );
    match crate::worker::resolve_command(&config.worker) {
        Ok(program) => targets.push(Target::file(Role::Executable, tidy(&program))),
        // Named by its path but not there (yet): watched for its creation.
        Err(_) if config.worker.command[0].contains('/') => targets.push(Target::file(
            Role::Executable,
            tidy(Path::new(&config.worker.command[0])),
        )),
        Err(e) => {
            tracing::warn!(event = "watch.unavailable", error = %format!("{e:#}"), "the worker's executable is not watched")
        }
    }
    targets.extend(extra.iter().map(|path| Target {
        role: Role::Extra,
        path: path.clone(),
        tree: path.is_dir(),
    }));
    targets
}

/// What the running `config` was read from: its file's and its app
/// files' bytes, as prints. A file that differs from them when the watcher
/// first looks (changed while the master started, or while it was down
/// before a keeper's new master adopted the workers) is a change.
fn running(config: &Config, targets: &[Target]) -> BTreeMap<Key, Print> {
    let dir = config.path.parent().unwrap_or(Path::new("/"));
    let mut prints = BTreeMap::new();
    for target in targets {
        let bytes = match target.role {
            Role::Config => config.text.as_bytes(),
            Role::App => match config
                .app
                .files
                .iter()
                .find(|(name, _)| tidy(&dir.join(name)) == target.path)
            {
                Some((_, bytes)) => bytes.as_slice(),
                None => continue,
            },
            Role::Executable | Role::Extra => continue,
        };
        let print = Print::file(target.role, targets::hash_bytes(bytes), &target.path);
        prints.insert(key(target), print);
    }
    prints
}

/// `path` without its `.` components, and with each `dir/..` after a real
/// directory left out (`/srv/app/./../hello` is `/srv/hello`), as logs
/// show it; a `..` after a symbolic link stays (it goes up from where the
/// link leads).
fn tidy(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut tidied = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                let link = std::fs::symlink_metadata(&tidied).is_ok_and(|m| m.is_symlink());
                let up = matches!(tidied.components().next_back(), Some(Component::Normal(_)));
                if up && !link {
                    tidied.pop();
                } else {
                    tidied.push("..");
                }
            }
            other => tidied.push(other),
        }
    }
    tidied
}

/// The targets after a reload: from the config file as it is now; a file
/// that does not load still names its app files, leniently read, and the
/// executable stays the one watched.
fn targets_now(config: &Path, extra: &[PathBuf], previous: &[Target]) -> Vec<Target> {
    if let Ok(config) = Config::load(config) {
        return targets_of(&config, extra);
    }
    let dir = config.parent().unwrap_or(Path::new("/"));
    let apps: Option<Vec<String>> = crate::config::read_config_file(config)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| {
            let names = table.get("worker")?.get("app_config")?.as_array()?.clone();
            Some(
                names
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect(),
            )
        });
    let Some(apps) = apps else {
        return previous.to_vec();
    };
    previous
        .iter()
        .filter(|t| t.role != Role::App)
        .cloned()
        .chain(
            apps.into_iter()
                .map(|name| Target::file(Role::App, tidy(&dir.join(name)))),
        )
        .collect()
}

/// A target as the settling knows it.
type Key = (Role, PathBuf);

fn key(target: &Target) -> Key {
    (target.role, target.path.clone())
}

/// The watcher's state, on its thread.
struct State {
    config: PathBuf,
    extra: Vec<PathBuf>,
    /// Each target and its chain (see [`targets::chain`]).
    targets: Vec<(Target, Vec<(PathBuf, OsString)>)>,
    /// What each target was when last looked at for a reload.
    baseline: BTreeMap<Key, Print>,
    prints: Prints,
    settle: Settle<Key>,
    /// The directories watched, and how.
    watched: BTreeMap<PathBuf, RecursiveMode>,
    /// The reloads asked for, not answered yet, and what changed for each.
    asked: Vec<(oneshot::Receiver<Reply>, String)>,
    requests: Events,
}

fn watch(
    config: PathBuf,
    extra: Vec<PathBuf>,
    targets: Vec<Target>,
    running: BTreeMap<Key, Print>,
    requests: Events,
) {
    let (tx, rx) = mpsc::channel();
    let watcher = ::notify::RecommendedWatcher::new(
        tx,
        ::notify::Config::default().with_follow_symlinks(false),
    );
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(e) => {
            tracing::warn!(event = "watch.unavailable", error = %e, hint = LIMITS, "cannot watch files (inotify): not watching");
            return;
        }
    };
    let mut state = State {
        config,
        extra,
        targets: Vec::new(),
        baseline: running,
        prints: Prints::default(),
        settle: Settle::new(QUIET, WRITE_CAP),
        watched: BTreeMap::new(),
        asked: Vec::new(),
        requests,
    };
    state.set_targets(targets, &mut watcher);
    // A first look at every target, now that events are seen: what
    // changed since the running config was read.
    let now = Instant::now();
    for (target, _) in &state.targets {
        let stamp = stamped(target.role, &target.path);
        state
            .settle
            .record(key(target), Activity::Changed, stamp, now);
    }
    loop {
        let now = Instant::now();
        let mut wake = state.settle.next_check(now);
        if !state.asked.is_empty() {
            let soon = now + Duration::from_millis(50);
            wake = Some(wake.map_or(soon, |w| w.min(soon)));
        }
        let first = match wake {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(now)) {
                Ok(event) => Some(event),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(event) => Some(event),
                Err(_) => return,
            },
        };
        for event in first.into_iter().chain(rx.try_iter()) {
            state.on_event(event);
        }
        let batch = state.settle.take(
            Instant::now(),
            |(role, path)| stamped(*role, path),
            writers::open_for_writing,
        );
        if let Some(batch) = batch {
            for file in &batch.still_writing {
                tracing::warn!(path = %file.display(), "still open for writing after {WRITE_CAP:?}: going ahead");
            }
            state.on_settled(batch.targets);
            state.rechain();
            state.rewatch(&mut watcher);
        }
        if state.answered() {
            let targets = targets_now(&state.config, &state.extra, &state.current());
            state.set_targets(targets, &mut watcher);
        }
    }
}

/// What to read when inotify's limits are reached.
const LIMITS: &str =
    "raise fs.inotify.max_user_watches / max_user_instances (sysctl), or watch fewer paths";

/// The stamp a settling file target is compared by (a tree's events say
/// everything).
fn stamped(role: Role, path: &Path) -> Option<Stamp> {
    if role == Role::Extra && path.is_dir() {
        None
    } else {
        Stamp::of(path)
    }
}

impl State {
    fn current(&self) -> Vec<Target> {
        self.targets.iter().map(|(t, _)| t.clone()).collect()
    }

    /// Watches `targets` from now on: the directories their chains go
    /// through first, then a target new to the watcher is compared with
    /// what it is now.
    fn set_targets(&mut self, targets: Vec<Target>, watcher: &mut impl Watcher) {
        let changed = self.current() != targets;
        self.targets = targets
            .into_iter()
            .map(|t| {
                let chain = chain(&t.path);
                (t, chain)
            })
            .collect();
        self.rewatch(watcher);
        let mut baseline = BTreeMap::new();
        for (target, _) in &self.targets {
            let key = key(target);
            let print = match self.baseline.remove(&key) {
                Some(print) => print,
                None => self.prints.of(target),
            };
            baseline.insert(key, print);
        }
        self.baseline = baseline;
        if let Some(root) = self.prints.cut.take() {
            tracing::warn!(event = "watch.unavailable", path = %root.display(), "more than {} files under a watched directory: the rest are not compared", targets::MAX_TREE_FILES);
        }
        if changed {
            let listed: Vec<String> = self
                .targets
                .iter()
                .map(|(t, _)| format!("{} {}", t.role.name(), t.path.display()))
                .collect();
            tracing::info!(event = "watch.started", watching = %listed.join(", "), quiet_ms = QUIET.as_millis() as u64, "watching for changes");
        }
    }

    /// The chains again: a link on the way may have been swapped.
    fn rechain(&mut self) {
        for (target, chain) in &mut self.targets {
            *chain = targets::chain(&target.path);
        }
    }

    /// Watches the directories the targets' chains go through (a tree
    /// recursively) and no other.
    fn rewatch(&mut self, watcher: &mut impl Watcher) {
        let mut wanted: BTreeMap<PathBuf, RecursiveMode> = BTreeMap::new();
        for (target, chain) in &self.targets {
            if target.tree {
                wanted.insert(target.path.clone(), RecursiveMode::Recursive);
            }
            for (dir, _) in chain {
                wanted
                    .entry(dir.clone())
                    .or_insert(RecursiveMode::NonRecursive);
            }
        }
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(dir, mode)| wanted.get(*dir) != Some(mode))
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in stale {
            // Gone with its directory, if that was removed.
            let _ = watcher.unwatch(&dir);
            self.watched.remove(&dir);
        }
        for (dir, mode) in wanted {
            if self.watched.contains_key(&dir) || !dir.is_dir() {
                continue;
            }
            match watcher.watch(&dir, mode) {
                Ok(()) => {
                    self.watched.insert(dir, mode);
                }
                Err(e) if matches!(e.kind, ::notify::ErrorKind::MaxFilesWatch) => {
                    tracing::warn!(event = "watch.unavailable", path = %dir.display(), hint = LIMITS, "inotify's watch limit is reached: changes under this directory are not seen");
                }
                Err(e) => {
                    tracing::debug!(path = %dir.display(), error = %e, "not watched");
                }
            }
        }
    }

    /// An inotify event: which targets it concerns, and what it says.
    fn on_event(&mut self, event: ::notify::Result<::notify::Event>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                let hint = matches!(e.kind, ::notify::ErrorKind::MaxFilesWatch).then_some(LIMITS);
                tracing::warn!(event = "watch.unavailable", error = %e, hint, "watching failed");
                return;
            }
        };
        let now = Instant::now();
        for path in &event.paths {
            let activity = match event.kind {
                // Opening or reading (our own hashing too) changes nothing.
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => Activity::Closed(path),
                EventKind::Access(_) => return,
                EventKind::Modify(ModifyKind::Data(_)) => Activity::Writing(path),
                _ => Activity::Changed,
            };
            let hidden = path.file_name().is_some_and(ignored);
            for (target, chain) in &self.targets {
                if !concerns(target, chain, path) {
                    continue;
                }
                // An editor's swap file in a tree makes it look, not wait.
                let activity = match activity {
                    Activity::Writing(_) | Activity::Closed(_) if hidden && target.tree => {
                        Activity::Changed
                    }
                    activity => activity,
                };
                let stamp = stamped(target.role, &target.path);
                self.settle.record(key(target), activity, stamp, now);
            }
        }
    }

    /// Settled targets: those whose content changed ask for one reload.
    fn on_settled(&mut self, keys: Vec<Key>) {
        let mut changed: Vec<&Target> = Vec::new();
        for key in &keys {
            let Some((target, _)) = self
                .targets
                .iter()
                .find(|(t, _)| t.role == key.0 && t.path == key.1)
            else {
                continue;
            };
            let print = self.prints.of(target);
            if self.baseline.get(key) == Some(&print) {
                tracing::debug!(path = %target.path.display(), "watched file touched: content unchanged");
                continue;
            }
            if target.role == Role::Executable
                && !matches!(
                    print,
                    Print::File {
                        executable: true,
                        ..
                    }
                )
            {
                let why = match print {
                    Print::Missing => "is not there",
                    _ => "is not executable",
                };
                tracing::info!(event = "watch.waiting", path = %target.path.display(), "the worker's executable {why} yet: waiting");
                continue;
            }
            self.baseline.insert(key.clone(), print);
            changed.push(target);
        }
        if changed.is_empty() {
            return;
        }
        // A new executable or a path the worker reads itself needs new
        // processes; the config and app files get what `baton reload`
        // does (in place when that is all that changed).
        let mode = if changed
            .iter()
            .any(|t| matches!(t.role, Role::Executable | Role::Extra))
        {
            "new_generation"
        } else {
            "auto"
        };
        let what = changed
            .iter()
            .map(|t| format!("{} {}", t.role.name(), t.path.display()))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(event = "watch.changed", changed = %what, mode, "watched files changed: reloading");
        let (reply, answer) = oneshot::channel();
        let event = Event::Control {
            request: Request::Reload {
                canary: None,
                mode: Some(mode.into()),
                if_version: None,
            },
            reply,
            from: Requester::watch(&what),
        };
        if self.requests.send(event).is_ok() {
            self.asked.push((answer, what));
        }
    }

    /// Logs the reloads asked for that have ended: whether one did.
    fn answered(&mut self) -> bool {
        let mut any = false;
        self.asked.retain_mut(|(answer, what)| match answer.try_recv() {
            Ok(reply) => {
                any = true;
                if !reply.ok {
                    let reason = reply.error.as_deref().unwrap_or("no reason given");
                    tracing::error!(event = "watch.reload_failed", changed = %what, %reason, "the reload for the watched change failed; the running generation keeps serving");
                }
                false
            }
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => false,
        });
        any
    }
}

/// Whether an event on `path` may have changed `target` (whose chain is
/// `chain`).
fn concerns(target: &Target, chain: &[(PathBuf, OsString)], path: &Path) -> bool {
    if target.tree && path.starts_with(&target.path) {
        return true;
    }
    chain.iter().any(|(dir, name)| {
        path == dir || (path.parent() == Some(dir.as_path()) && path.file_name() == Some(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_that_does_not_load_still_names_its_app_files() {
        let dir = std::env::temp_dir().join(format!("baton-watch-now-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("baton.toml");
        // `new.toml` is not there yet: the config does not load.
        std::fs::write(
            &config,
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n\n[worker]\ncommand = [\"/bin/true\"]\napp_config = [\"new.toml\"]\n",
        )
        .unwrap();
        assert!(Config::load(&config).is_err());
        let previous = vec![
            Target::file(Role::Config, config.clone()),
            Target::file(Role::App, dir.join("old.toml")),
            Target::file(Role::Executable, PathBuf::from("/srv/hello")),
        ];
        let now = targets_now(&config, &[], &previous);
        assert_eq!(
            now,
            vec![
                Target::file(Role::Config, config.clone()),
                Target::file(Role::Executable, PathBuf::from("/srv/hello")),
                Target::file(Role::App, dir.join("new.toml")),
            ]
        );
        // Once it loads, from the config itself.
        std::fs::write(dir.join("new.toml"), "").unwrap();
        let now = targets_now(&config, &[], &previous);
        assert!(now.contains(&Target::file(Role::App, dir.join("new.toml"))));
        assert!(now.contains(&Target::file(Role::Executable, PathBuf::from("/bin/true"))));
        // Not TOML at all: what was watched stays.
        std::fs::write(&config, "[[[").unwrap();
        assert_eq!(targets_now(&config, &[], &previous), previous);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_path_is_shown_without_dots_unless_a_link_needs_them() {
        assert_eq!(
            tidy(Path::new("/srv/app/./hello")),
            Path::new("/srv/app/hello")
        );
        let dir = std::env::temp_dir().join(format!("baton-tidy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("examples/hello")).unwrap();
        std::fs::create_dir_all(dir.join("elsewhere/deep")).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere/deep"), dir.join("link")).unwrap();
        assert_eq!(
            tidy(&dir.join("examples/hello/../../target/hello")),
            dir.join("target/hello")
        );
        // `link/..` is `elsewhere`, not `dir`: kept as it is.
        assert_eq!(tidy(&dir.join("link/../x")), dir.join("link/../x"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
