//! Where guest artifacts are cached, and how files get there atomically.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the cache directory could not be found or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// None of the variables that locate it is set.
    #[error("no cache directory: set VESSEL_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoDirectory,
    /// A file or directory in it could not be written.
    #[error("cannot write {path}")]
    Write {
        /// What could not be written.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The cache directory: `$VESSEL_CACHE_DIR`, else `$XDG_CACHE_HOME/vessel`,
/// else `~/.cache/vessel`. It is not created here.
pub fn dir() -> Result<PathBuf, CacheError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    dir_from(var("VESSEL_CACHE_DIR"), var("XDG_CACHE_HOME"), var("HOME"))
}

/// [`dir`] from the three variables' values.
pub fn dir_from(vessel: Option<PathBuf>, xdg: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf, CacheError> {
    vessel
        .or_else(|| xdg.map(|x| x.join("vessel")))
        .or_else(|| home.map(|h| h.join(".cache").join("vessel")))
        .ok_or(CacheError::NoDirectory)
}

/// A name in `dir` that no other writer (thread or process) uses.
pub fn temp_name(dir: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    dir.join(format!(".{tag}.tmp-{}-{n}-{nanos}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory,
/// fsync, rename, fsync of the directory. Readers see the old file or the
/// whole new one, and after a crash so does the next reader.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let err = |source| CacheError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path.file_name().map_or("file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = temp_name(dir, &name);
    let result = (|| {
        // create_new: a name someone else made (a link planted in a shared
        // directory) is refused, not followed.
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// A fresh directory only its owner can enter (0700), made with a name no
/// one else uses (an existing one is an error, never reused) and removed
/// with what it holds when dropped: the scratch space for trees that hold
/// an image's files on their way into an image.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes `<parent>/.<tag>.tmp-...`.
    pub fn new(parent: &Path, tag: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = temp_name(parent, tag);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self(path))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::{Path, PathBuf};

    /// A directory removed when dropped.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            let dir = super::temp_name(&std::env::temp_dir(), &format!("vessel-resources-{tag}"));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::TempDir;
    use super::*;

    #[test]
    fn cache_dir_order() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(dir_from(p("/v"), p("/x"), p("/h")).unwrap(), PathBuf::from("/v"));
        assert_eq!(dir_from(None, p("/x"), p("/h")).unwrap(), PathBuf::from("/x/vessel"));
        assert_eq!(dir_from(None, None, p("/h")).unwrap(), PathBuf::from("/h/.cache/vessel"));
        assert!(matches!(dir_from(None, None, None), Err(CacheError::NoDirectory)));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = TempDir::new("atomic");
        let path = dir.path().join("sub").join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        let blocked = dir.path().join("sub").join("f").join("g");
        let err = write_atomic(&blocked, b"x").unwrap_err();
        assert!(err.to_string().starts_with("cannot write "), "{err}");
    }

    #[test]
    fn scratch_directories_are_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("scratch");
        let scratch = ScratchDir::new(dir.path(), "tree").unwrap();
        let path = scratch.path().to_path_buf();
        std::fs::write(path.join("f"), b"x").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o700);
        drop(scratch);
        assert!(!path.exists());
    }
}
