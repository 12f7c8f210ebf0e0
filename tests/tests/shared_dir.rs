//! The sandbox's shared directory on the host (`runtime_api::shared_fs`):
//! real bind mounts, so root only; skipped by name, with the reason,
//! without it.

use libtest_mimic::Arguments;
use runtime_api::shared_fs::{mounts_under, unmount_under, SharedDir};
use vessel_tests::harness::{gate, trial};

/// A sandbox directory named through a symlink (`/var/run` is one to
/// `/run` on Debian): its mounts are found, unmounted, and a removal never
/// reaches the caller's directory behind them.
fn a_bind_mount_reached_through_a_symlinked_root_is_unmounted_not_removed() -> anyhow::Result<()> {
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
    Ok(())
}

/// What virtiofsd serves: read-only around the callers' directories (no
/// symlink, rename or mkdir next to the mounts), read-only volumes and the
/// mounts inside them read-only, containers added later shown.
fn what_virtiofsd_serves_is_read_only_around_the_callers_directories() -> anyhow::Result<()> {
    let base = std::env::temp_dir().join(format!("vessel-sharedfs-view-{}", std::process::id()));
    let (sandbox, root, ro) = (base.join("box"), base.join("root"), base.join("ro"));
    for d in [&sandbox, &root, &ro.join("sub")] {
        std::fs::create_dir_all(d).unwrap();
    }
    // A mount inside the read-only volume's source: read-only too.
    let inner = base.join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    let bound = std::process::Command::new("mount").arg("--bind").arg(&inner).arg(ro.join("sub")).status()?;
    anyhow::ensure!(bound.success(), "mount --bind failed");
    let shared = SharedDir::of(&sandbox);
    shared.create().unwrap();
    shared.add_root("c1", &root.canonicalize().unwrap()).unwrap();
    shared.add_volume("c1", 0, &ro.canonicalize().unwrap(), true).unwrap();
    let view = shared.path();
    // The guest's view: the caller's root is writable...
    std::fs::write(view.join("c1/rootfs/made"), b"by the guest").unwrap();
    assert!(root.join("made").exists());
    // ...but nothing can be made or renamed around it: no symlink where
    // the host will mount or unmount.
    let erofs = |r: std::io::Result<()>| r.is_err_and(|e| e.raw_os_error() == Some(libc::EROFS));
    assert!(erofs(std::os::unix::fs::symlink("/", view.join("c1/volumes/1"))), "a symlink beside the mounts");
    assert!(erofs(std::fs::rename(view.join("c1"), view.join("c2"))), "a container's directory renamed");
    assert!(erofs(std::fs::create_dir(view.join("c9"))), "a directory made at the top");
    // The read-only volume and the mount inside it refuse writes.
    assert!(erofs(std::fs::write(view.join("c1/volumes/0/x"), b"")), "the read-only volume was written");
    assert!(erofs(std::fs::write(view.join("c1/volumes/0/sub/x"), b"")), "a mount inside it was written");
    // A container added later shows in the view.
    let late = base.join("late");
    std::fs::create_dir_all(&late).unwrap();
    std::fs::write(late.join("f"), b"late").unwrap();
    shared.add_root("c2", &late.canonicalize().unwrap()).unwrap();
    assert_eq!(std::fs::read(view.join("c2/rootfs/f")).unwrap(), b"late");
    shared.remove_container("c1").unwrap();
    assert!(!view.join("c1").exists() && root.join("made").exists());
    shared.tear_down().unwrap();
    unmount_under(&ro).unwrap();
    assert!(mounts_under(&base).is_empty());
    std::fs::remove_dir_all(&base).unwrap();
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    // SAFETY: geteuid has no preconditions.
    let reason = (unsafe { libc::geteuid() } != 0).then(|| "bind mounts need root".to_string());
    let trials = [
        trial(
            "a_bind_mount_reached_through_a_symlinked_root_is_unmounted_not_removed",
            a_bind_mount_reached_through_a_symlinked_root_is_unmounted_not_removed,
        ),
        trial(
            "what_virtiofsd_serves_is_read_only_around_the_callers_directories",
            what_virtiofsd_serves_is_read_only_around_the_callers_directories,
        ),
    ];
    libtest_mimic::run(&args, gate(reason, trials)).exit();
}
