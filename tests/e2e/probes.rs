//! Readiness probes: tried every `probe_interval` even when one hangs, and
//! an `exec:` probe's output logged bounded, however much it prints.

use baton_tests::harness::{
    config_with_worker, event_name, field, message, wrapped_worker, Baton, TempDir,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes the shell script `body` to `dir/probe.sh`, executable, and
/// returns its path.
fn script(dir: &Path, body: &str) -> String {
    let path = dir.join("probe.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// Two `wrapped` workers ready by `exec:PROBE`, with `rest`; `release`
/// makes each config a new release.
fn probed(probe: &str, rest: &str, release: u32) -> String {
    config_with_worker(&wrapped_worker(
        &[],
        &format!(
            "processes = 2\ndrain_timeout = \"5s\"\nenv = {{ RELEASE = \"{release}\" }}\n{rest}"
        ),
    ))
    .replace("ready = \"notify\"", &format!("ready = \"exec:{probe}\""))
}

/// A probe of generation 2 that hangs after its first pass was tried every
/// 2 × `probe_interval` (the next try was counted from the hung one's
/// deadline). Tries start every `probe_interval`: over a 4 s probation at
/// 250 ms, about 16 of them.
#[test]
fn a_hanging_probe_is_tried_every_probe_interval() {
    let files = TempDir::new();
    let tries = files.path().join("tries");
    let probe = script(
        files.path(),
        &format!(
            "echo \"$BATON_GENERATION\" >> {tries}\n\
             if [ \"$BATON_GENERATION\" = 2 ] && [ -e {dir}/passed-2 ]; then exec sleep 60; fi\n\
             touch {dir}/passed-$BATON_GENERATION\n",
            tries = tries.display(),
            dir = files.path().display()
        ),
    );
    let rest = "probe_interval = \"250ms\"\nprobation = \"4s\"\nprobation_failures = 1000\n";
    let mut baton = Baton::start(&probed(&probe, rest, 1));
    baton.wait_committed(1);
    baton.write_config(&probed(&probe, rest, 2));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let tried = std::fs::read_to_string(&tries)
        .unwrap()
        .lines()
        .filter(|l| *l == "2")
        .count();
    let failed =
        baton.count_events(|e| message(e) == "probe failed" && field(e, "generation") == "2");
    eprintln!("generation 2: {tried} tries, {failed} failed, over a 4 s probation at 250 ms");
    // One pass, then a try every 250 ms for 4 s; at 500 ms, 9.
    assert!((12..=18).contains(&tried), "{tried} tries");
    assert!(failed >= tried - 2, "{failed} of {tried} tries failed");
}

/// A probe that printed 50 MB a try put all of it in the master's log
/// (250 MiB in one 5 s probation). Each stream of a try keeps its first
/// and last 4 KiB; the rest is read and dropped, and counted; the verdict
/// is the probe's exit status, as before; the master answers meanwhile.
#[test]
fn an_exec_probes_output_is_logged_bounded_and_its_verdict_holds() {
    let files = TempDir::new();
    let probe = script(
        files.path(),
        "echo \"probe start $BATON_GENERATION\"\n\
         head -c 50000000 /dev/zero | tr '\\0' x\n\
         echo\necho \"probe end\"\necho \"a line on stderr\" >&2\n\
         [ \"$BATON_GENERATION\" = 1 ]\n",
    );
    let config = |release| {
        probed(&probe, "probe_interval = \"2s\"\n", release)
            .replace("ready_timeout = \"10s\"", "ready_timeout = \"6s\"")
    };
    let mut baton = Baton::start(&config(1));
    baton.wait_committed(1);
    baton.write_config(&config(2));
    baton.skip_log();
    baton.signal(nix::sys::signal::Signal::SIGHUP);
    // While generation 2's probes print, the master answers.
    baton.next_event(Duration::from_secs(10), |e| {
        message(e) == "probe output" && field(e, "generation") == "2"
    });
    let asked = Instant::now();
    let status = baton.status();
    let answered = asked.elapsed();
    assert_eq!(status["master"]["current_generation"], 1, "{status}");
    assert!(
        answered < Duration::from_secs(2),
        "status took {answered:?}"
    );
    let outcome = baton.next_event(Duration::from_secs(30), |e| {
        message(e).starts_with("reload failed")
    });
    // The verdict: generation 1's probe passed, generation 2's failed.
    assert_eq!(field(&outcome, "phase"), "ready", "{outcome}");
    assert!(
        field(&outcome, "reason").contains("probe command exited with exit status 1"),
        "{outcome}"
    );
    let outputs = baton.events(|e| message(e) == "probe output" && field(e, "stream") == "stdout");
    assert!(outputs.len() >= 3, "{} stdout events", outputs.len());
    let mut complete = 0;
    for output in &outputs {
        let generation = field(output, "generation");
        assert!(
            field(output, "output").starts_with(&format!("probe start {generation}\nxxxx")),
            "{output}"
        );
        let bytes: u64 = field(output, "bytes").parse().expect("bytes is a number");
        assert_eq!(
            field(output, "omitted_bytes"),
            (bytes - 8192).to_string(),
            "{output}"
        );
        // A try still printing at its deadline (a slow, busy machine) is
        // killed: its output stops short of the end.
        if field(output, "tail").ends_with("xxxx\nprobe end") {
            assert_eq!(bytes, 50_000_000 + 25, "{output}");
            complete += 1;
        } else {
            assert!(bytes < 50_000_000 + 25, "{output}");
        }
    }
    assert!(complete >= 1, "no try printed all of its output");
    let stderr = baton.events(|e| message(e) == "probe output" && field(e, "stream") == "stderr");
    assert!(stderr
        .iter()
        .all(|e| field(e, "output") == "a line on stderr"));
    // 4 tries or more of 50 MB; the log holds a few KiB of each.
    let logged = baton.log_bytes();
    eprintln!("{} tries, {logged} bytes of log in all", outputs.len());
    assert!(logged < 1024 * 1024, "{logged} bytes of log");
}
