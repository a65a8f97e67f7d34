//! The admin endpoint's writes (`POST /reload`, ...), driven with `curl` as
//! a deploy tool would: off unless configured, a bearer token from
//! `admin_token_file` over TCP, the peer's uid on a Unix socket; each
//! answered with the JSON of the CLI's `--json`, and audited.

use baton_tests::harness::{
    event_name, generation_in, hello_config, message, span_generation, Baton, TempDir,
};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The tokens the tests' file holds (lines 2 and 4).
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const OTHER_TOKEN: &str = "fedcba9876543210fedcba9876543210";

const WRITES: [&str; 9] = [
    "/reload",
    "/upgrade",
    "/restart",
    "/promote",
    "/rollback",
    "/scale",
    "/drain",
    "/stop",
    "/reopen",
];

/// A master running `hello` with its admin endpoint on `admin` and the
/// `[supervisor]` lines `extra`; the token file is written first.
fn start(admin: &str, extra: &str) -> Baton {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("tokens"),
        format!("# deploy bot\n{TOKEN}\n\n{OTHER_TOKEN}\n"),
    )
    .unwrap();
    let config = hello_config(1).replace(
        "[supervisor]\n",
        &format!("[supervisor]\nadmin = {admin:?}\n{extra}"),
    );
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    baton
}

/// An HTTP answer: status, headers (lower-case names), body as JSON.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `curl -X METHOD` to `target` (`http://ADDR/PATH?QUERY`, or a path with
/// `unix` the socket), with `args` added, as `uid` when given.
fn curl(
    target: &str,
    method: &str,
    args: &[&str],
    unix: Option<&Path>,
    uid: Option<u32>,
) -> Answer {
    baton_tests::tools::require("curl", "apt-get install curl").expect("curl");
    let mut command = Command::new("curl");
    command.args(["-s", "-i", "--max-time", "30", "-X", method]);
    if let Some(socket) = unix {
        command.arg("--unix-socket").arg(socket);
    }
    command.args(args).arg(target);
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(uid);
    }
    let out = command.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer from {target}: {text:?} {out:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    eprintln!("{method} {target} -> {status} {body}");
    Answer {
        status,
        headers,
        body,
    }
}

fn admin_url(baton: &Baton, path: &str) -> String {
    let admin = baton.status()["master"]["admin"]
        .as_str()
        .expect("the admin address")
        .to_string();
    format!("http://{admin}{path}")
}

fn post(baton: &Baton, path: &str, token: Option<&str>) -> Answer {
    let url = admin_url(baton, path);
    let header = token.map(|t| format!("Authorization: Bearer {t}"));
    let args: Vec<&str> = match &header {
        Some(h) => vec!["-H", h.as_str()],
        None => vec![],
    };
    curl(&url, "POST", &args, None, None)
}

#[test]
fn every_write_needs_the_right_token_and_answers_as_the_cli_does() {
    let mut baton = start("127.0.0.1:0", "admin_token_file = \"tokens\"\n");
    for path in WRITES {
        let none = post(&baton, path, None);
        assert_eq!(none.status, 401, "{path} without a token: {none:?}");
        assert_eq!(
            none.header("www-authenticate"),
            Some("Bearer realm=\"baton\"")
        );
        assert_eq!(none.body["ok"], false);
        let wrong = post(&baton, path, Some(&TOKEN.replace('0', "1")));
        assert_eq!(wrong.status, 401, "{path} with a wrong token: {wrong:?}");
        assert!(wrong
            .header("www-authenticate")
            .is_some_and(|h| h.contains("invalid_token")));
        let get = curl(&admin_url(&baton, path), "GET", &[], None, None);
        assert_eq!(get.status, 405, "GET {path}");
        assert_eq!(get.header("allow"), Some("POST"));
    }
    // Nothing of that changed anything.
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 1, "{status}");
    assert_eq!(status["master"]["state"], "running", "{status}");
    // Logged (at most ten a second: some of those may be counted only).
    let logged = baton.events(|e| event_name(e) == "admin.write_refused");
    assert!(
        logged
            .iter()
            .any(|e| e["fields"]["status"] == 401 && e["fields"]["path"] == "/reload"),
        "{logged:?}"
    );

    // With the token: the outcome, as `baton reload --json` prints it.
    let reload = post(&baton, "/reload?if_version=v1", Some(OTHER_TOKEN));
    assert_eq!(reload.status, 200, "{reload:?}");
    assert_eq!(reload.body["ok"], true);
    let outcome = &reload.body["result"];
    assert_eq!(outcome["outcome"], "committed");
    assert_eq!(outcome["generation"], 2);
    assert_eq!(outcome["trigger"], "admin");
    assert_eq!(outcome["deploy_version"], "v1");
    assert_eq!(outcome["requested_by"]["via"], "admin");
    let token = outcome["requested_by"]["token"].as_str().unwrap();
    assert!(token.ends_with("tokens:4"), "{token}");
    // The same version again: nothing to do, and it says so.
    let again = post(&baton, "/reload?if_version=v1", Some(OTHER_TOKEN));
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["result"]["outcome"], "unchanged");
    assert_eq!(again.body["result"]["generation"], 2);
    assert_eq!(baton.status()["master"]["current_generation"], 2);
    // The CLI's --json is the same answer.
    let cli = baton.cli(&["reload", "--json", "--if-version", "v1"]);
    assert!(cli.status.success());
    let printed: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(printed["ok"], true);
    assert_eq!(printed["result"]["outcome"], "unchanged");
    // Another version reloads.
    let next = post(&baton, "/reload?if_version=v2", Some(TOKEN));
    assert_eq!(next.body["result"]["generation"], 3, "{next:?}");
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 3, "{status}");
    let third = generation_in(&status, 3).expect("generation 3");
    assert_eq!(third["deploy_version"], "v2", "{status}");

    // What the master refuses is a 409 with its reason.
    for path in ["/promote", "/rollback"] {
        let refused = post(&baton, path, Some(TOKEN));
        assert_eq!(refused.status, 409, "{refused:?}");
        assert!(refused.body["error"]
            .as_str()
            .unwrap()
            .contains("no reload is on probation"));
    }
    // A bad parameter is a 400 naming it, and asks nothing of the master.
    let bad = post(&baton, "/scale?to=two", Some(TOKEN));
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.body["error"]
        .as_str()
        .unwrap()
        .contains("to must be an integer"));
    let unknown = post(&baton, "/reload?colour=red", Some(TOKEN));
    assert_eq!(unknown.status, 400);
    assert!(unknown.body["error"]
        .as_str()
        .unwrap()
        .contains("\"colour\""));
    // A JSON body says the same as a query string.
    let url = admin_url(&baton, "/scale");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let scale = curl(
        &url,
        "POST",
        &["-H", &auth, "-d", r#"{"to": 2}"#],
        None,
        None,
    );
    assert_eq!(scale.status, 200, "{scale:?}");
    assert_eq!(scale.body["result"]["processes"], 2);
    let reopen = post(&baton, "/reopen", Some(TOKEN));
    assert_eq!(reopen.status, 200, "{reopen:?}");
    assert_eq!(reopen.body["result"]["workers"], 2);

    // A reload that fails: 409, with the failed outcome; the generation serving stays.
    let config = std::fs::read_to_string(baton.dir().join("baton.toml")).unwrap();
    baton.write_config(&config.replace("drain_timeout = \"5s\"", "drain_timeout = \"never\""));
    let failed = post(&baton, "/reload", Some(TOKEN));
    assert_eq!(failed.status, 409, "{failed:?}");
    assert_eq!(failed.body["result"]["outcome"], "failed");
    assert!(failed.body["error"]
        .as_str()
        .unwrap()
        .contains("invalid duration \"never\""));
    assert_eq!(baton.status()["master"]["current_generation"], 3);
    baton.write_config(&config);
    // wait=false: accepted at once; the outcome follows.
    let accepted = post(&baton, "/reload?wait=false", Some(TOKEN));
    assert_eq!(accepted.status, 202, "{accepted:?}");
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "reload.committed" && span_generation(e) > Some(3)
    });

    // Audited as control requests are, never with the token itself.
    let audited = baton.events(|e| {
        message(e) == "control request"
            && e["fields"]["requested_by"]
                .as_str()
                .is_some_and(|r| r.starts_with("admin endpoint from 127.0.0.1:"))
    });
    assert!(audited.len() >= 8, "{audited:?}");
    assert!(baton
        .events(|e| {
            let text = e.to_string();
            text.contains(TOKEN) || text.contains(OTHER_TOKEN)
        })
        .is_empty());

    // Stop over HTTP ends the master.
    let stop = post(&baton, "/stop", Some(TOKEN));
    assert_eq!(stop.status, 200, "{stop:?}");
    assert!(baton.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn writes_are_off_unless_configured_and_bad_settings_are_named() {
    let baton = start("127.0.0.1:0", "");
    let off = post(&baton, "/reload", Some(TOKEN));
    assert_eq!(off.status, 403, "{off:?}");
    assert!(off.body["error"]
        .as_str()
        .unwrap()
        .contains("writes are off on this admin endpoint"));
    assert_eq!(baton.status()["master"]["current_generation"], 1);
    // Reads stay open.
    let status = curl(&admin_url(&baton, "/status"), "GET", &[], None, None);
    assert_eq!(status.status, 200);

    // A reload to a config whose token file is bad fails, naming it, and
    // changes nothing.
    let config = std::fs::read_to_string(baton.dir().join("baton.toml")).unwrap();
    let checks = [
        ("admin_token_file = \"missing\"\n", "admin_token_file"),
        (
            "admin_token_file = \"short\"\n",
            "short:1: a token must have at least 32",
        ),
        (
            "admin_peer_writes = true\n",
            "admin_peer_writes applies to a unix: admin endpoint",
        ),
    ];
    std::fs::write(baton.dir().join("short"), "tooshort\n").unwrap();
    for (line, error) in checks {
        baton.write_config(&config.replace("[supervisor]\n", &format!("[supervisor]\n{line}")));
        let check = baton.cli(&["check"]);
        assert_eq!(check.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(stderr.contains(error), "{line}: {stderr}");
        let reload = baton.cli(&["reload", "--json"]);
        assert_eq!(reload.status.code(), Some(1));
        let printed: Value = serde_json::from_slice(&reload.stdout).unwrap();
        assert_eq!(printed["result"]["outcome"], "failed", "{printed}");
        assert!(
            printed["error"].as_str().unwrap().contains(error),
            "{printed}"
        );
        assert!(!stderr.contains("tooshort"), "{stderr}");
    }
    assert_eq!(baton.status()["master"]["current_generation"], 1);
}

#[test]
fn unix_admin_writes_go_by_the_peers_uid_or_a_token() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to write as another uid");
        return;
    }
    let baton = start(
        "unix:admin.sock",
        "admin_peer_writes = true\nadmin_token_file = \"tokens\"\n",
    );
    let socket = baton.dir().join("admin.sock");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let url = "http://baton/scale?to=2";
    // Root: by its uid, no token needed.
    let root = curl(url, "POST", &[], Some(&socket), None);
    assert_eq!(root.status, 200, "{root:?}");
    assert_eq!(root.body["result"]["processes"], 2);
    // Another uid: refused, unless it has a token.
    let stranger = curl(
        "http://baton/scale?to=3",
        "POST",
        &[],
        Some(&socket),
        Some(65534),
    );
    assert_eq!(stranger.status, 403, "{stranger:?}");
    assert!(stranger.body["error"]
        .as_str()
        .unwrap()
        .contains("uid 65534"));
    let auth = format!("Authorization: Bearer {TOKEN}");
    let with_token = curl(
        "http://baton/scale?to=3",
        "POST",
        &["-H", &auth],
        Some(&socket),
        Some(65534),
    );
    assert_eq!(with_token.status, 200, "{with_token:?}");
    assert_eq!(with_token.body["result"]["processes"], 3);
    let status = baton.status();
    let workers = status["generations"][0]["workers"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(workers, 3, "{status}");
}

#[test]
fn upgrade_restart_and_drain_work_over_http() {
    let baton = start("127.0.0.1:0", "admin_token_file = \"tokens\"\n");
    let first = baton.pid();
    let upgrade = post(&baton, "/upgrade", Some(TOKEN));
    assert_eq!(upgrade.status, 200, "{upgrade:?}");
    let upgraded = upgrade.body["result"]["new_pid"].as_i64().expect("new_pid");
    assert_ne!(upgraded, first.as_raw() as i64);
    let new_master = baton.wait_new_master(first, Duration::from_secs(20));
    // The new master serves the same admin endpoint, and takes the token.
    let restart = post(&baton, "/restart", Some(TOKEN));
    assert_eq!(restart.status, 200, "{restart:?}");
    let restarted = baton.wait_new_master(new_master, Duration::from_secs(20));
    baton.wait_event(Duration::from_secs(20), |e| {
        event_name(e) == "reload.committed"
            && baton_tests::harness::field(e, "outcome") == "committed"
            && e["span"]["trigger"] == "restart"
    });
    let drain = post(&baton, "/drain?grace=200ms", Some(TOKEN));
    assert_eq!(drain.status, 200, "{drain:?}");
    assert_eq!(drain.body["result"]["grace_ms"], 200);
    baton_tests::harness::wait_gone(restarted, "the drained master");
}
