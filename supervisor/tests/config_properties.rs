//! Property tests of the configuration parser: whatever the file holds,
//! parsing never panics, and a configuration that is not right is an error
//! that names the file and where in it the problem is.

use baton::config::Config;
use proptest::prelude::*;
use std::path::Path;

const PATH: &str = "/etc/baton/baton.toml";

/// A configuration that uses every key, one per line.
const VALID: &str = r#"[supervisor]
control_socket = "baton.sock"
pid_file = "baton.pid"
log_filter = "info"
log_format = "json"
upgrade_timeout = "30s"
upgrade = "child"

[[listener]]
name = "http"
address = "127.0.0.1:8080"
backlog = 512

[[listener]]
name = "admin"
address = "unix:admin.sock"

[worker]
command = ["./server", "--port", "8080"]
processes = 4
protocol = "sdk"
ready = "sdk"
ready_timeout = "10s"
drain_timeout = "1m"
stop_signal = "SIGTERM"
reopen_signal = "SIGUSR1"
env = { RUST_LOG = "info" }
cwd = "."
output = "inherit"
"#;

/// Checks what every error must say: the file, a position inside it, and
/// a message.
fn assert_located(text: &str, error: &baton::config::ConfigError) {
    let shown = error.to_string();
    assert!(shown.starts_with(PATH), "{shown}");
    let (line, column) = error
        .location
        .unwrap_or_else(|| panic!("no line and column: {shown}"));
    let lines = text.split('\n').count();
    assert!(
        line >= 1 && line <= lines,
        "line {line} of {lines}: {shown}"
    );
    assert!(column >= 1, "{shown}");
    assert!(!error.message.trim().is_empty(), "{shown}");
}

/// A TOML value of any simple type, as it is written in a file.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,30}".prop_map(|s| toml::Value::String(s).to_string()),
        // Strings that look like what the keys want.
        "[0-9.]{0,6}(ms|s|m|h|d|)".prop_map(|s| toml::Value::String(s).to_string()),
        "(SIG)?[A-Z0-9]{0,6}".prop_map(|s| toml::Value::String(s).to_string()),
        "(unix:|udp:)?[0-9a-z.:\\[\\]/]{0,24}".prop_map(|s| toml::Value::String(s).to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (-5i64..70_000).prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| toml::Value::Float(f).to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_text_parses_or_is_a_located_error(text in "\\PC{0,300}") {
        if let Err(e) = Config::parse(Path::new(PATH), &text) {
            assert_located(&text, &e);
        }
    }

    #[test]
    fn damaged_configs_parse_or_are_located_errors(
        cuts in prop::collection::vec((any::<prop::sample::Index>(), 0usize..8, "\\PC{0,4}"), 1..4),
    ) {
        // Replace a few character ranges of a valid file with other text.
        let mut chars: Vec<char> = VALID.chars().collect();
        for (at, len, with) in &cuts {
            let start = at.index(chars.len());
            let end = (start + len).min(chars.len());
            chars.splice(start..end, with.chars());
        }
        let text: String = chars.into_iter().collect();
        if let Err(e) = Config::parse(Path::new(PATH), &text) {
            assert_located(&text, &e);
        }
    }

    #[test]
    fn a_bad_value_is_reported_on_its_own_line(
        line in any::<prop::sample::Index>(),
        value in toml_value(),
    ) {
        // Every `key = value` line of the valid file, given another value.
        let lines: Vec<&str> = VALID.lines().collect();
        let keyed: Vec<usize> = (0..lines.len())
            .filter(|i| lines[*i].contains(" = ") && !lines[*i].starts_with("env"))
            .collect();
        let target = keyed[line.index(keyed.len())];
        let key = lines[target].split(" = ").next().unwrap();
        let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        edited[target] = format!("{key} = {value}");
        let text = edited.join("\n") + "\n";
        if let Err(e) = Config::parse(Path::new(PATH), &text) {
            assert_located(&text, &e);
            let (at, _) = e.location.unwrap();
            // A listener-wide check (a duplicate name or address) points at
            // its table, a few lines up.
            prop_assert!(
                at == target + 1 || (key == "name" || key == "address") && at < target + 1,
                "error on line {} for line {} ({}): {}", at, target + 1, lines[target], e
            );
        }
    }
}
