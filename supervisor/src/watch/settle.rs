//! When a watched change is over: the debounce of `baton run --watch`.
//!
//! A change comes as a burst of events (an editor's save is a write, a
//! rename and an attribute change; `cargo build` removes the binary and
//! links a new one; a linker writes its output for seconds). Each watched
//! target with events is *pending* until it has settled: no event for the
//! quiet period, no writer that opened it still writing (a write without
//! its `close`), and its size and modification time the same at the end
//! of the quiet period as at its last event (a write through `mmap` makes
//! no event). Pending targets settle together: a batch is taken once every
//! one has settled, so that changes made together become one reload. A
//! target that stays busy past the cap (a log file written all along, a
//! writer that never closes) does not hold the others back for longer than
//! that, and is itself taken once it has been quiet, with its writers
//! reported.
//!
//! Pure bookkeeping over instants given by the caller: no clock, no file
//! system, so that the tests below drive it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A file's size and modification time, to tell a file still changing
/// from one at rest; `None` for a file that is not there (or a directory
/// target, whose events say everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time: seconds and nanoseconds.
    pub modified: (i64, i64),
}

impl Stamp {
    /// The stamp of what `path` names (links followed), if it is there.
    pub fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// What an event says about a target.
#[derive(Debug, Clone, Copy)]
pub enum Activity<'a> {
    /// Something changed: a name created, removed, renamed, attributes.
    Changed,
    /// A process wrote to this file (it has it open for writing).
    Writing(&'a Path),
    /// A process that had this file open for writing closed it.
    Closed(&'a Path),
}

/// A target with events, not settled yet.
#[derive(Debug)]
struct Pending {
    /// Its first event since it was last taken.
    first: Instant,
    /// Its last event (or the last change its stamp showed).
    last: Instant,
    /// Files written to and not closed since.
    writing: BTreeSet<PathBuf>,
    /// Its stamp at its last event.
    stamp: Option<Stamp>,
    /// When its writers were last looked up (at most once a quiet period,
    /// however many events other files make meanwhile).
    looked: Option<Instant>,
}

/// Targets taken together: their changes make one reload.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<K> {
    /// The settled targets.
    pub targets: Vec<K>,
    /// Files still open for writing past the cap, taken all the same.
    pub still_writing: Vec<PathBuf>,
}

/// The pending targets, by key.
#[derive(Debug)]
pub struct Settle<K> {
    quiet: Duration,
    cap: Duration,
    pending: BTreeMap<K, Pending>,
}

impl<K: Ord + Clone> Settle<K> {
    /// Targets settle after `quiet` without an event; a writer or a busy
    /// target holds a batch back for `cap` at most.
    pub fn new(quiet: Duration, cap: Duration) -> Settle<K> {
        Settle {
            quiet,
            cap,
            pending: BTreeMap::new(),
        }
    }

    /// An event for `key` at `now`, when its stamp was `stamp`.
    pub fn record(&mut self, key: K, activity: Activity<'_>, stamp: Option<Stamp>, now: Instant) {
        let pending = self.pending.entry(key).or_insert_with(|| Pending {
            first: now,
            last: now,
            writing: BTreeSet::new(),
            stamp,
            looked: None,
        });
        pending.last = now;
        pending.stamp = stamp;
        match activity {
            Activity::Changed => {}
            Activity::Writing(path) => {
                pending.writing.insert(path.to_path_buf());
            }
            Activity::Closed(path) => {
                pending.writing.remove(path);
            }
        }
    }

    /// Whether no target is pending.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// When [`Settle::take`] may have something new to say, if no event
    /// comes first.
    pub fn next_check(&self, now: Instant) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| {
                let quiet = p.last + self.quiet;
                if now < quiet {
                    quiet
                } else {
                    // Quiet, held by a writer or by other targets: the cap.
                    (p.first + self.cap).max(quiet)
                }
            })
            .min()
    }

    /// The batch settled at `now`, if one has: every pending target once
    /// all have settled, or those settled past the cap while others are
    /// still busy. `stamp_now` gives a target's stamp now: one that differs
    /// from its last event's is a change still going on. `writing_now`
    /// says whether a file inotify saw written is still open for writing
    /// (a modification without an open file, or by a writer that opened it
    /// before the watch began, is not waited for).
    pub fn take(
        &mut self,
        now: Instant,
        stamp_now: impl Fn(&K) -> Option<Stamp>,
        writing_now: impl Fn(&Path) -> bool,
    ) -> Option<Batch<K>> {
        let mut settled = Vec::new();
        let mut busy = false;
        for (key, pending) in &mut self.pending {
            if now < pending.last + self.quiet {
                busy = true;
                continue;
            }
            let stamp = stamp_now(key);
            if stamp != pending.stamp {
                // Changed without an event (written through a mapping):
                // a quiet period from now.
                pending.stamp = stamp;
                pending.last = now;
                busy = true;
                continue;
            }
            let past_cap = now >= pending.first + self.cap;
            let due = pending.looked.is_none_or(|at| now >= at + self.quiet);
            if !pending.writing.is_empty() && due {
                pending.looked = Some(now);
                pending.writing.retain(|path| writing_now(path));
            }
            if !pending.writing.is_empty() && !past_cap {
                busy = true;
                continue;
            }
            settled.push((key.clone(), past_cap));
        }
        if settled.is_empty() {
            return None;
        }
        if busy {
            // Only those that waited the cap out go ahead of the others.
            settled.retain(|(_, past_cap)| *past_cap);
            if settled.is_empty() {
                return None;
            }
        }
        let mut batch = Batch {
            targets: Vec::new(),
            still_writing: Vec::new(),
        };
        for (key, _) in settled {
            if let Some(pending) = self.pending.remove(&key) {
                batch.still_writing.extend(pending.writing);
            }
            batch.targets.push(key);
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(300);
    const CAP: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn stamp(size: u64) -> Option<Stamp> {
        Some(Stamp {
            size,
            modified: (size as i64, 0),
        })
    }

    #[test]
    fn a_burst_of_events_settles_once_after_the_quiet_period() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        for n in 0..5 {
            settle.record("config", Activity::Changed, stamp(1), t0 + ms(n * 100));
        }
        // 300 ms after the last event (at 400 ms), not before.
        assert_eq!(settle.take(t0 + ms(650), |_| stamp(1), |_| false), None);
        assert_eq!(settle.next_check(t0 + ms(650)), Some(t0 + ms(700)));
        let batch = settle.take(t0 + ms(700), |_| stamp(1), |_| false).unwrap();
        assert_eq!(batch.targets, vec!["config"]);
        assert!(batch.still_writing.is_empty());
        assert!(settle.is_idle());
        assert_eq!(settle.take(t0 + ms(2000), |_| stamp(1), |_| false), None);
    }

    #[test]
    fn targets_changed_together_make_one_batch() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        settle.record("app", Activity::Changed, stamp(1), t0);
        settle.record("binary", Activity::Changed, stamp(2), t0 + ms(200));
        // The app file is quiet, the binary not yet: nothing is taken.
        assert_eq!(
            settle.take(t0 + ms(350), |_| stamp(1).or(stamp(2)), |_| false),
            None
        );
        let stamps = |k: &&str| if *k == "app" { stamp(1) } else { stamp(2) };
        let batch = settle.take(t0 + ms(500), stamps, |_| false).unwrap();
        assert_eq!(batch.targets, vec!["app", "binary"]);
    }

    #[test]
    fn a_file_open_for_writing_is_waited_for_however_slow_the_writer() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        let binary = Path::new("/srv/hello");
        // A writer that pauses longer than the quiet period between chunks.
        for chunk in 0..4u64 {
            let at = t0 + ms(chunk * 1000);
            settle.record("binary", Activity::Writing(binary), stamp(chunk), at);
            assert_eq!(
                settle.take(at + ms(900), |_| stamp(chunk), |_| true),
                None,
                "chunk {chunk}"
            );
        }
        settle.record("binary", Activity::Closed(binary), stamp(4), t0 + ms(3100));
        assert_eq!(settle.take(t0 + ms(3300), |_| stamp(4), |_| false), None);
        let batch = settle.take(t0 + ms(3400), |_| stamp(4), |_| false).unwrap();
        assert_eq!(batch.targets, vec!["binary"]);
        assert!(batch.still_writing.is_empty());
    }

    #[test]
    fn a_file_that_changes_without_events_is_not_settled() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        settle.record("binary", Activity::Changed, stamp(10), t0);
        // Grew since its last event (written through a mapping).
        assert_eq!(settle.take(t0 + ms(300), |_| stamp(20), |_| false), None);
        // Stable for a quiet period from then.
        assert_eq!(settle.take(t0 + ms(500), |_| stamp(20), |_| false), None);
        assert!(settle
            .take(t0 + ms(600), |_| stamp(20), |_| false)
            .is_some());
    }

    #[test]
    fn a_writer_that_never_closes_holds_its_target_until_the_cap() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        let file = Path::new("/srv/data");
        settle.record("extra", Activity::Writing(file), stamp(1), t0);
        assert_eq!(settle.take(t0 + ms(9_000), |_| stamp(1), |_| true), None);
        assert_eq!(settle.next_check(t0 + ms(9_000)), Some(t0 + CAP));
        let batch = settle.take(t0 + CAP, |_| stamp(1), |_| true).unwrap();
        assert_eq!(batch.still_writing, vec![file.to_path_buf()]);
    }

    #[test]
    fn a_modification_with_no_writer_left_is_not_waited_for() {
        // `touch -m`, `truncate`: inotify says modified, nobody has it open.
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        let file = Path::new("/srv/baton.toml");
        settle.record("config", Activity::Writing(file), stamp(1), t0);
        let batch = settle.take(t0 + QUIET, |_| stamp(1), |_| false).unwrap();
        assert_eq!(batch.targets, vec!["config"]);
        assert!(batch.still_writing.is_empty());
    }

    #[test]
    fn writers_are_looked_up_once_a_quiet_period() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        let file = Path::new("/srv/hello");
        settle.record("binary", Activity::Writing(file), stamp(1), t0);
        let looked = std::cell::Cell::new(0);
        let writing = |_: &Path| {
            looked.set(looked.get() + 1);
            true
        };
        for n in 0..10 {
            assert_eq!(
                settle.take(t0 + QUIET + ms(n * 20), |_| stamp(1), writing),
                None
            );
        }
        assert_eq!(looked.get(), 1);
        assert_eq!(settle.take(t0 + QUIET * 2, |_| stamp(1), writing), None);
        assert_eq!(looked.get(), 2);
    }

    #[test]
    fn a_busy_target_holds_the_others_back_until_the_cap_only() {
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        settle.record("config", Activity::Changed, stamp(1), t0);
        // A directory with a log written every 100 ms.
        let mut now = t0;
        while now < t0 + CAP {
            settle.record("logs", Activity::Changed, None, now);
            assert_eq!(settle.take(now, |_| stamp(1), |_| false), None);
            now += ms(100);
        }
        settle.record("logs", Activity::Changed, None, now);
        let batch = settle.take(
            now,
            |k| if *k == "config" { stamp(1) } else { None },
            |_| false,
        );
        assert_eq!(batch.unwrap().targets, vec!["config"]);
        assert!(!settle.is_idle());
    }

    #[test]
    fn a_file_removed_and_created_again_is_one_change() {
        // `cargo build`: the old binary removed, the new one linked.
        let t0 = Instant::now();
        let mut settle = Settle::new(QUIET, CAP);
        settle.record("binary", Activity::Changed, None, t0);
        settle.record("binary", Activity::Changed, stamp(7), t0 + ms(1));
        let batch = settle.take(t0 + ms(301), |_| stamp(7), |_| false).unwrap();
        assert_eq!(batch.targets, vec!["binary"]);
    }
}
