//! Container root filesystems as ext4 disk images, made from a directory
//! with `mkfs.ext4 -d` (e2fsprogs): no loop mounts, no root needed. The
//! image is written to a temporary file and renamed into place, so a
//! failed build never leaves a half-written image behind.
//!
//! `mkfs.ext4 -d` copies owners and modes from the host tree, which only
//! root can make match an image's. So the tree holds the files as whoever
//! builds (no setuid bits, nothing another user can enter), and the owners
//! and modes the image asks for ([`Ownership`]) are written into the ext4
//! image afterwards with `debugfs -w` (`set_inode_field`), the same for
//! root and other users. (e2fsprogs 1.47.1's `mkfs.ext4 -d` reads a tar
//! archive with its owners, but 1.47.0 is what distributions ship now.)

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::command::{run, CommandError};

/// Room added to the contents for ext4's own metadata and some free space.
const SLACK: u64 = 16 << 20;

/// Why a root filesystem could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The source is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Walking the source failed.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The image file could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The size asked for cannot hold the contents.
    #[error("{size} bytes cannot hold {needed} bytes of contents plus ext4 metadata")]
    TooSmall {
        /// Requested size.
        size: u64,
        /// Bytes the directory holds.
        needed: u64,
    },
    /// mkfs.ext4 failed or is missing (e2fsprogs).
    #[error("cannot make the ext4 image")]
    Mkfs(#[source] CommandError),
    /// debugfs failed or is missing (e2fsprogs), or refused a change.
    #[error("cannot set owners and modes in the ext4 image")]
    Owners(#[source] CommandError),
    /// A file name debugfs cannot address (a newline in it).
    #[error("{0:?}: a file name with a newline cannot be written into an ext4 image")]
    Name(PathBuf),
    /// No static busybox for the demo rootfs.
    #[error("no static busybox (install busybox-static, or set VESSEL_BUSYBOX)")]
    NoBusybox,
    /// The busybox found is not a usable static one.
    #[error("cannot use busybox for the demo root filesystem")]
    Busybox(#[source] crate::test_image::TestImageError),
    /// The cache directory could not be found.
    #[error("no cache directory for the demo root filesystem")]
    Cache(#[source] crate::cache::CacheError),
}

/// Bytes the files under `dir` take (apparent sizes, rounded up to 4 KiB,
/// plus a block per directory and symlink).
pub fn content_size(dir: &Path) -> Result<u64, RootfsError> {
    let mut total = 0u64;
    let entries = fs::read_dir(dir).map_err(|e| RootfsError::Read(dir.to_path_buf(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RootfsError::Read(dir.to_path_buf(), e))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| RootfsError::Read(path.clone(), e))?;
        total += meta.size().next_multiple_of(4096).max(4096);
        if meta.is_dir() {
            total += content_size(&path)?;
        }
    }
    Ok(total)
}

/// Who owns an image file, and its permission bits (setuid, setgid and
/// sticky included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// `0o7777` bits.
    pub mode: u32,
}

/// Owners and modes for the files of an image, by path relative to its
/// root (the root itself is the empty path). A file not listed is owned by
/// root and keeps the host tree's permission bits.
#[derive(Clone, Debug, Default)]
pub struct Ownership(pub BTreeMap<PathBuf, Owner>);

/// Makes an ext4 image of `from` at `out`, with the host tree's owners and
/// modes (the root directory owned by root). `size` defaults to the
/// contents plus 25% and 16 MiB.
pub fn build_ext4(from: &Path, out: &Path, size: Option<u64>) -> Result<(), RootfsError> {
    build(from, out, size, None)
}

/// Makes an ext4 image of `from` at `out` whose files have the owners and
/// modes of `owners`, whoever builds it.
pub fn build_ext4_owned(from: &Path, out: &Path, size: Option<u64>, owners: &Ownership) -> Result<(), RootfsError> {
    build(from, out, size, Some(owners))
}

fn build(from: &Path, out: &Path, size: Option<u64>, owners: Option<&Ownership>) -> Result<(), RootfsError> {
    if !from.is_dir() {
        return Err(RootfsError::NotADirectory(from.to_path_buf()));
    }
    let needed = content_size(from)?;
    let size = match size {
        Some(s) if s < needed + SLACK / 4 => return Err(RootfsError::TooSmall { size: s, needed }),
        Some(s) => s,
        None => (needed + needed / 4 + SLACK).next_multiple_of(1 << 20),
    };
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = crate::cache::temp_name(dir, "rootfs");
    // create_new: never write through a name someone else made.
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| RootfsError::Write(tmp.clone(), e))?;
    file.set_len(size).map_err(|e| RootfsError::Write(tmp.clone(), e))?;
    drop(file);
    let made = run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-E", "root_owner=0:0", "-d"])
        .arg(from)
        .arg(&tmp))
    .map_err(RootfsError::Mkfs)
    .and_then(|_| match owners {
        Some(owners) => set_owners(from, &tmp, owners),
        None => Ok(()),
    })
    .and_then(|()| fs::rename(&tmp, out).map_err(|e| RootfsError::Write(out.to_path_buf(), e)));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// `debugfs` commands that give every file under `tree` (as `mkfs.ext4 -d`
/// copied it) the owner and mode `owners` names for it, skipping what
/// already matches.
pub fn owner_commands(tree: &Path, owners: &Ownership) -> Result<Vec<u8>, RootfsError> {
    let mut script = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = tree.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(|e| RootfsError::Read(path.clone(), e))?;
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(|e| RootfsError::Read(path.clone(), e))? {
                let entry = entry.map_err(|e| RootfsError::Read(path.clone(), e))?;
                stack.push(rel.join(entry.file_name()));
            }
        }
        // mkfs.ext4's root_owner=0:0 gives the root directory to root.
        let (uid, gid) = if rel.as_os_str().is_empty() { (0, 0) } else { (meta.uid(), meta.gid()) };
        let host = Owner { uid, gid, mode: meta.mode() & 0o7777 };
        let want = owners.0.get(&rel).copied().unwrap_or(Owner { uid: 0, gid: 0, mode: host.mode });
        if want == host {
            continue;
        }
        let name = rel.as_os_str().as_bytes();
        if name.contains(&b'\n') {
            return Err(RootfsError::Name(rel));
        }
        // debugfs reads a double-quoted argument, a quote in it doubled;
        // the path is absolute in the image, so no symlink is followed
        // but those the tree has as directories (none: it was walked).
        let mut quoted = b"\"/".to_vec();
        for &b in name {
            quoted.push(b);
            if b == b'"' {
                quoted.push(b'"');
            }
        }
        quoted.push(b'"');
        let mut set = |field: &str, value: String| {
            script.extend_from_slice(b"set_inode_field ");
            script.extend_from_slice(&quoted);
            script.extend_from_slice(format!(" {field} {value}\n").as_bytes());
        };
        if want.uid != host.uid {
            set("uid", want.uid.to_string());
        }
        if want.gid != host.gid {
            set("gid", want.gid.to_string());
        }
        if want.mode != host.mode {
            // i_mode holds the file type too.
            set("mode", format!("0{:o}", (meta.mode() & 0o170000) | (want.mode & 0o7777)));
        }
    }
    Ok(script)
}

/// Writes `owners` into the ext4 image `image` made from `tree`.
fn set_owners(tree: &Path, image: &Path, owners: &Ownership) -> Result<(), RootfsError> {
    let script = owner_commands(tree, owners)?;
    if script.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("debugfs");
    cmd.args(["-w", "-f", "-"]).arg(image);
    let command = crate::command::describe(&cmd);
    let failed =
        |stderr: String, status| RootfsError::Owners(CommandError::Failed { command: command.clone(), status, stderr });
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RootfsError::Owners(CommandError::Spawn { command: command.clone(), source }))?;
    // Written from a thread: debugfs's stderr could fill while we write.
    let mut stdin = child.stdin.take();
    let writer = std::thread::spawn(move || stdin.as_mut().map(|s| s.write_all(&script)));
    let output = child
        .wait_with_output()
        .map_err(|source| RootfsError::Owners(CommandError::Spawn { command: command.clone(), source }))?;
    let _ = writer.join();
    // debugfs exits 0 whatever a command did: anything on stderr but its
    // banner is a refusal.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("debugfs ")).collect();
    if !output.status.success() || !complaints.is_empty() {
        return Err(failed(complaints.join("; "), output.status));
    }
    Ok(())
}

/// Fills `dir` with a minimal root filesystem around the host's static
/// busybox: /bin/busybox and its applets as symlinks, the usual empty
/// mount points, /etc/passwd and /etc/group for root.
pub fn busybox_tree(dir: &Path) -> Result<(), RootfsError> {
    let busybox = crate::test_image::find_busybox().map_err(|_| RootfsError::NoBusybox)?;
    let w = |p: &Path, e| RootfsError::Write(p.to_path_buf(), e);
    for sub in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| w(&dir.join(sub), e))?;
    }
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).map_err(|e| w(&dir.join("tmp"), e))?;
    let (bytes, applets) = crate::test_image::static_busybox(&busybox).map_err(RootfsError::Busybox)?;
    let target = dir.join("bin/busybox");
    fs::write(&target, bytes).map_err(|e| w(&target, e))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(|e| w(&target, e))?;
    for applet in &applets {
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", &link).map_err(|e| w(&link, e))?;
        }
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").map_err(|e| w(&dir.join("etc/passwd"), e))?;
    fs::write(dir.join("etc/group"), "root:x:0:\n").map_err(|e| w(&dir.join("etc/group"), e))?;
    Ok(())
}

/// Writes the demo root filesystem (the host's static busybox, see
/// [`busybox_tree`]) as an ext4 image at `out`, every file owned by root
/// whoever builds it.
pub fn demo_rootfs(out: &Path) -> Result<(), RootfsError> {
    let tmp = std::env::temp_dir();
    let scratch = crate::cache::ScratchDir::new(&tmp, "vessel-demo-rootfs").map_err(|e| RootfsError::Write(tmp, e))?;
    let tree = scratch.path().join("root");
    busybox_tree(&tree)?;
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).map_err(|e| RootfsError::Write(tree.clone(), e))?;
    build_ext4_owned(&tree, out, None, &Ownership::default())
}

/// The demo root filesystem, built once per busybox binary and kept in the
/// cache (`<cache>/demo-rootfs/`): callers that write to their disk copy it.
pub fn cached_demo_rootfs() -> Result<PathBuf, RootfsError> {
    let busybox = crate::test_image::find_busybox().map_err(|_| RootfsError::NoBusybox)?;
    let meta = fs::metadata(&busybox).map_err(|e| RootfsError::Read(busybox.clone(), e))?;
    // The busybox binary is the only input: a new one (size, change time)
    // makes a new image.
    let key = format!("{}-{}-{}", meta.len(), meta.ctime(), meta.ctime_nsec());
    let dir = crate::cache::dir().map_err(RootfsError::Cache)?.join("demo-rootfs");
    let image = dir.join(format!("busybox-{key}.ext4"));
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&dir).map_err(|e| RootfsError::Write(dir.clone(), e))?;
    // build_ext4 writes it atomically (a temp file renamed into place).
    demo_rootfs(&image).map(|()| image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_size_counts_files_dirs_and_links() {
        let dir = std::env::temp_dir().join(format!("vessel-rootfs-size-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), vec![1u8; 5000]).unwrap();
        symlink("f", dir.join("a/b/l")).unwrap();
        // a, b: a block each; f: 8 KiB; l: a block.
        assert_eq!(content_size(&dir).unwrap(), 4096 + 4096 + 8192 + 4096);
        assert!(matches!(build_ext4(&dir.join("a/b/f"), &dir.join("x.img"), None), Err(RootfsError::NotADirectory(_))));
        assert!(matches!(build_ext4(&dir, &dir.join("x.img"), Some(4096)), Err(RootfsError::TooSmall { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owner_commands_quote_every_name_and_refuse_a_newline() {
        let dir = std::env::temp_dir().join(format!("vessel-rootfs-owners-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a b")).unwrap();
        fs::write(dir.join("a b/say \"hi\""), b"x").unwrap();
        fs::set_permissions(dir.join("a b/say \"hi\""), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.join("a b"), fs::Permissions::from_mode(0o755)).unwrap();
        let mut owners = Ownership::default();
        owners.0.insert("a b/say \"hi\"".into(), Owner { uid: 7, gid: 8, mode: 0o4711 });
        let uid = fs::metadata(&dir).unwrap().uid();
        let script = String::from_utf8(owner_commands(&dir, &owners).unwrap()).unwrap();
        let file = "set_inode_field \"/a b/say \"\"hi\"\"\"";
        assert!(script.contains(&format!("{file} uid 7\n{file} gid 8\n{file} mode 0104711\n")), "{script}");
        // Unlisted files are root's: only a runner other than root has
        // anything to change there.
        assert_eq!(script.contains("\"/a b\" uid 0"), uid != 0, "{script}");
        // A name debugfs cannot read is refused when it needs a change.
        fs::write(dir.join("new\nline"), b"x").unwrap();
        owners.0.insert("new\nline".into(), Owner { uid: 5, gid: 5, mode: 0o644 });
        assert!(matches!(owner_commands(&dir, &owners), Err(RootfsError::Name(_))));
        fs::remove_dir_all(&dir).unwrap();
    }
}
