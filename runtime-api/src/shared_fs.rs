//! The sandbox's shared directory (Kata's `kataShared`): one host
//! directory, `shared/` in the sandbox's directory, that virtiofsd serves
//! into the guest as a virtio-fs device (tag [`SHARED_TAG`]).
//!
//! Each container has a subdirectory named by its ID: `<id>/rootfs` is its
//! root when the caller gave a directory, and `<id>/volumes/<n>` are its
//! volumes. Both are bind mounts of the caller's directories: nothing is
//! copied, and what either side writes the other sees. A read-only volume
//! is bind-mounted read-only on the host too (every mount below it as
//! well), so the guest cannot write it whatever it remounts.
//!
//! The host makes all this in `mounts/`, which the guest never sees, and
//! `shared/` is a read-only view of it (see [`SharedDir::create`]), as
//! Kata keeps `mounts/` apart from `shared/`: a guest that could write
//! beside its mounts could plant a symlink where the host is about to
//! mount or unmount by path. Mounts added later (containers created after
//! boot) propagate from `mounts/` to `shared/` and on into virtiofsd's own
//! mount namespace, a slave of ours.
//!
//! Cache modes: virtiofsd runs with `--cache auto`: the guest caches file
//! data and attributes for a second and revalidates on open, so a host
//! write shows in the guest at the next open (or within a second for
//! attributes).
//!
//! Bind mounts in the host's namespace need root (CAP_SYS_ADMIN).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use agent_proto::spec::SHARED_TAG;

/// The shared directory's name in the sandbox's directory: what virtiofsd
/// serves.
pub const SHARED_DIR: &str = "shared";
/// Where the host makes the shared directory's contents (see [`SharedDir`]).
pub const MOUNTS_DIR: &str = "mounts";
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

/// Unmounts everything at or below `dir` (lazily, shallowest first) and checks
/// that nothing is left. Removing a directory with a bind mount of a
/// caller's directory under it would delete the caller's files: callers
/// remove nothing unless this succeeds.
pub fn unmount_under(dir: &Path) -> Result<(), SharedFsError> {
    // The shallowest mount first, detached with every mount below it. The
    // deeper mount points lie in directories a guest writes through
    // virtio-fs: between reading one from mountinfo and unmounting it, the
    // guest could swap a directory on its path for a symlink to a host
    // path. The shallowest are the host's own, in the sandbox's directory,
    // which no guest reaches; their last component is not followed either.
    for _ in 0..mounts_under(dir).len() {
        let Some(point) = mounts_under(dir).pop() else { break };
        let c = cstring(&point)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            tracing::warn!(mount = %point.display(), error = %std::io::Error::last_os_error(), "cannot unmount");
            break;
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(SharedFsError::MountsLeft { dir: dir.to_path_buf(), left });
    }
    Ok(())
}

// From <linux/mount.h>.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct mount_attr` for mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount tree at `host` (every mount below it
/// included), opened without following a symlink at its last component,
/// and read-only all through when `read_only`. It is read-only before it
/// is attached anywhere, so the copies that propagate to virtiofsd's view
/// are read-only too (a remount afterwards would not propagate).
fn clone_tree(host: &Path, read_only: bool) -> Result<std::os::fd::OwnedFd, SharedFsError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(host)
        .map_err(io("open", host))?;
    let flags = OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: a valid fd and an empty NUL-terminated path; returns a new
    // fd or -1.
    let tree = unsafe { libc::syscall(libc::SYS_open_tree, dir.as_raw_fd(), c"".as_ptr(), flags) };
    if tree < 0 {
        return Err(io("copy the mounts of", host)(std::io::Error::last_os_error()));
    }
    // SAFETY: open_tree returned this fd, owned by nobody else.
    let tree = unsafe { std::os::fd::OwnedFd::from_raw_fd(tree as i32) };
    if read_only {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let flags = libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE;
        // SAFETY: a detached mount fd, an empty path and a mount_attr of
        // the size given, on this stack.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                flags,
                &attr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            return Err(io("make read-only the mounts of", host)(std::io::Error::last_os_error()));
        }
    }
    Ok(tree)
}

/// Attaches the detached mount tree `tree` at `target`.
fn attach(tree: &std::os::fd::OwnedFd, target: &Path) -> Result<(), SharedFsError> {
    use std::os::fd::AsRawFd;
    let target_c = cstring(target)?;
    // SAFETY: a detached mount fd, NUL-terminated paths.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io("bind-mount a directory at", target)(std::io::Error::last_os_error()));
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
    /// Where the host makes the containers' directories and bind mounts:
    /// never visible to the guest.
    mounts: PathBuf,
    /// What virtiofsd serves: a read-only view of `mounts`, whose bind
    /// mounts (read-write where they are) appear in it as they are made.
    shared: PathBuf,
}

impl SharedDir {
    /// The shared directory of the sandbox whose directory is `sandbox_dir`
    /// (made or not).
    pub fn of(sandbox_dir: &Path) -> Self {
        SharedDir { mounts: sandbox_dir.join(MOUNTS_DIR), shared: sandbox_dir.join(SHARED_DIR) }
    }

    /// What virtiofsd serves.
    pub fn path(&self) -> &Path {
        &self.shared
    }

    /// Makes it. `mounts/` is bind-mounted on itself and made a peer group
    /// of its own (private first, so that it does not join the group of
    /// the mount it sits on, and our binds propagate nowhere else).
    /// `shared/` is a recursive bind of it, made its slave (mounts added
    /// under `mounts/` later appear there, nothing goes the other way) and
    /// read-only at its top: the guest can write inside the callers'
    /// directories it was given, but cannot make or rename the directories
    /// and symlinks around them that the host works on by path.
    pub fn create(&self) -> Result<(), SharedFsError> {
        let made = (|| {
            private_dir(&self.mounts)?;
            private_dir(&self.shared)?;
            mount(Some(&self.mounts), &self.mounts, libc::MS_BIND, "bind-mount onto itself")?;
            mount(None, &self.mounts, libc::MS_PRIVATE, "make a private mount")?;
            mount(None, &self.mounts, libc::MS_SHARED, "make a shared mount")?;
            mount(Some(&self.mounts), &self.shared, libc::MS_BIND | libc::MS_REC, "bind-mount the mounts at")?;
            mount(None, &self.shared, libc::MS_SLAVE, "make a slave mount")?;
            let read_only = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            mount(None, &self.shared, read_only, "make read-only the mount at")
        })();
        if made.is_err() {
            let _ = self.tear_down();
        }
        made
    }

    /// Bind-mounts the caller's directory `host` at `<container>/<name>`;
    /// returns that path relative to the share's root, as the agent names
    /// it. Read-only mounts are read-only here, on the host, and so is
    /// every mount below them.
    fn bind(&self, container: &str, name: &Path, host: &Path, read_only: bool) -> Result<String, SharedFsError> {
        check_source(host)?;
        crate::config::validate_id(container)
            .map_err(|e| SharedFsError::BadSource { path: host.to_path_buf(), why: e.to_string() })?;
        let relative = Path::new(container).join(name);
        let target = self.mounts.join(&relative);
        private_dir(&target)?;
        let tree = clone_tree(host, read_only)?;
        attach(&tree, &target)?;
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
        let dir = self.mounts.join(container);
        unmount_under(&self.shared.join(container))?;
        unmount_under(&dir)?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// Unmounts everything in the share, and the share itself.
    pub fn tear_down(&self) -> Result<(), SharedFsError> {
        unmount_under(&self.shared)?;
        unmount_under(&self.mounts)
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
