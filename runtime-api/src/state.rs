//! Sandbox state on disk, and the per-sandbox lock.
//!
//! Each sandbox has a directory under the store's root (`/run/vessel/<id>/`
//! by default, 0700): `state.json` (versioned JSON, written atomically),
//! `lock` (flock: exclusive for mutations, shared for reads; the kernel
//! drops it when its holder dies, so a crash never leaves it behind), and
//! whatever the hypervisor keeps there (sockets, the console log).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{validate_id, ContainerConfig, InvalidId, SandboxConfig};
use crate::hypervisor::HypervisorKind;

/// The state file format this code writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The state file in a sandbox's directory.
pub const STATE_FILE: &str = "state.json";
/// The lock file in a sandbox's directory.
pub const LOCK_FILE: &str = "lock";
/// Where sandboxes live unless the embedder says otherwise.
pub const DEFAULT_ROOT: &str = "/run/vessel";

/// Why state could not be read, written or locked.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The ID cannot name a sandbox.
    #[error(transparent)]
    Id(#[from] InvalidId),
    /// No directory for that sandbox.
    #[error("no sandbox with ID {0:?}")]
    NotFound(String),
    /// Its directory exists already.
    #[error("a sandbox with ID {0:?} exists already")]
    Exists(String),
    /// A file or directory operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid state (truncated, corrupt, edited).
    #[error("the state file {path} is not valid sandbox state")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The state root is not this user's alone.
    #[error("the state root {path} is unsafe: {why}")]
    UnsafeRoot {
        /// The root.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The state file was written by another version of vessel.
    #[error("the state file {path} has format version {found}; this vessel reads version {STATE_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// Where a sandbox is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxPhase {
    /// The VM runs and its containers are created; none started by `start`.
    Ready,
    /// Started.
    Running,
    /// Every vCPU paused.
    Paused,
    /// The VM is gone.
    Stopped,
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerPhase {
    /// Created, its process not started.
    Ready,
    /// Its first process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its first process has exited (or never will run).
    Stopped,
}

impl std::fmt::Display for SandboxPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxPhase::Ready => "ready",
            SandboxPhase::Running => "running",
            SandboxPhase::Paused => "paused",
            SandboxPhase::Stopped => "stopped",
        })
    }
}

impl std::fmt::Display for ContainerPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContainerPhase::Ready => "ready",
            ContainerPhase::Running => "running",
            ContainerPhase::Paused => "paused",
            ContainerPhase::Stopped => "stopped",
        })
    }
}

/// A container as the state file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// How it was made.
    pub config: ContainerConfig,
    /// Where it is.
    pub phase: ContainerPhase,
    /// When its first process started (milliseconds since the epoch).
    pub started_unix_ms: Option<u64>,
    /// Its first process's exit status: the code, or 128 + the signal.
    pub exit_code: Option<i32>,
    /// The virtio serial of its root disk, which the agent finds it by.
    pub disk_serial: String,
    /// Its first process's PID in the guest (as the agent reported it).
    #[serde(default)]
    pub pid: Option<i32>,
}

impl ContainerRecord {
    /// Whether it has anything in the shared directory: a directory root
    /// (it has no root disk) or volumes. Read from the record, never from
    /// the caller's files, which may have changed since.
    pub fn uses_shared_fs(&self) -> bool {
        self.disk_serial.is_empty() || !self.config.volumes.is_empty()
    }
}

/// A device hot-plugged into a running sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The host file (a block device image).
    pub path: PathBuf,
    /// The virtio serial the guest sees.
    pub serial: String,
    /// Attached read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The virtio-mmio window it went to, where the guest had to bind one.
    pub mmio_address: Option<u64>,
}

/// A network interface of the sandbox: a veth in a namespace, the TAP
/// beside it, and the guest's NIC that took the veth's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRecord {
    /// The namespace and the veth.
    pub network: crate::config::NetworkConfig,
    /// The TAP vessel added beside the veth.
    pub tap: String,
    /// The interface's name in the guest (the veth's).
    pub name: String,
    /// The guest NIC's MAC.
    pub mac: String,
    /// The hypervisor's handle for a hot-plugged NIC; None for the one
    /// the sandbox was created with.
    pub handle: Option<usize>,
    /// The virtio-mmio window the guest bound for it, if it had to.
    pub bind_address: Option<u64>,
}

/// Everything the state file holds: enough to rebuild every status field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// How it was made.
    pub config: SandboxConfig,
    /// The hypervisor that runs it.
    pub hypervisor: HypervisorKind,
    /// Where it is.
    pub phase: SandboxPhase,
    /// The host process that owns the VM.
    pub owner_pid: u32,
    /// The host process that runs the guest, when it is not the owner
    /// (QEMU, for qemu-tcg).
    #[serde(default)]
    pub vm_pid: Option<u32>,
    /// When it was created (milliseconds since the epoch).
    pub created_unix_ms: u64,
    /// Its containers, in creation order.
    pub containers: Vec<ContainerRecord>,
    /// The VM's disks, those attached at boot (container roots first)
    /// then the hot-plugged ones, in plug order.
    pub devices: Vec<DeviceRecord>,
    /// Network interfaces, the one it was created with first.
    #[serde(default)]
    pub nics: Vec<NicRecord>,
    /// Where its VM was booted, when that was not its own directory: a
    /// cached VM's directory in the factory, now a link to the sandbox's
    /// (the VM's processes name that path).
    #[serde(default)]
    pub booted_in: Option<PathBuf>,
}

impl SandboxState {
    /// The sandbox's ID.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The container `id`'s record.
    pub fn container(&self, id: &str) -> Option<&ContainerRecord> {
        self.containers.iter().find(|c| c.config.id == id)
    }

    /// The container `id`'s record, to change.
    pub fn container_mut(&mut self, id: &str) -> Option<&mut ContainerRecord> {
        self.containers.iter_mut().find(|c| c.config.id == id)
    }
}

/// Milliseconds since the epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Shared (reads) or exclusive (mutations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many readers at once.
    Shared,
    /// One writer, no readers.
    Exclusive,
}

/// A held sandbox lock; dropping it releases it.
#[derive(Debug)]
pub struct SandboxLock {
    _file: File,
}

/// Flocks the lock file at `path` (made if needed) as `kind`, waiting for
/// other holders when `wait`, else failing at once if one holds it.
pub(crate) fn lock_path(path: &Path, kind: LockKind, wait: bool) -> Result<SandboxLock, StateError> {
    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    lock_file(path, if wait { op } else { op | libc::LOCK_NB })
}

/// Opens (making it if needed) the lock file at `path` and flocks it
/// with `op` (`LOCK_SH` or `LOCK_EX`, maybe with `LOCK_NB`). A missing
/// directory is [`StateError::NotFound`] (with the directory's name).
fn lock_file(path: &Path, op: libc::c_int) -> Result<SandboxLock, StateError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => {
            let dir = path.parent().and_then(Path::file_name).map_or(String::new(), |n| n.to_string_lossy().into());
            StateError::NotFound(dir)
        }
        _ => StateError::Io { what: "open the lock file", path: path.to_path_buf(), source },
    })?;
    loop {
        // SAFETY: flock on a descriptor this function owns; it touches no
        // memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(SandboxLock { _file: file });
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(StateError::Io { what: "lock", path: path.to_path_buf(), source: err });
        }
    }
}

/// The sandboxes under one root directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Sandboxes under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Sandbox `id`'s directory.
    pub fn dir(&self, id: &str) -> Result<PathBuf, StateError> {
        validate_id(id)?;
        Ok(self.root.join(id))
    }

    /// Makes sandbox `id`'s directory with its lock already held: the
    /// directory is made under a temporary name, locked, then renamed into
    /// place, so that nobody ever sees it unlocked before its state is
    /// written. Refuses an ID that exists.
    pub fn create_locked(&self, id: &str) -> Result<(PathBuf, SandboxLock), StateError> {
        let dir = self.dir(id)?;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { what, path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io("create the state root", &self.root))?;
        self.check_root()?;
        if dir.exists() {
            return Err(StateError::Exists(id.to_string()));
        }
        let temp = resources::cache::temp_name(&self.root, id);
        std::fs::DirBuilder::new().mode(0o700).create(&temp).map_err(io("create the sandbox directory", &temp))?;
        let locked = (|| {
            let lock = lock_file(&temp.join(LOCK_FILE), libc::LOCK_EX)?;
            // rename(2) replaces an empty directory: refuse an existing one.
            if dir.exists() {
                return Err(StateError::Exists(id.to_string()));
            }
            std::fs::rename(&temp, &dir).map_err(io("create the sandbox directory", &dir))?;
            Ok(lock)
        })();
        match locked {
            Ok(lock) => Ok((dir, lock)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&temp);
                Err(e)
            }
        }
    }

    /// Refuses a state root that another user could have made or can
    /// write to (a `/tmp/vessel-UID` made first by someone else, say): its
    /// sockets reach the agents and the owners.
    pub(crate) fn check_root(&self) -> Result<(), StateError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&self.root).map_err(|source| StateError::Io {
            what: "read",
            path: self.root.clone(),
            source,
        })?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let why = if !meta.is_dir() {
            Some("it is not a directory (a symbolic link?)".to_string())
        } else if meta.uid() != me {
            Some(format!("it belongs to uid {}, not to this user ({me})", meta.uid()))
        } else if meta.mode() & 0o022 != 0 {
            Some(format!("others may write to it (mode {:o})", meta.mode() & 0o777))
        } else {
            None
        };
        match why {
            Some(why) => Err(StateError::UnsafeRoot { path: self.root.clone(), why }),
            None => Ok(()),
        }
    }

    /// Whether sandbox `id`'s directory was left by a create that died
    /// before writing the state: it has no state file and nobody holds its
    /// lock (a live create holds it from the start, see
    /// [`Store::create_locked`]).
    pub fn abandoned(&self, id: &str) -> bool {
        let Ok(dir) = self.dir(id) else { return false };
        if !dir.is_dir() || dir.join(STATE_FILE).exists() {
            return false;
        }
        lock_file(&dir.join(LOCK_FILE), libc::LOCK_EX | libc::LOCK_NB).is_ok()
    }

    /// Takes sandbox `id`'s lock, waiting for other holders as `kind`
    /// requires. A sandbox with no directory is [`StateError::NotFound`].
    pub fn lock(&self, id: &str, kind: LockKind) -> Result<SandboxLock, StateError> {
        let path = self.dir(id)?.join(LOCK_FILE);
        let op = match kind {
            LockKind::Shared => libc::LOCK_SH,
            LockKind::Exclusive => libc::LOCK_EX,
        };
        lock_file(&path, op).map_err(|e| match e {
            StateError::NotFound(_) => StateError::NotFound(id.to_string()),
            other => other,
        })
    }

    /// Writes `state` atomically (temp file, fsync, rename, fsync of the
    /// directory): a crash leaves the old state or the new, never half.
    pub fn save(&self, state: &SandboxState) -> Result<(), StateError> {
        let path = self.dir(state.id())?.join(STATE_FILE);
        let mut json =
            serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        json.push(b'\n');
        resources::cache::write_atomic(&path, &json).map_err(|e| match e {
            resources::cache::CacheError::Write { source, .. } => StateError::Io { what: "write", path, source },
            other => StateError::Io { what: "write", path, source: std::io::Error::other(other) },
        })
    }

    /// Reads sandbox `id`'s state.
    pub fn load(&self, id: &str) -> Result<SandboxState, StateError> {
        let path = self.dir(id)?.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => StateError::NotFound(id.to_string()),
            _ => StateError::Io { what: "read", path: path.clone(), source },
        })?;
        // The version first, so that another version's file is named as
        // such rather than as corrupt.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version: Version =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if version.version != STATE_VERSION {
            return Err(StateError::Version { path, found: version.version });
        }
        let state: SandboxState =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
        if state.id() != id {
            let msg = format!("it names sandbox {:?}", state.id());
            return Err(StateError::Corrupt { path, source: serde::de::Error::custom(msg) });
        }
        Ok(state)
    }

    /// The IDs of every sandbox under the root, sorted. A root that does
    /// not exist holds none.
    pub fn ids(&self) -> Result<Vec<String>, StateError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Io { what: "list", path: self.root.clone(), source }),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| validate_id(name).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Removes sandbox `id`'s directory and everything in it.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let dir = self.dir(id)?;
        // A bind mount left in the shared directory (an owner killed before
        // it could unmount) leads to the caller's own files: unmount first,
        // and remove nothing while a mount is left.
        crate::shared_fs::unmount_under(&dir).map_err(|e| StateError::Io {
            what: "unmount what is left in",
            path: dir.clone(),
            source: std::io::Error::other(e),
        })?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::Io { what: "remove", path: dir, source }),
        }
        self.remove_links_to(&dir);
        Ok(())
    }

    /// Removes the factory's links to `dir` (a sandbox made from a cached
    /// VM leaves one where the VM was booted).
    fn remove_links_to(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(self.root.join(crate::factory::FACTORY_DIR)) else { return };
        for entry in entries.flatten() {
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if is_link && std::fs::read_link(entry.path()).is_ok_and(|target| target == dir) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // Gone with its last link once the factory itself was destroyed
        // (a kept factory has its description there).
        let _ = std::fs::remove_dir(self.root.join(crate::factory::FACTORY_DIR));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(tag: &str) -> Store {
        Store::new(resources::cache::temp_name(&std::env::temp_dir(), &format!("vessel-state-{tag}")))
    }

    fn state(id: &str) -> SandboxState {
        SandboxState {
            version: STATE_VERSION,
            config: SandboxConfig::new(id, "/img"),
            hypervisor: HypervisorKind::QemuTcg,
            phase: SandboxPhase::Ready,
            owner_pid: 1,
            vm_pid: None,
            created_unix_ms: 2,
            containers: vec![ContainerRecord {
                config: ContainerConfig::new("c1", "/root.ext4", &["true"]),
                phase: ContainerPhase::Stopped,
                started_unix_ms: Some(3),
                exit_code: Some(7),
                disk_serial: "ctr-0".into(),
                pid: Some(7),
            }],
            devices: vec![],
            nics: vec![],
            booted_in: None,
        }
    }

    #[test]
    fn state_survives_a_round_trip_and_the_directory_is_private() {
        let store = temp_store("round");
        let dir = store.create_locked("box").unwrap().0;
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
        store.save(&state("box")).unwrap();
        assert_eq!(store.load("box").unwrap(), state("box"));
        assert!(matches!(store.create_locked("box"), Err(StateError::Exists(id)) if id == "box"));
        assert_eq!(store.ids().unwrap(), ["box"]);
        store.remove("box").unwrap();
        assert!(store.ids().unwrap().is_empty());
        std::fs::remove_dir_all(store.root()).unwrap();
    }

    #[test]
    fn a_missing_root_lists_nothing_and_an_unknown_id_is_named() {
        let store = temp_store("missing");
        assert!(store.ids().unwrap().is_empty());
        let err = store.load("ghost").unwrap_err();
        assert!(matches!(err, StateError::NotFound(_)));
        assert_eq!(err.to_string(), r#"no sandbox with ID "ghost""#);
        assert!(matches!(store.lock("ghost", LockKind::Shared), Err(StateError::NotFound(_))));
        assert!(matches!(store.load("../etc"), Err(StateError::Id(_))));
    }

    #[test]
    fn truncated_corrupt_and_foreign_state_files_are_errors_naming_the_file() {
        let store = temp_store("corrupt");
        store.create_locked("box").unwrap();
        store.save(&state("box")).unwrap();
        let path = store.root().join("box").join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();

        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let err = store.load("box").unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");

        std::fs::write(&path, b"\x00\xffnot json").unwrap();
        assert!(matches!(store.load("box"), Err(StateError::Corrupt { .. })));

        let text = String::from_utf8(good.clone()).unwrap();
        std::fs::write(&path, text.replacen("\"version\": 1", "\"version\": 99", 1)).unwrap();
        let err = store.load("box").unwrap_err();
        assert!(err.to_string().contains("format version 99"), "{err}");

        std::fs::write(&path, text.replacen("\"phase\": \"ready\"", "\"phase\": \"exploded\"", 1)).unwrap();
        assert!(matches!(store.load("box"), Err(StateError::Corrupt { .. })));

        std::fs::write(&path, text.replacen("\"id\": \"box\"", "\"id\": \"other\"", 1)).unwrap();
        let err = store.load("box").unwrap_err();
        assert!(format!("{:?}", err).contains("names sandbox"), "{err:?}");
        std::fs::remove_dir_all(store.root()).unwrap();
    }

    #[test]
    fn a_directory_appears_locked_and_one_left_by_a_dead_create_is_abandoned() {
        let store = temp_store("abandoned");
        let (dir, lock) = store.create_locked("box").unwrap();
        assert!(dir.is_dir());
        assert!(!store.abandoned("box"), "a create in progress looks abandoned");
        assert!(matches!(store.create_locked("box"), Err(StateError::Exists(_))));
        store.save(&state("box")).unwrap();
        drop(lock);
        assert!(!store.abandoned("box"), "a sandbox with state looks abandoned");
        std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
        assert!(store.abandoned("box"), "a stateless, unlocked directory is not seen as abandoned");
        // No temporary directory is left in the root, and only the ID lists.
        assert_eq!(store.ids().unwrap(), ["box"]);
        assert_eq!(std::fs::read_dir(store.root()).unwrap().count(), 1);
        std::fs::remove_dir_all(store.root()).unwrap();
    }

    #[test]
    fn a_state_root_others_can_write_to_is_refused() {
        let store = temp_store("unsafe");
        std::fs::create_dir_all(store.root()).unwrap();
        std::fs::set_permissions(store.root(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let err = store.create_locked("box").unwrap_err();
        assert!(err.to_string().contains("others may write to it (mode 777)"), "{err}");
        assert!(!store.root().join("box").exists());
        std::fs::set_permissions(store.root(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        store.create_locked("box").unwrap();
        std::fs::remove_dir_all(store.root()).unwrap();
    }

    #[test]
    fn an_exclusive_lock_waits_for_readers_and_readers_share() {
        let store = temp_store("lock");
        store.create_locked("box").unwrap();
        let r1 = store.lock("box", LockKind::Shared).unwrap();
        let r2 = store.lock("box", LockKind::Shared).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                let lock = store.lock("box", LockKind::Exclusive).unwrap();
                tx.send(()).unwrap();
                drop(lock);
            })
        };
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "the writer got in past readers");
        drop((r1, r2));
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the writer never got the lock");
        writer.join().unwrap();
        // Another sandbox's lock never waits on this one's.
        store.create_locked("other").unwrap();
        let _held = store.lock("box", LockKind::Exclusive).unwrap();
        drop(store.lock("other", LockKind::Exclusive).unwrap());
        std::fs::remove_dir_all(store.root()).unwrap();
    }
}
