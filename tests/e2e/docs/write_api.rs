//! The write API's examples in `docs/operations.md` (the ```` ```console
//! ```` block marked `<!-- write-api -->`), run as written with `curl`
//! against a real master whose admin endpoint takes a token.

use super::blocks;
use super::walkthrough::{assert_shows, run, steps};
use baton_tests::harness::{hello_config, Baton};
use std::path::Path;

/// The admin address the examples name; the test's master listens on a
/// port of the kernel's choosing instead.
const DOCUMENTED: &str = "127.0.0.1:9090";

#[test]
fn the_write_api_examples_run_as_written() {
    if baton_tests::tools::require("curl", "apt-get install curl").is_none() {
        return;
    }
    let marked: Vec<_> = blocks(Path::new("docs/operations.md"))
        .into_iter()
        .filter(|b| b.marker.as_deref() == Some("write-api"))
        .collect();
    let steps = steps(&marked);
    assert!(
        steps.len() >= 3,
        "docs/operations.md has the write-api block"
    );
    let config = hello_config(1).replace(
        "[supervisor]\n",
        "[supervisor]\nadmin = \"127.0.0.1:0\"\nadmin_token_file = \"tokens\"\n",
    );
    let dir = baton_tests::harness::TempDir::new();
    // What `openssl rand -hex 32 > tokens` writes.
    std::fs::write(dir.path().join("tokens"), format!("{}\n", "5a".repeat(32))).unwrap();
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton = Baton::start_in(dir, &["run"]);
    baton.wait_committed(1);
    let admin = baton.status()["master"]["admin"]
        .as_str()
        .expect("the admin address")
        .to_string();
    for step in &steps {
        let command = step.command.replace(DOCUMENTED, &admin);
        let out = run(&command, baton.dir());
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("$ {command}\n{stdout}");
        assert!(out.status.success(), "{}: `{command}` failed", step.at);
        assert_shows(step, &step.shown, &stdout);
    }
    let status = baton.status();
    assert_eq!(status["master"]["current_generation"], 2, "{status}");
    let current = baton_tests::harness::generation_in(&status, 2).expect("generation 2");
    assert_eq!(current["deploy_version"], "v42", "{status}");
}
