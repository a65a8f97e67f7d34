//! The master's main thread forks every worker and performs an in-place
//! upgrade's `execve`; the event loop runs on a thread of its own.
//!
//! Why the main thread: a worker's parent-death signal (`PR_SET_PDEATHSIG`)
//! fires when the *thread* that forked it ends, not the process. `execve`
//! ends every thread but the one calling it, so the workers of any other
//! thread would be signalled at an in-place upgrade; and a thread of tokio's
//! blocking pool ends when it has been idle a while. The main thread ends
//! only with the process, and is the one that re-executes it, so its
//! workers outlive any number of in-place upgrades.
//!
//! Why not the loop's thread: forking a child that inherits a thousand
//! listeners and waiting for its `execve` takes milliseconds, which the loop
//! spends answering requests instead ([`spawn`]). What must happen before
//! the loop goes on waits for the answer ([`spawn_and_wait`]).
//!
//! In a process where [`run`] did not start the loop (unit tests), the
//! calling thread forks and execs itself, as it always could.

use crate::exec::Plan;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::OnceLock;

/// Called on the main thread with the outcome of a spawn.
type Done = Box<dyn FnOnce(anyhow::Result<Child>) + Send>;

enum Job {
    Spawn(Plan, Done),
    Exec(Command, mpsc::Sender<std::io::Error>),
    /// The loop's thread has ended.
    Finished,
}

/// The main thread's inbox, once [`run`] started the loop.
static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

/// Runs `event_loop` on a thread of its own and serves its forks and execs
/// here until it returns; returns what it returned.
///
/// # Panics
///
/// If called twice, or if the thread cannot be started; re-raises the
/// loop's panic.
pub fn run<T: Send + 'static>(event_loop: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, jobs) = mpsc::channel();
    assert!(
        JOBS.set(sender.clone()).is_ok(),
        "the event loop runs only once per process"
    );
    /// Tells the main thread the loop ended, even when it panicked.
    struct Finished(mpsc::Sender<Job>);
    impl Drop for Finished {
        fn drop(&mut self) {
            let _ = self.0.send(Job::Finished);
        }
    }
    let event_loop = std::thread::Builder::new()
        .name("baton-loop".into())
        // As much as the main thread has: the loop's futures live here.
        .stack_size(8 << 20)
        .spawn(move || {
            let _finished = Finished(sender);
            event_loop()
        })
        .expect("starting the event loop's thread");
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Spawn(plan, done) => done(crate::exec::spawn(plan)),
            Job::Exec(mut command, failed) => {
                let error = std::os::unix::process::CommandExt::exec(&mut command);
                let _ = failed.send(error);
            }
            Job::Finished => break,
        }
    }
    match event_loop.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Starts a worker on the main thread; `done` gets the child once it has
/// exec'd, or the step it failed at, on the main thread.
pub fn spawn(plan: Plan, done: impl FnOnce(anyhow::Result<Child>) + Send + 'static) {
    match JOBS.get() {
        Some(jobs) => {
            if let Err(mpsc::SendError(Job::Spawn(plan, done))) =
                jobs.send(Job::Spawn(plan, Box::new(done)))
            {
                // Only when the main thread is gone, which it never is
                // while the loop runs.
                done(crate::exec::spawn(plan));
            }
        }
        None => done(crate::exec::spawn(plan)),
    }
}

/// Starts a worker on the main thread and waits until it has exec'd.
pub fn spawn_and_wait(plan: Plan) -> anyhow::Result<Child> {
    let (sender, outcome) = mpsc::sync_channel(1);
    spawn(plan, move |result| {
        let _ = sender.send(result);
    });
    outcome
        .recv()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the main thread is gone")))
}

/// Executes `command` in place of this process, from the main thread.
/// Returns only if that failed, with why.
pub fn exec(mut command: Command) -> std::io::Error {
    let Some(jobs) = JOBS.get() else {
        return std::os::unix::process::CommandExt::exec(&mut command);
    };
    let (sender, failed) = mpsc::channel();
    if jobs.send(Job::Exec(command, sender)).is_err() {
        return std::io::Error::other("the main thread is gone");
    }
    failed
        .recv()
        .unwrap_or_else(|_| std::io::Error::other("the main thread is gone"))
}
