//! In-place reloads: when only `[worker] app_config` changed, every worker
//! swaps the new configuration in, all or nothing, and no process is
//! replaced.

use baton_tests::harness::{
    config_with_worker, current_workers, event_name, field, message, Baton, Binaries, TempDir,
};
use baton_tests::load::Mode;
use std::time::Duration;

pub(crate) const WORKERS: u32 = 4;

/// `testworker app` with `app.conf`, 4 workers.
fn config(extra: &str) -> String {
    config_timed("2s", "5s", extra)
}

/// `testworker app` with `app.conf`, 4 workers, the given
/// `prepare_timeout` and `drain_timeout`.
pub(crate) fn config_timed(prepare: &str, drain: &str, extra: &str) -> String {
    config_with_worker(&format!(
        "command = [{:?}, \"app\"]\nprocesses = {WORKERS}\nready_timeout = \"10s\"\ndrain_timeout = {drain:?}\n\
         app_config = [\"app.conf\"]\nprepare_timeout = {prepare:?}\n{extra}",
        Binaries::testworker().display().to_string()
    ))
}

fn start(app: &str) -> Baton {
    start_with(&config(""), app)
}

/// A master running `config` with `app` as `app.conf`, once every worker
/// registered its reload handle.
pub(crate) fn start_with(config: &str, app: &str) -> Baton {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    std::fs::write(dir.path().join("app.conf"), app).unwrap();
    let baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    wait_versions(&baton, WORKERS as usize, None);
    baton
}

/// Waits until the current generation has `count` ready workers that each
/// registered a reload handle (on `version`, if given); returns the status.
pub(crate) fn wait_versions(
    baton: &Baton,
    count: usize,
    version: Option<&str>,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = baton.status();
        let workers = current_workers(&status);
        let on_version = |w: &serde_json::Value| match version {
            Some(v) => w["config_version"] == v,
            None => w["config_version"].is_string(),
        };
        if workers.len() == count
            && workers
                .iter()
                .all(|w| on_version(w) && w["state"] == "ready")
        {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn write_app(baton: &Baton, app: &str) {
    std::fs::write(baton.dir().join("app.conf"), app).unwrap();
}

/// `baton reload` (with `args`): its output and exit code.
pub(crate) fn reload(baton: &Baton, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["reload"];
    all.extend(args);
    let out = baton.cli(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What `n` new connections are answered: `rate=R version=V` of each.
fn answers(baton: &Baton, n: u64) -> Vec<String> {
    (0..n)
        .map(|_| {
            let (status, _, body) = baton_tests::harness::get(baton.address("http")).unwrap();
            assert_eq!(status, 200);
            body.split(" pid=").next().unwrap().to_string()
        })
        .collect()
}

#[test]
fn in_place_reloads_under_load_keep_every_pid_and_fail_nothing() {
    let baton = start("rate = 1\n");
    let pids = baton.workers();
    let load = baton_tests::harness::steady_load(baton.address("http"), Mode::KeepAlive);
    for rate in 2..=101 {
        write_app(&baton, &format!("rate = {rate}\n"));
        let (code, stdout, stderr) = reload(&baton, &[]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(
            stdout.starts_with("reload in place to version "),
            "{stdout}"
        );
        assert!(
            stdout.contains("prepare") && stdout.contains("commit"),
            "{stdout}"
        );
        // Once `baton reload` returned, no answer carries the old version.
        for answer in answers(&baton, 8) {
            assert!(
                answer.starts_with(&format!("rate={rate} ")),
                "after reload {rate}: {answer}"
            );
        }
    }
    let report = load.stop();
    assert!(report.ok() > 100, "{}", report.ok());
    assert_eq!(report.failed(), 0, "{}", report.failures_summary());
    assert_eq!(baton.workers(), pids, "no process was replaced");
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 1, "{status}");
    assert_eq!(status["last_reload"]["kind"], "in_place", "{status}");
    let version = status["last_reload"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    for worker in status["generations"][0]["workers"].as_array().unwrap() {
        assert_eq!(worker["config_version"], version.as_str(), "{status}");
    }
}

#[test]
fn one_refusal_changes_no_worker_and_the_next_good_reload_works() {
    let baton = start("rate = 1\n");
    let pids = baton.workers();
    for (app, reason) in [
        (
            "rate = 2\nrefuse_worker = 2\n",
            "worker 2 refuses this config",
        ),
        ("rate = 0\n", "rate must be > 0"),
    ] {
        write_app(&baton, app);
        let (code, _, stderr) = reload(&baton, &[]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("reload failed in phase prepare: refused by worker ")
                && stderr.contains(reason),
            "{stderr}"
        );
        for answer in answers(&baton, 8) {
            assert!(answer.starts_with("rate=1 "), "{answer}");
        }
    }
    write_app(&baton, "rate = 3\n");
    let (code, stdout, stderr) = reload(&baton, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for answer in answers(&baton, 8) {
        assert!(answer.starts_with("rate=3 "), "{answer}");
    }
    assert_eq!(baton.workers(), pids);
}

#[test]
fn a_worker_that_never_answers_prepare_aborts_the_reload_and_is_replaced() {
    let mut baton = start("rate = 1\n");
    baton.skip_log();
    write_app(&baton, "rate = 2\nhang_worker = 1\n");
    let (code, _, stderr) = reload(&baton, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("worker 1 (pid ") && stderr.contains("did not answer prepare within 2s"),
        "{stderr}"
    );
    // The hung worker is killed and respawned with the version in service.
    baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.exited" && field(e, "worker") == "1"
    });
    baton.next_event(Duration::from_secs(10), |e| {
        message(e) == "worker registered its reload handle" && field(e, "worker") == "1"
    });
    for answer in answers(&baton, 16) {
        assert!(answer.starts_with("rate=1 "), "{answer}");
    }
}

#[test]
fn a_worker_that_dies_between_prepare_and_commit_comes_back_with_the_committed_version() {
    let mut baton = start("rate = 1\n");
    baton.skip_log();
    write_app(&baton, "rate = 2\nexit_worker = 3\n");
    let (code, stdout, stderr) = reload(&baton, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let exited = baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.exited" && field(e, "worker") == "3"
    });
    assert_eq!(field(&exited, "status"), "exit status 3", "{exited}");
    baton.next_event(Duration::from_secs(10), |e| {
        message(e) == "worker registered its reload handle" && field(e, "worker") == "3"
    });
    for answer in answers(&baton, 16) {
        assert!(answer.starts_with("rate=2 "), "{answer}");
    }
}

#[test]
fn a_change_beyond_app_config_runs_a_new_generation_and_in_place_then_says_why() {
    let baton = start("rate = 1\n");
    let pids = baton.workers();
    write_app(&baton, "rate = 2\n");
    baton.write_config(&config("stop_signal = \"SIGINT\"\n"));
    let (code, stdout, stderr) = reload(&baton, &["--in-place"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("cannot reload in place: the [worker] settings changed"),
        "{stderr}"
    );
    assert_eq!(baton.workers(), pids, "nothing changed");
    let (code, stdout, stderr) = reload(&baton, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("reload to generation 2 committed"),
        "{stdout}"
    );
    // Nothing changed since: a reload is a new generation, as always.
    let (code, stdout, _) = reload(&baton, &[]);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("reload to generation 3 committed"),
        "{stdout}"
    );
    // --new-generation forces one even when in place would do.
    write_app(&baton, "rate = 5\n");
    let (code, stdout, _) = reload(&baton, &["--new-generation"]);
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("reload to generation 4 committed"),
        "{stdout}"
    );
}

#[test]
fn the_workers_log_filter_switches_in_place_with_the_app_config() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("baton.toml"),
        config("log_filter = \"warn\"\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("app.conf"), "rate = 1\n").unwrap();
    let baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let served = |e: &serde_json::Value| e["raw"].as_str().is_some_and(|l| l.contains("served"));
    answers(&baton, 8);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        baton.count_events(served),
        0,
        "info is filtered out under warn"
    );
    baton.write_config(&config("log_filter = \"info\"\n"));
    let (code, stdout, stderr) = reload(&baton, &["--in-place"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    answers(&baton, 8);
    baton.wait_event(Duration::from_secs(5), served);
    baton.write_config(&config("log_filter = \"info,,bad=[\"\n"));
    let (code, _, stderr) = reload(&baton, &["--in-place"]);
    assert_ne!(code, 0, "{stderr}");
}
