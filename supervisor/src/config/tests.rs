use super::*;

const GOOD: &str = r#"
[supervisor]
pid_file = "run/baton.pid"
admin = "unix:run/admin.sock"
log_filter = "debug"

[[listener]]
name = "http"
address = "127.0.0.1:8080"

[[listener]]
name = "v6"
address = "[::1]:0"
backlog = 16

[[listener]]
name = "sock"
address = "unix:app.sock"

[worker]
command = ["./bin/app", "--flag"]
processes = 2
ready_timeout = "1.5s"
drain_timeout = "2m"
stop_signal = "QUIT"
env = { A = "b" }
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/app/baton.toml"), text)
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn good_config_resolves_paths_against_its_directory() {
    let c = parse(GOOD).unwrap();
    assert_eq!(
        c.supervisor.control_socket,
        Path::new("/etc/app/baton.sock")
    );
    assert_eq!(
        c.supervisor.pid_file.as_deref(),
        Some(Path::new("/etc/app/run/baton.pid"))
    );
    assert_eq!(c.worker.command[0], "/etc/app/./bin/app");
    assert_eq!(c.worker.cwd.as_deref(), Some(Path::new("/etc/app/.")));
    assert_eq!(c.listeners[1].backlog, 16);
    assert_eq!(c.listeners[0].backlog, 1024);
    assert_eq!(
        c.listeners[2].address,
        ListenerAddress::Unix("/etc/app/app.sock".into())
    );
    assert_eq!(
        c.supervisor.admin,
        Some(ListenerAddress::Unix("/etc/app/run/admin.sock".into()))
    );
    assert_eq!(c.worker.ready_timeout, Dur(Duration::from_millis(1500)));
    assert_eq!(c.worker.drain_timeout, Dur(Duration::from_secs(120)));
    assert_eq!(c.worker.stop_signal.0, nix::sys::signal::Signal::SIGQUIT);
    assert_eq!(c.hash.len(), 12);
}

#[test]
fn bare_command_is_left_for_path_lookup() {
    let c = parse("[worker]\ncommand = [\"gunicorn\"]\n").unwrap();
    assert_eq!(c.worker.command[0], "gunicorn");
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let e = error("[worker]\ncommand = [\"x\"\nprocesses = 2\n");
    assert!(e.starts_with("/etc/app/baton.toml:3:1: "), "{e}");
}

#[test]
fn unknown_key_is_rejected_with_its_location() {
    let e = error("[worker]\ncommand = [\"x\"]\nprocess = 2\n");
    assert!(e.starts_with("/etc/app/baton.toml:3:1: "), "{e}");
    assert!(e.contains("unknown field `process`"), "{e}");
    let e = error("[supervisor]\nbogus = 1\n[worker]\ncommand = [\"x\"]\n");
    assert!(e.contains(":2:1: ") && e.contains("bogus"), "{e}");
}

#[test]
fn bad_values_name_their_location() {
    let cases = [
        ("[worker]\ncommand = [\"x\"]\nready_timeout = \"5x\"\n", ":3:17: ", "invalid duration"),
        ("[worker]\ncommand = [\"x\"]\nprocesses = 0\n", ":3:13: ", "processes must be"),
        ("[worker]\ncommand = []\n", ":2:11: ", "command must name"),
        ("[worker]\ncommand = [\"x\"]\nprotocol = \"carrier-pigeon\"\n", ":3:12: ", "carrier-pigeon"),
        ("[worker]\ncommand = [\"x\"]\nready = \"soon\"\n", ":3:9: ", "invalid ready"),
        ("[worker]\ncommand = [\"x\"]\nstop_signal = \"SIGNOPE\"\n", ":3:15: ", "unknown signal"),
        ("[supervisor]\nlog_filter = \"[[\"\n[worker]\ncommand = [\"x\"]\n", ":2:14: ", "invalid log_filter"),
        ("[supervisor]\nlog_format = \"xml\"\n[worker]\ncommand = [\"x\"]\n", ":2:14: ", "xml"),
        ("[[listener]]\nname = \"a\"\naddress = \"localhost\"\n[worker]\ncommand = [\"x\"]\n", ":3:11: ", "invalid address"),
        ("[[listener]]\nname = \"a b\"\naddress = \"127.0.0.1:1\"\n[worker]\ncommand = [\"x\"]\n", ":2:8: ", "invalid listener name"),
        ("[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nbacklog = 0\n[worker]\ncommand = [\"x\"]\n", ":4:11: ", "backlog"),
        ("[supervisor]\n[listener]\n", ":2:1: ", "expected a sequence"),
        ("[supervisor]\nadmin = \"udp:127.0.0.1:9\"\n[worker]\ncommand = [\"x\"]\n", ":2:9: ", "the admin endpoint speaks HTTP"),
        ("[supervisor]\nadmin = \"9090\"\n[worker]\ncommand = [\"x\"]\n", ":2:9: ", "admin: invalid address"),
        ("[supervisor]\notlp_endpoint = \"https://c:4318\"\n[worker]\ncommand = [\"x\"]\n", ":2:17: ", "expected http://HOST:PORT"),
        ("[supervisor]\notlp_flush_timeout = \"1m\"\n[worker]\ncommand = [\"x\"]\n", ":2:22: ", "otlp_flush_timeout must be between 0ms and 10s"),
        ("[supervisor]\notlp_export_timeout = \"0s\"\n[worker]\ncommand = [\"x\"]\n", ":2:23: ", "otlp_export_timeout must be between 10ms and 60s"),
        ("[supervisor]\notlp_flush_timeout = 200\n[worker]\ncommand = [\"x\"]\n", ":2:22: ", "write \"200s\""),
        ("", ":", "missing field `worker`"),
    ];
    for (text, location, message) in cases {
        let e = error(text);
        assert!(
            e.contains(location) && e.contains(message),
            "{text:?} gave {e}"
        );
    }
}

#[test]
fn every_backlog_from_1_to_65535_is_accepted_and_others_are_not() {
    let with = |backlog: i64| {
        parse(&format!(
            "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nbacklog = {backlog}\n[worker]\ncommand = [\"x\"]\n"
        ))
    };
    for backlog in [1, 4095, 4096, 4097, 65535] {
        assert_eq!(with(backlog).unwrap().listeners[0].backlog as i64, backlog);
    }
    for backlog in [0, -1, 65536, i64::from(i32::MAX) + 1] {
        let e = with(backlog).unwrap_err().to_string();
        assert!(
            e.contains(":4:11: backlog must be between 1 and 65535"),
            "{backlog}: {e}"
        );
    }
}

#[test]
fn nodelay_is_on_by_default_and_only_for_tcp_listeners() {
    let listener = |address: &str, nodelay: &str| {
        parse(&format!(
            "[[listener]]\nname = \"a\"\naddress = \"{address}\"\n{nodelay}[worker]\ncommand = [\"x\"]\n"
        ))
    };
    let c = listener("127.0.0.1:1", "").unwrap();
    assert_eq!(
        (c.listeners[0].nodelay, c.listeners[0].nodelay()),
        (None, true)
    );
    let c = listener("127.0.0.1:1", "nodelay = false\n").unwrap();
    assert!(!c.listeners[0].nodelay());
    let c = listener("127.0.0.1:1", "nodelay = true\n").unwrap();
    assert!(c.listeners[0].nodelay());
    let e = listener("127.0.0.1:1", "nodelay = \"no\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(":4:11: ") && e.contains("expected a boolean"),
        "{e}"
    );
    for address in ["udp:127.0.0.1:1", "unix:app.sock"] {
        let e = listener(address, "nodelay = false\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":1:1: ")
                && e.contains("listener \"a\": nodelay applies to TCP listeners only"),
            "{address}: {e}"
        );
        // Unset, nodelay is no concern of theirs.
        assert_eq!(listener(address, "").unwrap().listeners[0].nodelay, None);
    }
}

#[test]
fn quic_is_off_by_default_and_only_for_udp_listeners() {
    let listener = |address: &str, quic: &str| {
        parse(&format!(
            "[[listener]]\nname = \"a\"\naddress = \"{address}\"\n{quic}[worker]\ncommand = [\"x\"]\n"
        ))
    };
    assert!(!listener("udp:127.0.0.1:1", "").unwrap().listeners[0].quic);
    assert!(
        listener("udp:127.0.0.1:1", "quic = true\n")
            .unwrap()
            .listeners[0]
            .quic
    );
    for address in ["127.0.0.1:1", "unix:app.sock"] {
        let e = listener(address, "quic = true\n").unwrap_err().to_string();
        assert!(
            e.contains(":1:1: ")
                && e.contains("listener \"a\": quic applies to UDP listeners only"),
            "{address}: {e}"
        );
        assert!(!listener(address, "quic = false\n").unwrap().listeners[0].quic);
    }
}

#[test]
fn duplicate_listener_name_or_address_points_at_the_second_one() {
    let e = error(
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n[worker]\ncommand = [\"x\"]\n",
    );
    assert!(
        e.contains(":4:1: ") && e.contains("duplicate listener name"),
        "{e}"
    );
    let e = error(
        "[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n[worker]\ncommand = [\"x\"]\n",
    );
    assert!(e.contains("used twice"), "{e}");
}

#[test]
fn addresses_parse_in_every_notation() {
    assert_eq!(
        "[::1]:80".parse(),
        Ok(ListenerAddress::Tcp("[::1]:80".parse().unwrap()))
    );
    assert_eq!(
        "udp:127.0.0.1:53".parse(),
        Ok(ListenerAddress::Udp("127.0.0.1:53".parse().unwrap()))
    );
    assert!("unix:".parse::<ListenerAddress>().is_err());
    assert!("127.0.0.1".parse::<ListenerAddress>().is_err());
    assert_eq!(ListenerAddress::Unix("/a".into()).to_string(), "unix:/a");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    for bad in ["", "5", "s", "5 s", "-1s", "1e9s", "1.2.3s", "10d"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = Config::load(Path::new("/nonexistent/baton.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/nonexistent/baton.toml: cannot read"), "{e}");
}

const ARGS: &str = "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"dns\"\naddress = \"udp:127.0.0.1:1\"\n[worker]\n";

#[test]
fn fd_templates_must_name_listeners_and_need_the_args_protocol() {
    let good = format!(
        "{ARGS}command = [\"uvicorn\", \"--fd\", \"{{fd:http}}\", \"--x={{fd:dns}},{{fd:http}}\"]\nprotocol = \"args\"\nready = \"delay:1s\"\n"
    );
    let c = parse(&good).unwrap();
    assert_eq!(c.worker.protocol, Protocol::Args);
    let fd = |name: &str| {
        ["http", "dns"]
            .iter()
            .position(|n| *n == name)
            .map(|i| 3 + i as i32)
    };
    assert_eq!(substitute(&c.worker.command[3], fd, 7), "--x=4,3");
    assert_eq!(
        substitute("run/{generation}.pid;{fd:x}", fd, 7),
        "run/7.pid;{fd:x}"
    );
    assert_eq!(fd_templates("a{fd:x}b{fd:y}").unwrap(), ["x", "y"]);

    let e = error(&format!(
        "{ARGS}command = [\"uvicorn\", \"--fd\", \"{{fd:htp}}\"]\nprotocol = \"args\"\nready = \"delay:1s\"\n"
    ));
    assert!(
        e.contains(":8:31: ") && e.contains("no listener named \"htp\" (listeners: http, dns)"),
        "{e}"
    );
    let e = error(&format!(
        "{ARGS}command = [\"x\", \"{{fd:http\"]\nprotocol = \"args\"\nready = \"delay:1s\"\n"
    ));
    assert!(e.contains(":8:17: ") && e.contains("unterminated"), "{e}");
    let e = error(&format!("{ARGS}command = [\"x\", \"{{fd:http}}\"]\n"));
    assert!(
        e.contains(":8:17: ") && e.contains("need protocol = \"args\" or \"systemd\""),
        "{e}"
    );
}

#[test]
fn fd_templates_work_in_env_values_too() {
    let good = format!(
        "{ARGS}command = [\"nginx\", \"-g\", \"pid nginx-{{generation}}.pid;\"]\nprotocol = \"systemd\"\nready = \"notify\"\nenv = {{ NGINX = \"{{fd:http}};{{fd:dns}};\" }}\n"
    );
    let c = parse(&good).unwrap();
    assert_eq!(c.worker.env["NGINX"], "{fd:http};{fd:dns};");
    let e = error(&format!(
        "{ARGS}command = [\"nginx\"]\nprotocol = \"args\"\nready = \"delay:1s\"\nenv = {{ NGINX = \"{{fd:web}};\" }}\n"
    ));
    assert!(
        e.contains(":11:17: ") && e.contains("no listener named \"web\""),
        "{e}"
    );
}

#[test]
fn protocols_without_a_channel_need_notify_or_delay_readiness() {
    let e = error("[worker]\ncommand = [\"x\"]\nprotocol = \"systemd\"\n");
    assert!(
        e.contains(":3:12: ") && e.contains("set ready = \"notify\" or \"delay:DURATION\""),
        "{e}"
    );
    let e = error("[worker]\ncommand = [\"x\"]\nprotocol = \"args\"\nready = \"sdk\"\n");
    assert!(e.contains(":4:9: "), "{e}");
    let c =
        parse("[worker]\ncommand = [\"x\"]\nprotocol = \"systemd\"\nready = \"notify\"\n").unwrap();
    assert_eq!(c.worker.ready, ReadyMode::Notify);
}

#[test]
fn process_settings_parse_and_are_checked() {
    let c = parse(
        "[worker]\ncommand = [\"x\"]\nrlimit_nofile = 4096\noutput = \"capture\"\nreopen_signal = \"none\"\n",
    )
    .unwrap();
    assert_eq!(c.worker.rlimit_nofile, Some(4096));
    assert_eq!(c.worker.output, Output::Capture);
    assert_eq!(c.worker.reopen_signal, ReopenSignal(None));
    let c = parse("[worker]\ncommand = [\"x\"]\n").unwrap();
    assert_eq!(
        (c.worker.rlimit_nofile, c.worker.output),
        (None, Output::Inherit)
    );
    assert_eq!(
        c.worker.reopen_signal,
        ReopenSignal(Some(nix::sys::signal::Signal::SIGUSR1))
    );
    assert_eq!(c.worker.credentials(), None);
    let e = error("[worker]\ncommand = [\"x\"]\nrlimit_nofile = 0\n");
    assert!(
        e.contains(":3:17: ") && e.contains("rlimit_nofile must be"),
        "{e}"
    );
    let e = error("[worker]\ncommand = [\"x\"]\noutput = \"syslog\"\n");
    assert!(e.contains(":3:10: ") && e.contains("syslog"), "{e}");
    let e = error("[worker]\ncommand = [\"x\"]\nreopen_signal = \"SIGNOPE\"\n");
    assert!(e.contains(":3:17: ") && e.contains("unknown signal"), "{e}");
    assert!(!c.worker.nonblocking);
    let c = parse(
        "[worker]\ncommand = [\"x\"]\nprotocol = \"args\"\nready = \"delay:1s\"\nnonblocking = true\n",
    )
    .unwrap();
    assert!(c.worker.nonblocking);
    let e = error("[worker]\ncommand = [\"x\"]\nnonblocking = \"yes\"\n");
    assert!(e.contains(":3:15: ") && e.contains("boolean"), "{e}");
}

#[test]
fn user_and_group_resolve_at_load_and_need_root() {
    let e = error("[worker]\ncommand = [\"x\"]\nuser = \"no-such-user-here\"\n");
    assert!(e.contains(":3:8: "), "{e}");
    if nix::unistd::geteuid().is_root() {
        assert!(e.contains("unknown user \"no-such-user-here\""), "{e}");
        let c = parse("[worker]\ncommand = [\"x\"]\nuser = \"root\"\ngroup = \"0\"\n").unwrap();
        assert_eq!(
            c.worker.credentials(),
            Some(Credentials {
                uid: Some(0),
                gid: 0
            })
        );
        let e = error("[worker]\ncommand = [\"x\"]\ngroup = \"no-such-group-here\"\n");
        assert!(e.contains(":3:9: ") && e.contains("unknown group"), "{e}");
    } else {
        assert!(e.contains("needs the master to run as root"), "{e}");
    }
}

#[test]
fn common_misspellings_get_the_right_spelling() {
    let e = error(
        "[listener]\nname = \"http\"\naddress = \"127.0.0.1:1\"\n[worker]\ncommand = [\"x\"]\n",
    );
    assert!(e.contains("write [[listener]] (two brackets)"), "{e}");
    let e = error("[worker]\ncommand = [\"x\"]\ndrain_timeout = 30\n");
    assert!(
        e.contains(":3:17: ") && e.contains("write \"30s\" (or \"30ms\", \"30m\")"),
        "{e}"
    );
}

#[test]
fn host_names_resolve_to_their_first_ipv4_address() {
    let c = parse("[[listener]]\nname = \"a\"\naddress = \"localhost:8080\"\n[[listener]]\nname = \"b\"\naddress = \"udp:localhost:53\"\n[worker]\ncommand = [\"x\"]\n").unwrap();
    assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:8080");
    assert_eq!(c.listeners[1].address.to_string(), "udp:127.0.0.1:53");
    let e = error("[[listener]]\nname = \"a\"\naddress = \"no-such-host.invalid:80\"\n[worker]\ncommand = [\"x\"]\n");
    assert!(
        e.contains(":3:11: ") && e.contains("cannot resolve \"no-such-host.invalid\""),
        "{e}"
    );
}

#[test]
fn master_restarts_reads_a_count_in_a_window_or_off() {
    let budget = |restarts, secs| {
        MasterRestarts(Some(crate::keeper::Budget {
            restarts,
            window: Duration::from_secs(secs),
        }))
    };
    assert_eq!(MasterRestarts::default(), budget(10, 60));
    assert_eq!("5 in 1m".parse::<MasterRestarts>(), Ok(budget(5, 60)));
    assert_eq!(" 3 in 30s ".parse::<MasterRestarts>(), Ok(budget(3, 30)));
    assert_eq!("off".parse::<MasterRestarts>(), Ok(MasterRestarts(None)));
    assert_eq!(
        "0 in 1m".parse::<MasterRestarts>(),
        Ok(MasterRestarts(None))
    );
    for bad in ["5", "five in 1m", "5 in", "5 in 0s", "5 per 1m", "-1 in 1m"] {
        let error = bad.parse::<MasterRestarts>().unwrap_err();
        assert!(error.starts_with("master_restarts"), "{bad}: {error}");
    }
}
