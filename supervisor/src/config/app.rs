//! `[worker] app_config`: the application's own configuration files. The
//! master reads their bytes (the worker parses them), and together with the
//! `[worker]` settings they make the **config version**, a short hash that
//! logs, `baton status` and `baton reload` show.

use super::ConfigError;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// The most bytes one app config file may have.
pub const MAX_FILE: u64 = 16 * 1024 * 1024;

/// The files as read, by the name `app_config` gives them, and the version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppFiles {
    /// Name (as written in the config) and bytes, in config order.
    pub files: Vec<(String, Arc<Vec<u8>>)>,
    /// The config version: the `[worker]` settings and these files, hashed.
    pub version: String,
}

impl AppFiles {
    /// Reads `names` (relative to `dir`) and computes the version with
    /// `worker`, a stable rendering of the `[worker]` settings.
    pub fn read(
        config: &Path,
        dir: &Path,
        names: &[String],
        worker: &str,
    ) -> Result<AppFiles, ConfigError> {
        let error = |message: String| ConfigError {
            path: config.to_path_buf(),
            location: None,
            message,
        };
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(name);
            let bytes = read_file(&path).map_err(|e| error(format!("app_config {name:?}: {e}")))?;
            files.push((name.clone(), Arc::new(bytes)));
        }
        let mut hash = Sha256::new();
        hash.update(worker.as_bytes());
        for (name, bytes) in &files {
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes.as_slice());
        }
        let version = hash
            .finalize()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(AppFiles { files, version })
    }

    /// Whether the files' bytes are the same (whatever the version).
    pub fn same_files(&self, other: &AppFiles) -> bool {
        self.files == other.files
    }
}

/// A regular file of at most [`MAX_FILE`] bytes, opened without waiting on
/// a FIFO.
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{} has {} bytes, more than the {MAX_FILE} an app config file may have",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(bytes)
}
