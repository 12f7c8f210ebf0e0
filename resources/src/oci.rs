//! Unpacking an OCI image layout (what `skopeo copy ... oci:DIR` or `umoci`
//! write) into a directory: index, manifest, then each layer in order,
//! honouring whiteouts. Everything in the layout is untrusted: digests are
//! checked against the blobs, blob names must be plain hex, no layer
//! entry may land outside the destination, and what the layers expand to
//! is capped ([`Limits`]).
//!
//! The unpacked tree is scratch space: it holds the files as whoever
//! unpacks them, without setuid, setgid or sticky bits, each readable and
//! writable by its owner, under a 0700 directory. The owners and modes the
//! layers ask for are collected in an [`Ownership`] and written into the
//! ext4 image ([`build_image`]).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::ops::Bound;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::rootfs::{Owner, Ownership, RootfsError};

/// Caps on what an image may expand to, so that a small layer (a gzip
/// bomb, a million empty files) cannot fill the disk it is unpacked on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of tar stream and of file contents, each summed over layers.
    pub max_bytes: u64,
    /// Layer entries, summed over layers.
    pub max_entries: u64,
}

impl Default for Limits {
    /// 16 GiB and a million entries: well above real container images.
    fn default() -> Self {
        Limits { max_bytes: 16 << 30, max_entries: 1 << 20 }
    }
}

/// Why a layout could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A file of the layout could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// A JSON document is malformed or lacks a field.
    #[error("{0}: {1}")]
    Json(PathBuf, String),
    /// A digest is not `sha256:` and 64 hex digits.
    #[error("unsupported or malformed digest {0:?}")]
    Digest(String),
    /// A blob's content does not match its digest.
    #[error("blob {0} does not match its digest")]
    Corrupt(String),
    /// A layer of a type we cannot unpack.
    #[error("layer {digest} has media type {media_type:?}; only tar and tar+gzip layers are supported")]
    LayerType {
        /// The layer.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A layer entry that would land outside the destination.
    #[error("layer {digest}: entry {path:?} escapes the root filesystem")]
    Escape {
        /// The layer.
        digest: String,
        /// The entry.
        path: String,
    },
    /// Unpacking failed.
    #[error("cannot unpack layer {0} into {1}")]
    Unpack(String, PathBuf, #[source] std::io::Error),
    /// The layers expand to more than [`Limits`] allows.
    #[error("layer {digest}: the image expands to more than {limit} {what}")]
    TooLarge {
        /// The layer where the limit was passed.
        digest: String,
        /// The limit.
        limit: u64,
        /// What it counts: "bytes" or "entries".
        what: &'static str,
    },
    /// The scratch directory could not be made.
    #[error("cannot make a scratch directory in {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    /// The unpacked tree could not be made into an image.
    #[error("cannot make the image")]
    Image(#[source] RootfsError),
}

/// Whether `dir` holds an OCI image layout.
pub fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file() && dir.join("index.json").is_file()
}

fn read_json(path: &Path) -> Result<serde_json::Value, OciError> {
    let bytes = fs::read(path).map_err(|e| OciError::Read(path.to_path_buf(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| OciError::Json(path.to_path_buf(), e.to_string()))
}

/// The path of blob `digest`, which must be `sha256:<64 hex>`.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| OciError::Digest(digest.into()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(OciError::Digest(digest.into()));
    }
    Ok(layout.join("blobs/sha256").join(hex))
}

/// Checks blob `digest`'s content against the digest.
fn verify(layout: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let path = blob_path(layout, digest)?;
    let mut file = File::open(&path).map_err(|e| OciError::Read(path.clone(), e))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| OciError::Read(path.clone(), e))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if format!("sha256:{hex}") != digest {
        return Err(OciError::Corrupt(digest.into()));
    }
    Ok(path)
}

fn field<'a>(doc: &'a serde_json::Value, key: &str, path: &Path) -> Result<&'a serde_json::Value, OciError> {
    doc.get(key).ok_or_else(|| OciError::Json(path.to_path_buf(), format!("no {key:?}")))
}

fn str_field<'a>(doc: &'a serde_json::Value, key: &str, path: &Path) -> Result<&'a str, OciError> {
    field(doc, key, path)?
        .as_str()
        .ok_or_else(|| OciError::Json(path.to_path_buf(), format!("{key:?} is not a string")))
}

/// The manifest to unpack: the index's linux/amd64 entry, else its first.
/// A nested index is followed one level.
fn manifest(layout: &Path) -> Result<(PathBuf, serde_json::Value), OciError> {
    let mut index_path = layout.join("index.json");
    let mut index = read_json(&index_path)?;
    for _ in 0..2 {
        let manifests = field(&index, "manifests", &index_path)?
            .as_array()
            .filter(|m| !m.is_empty())
            .ok_or_else(|| OciError::Json(index_path.clone(), "no manifests".into()))?;
        let amd64 =
            manifests.iter().find(|m| m.pointer("/platform/architecture").and_then(|a| a.as_str()) == Some("amd64"));
        let chosen = amd64.unwrap_or(&manifests[0]);
        let digest = str_field(chosen, "digest", &index_path)?;
        let path = verify(layout, digest)?;
        let doc = read_json(&path)?;
        if doc.get("manifests").is_some() {
            index_path = path;
            index = doc;
            continue;
        }
        return Ok((path, doc));
    }
    Err(OciError::Json(layout.join("index.json"), "indexes nested too deeply".into()))
}

/// Whether `path` (a layer entry) stays inside the root.
fn confined(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Makes the ext4 image of the OCI layout `layout` at `out` (`size` as in
/// [`crate::rootfs::build_ext4`]), the files owned as the layers say,
/// whoever builds it. The layers are unpacked in a private scratch
/// directory under `scratch`, removed afterwards.
pub fn build_image(layout: &Path, out: &Path, size: Option<u64>, scratch: &Path) -> Result<(), OciError> {
    let dir = crate::cache::ScratchDir::new(scratch, "vessel-oci-rootfs")
        .map_err(|e| OciError::Scratch(scratch.to_path_buf(), e))?;
    let tree = dir.path().join("root");
    let owners = unpack_layout(layout, &tree, &Limits::default())?;
    crate::rootfs::build_ext4_owned(&tree, out, size, &owners).map_err(OciError::Image)
}

/// Unpacks the image in `layout` into `dest`, a directory made here (0700;
/// one that exists is an error), and returns the owners and modes its
/// layers give their files.
pub fn unpack_layout(layout: &Path, dest: &Path, limits: &Limits) -> Result<Ownership, OciError> {
    let (manifest_path, manifest) = manifest(layout)?;
    let layers = field(&manifest, "layers", &manifest_path)?
        .as_array()
        .ok_or_else(|| OciError::Json(manifest_path.clone(), "\"layers\" is not a list".into()))?;
    let mut unpacker = Unpacker::new(dest, limits)?;
    for layer in layers {
        let digest = str_field(layer, "digest", &manifest_path)?;
        let media_type = str_field(layer, "mediaType", &manifest_path)?;
        let path = verify(layout, digest)?;
        let file = BufReader::new(File::open(&path).map_err(|e| OciError::Read(path.clone(), e))?);
        let reader: Box<dyn Read> = if media_type.ends_with("tar+gzip") || media_type.ends_with("tar.gzip") {
            // Layers may hold several gzip members (concatenated streams,
            // eStargz): GzDecoder would stop after the first.
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else if media_type.ends_with(".tar") {
            Box::new(file)
        } else {
            return Err(OciError::LayerType { digest: digest.into(), media_type: media_type.into() });
        };
        unpacker.apply(reader, digest)?;
    }
    Ok(unpacker.owners)
}

/// Applies `layers` (uncompressed tar streams, lowest first) into `dest`, a
/// directory made here, as [`unpack_layout`] does with a layout's layers.
pub fn unpack_layers(layers: &[&[u8]], dest: &Path, limits: &Limits) -> Result<Ownership, OciError> {
    let mut unpacker = Unpacker::new(dest, limits)?;
    for (n, layer) in layers.iter().enumerate() {
        unpacker.apply(*layer, &format!("#{n}"))?;
    }
    Ok(unpacker.owners)
}

/// A reader that fails once more than its share of bytes went through.
struct Capped<R> {
    inner: R,
    /// Bytes left, shared by every layer's reader.
    left: Rc<Cell<u64>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        let want = buf.len().min(usize::try_from(left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > left {
            self.left.set(0);
            return Err(std::io::Error::other("the layer expands past the byte limit"));
        }
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// Layers applied one after the other into one tree.
struct Unpacker {
    dest: PathBuf,
    /// `dest`, canonical.
    root: PathBuf,
    limits: Limits,
    /// Tar stream bytes left; 0 once passed.
    stream_left: Rc<Cell<u64>>,
    /// File content bytes (apparent sizes) so far.
    contents: u64,
    entries: u64,
    owners: Ownership,
}

impl Unpacker {
    fn new(dest: &Path, limits: &Limits) -> Result<Self, OciError> {
        let err = |e| OciError::Unpack(String::new(), dest.to_path_buf(), e);
        fs::DirBuilder::new().mode(0o700).create(dest).map_err(err)?;
        let root = fs::canonicalize(dest).map_err(err)?;
        let mut owners = Ownership::default();
        owners.0.insert(PathBuf::new(), Owner { uid: 0, gid: 0, mode: 0o755 });
        Ok(Unpacker {
            dest: dest.to_path_buf(),
            root,
            limits: *limits,
            stream_left: Rc::new(Cell::new(limits.max_bytes)),
            contents: 0,
            entries: 0,
            owners,
        })
    }

    /// Applies one layer: whiteouts delete what lower layers put there
    /// (never this layer's own entries, whatever their order in the
    /// archive), other entries are unpacked over it.
    fn apply(&mut self, reader: impl Read, digest: &str) -> Result<(), OciError> {
        let capped = Capped { inner: reader, left: self.stream_left.clone() };
        let result = self.apply_entries(capped, digest);
        if self.stream_left.get() == 0 && result.is_err() {
            return Err(OciError::TooLarge { digest: digest.into(), limit: self.limits.max_bytes, what: "bytes" });
        }
        result
    }

    fn apply_entries(&mut self, reader: impl Read, digest: &str) -> Result<(), OciError> {
        let dest = self.dest.clone();
        let unpack_err = |e| OciError::Unpack(digest.into(), dest.clone(), e);
        let escape = |path: &Path| OciError::Escape { digest: digest.into(), path: path.display().to_string() };
        let too_large = |limit, what| OciError::TooLarge { digest: digest.into(), limit, what };
        // This layer's entries, by their place in the tree: whiteouts and
        // opaque directories leave them alone.
        let mut written = BTreeSet::new();
        let mut archive = tar::Archive::new(reader);
        // The tree never holds setuid/setgid/sticky bits or owners: those
        // go to `owners`, and from there into the image.
        archive.set_preserve_permissions(false);
        archive.set_preserve_ownerships(false);
        archive.set_overwrite(true);
        for entry in archive.entries().map_err(unpack_err)? {
            let mut entry = entry.map_err(unpack_err)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(too_large(self.limits.max_entries, "entries"));
            }
            self.contents = self.contents.saturating_add(entry.size());
            if self.contents > self.limits.max_bytes {
                return Err(too_large(self.limits.max_bytes, "bytes"));
            }
            let path = entry.path().map_err(unpack_err)?.into_owned();
            if !confined(&path) {
                return Err(escape(&path));
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let whiteout = if name == ".wh..wh..opq" { Some(None) } else { name.strip_prefix(".wh.").map(Some) };
            let Some(hidden) = whiteout else {
                self.make_way(&path, entry.header().entry_type().is_dir()).map_err(unpack_err)?;
                if !entry.unpack_in(&self.dest).map_err(unpack_err)? {
                    return Err(escape(&path));
                }
                let at = self.record(&entry, &path).map_err(unpack_err)?;
                written.insert(at);
                continue;
            };
            // Whiteouts are applied here, not by tar, so they get tar's
            // guard against leaving the root: the directory they name,
            // with any symlink a lower layer left resolved, must be inside.
            let parent = match self.inside(path.parent().unwrap_or(Path::new(""))) {
                Ok(Some(parent)) => parent,
                Ok(None) => return Err(escape(&path)),
                // Nothing below to hide.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(unpack_err(e)),
            };
            match hidden {
                // Opaque directory: nothing from lower layers shows through.
                None => self.clear_lower(&parent, &written).map_err(unpack_err)?,
                Some(hidden) => {
                    if !matches!(Path::new(hidden).components().collect::<Vec<_>>()[..], [Component::Normal(_)]) {
                        return Err(escape(&path));
                    }
                    let at = parent.join(hidden);
                    if !written.contains(&at) {
                        remove(&self.root.join(&at)).map_err(unpack_err)?;
                        self.forget(&at);
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes what a lower layer left at `path` that an entry of another
    /// kind replaces: a directory (with what it holds) under a file or a
    /// link, a file under a directory. tar replaces only files, and a
    /// directory kept under a symlink would hold on to lower layers' files.
    /// A directory entry over a symlink keeps the link (usrmerge's `/bin`).
    fn make_way(&mut self, path: &Path, is_dir: bool) -> std::io::Result<()> {
        let (Ok(Some(parent)), Some(name)) = (self.inside(path.parent().unwrap_or(Path::new(""))), path.file_name())
        else {
            // Not there, or outside: tar makes the path or refuses it.
            return Ok(());
        };
        let at = parent.join(name);
        let Ok(meta) = fs::symlink_metadata(self.root.join(&at)) else { return Ok(()) };
        if meta.is_dir() != is_dir && !(is_dir && meta.file_type().is_symlink()) {
            remove(&self.root.join(&at))?;
            self.forget(&at);
        }
        Ok(())
    }

    /// Where `rel` (a directory named by an entry) is in the tree, as a
    /// path relative to the root with symlinks resolved; `None` if it
    /// resolves outside the root.
    fn inside(&self, rel: &Path) -> std::io::Result<Option<PathBuf>> {
        let real = fs::canonicalize(self.root.join(rel))?;
        Ok(real.strip_prefix(&self.root).ok().map(Path::to_path_buf))
    }

    /// After `entry` (at `path`) was unpacked: makes the tree's copy its
    /// owner's to read and write and free of special bits, and records the
    /// owner and mode the layer gives it. Returns its place in the tree.
    fn record(&mut self, entry: &tar::Entry<impl Read>, path: &Path) -> std::io::Result<PathBuf> {
        let header = entry.header();
        let at = match (self.inside(path.parent().unwrap_or(Path::new("")))?, path.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            (Some(_), None) => PathBuf::new(),
            (None, _) => return Err(std::io::Error::other("unpacked outside the root")),
        };
        // An owner field that is empty or out of range reads as root, as
        // tar's own unpacking would make it: a layer can ask for root anyway.
        let id = |v: std::io::Result<u64>| -> std::io::Result<u32> {
            Ok(v.ok().and_then(|v| u32::try_from(v).ok()).unwrap_or(0))
        };
        let mode = header.mode()? & 0o7777;
        let owner = Owner { uid: id(header.uid())?, gid: id(header.gid())?, mode };
        let kind = header.entry_type();
        let owner = if kind.is_hard_link() {
            // One inode, two names: the target's owner is the link's.
            let target = entry.link_name()?.unwrap_or_default();
            let target = match (self.inside(target.parent().unwrap_or(Path::new("")))?, target.file_name()) {
                (Some(parent), Some(name)) => parent.join(name),
                _ => PathBuf::new(),
            };
            self.owners.0.get(&target).copied().unwrap_or(owner)
        } else {
            let host = if kind.is_dir() { 0o700 } else { 0o600 };
            if !kind.is_symlink() {
                fs::set_permissions(self.root.join(&at), fs::Permissions::from_mode(mode & 0o777 | host))?;
            }
            owner
        };
        if !kind.is_dir() {
            // It may have replaced a lower layer's directory.
            self.forget(&at);
        }
        // Directories tar made on the way: root's, 0755.
        for parent in at.ancestors().skip(1) {
            self.owners.0.entry(parent.to_path_buf()).or_insert(Owner { uid: 0, gid: 0, mode: 0o755 });
        }
        self.owners.0.insert(at.clone(), owner);
        Ok(at)
    }

    /// Removes what lower layers left under `dir` (relative): everything
    /// but this layer's entries and the directories on their way.
    fn clear_lower(&mut self, dir: &Path, written: &BTreeSet<PathBuf>) -> std::io::Result<()> {
        for child in fs::read_dir(self.root.join(dir))? {
            let at = dir.join(child?.file_name());
            let below = written
                .range::<PathBuf, _>((Bound::Excluded(&at), Bound::Unbounded))
                .next()
                .is_some_and(|p| p.starts_with(&at));
            let is_dir = fs::symlink_metadata(self.root.join(&at))?.is_dir();
            if is_dir && (below || written.contains(&at)) {
                self.clear_lower(&at, written)?;
            } else if !written.contains(&at) {
                remove(&self.root.join(&at))?;
                self.forget(&at);
            }
        }
        Ok(())
    }

    /// Drops the owners of `at` and what was below it.
    fn forget(&mut self, at: &Path) {
        let gone: Vec<PathBuf> = self
            .owners
            .0
            .range(at.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(at))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.owners.0.remove(&p);
        }
    }
}

/// Removes `path` (a directory with what it holds; a symlink, not what it
/// points to); a path that is not there is no error.
fn remove(path: &Path) -> std::io::Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Layout(PathBuf);

    impl Layout {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("vessel-oci-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
            fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
            Layout(dir)
        }

        fn blob(&self, bytes: &[u8]) -> String {
            let hex: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
            fs::write(self.0.join("blobs/sha256").join(&hex), bytes).unwrap();
            format!("sha256:{hex}")
        }

        fn image(&self, layers: &[(String, &str)]) {
            let layers: Vec<String> =
                layers.iter().map(|(d, t)| format!(r#"{{"mediaType":"{t}","digest":"{d}","size":0}}"#)).collect();
            let manifest = format!(r#"{{"schemaVersion":2,"layers":[{}]}}"#, layers.join(","));
            let digest = self.blob(manifest.as_bytes());
            let index = format!(
                r#"{{"schemaVersion":2,"manifests":[{{"digest":"{digest}","platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
            );
            fs::write(self.0.join("index.json"), index).unwrap();
        }
    }

    impl Drop for Layout {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A tar entry: path, owner, mode and what it is.
    struct E<'a>(&'a str, u64, u32, Kind<'a>);
    enum Kind<'a> {
        File(&'a [u8]),
        Dir,
        Symlink(&'a str),
    }

    fn tar_with(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for E(path, id, mode, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(*id);
            h.set_gid(*id);
            h.set_mode(*mode);
            match kind {
                Kind::File(data) => {
                    h.set_size(data.len() as u64);
                    h.set_cksum();
                    b.append_data(&mut h, path, *data).unwrap();
                }
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_cksum();
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
                Kind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, path, target).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// uid, gid and mode (`0o7777` bits) of `path` in the ext4 `image`.
    fn stat(image: &Path, path: &str) -> (u32, u32, u32) {
        let out =
            std::process::Command::new("debugfs").arg("-R").arg(format!("stat {path}")).arg(image).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let word_after = |key: &str| -> &str {
            let at = text.find(key).unwrap_or_else(|| panic!("no {key} for {path}: {text}"));
            text[at + key.len()..].split_whitespace().next().unwrap()
        };
        let n = |key| word_after(key).parse().unwrap();
        (n("User:"), n("Group:"), u32::from_str_radix(word_after("Mode:"), 8).unwrap())
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let l = Layout::new("ok");
        let base = l.blob(&gzip(&tar_of(&[("etc/os", b"base\n"), ("etc/gone", b"x"), ("var/cache/a", b"a")])));
        let top = l.blob(&tar_of(&[
            ("etc/os", b"top\n"),
            ("etc/.wh.gone", b""),
            ("var/cache/.wh..wh..opq", b""),
            ("var/cache/b", b"b"),
        ]));
        l.image(&[(base, TGZ), (top, TAR)]);
        assert!(is_layout(&l.0));
        let dest = l.0.join("rootfs");
        unpack_layout(&l.0, &dest, &Limits::default()).unwrap();
        assert_eq!(fs::read(dest.join("etc/os")).unwrap(), b"top\n");
        assert!(!dest.join("etc/gone").exists());
        assert!(!dest.join("var/cache/a").exists());
        assert_eq!(fs::read(dest.join("var/cache/b")).unwrap(), b"b");
    }

    #[test]
    fn untrusted_layouts_are_refused() {
        let l = Layout::new("bad");
        // A digest that is a path.
        l.image(&[("sha256:../../etc/passwd".into(), TAR)]);
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r1"), &Limits::default()), Err(OciError::Digest(_))));
        // A blob whose content does not match its digest.
        let d = l.blob(&tar_of(&[("f", b"1")]));
        fs::write(blob_path(&l.0, &d).unwrap(), b"tampered").unwrap();
        l.image(&[(d, TAR)]);
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r2"), &Limits::default()), Err(OciError::Corrupt(_))));
        // An entry climbing out of the root (written raw: tar::Builder refuses "..").
        let mut raw = tar_of(&[("xx/escape", b"evil")]);
        raw[0..9].copy_from_slice(b"../escape");
        raw[9..11].copy_from_slice(&[0, 0]);
        let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        let d = l.blob(&raw);
        l.image(&[(d, TAR)]);
        let err = unpack_layout(&l.0, &l.0.join("r3"), &Limits::default());
        assert!(matches!(err, Err(OciError::Escape { .. })), "escape not refused");
        assert!(!l.0.join("escape").exists());
        // An unknown layer type.
        let d = l.blob(b"zstd");
        l.image(&[(d, "application/vnd.oci.image.layer.v1.tar+zstd")]);
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r4"), &Limits::default()), Err(OciError::LayerType { .. })));
    }

    #[test]
    fn whiteouts_stay_inside_the_root() {
        let l = Layout::new("wh");
        let outside = l.0.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();
        // A lower layer links "etc" to a directory outside the root.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "etc", &outside).unwrap();
        let link = l.blob(&b.into_inner().unwrap());
        for (n, whiteout) in ["etc/.wh.keep", "etc/.wh..wh..opq", ".wh...", "a/.wh.."].into_iter().enumerate() {
            let top = l.blob(&tar_of(&[("a/f", b"f"), (whiteout, b"")]));
            l.image(&[(link.clone(), TAR), (top, TAR)]);
            let err = unpack_layout(&l.0, &l.0.join(format!("r{n}")), &Limits::default()).unwrap_err();
            assert!(matches!(err, OciError::Escape { .. }), "{whiteout}: {err}");
            assert!(outside.join("keep").exists(), "{whiteout} removed a file outside the root");
        }
    }

    #[test]
    fn a_layer_of_several_gzip_members_is_read_whole() {
        let l = Layout::new("multigz");
        // A tar archive split across two gzip members: the file in the
        // second half is lost by a reader that stops after one.
        let whole = tar_of(&[("first", b"1"), ("second", b"2")]);
        let mut layer = gzip(&whole[..1024]);
        layer.extend(gzip(&whole[1024..]));
        let d = l.blob(&layer);
        l.image(&[(d, TGZ)]);
        let dest = l.0.join("rootfs");
        unpack_layout(&l.0, &dest, &Limits::default()).unwrap();
        assert_eq!(fs::read(dest.join("second")).unwrap(), b"2");
    }

    #[test]
    fn whiteouts_leave_their_own_layer_alone() {
        let l = Layout::new("ownlayer");
        let base = l.blob(&tar_of(&[("d/old", b"o"), ("g", b"lower"), ("h", b"lower")]));
        // Whiteouts after the entries they would hide: in one layer, the
        // entry wins, and an opaque directory hides only lower layers.
        let top = l.blob(&tar_of(&[
            ("d/new", b"n"),
            ("d/sub/deep", b"s"),
            ("d/.wh..wh..opq", b""),
            ("g", b"upper"),
            (".wh.g", b""),
            (".wh.h", b""),
        ]));
        l.image(&[(base, TAR), (top, TAR)]);
        let dest = l.0.join("rootfs");
        unpack_layout(&l.0, &dest, &Limits::default()).unwrap();
        assert!(!dest.join("d/old").exists());
        assert_eq!(fs::read(dest.join("d/new")).unwrap(), b"n");
        assert_eq!(fs::read(dest.join("d/sub/deep")).unwrap(), b"s");
        assert_eq!(fs::read(dest.join("g")).unwrap(), b"upper");
        assert!(!dest.join("h").exists());
    }

    #[test]
    fn a_layer_that_expands_too_far_is_refused() {
        let l = Layout::new("bomb");
        // 64 MiB of zeros: a few hundred KiB of gzip.
        let bomb = l.blob(&gzip(&tar_of(&[("zeros", &vec![0u8; 64 << 20])])));
        l.image(&[(bomb, TGZ)]);
        let limits = Limits { max_bytes: 8 << 20, max_entries: 100 };
        let err = unpack_layout(&l.0, &l.0.join("r1"), &limits).unwrap_err();
        assert!(matches!(err, OciError::TooLarge { what: "bytes", limit, .. } if limit == 8 << 20), "{err}");
        assert!(err.to_string().contains("expands to more than 8388608 bytes"), "{err}");
        assert!(fs::metadata(l.0.join("r1/zeros")).map_or(0, |m| m.len()) <= 8 << 20);
        // The tar stream itself is capped too, whatever its headers say.
        let limits = Limits { max_bytes: 1 << 20, max_entries: 100 };
        let names: Vec<String> = (0..50).map(|n| format!("f{n}")).collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &[7u8; 30 << 10][..])).collect();
        let many = l.blob(&tar_of(&files));
        l.image(&[(many.clone(), TAR)]);
        let err = unpack_layout(&l.0, &l.0.join("r2"), &limits).unwrap_err();
        assert!(matches!(err, OciError::TooLarge { what: "bytes", .. }), "{err}");
        // A million empty files is refused by count.
        let limits = Limits { max_bytes: 1 << 30, max_entries: 10 };
        let err = unpack_layout(&l.0, &l.0.join("r3"), &limits).unwrap_err();
        assert!(matches!(err, OciError::TooLarge { what: "entries", limit: 10, .. }), "{err}");
        assert_eq!(fs::read_dir(l.0.join("r3")).unwrap().count(), 10);
    }

    /// The image of a layer with a setuid-root `/bin/sh`, a file of uid
    /// 999 and a usrmerge-style link, built by whoever runs this.
    fn check_owners_in_image(l: &Layout) {
        let base = l.blob(&tar_with(&[
            E("bin", 0, 0o755, Kind::Dir),
            E("sbin", 0, 0o777, Kind::Symlink("bin")),
            E("home/u", 999, 0o700, Kind::Dir),
        ]));
        let top = l.blob(&gzip(&tar_with(&[
            E("bin/sh", 0, 0o4755, Kind::File(b"#!")),
            E("sbin/su", 0, 0o4755, Kind::File(b"su")),
            E("home/u/notes", 999, 0o640, Kind::File(b"mine")),
            E("tmp", 0, 0o1777, Kind::Dir),
        ])));
        l.image(&[(base, TAR), (top, TGZ)]);
        // The tree on the host: private, no special bits, the runner's.
        let tree = l.0.join("tree");
        let owners = unpack_layout(&l.0, &tree, &Limits::default()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&tree).unwrap().mode() & 0o7777, 0o700);
        for f in ["bin/sh", "bin/su", "tmp"] {
            assert_eq!(fs::metadata(tree.join(f)).unwrap().mode() & 0o7000, 0, "{f} keeps a special bit on the host");
        }
        assert_eq!(owners.0[Path::new("bin/su")], Owner { uid: 0, gid: 0, mode: 0o4755 });
        // The image: as the layers say.
        let image = l.0.join("root.ext4");
        build_image(&l.0, &image, None, &l.0).unwrap();
        assert_eq!(stat(&image, "/"), (0, 0, 0o755));
        assert_eq!(stat(&image, "/bin"), (0, 0, 0o755));
        assert_eq!(stat(&image, "/bin/sh"), (0, 0, 0o4755));
        assert_eq!(stat(&image, "/bin/su"), (0, 0, 0o4755));
        assert_eq!(stat(&image, "/home"), (0, 0, 0o755));
        assert_eq!(stat(&image, "/home/u"), (999, 999, 0o700));
        assert_eq!(stat(&image, "/home/u/notes"), (999, 999, 0o640));
        assert_eq!(stat(&image, "/tmp"), (0, 0, 0o1777));
        // No scratch tree left behind.
        let left: Vec<_> = fs::read_dir(&l.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("vessel-oci-rootfs"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn an_image_keeps_the_owners_and_modes_of_its_layers() {
        let l = Layout::new("owners");
        check_owners_in_image(&l);
    }

    /// The same, built by a user other than root: run by root (as the
    /// tests are here), it runs itself again as `nobody`.
    #[test]
    fn an_image_built_by_a_user_keeps_the_owners_and_modes_of_its_layers() {
        use std::os::unix::fs::MetadataExt;
        let l = Layout::new("owners-user");
        if fs::metadata(&l.0).unwrap().uid() != 0 {
            check_owners_in_image(&l);
            return;
        }
        // A copy of this test binary that nobody can run, wherever the
        // build put it (a target directory under /root is closed to it).
        let exe = l.0.join("test-binary");
        fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        fs::set_permissions(&l.0, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args(["--exact", "oci::tests::an_image_built_by_a_user_keeps_the_owners_and_modes_of_its_layers"])
            .env("TMPDIR", "/tmp")
            .output()
            .expect("setpriv (util-linux) runs the test as nobody");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn an_entry_replaces_a_lower_layers_directory_of_another_kind() {
        let l = Layout::new("replace");
        let base = l.blob(&tar_with(&[
            E("bin", 0, 0o755, Kind::Dir),
            E("bin/sh", 0, 0o755, Kind::File(b"old")),
            E("var/cache", 0, 0o755, Kind::Dir),
            E("var/cache/x", 0, 0o644, Kind::File(b"x")),
        ]));
        let top = l.blob(&tar_with(&[
            E("usr/bin/sh", 0, 0o755, Kind::File(b"new")),
            E("bin", 0, 0o777, Kind::Symlink("usr/bin")),
            E("var/cache", 0, 0o600, Kind::File(b"now a file")),
        ]));
        l.image(&[(base, TAR), (top, TAR)]);
        let dest = l.0.join("rootfs");
        let owners = unpack_layout(&l.0, &dest, &Limits::default()).unwrap();
        assert_eq!(fs::read_link(dest.join("bin")).unwrap(), Path::new("usr/bin"));
        assert_eq!(fs::read(dest.join("bin/sh")).unwrap(), b"new");
        assert_eq!(fs::read(dest.join("var/cache")).unwrap(), b"now a file");
        assert!(!owners.0.contains_key(Path::new("var/cache/x")));
    }

    #[test]
    fn owners_beyond_the_header_fields_come_from_pax_records() {
        // tar applies PAX uid/gid records to the header it hands us; this
        // keeps it so (a rootless build's uids do not fit ustar's fields).
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("uid", &b"3000000000"[..]), ("gid", &b"3000000001"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(0o640);
        h.set_size(1);
        h.set_cksum();
        b.append_data(&mut h, "f", &b"x"[..]).unwrap();
        let layer = b.into_inner().unwrap();
        let dest = std::env::temp_dir().join(format!("vessel-oci-pax-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dest);
        let owners = unpack_layers(&[&layer], &dest, &Limits::default()).unwrap();
        fs::remove_dir_all(&dest).unwrap();
        assert_eq!(owners.0[Path::new("f")], Owner { uid: 3_000_000_000, gid: 3_000_000_001, mode: 0o640 });
    }
}
