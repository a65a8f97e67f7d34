//! The `[worker] app_config` files as an
//! [`AppFiles`](crate::protocol::MasterMessage::AppFiles) message carries
//! them: their bytes one after the other in a sealed memfd, the message
//! listing each file's name and length.

use crate::protocol::AppFile;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// The most bytes of app config files one reload carries.
pub const MAX_APP_CONFIG_BYTES: u64 = 64 * 1024 * 1024;

/// The master's side: writes `files` one after the other into a new memfd,
/// sealed so that the workers read exactly what the master read.
pub fn to_memfd(files: &[(String, Arc<Vec<u8>>)]) -> std::io::Result<(OwnedFd, Vec<AppFile>)> {
    use std::io::Write;
    let fd = nix::sys::memfd::memfd_create(
        c"baton-app-config",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
            | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    let mut entries = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        file.write_all(bytes)?;
        entries.push(AppFile {
            name: name.clone(),
            len: bytes.len() as u64,
        });
    }
    nix::fcntl::fcntl(
        file.as_raw_fd(),
        nix::fcntl::FcntlArg::F_ADD_SEALS(
            nix::fcntl::SealFlag::F_SEAL_SHRINK
                | nix::fcntl::SealFlag::F_SEAL_GROW
                | nix::fcntl::SealFlag::F_SEAL_WRITE
                | nix::fcntl::SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok((file.into(), entries))
}

/// The worker's side: reads the files the memfd holds, checking that it
/// holds exactly what `entries` list. The error says what does not fit.
pub fn from_memfd(fd: OwnedFd, entries: &[AppFile]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let total: u64 = entries.iter().map(|e| e.len).fold(0, u64::saturating_add);
    if total > MAX_APP_CONFIG_BYTES {
        return Err(format!(
            "app config files of {total} bytes exceed {MAX_APP_CONFIG_BYTES}"
        ));
    }
    let file = std::fs::File::from(fd);
    let size = file
        .metadata()
        .map_err(|e| format!("app config memfd: {e}"))?
        .len();
    if size != total {
        return Err(format!(
            "app config memfd holds {size} bytes, the message lists {total}"
        ));
    }
    let mut out: Vec<(String, Vec<u8>)> = entries
        .iter()
        .map(|e| (e.name.clone(), vec![0; e.len as usize]))
        .collect();
    // At explicit offsets: the file description (and its offset) is the
    // master's too.
    let mut offset = 0;
    for (_, bytes) in &mut out {
        std::os::unix::fs::FileExt::read_exact_at(&file, bytes, offset)
            .map_err(|e| format!("app config memfd: {e}"))?;
        offset += bytes.len() as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_cross_a_memfd_unchanged_and_a_mismatch_is_an_error() {
        let files = vec![
            ("a.toml".to_string(), Arc::new(b"x = 1\n".to_vec())),
            ("b.json".to_string(), Arc::new(b"{}".to_vec())),
        ];
        let (fd, entries) = to_memfd(&files).unwrap();
        let read = from_memfd(fd, &entries).unwrap();
        assert_eq!(
            read,
            vec![
                ("a.toml".to_string(), b"x = 1\n".to_vec()),
                ("b.json".to_string(), b"{}".to_vec())
            ]
        );
        let (fd, mut entries) = to_memfd(&files).unwrap();
        entries[1].len = 100;
        assert!(from_memfd(fd, &entries).unwrap_err().contains("lists 106"));
    }

    #[test]
    fn the_memfd_is_sealed_against_writes() {
        let files = vec![("a".to_string(), Arc::new(b"1".to_vec()))];
        let (fd, _) = to_memfd(&files).unwrap();
        let mut file = std::fs::File::from(fd);
        assert!(std::io::Write::write_all(&mut file, b"2").is_err());
    }
}
