//! `baton run --watch`: a changed app file reloads in place, a changed
//! config or executable starts a new generation, a binary being written is
//! waited for, a broken one fails its reload while the old generation
//! serves, a ConfigMap's `..data` swap is seen, a touch is not a change,
//! and nothing in flight is dropped.

use baton_tests::harness::{
    assert_no_request_failed, config_with_worker, current_workers, event_name, field, get,
    steady_load, wait_for_generation, Baton, Binaries, TempDir,
};
use baton_tests::load::Mode;
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// `[worker]` running `command` (relative to the config's directory),
/// 2 processes, with `app` as its `app_config`.
fn config(command: &str, app: &str) -> String {
    config_with_worker(&format!(
        "command = [{command:?}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n\
         app_config = [{app:?}]\n"
    ))
}

/// A master started with `baton run --watch ARGS` in `dir` (holding
/// `baton.toml`), once generation 1 serves, every worker registered its
/// reload handle and the watcher watches.
fn start(dir: TempDir, args: &[&str]) -> Baton {
    let mut run = vec!["run", "--watch"];
    run.extend_from_slice(args);
    let baton = Baton::start_in(dir, &run);
    baton.wait_committed(1);
    baton.wait_event(WAIT, |e| event_name(e) == "watch.started");
    let deadline = Instant::now() + WAIT;
    loop {
        let workers = current_workers(&baton.status());
        if workers.len() == 2 && workers.iter().all(|w| w["config_version"].is_string()) {
            break baton;
        }
        assert!(Instant::now() < deadline, "workers without reload handles");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temp dir with `hello.toml` saying `greeting`, and a copy of `hello`
/// as `./hello` when `copy` (so that the test can replace it).
fn dir_with(greeting: &str, copy: bool) -> TempDir {
    let dir = TempDir::new();
    write_greeting(dir.path(), greeting);
    if copy {
        std::fs::copy(Binaries::hello(), dir.path().join("hello")).unwrap();
    }
    dir
}

/// A dir with a copy of `hello` of its own (to rebuild or break) and a
/// config running it.
fn with_own_hello() -> TempDir {
    let dir = dir_with("hello", true);
    std::fs::write(
        dir.path().join("baton.toml"),
        config("./hello", "hello.toml"),
    )
    .unwrap();
    dir
}

fn write_greeting(dir: &Path, greeting: &str) {
    std::fs::write(dir.join("hello.toml"), format!("greeting = {greeting:?}\n")).unwrap();
}

/// The body `GET /` answers now.
fn body(baton: &Baton) -> String {
    get(baton.address("http")).expect("GET /").2
}

/// The outcome of the next reload.
fn next_outcome(baton: &mut Baton) -> Value {
    baton.next_event(WAIT, |e| {
        matches!(event_name(e), "reload.committed" | "reload.failed")
    })
}

/// `baton status`'s last reload.
fn last_reload(baton: &Baton) -> Value {
    baton.status()["last_reload"].clone()
}

fn count(baton: &Baton, name: &str) -> usize {
    baton.count_events(|e| event_name(e) == name)
}

/// The test binary `hello`, with a byte appended: another file that still
/// runs (an ELF file's trailing bytes are not loaded).
fn rebuilt_hello() -> Vec<u8> {
    let mut bytes = std::fs::read(Binaries::hello()).unwrap();
    bytes.push(b'\n');
    bytes
}

/// Writes `bytes` to `path` (a new file, mode 0755) in `chunks` writes,
/// `pause` apart, as a slow linker or copy does.
fn write_slowly(path: &Path, bytes: &[u8], chunks: usize, pause: Duration) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)
        .unwrap();
    for chunk in bytes.chunks(bytes.len().div_ceil(chunks)) {
        file.write_all(chunk).unwrap();
        file.flush().unwrap();
        std::thread::sleep(pause);
    }
}

/// Replaces `path` by `bytes` as `mv` does (rename over it).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn an_app_config_edit_reloads_in_place() {
    let dir = dir_with("hello", false);
    let hello = Binaries::hello().display().to_string();
    std::fs::write(dir.path().join("baton.toml"), config(&hello, "hello.toml")).unwrap();
    let mut baton = start(dir, &[]);
    assert_eq!(body(&baton), "hello from generation 1\n");
    baton.skip_log();
    write_greeting(baton.dir(), "howdy");
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(body(&baton), "howdy from generation 1\n");
    let last = last_reload(&baton);
    assert_eq!(last["trigger"], "watch", "{last}");
    assert_eq!(last["kind"], "in_place", "{last}");
    assert_eq!(last["requested_by"]["via"], "watch", "{last}");
    assert!(
        last["requested_by"]["changed"]
            .as_str()
            .is_some_and(|c| c.contains("hello.toml")),
        "{last}"
    );
}

#[test]
fn a_config_edit_starts_a_new_generation() {
    let dir = dir_with("hello", false);
    let hello = Binaries::hello().display().to_string();
    let text = config(&hello, "hello.toml");
    std::fs::write(dir.path().join("baton.toml"), &text).unwrap();
    let mut baton = start(dir, &[]);
    baton.skip_log();
    baton.write_config(&text.replace("processes = 2", "processes = 3"));
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let last = last_reload(&baton);
    assert_eq!(
        (&last["trigger"], &last["kind"]),
        (&"watch".into(), &"new_generation".into()),
        "{last}"
    );
    assert_eq!(last["generation"], 2, "{last}");
    assert_eq!(current_workers(&baton.status()).len(), 3);
}

/// Writing the same bytes again, or only touching a file, is no change:
/// the one reload is the real edit's.
#[test]
fn a_touch_that_changes_no_content_does_not_reload() {
    let dir = with_own_hello();
    let mut baton = start(dir, &[]);
    let now = std::time::SystemTime::now();
    let now = std::fs::FileTimes::new()
        .set_accessed(now)
        .set_modified(now);
    for name in ["baton.toml", "hello.toml", "hello"] {
        // Read-only: a running executable cannot be opened for writing.
        let file = std::fs::File::open(baton.dir().join(name)).unwrap();
        file.set_times(now).unwrap();
    }
    // The same greeting, written anew through a rename.
    let tmp = baton.dir().join("hello.toml.tmp");
    std::fs::write(&tmp, "greeting = \"hello\"\n").unwrap();
    std::fs::rename(&tmp, baton.dir().join("hello.toml")).unwrap();
    // Well past the quiet period, so that a reload for them would come
    // before the edit's.
    std::thread::sleep(Duration::from_secs(1));
    baton.skip_log();
    write_greeting(baton.dir(), "howdy");
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(count(&baton, "watch.changed"), 1);
    assert_eq!(count(&baton, "reload.started"), 2, "the start and the edit");
    // (A new generation: the master tells its executable by identity and
    // modification time, and that was touched.)
    assert!(body(&baton).starts_with("howdy from generation"));
}

/// A binary written in chunks more than the quiet period apart is not
/// reloaded until its writer closed it: one reload, of the whole file.
#[test]
fn a_binary_written_slowly_reloads_once_when_complete() {
    let dir = with_own_hello();
    let mut baton = start(dir, &[]);
    baton.skip_log();
    let path = baton.dir().join("hello");
    // The running workers keep the old inode.
    std::fs::remove_file(&path).unwrap();
    write_slowly(&path, &rebuilt_hello(), 5, Duration::from_millis(500));
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(last_reload(&baton)["generation"], 2);
    assert_eq!(body(&baton), "hello from generation 2\n");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&baton, "watch.changed"), 1);
    assert_eq!(count(&baton, "reload.failed"), 0);
}

/// As `cargo build` does: the new binary written under another name in the
/// same directory, then the old one removed and the new one linked in.
#[test]
fn a_cargo_style_rebuild_reloads_once() {
    let dir = with_own_hello();
    let mut baton = start(dir, &[]);
    baton.skip_log();
    let built = baton.dir().join("hello-5f8a1c2d");
    write_slowly(&built, &rebuilt_hello(), 4, Duration::from_millis(400));
    std::fs::remove_file(baton.dir().join("hello")).unwrap();
    std::fs::hard_link(&built, baton.dir().join("hello")).unwrap();
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(body(&baton), "hello from generation 2\n");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&baton, "watch.changed"), 1);
}

/// A build that produces a program that fails (a script exiting 1, then a
/// truncated binary): each reload fails, generation 1 goes on serving, and
/// the log says which watched change failed and why.
#[test]
fn a_broken_binary_fails_its_reload_and_the_old_generation_serves() {
    let dir = with_own_hello();
    let mut baton = start(dir, &[]);
    let path = baton.dir().join("hello");
    let good = std::fs::read(&path).unwrap();
    let broken: [(&[u8], &str); 2] = [
        (
            b"#!/bin/sh\necho 'hello: broken build' >&2\nexit 1\n",
            "exit status 1",
        ),
        // Cut inside its program headers: the kernel cannot load it.
        (&good[..128], "worker 0"),
    ];
    for (bytes, reason) in broken {
        baton.skip_log();
        replace(&path, bytes);
        let outcome = next_outcome(&mut baton);
        assert_eq!(event_name(&outcome), "reload.failed", "{outcome}");
        let failed = baton.next_event(WAIT, |e| event_name(e) == "watch.reload_failed");
        assert!(field(&failed, "reason").contains(reason), "{failed}");
        assert!(field(&failed, "changed").contains("executable"), "{failed}");
        assert!(field(&failed, "changed").ends_with("/hello"), "{failed}");
        assert_eq!(body(&baton), "hello from generation 1\n");
    }
    // The next good build is served.
    baton.skip_log();
    replace(&path, &rebuilt_hello());
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    assert_eq!(body(&baton), "hello from generation 4\n");
}

/// A ConfigMap volume: `config/..data -> ..2026_12_07_N`, `config/hello.toml
/// -> ..data/hello.toml`; an update is a new directory and a `..data`
/// swap, which no event on `hello.toml` itself says.
#[test]
fn a_configmap_data_swap_is_seen() {
    fn publish(dir: &Path, version: u32, greeting: &str) {
        let data = format!("..2026_12_07_{version:02}");
        std::fs::create_dir(dir.join(&data)).unwrap();
        write_greeting(&dir.join(&data), greeting);
        symlink(&data, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if version == 1 {
            symlink("..data/hello.toml", dir.join("hello.toml")).unwrap();
        } else {
            std::fs::remove_dir_all(dir.join(format!("..2026_12_07_{:02}", version - 1))).unwrap();
        }
    }
    let dir = TempDir::new();
    let volume = dir.path().join("config");
    std::fs::create_dir(&volume).unwrap();
    publish(&volume, 1, "hello");
    let hello = Binaries::hello().display().to_string();
    std::fs::write(
        dir.path().join("baton.toml"),
        config(&hello, "config/hello.toml"),
    )
    .unwrap();
    let mut baton = start(dir, &[]);
    assert_eq!(body(&baton), "hello from generation 1\n");
    for (version, greeting) in [(2, "howdy"), (3, "bonjour")] {
        baton.skip_log();
        publish(&volume, version, greeting);
        let outcome = next_outcome(&mut baton);
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        assert_eq!(body(&baton), format!("{greeting} from generation 1\n"));
    }
    assert_eq!(last_reload(&baton)["kind"], "in_place");
}

/// `--watch PATH`: a change under a watched directory starts a new
/// generation; a path that is not there is refused at start, by name.
#[test]
fn a_watch_path_change_starts_a_new_generation() {
    let dir = dir_with("hello", false);
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    std::fs::write(dir.path().join("templates/index.html"), "<p>hello</p>").unwrap();
    let hello = Binaries::hello().display().to_string();
    std::fs::write(dir.path().join("baton.toml"), config(&hello, "hello.toml")).unwrap();
    let mut baton = start(dir, &["--watch", "templates"]);
    baton.skip_log();
    std::fs::write(baton.dir().join("templates/index.html"), "<p>hi</p>").unwrap();
    let outcome = next_outcome(&mut baton);
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let last = last_reload(&baton);
    assert_eq!(
        (&last["generation"], &last["trigger"]),
        (&2.into(), &"watch".into()),
        "{last}"
    );

    let out = std::process::Command::new(Binaries::baton())
        .args(["run", "--watch", "no-such-dir", "-c"])
        .arg(baton.dir().join("baton.toml"))
        .current_dir(baton.dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--watch {}",
            baton.dir().join("no-such-dir").display()
        )) && stderr.contains("No such file or directory"),
        "{stderr}"
    );
}

/// Under a closed-loop load on new connections, an app file edit (in
/// place), a new binary and a config edit (new generations) fail no
/// request.
#[test]
fn watched_changes_under_load_fail_no_request() {
    let dir = dir_with("hello", true);
    let text = config("./hello", "hello.toml");
    std::fs::write(dir.path().join("baton.toml"), &text).unwrap();
    let mut baton = start(dir, &[]);
    let load = steady_load(baton.address("http"), Mode::NewConnection);
    type Change = Box<dyn Fn(&Path)>;
    let changes: [(&str, Change); 3] = [
        ("app file", Box::new(|dir| write_greeting(dir, "howdy"))),
        (
            "binary",
            Box::new(|dir| replace(&dir.join("hello"), &rebuilt_hello())),
        ),
        (
            "config",
            Box::new(move |dir| {
                std::fs::write(
                    dir.join("baton.toml"),
                    text.replace("processes = 2", "processes = 3"),
                )
                .unwrap()
            }),
        ),
    ];
    for (what, change) in changes {
        baton.skip_log();
        change(baton.dir());
        let outcome = next_outcome(&mut baton);
        assert_eq!(
            event_name(&outcome),
            "reload.committed",
            "{what}: {outcome}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for_generation(&load, 3);
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop();
    assert_no_request_failed(&report, "watched changes", 3);
}

/// The pid of the master answering on the control socket (which is gone
/// for a moment while a new master takes over).
fn master_pid(baton: &Baton) -> i64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = baton.cli(&["status", "--json"]);
        if out.status.success() {
            let status: Value = serde_json::from_slice(&out.stdout).unwrap();
            return status["master"]["pid"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "no master answers");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The masters that replace a watching one watch too: a binary upgrade's
/// new master (started with the same `--watch`, in a child or in place)
/// and `baton restart`'s (started by the keeper with this master's
/// command line). Each from a master `baton run` started: a master that
/// replaced another does not survive an in-place upgrade, nor one started
/// by an in-place upgrade a child-mode one, watching or not.
#[test]
fn an_upgraded_or_restarted_master_watches_too() {
    for (how, mode) in [
        ("upgrade", "child"),
        ("upgrade", "exec"),
        ("restart", "child"),
    ] {
        let dir = dir_with("hello", false);
        std::fs::create_dir(dir.path().join("static")).unwrap();
        let hello = Binaries::hello().display().to_string();
        let line = format!("[supervisor]\nupgrade = {mode:?}\n");
        let text = config(&hello, "hello.toml").replace("[supervisor]\n", &line);
        std::fs::write(dir.path().join("baton.toml"), &text).unwrap();
        let mut baton = start(dir, &["--watch", "static"]);
        let old = master_pid(&baton);
        baton.skip_log();
        let out = baton.cli(&[how]);
        assert!(out.status.success(), "{how} ({mode}): {out:?}");
        let new = master_pid(&baton);
        let watching = baton.next_event(WAIT, |e| event_name(e) == "watch.started");
        assert!(
            field(&watching, "watching").contains("/static"),
            "{watching}"
        );
        if mode == "exec" {
            assert_eq!(new, old, "an upgrade in place keeps the pid");
        } else {
            assert_ne!(new, old, "{how}");
            baton_tests::harness::wait_gone(nix::unistd::Pid::from_raw(old as i32), "old master");
        }
        baton.skip_log();
        write_greeting(baton.dir(), "howdy");
        let outcome = next_outcome(&mut baton);
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
        assert!(body(&baton).starts_with("howdy"), "{how} ({mode})");
        let last = last_reload(&baton);
        assert_eq!(last["trigger"], "watch", "{how} ({mode}): {last}");
    }
}
