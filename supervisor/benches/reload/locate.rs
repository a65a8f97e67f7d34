//! Where things are: the binaries the bench runs and the directory its
//! results go to, both found from the bench binary's own path.

use crate::procs;
use crate::servers::Binaries;
use std::path::{Path, PathBuf};

/// The profile directory the bench runs from: `target/release/deps/reload-HASH`
/// lives two levels below it.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench binary: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("unexpected bench binary path {}", exe.display()))
}

/// `baton` (built by cargo for this bench), `hello` (built beforehand:
/// cargo bench does not build another package's examples), and nginx and
/// HAProxy when installed.
pub fn binaries() -> Result<Binaries, String> {
    let profile = profile_dir()?;
    let hello = profile.join("examples").join("hello");
    if !hello.is_file() {
        return Err(format!(
            "{} is missing; build it first (cargo bench does not build other packages' examples):\n\n    \
             cargo build --release -p baton-worker --example hello\n",
            hello.display()
        ));
    }
    warn_if_stale(&hello);
    let axum = Some(profile.join("examples").join("axum-app")).filter(|p| p.is_file());
    let h3 = Some(profile.join("examples").join("h3-app")).filter(|p| p.is_file());
    Ok(Binaries {
        baton: PathBuf::from(env!("CARGO_BIN_EXE_baton")),
        hello,
        axum,
        h3,
        h2load: procs::find_program("h2load", &["/usr/bin/h2load"]),
        nginx: procs::find_program("nginx", &["/usr/sbin/nginx"]),
        haproxy: procs::find_program("haproxy", &["/usr/sbin/haproxy"]),
    })
}

/// Warns when `hello` is older than the sources it is built from.
fn warn_if_stale(hello: &Path) {
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let Some(built) = modified(hello) else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = vec![root.join("worker-sdk/src"), root.join("examples/hello")];
    let mut newer = None;
    // Bounded: these trees hold a few dozen files.
    for _ in 0..64 {
        let Some(dir) = dirs.pop() else { break };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if modified(&path).is_some_and(|m| m > built) {
                newer = Some(path);
            }
        }
    }
    if let Some(path) = newer {
        eprintln!(
            "reload bench: warning: {} is newer than {}; rebuild it with \
             `cargo build --release -p baton-worker --example hello`",
            path.display(),
            hello.display()
        );
    }
}

/// `CARGO_TARGET_DIR` when it is absolute, else the directory above the
/// profile directory the bench runs from.
pub fn target_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return Ok(dir);
        }
    }
    let profile = profile_dir()?;
    // With `--target TRIPLE` the profile dir is one level deeper; cargo
    // marks the target dir itself with CACHEDIR.TAG.
    Ok(profile
        .ancestors()
        .skip(1)
        .take(2)
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .or_else(|| profile.parent())
        .map_or(profile.clone(), Path::to_path_buf))
}
