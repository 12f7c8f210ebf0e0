//! Kernel modules a guest needs, with their dependencies, in load order.
//!
//! Dependencies come from `modules.dep` when the modules directory has one
//! (it is written by `depmod` at install time), else from the `depends=`
//! field in each module's `.modinfo` section, which is what `depmod` reads
//! (a package unpacked without installing has no `modules.dep`: Debian's
//! kernel packages do not ship one). Drivers listed in `modules.builtin`
//! are part of the kernel image and are skipped. Compressed modules
//! (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed with the host's tool so
//! that a plain `insmod` (busybox) can load them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{run, CommandError};
use crate::elf;

/// Why modules could not be resolved or read.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The modules directory could not be listed.
    #[error("cannot read the modules directory {path}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No module file of these names, and they are not built in.
    #[error("{} neither in {dir} nor built into the kernel", module_list(names))]
    NotFound {
        /// The module names, each once, in the order they were met.
        names: Vec<String>,
        /// The modules directory.
        dir: PathBuf,
    },
    /// Modules that depend on each other in a circle.
    #[error("modules depend on each other in a cycle: {0}")]
    Cycle(String),
    /// A module file could not be read.
    #[error("cannot read the module {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A compressed module could not be decompressed.
    #[error("cannot decompress the module {path}")]
    Decompress {
        /// The file.
        path: PathBuf,
        /// The failed command.
        #[source]
        source: CommandError,
    },
    /// A module file that is not a kernel module.
    #[error("{0} is not a kernel module (no .modinfo section)")]
    NotAModule(PathBuf),
}

/// "module a is" or "modules a, b are", for messages.
fn module_list(names: &[String]) -> String {
    match names {
        [one] => format!("module {one} is"),
        many => format!("modules {} are", many.join(", ")),
    }
}

/// A module file to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Its name, with `_` for `-` (`virtio_rng` for `virtio-rng.ko`).
    pub name: String,
    /// Its file, possibly compressed (see [`read_module`]).
    pub path: PathBuf,
}

/// The modules to load for a set of drivers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Files to `insmod`, dependencies first.
    pub load_order: Vec<Module>,
    /// Names asked for (or needed) that are built into the kernel.
    pub builtin: Vec<String>,
}

/// A module's canonical name: the kernel treats `-` and `_` alike.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name (`virtio-rng.ko.xz` -> `virtio_rng`),
/// or None if it is not a module file.
fn module_name(file: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file.strip_suffix(ext)).map(canonical)
}

/// `names` and everything they depend on, from the modules directory
/// `dir` (the guest's `/lib/modules/$(uname -r)`), in an order `insmod`
/// can follow: each module after all of its dependencies, otherwise in the
/// order asked. If some are neither there nor built in, the error names
/// all of them.
pub fn resolve(dir: &Path, names: &[&str]) -> Result<Resolved, ModuleError> {
    let index = Index::open(dir)?;
    let mut walk = DepWalk::default();
    for name in names {
        index.visit(&canonical(name), &mut walk)?;
    }
    if !walk.missing.is_empty() {
        return Err(ModuleError::NotFound { names: walk.missing, dir: dir.to_path_buf() });
    }
    Ok(walk.out)
}

/// Where a dependency walk stands.
#[derive(Default)]
struct DepWalk {
    /// Modules placed (or found built in, or missing): not visited again.
    done: HashSet<String>,
    /// The chain of modules being visited, to report a cycle.
    path: Vec<String>,
    /// Names neither in the directory nor built in.
    missing: Vec<String>,
    out: Resolved,
}

/// What a modules directory holds: files by name, built-in names, and the
/// dependencies from `modules.dep` if present.
struct Index {
    files: BTreeMap<String, PathBuf>,
    builtin: HashSet<String>,
    dep: Option<HashMap<String, Vec<String>>>,
}

impl Index {
    fn open(dir: &Path) -> Result<Self, ModuleError> {
        let mut files = BTreeMap::new();
        walk(dir, &mut files)?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .map(|t| t.lines().filter_map(|l| module_name(l.rsplit('/').next()?)).collect())
            .unwrap_or_default();
        let dep = std::fs::read_to_string(dir.join("modules.dep")).ok().map(|text| {
            let mut dep = HashMap::new();
            for line in text.lines() {
                let Some((module, deps)) = line.split_once(':') else { continue };
                let name_of = |p: &str| p.rsplit('/').next().and_then(module_name);
                if let Some(name) = name_of(module.trim()) {
                    dep.insert(name, deps.split_whitespace().filter_map(name_of).collect());
                }
            }
            dep
        });
        Ok(Self { files, builtin, dep })
    }

    fn depends(&self, name: &str, path: &Path) -> Result<Vec<String>, ModuleError> {
        if let Some(deps) = self.dep.as_ref().and_then(|d| d.get(name)) {
            return Ok(deps.clone());
        }
        let bytes = read_module(path)?;
        let info = elf::section(&bytes, ".modinfo").ok_or_else(|| ModuleError::NotAModule(path.to_path_buf()))?;
        Ok(modinfo_depends(info))
    }

    fn visit(&self, name: &str, walk: &mut DepWalk) -> Result<(), ModuleError> {
        if walk.done.contains(name) {
            return Ok(());
        }
        if walk.path.iter().any(|p| p == name) {
            walk.path.push(name.to_string());
            return Err(ModuleError::Cycle(walk.path.join(" -> ")));
        }
        let Some(file) = self.files.get(name) else {
            walk.done.insert(name.to_string());
            if self.builtin.contains(name) {
                walk.out.builtin.push(name.to_string());
            } else {
                walk.missing.push(name.to_string());
            }
            return Ok(());
        };
        walk.path.push(name.to_string());
        for dep in self.depends(name, file)? {
            self.visit(&dep, walk)?;
        }
        walk.path.pop();
        walk.done.insert(name.to_string());
        walk.out.load_order.push(Module { name: name.to_string(), path: file.clone() });
        Ok(())
    }
}

/// Every module file under `dir`, by name. Where two files have the same
/// name, the first in path order is kept.
fn walk(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<(), ModuleError> {
    let read_err = |source| ModuleError::ReadDir { path: dir.to_path_buf(), source };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(read_err)?.collect::<Result<_, _>>().map_err(read_err)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(read_err)?;
        if kind.is_dir() {
            walk(&path, files)?;
        } else if let Some(name) = module_name(&entry.file_name().to_string_lossy()) {
            files.entry(name).or_insert(path);
        }
    }
    Ok(())
}

/// The `depends=` list of a `.modinfo` section (NUL-separated `key=value`).
fn modinfo_depends(info: &[u8]) -> Vec<String> {
    info.split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|v| String::from_utf8_lossy(v).split(',').map(str::trim).map(canonical).collect::<Vec<_>>())
        .filter(|d| !d.is_empty())
        .collect()
}

/// The module file's contents, decompressed if it is `.ko.xz`, `.ko.zst` or
/// `.ko.gz` (with the host's `xz`, `zstd` or `gzip`).
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return std::fs::read(path).map_err(|source| ModuleError::Read { path: path.to_path_buf(), source });
    };
    let out = run(Command::new(tool).arg("-dc").arg(path))
        .map_err(|source| ModuleError::Decompress { path: path.to_path_buf(), source })?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_util::TempDir;
    use crate::elf::tests::build as build_elf;

    fn module(deps: &str) -> Vec<u8> {
        let info = format!("license=GPL\0depends={deps}\0name=x\0");
        build_elf(&[(".text", b"\x90"), (".modinfo", info.as_bytes())], false)
    }

    /// A modules tree shaped like Debian's cloud kernel's virtio corner.
    fn tree(dir: &Path) {
        let put = |rel: &str, bytes: Vec<u8>| {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        };
        put("kernel/drivers/virtio/virtio_ring.ko", module(""));
        put("kernel/drivers/virtio/virtio.ko", module("virtio_ring"));
        put("kernel/drivers/virtio/virtio_mmio.ko", module("virtio,virtio_ring"));
        put("kernel/drivers/block/virtio_blk.ko", module("virtio,virtio_ring"));
        put("kernel/drivers/char/hw_random/virtio-rng.ko", module("virtio,virtio_ring,rng-core"));
        put("kernel/net/vmw_vsock/vsock.ko", module(""));
        put("kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko", module("vsock,virtio_ring,virtio"));
        put(
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            module("virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock"),
        );
        put("kernel/lib/loop_a.ko", module("loop_b"));
        put("kernel/lib/loop_b.ko", module("loop_a"));
        put("kernel/lib/notamodule.ko", b"plain text".to_vec());
        put("kernel/drivers/README", b"not a module".to_vec());
        put("modules.builtin", b"kernel/drivers/char/hw_random/rng-core.ko\nkernel/fs/ext4/ext4.ko\n".to_vec());
    }

    fn names(r: &Resolved) -> Vec<&str> {
        r.load_order.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_first_builtins_skipped() {
        let dir = TempDir::new("mods");
        tree(dir.path());
        let r = resolve(
            dir.path(),
            &["virtio_mmio", "virtio_blk", "vmw_vsock_virtio_transport", "virtio-rng", "ext4", "virtio_blk"],
        )
        .unwrap();
        assert_eq!(
            names(&r),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_rng"
            ]
        );
        assert_eq!(r.builtin, ["rng_core", "ext4"]);
        assert!(r.load_order[7].path.ends_with("hw_random/virtio-rng.ko"));
    }

    #[test]
    fn modules_dep_wins_over_modinfo() {
        let dir = TempDir::new("dep");
        tree(dir.path());
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko\n",
        )
        .unwrap();
        let r = resolve(dir.path(), &["virtio_blk"]).unwrap();
        assert_eq!(names(&r), ["virtio_ring", "virtio", "vsock", "virtio_blk"]);
    }

    #[test]
    fn clear_errors() {
        let dir = TempDir::new("errs");
        tree(dir.path());
        let err = resolve(dir.path(), &["nope"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("module nope is neither in {} nor built into the kernel", dir.path().display())
        );
        let err = resolve(dir.path(), &["virtio_blk", "nope", "virtio", "gone", "nope"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("modules nope, gone are neither in {} nor built into the kernel", dir.path().display())
        );
        let err = resolve(dir.path(), &["loop_a"]).unwrap_err();
        assert_eq!(err.to_string(), "modules depend on each other in a cycle: loop_a -> loop_b -> loop_a");
        let err = resolve(dir.path(), &["notamodule"]).unwrap_err();
        assert!(err.to_string().ends_with("notamodule.ko is not a kernel module (no .modinfo section)"), "{err}");
        let err = resolve(&dir.path().join("missing"), &["virtio"]).unwrap_err();
        assert!(err.to_string().starts_with("cannot read the modules directory"), "{err}");
    }

    #[test]
    fn compressed_modules_are_decompressed() {
        let dir = TempDir::new("xz");
        let plain = dir.path().join("m.ko");
        std::fs::write(&plain, module("virtio")).unwrap();
        assert_eq!(read_module(&plain).unwrap(), module("virtio"));
        let bad = dir.path().join("bad.ko.xz");
        std::fs::write(&bad, b"not xz").unwrap();
        // Whether or not xz is installed, a broken file is an error naming it.
        let err = read_module(&bad).unwrap_err();
        assert!(err.to_string().ends_with("bad.ko.xz"), "{err}");
        // A .ko.gz made here, read back through the host's gzip (essential
        // on Debian: a host without it cannot read such modules at all).
        let gz = dir.path().join("m.ko.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, &module("virtio")).unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        assert_eq!(read_module(&gz).unwrap(), module("virtio"));
        assert_eq!(module_name("virtio-rng.ko.gz").as_deref(), Some("virtio_rng"));
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(module_name("a.ko.zst").as_deref(), Some("a"));
        assert_eq!(module_name("modules.dep"), None);
        assert_eq!(modinfo_depends(b"depends=\0name=x\0"), Vec::<String>::new());
        assert_eq!(modinfo_depends(b"alias=x\0depends=a-b,c\0"), ["a_b", "c"]);
    }
}
