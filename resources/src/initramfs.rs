//! A writer for the initramfs format the kernel unpacks: cpio "newc"
//! (magic `070701`), uncompressed.
//!
//! Each entry is a 110-byte ASCII header (the magic and 13 fields of 8 hex
//! digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
//! rdevmajor, rdevminor, namesize, check), the NUL-terminated name padded
//! to a multiple of 4 bytes, then the data padded to a multiple of 4. The
//! archive ends with an entry named `TRAILER!!!`. Owners are root, times
//! are 0, so the same contents always give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::cache::{self, CacheError};

/// Why an initramfs could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The path is empty, or has an empty, `.` or `..` component or a NUL
    /// byte in it.
    #[error("{0:?} is not a valid path inside an initramfs")]
    BadPath(String),
    /// Something other than a directory is already at that path.
    #[error("{0:?} is already in the initramfs")]
    Duplicate(String),
    /// A parent of the path is not a directory.
    #[error("{path:?} cannot be added: its parent {parent:?} is not a directory")]
    ParentNotDir {
        /// The path being added.
        path: String,
        /// The parent that is a file, link or device.
        parent: String,
    },
    /// newc stores sizes in 32 bits.
    #[error("{0:?} is 4 GiB or larger; an initramfs entry must be smaller")]
    TooLarge(String),
    /// Writing the image failed.
    #[error("cannot write the initramfs")]
    Write(#[source] CacheError),
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// The newc magic.
pub const MAGIC: &[u8; 6] = b"070701";
/// The name of the last entry.
pub const TRAILER: &str = "TRAILER!!!";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice(u32, u32),
}

#[derive(Clone, Debug)]
struct Entry {
    perm: u32,
    kind: Kind,
}

/// An initramfs being assembled. Paths are relative to the root (a leading
/// `/` is accepted and dropped); missing parent directories are added with
/// mode 0755. Entries are written in path order, so a directory always
/// comes before what is in it.
#[derive(Clone, Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> Result<String, InitramfsError> {
    let bad = || InitramfsError::BadPath(path.to_string());
    let rel = path.trim_start_matches('/');
    if rel.is_empty() || rel.contains('\0') || rel.ends_with('/') {
        return Err(bad());
    }
    if rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(bad());
    }
    Ok(rel.to_string())
}

impl Initramfs {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, path: &str, perm: u32, kind: Kind) -> Result<&mut Self, InitramfsError> {
        let path = normalize(path)?;
        let mut parent = String::new();
        for component in path.split('/').collect::<Vec<_>>().split_last().map_or(&[][..], |(_, p)| p) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Entry { perm: 0o755, kind: Kind::Dir });
                }
                Some(Entry { kind: Kind::Dir, .. }) => {}
                Some(_) => return Err(InitramfsError::ParentNotDir { path, parent }),
            }
        }
        match self.entries.get_mut(&path) {
            Some(existing) if existing.kind == Kind::Dir && kind == Kind::Dir => existing.perm = perm,
            Some(_) => return Err(InitramfsError::Duplicate(path)),
            None => {
                self.entries.insert(path, Entry { perm, kind });
            }
        }
        Ok(self)
    }

    /// A directory with permission bits `perm` (e.g. 0o755). Adding an
    /// existing directory again only changes its permissions.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Self, InitramfsError> {
        self.add(path, perm & 0o7777, Kind::Dir)
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, contents: impl Into<Vec<u8>>) -> Result<&mut Self, InitramfsError> {
        let contents = contents.into();
        if u32::try_from(contents.len()).is_err() {
            return Err(InitramfsError::TooLarge(path.to_string()));
        }
        self.add(path, perm & 0o7777, Kind::File(contents))
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::BadPath(target.to_string()));
        }
        self.add(path, 0o777, Kind::Symlink(target.to_string()))
    }

    /// A character device node (e.g. `dev/console`, 5, 1), for the moment
    /// before init mounts devtmpfs.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<&mut Self, InitramfsError> {
        self.add(path, perm & 0o7777, Kind::CharDevice(major, minor))
    }

    /// Whether `path` is in the image.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// The archive.
    pub fn to_bytes(&self) -> Vec<u8> {
        let data_len: usize = self.entries.iter().map(|(p, e)| p.len() + 128 + data(&e.kind).len()).sum();
        let mut out = Vec::with_capacity(data_len + 128);
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, rdev) = match entry.kind {
                Kind::Dir => (S_IFDIR, 2, (0, 0)),
                Kind::File(_) => (S_IFREG, 1, (0, 0)),
                Kind::Symlink(_) => (S_IFLNK, 1, (0, 0)),
                Kind::CharDevice(major, minor) => (S_IFCHR, 1, (major, minor)),
            };
            let header = Header { ino, mode: mode | entry.perm, nlink, rdev };
            push_entry(&mut out, &header, path, data(&entry.kind));
        }
        push_entry(&mut out, &Header { nlink: 1, ..Header::default() }, TRAILER, &[]);
        out
    }

    /// Writes the archive to `path` atomically (temp file, fsync, rename).
    pub fn write_atomic(&self, path: &Path) -> Result<(), InitramfsError> {
        cache::write_atomic(path, &self.to_bytes()).map_err(InitramfsError::Write)
    }

    /// Writes the archive to `w`.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(&self.to_bytes())
    }
}

fn data(kind: &Kind) -> &[u8] {
    match kind {
        Kind::File(bytes) => bytes,
        Kind::Symlink(target) => target.as_bytes(),
        Kind::Dir | Kind::CharDevice(..) => &[],
    }
}

#[derive(Default)]
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn push_entry(out: &mut Vec<u8>, h: &Header, name: &str, data: &[u8]) {
    // `file` refused contents of 4 GiB or more; names and link targets are
    // short paths, so the saturation never happens.
    let filesize = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
    let fields = [h.ino, h.mode, 0, 0, h.nlink, 0, filesize, 0, 0, h.rdev.0, h.rdev.1, namesize, 0];
    out.extend_from_slice(MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::test_util::TempDir;

    /// One entry read back from an archive.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct ReadEntry {
        pub name: String,
        pub mode: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// The entries of a newc archive, trailer excluded; panics on anything
    /// malformed (tests only).
    pub(crate) fn read_newc(mut b: &[u8]) -> Vec<ReadEntry> {
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
        };
        let padded = |n: usize| n.next_multiple_of(4);
        let mut entries = Vec::new();
        loop {
            assert_eq!(&b[..6], MAGIC);
            let (mode, filesize, namesize) = (field(b, 1), field(b, 6) as usize, field(b, 11) as usize);
            let rdev = (field(b, 9), field(b, 10));
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).unwrap().to_string();
            let data_at = padded(110 + namesize);
            let data = b[data_at..data_at + filesize].to_vec();
            b = &b[padded(data_at + filesize)..];
            if name == TRAILER {
                assert!(b.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push(ReadEntry { name, mode, rdev, data });
        }
    }

    #[test]
    fn reads_back_what_was_written() {
        let mut img = Initramfs::new();
        img.file("bin/x", 0o755, b"abcde".to_vec()).unwrap();
        img.char_device("dev/console", 0o600, 5, 1).unwrap();
        let entries = read_newc(&img.to_bytes());
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/x", "dev", "dev/console"]);
        assert_eq!((entries[1].mode, entries[1].data.as_slice()), (S_IFREG | 0o755, &b"abcde"[..]));
        assert_eq!((entries[3].mode, entries[3].rdev), (S_IFCHR | 0o600, (5, 1)));
    }

    /// A header from its 13 fields, written out by hand.
    fn header(fields: [&str; 13]) -> Vec<u8> {
        let mut h = b"070701".to_vec();
        for f in fields {
            assert_eq!(f.len(), 8);
            h.extend_from_slice(f.as_bytes());
        }
        assert_eq!(h.len(), 110);
        h
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let mut want = header([
            "00000000", "00000000", "00000000", "00000000", "00000001", "00000000", "00000000", "00000000", "00000000",
            "00000000", "00000000", "0000000B", "00000000",
        ]);
        want.extend_from_slice(b"TRAILER!!!\0");
        want.extend_from_slice(&[0; 3]); // 110 + 11 = 121, padded to 124
        assert_eq!(Initramfs::new().to_bytes(), want);
    }

    #[test]
    fn byte_for_byte() {
        let mut img = Initramfs::new();
        img.file("/bin/hello", 0o755, b"hi!\n".to_vec()).unwrap();
        img.symlink("sh", "bin/hello").unwrap();
        img.char_device("dev/console", 0o600, 5, 1).unwrap();
        img.file("e", 0o644, Vec::new()).unwrap();
        let z = "00000000";
        let mut want = Vec::new();
        // "bin": added as the parent of bin/hello; 110 + 4 = 114 -> pad 2.
        want.extend(header(["00000001", "000041ED", z, z, "00000002", z, z, z, z, z, z, "00000004", z]));
        want.extend_from_slice(b"bin\0\0\0");
        // "bin/hello": 110 + 10 = 120, no pad; data 4 bytes, no pad.
        want.extend(header(["00000002", "000081ED", z, z, "00000001", z, "00000004", z, z, z, z, "0000000A", z]));
        want.extend_from_slice(b"bin/hello\0hi!\n");
        // "dev": 110 + 4 -> pad 2.
        want.extend(header(["00000003", "000041ED", z, z, "00000002", z, z, z, z, z, z, "00000004", z]));
        want.extend_from_slice(b"dev\0\0\0");
        // "dev/console": char device 5:1 in rdevmajor/rdevminor; 110 + 12 = 122 -> pad 2.
        want.extend(header([
            "00000004", "00002180", z, z, "00000001", z, z, z, z, "00000005", "00000001", "0000000C", z,
        ]));
        want.extend_from_slice(b"dev/console\0\0\0");
        // "e": empty file; 110 + 2 = 112.
        want.extend(header(["00000005", "000081A4", z, z, "00000001", z, z, z, z, z, z, "00000002", z]));
        want.extend_from_slice(b"e\0");
        // "sh": symlink, the target is the data (9 bytes -> pad 3); 110 + 3 = 113 -> pad 3.
        want.extend(header(["00000006", "0000A1FF", z, z, "00000001", z, "00000009", z, z, z, z, "00000003", z]));
        want.extend_from_slice(b"sh\0\0\0\0bin/hello\0\0\0");
        want.extend(header([z, z, z, z, "00000001", z, z, z, z, z, z, "0000000B", z]));
        want.extend_from_slice(b"TRAILER!!!\0\0\0\0");
        let got = img.to_bytes();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
        assert_eq!(got, want);
        assert_eq!(got.len() % 4, 0);
    }

    #[test]
    fn paths_are_checked() {
        let mut img = Initramfs::new();
        for bad in ["", "/", "a//b", "a/./b", "../x", "a/..", "a/", "a\0b"] {
            let err = img.file(bad, 0o644, Vec::new()).unwrap_err();
            assert!(matches!(err, InitramfsError::BadPath(_)), "{bad:?}: {err}");
        }
        img.file("a/b", 0o644, Vec::new()).unwrap();
        assert!(img.contains("/a") && img.contains("a/b"));
        assert!(matches!(img.file("a/b", 0o644, Vec::new()), Err(InitramfsError::Duplicate(_))));
        assert!(matches!(img.symlink("a", "x"), Err(InitramfsError::Duplicate(_))));
        let err = img.file("a/b/c", 0o644, Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "\"a/b/c\" cannot be added: its parent \"a/b\" is not a directory");
        img.dir("a", 0o700).unwrap();
        assert!(img.symlink("l", "").is_err());
    }

    #[test]
    fn written_atomically() {
        let dir = TempDir::new("cpio");
        let mut img = Initramfs::new();
        img.file("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        let path = dir.path().join("initrd.cpio");
        img.write_atomic(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), img.to_bytes());
        let mut buf = Vec::new();
        img.write_to(&mut buf).unwrap();
        assert_eq!(buf, img.to_bytes());
    }
}
