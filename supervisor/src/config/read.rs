//! Reading the configuration file without trusting what is at its path: a
//! FIFO would block the reader until some writer came, a device or a huge
//! file would be read forever. Only a regular file of at most
//! [`MAX_CONFIG_BYTES`] is read.

use super::{line_col, ConfigError};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest configuration file read: far above any real one (a thousand
/// listeners take about 60 KiB), far below what would weigh on the master.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The text of the regular file at `path`, at most [`MAX_CONFIG_BYTES`]
/// long and UTF-8.
pub fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let error = |location, message: String| ConfigError {
        path: path.to_path_buf(),
        location,
        message,
    };
    // O_NONBLOCK: opening a FIFO for reading waits for a writer otherwise.
    // It changes nothing for the regular file read below.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| error(None, format!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| error(None, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(error(
            None,
            format!(
                "cannot read: it is {}, not a regular file",
                kind(&meta.file_type())
            ),
        ));
    }
    let too_big = |size: &str| {
        error(
            None,
            format!(
                "the file is {size}, larger than the {} MiB a configuration may have",
                MAX_CONFIG_BYTES / (1024 * 1024)
            ),
        )
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big(&format!("{} bytes", meta.len())));
    }
    let bytes = read_at_most(file, MAX_CONFIG_BYTES)
        .map_err(|e| error(None, format!("cannot read: {e}")))?;
    // It may have grown since it was looked at.
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big(&format!("more than {MAX_CONFIG_BYTES} bytes")));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(&e.as_bytes()[..valid]);
        error(
            Some(line_col(&text, valid)),
            format!(
                "invalid UTF-8 (byte 0x{:02x}): a config file must be UTF-8",
                e.as_bytes()[valid]
            ),
        )
    })
}

/// Up to `limit` + 1 bytes: one more than allowed tells that there was more.
fn read_at_most(file: File, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// What a non-regular file is, for the error.
fn kind(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "a device"
    } else {
        "something else"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_tests::harness::TempDir;

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = TempDir::new();
        let path = dir.path().join("baton.toml");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_config_file(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = TempDir::new();
        let e = read_config_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a directory, not a regular file"), "{e}");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_with_its_size_and_the_limit() {
        let dir = TempDir::new();
        let path = dir.path().join("baton.toml");
        let file = File::create(&path).unwrap();
        file.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let e = read_config_file(&path).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(
            e.contains(&format!("{} bytes", MAX_CONFIG_BYTES + 1)),
            "{e}"
        );
        assert!(e.contains("4 MiB"), "{e}");
        file.set_len(MAX_CONFIG_BYTES).unwrap();
        assert_eq!(
            read_config_file(&path).unwrap().len() as u64,
            MAX_CONFIG_BYTES
        );
    }

    #[test]
    fn invalid_utf8_is_located() {
        let dir = TempDir::new();
        let path = dir.path().join("baton.toml");
        std::fs::write(&path, b"[worker]\ncommand = [\"a\xff\"]\n").unwrap();
        let e = read_config_file(&path).unwrap_err();
        assert_eq!(e.location, Some((2, 14)));
        assert!(e.to_string().contains("invalid UTF-8 (byte 0xff)"), "{e}");
    }
}
