//! What the docs show works as shown. The pages are the README and every
//! `.md` under `docs/` ([`pages`]), so a new page is checked without being
//! listed anywhere:
//!
//! - every `baton` command line parses with the CLI ([`commands`]);
//! - every ```` ```toml ```` block is a `baton.toml` the master accepts, but
//!   the Cargo manifest lines, which build the worker example in a project
//!   of their own; the reference in `docs/configuration.md` shows every key
//!   the master accepts;
//! - the README's walkthrough runs against a real master ([`walkthrough`]),
//!   and the Kubernetes probes get their answers from the admin endpoint;
//! - the systemd units pass `systemd-analyze verify`;
//! - every relative link reaches its file and heading, and the README links
//!   every page.
//!
//! The Rust snippets are doc tests of `baton-tests` (`tests/src/lib.rs`,
//! whose `build.rs` lists the same pages).

mod commands;
mod configs;
mod kubernetes;
mod links;
mod walkthrough;
mod write_api;

use baton_tests::harness::{Binaries, TempDir};
use baton_tests::tools::{repository, require};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The documentation pages: `README.md` and every `.md` under `docs/`,
/// relative to the repository, sorted.
pub fn pages() -> Vec<PathBuf> {
    let root = repository();
    let mut pages = vec![PathBuf::from("README.md")];
    let mut stack = vec![root.join("docs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                pages.push(path.strip_prefix(&root).unwrap().to_path_buf());
            }
        }
    }
    pages.sort();
    pages
}

/// A fenced code block of a page.
pub struct Block {
    /// `page:line` of its opening fence.
    pub at: String,
    /// The page's line number of its opening fence: the block's line `n`
    /// is the page's line `line + n`.
    pub line: usize,
    /// The first word of its info string: `toml`, `rust` (of `rust,no_run`),
    /// `console`, ...
    pub lang: String,
    /// The HTML comment on the line before the fence (`<!-- walkthrough -->`
    /// gives `walkthrough`), if any.
    pub marker: Option<String>,
    /// Its lines, without the fences.
    pub text: String,
}

/// The fenced blocks of `page` (relative to the repository), in order;
/// fences may be indented (in a list item).
pub fn blocks(page: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(repository().join(page)).unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    let mut previous = "";
    for (n, line) in text.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => {
                let marker = previous
                    .trim()
                    .strip_prefix("<!--")
                    .and_then(|m| m.strip_suffix("-->"))
                    .map(|m| m.trim().to_string());
                open = Some(Block {
                    at: format!("{}:{}", page.display(), n + 1),
                    line: n + 1,
                    lang: info
                        .split(',')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                    marker,
                    text: String::new(),
                });
            }
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some(block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {}
        }
        previous = line;
    }
    assert!(
        open.is_none(),
        "{}: a code block is never closed",
        page.display()
    );
    blocks
}

/// Every fenced block of every page.
fn all_blocks() -> Vec<Block> {
    pages().iter().flat_map(|page| blocks(page)).collect()
}

/// Where the units expect baton; `systemd-analyze verify` wants the
/// program of every `Exec*=` line to exist, so a temp copy names the built
/// one instead.
const INSTALLED: &str = "/usr/local/bin/baton";

fn units_in(dir: &Path, service: &str) {
    let baton = Binaries::baton();
    let baton = baton.to_str().expect("a UTF-8 path");
    let socket = std::fs::read_to_string(repository().join("examples/systemd/baton.socket"))
        .expect("examples/systemd/baton.socket");
    std::fs::write(dir.join("baton.service"), service.replace(INSTALLED, baton)).unwrap();
    std::fs::write(dir.join("baton.socket"), socket).unwrap();
}

/// `systemd-analyze verify` on both units: it must exit 0 and say nothing
/// (an unknown `Type=` is only a warning there, and the unit silently
/// becomes `Type=simple`).
fn verify(analyze: &Path, dir: &Path) -> std::process::Output {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.join("baton.service"))
        .arg(dir.join("baton.socket"))
        .current_dir(dir)
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    out
}

fn systemd_version(analyze: &Path) -> u32 {
    let out = Command::new(analyze).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in `systemd-analyze --version`: {text}"))
}

#[test]
fn the_systemd_example_units_pass_systemd_analyze_verify() {
    let Some(analyze) = require("systemd-analyze", "apt-get install systemd") else {
        return;
    };
    let service = std::fs::read_to_string(repository().join("examples/systemd/baton.service"))
        .expect("examples/systemd/baton.service");
    assert!(
        service.contains(&format!("ExecStart={INSTALLED} ")),
        "the unit runs {INSTALLED}"
    );
    let dir = TempDir::new();
    units_in(dir.path(), &service);
    verify(&analyze, dir.path());

    // The commented form for systemd 253 and later: where systemd knows
    // it, it must verify too.
    let version = systemd_version(&analyze);
    let newer = service
        .replace("\nType=notify\n", "\n")
        .replace("\nExecReload=", "\n#ExecReload=")
        .replace("\n#Type=notify-reload\n", "\nType=notify-reload\n");
    assert!(
        newer.contains("\nType=notify-reload\n") && !newer.contains("\nType=notify\n"),
        "the unit keeps Type=notify-reload as a commented alternative"
    );
    if version >= 253 {
        let dir = TempDir::new();
        units_in(dir.path(), &newer);
        verify(&analyze, dir.path());
    } else {
        eprintln!("systemd {version}: Type=notify-reload needs 253, not verified here");
    }
    // Likewise the fd store's preservation, from systemd 254 on.
    let preserving = service.replace(
        "\n#FileDescriptorStorePreserve=restart\n",
        "\nFileDescriptorStorePreserve=restart\n",
    );
    assert_ne!(
        preserving, service,
        "the unit keeps FileDescriptorStorePreserve=restart as a commented line"
    );
    if version >= 254 {
        let dir = TempDir::new();
        units_in(dir.path(), &preserving);
        verify(&analyze, dir.path());
    } else {
        eprintln!("systemd {version}: FileDescriptorStorePreserve= needs 254, not verified here");
    }
}

/// A ```` ```toml ```` block that is the `[dependencies]` of a worker's
/// `Cargo.toml`, not a `baton.toml`.
fn is_cargo_manifest(block: &Block) -> bool {
    block.text.contains("[dependencies]")
}

/// The one block of `lang` in the docs containing `marker`.
fn block_with(lang: &str, marker: &str) -> Block {
    let mut found: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.lang == lang && b.text.contains(marker))
        .collect();
    let where_: Vec<&str> = found.iter().map(|b| b.at.as_str()).collect();
    assert_eq!(
        found.len(),
        1,
        "one ```{lang} block with {marker:?} in the docs, found at {where_:?}"
    );
    found.remove(0)
}

/// A project outside this workspace, with exactly the `[dependencies]`
/// that `docs/worker.md` gives (the SDK's path pointed at this clone) and
/// its axum example as `main.rs`, type-checks: the path dependency works,
/// and the tokio features named are the ones `#[tokio::main]` needs.
#[test]
#[ignore = "type-checks ~100 crates outside the workspace (minutes): .ci/run runs it after the suite"]
fn the_documented_dependency_lines_build_the_worker_example() {
    let block = block_with("toml", "baton-worker = ");
    assert!(
        is_cargo_manifest(&block),
        "{}: a [dependencies] block",
        block.at
    );
    let dependencies = block.text;
    let documented_path = "path = \"../baton/worker-sdk\"";
    assert!(
        dependencies.starts_with("[dependencies]\n") && dependencies.contains(documented_path),
        "the docs' dependency block:\n{dependencies}"
    );
    let sdk = repository().join("worker-sdk");
    let dependencies = dependencies.replace(
        documented_path,
        &format!("path = {:?}", sdk.to_str().unwrap()),
    );
    let main = block_with("rust", "#[tokio::main]").text;

    let dir = TempDir::new();
    let manifest = format!(
        "[package]\nname = \"docs-check\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n[workspace]\n\n{dependencies}\n"
    );
    std::fs::write(dir.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/main.rs"), main).unwrap();
    // The workspace's lock file: the same versions, found offline.
    std::fs::copy(
        repository().join("Cargo.lock"),
        dir.path().join("Cargo.lock"),
    )
    .unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = Command::new(cargo)
        .args(["check", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.path().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", repository().join("target/docs-check"))
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "cargo check of the docs' worker example with its dependency lines: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
