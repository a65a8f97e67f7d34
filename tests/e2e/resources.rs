use baton_tests::harness::{
    config_with_worker, field, hello_config, message, open_fds, zombies_of, Baton, Binaries,
};
use std::time::Duration;

/// Socket inode numbers differ per reload; compare what kind of thing each fd is.
fn fd_kinds(fds: &[(i32, String)]) -> Vec<String> {
    let mut kinds: Vec<String> = fds
        .iter()
        .map(|(_, target)| target.split(':').next().unwrap_or("").to_string())
        .collect();
    kinds.sort();
    kinds
}

/// The fd table once two reads 100 ms apart agree.
fn settled_fds(pid: nix::unistd::Pid) -> Vec<(i32, String)> {
    let mut last = open_fds(pid);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = open_fds(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

#[test]
fn fifty_reloads_leave_the_same_fds_and_no_zombies() {
    let mut baton = Baton::start(&hello_config(2));
    baton.wait_committed(1);
    let outcome = baton.reload();
    assert_eq!(message(&outcome), "reload committed");
    baton.wait_generation_finished(1);
    let workers = baton.wait_workers(2, &[], Duration::from_secs(10));
    let fds = settled_fds(baton.pid());
    for _ in 0..50 {
        let outcome = baton.reload();
        assert_eq!(message(&outcome), "reload committed", "{outcome}");
    }
    for generation in 2..=51 {
        baton.wait_generation_finished(generation);
    }
    baton.wait_workers(2, &workers, Duration::from_secs(20));
    // Aborted reader tasks release their channel on the loop's next turn.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = settled_fds(baton.pid());
    while fd_kinds(&after) != fd_kinds(&fds) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = settled_fds(baton.pid());
    }
    assert_eq!(
        fd_kinds(&fds),
        fd_kinds(&after),
        "before: {fds:?}\nafter: {after:?}"
    );
    assert_eq!(zombies_of(baton.pid()), vec![]);
}

#[test]
fn more_than_252_listeners_reach_a_worker_intact() {
    const COUNT: usize = 300;
    let dump = baton_tests::harness::TempDir::new();
    let mut config = config_with_worker(&format!(
        "command = [{:?}, \"dump-listeners\", {:?}]\nprocesses = 1\n",
        Binaries::testworker().display().to_string(),
        dump.path().display().to_string()
    ));
    for i in 0..COUNT {
        config.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\naddress = \"127.0.0.1:0\"\n"
        ));
    }
    config.push_str("\n[[listener]]\nname = \"v6\"\naddress = \"[::1]:0\"\n");
    config.push_str("\n[[listener]]\nname = \"sock\"\naddress = \"unix:app.sock\"\n");
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let text = std::fs::read_to_string(dump.path().join("worker-1-0.json")).unwrap();
    let got: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(got.len(), COUNT + 3);
    let find = |name: &str| got.iter().find(|e| e["name"] == name).expect(name).clone();
    let v6 = find("v6");
    assert_eq!(v6["kind"], "tcp");
    assert!(
        v6["address"].as_str().unwrap().starts_with("[::1]:"),
        "{v6}"
    );
    let sock = find("sock");
    assert_eq!(sock["kind"], "unix");
    let path = baton.dir().join("app.sock");
    assert_eq!(sock["address"], path.display().to_string().as_str());
    for i in 0..COUNT {
        let name = format!("l{i}");
        let bound = baton.wait_event(Duration::from_secs(1), |e| {
            message(e) == "listener bound" && field(e, "listener") == name
        });
        let entry = got
            .iter()
            .find(|e| e["name"] == name.as_str())
            .expect(&name);
        assert_eq!(entry["kind"], "tcp");
        assert_eq!(entry["address"], field(&bound, "address").as_str());
    }
}
