//! A worker that joins the generation while an in-place reload runs (a
//! scale, SIGTTIN, a crash's respawn) serves the version the reload leaves
//! in service, and status says so: no worker keeps the old app config past
//! `committed`.

use crate::in_place::{config_timed, reload, start_with, wait_versions, write_app, WORKERS};
use baton_tests::harness::{current_workers, event_name, field, message, Baton};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::time::Duration;

/// The pid of worker `index` of the current generation.
fn worker_pid(baton: &Baton, index: u32) -> Pid {
    let status = baton.status();
    let worker = current_workers(&status)
        .into_iter()
        .find(|w| w["index"] == index)
        .unwrap_or_else(|| panic!("no worker {index}: {status}"));
    Pid::from_raw(worker["pid"].as_i64().unwrap() as i32)
}

/// Sends new connections until every worker of `status`'s current
/// generation answered (at most 2,000): each worker's pid and the
/// versions it answered with.
fn versions_served(baton: &Baton, status: &serde_json::Value) -> BTreeMap<i64, Vec<String>> {
    let pids: Vec<i64> = current_workers(status)
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let mut served: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for _ in 0..2000 {
        if pids.iter().all(|p| served.contains_key(p)) {
            break;
        }
        let (code, _, body) = baton_tests::harness::get(baton.address("http")).unwrap();
        assert_eq!(code, 200, "{body}");
        // `rate=R version=V pid=P`
        let value = |key: &str| {
            body.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {body:?}"))
                .to_string()
        };
        let pid: i64 = value("pid=").parse().unwrap();
        served.entry(pid).or_default().push(value("version="));
    }
    assert!(
        pids.iter().all(|p| served.contains_key(p)),
        "not every worker answered: {served:?}, workers {pids:?}"
    );
    served
}

/// Every worker of the current generation answers with `version`, and
/// status and the metrics show each on it.
fn assert_every_worker_serves(baton: &Baton, workers: usize, version: &str) {
    let status = wait_versions(baton, workers, Some(version));
    for (pid, versions) in versions_served(baton, &status) {
        assert!(
            versions.iter().all(|v| v == version),
            "worker pid {pid} answered {versions:?} after the reload to {version} committed\n{status}"
        );
    }
    let admin: std::net::SocketAddr = status["master"]["admin"].as_str().unwrap().parse().unwrap();
    let (code, _, metrics) = baton_tests::harness::get_path(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    let rows: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("baton_worker_config_info{"))
        .collect();
    assert_eq!(rows.len(), workers, "{metrics}");
    let on_version = format!("version=\"{version}\"");
    assert!(rows.iter().all(|r| r.contains(&on_version)), "{rows:#?}");
}

/// [`config_timed`] with a 10 s `prepare_timeout` and the admin endpoint.
fn config() -> String {
    config_timed("10s", "5s", "").replacen(
        "[supervisor]\n",
        "[supervisor]\nadmin = \"127.0.0.1:0\"\n",
        1,
    )
}

/// Worker 0 parses slowly (stopped), `rate = 2` is reloaded in place in
/// the background, `join` runs 0.4 s later, and worker 0 resumes 1.1 s
/// after that: the reload commits and every worker, the one that joined
/// too, serves the new version.
fn joining_during_prepare(workers_after: usize, join: impl FnOnce(&Baton)) {
    let baton = start_with(&config(), "rate = 1\n");
    let slow = worker_pid(&baton, 0);
    kill(slow, Signal::SIGSTOP).unwrap();
    write_app(&baton, "rate = 2\n");
    let (code, stdout, stderr) = std::thread::scope(|s| {
        let reloading = s.spawn(|| reload(&baton, &["--in-place"]));
        baton.wait_event(Duration::from_secs(10), |e| {
            message(e) == "reload in place: preparing"
        });
        std::thread::sleep(Duration::from_millis(400));
        join(&baton);
        std::thread::sleep(Duration::from_millis(1100));
        kill(slow, Signal::SIGCONT).unwrap();
        reloading.join().unwrap()
    });
    assert_eq!(code, 0, "{stdout}{stderr}");
    let version = stdout
        .strip_prefix("reload in place to version ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_string();
    assert!(stdout.contains(" committed "), "{stdout}");
    assert_every_worker_serves(&baton, workers_after, &version);
}

#[test]
fn a_worker_scaled_up_during_prepare_serves_the_committed_version() {
    joining_during_prepare(WORKERS as usize + 1, |baton| {
        let out = baton.cli(&["scale", "+1"]);
        assert!(out.status.success());
    });
}

#[test]
fn a_worker_added_by_sigttin_during_prepare_serves_the_committed_version() {
    joining_during_prepare(WORKERS as usize + 1, |baton| {
        baton.signal(Signal::SIGTTIN);
    });
}

#[test]
fn a_worker_respawned_after_a_crash_during_prepare_serves_the_committed_version() {
    joining_during_prepare(WORKERS as usize, |baton| {
        // Worker 2 prepared long ago; its respawn is due in 100 ms.
        kill(worker_pid(baton, 2), Signal::SIGKILL).unwrap();
        baton.wait_event(Duration::from_secs(5), |e| {
            event_name(e) == "worker.respawning" && field(e, "worker") == "2"
        });
    });
}

/// Workers 0 and 1 are stopped; worker 1 resumes to prepare and is stopped
/// again, then worker 0 resumes: the commit waits on worker 1 while a
/// worker is added; worker 1 then resumes and commits.
#[test]
fn a_worker_scaled_up_during_commit_serves_the_committed_version() {
    let baton = start_with(&config(), "rate = 1\n");
    let (first, second) = (worker_pid(&baton, 0), worker_pid(&baton, 1));
    kill(first, Signal::SIGSTOP).unwrap();
    kill(second, Signal::SIGSTOP).unwrap();
    write_app(&baton, "rate = 2\n");
    let (code, stdout, stderr) = std::thread::scope(|s| {
        let reloading = s.spawn(|| reload(&baton, &["--in-place"]));
        baton.wait_event(Duration::from_secs(10), |e| {
            message(e) == "reload in place: preparing"
        });
        kill(second, Signal::SIGCONT).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        kill(second, Signal::SIGSTOP).unwrap();
        kill(first, Signal::SIGCONT).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let out = baton.cli(&["scale", "+1"]);
        assert!(out.status.success());
        std::thread::sleep(Duration::from_millis(600));
        kill(second, Signal::SIGCONT).unwrap();
        reloading.join().unwrap()
    });
    assert_eq!(code, 0, "{stdout}{stderr}");
    let version = baton.status()["last_reload"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_every_worker_serves(&baton, WORKERS as usize + 1, &version);
}
