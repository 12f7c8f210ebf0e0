//! Initramfs images for the tier-3 tests (DESIGN.md, Testing): the host's
//! static busybox with a link per applet, the kernel modules the test
//! needs, a standard `/init` and the test's own script.
//!
//! Guest-side conventions, kept by the `/init` written here:
//! 1. mount proc, sysfs and devtmpfs; print [`INIT_MARKER`] with the
//!    guest's uptime;
//! 2. `insmod` the modules in dependency order (on failure print
//!    `VESSEL-TEST-RESULT: fail insmod <name>` and power off);
//! 3. run the test script, `/test.sh`, with `sh`; the script prints
//!    `VESSEL-TEST-RESULT: ok` or `VESSEL-TEST-RESULT: fail <why>`
//!    ([`RESULT_MARKER`]) and may print `VESSEL-VALUE: <key> <value>`
//!    lines ([`VALUE_MARKER`]) for the host to check;
//! 4. if the script exits with a non-zero status, print a fail line saying
//!    so; then `poweroff -f`.
//!
//! Images are cached by content: the same inputs give the same file.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cache::{self, CacheError};
use crate::command::{run, CommandError};
use crate::elf;
use crate::initramfs::{Initramfs, InitramfsError};
use crate::kernel::{hex, Kernel};
use crate::modules::{self, ModuleError};

/// Printed by `/init` as soon as it runs: `VESSEL-INIT: uptime <seconds>`.
pub const INIT_MARKER: &str = "VESSEL-INIT:";
/// The test's verdict: `VESSEL-TEST-RESULT: ok` or `... fail <why>`.
pub const RESULT_MARKER: &str = "VESSEL-TEST-RESULT:";
/// A value for the host to check: `VESSEL-VALUE: <key> <value>`.
pub const VALUE_MARKER: &str = "VESSEL-VALUE:";

/// Where the busybox binary is looked for, after `$VESSEL_BUSYBOX`.
/// Debian's `busybox-static` installs `/bin/busybox`.
pub const BUSYBOX_PATHS: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];

/// Why a test image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TestImageError {
    /// No busybox binary was found.
    #[error("no busybox found at $VESSEL_BUSYBOX or {} (install busybox-static)", BUSYBOX_PATHS.join(", "))]
    NoBusybox,
    /// The busybox binary could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The busybox found needs a dynamic loader the guest does not have.
    #[error("{0} is not a static x86_64 executable (install busybox-static)")]
    NotStatic(PathBuf),
    /// `busybox --list` failed.
    #[error("cannot list busybox's applets")]
    Applets(#[source] CommandError),
    /// Modules were asked for, but the kernel has no modules directory.
    #[error("modules {0} were asked for, but the kernel has no modules directory")]
    NoModulesDir(String),
    /// A module could not be resolved or read.
    #[error("cannot collect the kernel modules")]
    Modules(#[source] ModuleError),
    /// An entry could not be added to the image.
    #[error("cannot assemble the initramfs")]
    Initramfs(#[source] InitramfsError),
    /// The image could not be written to the cache.
    #[error("cannot write the initramfs to the cache")]
    Cache(#[source] CacheError),
}

/// A file to put into the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraFile {
    /// Path inside the guest (e.g. `/etc/expected`).
    pub path: String,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Contents.
    pub contents: Vec<u8>,
}

/// The busybox to pack: `$VESSEL_BUSYBOX`, else the first of
/// [`BUSYBOX_PATHS`] that exists.
pub fn find_busybox() -> Result<PathBuf, TestImageError> {
    std::env::var_os("VESSEL_BUSYBOX")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(BUSYBOX_PATHS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(TestImageError::NoBusybox)
}

/// The bytes of the static busybox at `path` and the applets it has
/// (plain names, itself left out); a dynamic one is refused, since nothing
/// in a guest or a container root could load it.
pub fn static_busybox(path: &Path) -> Result<(Vec<u8>, Vec<String>), TestImageError> {
    let bytes = std::fs::read(path).map_err(|source| TestImageError::Read { path: path.to_path_buf(), source })?;
    if elf::check_static_x86_64(&bytes).is_err() {
        return Err(TestImageError::NotStatic(path.to_path_buf()));
    }
    let list = run(Command::new(path).arg("--list")).map_err(TestImageError::Applets)?;
    let applets = String::from_utf8_lossy(&list.stdout)
        .split_whitespace()
        .filter(|a| *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    Ok((bytes, applets))
}

/// The standard `/init` (see the module docs).
pub fn init_script() -> String {
    format!(
        r#"#!/bin/sh
# /init of a vessel tier-3 test image (resources::test_image).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{INIT_MARKER} uptime $(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
    if ! insmod "/lib/modules/$m.ko"; then
        echo "{RESULT_MARKER} fail insmod $m"
        poweroff -f
    fi
done < /etc/vessel/modules
sh /test.sh
rc=$?
[ "$rc" -eq 0 ] || echo "{RESULT_MARKER} fail /test.sh exited with status $rc"
sync
poweroff -f
"#
    )
}

/// Builds the test image in memory: `busybox` and its applet links in
/// `/bin` (`/sbin`, `/usr/bin`, `/usr/sbin` link to it), the `modules` of
/// `kernel` with their dependencies (decompressed) in `/lib/modules` and
/// their load order in `/etc/vessel/modules`, the standard `/init`,
/// `test_script` as `/test.sh`, and `extra` files.
pub fn build_test_image(
    busybox: &Path,
    kernel: &Kernel,
    modules: &[&str],
    test_script: &str,
    extra: &[ExtraFile],
) -> Result<Initramfs, TestImageError> {
    let (bb, applets) = static_busybox(busybox)?;

    let resolved = match (&kernel.modules, modules) {
        (_, []) => modules::Resolved::default(),
        (Some(dir), names) => modules::resolve(dir, names).map_err(TestImageError::Modules)?,
        (None, names) => return Err(TestImageError::NoModulesDir(names.join(", "))),
    };

    let mut img = Initramfs::new();
    let e = TestImageError::Initramfs;
    for d in ["bin", "dev", "etc/vessel", "lib/modules", "mnt", "proc", "root", "run", "sys", "tmp", "usr"] {
        img.dir(d, 0o755).map_err(e)?;
    }
    img.dir("tmp", 0o1777).map_err(e)?;
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    img.char_device("dev/console", 0o600, 5, 1).map_err(e)?;
    img.file("bin/busybox", 0o755, bb).map_err(e)?;
    for applet in &applets {
        img.symlink(&format!("bin/{applet}"), "busybox").map_err(e)?;
    }
    img.symlink("sbin", "bin").map_err(e)?;
    img.symlink("usr/bin", "../bin").map_err(e)?;
    img.symlink("usr/sbin", "../bin").map_err(e)?;

    let mut order = String::new();
    for m in &resolved.load_order {
        let bytes = modules::read_module(&m.path).map_err(TestImageError::Modules)?;
        img.file(&format!("lib/modules/{}.ko", m.name), 0o644, bytes).map_err(e)?;
        order.push_str(&m.name);
        order.push('\n');
    }
    img.file("etc/vessel/modules", 0o644, order).map_err(e)?;
    img.file("init", 0o755, init_script()).map_err(e)?;
    img.file("test.sh", 0o755, test_script).map_err(e)?;
    for f in extra {
        img.file(&f.path, f.mode, f.contents.clone()).map_err(e)?;
    }
    Ok(img)
}

/// Writes `bytes` under `dir` named by their SHA-256, unless that file is
/// already there, and returns its path.
pub fn write_content_addressed(dir: &Path, bytes: &[u8], extension: &str) -> Result<PathBuf, CacheError> {
    let digest = hex(&Sha256::digest(bytes));
    let path = dir.join(format!("{}.{extension}", &digest[..32]));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(path);
    }
    cache::write_atomic(&path, bytes)?;
    Ok(path)
}

/// A test image for `kernel` (see [`build_test_image`]) in the cache
/// directory ([`cache::dir`], under `initramfs/`), with the busybox from
/// [`find_busybox`]. The file is named by its content, so tests running at
/// the same time never write each other's image.
pub fn test_initramfs(
    kernel: &Kernel,
    modules: &[&str],
    test_script: &str,
    extra: &[ExtraFile],
) -> Result<PathBuf, TestImageError> {
    let busybox = find_busybox()?;
    let img = build_test_image(&busybox, kernel, modules, test_script, extra)?;
    let dir = cache::dir().map_err(TestImageError::Cache)?.join("initramfs");
    write_content_addressed(&dir, &img.to_bytes(), "cpio").map_err(TestImageError::Cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_util::TempDir;

    #[test]
    fn init_follows_the_conventions() {
        let init = init_script();
        assert!(init.starts_with("#!/bin/sh\n"));
        for needle in [
            "mount -t devtmpfs devtmpfs /dev",
            "echo \"VESSEL-INIT: uptime",
            "insmod \"/lib/modules/$m.ko\"",
            "VESSEL-TEST-RESULT: fail insmod $m",
            "sh /test.sh",
            "VESSEL-TEST-RESULT: fail /test.sh exited with status $rc",
        ] {
            assert!(init.contains(needle), "{needle:?} missing from\n{init}");
        }
        assert!(init.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn refuses_a_dynamic_busybox_and_missing_modules() {
        let dir = TempDir::new("bb");
        let kernel = Kernel { image: dir.path().join("k"), modules: None, release: None, package: None };
        let dynamic = dir.path().join("busybox");
        std::fs::write(&dynamic, crate::elf::tests::build(&[], true)).unwrap();
        let err = build_test_image(&dynamic, &kernel, &[], "", &[]).unwrap_err();
        assert!(matches!(err, TestImageError::NotStatic(_)), "{err}");
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(matches!(build_test_image(&script, &kernel, &[], "", &[]), Err(TestImageError::NotStatic(_))));
        let err = build_test_image(&dir.path().join("none"), &kernel, &[], "", &[]).unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
    }

    /// With a real static busybox on the host (Debian: busybox-static), the
    /// image has the layout the conventions promise. Without one the test
    /// has nothing to check, and says so.
    #[test]
    fn image_layout_with_the_hosts_busybox() {
        // Fails rather than passing unchecked: scripts/install-deps.sh
        // installs busybox-static.
        let busybox = find_busybox().expect("a static busybox (busybox-static) for the layout check");
        let dir = TempDir::new("img");
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(modules.join("kernel")).unwrap();
        let ko = |deps: &str| crate::elf::tests::build(&[(".modinfo", format!("depends={deps}\0").as_bytes())], false);
        std::fs::write(modules.join("kernel/virtio_ring.ko"), ko("")).unwrap();
        std::fs::write(modules.join("kernel/virtio.ko"), ko("virtio_ring")).unwrap();
        let kernel = Kernel { image: dir.path().join("k"), modules: Some(modules), release: None, package: None };
        let extra = ExtraFile { path: "/etc/expected".into(), mode: 0o600, contents: b"42\n".to_vec() };
        let img = build_test_image(&busybox, &kernel, &["virtio"], "echo hi\n", &[extra]).unwrap();
        for path in [
            "init",
            "test.sh",
            "bin/busybox",
            "bin/sh",
            "bin/insmod",
            "bin/poweroff",
            "sbin",
            "dev/console",
            "lib/modules/virtio_ring.ko",
            "lib/modules/virtio.ko",
            "etc/vessel/modules",
            "etc/expected",
            "proc",
            "sys",
        ] {
            assert!(img.contains(path), "{path} missing");
        }
        let bytes = img.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("etc/vessel/modules\0") && text.contains("virtio_ring\nvirtio\n"));

        let first = write_content_addressed(dir.path(), &bytes, "cpio").unwrap();
        let again = write_content_addressed(dir.path(), &bytes, "cpio").unwrap();
        assert_eq!(first, again);
        assert_eq!(std::fs::read(&first).unwrap(), bytes);
        let other = write_content_addressed(dir.path(), b"other", "cpio").unwrap();
        assert_ne!(first, other);
    }
}
