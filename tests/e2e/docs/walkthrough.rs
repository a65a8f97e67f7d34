//! The README's walkthrough, run as written: its ```` ```console ```` blocks
//! marked `<!-- walkthrough -->`, in a temp dir laid out as a clone
//! (`examples/hello/`, `target/release/baton`), against a real master.

use super::{blocks, Block};
use baton_tests::harness::{Baton, Binaries, TempDir};
use baton_tests::tools::repository;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The address the walkthrough's commands name; the test's master listens
/// on a port of the kernel's choosing instead.
const DOCUMENTED: &str = "127.0.0.1:8080";

/// One `$ ` line of a walkthrough block, and the output shown below it.
pub(super) struct Step {
    pub(super) at: String,
    pub(super) command: String,
    pub(super) shown: Vec<String>,
}

pub(super) fn steps(blocks: &[Block]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for block in blocks {
        assert_eq!(block.lang, "console", "{}: a walkthrough block", block.at);
        for line in block.text.lines() {
            if let Some(command) = line.strip_prefix("$ ") {
                steps.push(Step {
                    at: block.at.clone(),
                    command: command.to_string(),
                    shown: Vec::new(),
                });
            } else if !line.trim().is_empty() {
                let step = steps
                    .last_mut()
                    .unwrap_or_else(|| panic!("{}: output before the first command", block.at));
                step.shown.push(line.to_string());
            }
        }
    }
    steps
}

/// Whether `line` is what the docs show as `shown`: `...` stands for any
/// text, a number for any number (pids, times, ports, counts; or `-`, a
/// value not reported yet), a run of spaces for any (columns align to what
/// they hold); the rest is literal.
fn shows(shown: &str, line: &str) -> bool {
    fn at(p: &[char], s: &[char]) -> bool {
        let digits = |s: &[char]| s.iter().take_while(|c| c.is_ascii_digit()).count();
        let spaces = |s: &[char]| s.iter().take_while(|c| c.is_whitespace()).count();
        match p {
            [] => s.is_empty(),
            ['.', '.', '.', rest @ ..] => (0..=s.len()).any(|i| at(rest, &s[i..])),
            [c, ..] if c.is_ascii_digit() => {
                let rest = &p[digits(p)..];
                let n = digits(s);
                (n > 0 && at(rest, &s[n..])) || (s.first() == Some(&'-') && at(rest, &s[1..]))
            }
            [c, ..] if c.is_whitespace() => {
                let n = spaces(s);
                n > 0 && at(&p[spaces(p)..], &s[n..])
            }
            [c, rest @ ..] => s.first() == Some(c) && at(rest, &s[1..]),
        }
    }
    let p: Vec<char> = shown.trim().chars().collect();
    let s: Vec<char> = line.trim().chars().collect();
    at(&p, &s)
}

/// Every line `shown` appears in `output`, in order (other lines may come
/// between them: a generation still draining, a header curl adds).
pub(super) fn assert_shows(step: &Step, shown: &[String], output: &str) {
    let mut lines = output.lines();
    for expected in shown {
        assert!(
            lines.any(|line| shows(expected, line)),
            "{}: `{}` printed no line like\n  {expected}\nafter the ones before it; it printed:\n{output}",
            step.at,
            step.command
        );
    }
}

/// A shell command's process group, killed when the test ends however it
/// ends.
struct Group(Pid);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// Runs `command` with `sh -c` in `dir`, for at most 30 s.
pub(super) fn run(command: &str, dir: &Path) -> Output {
    let mut child = Command::new("sh");
    child
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child.spawn().expect("running sh");
    let group = Group(Pid::from_raw(child.id() as i32));
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "`{command}` still runs after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(group);
    child.wait_with_output().expect("the command's output")
}

/// The walkthrough's master: `examples/hello` as in the clone, but on a
/// port of the kernel's choosing and logging JSON for the harness.
fn clone_layout(dir: &Path) {
    let hello = dir.join("examples/hello");
    std::fs::create_dir_all(&hello).unwrap();
    let example = repository().join("examples/hello");
    let config = std::fs::read_to_string(example.join("baton.toml")).unwrap();
    let listener = format!("address = \"{DOCUMENTED}\"");
    assert!(
        config.contains(&listener) && config.contains("[supervisor]\n"),
        "examples/hello/baton.toml: {listener} under [supervisor]"
    );
    let config = config
        .replace(&listener, "address = \"127.0.0.1:0\"")
        .replace("[supervisor]\n", "[supervisor]\nlog_format = \"json\"\n");
    std::fs::write(hello.join("baton.toml"), config).unwrap();
    std::fs::copy(example.join("hello.toml"), hello.join("hello.toml")).unwrap();
    let release = dir.join("target/release");
    std::fs::create_dir_all(release.join("examples")).unwrap();
    std::os::unix::fs::symlink(Binaries::baton(), release.join("baton")).unwrap();
    std::os::unix::fs::symlink(Binaries::hello(), release.join("examples/hello")).unwrap();
}

/// The README's walkthrough does what it says: `baton run` starts the
/// example, `curl` gets what is shown, `kill -HUP` and `baton reload` each
/// commit a new generation, `baton status` shows it, and `baton stop` ends
/// the master with exit 0. The blocks' commands run verbatim but for the
/// address (the test's port, not 8080); each output line shown must appear.
#[test]
fn the_readme_walkthrough_runs_as_written() {
    let marked: Vec<Block> = blocks(Path::new("README.md"))
        .into_iter()
        .filter(|b| b.marker.as_deref() == Some("walkthrough"))
        .collect();
    let steps = steps(&marked);
    let first = steps
        .first()
        .expect("README.md has `<!-- walkthrough -->` blocks");
    let run_words = shlex::split(&first.command).expect("a shell command");
    assert_eq!(
        run_words[..3],
        ["./target/release/baton", "run", "-c"],
        "{}: the walkthrough starts the master",
        first.at
    );
    assert!(first.shown.is_empty(), "{}: `baton run` runs on", first.at);
    let last = steps.last().unwrap();
    assert!(
        last.command.starts_with("./target/release/baton stop "),
        "{}: the walkthrough ends with `baton stop`",
        last.at
    );

    let dir = TempDir::new();
    clone_layout(dir.path());
    let root = dir.path().to_path_buf();
    let mut command = Command::new(root.join(&run_words[0]));
    command.args(&run_words[1..]).current_dir(&root);
    let mut baton = Baton::start_command(dir, command);
    baton.wait_committed(1);
    let address: SocketAddr = baton.address("http");

    let mut generation = 1;
    let mut reloads = 0;
    for step in &steps[1..] {
        let command = step.command.replace(DOCUMENTED, &address.to_string());
        let out = run(&command, &root);
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "$ {command}\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{}: `{command}` failed: {}",
            step.at,
            out.status
        );
        let shown: Vec<String> = step
            .shown
            .iter()
            .map(|l| l.replace(DOCUMENTED, &address.to_string()))
            .collect();
        assert_shows(step, &shown, &stdout);
        let words = shlex::split(&step.command).unwrap_or_default();
        let reload = words.starts_with(&["kill".into(), "-HUP".into()])
            || words.get(1).map(String::as_str) == Some("reload");
        if reload {
            generation += 1;
            reloads += 1;
            let committed = baton.wait_committed(generation);
            eprintln!(
                "{}: generation {generation} committed: {committed}",
                step.at
            );
        }
    }
    assert!(
        reloads >= 2,
        "the walkthrough reloads by signal and by command"
    );
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "`baton stop`: the master exited with {status}"
    );
}

#[test]
fn shown_output_matches_numbers_spaces_and_ellipses() {
    assert!(shows("hello from generation 2", "hello from generation 12"));
    assert!(shows("date: ...", "date: Sun, 06 Dec 2026 18:40:00 GMT"));
    assert!(shows(
        "3    current   1s   0       41022  ready",
        "3    current   0s   0       7  ready"
    ));
    assert!(shows("  validate        0.1 ms", "validate 12.05 ms"));
    assert!(shows("CONNS 0", "CONNS -"));
    assert!(!shows(
        "hello from generation 2",
        "bonjour from generation 2"
    ));
    assert!(!shows(
        "reload to generation 3 committed",
        "reload to generation 3 failed"
    ));
    assert!(!shows("up 2m14s", "up 14s"));
}
