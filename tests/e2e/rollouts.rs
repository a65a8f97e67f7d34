//! Safe rollouts: probes that reach only the generation they probe,
//! probation with rollback after cutover, canaries, the crash-loop breaker.

use baton_tests::harness::{
    config_with_worker, event_name, field, generation_in, get, steady_load, wrapped_worker, Baton,
    Binaries, TempDir,
};
use baton_tests::load::{LoadConfig, LoadHandle, Mode, Report};
use std::time::{Duration, Instant};

/// Two `wrapped` workers (no SDK) with `args` and `rest`.
fn wrapped(args: &[&str], rest: &str) -> String {
    config_with_worker(&wrapped_worker(args, &format!("processes = 2\n{rest}")))
}

/// The generation that answered the last request.
fn last_generation(report: &Report) -> Option<u64> {
    report.samples.iter().rev().find_map(|s| s.generation)
}

fn assert_none_failed(report: &Report, what: &str) {
    eprintln!(
        "{what}: {} ok, {} failed, generations {:?}",
        report.ok(),
        report.failed(),
        report.generations()
    );
    assert!(
        report.ok() > 50,
        "{what}: too little traffic: {}",
        report.ok()
    );
    assert_eq!(report.failed(), 0, "{what}: {}", report.failures_summary());
}

/// A release whose worker 0 exits with status 1 1.5 s after it started,
/// readiness by `delay:1s`, `probation = "5s"`: under keep-alive and
/// new-connection load it is rolled back by itself, nothing fails, and the
/// old generation's pids serve on.
#[test]
fn a_release_that_crashes_after_cutover_is_rolled_back_without_a_failed_request() {
    let rest = "ready = \"delay:1s\"\nprobation = \"5s\"\ndrain_timeout = \"5s\"\n";
    let good = wrapped(&[], rest).replace("ready = \"notify\"\n", "");
    let mut baton = Baton::start(&good);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let before = baton.wait_workers(2, &[], Duration::from_secs(5));
    let loads = [
        steady_load(addr, Mode::KeepAlive),
        steady_load(addr, Mode::NewConnection),
    ];
    baton.write_config(
        &wrapped(&["--exit-after", "1.5", "--exit-worker", "0"], rest)
            .replace("ready = \"notify\"\n", ""),
    );
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.failed", "{outcome}");
    assert_eq!(field(&outcome, "phase"), "probation", "{outcome}");
    let reason = field(&outcome, "reason");
    assert!(
        reason.starts_with("rolled back after cutover: worker 0 (pid ")
            && reason.contains("exited with exit status 1 at +0."),
        "{reason}"
    );
    generation_1_serves_on(&baton, loads, &before);
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 1, "{status}");
}

/// The same with SDK workers: a release whose worker 0 exits 1.5 s after it
/// reported ready.
#[test]
fn an_sdk_release_that_crashes_after_cutover_is_rolled_back_without_a_failed_request() {
    let worker = |args: &str| {
        config_with_worker(&format!(
            "command = [{:?}, \"http\"{args}]\nprocesses = 2\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\nprobation = \"5s\"\n",
            Binaries::testworker().display().to_string()
        ))
    };
    let mut baton = Baton::start(&worker(""));
    baton.wait_committed(1);
    let addr = baton.address("http");
    let before = baton.wait_workers(2, &[], Duration::from_secs(5));
    let loads = [
        steady_load(addr, Mode::KeepAlive),
        steady_load(addr, Mode::NewConnection),
    ];
    baton.write_config(&worker(", \"1.5\""));
    let outcome = baton.reload();
    assert_eq!(field(&outcome, "phase"), "probation", "{outcome}");
    assert!(
        field(&outcome, "reason").starts_with("rolled back after cutover: worker 0"),
        "{outcome}"
    );
    generation_1_serves_on(&baton, loads, &before);
}

/// After a rollback from generation 2: it finishes, generation 1's
/// processes (`before`) serve on, and neither load saw a failure.
fn generation_1_serves_on(baton: &Baton, loads: [LoadHandle; 2], before: &[nix::unistd::Pid]) {
    baton.wait_generation_finished(2);
    // Serving on, with the same processes, for a moment more.
    std::thread::sleep(Duration::from_millis(300));
    for (load, what) in loads.into_iter().zip(["keep-alive", "new connections"]) {
        let report = load.stop();
        assert_none_failed(&report, what);
        assert_eq!(last_generation(&report), Some(1), "{what}");
    }
    assert_eq!(
        baton.workers(),
        before,
        "the old generation's pids serve on"
    );
}

/// `ready = "http:/healthz"`: a new generation that answers 500 there is
/// never cut over to, and the old one, answering 200, never sees a probe.
#[test]
fn an_http_probe_reaches_only_the_new_generation_and_a_failing_one_is_rolled_back() {
    let dir = TempDir::new();
    let requests = dir.path().display().to_string();
    let config = |extra: &[&str]| {
        let mut args = vec!["--requests", requests.as_str()];
        args.extend(extra);
        wrapped(
            &args,
            "ready = \"http:/healthz\"\nprobe_interval = \"100ms\"\n",
        )
        .replace("ready = \"notify\"\n", "")
        .replace("ready_timeout = \"10s\"", "ready_timeout = \"2s\"")
    };
    std::fs::write(dir.path().join("baton.toml"), config(&[])).unwrap();
    let mut baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let addr = baton.address("http");
    let probes_of = |generation: u64| -> usize {
        (0..2)
            .map(|index| {
                std::fs::read_to_string(format!("{requests}/requests-{generation}-{index}"))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| *l == "/healthz")
                    .count()
            })
            .sum()
    };
    let probed_before = probes_of(1);
    assert!(
        probed_before >= 1,
        "generation 1 was probed when it started"
    );
    let load = steady_load(addr, Mode::NewConnection);
    baton.write_config(&config(&["--health-status", "500"]));
    let outcome = baton.reload();
    assert_eq!(field(&outcome, "phase"), "ready", "{outcome}");
    assert!(
        field(&outcome, "reason").contains("GET /healthz answered 500"),
        "{outcome}"
    );
    assert!(
        probes_of(2) >= 2,
        "generation 2 was probed, again and again"
    );
    assert_eq!(probes_of(1), probed_before, "no probe reached generation 1");
    assert_none_failed(&load.stop(), "new connections");
    assert_eq!(get(addr).unwrap().1, Some(1));
}

/// `baton reload --canary 20%` until `rollback`, then until `promote`.
#[test]
fn a_canary_gets_its_share_and_rollback_and_promote_end_it_without_a_failed_request() {
    let config = wrapped(&[], "drain_timeout = \"5s\"\n");
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let addr = baton.address("http");
    // A different config, so that each reload is a new release.
    let release = |n: u32| {
        config.replace(
            "processes = 2",
            &format!("processes = 2\nenv = {{ RELEASE = \"{n}\" }}"),
        )
    };

    baton.write_config(&release(2));
    let reload = canary_reload(&baton, "20%");
    wait_for_probation(&baton, 2);
    let shares = share_of(addr, 2, 2000);
    eprintln!("canary: {shares:.3} of new connections to generation 2");
    assert!((0.16..=0.24).contains(&shares), "{shares}");
    let load = steady_load(addr, Mode::NewConnection);
    let out = baton.cli(&["rollback"]);
    assert!(out.status.success(), "{out:?}");
    let out = reload.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rolled back after cutover: asked by baton rollback"),
        "{stderr}"
    );
    assert_eq!(share_of(addr, 2, 200), 0.0, "back to 0%");
    assert_none_failed(&load.stop(), "rollback");

    baton.write_config(&release(3));
    let reload = canary_reload(&baton, "20%");
    wait_for_probation(&baton, 3);
    let load = steady_load(addr, Mode::NewConnection);
    let out = baton.cli(&["promote"]);
    assert!(out.status.success(), "{out:?}");
    let out = reload.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        share_of(addr, 3, 200),
        1.0,
        "all to the promoted generation"
    );
    baton.wait_generation_finished(1);
    assert_none_failed(&load.stop(), "promote");
}

/// `baton reload --canary SHARE` in the background: it returns when the
/// rollout ends.
fn canary_reload(baton: &Baton, share: &str) -> std::thread::JoinHandle<std::process::Output> {
    let (dir, share) = (baton.dir().to_path_buf(), share.to_string());
    std::thread::spawn(move || {
        std::process::Command::new(Binaries::baton())
            .args(["reload", "--canary", &share, "-c"])
            .arg(dir.join("baton.toml"))
            .output()
            .expect("run baton reload")
    })
}

fn wait_for_probation(baton: &Baton, generation: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = baton.status();
        if status["rollout"]["generation"] == generation {
            return;
        }
        assert!(Instant::now() < deadline, "no probation: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The share of `n` new connections answered by `generation`.
fn share_of(addr: std::net::SocketAddr, generation: u64, n: u64) -> f64 {
    let report = baton_tests::load::run(LoadConfig {
        connections: 4,
        mode: Mode::NewConnection,
        max_requests: n,
        duration: Duration::from_secs(30),
        ..LoadConfig::new(addr)
    });
    assert_eq!(report.failed(), 0, "{}", report.failures_summary());
    let hits = report
        .samples
        .iter()
        .filter(|s| s.generation == Some(generation))
        .count();
    hits as f64 / report.samples.len() as f64
}

#[test]
fn a_crash_looping_worker_stops_being_respawned_and_status_says_so() {
    let baton = Baton::start(&config_with_worker(
        "command = [\"/bin/sh\", \"-c\", \"sleep 0.2; exit 3\"]\nprotocol = \"systemd\"\nready = \"delay:50ms\"\n\
         crash_loop_limit = 3\ncrash_loop_window = \"1m\"\n",
    ));
    baton.wait_committed(1);
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.crash_looped"
    });
    let status = baton.status();
    let current = generation_in(&status, 1).expect("generation 1");
    assert_eq!(current["crash_loop"], serde_json::json!([0]), "{status}");
    assert_eq!(current["workers"], serde_json::json!([]), "{status}");
    let text = String::from_utf8(baton.cli(&["status"]).stdout).unwrap();
    assert!(
        text.contains("crash-looped and are not respawned"),
        "{text}"
    );
    assert_eq!(
        baton.count_events(|e| event_name(e) == "worker.respawning"),
        2,
        "respawned after the first two crashes only"
    );
}

/// `baton reload --canary`: a share that rounds to nothing is refused; the
/// command says at once that the canary is live (share, standby
/// generation, how probation ends) rather than nothing until `promote`;
/// `--timeout` running out during probation reports where it stands with
/// exit 3, not as a failure; an upgrade meanwhile is refused with the way
/// out.
#[test]
fn a_canary_reload_says_at_once_that_it_is_live_and_a_timeout_on_probation_is_not_a_failure() {
    let config = wrapped(&[], "drain_timeout = \"5s\"\n");
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let release = |n: u32| {
        config.replace(
            "processes = 2",
            &format!("processes = 2\nenv = {{ RELEASE = \"{n}\" }}"),
        )
    };
    baton.write_config(&release(2));

    let out = baton.cli(&["reload", "--canary", "0.0000001%"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--canary: invalid share \"0.0000001%\": below the smallest canary, 0.01%"),
        "{stderr}"
    );
    assert!(baton.status()["rollout"].is_null());

    // Live at once: the line comes while the command still waits.
    let mut reload = std::process::Command::new(Binaries::baton())
        .args(["reload", "--canary", "20%", "--timeout", "60s", "-c"])
        .arg(baton.dir().join("baton.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = reload.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    wait_for_probation(&baton, 2);
    let live = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("no line from baton reload while the canary is live");
    assert_eq!(
        live,
        "generation 2 is live on probation (canary: 20% of new connections); generation 1 on standby"
    );
    let until = lines.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        until.contains("until `baton promote` or `baton rollback`"),
        "{until}"
    );
    assert!(baton.cli(&["promote"]).status.success());
    let status = reload.wait().unwrap();
    reader.join().unwrap();
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "{status:?} {rest:?}");
    assert!(
        rest.iter()
            .any(|l| l == "reload to generation 2 committed (trigger: cli)"),
        "{rest:?}"
    );

    // Time runs out during probation: the state, exit 3, still live.
    baton.write_config(
        &release(3).replace("processes = 2\n", "processes = 2\nprobation = \"60s\"\n"),
    );
    let out = baton.cli(&["reload", "--canary", "20%", "--timeout", "2s"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(
        stdout.contains("generation 3 is live on probation (canary: 20% of new connections); generation 2 on standby")
            && stdout.contains("probation ends in "),
        "{stdout}"
    );
    assert!(
        stderr.contains("baton: stopped waiting after 2s: generation 3 is still on probation (canary: 20% of new connections")
            && stderr.contains("generation 2 on standby); it ends in "),
        "{stderr}"
    );
    assert_eq!(baton.status()["rollout"]["generation"], 3);

    // An upgrade now would wait as long as probation: refused, saying why.
    let out = baton.cli(&["upgrade"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upgrade refused: generation 3 is on probation (")
            && stderr.contains("generation 2 on standby); run `baton promote` or `baton rollback`"),
        "{stderr}"
    );
    assert!(baton.cli(&["rollback"]).status.success());
    assert!(baton.status()["rollout"].is_null());
}
