use baton_tests::harness::{
    config_with_worker, event_name, field, hello_config, open_fds, resetting_config, zombies_of,
    Baton, Binaries,
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
    fifty_reloads(&hello_config(2), 0);
}

/// Each generation of workers without the SDK has sockets of its own on the
/// port: they are let go of, not piled up. One replaced generation's socket
/// may wait for the next reload (see `steering.rs`).
#[test]
fn fifty_reloads_of_wrapped_workers_leave_the_same_fds_and_no_zombies() {
    fifty_reloads(&resetting_config(), 1);
}

/// Without `socket` entries, and how many sockets.
fn split_sockets(kinds: Vec<String>) -> (Vec<String>, usize) {
    let (sockets, others): (Vec<String>, Vec<String>) =
        kinds.into_iter().partition(|k| k == "socket");
    (others, sockets.len())
}

/// 50 quick reloads, then one more once they are all drained: the master
/// holds the same fds as after the first ones, give or take `spare` sockets.
fn fifty_reloads(config: &str, spare: usize) {
    let mut baton = Baton::start(config);
    baton.wait_committed(1);
    for generation in 1..=2 {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed");
        baton.wait_generation_finished(generation);
    }
    let workers = baton.wait_workers(2, &[], Duration::from_secs(10));
    let fds = settled_fds(baton.pid());
    for _ in 0..50 {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    }
    for generation in 3..=52 {
        baton.wait_generation_finished(generation);
    }
    // Sockets of generations that finished while the last one was already
    // serving are let go of at the next reload (see `steering.rs`).
    let workers = baton.wait_workers(2, &workers, Duration::from_secs(20));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    baton.wait_generation_finished(53);
    baton.wait_workers(2, &workers, Duration::from_secs(20));
    let (kinds, sockets) = split_sockets(fd_kinds(&fds));
    let same = |after: &[(i32, String)]| {
        let (after_kinds, after_sockets) = split_sockets(fd_kinds(after));
        after_kinds == kinds && after_sockets.abs_diff(sockets) <= spare
    };
    // Aborted reader tasks release their channel on the loop's next turn.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = settled_fds(baton.pid());
    while !same(&after) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = settled_fds(baton.pid());
    }
    assert!(same(&after), "before: {fds:?}\nafter: {after:?}");
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
            event_name(e) == "listener.bound" && field(e, "listener") == name
        });
        let entry = got
            .iter()
            .find(|e| e["name"] == name.as_str())
            .expect(&name);
        assert_eq!(entry["kind"], "tcp");
        assert_eq!(entry["address"], field(&bound, "address").as_str());
    }
}
