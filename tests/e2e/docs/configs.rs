//! The `baton.toml` the docs show: each one is accepted by the master, and
//! the reference shows every key.

use super::{all_blocks, blocks, is_cargo_manifest};
use baton_tests::harness::TempDir;
use std::path::Path;

/// Every `baton.toml` the docs show is one the master accepts: parsed and
/// validated as `baton check` and a reload do ([`baton::config::Config::parse`]:
/// unknown keys, types, ranges, `{fd:NAME}`, rollout settings, `user` and
/// `group` resolved, `app_config` files read). A fragment (only `[worker]`
/// settings, say) is completed with a listener or a worker command of its
/// own, appended so that an error's line is still the block's. What `baton
/// check` adds beyond the file (the program exists, the port is free)
/// depends on the reader's machine, not on the docs.
#[test]
fn every_baton_toml_in_the_docs_is_a_valid_config() {
    let root = nix::unistd::geteuid().is_root();
    let mut checked = Vec::new();
    let mut bad = Vec::new();
    for block in all_blocks() {
        if block.lang != "toml" || is_cargo_manifest(&block) {
            continue;
        }
        let table: toml::Table = match toml::from_str(&block.text) {
            Ok(table) => table,
            Err(e) => {
                bad.push(format!("{}: not TOML: {e}", block.at));
                continue;
            }
        };
        let mut text = block.text.clone();
        if !root {
            // Only root may name another user: the docs show `user` and
            // `group` for a master run as root. Blanked, not removed, so
            // that line numbers stay the block's.
            text = text
                .lines()
                .map(|l| match l.split('=').next().map(str::trim) {
                    Some("user" | "group") => "",
                    _ => l,
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        if !table.contains_key("listener") {
            text.push_str("\n[[listener]]\nname = \"docs\"\naddress = \"127.0.0.1:0\"\n");
        }
        if !table.contains_key("worker") {
            text.push_str("\n[worker]\ncommand = [\"./app\"]\n");
        }
        let dir = TempDir::new();
        // The application's own files are read with the config.
        let app_files = table
            .get("worker")
            .and_then(|w| w.get("app_config"))
            .and_then(|a| a.as_array())
            .cloned()
            .unwrap_or_default();
        for file in app_files.iter().filter_map(|f| f.as_str()) {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        // So is the admin endpoint's token file.
        let tokens = table
            .get("supervisor")
            .and_then(|s| s.get("admin_token_file"))
            .and_then(|f| f.as_str());
        if let Some(file) = tokens {
            std::fs::write(dir.path().join(file), format!("{}\n", "0f".repeat(16))).unwrap();
        }
        match baton::config::Config::parse(&dir.path().join("baton.toml"), &text) {
            Ok(_) => checked.push(block.at),
            // At the page's line (what was appended comes after the block).
            Err(e) => bad.push(match e.location {
                Some((line, column)) => {
                    let page = block.at.split(':').next().unwrap_or_default();
                    format!("{page}:{}:{column}: {}", block.line + line, e.message)
                }
                None => format!("{}: {}", block.at, e.message),
            }),
        }
    }
    eprintln!(
        "{} baton.toml blocks accepted: {}",
        checked.len(),
        checked.join(", ")
    );
    assert!(
        bad.is_empty(),
        "configs the master rejects:\n{}",
        bad.join("\n")
    );
    // The ten-line config, the reference, and fragments in several pages.
    assert!(
        checked.len() >= 4,
        "only {} baton.toml blocks found in the docs: is the extraction broken?",
        checked.len()
    );
    assert!(
        checked.iter().any(|at| at.starts_with("README.md:"))
            && checked
                .iter()
                .any(|at| at.starts_with("docs/configuration.md:")),
        "the README's config and the reference are checked: {checked:?}"
    );
}

/// The keys the master accepts in `table` (`supervisor`, `listener`,
/// `worker`), as its own error for an unknown key lists them.
fn accepted_keys(table: &str) -> Vec<String> {
    let header = if table == "listener" {
        "[[listener]]"
    } else {
        "[supervisor]"
    };
    let mut text = format!("{header}\nnot_a_key = 1\n");
    if table == "worker" {
        text = "[worker]\ncommand = [\"./app\"]\nnot_a_key = 1\n".into();
    }
    let dir = TempDir::new();
    let e = baton::config::Config::parse(&dir.path().join("baton.toml"), &text)
        .err()
        .unwrap_or_else(|| panic!("an unknown key in [{table}] is refused"));
    let expected = e
        .message
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("the error lists the keys of [{table}]: {}", e.message));
    expected
        .split(',')
        .map(|k| k.trim().trim_matches('`').to_string())
        .take_while(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect()
}

/// The reference in `docs/configuration.md` shows every key of every
/// table: a key added to the master without a line there fails here.
#[test]
fn the_configuration_reference_shows_every_key() {
    let reference = blocks(Path::new("docs/configuration.md"))
        .into_iter()
        .find(|b| b.lang == "toml")
        .expect("docs/configuration.md has the reference block");
    let shown: toml::Table = toml::from_str(&reference.text).unwrap();
    for (table, section) in [
        ("supervisor", shown.get("supervisor")),
        ("listener", shown.get("listener").and_then(|l| l.get(0))),
        ("worker", shown.get("worker")),
    ] {
        let section = section
            .and_then(|s| s.as_table())
            .unwrap_or_else(|| panic!("{}: a [{table}] table", reference.at));
        let keys = accepted_keys(table);
        assert!(keys.len() >= 4, "[{table}] keys: {keys:?}");
        let missing: Vec<&String> = keys.iter().filter(|k| !section.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "{}: [{table}] does not show {missing:?}",
            reference.at
        );
    }
}
