//! The Kubernetes probes the docs show ask the admin endpoint for what it
//! answers.

use super::all_blocks;
use baton_tests::harness::{get_path, hello_config, Baton};
use std::net::SocketAddr;

/// `(path, port)` of each `httpGet: { path: P, port: N }` in the docs'
/// YAML blocks, with where it is.
fn probes() -> Vec<(String, String, u16)> {
    let mut probes = Vec::new();
    for block in all_blocks().into_iter().filter(|b| b.lang == "yaml") {
        for line in block.text.lines() {
            let Some(probe) = line.split("httpGet:").nth(1) else {
                continue;
            };
            let field = |name: &str| {
                probe
                    .split([',', '{', '}'])
                    .find_map(|f| f.trim().strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_else(|| panic!("{}: `{name}` in `{line}`", block.at))
            };
            let port = field("port:").parse().expect("a numeric port");
            probes.push((block.at.clone(), field("path:"), port));
        }
    }
    probes
}

/// Each probe's port is the one the docs give the admin endpoint (`admin
/// = "0.0.0.0:PORT"`, so that the kubelet reaches it on the pod's
/// address), and a master with an admin endpoint answers each probe's
/// path with 200 once its generation serves.
#[test]
fn the_kubernetes_probes_in_the_docs_get_200_from_the_admin_endpoint() {
    let probes = probes();
    assert!(
        probes.iter().any(|(_, path, _)| path == "/readyz")
            && probes.iter().any(|(_, path, _)| path == "/healthz"),
        "the docs show a readiness and a liveness probe: {:?}",
        probes
    );
    let docs: String = super::pages()
        .iter()
        .map(|p| std::fs::read_to_string(baton_tests::tools::repository().join(p)).unwrap())
        .collect();
    for (at, _, port) in &probes {
        assert!(
            docs.contains(&format!("admin = \"0.0.0.0:{port}\"")),
            "{at}: port {port} is the admin endpoint's (`admin = \"0.0.0.0:{port}\"` in the docs)"
        );
    }

    let config =
        hello_config(1).replace("[supervisor]\n", "[supervisor]\nadmin = \"127.0.0.1:0\"\n");
    let baton = Baton::start(&config);
    baton.wait_committed(1);
    let status = baton.status();
    let admin: SocketAddr = status["master"]["admin"]
        .as_str()
        .unwrap_or_else(|| panic!("no admin address in {status}"))
        .parse()
        .unwrap();
    for (at, path, _) in &probes {
        let (code, _, body) = get_path(admin, path).unwrap();
        assert_eq!(code, 200, "{at}: GET {path} answered {code} {body}");
    }
}

/// `examples/kubernetes/app.yaml`: valid Kubernetes objects
/// (`kubernetes-validate --strict`, from PyPI), a `baton.toml` in its
/// ConfigMap that `baton check` accepts, and a grace period that covers
/// the preStop drain's grace and the config's `drain_timeout`.
#[test]
fn the_kubernetes_example_is_valid_and_its_grace_period_covers_the_drain() {
    let Some(validate) = baton_tests::tools::require(
        "kubernetes-validate",
        "target/wrap-venv/bin/pip install kubernetes-validate",
    ) else {
        return;
    };
    let manifest = baton_tests::tools::repository().join("examples/kubernetes/app.yaml");
    let out = std::process::Command::new(validate)
        .arg("--strict")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&manifest).unwrap();
    // The ConfigMap's `baton.toml: |` block, unindented.
    let config: String = text
        .lines()
        .skip_while(|l| l.trim() != "baton.toml: |")
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or("")))
        .collect();
    // Checked here with the image's `hello` at this build's path.
    let here = config.replace(
        "/usr/local/bin/hello",
        &baton_tests::harness::Binaries::hello()
            .display()
            .to_string(),
    );
    let dir = baton_tests::harness::TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), &here).unwrap();
    let check = std::process::Command::new(baton_tests::harness::Binaries::baton())
        .args(["check", "-c"])
        .arg(dir.path().join("baton.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "baton check: {check:?}\n{config}");
    let seconds = |s: &str| -> u64 {
        s.trim_matches(|c| c == '"' || c == ' ')
            .strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a duration in seconds: {s}"))
    };
    let drain_timeout = config
        .lines()
        .find_map(|l| l.strip_prefix("drain_timeout = "))
        .map(seconds)
        .expect("drain_timeout in the config");
    let grace = text
        .lines()
        .find_map(|l| l.split("\"--grace\", ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .map(seconds)
        .expect("the preStop drain's --grace");
    let period: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .expect("terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    assert!(
        period > grace + drain_timeout,
        "terminationGracePeriodSeconds {period} < the drain's grace {grace} + drain_timeout {drain_timeout}"
    );
}
