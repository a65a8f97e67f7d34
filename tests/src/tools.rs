//! External programs the tests use as users would meet them (gunicorn,
//! uvicorn, h2load, nginx, promtool, `systemd-socket-activate`, ...).
//!
//! A test asks for one with [`require`]. When it is missing the test prints
//! why and passes, unless `BATON_REQUIRE_TOOLS=1` (or the older
//! `BATON_REQUIRE_WRAPPED=1`), as `.ci/run` sets: then it fails loudly, so
//! CI never skips silently.

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package is in the repository")
        .to_path_buf()
}

/// Whether missing tools fail the tests instead of skipping them.
pub fn required() -> bool {
    ["BATON_REQUIRE_TOOLS", "BATON_REQUIRE_WRAPPED"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
}

/// The executable `name`, looked up in `$BATON_WRAP_VENV/bin`,
/// `target/wrap-venv/bin`, `PATH`, `/usr/sbin` and `/sbin`; or `None`, after
/// saying why and how `.ci/run` installs it (`install`), when the test should
/// be skipped. Panics instead when [`required`].
pub fn require(name: &str, install: &str) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(venv) = std::env::var_os("BATON_WRAP_VENV") {
        dirs.push(PathBuf::from(venv).join("bin"));
    }
    dirs.push(repository().join("target/wrap-venv/bin"));
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    dirs.push(PathBuf::from("/usr/sbin"));
    dirs.push(PathBuf::from("/sbin"));
    if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Some(found);
    }
    let why = format!(
        "{name} not found in $BATON_WRAP_VENV/bin, target/wrap-venv/bin or PATH (`.ci/run` installs it: {install})"
    );
    if required() {
        panic!("BATON_REQUIRE_TOOLS=1 but {why}");
    }
    eprintln!("skipped: {why}");
    None
}
