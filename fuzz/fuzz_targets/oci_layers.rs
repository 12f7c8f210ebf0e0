//! OCI layer application (resources/src/oci.rs): tar entries, whiteouts
//! and opaque directories, layer over layer, with small caps. Nothing may
//! land outside the destination, whatever links the layers make; the
//! owners recorded must name only what is there, and the debugfs script
//! made from them must be well formed.
//!
//! Input: one byte L, then L+1 layers: each but the last a little-endian
//! u16 length and that many bytes; the last takes the rest.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use resources::oci::{unpack_layers, Limits};

/// A scratch directory, with a file beside the destinations that must
/// stay as it is.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vessel-fuzz-oci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("outside")).expect("fuzz directory");
        std::fs::write(dir.join("outside/keep"), b"keep").expect("sentinel");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, mut rest)) = data.split_first() else { return };
    let mut layers = Vec::new();
    for _ in 0..count % 4 {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else { break };
        let (layer, tail) = tail.split_at(usize::from(u16::from_le_bytes(*len)).min(tail.len()));
        layers.push(layer);
        rest = tail;
    }
    layers.push(rest);
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = scratch();
    let dest = dir.join(format!("r{}", N.fetch_add(1, Ordering::Relaxed)));
    let limits = Limits { max_bytes: 4 << 20, max_entries: 512 };
    if let Ok(owners) = unpack_layers(&layers, &dest, &limits) {
        for path in owners.0.keys() {
            assert!(
                std::fs::symlink_metadata(dest.join(path)).is_ok(),
                "owner recorded for {path:?}, which is not there"
            );
        }
        if let Ok(script) = resources::rootfs::owner_commands(&dest, &owners) {
            // One command a line, each naming a quoted absolute path.
            for line in script.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                assert!(line.starts_with(b"set_inode_field \"/"), "{}", String::from_utf8_lossy(line));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dest);
    assert_eq!(std::fs::read(dir.join("outside/keep")).ok().as_deref(), Some(&b"keep"[..]), "a file outside changed");
    let entries = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 1, "something was left beside the destination");
    assert_eq!(std::fs::read_dir(dir.join("outside")).map(|d| d.count()).unwrap_or(0), 1, "something landed outside");
});
