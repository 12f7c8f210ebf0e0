//! The guest kernel: the distribution's cloud kernel package, or a user's
//! own kernel file.
//!
//! On Debian the metapackage `linux-image-cloud-amd64` depends on one
//! versioned package (`linux-image-<abi>-cloud-amd64`), which holds
//! `/boot/vmlinuz-<release>` and `/lib/modules/<release>/`. The package is
//! fetched with `apt-get download` (no root needed) and unpacked with
//! `dpkg-deb -x` into the cache, one directory per package version:
//!
//! ```text
//! <cache>/kernels/<package>_<version>/vmlinuz
//!                                    /modules/        (lib/modules/<release>)
//!                                    /kernel-release  (what `uname -r` says)
//! <cache>/kernels/<metapackage>.resolved             (which version, and for which apt lists)
//! ```
//!
//! Asking `apt-cache` which version is current takes about a second here,
//! so the answer is kept along with a fingerprint of apt's package lists
//! and sources; while they have not changed, a cached kernel is returned
//! without running any command.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cache::{self, CacheError};
use crate::command::{run, CommandError};

/// Debian's cloud kernel metapackage: virtio drivers as modules, no
/// hardware drivers a VM does not need.
pub const DEBIAN_CLOUD_KERNEL: &str = "linux-image-cloud-amd64";

/// Where apt keeps its package lists.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// Why a kernel could not be found, fetched or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `apt-cache` could not tell what the package is.
    #[error("cannot look up the package {package} (if apt has no package lists yet, run `apt-get update`)")]
    Lookup {
        /// The package asked about.
        package: String,
        /// The failed command.
        #[source]
        source: CommandError,
    },
    /// `apt-cache show` printed no version for the package.
    #[error("apt-cache shows no version of {package}")]
    NoVersion {
        /// The package.
        package: String,
    },
    /// `apt-get download` failed.
    #[error("cannot download the package {package}")]
    Download {
        /// The package and version.
        package: String,
        /// The failed command.
        #[source]
        source: CommandError,
    },
    /// `dpkg-deb -x` failed.
    #[error("cannot unpack {deb}")]
    Unpack {
        /// The package file.
        deb: PathBuf,
        /// The failed command.
        #[source]
        source: CommandError,
    },
    /// The package does not hold what a kernel package holds.
    #[error("the package {package} has no {what}")]
    NotAKernelPackage {
        /// The package.
        package: String,
        /// What was looked for.
        what: &'static str,
    },
    /// A kernel or modules path given by the user does not exist.
    #[error("{what} {path} does not exist")]
    Missing {
        /// "kernel image" or "modules directory".
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A file could not be read or moved.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cache could not be written.
    #[error("cannot write the kernel cache")]
    Cache(#[source] CacheError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io { path: path.to_path_buf(), source }
}

/// A distribution package, by name and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    /// E.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub name: String,
    /// E.g. `6.1.192-2`.
    pub version: String,
}

/// A guest kernel ready to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The kernel image (a bzImage, `vmlinuz`).
    pub image: PathBuf,
    /// Its modules directory (what the guest would call
    /// `/lib/modules/$(uname -r)`), if it has one.
    pub modules: Option<PathBuf>,
    /// Its release string (`uname -r`), if it can be told.
    pub release: Option<String>,
    /// The package it came from, for a distribution kernel.
    pub package: Option<Package>,
}

impl Kernel {
    /// A kernel the user supplies: an image file and, optionally, its
    /// modules directory. The release is read from the bzImage header, or
    /// else taken from the modules directory's name.
    pub fn from_files(image: &Path, modules: Option<&Path>) -> Result<Kernel, KernelError> {
        if !image.is_file() {
            return Err(KernelError::Missing { what: "kernel image", path: image.to_path_buf() });
        }
        if let Some(dir) = modules.filter(|d| !d.is_dir()) {
            return Err(KernelError::Missing { what: "modules directory", path: dir.to_path_buf() });
        }
        let head = read_head(image, 64 * 1024)?;
        let release = bzimage_release(&head)
            .or_else(|| modules.and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()));
        Ok(Kernel { image: image.to_path_buf(), modules: modules.map(Path::to_path_buf), release, package: None })
    }
}

fn read_head(path: &Path, len: u64) -> Result<Vec<u8>, KernelError> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(len).read_to_end(&mut head)).map_err(io_err(path))?;
    Ok(head)
}

/// The release string in a bzImage's setup header (`kernel_version`, the
/// first word of what `file` prints as "version"), or None if `head` (the
/// file's first bytes) is not a bzImage that has one.
pub fn bzimage_release(head: &[u8]) -> Option<String> {
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes(head.get(0x20e..0x210)?.try_into().ok()?);
    if ptr == 0 {
        return None;
    }
    let text = head.get(usize::from(ptr) + 0x200..)?;
    let text = &text[..text.iter().position(|&c| c == 0)?];
    let word = std::str::from_utf8(text).ok()?.split_whitespace().next()?;
    Some(word.to_string())
}

/// The distribution's kernel named by `metapackage` (e.g.
/// [`DEBIAN_CLOUD_KERNEL`], or a versioned `linux-image-*` package), from
/// `cache` (see [`cache::dir`]) or fetched into it. Needs `apt-cache`,
/// `apt-get` and `dpkg-deb`, and apt package lists (`apt-get update`); root
/// is not needed.
pub fn distro_kernel(cache: &Path, metapackage: &str) -> Result<Kernel, KernelError> {
    let kernels = cache.join("kernels");
    let package = resolve_cached(&kernels, metapackage)?;
    let entry = kernels.join(entry_name(&package));
    if let Some(kernel) = load_entry(&entry, &package) {
        return Ok(kernel);
    }
    fetch(&kernels, &entry, &package)?;
    load_entry(&entry, &package).ok_or(KernelError::NotAKernelPackage { package: package.name, what: "vmlinuz" })
}

fn entry_name(p: &Package) -> String {
    format!("{}_{}", p.name, p.version).replace('/', "_")
}

/// The kernel in a cache entry, if the entry is complete.
fn load_entry(entry: &Path, package: &Package) -> Option<Kernel> {
    let image = entry.join("vmlinuz");
    let release = std::fs::read_to_string(entry.join("kernel-release")).ok()?;
    if !image.is_file() {
        return None;
    }
    let modules = Some(entry.join("modules")).filter(|m| m.is_dir());
    Some(Kernel { image, modules, release: Some(release.trim().to_string()), package: Some(package.clone()) })
}

/// Downloads and unpacks `package` into `entry`, atomically: everything is
/// put together in a temp directory, which is then renamed.
fn fetch(kernels: &Path, entry: &Path, package: &Package) -> Result<(), KernelError> {
    std::fs::create_dir_all(kernels).map_err(io_err(kernels))?;
    let tmp = cache::temp_name(kernels, &entry_name(package));
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = fetch_into(&tmp, entry, package);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn fetch_into(tmp: &Path, entry: &Path, package: &Package) -> Result<(), KernelError> {
    let spec = format!("{}={}", package.name, package.version);
    let size = package_size(&spec);
    let watch = crate::progress::DirWatch::start(&format!("vessel: downloading {spec}"), tmp, size);
    let downloaded = run(Command::new("apt-get").args(["download", "-q", &spec]).current_dir(tmp));
    drop(watch);
    downloaded.map_err(|source| KernelError::Download { package: spec.clone(), source })?;
    let deb = std::fs::read_dir(tmp)
        .map_err(io_err(tmp))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or(KernelError::NotAKernelPackage { package: spec.clone(), what: ".deb file after apt-get download" })?;
    let root = tmp.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
        .map_err(|source| KernelError::Unpack { deb: deb.clone(), source })?;

    let (vmlinuz, release) = find_vmlinuz(&root.join("boot"))
        .ok_or(KernelError::NotAKernelPackage { package: spec.clone(), what: "/boot/vmlinuz-*" })?;
    let staged = tmp.join("entry");
    std::fs::create_dir(&staged).map_err(io_err(&staged))?;
    std::fs::rename(&vmlinuz, staged.join("vmlinuz")).map_err(io_err(&vmlinuz))?;
    // Merged-/usr distributions ship modules under /usr/lib.
    for lib in ["lib", "usr/lib"] {
        let modules = root.join(lib).join("modules").join(&release);
        if modules.is_dir() {
            std::fs::rename(&modules, staged.join("modules")).map_err(io_err(&modules))?;
            break;
        }
    }
    let package_file = format!("{}\n{}\n", package.name, package.version);
    std::fs::write(staged.join("package"), package_file).map_err(io_err(&staged))?;
    std::fs::write(staged.join("kernel-release"), format!("{release}\n")).map_err(io_err(&staged))?;
    if let Err(e) = std::fs::rename(&staged, entry) {
        // Another process may have finished the same entry first.
        if load_entry(entry, package).is_none() {
            return Err(io_err(entry)(e));
        }
    }
    Ok(())
}

/// The one `vmlinuz-<release>` in `boot`, and its release.
fn find_vmlinuz(boot: &Path) -> Option<(PathBuf, String)> {
    std::fs::read_dir(boot).ok()?.filter_map(Result::ok).find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let release = name.strip_prefix("vmlinuz-")?.to_string();
        Some((e.path(), release))
    })
}

/// Which package and version `metapackage` means now: from the resolution
/// file if apt's lists are unchanged since it was written, else from
/// `apt-cache` (and the answer is written down).
fn resolve_cached(kernels: &Path, metapackage: &str) -> Result<Package, KernelError> {
    let file = kernels.join(format!("{}.resolved", metapackage.replace('/', "_")));
    let fingerprint = apt_fingerprint();
    if let (Some(fp), Ok(text)) = (&fingerprint, std::fs::read_to_string(&file)) {
        let lines: Vec<&str> = text.lines().collect();
        if let [stored, name, version] = lines[..] {
            if stored == fp {
                return Ok(Package { name: name.to_string(), version: version.to_string() });
            }
        }
    }
    let package = resolve(metapackage)?;
    if let Some(fp) = fingerprint {
        let text = format!("{fp}\n{}\n{}\n", package.name, package.version);
        cache::write_atomic(&file, text.as_bytes()).map_err(KernelError::Cache)?;
    }
    Ok(package)
}

/// A digest of the names, sizes and modification times of apt's package
/// lists and sources, or None if the lists cannot be read.
fn apt_fingerprint() -> Option<String> {
    let mut files = Vec::new();
    let mut list = |dir: &Path, required: bool| -> Option<()> {
        match std::fs::read_dir(dir) {
            Ok(entries) => files.extend(entries.filter_map(|e| e.ok().map(|e| e.path()))),
            Err(_) if !required => {}
            Err(_) => return None,
        }
        Some(())
    };
    list(Path::new(APT_LISTS), true)?;
    list(Path::new("/etc/apt/sources.list.d"), false)?;
    list(Path::new("/etc/apt/preferences.d"), false)?;
    files.push("/etc/apt/sources.list".into());
    files.push("/etc/apt/preferences".into());
    files.sort();
    let mut hash = Sha256::new();
    for f in files {
        let Ok(meta) = std::fs::metadata(&f) else { continue };
        let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        hash.update(format!("{}\0{}\0{}\n", f.display(), meta.len(), mtime.as_nanos()).as_bytes());
    }
    Some(hex(&hash.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which package and version `metapackage` means, asking `apt-cache`: the
/// first `linux-image-*` package it depends on, at the version it pins (or
/// that package's candidate version); a package with no such dependency is
/// taken as the kernel package itself.
pub fn resolve(metapackage: &str) -> Result<Package, KernelError> {
    let show = |package: &str| -> Result<Stanza, KernelError> {
        let out = run(Command::new("apt-cache").args(["show", "--no-all-versions", package]))
            .map_err(|source| KernelError::Lookup { package: package.to_string(), source })?;
        Ok(parse_stanza(&String::from_utf8_lossy(&out.stdout)))
    };
    let meta = show(metapackage)?;
    match meta.kernel_dependency() {
        Some((name, Some(version))) => Ok(Package { name, version }),
        Some((name, None)) => {
            let version = show(&name)?.version.ok_or(KernelError::NoVersion { package: name.clone() })?;
            Ok(Package { name, version })
        }
        None => {
            let version = meta.version.ok_or(KernelError::NoVersion { package: metapackage.to_string() })?;
            Ok(Package { name: metapackage.to_string(), version })
        }
    }
}

/// The download size of `name=version` from `apt-cache show`, for the
/// progress bar (None if apt does not say).
fn package_size(spec: &str) -> Option<u64> {
    let out = run(Command::new("apt-cache").args(["show", "--no-all-versions", spec])).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("Size:")).and_then(|v| v.trim().parse().ok())
}

/// The fields of one `apt-cache show` stanza that matter here.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stanza {
    version: Option<String>,
    /// (name, pinned version) of each dependency, first alternative only.
    depends: Vec<(String, Option<String>)>,
}

impl Stanza {
    fn kernel_dependency(&self) -> Option<(String, Option<String>)> {
        self.depends.iter().find(|(name, _)| name.starts_with("linux-image-")).cloned()
    }
}

fn parse_stanza(text: &str) -> Stanza {
    let mut s = Stanza::default();
    for line in text.lines().take_while(|l| !l.trim().is_empty()) {
        if let Some(v) = line.strip_prefix("Version:") {
            s.version = Some(v.trim().to_string());
        } else if let Some(deps) = line.strip_prefix("Depends:") {
            for dep in deps.split(',') {
                let first = dep.split('|').next().unwrap_or("").trim();
                let (name, constraint) = match first.split_once('(') {
                    Some((n, c)) => (n.trim(), Some(c.trim_end_matches(')').trim())),
                    None => (first, None),
                };
                let pinned = constraint.and_then(|c| c.strip_prefix('=')).map(|v| v.trim().to_string());
                let name = name.split(':').next().unwrap_or(name); // drop an architecture qualifier
                if !name.is_empty() {
                    s.depends.push((name.to_string(), pinned));
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_util::TempDir;

    #[test]
    fn parses_apt_cache_show() {
        let text = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n\n\
                    Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\n";
        let s = parse_stanza(text);
        assert_eq!(s.version.as_deref(), Some("6.1.192-2"));
        assert_eq!(
            s.kernel_dependency(),
            Some(("linux-image-6.1.0-56-cloud-amd64".to_string(), Some("6.1.192-2".to_string())))
        );
        let s =
            parse_stanza("Version: 1\nDepends: kmod, linux-base (>= 4.3~), initramfs-tools | linux-initramfs-tool\n");
        assert_eq!(s.kernel_dependency(), None);
        assert_eq!(s.depends[1], ("linux-base".to_string(), None));
        assert_eq!(s.depends[2], ("initramfs-tools".to_string(), None));
        let s = parse_stanza("Depends: linux-image-6.12.1-cloud-amd64:amd64\n");
        assert_eq!(s.kernel_dependency(), Some(("linux-image-6.12.1-cloud-amd64".to_string(), None)));
    }

    fn fake_bzimage(release_text: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        b[0x500..0x500 + release_text.len()].copy_from_slice(release_text);
        b
    }

    #[test]
    fn reads_the_release_from_a_bzimage_header() {
        let b = fake_bzimage(b"6.1.0-56-cloud-amd64 (debian-kernel@lists) #1 SMP\0");
        assert_eq!(bzimage_release(&b).as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(bzimage_release(&b[..0x400]), None);
        assert_eq!(bzimage_release(&vec![0u8; 0x1000]), None);
        assert_eq!(bzimage_release(&fake_bzimage(b"no terminator")[..0x50d]), None);
    }

    #[test]
    fn user_kernel_files() {
        let dir = TempDir::new("kernel");
        let image = dir.path().join("vmlinuz");
        std::fs::write(&image, fake_bzimage(b"6.9.0-test #1\0")).unwrap();
        let modules = dir.path().join("6.9.0-mods");
        std::fs::create_dir(&modules).unwrap();
        let k = Kernel::from_files(&image, Some(&modules)).unwrap();
        assert_eq!(k.release.as_deref(), Some("6.9.0-test"));
        assert_eq!(k.modules.as_deref(), Some(modules.as_path()));
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF").unwrap();
        assert_eq!(Kernel::from_files(&elf, Some(&modules)).unwrap().release.as_deref(), Some("6.9.0-mods"));
        assert_eq!(Kernel::from_files(&elf, None).unwrap().release, None);
        let err = Kernel::from_files(&dir.path().join("nope"), None).unwrap_err();
        assert!(err.to_string().starts_with("kernel image ") && err.to_string().ends_with("nope does not exist"));
        let err = Kernel::from_files(&image, Some(&dir.path().join("nomods"))).unwrap_err();
        assert!(err.to_string().starts_with("modules directory "), "{err}");
    }

    #[test]
    fn cache_entries_are_complete_or_ignored() {
        let dir = TempDir::new("entry");
        let p = Package { name: "linux-image-x".into(), version: "1:2.3-4".into() };
        let entry = dir.path().join(entry_name(&p));
        assert_eq!(load_entry(&entry, &p), None);
        std::fs::create_dir_all(entry.join("modules")).unwrap();
        std::fs::write(entry.join("vmlinuz"), b"k").unwrap();
        assert_eq!(load_entry(&entry, &p), None, "no kernel-release file: unfinished");
        std::fs::write(entry.join("kernel-release"), "6.1.0-x\n").unwrap();
        let k = load_entry(&entry, &p).unwrap();
        assert_eq!(k.release.as_deref(), Some("6.1.0-x"));
        assert_eq!(k.modules, Some(entry.join("modules")));
        assert_eq!(k.package, Some(p));
    }

    #[test]
    fn finds_vmlinuz() {
        let dir = TempDir::new("boot");
        std::fs::write(dir.path().join("config-6.1.0-9"), b"").unwrap();
        std::fs::write(dir.path().join("vmlinuz-6.1.0-9"), b"").unwrap();
        assert_eq!(find_vmlinuz(dir.path()), Some((dir.path().join("vmlinuz-6.1.0-9"), "6.1.0-9".to_string())));
        assert_eq!(find_vmlinuz(&dir.path().join("none")), None);
    }
}
