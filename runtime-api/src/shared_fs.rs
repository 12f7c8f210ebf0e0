//! The sandbox's shared directory (Kata's `kataShared`): one host
//! directory, `shared/` in the sandbox's directory, that virtiofsd serves
//! into the guest as a virtio-fs device (tag [`SHARED_TAG`]).
//!
//! Each container has a subdirectory named by its ID: `<id>/rootfs` is its
//! root when the caller gave a directory, and `<id>/volumes/<n>` are its
//! volumes. Both are bind mounts of the caller's directories: nothing is
//! copied, and what either side writes the other sees. A read-only volume
//! is bind-mounted read-only on the host too, so the guest cannot write it
//! whatever it remounts.
//!
//! The shared directory is itself a bind mount made a shared peer group,
//! so that mounts added under it after virtiofsd started (containers
//! created later) reach the daemon's own mount namespace, which is a slave
//! of ours.
//!
//! Cache modes: virtiofsd runs with `--cache auto`: the guest caches file
//! data and attributes for a second and revalidates on open, so a host
//! write shows in the guest at the next open (or within a second for
//! attributes).
//!
//! Bind mounts in the host's namespace need root (CAP_SYS_ADMIN).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use agent_proto::spec::SHARED_TAG;

/// The shared directory's name in the sandbox's directory.
pub const SHARED_DIR: &str = "shared";
/// virtiofsd's socket in the sandbox's directory.
pub const SOCKET: &str = "virtiofsd.sock";
/// How long virtiofsd may take to create its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the shared directory could not be set up or taken down.
#[derive(Debug, thiserror::Error)]
pub enum SharedFsError {
    /// A system call on a path failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host directory given by the caller is refused.
    #[error("the host directory {path} cannot be shared: {why}")]
    BadSource {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// No virtiofsd to run.
    #[error(
        "virtiofsd (the Rust daemon) is not installed: `cargo install virtiofsd`, or set VESSEL_VIRTIOFSD to its path \
         (scripts/install-deps.sh does this)"
    )]
    NoDaemon,
    /// virtiofsd did not come up.
    #[error("virtiofsd did not start: {0}")]
    Daemon(String),
    /// Mounts are left under a directory after unmounting.
    #[error("mounts are left under {dir} after unmounting them: {left:?}")]
    MountsLeft {
        /// The directory.
        dir: PathBuf,
        /// The mount points still there.
        left: Vec<PathBuf>,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SharedFsError + 'a {
    move |source| SharedFsError::Io { what, path: path.to_path_buf(), source }
}

fn cstring(path: &Path) -> Result<CString, SharedFsError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SharedFsError::BadSource { path: path.to_path_buf(), why: "it has a NUL byte".into() })
}

/// mount(2) without a filesystem type or data.
fn mount(source: Option<&Path>, target: &Path, flags: libc::c_ulong, what: &'static str) -> Result<(), SharedFsError> {
    let source = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    // SAFETY: valid NUL-terminated strings (or null where allowed); no data.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io(what, target)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Checks a host directory a caller wants shared: absolute, with no `..`,
/// reached without a symlink (its canonical path is itself), and a
/// directory.
pub fn check_source(path: &Path) -> Result<(), SharedFsError> {
    let refuse = |why: String| Err(SharedFsError::BadSource { path: path.to_path_buf(), why });
    if !path.is_absolute() {
        return refuse("it is not an absolute path".into());
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return refuse("it has a '..' component".into());
    }
    let real = path.canonicalize().map_err(io("resolve", path))?;
    if real != path {
        return refuse(format!("it goes through a symlink (to {}); give the real path", real.display()));
    }
    if !real.is_dir() {
        return refuse("it is not a directory".into());
    }
    Ok(())
}

/// The mount points at or below `dir`, deepest first, as this process's
/// mount namespace has them. mountinfo has real paths, so `dir` is
/// compared as given and as resolved (`/var/run` is a symlink to `/run` on
/// Debian, and a miss here would let a removal walk into a bind mount).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let real = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        // The fifth field is the mount point, with space, tab, newline and
        // backslash written in octal.
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape(escaped)))
        .filter(|point| point.starts_with(dir) || point.starts_with(&real))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo's octal escapes (`\040`) undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let n = bytes[i + 1..i + 4].iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0'));
            out.push(n as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir` (lazily, deepest first) and checks
/// that nothing is left. Removing a directory with a bind mount of a
/// caller's directory under it would delete the caller's files: callers
/// remove nothing unless this succeeds.
pub fn unmount_under(dir: &Path) -> Result<(), SharedFsError> {
    for point in mounts_under(dir) {
        let c = cstring(&point)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            tracing::warn!(mount = %point.display(), error = %std::io::Error::last_os_error(), "cannot unmount");
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(SharedFsError::MountsLeft { dir: dir.to_path_buf(), left });
    }
    Ok(())
}

/// Makes `dir` a directory only its owner can enter.
fn private_dir(dir: &Path) -> Result<(), SharedFsError> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(io("create", dir))
}

/// A sandbox's shared directory.
#[derive(Debug, Clone)]
pub struct SharedDir {
    root: PathBuf,
}

impl SharedDir {
    /// The shared directory of the sandbox whose directory is `sandbox_dir`
    /// (made or not).
    pub fn of(sandbox_dir: &Path) -> Self {
        SharedDir { root: sandbox_dir.join(SHARED_DIR) }
    }

    /// Its path on the host.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Makes it: a private directory, bind-mounted on itself as a shared
    /// peer group (see the module docs).
    pub fn create(&self) -> Result<(), SharedFsError> {
        private_dir(&self.root)?;
        mount(Some(&self.root), &self.root, libc::MS_BIND, "bind-mount onto itself")?;
        mount(None, &self.root, libc::MS_SHARED, "make a shared mount").inspect_err(|_| {
            let _ = unmount_under(&self.root);
        })
    }

    /// Bind-mounts the caller's directory `host` at `<container>/<name>`;
    /// returns that path relative to the share's root, as the agent names
    /// it. Read-only mounts are read-only here, on the host.
    fn bind(&self, container: &str, name: &Path, host: &Path, read_only: bool) -> Result<String, SharedFsError> {
        check_source(host)?;
        let relative = Path::new(container).join(name);
        let target = self.root.join(&relative);
        private_dir(&target)?;
        mount(Some(host), &target, libc::MS_BIND | libc::MS_REC, "bind-mount a directory at")?;
        if read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            if let Err(e) = mount(None, &target, flags, "make read-only the bind mount at") {
                let _ = unmount_under(&target);
                return Err(e);
            }
        }
        Ok(relative.to_string_lossy().into_owned())
    }

    /// Shares `host` as container `container`'s root; returns its path in
    /// the share.
    pub fn add_root(&self, container: &str, host: &Path) -> Result<String, SharedFsError> {
        self.bind(container, Path::new("rootfs"), host, false)
    }

    /// Shares `host` as volume `index` of container `container`; returns
    /// its path in the share.
    pub fn add_volume(
        &self,
        container: &str,
        index: usize,
        host: &Path,
        read_only: bool,
    ) -> Result<String, SharedFsError> {
        self.bind(container, &Path::new("volumes").join(index.to_string()), host, read_only)
    }

    /// Takes container `container`'s mounts out of the share and removes
    /// its subdirectory (never the caller's directories: nothing is removed
    /// while a mount is left).
    pub fn remove_container(&self, container: &str) -> Result<(), SharedFsError> {
        let dir = self.root.join(container);
        unmount_under(&dir)?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// Unmounts everything in the share and the share itself.
    pub fn tear_down(&self) -> Result<(), SharedFsError> {
        unmount_under(&self.root)
    }
}

/// The virtiofsd to run: `$VESSEL_VIRTIOFSD`, else `virtiofsd` on PATH or
/// in `~/.cargo/bin`, else Debian's `/usr/libexec/virtiofsd`. QEMU's older
/// C daemon (`/usr/lib/qemu/virtiofsd`) takes other options and is not
/// used.
pub fn find_virtiofsd() -> Result<PathBuf, SharedFsError> {
    if let Some(path) = std::env::var_os("VESSEL_VIRTIOFSD") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|d| d.join("virtiofsd"))
        .chain([PathBuf::from("/usr/libexec/virtiofsd")])
        .find(|p| p.is_file() && !p.starts_with("/usr/lib/qemu"))
        .ok_or(SharedFsError::NoDaemon)
}

/// Starts virtiofsd serving `shared` on `socket`, tied to this process
/// (see [`crate::children`]), and waits for its socket. It runs in its own
/// mount namespace with its seccomp filter on (`--sandbox namespace`,
/// `--seccomp kill`), without the capabilities to make device nodes or set
/// file capabilities, and exits when its frontend disconnects.
pub fn spawn_daemon(shared: &SharedDir, socket: &Path, log: &Path) -> Result<Child, SharedFsError> {
    let daemon = find_virtiofsd()?;
    let log = std::fs::File::create(log).map_err(io("create", log))?;
    let mut command = Command::new(&daemon);
    command
        .arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(shared.path())
        .args(["--cache", "auto", "--sandbox", "namespace", "--seccomp", "kill", "--announce-submounts"])
        // Containers see their roots nodev and have no extended
        // attributes here: no device nodes, no file capabilities.
        .arg("--modcaps=-mknod:-setfcap")
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("duplicate", socket))?)
        .stderr(log);
    let mut child = crate::children::spawn_tied(command).map_err(io("start", &daemon))?;
    let began = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(SharedFsError::Daemon(format!("{} exited with {status} before listening", daemon.display())));
        }
        if began.elapsed() > DAEMON_START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SharedFsError::Daemon(format!(
                "no socket at {} within {DAEMON_START_TIMEOUT:?}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/short\04"), r"/short\04");
    }

    /// Needs root (bind mounts); skipped otherwise, with the reason.
    #[test]
    fn a_bind_mount_reached_through_a_symlinked_root_is_unmounted_not_removed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let base = std::env::temp_dir().join(format!("vessel-sharedfs-link-{}", std::process::id()));
        let (real_root, precious) = (base.join("real-root"), base.join("precious"));
        std::fs::create_dir_all(real_root.join("box")).unwrap();
        std::fs::create_dir_all(&precious).unwrap();
        std::fs::write(precious.join("keep"), b"the caller's file").unwrap();
        std::os::unix::fs::symlink(&real_root, base.join("link-root")).unwrap();
        // The sandbox directory as a caller names it: through the symlink.
        let sandbox = base.join("link-root").join("box");
        let shared = SharedDir::of(&sandbox);
        shared.create().unwrap();
        shared.add_root("c1", &precious.canonicalize().unwrap()).unwrap();
        assert!(!mounts_under(&sandbox).is_empty(), "the mounts under a symlinked path are not seen");
        unmount_under(&sandbox).unwrap();
        std::fs::remove_dir_all(&sandbox).unwrap();
        assert_eq!(std::fs::read(precious.join("keep")).unwrap(), b"the caller's file");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn sources_must_be_real_absolute_directories() {
        let dir = std::env::temp_dir().join(format!("vessel-sharedfs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::fs::write(dir.join("file"), b"").unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        let real = dir.canonicalize().unwrap();
        assert!(check_source(&real.join("real")).is_ok());
        for (bad, why) in [
            (PathBuf::from("relative"), "absolute"),
            (real.join("real/../real"), "'..'"),
            (real.join("link"), "symlink"),
            (real.join("file"), "not a directory"),
        ] {
            let err = check_source(&bad).unwrap_err().to_string();
            assert!(err.contains(why), "{}: {err}", bad.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
