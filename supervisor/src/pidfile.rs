//! The pid file: written atomically at start, renamed to `*.oldbin` while a
//! binary upgrade runs (as nginx does), removed at exit.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A written pid file; removed on drop if it still holds our pid.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// Where the file is now: `path`, or `path.oldbin` during an upgrade.
    current: PathBuf,
}

impl PidFile {
    /// Writes this process's pid to `path` through a temporary file and a
    /// rename, so readers never see a partial file. No fsync: a pid file
    /// means nothing after a crash, and the event loop must not wait on the
    /// disk (it took seconds on a busy VM).
    pub fn write(path: &Path) -> anyhow::Result<PidFile> {
        let pid = std::process::id();
        let tmp = path.with_extension(format!("tmp.{pid}"));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            writeln!(file, "{pid}")?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.with_context(|| format!("writing pid file {}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            current: path.to_path_buf(),
        })
    }

    /// Moves the file to `*.oldbin` while a new master starts.
    pub fn rename_to_oldbin(&mut self) -> anyhow::Result<()> {
        let oldbin = PathBuf::from(format!("{}.oldbin", self.path.display()));
        self.move_to(oldbin)
    }

    /// Moves the file back after a failed upgrade.
    pub fn restore(&mut self) -> anyhow::Result<()> {
        self.move_to(self.path.clone())
    }

    fn move_to(&mut self, to: PathBuf) -> anyhow::Result<()> {
        if self.current != to {
            std::fs::rename(&self.current, &to).with_context(|| {
                format!("renaming {} to {}", self.current.display(), to.display())
            })?;
            self.current = to;
        }
        Ok(())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.current)
            .map(|s| s.trim() == std::process::id().to_string())
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.current);
        }
    }
}
