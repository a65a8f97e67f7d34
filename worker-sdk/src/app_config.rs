//! Reload handles: the application's own configuration, swapped in place
//! across every worker of a generation without replacing a process.

use arc_swap::ArcSwap;
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The files of `[worker] app_config`, by the name the config gives them
/// (`"app.toml"`, `"routes/main.json"`), with their bytes.
///
/// ```
/// use baton_worker::Files;
///
/// // A parser, tested without a master:
/// fn rate(files: &Files) -> Result<u32, String> {
///     files.text("limits")?.trim().parse().map_err(|e| format!("limits: {e}"))
/// }
/// let files = Files::new([("limits".to_string(), b"100\n".to_vec())]);
/// assert_eq!(rate(&files), Ok(100));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Files {
    files: BTreeMap<String, Arc<Vec<u8>>>,
}

impl fmt::Debug for Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.files.iter().map(|(k, v)| (k, v.len())))
            .finish()
    }
}

impl Files {
    /// Files from names and contents.
    ///
    /// ```
    /// let files = baton_worker::Files::new([
    ///     ("app.toml".to_string(), b"rate = 10".to_vec()),
    ///     ("routes.json".to_string(), b"{}".to_vec()),
    /// ]);
    /// assert_eq!(files.len(), 2);
    /// ```
    pub fn new(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Files {
        Files {
            files: files
                .into_iter()
                .map(|(name, bytes)| (name, Arc::new(bytes)))
                .collect(),
        }
    }

    /// The bytes of `name`.
    ///
    /// ```
    /// # let files = baton_worker::Files::new([("logo.png".to_string(), vec![0x89, b'P'])]);
    /// let logo: Option<&[u8]> = files.get("logo.png");
    /// assert_eq!(logo, Some(&[0x89, b'P'][..]));
    /// ```
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(|b| b.as_slice())
    }

    /// The text of `name`: an error names the file when it is missing or
    /// not UTF-8.
    ///
    /// ```
    /// # let files = baton_worker::Files::new([("app.toml".to_string(), b"rate = 10".to_vec())]);
    /// assert_eq!(files.text("app.toml"), Ok("rate = 10"));
    /// assert!(files.text("other.toml").unwrap_err().contains("other.toml"));
    /// ```
    pub fn text(&self, name: &str) -> Result<&str, String> {
        let bytes = self
            .get(name)
            .ok_or_else(|| format!("{name}: not among the app_config files ({self:?})"))?;
        std::str::from_utf8(bytes).map_err(|e| format!("{name}: not UTF-8: {e}"))
    }

    /// The only file's text, for the common case of one file.
    ///
    /// ```
    /// # let files = baton_worker::Files::new([("app.toml".to_string(), b"rate = 10".to_vec())]);
    /// assert_eq!(files.only_text(), Ok("rate = 10"));
    /// ```
    pub fn only_text(&self) -> Result<&str, String> {
        match self.files.keys().collect::<Vec<_>>()[..] {
            [name] => self.text(name),
            _ => Err(format!(
                "expected exactly one app_config file, got {}",
                self.files.len()
            )),
        }
    }

    /// Every file, in name order.
    ///
    /// ```
    /// # let files = baton_worker::Files::new([("a".to_string(), b"1".to_vec()), ("b".to_string(), b"22".to_vec())]);
    /// let total: usize = files.iter().map(|(_name, bytes)| bytes.len()).sum();
    /// assert_eq!(total, 3);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// How many files.
    ///
    /// ```
    /// # let files = baton_worker::Files::new([("a".to_string(), b"1".to_vec())]);
    /// assert_eq!(files.len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are none.
    ///
    /// ```
    /// assert!(baton_worker::Files::new([]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// What a handle's prepare built, until commit takes it (for that version
/// only) or abort drops it. Touched only by those, never on a request's
/// path.
pub(crate) struct Prepared<T>(Mutex<Option<(String, T)>>);

impl<T> Default for Prepared<T> {
    fn default() -> Self {
        Prepared(Mutex::new(None))
    }
}

impl<T> Prepared<T> {
    /// Keeps `value`, built for `version`.
    pub(crate) fn set(&self, version: &str, value: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((version.to_string(), value));
    }

    /// What was prepared for `version`, if that is what was prepared.
    pub(crate) fn take(&self, version: &str) -> Option<T> {
        let mut prepared = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match prepared.take() {
            Some((v, value)) if v == version => Some(value),
            other => {
                *prepared = other;
                None
            }
        }
    }

    /// Drops what was prepared.
    pub(crate) fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The current value and the version it was built from.
struct Current<T> {
    version: String,
    value: Arc<T>,
}

struct Inner<T> {
    current: ArcSwap<Current<T>>,
    changed: watch::Sender<String>,
    prepared: Prepared<Arc<T>>,
    parse: Box<Parser<T>>,
}

/// How a worker builds its configuration from the files.
type Parser<T> = dyn Fn(&Files) -> Result<T, String> + Send + Sync;

/// A handle on the application's configuration: cheap to clone, lock-free
/// to read.
///
/// A worker registers how to build its configuration from the bytes of the
/// files named by `[worker] app_config` ([`Worker::app_config`](crate::Worker::app_config))
/// and gets this handle. A reload that changes only those files runs in two
/// phases across all workers: **prepare** (each worker parses and validates
/// the new bytes with its own parser and answers prepared or refused) and
/// then **commit** (each swaps the prepared value in) or **abort** (each
/// drops it). All or nothing: if one worker refuses, none changes.
///
/// [`AppConfig::load`] is lock-free (an `arc-swap` load and an `Arc` clone):
/// a request keeps the `Arc<T>` it loaded for its whole life, and the old
/// value is dropped when the last request holding it finishes.
///
/// ```no_run
/// # fn run(mut worker: baton_worker::Worker) -> Result<(), baton_worker::Error> {
/// use baton_worker::AppConfig;
///
/// let greeting: AppConfig<String> =
///     worker.app_config(|files| files.only_text().map(|t| t.trim().to_string()))?;
/// // Handed to every request handler (a clone is two `Arc` clones):
/// let handler = {
///     let greeting = greeting.clone();
///     move || format!("{}\n", greeting.load())
/// };
/// # Ok(()) }
/// ```
pub struct AppConfig<T> {
    inner: Arc<Inner<T>>,
    changes: watch::Receiver<String>,
}

impl<T> Clone for AppConfig<T> {
    fn clone(&self) -> Self {
        AppConfig {
            inner: self.inner.clone(),
            changes: self.changes.clone(),
        }
    }
}

impl<T> fmt::Debug for AppConfig<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppConfig")
            .field("version", &self.inner.current.load().version)
            .finish()
    }
}

impl<T: Send + Sync + 'static> AppConfig<T> {
    /// Builds the first value from `files` with `parse`.
    pub(crate) fn new(
        version: String,
        files: &Files,
        parse: impl Fn(&Files) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<AppConfig<T>, String> {
        let value = Arc::new(parse(files)?);
        let (changed, changes) = watch::channel(version.clone());
        Ok(AppConfig {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(Current { version, value }),
                changed,
                prepared: Prepared::default(),
                parse: Box::new(parse),
            }),
            changes,
        })
    }

    /// The current value. Keep it for a whole request: a reload swaps in a
    /// new value for later loads, and this one is dropped with its last
    /// holder.
    ///
    /// ```no_run
    /// # fn run(limits: baton_worker::AppConfig<u32>) {
    /// let rate = limits.load(); // an Arc<u32>, this request's for its whole life
    /// println!("rate {rate}");
    /// # }
    /// ```
    pub fn load(&self) -> Arc<T> {
        self.inner.current.load().value.clone()
    }

    /// The current value with the version it was built from, read together.
    ///
    /// ```no_run
    /// # fn run(limits: baton_worker::AppConfig<u32>) {
    /// let (rate, version) = limits.load_versioned();
    /// println!("rate {rate} from config {version}");
    /// # }
    /// ```
    pub fn load_versioned(&self) -> (Arc<T>, String) {
        let current = self.inner.current.load();
        (current.value.clone(), current.version.clone())
    }

    /// The current version (a short hash of the files and the worker's
    /// settings, as `baton status` shows it).
    ///
    /// ```no_run
    /// # fn run(limits: baton_worker::AppConfig<u32>) {
    /// println!("serving config {}", limits.version());
    /// # }
    /// ```
    pub fn version(&self) -> String {
        self.inner.current.load().version.clone()
    }

    /// Waits until a new version is committed; returns it.
    ///
    /// ```no_run
    /// # async fn run(mut limits: baton_worker::AppConfig<u32>) {
    /// loop {
    ///     let version = limits.changed().await;
    ///     println!("now at config {version}: rate {}", limits.load());
    /// }
    /// # }
    /// ```
    pub async fn changed(&mut self) -> String {
        if self.changes.changed().await.is_err() {
            // The handle outlives the worker's channel: nothing will change.
            std::future::pending::<()>().await;
        }
        self.changes.borrow_and_update().clone()
    }

    /// The type-erased side the control channel drives.
    pub(crate) fn reloadable(&self) -> Arc<dyn Reloadable> {
        self.inner.clone()
    }
}

/// What the control channel does with a handle, whatever its type.
pub(crate) trait Reloadable: Send + Sync {
    /// Builds the value for `version` from `files` (and the workers' log
    /// filter, for a log handle): `Err` is the refusal.
    fn prepare(&self, version: &str, files: &Files, log_filter: Option<&str>)
        -> Result<(), String>;
    /// Swaps in what was prepared for `version`: whether there was one.
    fn commit(&self, version: &str) -> bool;
    /// Drops what was prepared.
    fn abort(&self);
}

impl<T: Send + Sync + 'static> Reloadable for Inner<T> {
    fn prepare(&self, version: &str, files: &Files, _: Option<&str>) -> Result<(), String> {
        // A parser that panics refuses; it does not take the worker down.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.parse)(files)))
            .map_err(|panic| format!("the parser panicked: {}", panic_message(&panic)))??;
        self.prepared.set(version, Arc::new(built));
        Ok(())
    }

    fn commit(&self, version: &str) -> bool {
        let Some(value) = self.prepared.take(version) else {
            return false;
        };
        self.current.store(Arc::new(Current {
            version: version.to_string(),
            value,
        }));
        self.changed.send_replace(version.to_string());
        true
    }

    fn abort(&self) {
        self.prepared.clear();
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into())
}

/// Reads the files an `AppFiles` message's memfd holds, checking that it
/// holds exactly what `entries` list.
pub(crate) fn from_memfd(
    fd: std::os::fd::OwnedFd,
    entries: &[baton_wire::protocol::AppFile],
) -> Result<Files, String> {
    baton_wire::app_files::from_memfd(fd, entries).map(Files::new)
}

/// A short version for files read standalone: their hash.
pub(crate) fn standalone_version(files: &Files) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (name, bytes) in files.iter() {
        name.hash(&mut hasher);
        bytes.hash(&mut hasher);
    }
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Limits {
        rate: u32,
    }

    fn parse(files: &Files) -> Result<Limits, String> {
        let rate: u32 = files
            .only_text()?
            .trim()
            .parse()
            .map_err(|e| format!("rate: {e}"))?;
        if rate == 0 {
            return Err("rate must be > 0".into());
        }
        Ok(Limits { rate })
    }

    fn files(text: &str) -> Files {
        Files::new([("limits".to_string(), text.as_bytes().to_vec())])
    }

    #[tokio::test]
    async fn prepare_then_commit_swaps_and_notifies_and_old_values_live_on_with_their_holders() {
        let mut config = AppConfig::new("v1".into(), &files("10"), parse).unwrap();
        let held = config.load();
        let reloadable = config.reloadable();
        reloadable.prepare("v2", &files("20"), None).unwrap();
        assert_eq!(config.load().rate, 10, "nothing changes before commit");
        assert!(reloadable.commit("v2"));
        assert_eq!(config.changed().await, "v2");
        assert_eq!(
            config.load_versioned(),
            (Arc::new(Limits { rate: 20 }), "v2".into())
        );
        assert_eq!(held.rate, 10, "a request keeps what it loaded");
    }

    #[test]
    fn a_refusal_or_an_abort_changes_nothing() {
        let config = AppConfig::new("v1".into(), &files("10"), parse).unwrap();
        let reloadable = config.reloadable();
        assert_eq!(
            reloadable.prepare("v2", &files("0"), None),
            Err("rate must be > 0".into())
        );
        assert!(!reloadable.commit("v2"), "nothing was prepared");
        reloadable.prepare("v3", &files("30"), None).unwrap();
        reloadable.abort();
        assert!(!reloadable.commit("v3"));
        assert_eq!((config.load().rate, config.version()), (10, "v1".into()));
    }

    #[test]
    fn a_panicking_parser_refuses() {
        let config = AppConfig::new("v1".into(), &files("1"), |f: &Files| {
            if f.only_text()? == "boom" {
                panic!("boom");
            }
            Ok(())
        })
        .unwrap();
        let error = config
            .reloadable()
            .prepare("v2", &files("boom"), None)
            .unwrap_err();
        assert!(error.contains("panicked: boom"), "{error}");
    }
}
