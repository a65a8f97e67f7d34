//! Whether a process has a file open for writing, as `fuser` or `lsof`
//! find out: each process's open files in `/proc/PID/fd`, and the access
//! mode in `/proc/PID/fdinfo/FD`.
//!
//! inotify says a file was modified (`IN_MODIFY`) and that a writer closed
//! it (`IN_CLOSE_WRITE`), but a modification does not always come from an
//! open file (`truncate(2)` by path, `touch -m`), and a writer may have
//! opened the file before the watch began. So a file that inotify says is
//! being written is looked up here once it has been quiet: a linker or a
//! slow copy that pauses between chunks still has it open, and is waited
//! for. Only processes whose `/proc` entries this process may read are
//! seen: a master not running as root sees the writers of its own user,
//! which a developer's build is.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Whether some process has `path`'s file (links followed) open for
/// writing.
pub fn open_for_writing(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let file = (meta.dev(), meta.ino());
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return false;
    };
    for process in processes.flatten() {
        let name = process.file_name();
        if !name.as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // The open file itself, through the magic link.
            let same = std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == file);
            if same && writable(&process.path(), &fd.file_name()) {
                return true;
            }
        }
    }
    false
}

/// Whether descriptor `fd` of the process at `/proc/PID` was opened for
/// writing (its `flags:`, octal, have `O_WRONLY` or `O_RDWR`).
fn writable(process: &Path, fd: &std::ffi::OsStr) -> bool {
    let Ok(info) = std::fs::read_to_string(process.join("fdinfo").join(fd)) else {
        return false;
    };
    info.lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .and_then(|flags| i32::from_str_radix(flags.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_ACCMODE != libc::O_RDONLY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_open_for_writing_until_its_writer_closes_it() {
        let path = std::env::temp_dir().join(format!("baton-writers-{}", std::process::id()));
        let writer = std::fs::File::create(&path).unwrap();
        assert!(open_for_writing(&path));
        let reader = std::fs::File::open(&path).unwrap();
        drop(writer);
        assert!(!open_for_writing(&path), "a reader is not a writer");
        drop(reader);
        std::fs::remove_file(&path).unwrap();
        assert!(!open_for_writing(&path));
    }
}
