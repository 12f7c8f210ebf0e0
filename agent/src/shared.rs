//! The sandbox's shared filesystem: one virtio-fs device (tag
//! [`SHARED_TAG`]) that the host serves with virtiofsd. The agent mounts it
//! once, on first use, at [`SHARED_MOUNT`]; container roots and volumes are
//! directories in it, named by their path relative to its root.

use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

pub use agent_proto::spec::SHARED_TAG;

/// Where the agent mounts the shared filesystem.
pub const SHARED_MOUNT: &str = "/run/vessel/shared";

/// Whether the share is mounted; held while mounting, so that two creates
/// do not both mount it.
static MOUNTED: Mutex<bool> = Mutex::new(false);

/// Mounts the share if it is not mounted yet.
fn ensure_mounted() -> Result<(), String> {
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if *mounted {
        return Ok(());
    }
    std::fs::create_dir_all(SHARED_MOUNT).map_err(|e| format!("creating {SHARED_MOUNT}: {e}"))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in a constant");
    let (tag, target, fstype) = (c(SHARED_TAG), c(SHARED_MOUNT), c("virtiofs"));
    // Not executable or device-bearing from the agent's side; containers
    // get their own bind mounts with the spec's options.
    let flags = libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: valid NUL-terminated strings; no data.
    if unsafe { libc::mount(tag.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, std::ptr::null()) } != 0 {
        return Err(format!(
            "mounting the shared filesystem (virtio-fs tag {SHARED_TAG:?}) at {SHARED_MOUNT}: {}; \
             the sandbox may have no shared directory",
            std::io::Error::last_os_error()
        ));
    }
    *mounted = true;
    Ok(())
}

/// Checks a path relative to the share's root: relative, with only plain
/// components (no `..`, no `.`), not empty.
pub fn check_relative(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
    if path.is_empty() || !plain || path.contains("//") || path.ends_with('/') {
        return Err(format!("{path:?} is not a plain relative path in the shared filesystem"));
    }
    Ok(())
}

/// The directory `path` (relative to the share's root) in the agent's
/// filesystem, mounting the share first if needed. It must exist and be a
/// directory, reached without following a symlink.
pub fn directory(path: &str) -> Result<PathBuf, String> {
    check_relative(path)?;
    ensure_mounted()?;
    let full = Path::new(SHARED_MOUNT).join(path);
    match std::fs::symlink_metadata(&full) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{path:?} in the shared filesystem is not a directory")),
        Err(e) => return Err(format!("{path:?} in the shared filesystem: {e}")),
    }
    // A symlink earlier in the path would have led elsewhere in the share:
    // its canonical form must be the path itself.
    let real = full.canonicalize().map_err(|e| format!("{path:?} in the shared filesystem: {e}"))?;
    if real != full {
        return Err(format!("{path:?} in the shared filesystem goes through a symlink"));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_paths_are_plain_and_relative() {
        assert!(check_relative("c1/rootfs").is_ok());
        assert!(check_relative("c1/volumes/0").is_ok());
        for bad in ["", "/c1", "../x", "c1/../../x", "./c1", "c1//x", "c1/"] {
            assert!(check_relative(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
