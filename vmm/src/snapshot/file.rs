//! The snapshot directory's files: writing a captured VM into them, and
//! checking that a memory file belongs with a description.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;

use super::format::{self, Description};
use super::kvm_state::StateError;
use crate::vcpu::SaveError;

/// The description file in a snapshot directory.
pub const DESCRIPTION_FILE: &str = "vm.state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The memory file's trailer starts with this.
const MEMORY_MAGIC: &[u8; 8] = b"vsslmem\n";
const TRAILER_LEN: u64 = 16;

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The vCPUs' state could not be read.
    #[error("cannot save the vCPUs")]
    Vcpus(#[from] SaveError),
    /// KVM could not give the VM's state.
    #[error("cannot save the VM's interrupt controllers, PIT or clock")]
    Vm(#[from] StateError),
    /// A device cannot be saved.
    #[error("cannot save the device in virtio-mmio slot {0}: {1}")]
    Device(usize, &'static str),
    /// A file could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Reads a description file, refusing one larger than any description.
pub(crate) fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > format::MAX_DESCRIPTION + 64 {
        return Err(std::io::Error::other(format!("{len} bytes is larger than any snapshot description")));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&file, len + 1), &mut bytes)?;
    Ok(bytes)
}

/// Checks the memory file is this snapshot's: RAM size plus trailer, and
/// the trailer's ID is the description's.
pub(crate) fn check_memory(memory: &File, description: &Description) -> Result<(), String> {
    let len = memory.metadata().map_err(|e| format!("cannot stat it: {e}"))?.len();
    let want = description.mem_size + TRAILER_LEN;
    if len != want {
        return Err(format!("it is {len} bytes long; the snapshot's memory and trailer take {want}"));
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    memory.read_exact_at(&mut trailer, description.mem_size).map_err(|e| format!("cannot read its trailer: {e}"))?;
    if &trailer[..8] != MEMORY_MAGIC {
        return Err("its trailer is not a vessel memory trailer".into());
    }
    let id = u64::from_le_bytes([
        trailer[8],
        trailer[9],
        trailer[10],
        trailer[11],
        trailer[12],
        trailer[13],
        trailer[14],
        trailer[15],
    ]);
    if id != description.id {
        return Err(format!("it belongs to snapshot {id:#018x}, the description to {:#018x}", description.id));
    }
    Ok(())
}

/// A paused VM's state, read on the event loop, for the requesting thread
/// to write (the event loop opens no file, see `api::Request`).
pub(crate) struct Captured {
    pub(crate) description: Description,
    pub(crate) mem: GuestMemoryMmap,
}

/// Writes `captured` into `dir` (created if missing): memory, then the
/// description, each to a temporary name, synced, and renamed into place.
pub(crate) fn write(dir: &Path, captured: &Captured) -> Result<(), SnapshotError> {
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |e| SnapshotError::Write(path, e)
    };
    // The guest's memory is the guest's secrets: the directory is made
    // 0700 and the files 0600, whatever the umask.
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail(dir))?;
    let memory_tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let description_tmp = dir.join(format!(".{DESCRIPTION_FILE}.tmp"));
    let memory = private_file(&memory_tmp).map_err(fail(&memory_tmp))?;
    let mem_size = captured.description.mem_size;
    memory.set_len(mem_size + TRAILER_LEN).map_err(fail(&memory_tmp))?;
    crate::memory::write_contents(&captured.mem, &memory).map_err(fail(&memory_tmp))?;
    let mut trailer = MEMORY_MAGIC.to_vec();
    trailer.extend_from_slice(&captured.description.id.to_le_bytes());
    memory.write_all_at(&trailer, mem_size).map_err(fail(&memory_tmp))?;
    memory.sync_all().map_err(fail(&memory_tmp))?;
    let mut description = private_file(&description_tmp).map_err(fail(&description_tmp))?;
    description.write_all(&captured.description.encode()).map_err(fail(&description_tmp))?;
    description.sync_all().map_err(fail(&description_tmp))?;
    let memory_path = dir.join(MEMORY_FILE);
    std::fs::rename(&memory_tmp, &memory_path).map_err(fail(&memory_path))?;
    let description_path = dir.join(DESCRIPTION_FILE);
    std::fs::rename(&description_tmp, &description_path).map_err(fail(&description_path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(fail(dir))?;
    Ok(())
}

/// A fresh random snapshot ID.
pub(crate) fn new_id() -> u64 {
    let mut id = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 8 {
        // Only a collision of two snapshots' IDs depends on this; the
        // time is unique enough for that.
        return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(id)
}

/// Creates `path` anew, readable and writable by its owner only. A file
/// left there by an interrupted snapshot is removed first; O_EXCL makes
/// the new one ours, and never follows a link planted in its place.
fn private_file(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}
