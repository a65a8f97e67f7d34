use baton_tests::harness::{
    alive, assert_no_request_failed, event_name, field, hello_config, resetting_config,
    steady_load, wait_for_generation, Baton, Binaries, TempDir,
};
use baton_tests::load::Mode;
use nix::sys::signal::Signal;
use std::time::Duration;

fn exec_config(config: String) -> String {
    config.replace("[supervisor]\n", "[supervisor]\nupgrade = \"exec\"\n")
}

#[test]
fn in_place_upgrades_under_keepalive_load_keep_the_pid_adopt_workers_and_fail_no_request() {
    in_place_upgrades_under_load(&exec_config(hello_config(2)), Mode::KeepAlive);
}

/// Adopted generation sockets keep their place on the port: the fresh
/// generation is steered to, and the adopted one (whose workers reset what
/// they accept once told to stop) is signalled once nothing is queued.
#[test]
fn in_place_upgrades_under_new_connection_load_with_workers_that_reset_on_stop_fail_no_request() {
    in_place_upgrades_under_load(&exec_config(resetting_config()), Mode::NewConnection);
}

fn in_place_upgrades_under_load(config: &str, mode: Mode) {
    let mut baton = Baton::start(config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let load = steady_load(addr, mode);
    for generation in 2..=4u64 {
        let workers = baton.wait_workers(2, &[], Duration::from_secs(10));
        baton.skip_log();
        baton.signal(Signal::SIGUSR2);
        // The new image adopts the running workers, then replaces them with
        // a fresh generation as a reload would.
        for pid in &workers {
            baton.next_event(Duration::from_secs(20), |e| {
                event_name(e) == "worker.adopted" && field(e, "pid") == pid.to_string()
            });
        }
        let committed = baton.wait_committed(generation);
        assert_eq!(committed["span"]["trigger"], "upgrade");
        baton.wait_workers(2, &workers, Duration::from_secs(10));
        assert_eq!(baton.master_pid(), Some(baton.pid()), "the pid stays");
        assert!(alive(baton.pid()));
    }
    wait_for_generation(&load, 4);
    let report = load.stop();
    assert_no_request_failed(&report, &format!("{mode:?} across 3 in-place upgrades"), 4);
    let status = baton.status();
    assert_eq!(status["master"]["pid"], baton.pid().as_raw());
    assert_eq!(status["generations"].as_array().unwrap().len(), 1);
}

#[test]
fn in_place_upgrade_whose_check_fails_changes_nothing() {
    let dir = TempDir::new();
    let binary = dir.path().join("baton");
    std::fs::copy(Binaries::baton(), &binary).unwrap();
    std::fs::write(dir.path().join("baton.toml"), exec_config(hello_config(2))).unwrap();
    let baton = Baton::start_binary(&binary, dir, &["run"]);
    baton.wait_committed(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(5));
    {
        use std::os::unix::fs::PermissionsExt;
        let tmp = binary.with_extension("new");
        std::fs::write(
            &tmp,
            "#!/bin/sh\necho \"config rejected by the new binary\" >&2\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &binary).unwrap();
    }
    let out = baton.cli(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("phase check"), "{stderr}");
    assert!(
        stderr.contains("config rejected by the new binary"),
        "{stderr}"
    );
    assert_eq!(baton.wait_workers(2, &[], Duration::from_secs(5)), workers);
    assert_eq!(baton.count_events(|e| event_name(e) == "worker.adopted"), 0);
    assert_eq!(baton.status()["master"]["current_generation"], 1);
}
