//! What the agent does as a guest's PID 1 before it serves: the
//! filesystems, the kernel modules shipped in the initramfs, entropy, and
//! the guest's details; and CPU onlining later. The agent never powers the
//! guest off: the host stops the VM.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use agent_proto::agent::GuestDetails;

/// The initramfs's module directory and its load list (written by
/// `resources::guest_image`: one `<name>.ko` per line, dependencies first).
pub const MODULES_DIR: &str = "/lib/modules/vessel";
/// See [`MODULES_DIR`].
pub const MODULES_LOAD: &str = "/lib/modules/vessel/modules.load";

/// Where the agent's container cgroups live in a guest.
pub const CGROUP_DIR: &str = "/sys/fs/cgroup/vessel";

/// A boot step that failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A system call or file operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done ("mount proc on /proc").
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `modules.load` names something that is not a plain file name.
    #[error("{MODULES_LOAD} names {0:?}, which is not a file name")]
    ModuleName(String),
    /// `vessel.agent_port=` is not a port.
    #[error("{0} on the kernel command line is not a port number")]
    BadPort(String),
    /// A path with a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

fn last_os_error(what: impl Into<String>) -> GuestError {
    io(what)(std::io::Error::last_os_error())
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("a constant without NUL")
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<(), GuestError> {
    std::fs::create_dir_all(target).map_err(io(format!("create {target}")))?;
    let (source_c, target_c, fstype_c, data_c) = (cstr(source), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: valid NUL-terminated strings that live across the call.
    let r =
        unsafe { libc::mount(source_c.as_ptr(), target_c.as_ptr(), fstype_c.as_ptr(), flags, data_c.as_ptr().cast()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // Mounted already (by the kernel, say): fine.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io(format!("mount {fstype} on {target}"))(e));
        }
    }
    Ok(())
}

/// Moves the agent off the initramfs onto a tmpfs, as `switch_root` does.
///
/// The initramfs is the kernel's first mount, and `pivot_root` refuses to
/// move that one away; containers need `pivot_root` (a `chroot` can be
/// escaped). So at boot the agent copies the initramfs into a tmpfs,
/// deletes the originals, moves the tmpfs over `/` and enters it. Done
/// before anything else is mounted.
pub fn leave_initramfs() -> Result<(), GuestError> {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let slash = cstr("/");
    // SAFETY: a valid path and out-pointer.
    if unsafe { libc::statfs(slash.as_ptr(), &mut st) } != 0 {
        return Err(last_os_error("statfs /"));
    }
    let kind = st.f_type as i64;
    if kind != RAMFS_MAGIC && kind != TMPFS_MAGIC {
        return Ok(());
    }
    let new_root = Path::new("/.vessel-root");
    mount("tmpfs", "/.vessel-root", "tmpfs", 0, "mode=0755")?;
    for entry in std::fs::read_dir("/").map_err(io("read /"))? {
        let entry = entry.map_err(io("read /"))?;
        if entry.path() == new_root {
            continue;
        }
        copy_tree(&entry.path(), &new_root.join(entry.file_name()))?;
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(entry.path()),
            _ => std::fs::remove_file(entry.path()),
        };
        removed.map_err(io(format!("remove {} from the initramfs", entry.path().display())))?;
    }
    let (dot, root_c) = (cstr("."), cstr("/.vessel-root"));
    // SAFETY: a valid NUL-terminated path.
    let entered = unsafe { libc::chdir(root_c.as_ptr()) } == 0;
    // SAFETY: valid NUL-terminated paths; MS_MOVE takes no type or data.
    let moved = entered
        && unsafe { libc::mount(dot.as_ptr(), slash.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) } == 0;
    // SAFETY: as above.
    if !moved || unsafe { libc::chroot(dot.as_ptr()) } != 0 || unsafe { libc::chdir(slash.as_ptr()) } != 0 {
        return Err(last_os_error("move the tmpfs root over /"));
    }
    Ok(())
}

/// Copies a file, directory, symlink or device node, with its mode.
fn copy_tree(from: &Path, to: &Path) -> Result<(), GuestError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(from).map_err(io(format!("read {}", from.display())))?;
    let kind = meta.file_type();
    let failed = |e: std::io::Error| io(format!("copy {} to {}", from.display(), to.display()))(e);
    if kind.is_dir() {
        std::fs::create_dir(to).map_err(failed)?;
        for entry in std::fs::read_dir(from).map_err(failed)? {
            let entry = entry.map_err(failed)?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if kind.is_symlink() {
        let target = std::fs::read_link(from).map_err(failed)?;
        std::os::unix::fs::symlink(target, to).map_err(failed)?;
        return Ok(());
    } else if kind.is_file() {
        std::fs::copy(from, to).map_err(failed)?;
    } else if kind.is_char_device() || kind.is_block_device() {
        let path = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(to.as_os_str()))
            .map_err(|_| GuestError::Nul(to.to_path_buf()))?;
        // SAFETY: a valid path; mode and rdev come from the original node.
        if unsafe { libc::mknod(path.as_ptr(), meta.mode(), meta.rdev()) } != 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
    } else {
        // Sockets and FIFOs have no place in an initramfs.
        return Ok(());
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(failed)
}

/// Mounts the filesystems every guest needs (cgroup v2 only).
pub fn mount_filesystems() -> Result<(), GuestError> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, "")?;
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")?;
    mount("shm", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755")?;
    mount("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777")?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_nodev_noexec, "")?;
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    Ok(())
}

/// Loads the modules listed in [`MODULES_LOAD`], in order. A module the
/// kernel already has (built in or loaded) is fine.
pub fn load_modules() -> Result<Vec<String>, GuestError> {
    let list = match std::fs::read_to_string(MODULES_LOAD) {
        Ok(list) => list,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("read {MODULES_LOAD}"))(e)),
    };
    let mut loaded = Vec::new();
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') {
            return Err(GuestError::ModuleName(name.into()));
        }
        let path = Path::new(MODULES_DIR).join(name);
        let file = std::fs::File::open(&path).map_err(io(format!("open {}", path.display())))?;
        let params = cstr("");
        // SAFETY: a valid module fd and an empty parameter string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io(format!("load {}", path.display()))(e));
            }
        }
        loaded.push(name.to_string());
    }
    Ok(loaded)
}

/// Credits the kernel's pool with bytes from the hardware RNG (virtio-rng)
/// so that early getrandom() callers do not block. Returns the bytes added.
pub fn seed_entropy() -> Result<usize, GuestError> {
    const BYTES: usize = 64;
    let mut hwrng = std::fs::File::open("/dev/hwrng").map_err(io("open /dev/hwrng"))?;
    let mut seed = [0u8; BYTES];
    std::io::Read::read_exact(&mut hwrng, &mut seed).map_err(io("read /dev/hwrng"))?;
    let urandom = std::fs::OpenOptions::new().write(true).open("/dev/urandom").map_err(io("open /dev/urandom"))?;
    add_entropy(&urandom, &seed)?;
    Ok(BYTES)
}

/// The most bytes [`add_entropy`] takes at once (the size of its buffer;
/// `agent_proto::identity::MAX_ENTROPY`).
const MAX_ADDED: usize = agent_proto::identity::MAX_ENTROPY;

/// Mixes `bytes` (at most [`MAX_ADDED`]) into the kernel's input pool
/// through `urandom` and credits them in full (RNDADDENTROPY).
fn add_entropy(urandom: &std::fs::File, bytes: &[u8]) -> Result<(), GuestError> {
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; MAX_ADDED],
    }
    if bytes.len() > MAX_ADDED {
        return Err(io("add entropy")(std::io::Error::other(format!("{} bytes is over {MAX_ADDED}", bytes.len()))));
    }
    let mut info = RandPoolInfo {
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_ADDED],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: info is a valid rand_pool_info whose buf holds at least
    // buf_size bytes after the header; the ioctl only reads it.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(last_os_error("add entropy (RNDADDENTROPY)"));
    }
    Ok(())
}

/// Gives the guest the identity the host asked for (checked by
/// `agent_proto::identity::check`): hostname, wall clock, and fresh
/// entropy with the CRNG reseeded from it.
pub fn set_identity(identity: &agent_proto::identity::Identity) -> Result<(), GuestError> {
    let name = &identity.hostname;
    // SAFETY: the pointer and length describe the hostname's bytes, which
    // outlive the call; the kernel copies them.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(last_os_error(format!("set the hostname to {name:?}")));
    }
    let now = libc::timespec { tv_sec: identity.sec, tv_nsec: libc::c_long::from(identity.nsec) };
    // SAFETY: a valid timespec that lives across the call; the kernel only
    // reads it.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
        return Err(last_os_error(format!("set the clock to {} s", identity.sec)));
    }
    // A plain write(2) to /dev/urandom would mix the bytes into the input
    // pool but credit nothing and leave the CRNG alone: it would go on
    // drawing from the key it had when the VM was paused (the same key in
    // every VM booted from one image snapshot, or cloned from one
    // template) until its next scheduled reseed, up to a minute later.
    // RNDADDENTROPY credits the bytes, and RNDRESEEDCRNG makes the CRNG
    // take a fresh key from the pool now, so from here on this guest's
    // random bytes are its own.
    let urandom = std::fs::OpenOptions::new().write(true).open("/dev/urandom").map_err(io("open /dev/urandom"))?;
    add_entropy(&urandom, &identity.entropy)?;
    // RNDRESEEDCRNG = _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: an ioctl with no argument on a descriptor this function owns.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(last_os_error("reseed the CRNG (RNDRESEEDCRNG)"));
    }
    Ok(())
}

/// `vessel.agent_port=N` from the kernel command line.
pub fn cmdline_port(cmdline: &str) -> Result<Option<u32>, GuestError> {
    let key = format!("{}=", agent_proto::link::CMDLINE_PORT_KEY);
    match cmdline.split_whitespace().filter_map(|w| w.strip_prefix(&key)).next_back() {
        None => Ok(None),
        Some(v) => match v.parse::<u32>() {
            Ok(port) if port > 0 => Ok(Some(port)),
            _ => Err(GuestError::BadPort(format!("{key}{v}"))),
        },
    }
}

/// Milliseconds since the kernel started.
pub fn uptime_ms() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let secs: f64 = text.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (secs * 1000.0) as u64
}

fn cpu_count(list: &str) -> u32 {
    list.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<u32>().unwrap_or(0).saturating_sub(a.parse().unwrap_or(0)) + 1,
            None => 1,
        })
        .sum()
}

/// The guest's kernel, memory and CPUs.
pub fn details(ready_after_boot_ms: u64) -> GuestDetails {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::uname(&mut uts) };
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned();
    // SAFETY: uname NUL-terminates nodename.
    let hostname = unsafe { std::ffi::CStr::from_ptr(uts.nodename.as_ptr()) }.to_string_lossy().into_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    GuestDetails {
        kernel_release: release,
        mem_total_bytes: mem_kib * 1024,
        online_cpus: cpu_count(&read("/sys/devices/system/cpu/online")),
        possible_cpus: cpu_count(&read("/sys/devices/system/cpu/possible")),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        ready_after_boot_ms,
        hostname,
        ..Default::default()
    }
}

/// Brings CPUs 1..n online and the rest offline (CPU 0 always stays).
pub fn online_cpus(n: u32) -> Result<(), crate::container::Error> {
    use crate::container::Error;
    let possible = cpu_count(&std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default());
    if n == 0 || n > possible {
        return Err(Error::Invalid(format!("nb_cpus {n} is not between 1 and the {possible} possible CPUs")));
    }
    for cpu in 1..possible {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/online");
        let want = if cpu < n { "1" } else { "0" };
        if std::fs::read_to_string(&path).map(|s| s.trim() == want).unwrap_or(false) {
            continue;
        }
        std::fs::write(&path, want).map_err(|e| Error::Failed(format!("writing {want} to {path}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The initramfs layout is a contract with `resources::guest_image`,
    /// which writes it (the agent does not link the host's builder).
    #[test]
    fn the_module_paths_are_the_image_builders() {
        assert_eq!(MODULES_DIR, resources::guest_image::MODULES_DIR);
        assert_eq!(MODULES_LOAD, resources::guest_image::MODULES_LOAD);
    }

    #[test]
    fn cpu_lists_count() {
        assert_eq!(cpu_count("0\n"), 1);
        assert_eq!(cpu_count("0-3\n"), 4);
        assert_eq!(cpu_count("0,2-3"), 3);
        assert_eq!(cpu_count(""), 0);
    }

    #[test]
    fn the_port_comes_from_the_command_line() {
        assert_eq!(cmdline_port("console=ttyS0 quiet").ok(), Some(None));
        assert_eq!(cmdline_port("vessel.agent_port=2000 x").ok(), Some(Some(2000)));
        assert!(cmdline_port("vessel.agent_port=abc").unwrap_err().to_string().contains("abc"));
    }
}
