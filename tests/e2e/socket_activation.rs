//! baton itself started by socket activation (`systemd-socket-activate`,
//! as a systemd `.socket` unit does): it serves on the inherited socket
//! from the first connection on, across reloads and an upgrade.

use baton_tests::harness::{
    alive, assert_no_request_failed, config_with_worker, event_name, generation_in, get,
    hello_config, message, resetting_config, reuseport_listener, steady_load, wait_for_generation,
    Baton, Binaries, TempDir,
};
use baton_tests::load::Mode;
use baton_tests::tools;
use nix::sys::signal::{kill, Signal};
use std::net::SocketAddr;
use std::time::Duration;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `systemd-socket-activate ARGS BATON run -c baton.toml` in a new temp dir
/// holding `config`.
fn activated(tool: &std::path::Path, args: &[&str], config: &str) -> Baton {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton = Binaries::baton().display().to_string();
    let mut argv: Vec<&str> = args.to_vec();
    argv.extend([baton.as_str(), "run"]);
    let baton = Baton::start_with_env(tool, dir, &argv, &[]);
    baton.wait_event(Duration::from_secs(10), |e| {
        e["raw"]
            .as_str()
            .is_some_and(|l| l.starts_with("Listening on"))
    });
    baton
}

#[test]
fn a_socket_activated_master_serves_the_inherited_socket_across_reloads_and_an_upgrade() {
    let Some(tool) = tools::require("systemd-socket-activate", "apt-get install systemd") else {
        return;
    };
    let addr = free_port();
    let config = hello_config(2).replace("127.0.0.1:0", &addr.to_string());
    let listen = addr.to_string();
    let mut baton = activated(&tool, &["-l", &listen], &config);
    // systemd-socket-activate starts baton on the first connection, which
    // waits in the inherited socket's queue until generation 1 serves it.
    let (status, generation, _) = get(addr).expect("the first connection is served");
    assert_eq!((status, generation), (200, Some(1)));
    let adopted = baton.wait_event(Duration::from_secs(5), |e| {
        message(e) == "listener adopted from socket activation"
    });
    assert_eq!(adopted["fields"]["matched_by"], "address");
    assert_eq!(baton.count_events(|e| event_name(e) == "listener.bound"), 0);

    let load = steady_load(addr, Mode::NewConnection);
    for generation in 2..=4 {
        let outcome = baton.reload();
        assert_eq!(
            message(&outcome),
            "reload committed",
            "generation {generation}"
        );
    }
    kill(baton.pid(), Signal::SIGUSR2).unwrap();
    let master = baton.wait_new_master(baton.pid(), Duration::from_secs(30));
    wait_for_generation(&load, 5);
    let report = load.stop();
    assert_no_request_failed(&report, &format!("3 reloads and an upgrade to {master}"), 5);
    assert_eq!(baton.count_events(|e| event_name(e) == "listener.bound"), 0);
}

#[test]
fn an_inherited_socket_no_listener_matches_is_refused() {
    let Some(tool) = tools::require("systemd-socket-activate", "apt-get install systemd") else {
        return;
    };
    let stray = free_port();
    let config = hello_config(1).replace("127.0.0.1:0", &free_port().to_string());
    let mut baton = activated(&tool, &["-l", &stray.to_string()], &config);
    // The first connection starts baton, which refuses the socket.
    let _ = get(stray);
    let status = baton.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let failed = baton.wait_event(Duration::from_secs(1), |e| event_name(e) == "master.failed");
    let error = failed["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("tcp {stray}")) && error.contains("matches no [[listener]]"),
        "{error}"
    );
}

/// A socket systemd bound with `ReusePort=yes` gets a port group: servers
/// that reset what they accept once told to stop get a socket of their own
/// per generation, steered to, and lose nothing across reloads.
#[test]
fn an_inherited_reuseport_socket_gives_wrapped_servers_sockets_of_their_own() {
    use std::os::fd::AsRawFd;
    let addr = free_port();
    let socket = reuseport_listener(addr);
    // Inherited by the shell below, which puts it at fd 3 as systemd would.
    nix::fcntl::fcntl(
        socket.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), resetting_config()).unwrap();
    let script = format!(
        "exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec {baton} \"$@\"",
        fd = socket.as_raw_fd(),
        baton = Binaries::baton().display()
    );
    let mut baton = Baton::start_with_env(
        std::path::Path::new("/bin/sh"),
        dir,
        &["-c", &script, "sh", "run"],
        &[],
    );
    drop(socket);
    baton.wait_committed(1);
    let adopted = baton.wait_event(Duration::from_secs(5), |e| {
        message(e) == "listener adopted from socket activation"
    });
    assert_eq!(adopted["fields"]["matched_by"], "name");
    assert_eq!(adopted["fields"]["steered"], true);
    let load = steady_load(addr, Mode::NewConnection);
    for number in 2..=4 {
        assert_eq!(event_name(&baton.reload()), "reload.committed");
        let status = baton.status();
        let generation = generation_in(&status, number).expect("the new generation");
        assert_ne!(
            generation["sockets"][0], status["listeners"][0]["fd"],
            "generation {number} shares the inherited socket: {status}"
        );
    }
    wait_for_generation(&load, 4);
    let report = load.stop();
    assert_no_request_failed(&report, "3 reloads on an inherited SO_REUSEPORT socket", 4);
}

/// An activated Unix socket's file is the service manager's: no master
/// removes it, not even one that took it over in an upgrade.
#[test]
fn an_activated_unix_sockets_file_outlives_an_upgrade_and_a_stop() {
    let Some(tool) = tools::require("systemd-socket-activate", "apt-get install systemd") else {
        return;
    };
    let dir_holder = TempDir::new();
    let path = dir_holder.path().join("app.sock");
    let config = config_with_worker(&format!(
        "command = [{:?}, \"dump-listeners\", {:?}]\nready_timeout = \"10s\"\ndrain_timeout = \"5s\"\n",
        Binaries::testworker().display().to_string(),
        dir_holder.path().display().to_string(),
    ))
    .replace("127.0.0.1:0", &format!("unix:{}", path.display()));
    let listen = path.display().to_string();
    let baton = activated(&tool, &["-l", &listen], &config);
    let _first = std::os::unix::net::UnixStream::connect(&path).expect("the activated socket");
    baton.wait_committed(1);
    kill(baton.pid(), Signal::SIGUSR2).unwrap();
    let master = baton.wait_new_master(baton.pid(), Duration::from_secs(30));
    kill(master, Signal::SIGQUIT).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(master) {
        assert!(
            std::time::Instant::now() < deadline,
            "the new master did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "the socket file was removed");
}
