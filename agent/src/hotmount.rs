//! Mounting a disk into a container that exists already.
//!
//! The filesystem is made in the agent's own mount namespace with the new
//! mount API (`fsopen`, `fsconfig`, `fsmount`), which leaves it detached.
//! A short-lived thread then joins the container's mount namespace, where
//! its root is the container's root, makes the target directory there and
//! attaches the mount (`move_mount`). Paths in the container are therefore
//! resolved inside the container's own view: a symlink in them can only
//! point somewhere the container sees anyway.
//!
//! `setns(CLONE_NEWNS)` is refused to a thread that shares its filesystem
//! context (root, cwd) with others, so the thread unshares that first; its
//! namespace ends with it and the agent's other threads never see it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

// From <linux/mount.h>; the libc crate does not define them all.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// What to mount where.
pub struct HotMount<'a> {
    /// The block device in the agent's /dev.
    pub device: &'a Path,
    /// Its filesystem type.
    pub fstype: &'a str,
    /// Mounted read-only (the superblock and the mount both).
    pub read_only: bool,
    /// An absolute path in the container.
    pub destination: &'a Path,
}

/// Checks a destination: absolute, not the root, and without `.` or `..`.
pub fn check_destination(destination: &Path) -> Result<(), String> {
    let shown = destination.display();
    if !destination.is_absolute() {
        return Err(format!("the mount destination {shown:?} is not an absolute path"));
    }
    let mut normal = 0;
    for part in destination.components() {
        match part {
            Component::RootDir => {}
            Component::Normal(_) => normal += 1,
            _ => return Err(format!("the mount destination {shown:?} has a '.' or '..' component")),
        }
    }
    if normal == 0 {
        return Err("a disk cannot be mounted over a container's root".into());
    }
    Ok(())
}

/// The filesystems a disk may be mounted as: block filesystems only. A
/// pseudo-filesystem (proc, sysfs, bpf...) made in the agent's namespace
/// and attached into a container would hand it the agent's view.
pub const DISK_FILESYSTEMS: [&str; 6] = ["ext4", "ext3", "ext2", "xfs", "btrfs", "vfat"];

/// Checks a MountDisk request's disk serial and filesystem type (empty:
/// ext4); returns the type to mount.
pub fn check_disk(serial: &str, fstype: &str) -> Result<&'static str, String> {
    // virtio-blk serials are at most 20 bytes; one is matched against each
    // disk's sysfs `serial` file, which an empty one would match blindly.
    if serial.is_empty() || serial.len() > 20 || !serial.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err(format!("the disk serial {serial:?} is not 1-20 printable bytes without '/'"));
    }
    let fstype = if fstype.is_empty() { "ext4" } else { fstype };
    DISK_FILESYSTEMS
        .iter()
        .find(|f| **f == fstype)
        .copied()
        .ok_or_else(|| format!("{fstype:?} is not a disk filesystem vessel mounts ({})", DISK_FILESYSTEMS.join(", ")))
}

/// Mounts `mount` in the mount namespace of process `pid` (a container's
/// first process), of which `pidfd` is a pidfd taken while it lived. The
/// namespace is opened by PID, then the pidfd says whether that process
/// still lives: if it does, the PID was still its own when the namespace
/// was opened (a PID is not reused while its process lives). Refused when
/// it has exited, and when the namespace is the agent's own.
pub fn mount_into(pid: i32, pidfd: &impl AsRawFd, mount: &HotMount) -> Result<(), String> {
    check_destination(mount.destination)?;
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = std::fs::File::open(&ns_path).map_err(|e| format!("opening {ns_path}: {e}"))?;
    // SAFETY: pidfd_send_signal with signal 0 sends nothing; it only
    // checks that the process lives.
    let alive = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<u8>(), 0) };
    if alive != 0 {
        return Err(format!("the container's first process (PID {pid}) has exited"));
    }
    let (theirs, ours) = (ns.metadata(), std::fs::metadata("/proc/self/ns/mnt"));
    match (theirs, ours) {
        (Ok(t), Ok(o)) if (t.dev(), t.ino()) != (o.dev(), o.ino()) => {}
        (Ok(_), Ok(_)) => {
            return Err(format!("process {pid} is in the agent's own mount namespace, not a container's"))
        }
        (Err(e), _) | (_, Err(e)) => return Err(format!("comparing mount namespaces: {e}")),
    }
    let detached = make_mount(mount)?;
    let destination = mount.destination.to_path_buf();
    let attach = std::thread::Builder::new()
        .name("hotmount".into())
        .spawn(move || attach_in(&ns, &detached, &destination))
        .map_err(|e| format!("starting the mount thread: {e}"))?;
    attach.join().map_err(|_| "the mount thread panicked".to_string())?
}

/// The filesystem on `mount.device`, mounted nowhere yet.
fn make_mount(mount: &HotMount) -> Result<OwnedFd, String> {
    let what = format!("mounting {} ({})", mount.device.display(), mount.fstype);
    let fail = |step: &str| format!("{what}: {step}: {}", std::io::Error::last_os_error());
    let fstype = CString::new(mount.fstype).map_err(|_| format!("{what}: NUL in the filesystem type"))?;
    let device = CString::new(mount.device.as_os_str().as_bytes()).map_err(|_| format!("{what}: NUL in the path"))?;
    // SAFETY: a valid NUL-terminated string; the kernel returns a new fd
    // or -1.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(fail("fsopen"));
    }
    // SAFETY: fsopen returned this fd, owned by nobody else.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let config = |cmd: libc::c_uint, key: Option<&std::ffi::CStr>, value: Option<&std::ffi::CStr>| {
        let (key, value) =
            (key.map_or(std::ptr::null(), |k| k.as_ptr()), value.map_or(std::ptr::null(), |v| v.as_ptr()));
        // SAFETY: fs is an fsopen fd; key and value are NUL-terminated or
        // null, as each command wants.
        unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key, value, 0) }
    };
    if config(FSCONFIG_SET_STRING, Some(c"source"), Some(&device)) < 0 {
        return Err(fail("setting the source"));
    }
    if mount.read_only && config(FSCONFIG_SET_FLAG, Some(c"ro"), None) < 0 {
        return Err(fail("setting read-only"));
    }
    if config(FSCONFIG_CMD_CREATE, None, None) < 0 {
        return Err(fail("creating the superblock"));
    }
    let mut attributes = MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID;
    if mount.read_only {
        attributes |= MOUNT_ATTR_RDONLY;
    }
    // SAFETY: fs is a configured fsopen fd; returns a new fd or -1.
    let mounted = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attributes) };
    if mounted < 0 {
        return Err(fail("fsmount"));
    }
    // SAFETY: fsmount returned this fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(mounted as i32) })
}

/// On a thread of its own: joins the namespace `ns` and attaches
/// `detached` at `destination` there, making the directory if missing.
fn attach_in(ns: &std::fs::File, detached: &OwnedFd, destination: &Path) -> Result<(), String> {
    let shown = destination.display();
    // SAFETY: unshare and setns change only this thread's own filesystem
    // context and namespaces; the fds are open.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(format!("unsharing the mount thread's root: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(format!("joining the container's mount namespace: {}", std::io::Error::last_os_error()));
    }
    std::fs::create_dir_all(destination).map_err(|e| format!("making {shown:?} in the container: {e}"))?;
    let target = CString::new(destination.as_os_str().as_bytes()).map_err(|_| format!("NUL in {shown:?}"))?;
    // SAFETY: detached is an fsmount fd, the paths are NUL-terminated.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            detached.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if moved < 0 {
        return Err(format!("attaching the disk at {shown:?} in the container: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_absolute_plain_paths_below_the_root() {
        assert!(check_destination(Path::new("/data")).is_ok());
        assert!(check_destination(Path::new("/var/lib/data")).is_ok());
        for (bad, why) in [("data", "not an absolute path"), ("/", "root"), ("/data/../etc", "'..'")] {
            let err = check_destination(Path::new(bad)).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn only_named_disks_and_block_filesystems_are_mounted() {
        assert_eq!(check_disk("vol-0", ""), Ok("ext4"));
        assert_eq!(check_disk("vol-0", "xfs"), Ok("xfs"));
        for (serial, fstype, why) in [
            ("", "ext4", "not 1-20"),
            ("a-serial-of-21-bytes!", "ext4", "not 1-20"),
            ("../sda", "ext4", "without '/'"),
            ("vol-0", "proc", "not a disk filesystem"),
            ("vol-0", "bpf", "not a disk filesystem"),
        ] {
            let err = check_disk(serial, fstype).unwrap_err();
            assert!(err.contains(why), "{serial:?} {fstype:?}: {err}");
        }
    }

    #[test]
    fn a_pid_in_the_agents_own_namespace_is_refused() {
        let me = std::process::id() as i32;
        // SAFETY: pidfd_open takes integers and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, me, 0) };
        assert!(fd >= 0);
        // SAFETY: a new fd nothing else owns.
        let pidfd = unsafe { <OwnedFd as FromRawFd>::from_raw_fd(fd as i32) };
        let err = mount_into(
            me,
            &pidfd,
            &HotMount {
                device: Path::new("/dev/null"),
                fstype: "ext4",
                read_only: true,
                destination: Path::new("/nowhere"),
            },
        )
        .unwrap_err();
        assert!(err.contains("the agent's own mount namespace"), "{err}");
    }

    #[test]
    fn a_process_that_has_exited_is_refused_even_if_its_pid_is_taken() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // SAFETY: pidfd_open takes integers and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0);
        // SAFETY: a new fd nothing else owns.
        let pidfd = unsafe { <OwnedFd as FromRawFd>::from_raw_fd(fd as i32) };
        child.wait().unwrap();
        // The PID now names some other process, here this one.
        let mount = HotMount {
            device: Path::new("/dev/null"),
            fstype: "ext4",
            read_only: true,
            destination: Path::new("/nowhere"),
        };
        let err = mount_into(std::process::id() as i32, &pidfd, &mount).unwrap_err();
        assert!(err.contains("has exited"), "{err}");
    }
}
