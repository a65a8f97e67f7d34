//! What `baton run --watch` watches, where the events for it come from,
//! and how a change is told from an event that changed nothing.
//!
//! A target is a file (the config, an `app_config` file, the worker's
//! executable, a `--watch FILE`) or a directory tree (`--watch DIR`).
//! Files are watched through their directories, never through their
//! inodes: `cargo build` links a new binary over the old name, an editor
//! renames a new file over the old one, and a Kubernetes ConfigMap volume
//! swaps a symbolic link (`..data`) that the file's name goes through. So
//! each target has a *chain*: the (directory, name) pairs its path goes
//! through when resolved, each symbolic link on the way and the last
//! name; an event on any of them may have changed the target.
//!
//! Whether it did is decided by content: a target's [`Print`] is a hash of
//! what its path resolves to (of every file of a tree), so a swap to new
//! content is a change and a `touch` is not.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::hash::Hasher;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// What a target is to the worker, which decides the reload it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The config file the master was started with.
    Config,
    /// An `app_config` file.
    App,
    /// The worker's executable.
    Executable,
    /// A path given with `--watch PATH`.
    Extra,
}

impl Role {
    /// As the log names it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Config => "config",
            Role::App => "app_config",
            Role::Executable => "executable",
            Role::Extra => "extra",
        }
    }
}

/// One watched path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// What it is.
    pub role: Role,
    /// Its path, absolute, as given (links not resolved).
    pub path: PathBuf,
    /// A directory given with `--watch`: every file under it counts.
    pub tree: bool,
}

impl Target {
    /// A file target.
    pub fn file(role: Role, path: PathBuf) -> Target {
        Target {
            role,
            path,
            tree: false,
        }
    }
}

/// The (directory, name) pairs `path` goes through when resolved: each
/// symbolic link met on the way, and the last name (of the path, and of
/// each link it ends in). A path that does not resolve (yet) still gives
/// the pairs up to where it stops.
pub fn chain(path: &Path) -> Vec<(PathBuf, OsString)> {
    /// Links followed before giving up, as the kernel's `ELOOP`.
    const MAX_LINKS: u32 = 40;
    let mut pairs: Vec<(PathBuf, OsString)> = Vec::new();
    let mut resolved = PathBuf::from("/");
    let mut rest: VecDeque<OsString> = names(path);
    let mut links = 0;
    while let Some(name) = rest.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let link = std::fs::symlink_metadata(&candidate)
            .is_ok_and(|m| m.file_type().is_symlink())
            .then(|| std::fs::read_link(&candidate).ok())
            .flatten();
        match link {
            Some(target) if links < MAX_LINKS => {
                links += 1;
                pairs.push((resolved.clone(), name));
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for (i, name) in names(&target).into_iter().enumerate() {
                    rest.insert(i, name);
                }
            }
            _ => {
                if rest.is_empty() {
                    pairs.push((resolved.clone(), name));
                }
                resolved = candidate;
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    pairs.retain(|pair| seen.insert(pair.clone()));
    pairs
}

/// `path`'s names, `.` left out and `..` kept (to be applied once the
/// part before it is resolved).
fn names(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Whether a name in a watched tree is left out of it: hidden files
/// (`.git`, an editor's `.main.rs.swp`, a ConfigMap's own `..data` and
/// `..2026_…` entries, whose visible names are links into them) and
/// editors' backups (`main.rs~`, `#main.rs#`).
pub fn ignored(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(b".")
        || name.ends_with(b"~")
        || (name.len() > 1 && name.starts_with(b"#") && name.ends_with(b"#"))
}

/// What a target was at one moment, for telling a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Print {
    /// Nothing there (or a file target that is not a file).
    Missing,
    /// A file: its content's hash, and whether it may be executed.
    File {
        /// Hash of its bytes.
        hash: u64,
        /// `access(X_OK)`.
        executable: bool,
    },
    /// A tree: the hash of its files' names and hashes.
    Tree(u64),
}

impl Print {
    /// A file of `role` at `path` whose content hashes to `hash`
    /// ([`hash_bytes`]); whether it may be executed matters only for the
    /// executable.
    pub fn file(role: Role, hash: u64, path: &Path) -> Print {
        let executable = role == Role::Executable
            && nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok();
        Print::File { hash, executable }
    }
}

/// Files a watched tree may have: past it, the rest is not looked at.
pub const MAX_TREE_FILES: usize = 10_000;

/// The identity and state of a file as `stat` gives it: unchanged, its
/// content hash is not computed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Content hashes by file, reused while a file's identity is the same.
#[derive(Debug, Default)]
pub struct Prints {
    hashes: HashMap<PathBuf, (Identity, u64)>,
    /// A tree was cut at [`MAX_TREE_FILES`] (said once).
    pub cut: Option<PathBuf>,
}

impl Prints {
    /// `target`'s print now.
    pub fn of(&mut self, target: &Target) -> Print {
        if target.tree {
            return match std::fs::metadata(&target.path) {
                Ok(meta) if meta.is_dir() => Print::Tree(self.tree(&target.path)),
                _ => Print::Missing,
            };
        }
        match self.file(&target.path) {
            Some(hash) => Print::file(target.role, hash, &target.path),
            None => Print::Missing,
        }
    }

    /// The hash of the regular file `path` resolves to.
    fn file(&mut self, path: &Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
        let identity = Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        if let Some((known, hash)) = self.hashes.get(path) {
            if *known == identity {
                return Some(*hash);
            }
        }
        let hash = hash_file(path).ok()?;
        self.hashes.insert(path.to_path_buf(), (identity, hash));
        Some(hash)
    }

    /// The hash of every file under `root` that is not [`ignored`], by
    /// name: links to files are followed, links to directories are not.
    fn tree(&mut self, root: &Path) -> u64 {
        let mut files = BTreeMap::new();
        let mut dirs = vec![root.to_path_buf()];
        'walk: while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if ignored(&entry.file_name()) {
                    continue;
                }
                let path = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir {
                    dirs.push(path);
                    continue;
                }
                if files.len() >= MAX_TREE_FILES {
                    self.cut.get_or_insert_with(|| root.to_path_buf());
                    break 'walk;
                }
                let hash = self.file(&path);
                files.insert(path, hash);
            }
        }
        let mut hasher = std::hash::DefaultHasher::new();
        for (path, hash) in &files {
            hasher.write(path.as_os_str().as_encoded_bytes());
            hasher.write_u8(0);
            // A link to nothing, a FIFO, a socket: there, without content.
            hasher.write_u64(hash.unwrap_or(0));
            hasher.write_u8(u8::from(hash.is_some()));
        }
        // Files gone are forgotten.
        self.hashes
            .retain(|path, _| !path.starts_with(root) || files.contains_key(path));
        hasher.finish()
    }
}

/// The blocks a file is hashed in.
const BLOCK: usize = 64 * 1024;

/// The hash of `bytes` as [`Prints`] computes a file's (the bytes a
/// running generation was started with, compared with the file's now).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    let mut blocks = bytes.chunks(BLOCK);
    loop {
        let block = blocks.next().unwrap_or_default();
        hasher.write(block);
        if block.len() < BLOCK {
            hasher.write_usize(block.len());
            return hasher.finish();
        }
    }
}

/// A hash of `path`'s bytes, read in fixed blocks (so that the hash does
/// not depend on how reads split the file). SipHash from the standard
/// library: not for adversaries, but fast even in a debug build (a 65 MB
/// binary in about 0.2 s), and it is only compared within this process.
fn hash_file(path: &Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = std::hash::DefaultHasher::new();
    let mut block = vec![0u8; BLOCK];
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            match file.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        hasher.write(&block[..filled]);
        if filled < BLOCK {
            hasher.write_usize(filled);
            return Ok(hasher.finish());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn temp() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("baton-watch-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A ConfigMap volume as the kubelet lays it out, on `version`.
    fn configmap(dir: &Path, version: &str, content: &str) {
        let data = dir.join(format!("..{version}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("app.toml"), content).unwrap();
        let tmp = dir.join("..data_tmp");
        symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        if std::fs::symlink_metadata(dir.join("app.toml")).is_err() {
            symlink("..data/app.toml", dir.join("app.toml")).unwrap();
        }
    }

    #[test]
    fn a_plain_file_is_watched_through_its_directory() {
        let dir = temp();
        let file = dir.join("baton.toml");
        assert_eq!(chain(&file), vec![(dir.clone(), "baton.toml".into())]);
        // Not there yet: the same.
        assert_eq!(
            chain(&dir.join("new.toml")),
            vec![(dir.clone(), "new.toml".into())]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_configmap_file_is_watched_through_each_link() {
        let dir = temp();
        configmap(&dir, "2026_12_07_01", "greeting = \"hello\"\n");
        let pairs = chain(&dir.join("app.toml"));
        assert_eq!(
            pairs,
            vec![
                (dir.clone(), "app.toml".into()),
                (dir.clone(), "..data".into()),
                (dir.join("..2026_12_07_01"), "app.toml".into()),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_link_to_a_directory_on_the_way_is_part_of_the_chain() {
        // A release directory behind a `current` link, swapped by a deploy.
        let dir = temp();
        std::fs::create_dir_all(dir.join("releases/1/bin")).unwrap();
        symlink(dir.join("releases/1"), dir.join("current")).unwrap();
        let pairs = chain(&dir.join("current/bin/server"));
        assert_eq!(
            pairs,
            vec![
                (dir.clone(), "current".into()),
                (dir.join("releases/1/bin"), "server".into()),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_link_loop_ends() {
        let dir = temp();
        symlink("b", dir.join("a")).unwrap();
        symlink("a", dir.join("b")).unwrap();
        let pairs = chain(&dir.join("a"));
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_touch_is_no_change_and_new_content_is() {
        let dir = temp();
        let path = dir.join("hello.toml");
        std::fs::write(&path, "greeting = \"hello\"\n").unwrap();
        let target = Target::file(Role::App, path.clone());
        let mut prints = Prints::default();
        let before = prints.of(&target);
        // The same bytes, written again (a new mtime, a new inode).
        std::fs::write(dir.join("tmp"), "greeting = \"hello\"\n").unwrap();
        std::fs::rename(dir.join("tmp"), &path).unwrap();
        assert_eq!(prints.of(&target), before);
        std::fs::write(&path, "greeting = \"hi\"\n").unwrap();
        assert_ne!(prints.of(&target), before);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(prints.of(&target), Print::Missing);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_configmap_swap_changes_the_print_of_its_file_and_its_directory() {
        let dir = temp();
        configmap(&dir, "2026_12_07_01", "greeting = \"hello\"\n");
        let file = Target::file(Role::App, dir.join("app.toml"));
        let tree = Target {
            role: Role::Extra,
            path: dir.clone(),
            tree: true,
        };
        let mut prints = Prints::default();
        let (file_before, tree_before) = (prints.of(&file), prints.of(&tree));
        // A resync with the same content: the kubelet writes nothing;
        // a swap to a new directory with the same content is no change.
        configmap(&dir, "2026_12_07_02", "greeting = \"hello\"\n");
        assert_eq!(prints.of(&file), file_before);
        assert_eq!(prints.of(&tree), tree_before);
        configmap(&dir, "2026_12_07_03", "greeting = \"hi\"\n");
        assert_ne!(prints.of(&file), file_before);
        assert_ne!(prints.of(&tree), tree_before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_tree_leaves_out_hidden_files_and_backups() {
        let dir = temp();
        std::fs::create_dir(dir.join("templates")).unwrap();
        std::fs::write(dir.join("templates/index.html"), "<p>hi</p>").unwrap();
        let tree = Target {
            role: Role::Extra,
            path: dir.clone(),
            tree: true,
        };
        let mut prints = Prints::default();
        let before = prints.of(&tree);
        std::fs::write(dir.join("templates/.index.html.swp"), "x").unwrap();
        std::fs::write(dir.join("templates/index.html~"), "x").unwrap();
        std::fs::write(dir.join("#index.html#"), "x").unwrap();
        assert_eq!(prints.of(&tree), before);
        std::fs::write(dir.join("templates/new.html"), "").unwrap();
        assert_ne!(prints.of(&tree), before);
        assert!(ignored(".git".as_ref()) && !ignored("main.rs".as_ref()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_executable_is_told_from_a_file_that_is_not_yet() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp();
        let path = dir.join("hello");
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        let target = Target::file(Role::Executable, path.clone());
        let mut prints = Prints::default();
        assert!(matches!(
            prints.of(&target),
            Print::File {
                executable: false,
                ..
            }
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            prints.of(&target),
            Print::File {
                executable: true,
                ..
            }
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_hash_does_not_depend_on_how_the_file_was_written() {
        let dir = temp();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("a"), &bytes).unwrap();
        let mut file = std::fs::File::create(dir.join("b")).unwrap();
        for chunk in bytes.chunks(7_777) {
            std::io::Write::write_all(&mut file, chunk).unwrap();
        }
        drop(file);
        assert_eq!(
            hash_file(&dir.join("a")).unwrap(),
            hash_file(&dir.join("b")).unwrap()
        );
        assert_eq!(hash_file(&dir.join("a")).unwrap(), hash_bytes(&bytes));
        // A multiple of the block size, and nothing.
        std::fs::write(dir.join("b"), &bytes[..2 * BLOCK]).unwrap();
        assert_eq!(
            hash_file(&dir.join("b")).unwrap(),
            hash_bytes(&bytes[..2 * BLOCK])
        );
        std::fs::write(dir.join("b"), b"").unwrap();
        assert_eq!(hash_file(&dir.join("b")).unwrap(), hash_bytes(b""));
        std::fs::write(dir.join("b"), &bytes[..199_999]).unwrap();
        assert_ne!(
            hash_file(&dir.join("a")).unwrap(),
            hash_file(&dir.join("b")).unwrap()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
