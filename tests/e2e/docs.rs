//! What the docs show works as shown: the systemd units pass `systemd-analyze
//! verify`, and the README's dependency lines build its worker example.
//! (The Rust snippets themselves are doc tests of `baton-worker`, and the
//! `baton` commands shown are parsed by the CLI's unit tests.)

use baton_tests::harness::{Binaries, TempDir};
use baton_tests::tools::{repository, require};
use std::path::Path;
use std::process::Command;

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
}

/// The first fenced block of `lang` (its info string `rust` or `rust,no_run`)
/// in the README that contains `marker`.
fn readme_block(lang: &str, marker: &str) -> String {
    let readme = std::fs::read_to_string(repository().join("README.md")).unwrap();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match &mut block {
            None => {
                let info = line.strip_prefix("```").unwrap_or_default();
                if info.split(',').next() == Some(lang) {
                    block = Some(String::new());
                }
            }
            Some(text) if line.starts_with("```") => {
                if text.contains(marker) {
                    return std::mem::take(text);
                }
                block = None;
            }
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    panic!("no ```{lang} block with {marker:?} in README.md")
}

/// A project outside this workspace, with exactly the `[dependencies]`
/// the README gives (the SDK's path pointed at this clone) and its axum
/// example as `main.rs`, type-checks: the path dependency works, and the
/// tokio features named are the ones `#[tokio::main]` needs.
#[test]
#[ignore = "type-checks ~100 crates outside the workspace (minutes): .ci/run runs it after the suite"]
fn the_readme_dependency_lines_build_its_worker_example() {
    let dependencies = readme_block("toml", "baton-worker = ");
    let documented_path = "path = \"../baton/worker-sdk\"";
    assert!(
        dependencies.starts_with("[dependencies]\n") && dependencies.contains(documented_path),
        "README's dependency block:\n{dependencies}"
    );
    let sdk = repository().join("worker-sdk");
    let dependencies = dependencies.replace(
        documented_path,
        &format!("path = {:?}", sdk.to_str().unwrap()),
    );
    let main = readme_block("rust", "#[tokio::main]");

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
        "cargo check of the README's worker with its dependency lines: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `baton` command line shown in the docs: in ```sh/```console
/// blocks (a console block's `$ ` lines), in inline code of the prose,
/// and in the example files (the systemd units' `Exec*=` lines, comments
/// of the configs).
fn documented_commands() -> Vec<(String, Vec<String>)> {
    let root = repository();
    let mut sources = vec![root.join("README.md")];
    for dir in ["docs", "examples"] {
        let mut stack = vec![root.join(dir)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| {
                    ["md", "toml", "service", "socket", "conf", "rs", "py"]
                        .contains(&e.to_str().unwrap_or_default())
                }) {
                    sources.push(path);
                }
            }
        }
    }
    let mut commands = Vec::new();
    for source in sources {
        let text = std::fs::read_to_string(&source).unwrap();
        let name = source.strip_prefix(&root).unwrap().display().to_string();
        let markdown = name.ends_with(".md");
        let mut fence: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", n + 1);
            if markdown {
                if let Some(lang) = line.trim_start().strip_prefix("```") {
                    fence = match fence {
                        Some(_) => None,
                        None => Some(lang.trim().to_string()),
                    };
                    continue;
                }
                match fence.as_deref() {
                    Some("sh" | "bash" | "shell") => commands.push((at, line.to_string())),
                    Some("console") => {
                        if let Some(command) = line.strip_prefix("$ ") {
                            commands.push((at, command.to_string()));
                        }
                    }
                    Some(_) => {}
                    // Prose: each inline code span.
                    None => {
                        for (i, span) in line.split('`').enumerate() {
                            if i % 2 == 1 {
                                commands.push((at.clone(), span.to_string()));
                            }
                        }
                    }
                }
            } else {
                // Other files: `Exec*=` lines and code spans in comments.
                if let Some((key, value)) = line.split_once('=') {
                    if key.starts_with("Exec") {
                        commands.push((at.clone(), value.to_string()));
                    }
                }
                for (i, span) in line.split('`').enumerate() {
                    if i % 2 == 1 {
                        commands.push((at.clone(), span.to_string()));
                    }
                }
            }
        }
    }
    // From each, the `baton ...` invocations at the start of a shell
    // command (also after `sudo`, `kubectl exec ... --`, `Exec*=`; not
    // `cargo bench -p baton`), up to the end of that command.
    let mut found = Vec::new();
    for (at, text) in commands {
        let Some(words) = shlex::split(&text) else {
            continue;
        };
        let mut previous: Option<String> = None;
        let mut words = words.into_iter().peekable();
        while let Some(word) = words.next() {
            let starts = previous.as_deref().map_or(true, |p| {
                SEPARATORS.contains(&p) || ["sudo", "--", "exec"].contains(&p)
            });
            let baton = word == "baton" || word.ends_with("/baton");
            previous = Some(word.clone());
            if !(baton && (starts || word.starts_with("Exec"))) {
                continue;
            }
            let mut args = vec!["baton".to_string()];
            while let Some(arg) = words.next_if(|w| !SEPARATORS.contains(&&w[..])) {
                args.push(arg);
            }
            if args.len() > 1 {
                found.extend(synopses(&args).into_iter().map(|a| (at.clone(), a)));
            }
        }
    }
    found
}

const SEPARATORS: [&str; 5] = ["&&", "||", "|", ";", "&"];

/// A synopsis as the docs write one (`baton reload [--timeout DUR]`,
/// `baton scale +N`, `baton -s reload|stop`) as the command lines it
/// stands for: brackets dropped, placeholders given a value, each
/// alternative on its own.
fn synopses(args: &[String]) -> Vec<Vec<String>> {
    let mut lines = vec![Vec::new()];
    for arg in args {
        let arg = arg.trim_start_matches('[').trim_end_matches(']');
        let arg = match arg {
            "DUR" => "10s",
            "N" => "2",
            "+N" => "+2",
            "-N" => "-2",
            other => other,
        };
        let alternatives: Vec<&str> = if arg.contains('|') && !arg.starts_with('-') {
            arg.split('|').collect()
        } else {
            vec![arg]
        };
        lines = lines
            .into_iter()
            .flat_map(|line| {
                alternatives.iter().map(move |alt| {
                    let mut line = line.clone();
                    line.push(alt.to_string());
                    line
                })
            })
            .collect();
    }
    lines
}

/// Each `baton` command the docs show is one the CLI accepts: its
/// subcommand, flags and values parse (`--help` and `--version` too).
#[test]
fn every_baton_command_in_the_docs_parses() {
    use clap::Parser;
    let commands = documented_commands();
    let mut bad = Vec::new();
    for (at, args) in &commands {
        // The guardian's hidden first argument, which `main` takes before
        // the parser (docs/architecture.md names it).
        if args[1] == baton::guardian::ARG {
            continue;
        }
        match baton::cli::Cli::try_parse_from(args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) => {}
            // Prose naming a subcommand (`baton scale`) without its value.
            Err(e)
                if args.len() == 2
                    && e.kind() == clap::error::ErrorKind::MissingRequiredArgument => {}
            Err(e) => bad.push(format!("{at}: `{}`: {}", args.join(" "), e.kind())),
        }
    }
    eprintln!("{} baton commands in the docs parsed", commands.len());
    assert!(
        commands.len() > 40,
        "only {} baton commands found in the docs: is the extraction broken?",
        commands.len()
    );
    assert!(
        bad.is_empty(),
        "commands the CLI rejects:\n{}",
        bad.join("\n")
    );
}
