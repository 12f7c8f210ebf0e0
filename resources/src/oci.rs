//! Unpacking an OCI image layout (what `skopeo copy ... oci:DIR` or `umoci`
//! write) into a directory: index, manifest, then each layer in order,
//! honouring whiteouts. Everything in the layout is untrusted: digests are
//! checked against the blobs, blob names must be plain hex, and no layer
//! entry may land outside the destination.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

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

/// Unpacks the image in `layout` into `dest` (created if missing).
pub fn unpack_layout(layout: &Path, dest: &Path) -> Result<(), OciError> {
    let (manifest_path, manifest) = manifest(layout)?;
    let layers = field(&manifest, "layers", &manifest_path)?
        .as_array()
        .ok_or_else(|| OciError::Json(manifest_path.clone(), "\"layers\" is not a list".into()))?;
    fs::create_dir_all(dest).map_err(|e| OciError::Unpack(String::new(), dest.to_path_buf(), e))?;
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
        apply_layer(reader, dest, digest)?;
    }
    Ok(())
}

/// Applies one layer: whiteouts delete what lower layers put there, other
/// entries are unpacked over it.
fn apply_layer(reader: impl Read, dest: &Path, digest: &str) -> Result<(), OciError> {
    let unpack_err = |e| OciError::Unpack(digest.into(), dest.to_path_buf(), e);
    let escape = |path: &Path| OciError::Escape { digest: digest.into(), path: path.display().to_string() };
    // Whiteouts are applied here, not by tar, so they get tar's guard
    // against leaving the root: the directory they name, with any symlink
    // a lower layer left resolved, must be inside it.
    let root = fs::canonicalize(dest).map_err(unpack_err)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(unpack_err)? {
        let mut entry = entry.map_err(unpack_err)?;
        let path = entry.path().map_err(unpack_err)?.into_owned();
        if !confined(&path) {
            return Err(escape(&path));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let whiteout = if name == ".wh..wh..opq" { Some(None) } else { name.strip_prefix(".wh.").map(Some) };
        let Some(hidden) = whiteout else {
            if !entry.unpack_in(dest).map_err(unpack_err)? {
                return Err(escape(&path));
            }
            continue;
        };
        let parent = match fs::canonicalize(dest.join(path.parent().unwrap_or(Path::new("")))) {
            Ok(parent) if parent.starts_with(&root) => parent,
            Ok(_) => return Err(escape(&path)),
            // Nothing below to hide.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(unpack_err(e)),
        };
        let removed = match hidden {
            // Opaque directory: nothing from lower layers shows through.
            None => fs::read_dir(&parent)
                .and_then(|children| children.into_iter().try_for_each(|child| remove(&child?.path()))),
            Some(hidden) => {
                if !matches!(Path::new(hidden).components().collect::<Vec<_>>()[..], [Component::Normal(_)]) {
                    return Err(escape(&path));
                }
                remove(&parent.join(hidden))
            }
        };
        removed.map_err(unpack_err)?;
    }
    Ok(())
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
        unpack_layout(&l.0, &dest).unwrap();
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
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r")), Err(OciError::Digest(_))));
        // A blob whose content does not match its digest.
        let d = l.blob(&tar_of(&[("f", b"1")]));
        fs::write(blob_path(&l.0, &d).unwrap(), b"tampered").unwrap();
        l.image(&[(d, TAR)]);
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r")), Err(OciError::Corrupt(_))));
        // An entry climbing out of the root (written raw: tar::Builder refuses "..").
        let mut raw = tar_of(&[("xx/escape", b"evil")]);
        raw[0..9].copy_from_slice(b"../escape");
        raw[9..11].copy_from_slice(&[0, 0]);
        let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        let d = l.blob(&raw);
        l.image(&[(d, TAR)]);
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r")), Err(OciError::Escape { .. })), "escape not refused");
        assert!(!l.0.join("escape").exists());
        // An unknown layer type.
        let d = l.blob(b"zstd");
        l.image(&[(d, "application/vnd.oci.image.layer.v1.tar+zstd")]);
        assert!(matches!(unpack_layout(&l.0, &l.0.join("r")), Err(OciError::LayerType { .. })));
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
            let err = unpack_layout(&l.0, &l.0.join(format!("r{n}"))).unwrap_err();
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
        unpack_layout(&l.0, &dest).unwrap();
        assert_eq!(fs::read(dest.join("second")).unwrap(), b"2");
    }
}
