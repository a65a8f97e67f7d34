//! A worker that does not answer an in-place prepare (a hung parser, a
//! stopped process) is replaced promptly once the reload is aborted, by a
//! stop of the master as by another worker's refusal: it cannot hear a
//! drain, and nothing waits for its drain deadline.

use crate::in_place::{config_timed, reload, start_with, wait_versions, write_app, WORKERS};
use baton_tests::harness::{event_name, field, message, steady_load, Baton};
use baton_tests::load::Mode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// The pids of the current generation's workers by index.
fn worker_pids(baton: &Baton) -> Vec<(u32, Pid)> {
    let status = wait_versions(baton, WORKERS as usize, None);
    status["generations"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["index"].as_u64().unwrap() as u32,
                Pid::from_raw(w["pid"].as_i64().unwrap() as i32),
            )
        })
        .collect()
}

#[test]
fn sigterm_during_a_prepare_with_a_stopped_worker_exits_long_before_the_drain_timeout() {
    let mut baton = start_with(&config_timed("2s", "30s", ""), "rate = 1\n");
    let pids = worker_pids(&baton);
    let hung = pids.iter().find(|(i, _)| *i == 1).unwrap().1;
    kill(hung, Signal::SIGSTOP).unwrap();
    let load = steady_load(baton.address("http"), Mode::KeepAlive);
    assert!(load.wait_for_ok(50, Duration::from_secs(10)));
    write_app(&baton, "rate = 2\n");
    let (signalled, sent) = std::thread::scope(|s| {
        let reloading = s.spawn(|| reload(&baton, &[]));
        baton.wait_event(Duration::from_secs(10), |e| {
            message(e) == "reload in place: preparing"
        });
        let signalled = load.run_start().elapsed();
        let sent = Instant::now();
        baton.signal(Signal::SIGTERM);
        // It answers when the reload is abandoned, or when the master exits.
        let _ = reloading.join();
        (signalled, sent)
    });
    // Well within the 30 s drain_timeout (the stopped worker is killed
    // once its prepare_timeout passes).
    let exit = baton.wait_exit(Duration::from_secs(10));
    eprintln!(
        "SIGTERM during a prepare with a stopped worker: the master exited after {:?}",
        sent.elapsed()
    );
    let report = load.stop();
    assert!(exit.success(), "{exit:?}");
    let failed: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.start < signalled && s.class.is_failure())
        .collect();
    assert!(report.ok() > 50, "too little traffic: {}", report.ok());
    assert!(
        failed.is_empty(),
        "{} requests failed: {}",
        failed.len(),
        report.failures_summary()
    );
    // The others drained and exited on their own.
    let exits = baton.events(|e| event_name(e) == "worker.exited");
    for (index, pid) in &pids {
        let exited = exits
            .iter()
            .find(|e| field(e, "pid") == pid.to_string())
            .unwrap_or_else(|| panic!("no exit of worker {index} (pid {pid}): {exits:?}"));
        if *index != 1 {
            assert_eq!(field(exited, "status"), "exit status 0", "{exited}");
            assert_eq!(field(exited, "state"), "draining", "{exited}");
        }
    }
}

#[test]
fn a_hung_parser_in_a_refused_reload_is_replaced_and_the_fleet_keeps_its_size() {
    let mut baton = start_with(&config_timed("2s", "5s", ""), "rate = 1\n");
    let pids = worker_pids(&baton);
    let hung = pids.iter().find(|(i, _)| *i == 1).unwrap().1;
    baton.skip_log();
    // Worker 2 refuses at once; worker 1's parser never returns.
    write_app(&baton, "rate = 2\nrefuse_worker = 2\nhang_worker = 1\n");
    let (code, _, stderr) = reload(&baton, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("refused by worker 2"), "{stderr}");
    let exited = baton.next_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.exited" && field(e, "worker") == "1"
    });
    assert_eq!(field(&exited, "pid"), hung.to_string(), "{exited}");
    // Replaced, with the version in service.
    let status = wait_versions(&baton, WORKERS as usize, None);
    let versions: Vec<_> = status["generations"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["config_version"].clone())
        .collect();
    assert!(versions.iter().all(|v| *v == versions[0]), "{status}");
    for _ in 0..16 {
        let (_, _, body) = baton_tests::harness::get(baton.address("http")).unwrap();
        assert!(body.starts_with("rate=1 "), "{body}");
    }
}
