//! The sandbox guest's boot files: a kernel, and an initramfs holding the
//! vessel agent as `/init` and the kernel modules the agent needs. Nothing
//! else goes into the image: no shell, no busybox.
//!
//! ```text
//! /init                              the agent: a static x86_64 executable, mode 0755
//! /dev/console                       character device 5:1, the kernel's stdout for init
//! /dev /etc /mnt /proc /run /sys     empty, mode 0755
//! /tmp                               empty, mode 1777
//! /lib/modules/vessel/<name>.ko      each module, uncompressed
//! /lib/modules/vessel/modules.load   which of them to load, in order
//! ```
//!
//! `modules.load` ([`MODULES_LOAD`]) is a contract with the agent, which
//! reads it at start: UTF-8 text, one file name per line, each line ended
//! by `\n`. A name is `<module>.ko` with `_` for `-` (`virtio_rng.ko`), and
//! names a file in [`MODULES_DIR`]; it never holds a `/`. Lines are in load
//! order: every module comes after the modules it depends on. The agent
//! loads each file with `finit_module(2)`, in order, with no parameters.
//! The file is always there; it is empty when the kernel has every driver
//! built in.
//!
//! The modules are [`AGENT_MODULES`] and their dependencies; those built
//! into the kernel are left out. A kernel without a modules directory is
//! refused, since nothing would tell which of the drivers it has built in.
//!
//! The same agent and kernel modules always give the same bytes.
//! [`write_guest_image`] writes the two boot files to a directory
//! atomically, and leaves a file that already holds the same bytes alone.

use std::path::{Path, PathBuf};

use crate::cache::{self, CacheError};
use crate::elf;
use crate::initramfs::{Initramfs, InitramfsError};
use crate::kernel::Kernel;
use crate::modules::{self, ModuleError, Resolved};

/// Where the agent is in the image.
pub const INIT: &str = "/init";
/// The directory of the image's kernel modules.
pub const MODULES_DIR: &str = "/lib/modules/vessel";
/// The list of modules to load, in order (see the module docs).
pub const MODULES_LOAD: &str = "/lib/modules/vessel/modules.load";

/// The drivers the agent needs: the virtio-mmio transport, disks, network,
/// entropy, vsock to the host, ext4 for container root filesystems, and
/// virtio-fs for the sandbox's shared directory. Debian's cloud kernel has
/// ext4 built in and the rest as modules (virtiofs needs fuse).
pub const AGENT_MODULES: [&str; 7] =
    ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "vmw_vsock_virtio_transport", "ext4", "virtiofs"];

/// The kernel's file name in an output directory.
pub const KERNEL_FILE: &str = "kernel";
/// The initramfs's file name in an output directory.
pub const INITRD_FILE: &str = "initrd.img";

/// Why a guest image could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    /// The agent binary could not be read.
    #[error("cannot read the agent {path}")]
    ReadAgent {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent cannot run as `/init`.
    #[error("the agent {path} is not a static x86_64 executable: {why}")]
    NotStatic {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The kernel has no modules directory, so the drivers cannot be
    /// loaded or known to be built in.
    #[error(
        "the kernel {kernel} comes without a modules directory, so {modules} cannot be loaded or known to be \
         built in: give its modules directory (one holding only modules.builtin will do if all are built in)"
    )]
    NoModulesDir {
        /// The kernel image.
        kernel: PathBuf,
        /// The drivers needed, comma-separated.
        modules: String,
    },
    /// A module could not be resolved or read.
    #[error("cannot collect the kernel modules the agent needs")]
    Modules(#[source] ModuleError),
    /// An entry could not be added to the image.
    #[error("cannot assemble the initramfs")]
    Initramfs(#[source] InitramfsError),
    /// The kernel image could not be read.
    #[error("cannot read the kernel image {path}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cache or the output directory could not be written.
    #[error("cannot write the guest image")]
    Write(#[source] CacheError),
}

/// The agent binary at `path`, checked to be a static x86_64 executable
/// (the image has no dynamic loader and no C library).
pub fn read_agent(path: &Path) -> Result<Vec<u8>, GuestImageError> {
    let bytes =
        std::fs::read(path).map_err(|source| GuestImageError::ReadAgent { path: path.to_path_buf(), source })?;
    elf::check_static_x86_64(&bytes).map_err(|why| GuestImageError::NotStatic { path: path.to_path_buf(), why })?;
    Ok(bytes)
}

/// [`AGENT_MODULES`] and their dependencies in `kernel`'s modules
/// directory, in load order, built-in ones left out.
pub fn agent_modules(kernel: &Kernel) -> Result<Resolved, GuestImageError> {
    let Some(dir) = &kernel.modules else {
        return Err(GuestImageError::NoModulesDir { kernel: kernel.image.clone(), modules: AGENT_MODULES.join(", ") });
    };
    modules::resolve(dir, &AGENT_MODULES).map_err(GuestImageError::Modules)
}

/// A module's file name in [`MODULES_DIR`].
fn module_file(name: &str) -> String {
    format!("{name}.ko")
}

/// The contents of [`MODULES_LOAD`] for `modules`.
pub fn modules_load(modules: &Resolved) -> String {
    modules.load_order.iter().map(|m| module_file(&m.name) + "\n").collect()
}

/// The initramfs (see the module docs) with `agent` as `/init` and the
/// `modules` files, read and decompressed.
pub fn build_agent_initramfs(agent: Vec<u8>, modules: &Resolved) -> Result<Initramfs, GuestImageError> {
    let mut img = Initramfs::new();
    let e = GuestImageError::Initramfs;
    for d in ["dev", "etc", "mnt", "proc", "run", "sys", MODULES_DIR] {
        img.dir(d, 0o755).map_err(e)?;
    }
    img.dir("tmp", 0o1777).map_err(e)?;
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    img.char_device("dev/console", 0o600, 5, 1).map_err(e)?;
    img.file(INIT, 0o755, agent).map_err(e)?;
    for m in &modules.load_order {
        let bytes = modules::read_module(&m.path).map_err(GuestImageError::Modules)?;
        img.file(&format!("{MODULES_DIR}/{}", module_file(&m.name)), 0o644, bytes).map_err(e)?;
    }
    img.file(MODULES_LOAD, 0o644, modules_load(modules)).map_err(e)?;
    Ok(img)
}

/// The two boot files in an output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// `<dir>/kernel`: a copy of the kernel image.
    pub kernel: PathBuf,
    /// `<dir>/initrd.img`: the initramfs.
    pub initrd: PathBuf,
}

/// Writes `kernel_image` (copied) and `initrd` to `out` (created if
/// missing) as [`KERNEL_FILE`] and [`INITRD_FILE`], each atomically: a
/// reader sees the old file or the whole new one. A file that already holds
/// the same bytes is not written again.
pub fn write_guest_image(out: &Path, kernel_image: &Path, initrd: &[u8]) -> Result<GuestImage, GuestImageError> {
    let kernel = std::fs::read(kernel_image)
        .map_err(|source| GuestImageError::ReadKernel { path: kernel_image.to_path_buf(), source })?;
    let image = GuestImage { kernel: out.join(KERNEL_FILE), initrd: out.join(INITRD_FILE) };
    write_if_changed(&image.kernel, &kernel).map_err(GuestImageError::Write)?;
    write_if_changed(&image.initrd, initrd).map_err(GuestImageError::Write)?;
    Ok(image)
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let same_size = std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64);
    if same_size && std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    cache::write_atomic(path, bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::cache::test_util::TempDir;
    use crate::elf::tests::build as build_elf;
    use crate::initramfs::tests::{read_newc, ReadEntry};

    fn module(deps: &str) -> Vec<u8> {
        build_elf(&[(".modinfo", format!("license=GPL\0depends={deps}\0").as_bytes())], false)
    }

    /// A modules directory with the agent's drivers, shaped like Debian's
    /// cloud kernel (ext4 and rng-core built in).
    fn fake_modules(dir: &Path) {
        let put = |rel: &str, deps: &str| {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, module(deps)).unwrap();
        };
        put("kernel/drivers/virtio/virtio_ring.ko", "");
        put("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        put("kernel/drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring");
        put("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring");
        put("kernel/net/core/failover.ko", "");
        put("kernel/drivers/net/net_failover.ko", "failover");
        put("kernel/drivers/net/virtio_net.ko", "net_failover,virtio,virtio_ring");
        put("kernel/drivers/char/hw_random/virtio-rng.ko", "virtio,virtio_ring,rng-core");
        put("kernel/net/vmw_vsock/vsock.ko", "");
        put("kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko", "vsock,virtio,virtio_ring");
        put(
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
        );
        put("kernel/fs/fuse/fuse.ko", "");
        put("kernel/fs/fuse/virtiofs.ko", "fuse,virtio,virtio_ring");
        put("kernel/drivers/virtio/virtio_balloon.ko", "virtio,virtio_ring");
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\nkernel/drivers/char/hw_random/rng-core.ko\n",
        )
        .unwrap();
    }

    fn fake_kernel(dir: &TempDir) -> Kernel {
        let modules = dir.path().join("modules");
        fake_modules(&modules);
        Kernel { image: dir.path().join("vmlinuz"), modules: Some(modules), release: None, package: None }
    }

    fn entry<'a>(entries: &'a [ReadEntry], name: &str) -> &'a ReadEntry {
        entries.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("{name} missing"))
    }

    /// Checks the image's `modules.load` against the contract: each line a
    /// module file in the image, each after the ones its `.modinfo` names.
    fn check_modules_load(entries: &[ReadEntry]) -> Vec<String> {
        let load = String::from_utf8(entry(entries, &MODULES_LOAD[1..]).data.clone()).unwrap();
        assert!(load.is_empty() || load.ends_with('\n'), "{load:?}");
        let files: Vec<String> = load.lines().map(str::to_string).collect();
        for (i, file) in files.iter().enumerate() {
            assert!(file.ends_with(".ko") && !file.contains('/'), "{file:?}");
            let ko = entry(entries, &format!("{}/{file}", &MODULES_DIR[1..]));
            let info = elf::section(&ko.data, ".modinfo").expect("an uncompressed module");
            let depends = info.split(|&b| b == 0).find_map(|f| f.strip_prefix(b"depends=")).unwrap_or_default();
            for dep in String::from_utf8_lossy(depends).split(',').filter(|d| !d.is_empty()) {
                let dep_file = module_file(&modules::canonical(dep));
                if let Some(at) = files.iter().position(|f| *f == dep_file) {
                    assert!(at < i, "{file} is loaded before its dependency {dep_file}: {files:?}");
                }
            }
        }
        let ko_count = entries.iter().filter(|e| e.name.ends_with(".ko")).count();
        assert_eq!(ko_count, files.len(), "a module in the image that modules.load does not list");
        files
    }

    #[test]
    fn the_agent_is_init_and_modules_load_follows_the_contract() {
        let dir = TempDir::new("guest");
        let agent_path = dir.path().join("agent");
        let agent = build_elf(&[(".text", b"\x90\x90")], false);
        std::fs::write(&agent_path, &agent).unwrap();
        let kernel = fake_kernel(&dir);

        let modules = agent_modules(&kernel).unwrap();
        assert_eq!(modules.builtin, ["rng_core", "ext4"]);
        let img = build_agent_initramfs(read_agent(&agent_path).unwrap(), &modules).unwrap();
        let bytes = img.to_bytes();
        let entries = read_newc(&bytes);

        let init = entry(&entries, "init");
        assert_eq!((init.mode, &init.data), (0o100_755, &agent));
        assert_eq!((entry(&entries, "dev/console").mode, entry(&entries, "dev/console").rdev), (0o020_600, (5, 1)));
        assert_eq!(entry(&entries, "tmp").mode, 0o041_777);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).filter(|n| !n.ends_with(".ko")).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/vessel",
                "lib/modules/vessel/modules.load",
                "mnt",
                "proc",
                "run",
                "sys",
                "tmp"
            ]
        );

        let files = check_modules_load(&entries);
        assert_eq!(
            files,
            [
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_mmio.ko",
                "virtio_blk.ko",
                "failover.ko",
                "net_failover.ko",
                "virtio_net.ko",
                "virtio_rng.ko",
                "vsock.ko",
                "vmw_vsock_virtio_transport_common.ko",
                "vmw_vsock_virtio_transport.ko",
                "fuse.ko",
                "virtiofs.ko",
            ]
        );

        // Same inputs, same bytes.
        let again = build_agent_initramfs(read_agent(&agent_path).unwrap(), &agent_modules(&kernel).unwrap()).unwrap();
        assert_eq!(again.to_bytes(), bytes);
    }

    #[test]
    fn a_dynamic_or_foreign_agent_is_refused_by_name() {
        let dir = TempDir::new("agent");
        let dynamic = dir.path().join("dynamic-agent");
        std::fs::write(&dynamic, build_elf(&[], true)).unwrap();
        let err = read_agent(&dynamic).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the agent {} is not a static x86_64 executable: it is dynamically linked (it asks for a program \
                 interpreter)",
                dynamic.display()
            )
        );
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let err = read_agent(&script).unwrap_err().to_string();
        assert!(err.contains("script is not a static x86_64 executable: it is not a 64-bit"), "{err}");
        let err = read_agent(&dir.path().join("none")).unwrap_err().to_string();
        assert!(err.starts_with("cannot read the agent ") && err.ends_with("none"), "{err}");
    }

    #[test]
    fn missing_modules_are_named() {
        let dir = TempDir::new("nomods");
        let image = dir.path().join("bzImage");
        let kernel = Kernel { image: image.clone(), modules: None, release: None, package: None };
        let err = agent_modules(&kernel).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "the kernel {} comes without a modules directory, so virtio_mmio, ",
                image.display()
            )),
            "{err}"
        );
        assert!(err.contains("vmw_vsock_virtio_transport, ext4, virtiofs cannot be loaded"), "{err}");

        // A modules directory that has some of them, and nothing built in.
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(&modules).unwrap();
        std::fs::write(modules.join("virtio_ring.ko"), module("")).unwrap();
        std::fs::write(modules.join("virtio.ko"), module("virtio_ring")).unwrap();
        std::fs::write(modules.join("virtio_mmio.ko"), module("virtio")).unwrap();
        let kernel = Kernel { modules: Some(modules.clone()), ..kernel };
        let err = agent_modules(&kernel).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert_eq!(
            chain,
            format!(
                "cannot collect the kernel modules the agent needs: modules virtio_blk, virtio_net, virtio_rng, \
                 vmw_vsock_virtio_transport, ext4, virtiofs are neither in {} nor built into the kernel",
                modules.display()
            )
        );
        // All built in: nothing to load, and modules.load is there, empty.
        for f in ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko"] {
            std::fs::remove_file(modules.join(f)).unwrap();
        }
        std::fs::write(modules.join("modules.builtin"), AGENT_MODULES.map(|m| format!("kernel/{m}.ko\n")).concat())
            .unwrap();
        let resolved = agent_modules(&kernel).unwrap();
        assert!(resolved.load_order.is_empty());
        let img = build_agent_initramfs(build_elf(&[], false), &resolved).unwrap();
        assert_eq!(check_modules_load(&read_newc(&img.to_bytes())), Vec::<String>::new());
    }

    #[test]
    fn outputs_are_written_whole_and_only_when_changed() {
        let dir = TempDir::new("out");
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"kernel bytes").unwrap();
        let out = dir.path().join("out");
        let image = write_guest_image(&out, &kernel, b"initrd one").unwrap();
        assert_eq!((image.kernel.clone(), image.initrd.clone()), (out.join("kernel"), out.join("initrd.img")));
        assert_eq!(std::fs::read(&image.kernel).unwrap(), b"kernel bytes");
        assert_eq!(std::fs::read(&image.initrd).unwrap(), b"initrd one");
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let (kernel_ino, initrd_ino) = (ino(&image.kernel), ino(&image.initrd));

        write_guest_image(&out, &kernel, b"initrd one").unwrap();
        assert_eq!((ino(&image.kernel), ino(&image.initrd)), (kernel_ino, initrd_ino), "unchanged files rewritten");
        write_guest_image(&out, &kernel, b"initrd two").unwrap();
        assert_eq!(std::fs::read(&image.initrd).unwrap(), b"initrd two");
        assert_ne!(ino(&image.initrd), initrd_ino);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2, "temp files left behind");

        let err = write_guest_image(&out, &dir.path().join("none"), b"x").unwrap_err().to_string();
        assert!(err.starts_with("cannot read the kernel image "), "{err}");
    }
}
