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
    ///
    /// The directory may be writable by others (`/tmp`, `/run/user`): the
    /// temporary file gets an unpredictable name and is created with
    /// `O_EXCL | O_NOFOLLOW`, so a file or symlink planted there is never
    /// written through, and `rename(2)` replaces a symlink at `path` itself
    /// instead of following it.
    pub fn write(path: &Path) -> anyhow::Result<PidFile> {
        let pid = std::process::id();
        let result = (|| {
            let (tmp, mut file) = create_temporary(path)?;
            let written = writeln!(file, "{pid}").and_then(|()| std::fs::rename(&tmp, path));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        })();
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

/// A new file beside `path`, with a name nobody could guess, opened without
/// following a symlink and failing if anything is there already.
fn create_temporary(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut last = None;
    for _ in 0..16 {
        // RandomState's keys come from the OS's random source.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let tmp = path.with_file_name(format!(".{name}.{}.{random:016x}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name")))
}

/// The pid in the file at `path`, read without following a symlink.
fn read_pid(path: &Path) -> Option<u32> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = read_pid(&self.current) == Some(std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.current);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-pidfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let dir = temp_dir();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("baton.pid");
        // Where older versions put their temporary file, and the final path.
        let pid = std::process::id();
        std::os::unix::fs::symlink(&victim, dir.join(format!("baton.tmp.{pid}"))).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let file = PidFile::write(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "the symlink was replaced");
        assert_eq!(read_pid(&path), Some(pid));
        drop(file);
        assert!(!path.exists(), "removed at exit");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        // A symlink swapped in at the final path later is not removed
        // (it does not hold our pid, as read without following it).
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        drop(PidFile {
            path: path.clone(),
            current: path.clone(),
        });
        assert!(std::fs::symlink_metadata(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
