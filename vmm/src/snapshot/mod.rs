//! Snapshots: a paused VM written to a directory, and VMs made from one.
//!
//! A snapshot directory holds two files:
//! - `memory`: guest RAM at its layout's file offsets, sparse where the
//!   guest has nothing, then a 16-byte trailer (`MEMORY_MAGIC` and the
//!   snapshot's random ID);
//! - `vm.state`: the [`format::Description`] (vCPUs, interrupt
//!   controllers, PIT, clock, serial, every virtio-mmio slot's device and
//!   registers), versioned and checksummed, with the same ID.
//!
//! Both are written to temporary names and renamed into place, the
//! description last, so a directory holds a whole snapshot or none; a VM
//! mapping an older `memory` keeps its own (renamed-over) file. The ID
//! ties the two together: a description and a memory file of different
//! snapshots are refused.
//!
//! A restore ([`Template::restore`]) builds the VM with no boot path:
//! memory is a private copy-on-write mapping of `memory` (nothing is read
//! up front; the guest faults in what it touches), every KVM state is put
//! back, devices are made anew from their saved configuration with their
//! saved registers, and only when all of it has succeeded do the vCPU
//! threads start. Any failure before that drops the half-made VM.
//!
//! A [`Template`] is a snapshot loaded once (description parsed and
//! checked, memory file open) to restore many VMs from: each clone maps
//! the same file, so the pages none of them wrote are shared.

pub mod format;
pub mod kvm_state;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vm_memory::GuestMemoryMmap;

use self::format::{Description, FormatError};
use crate::builder::{self, StartError};
use crate::config::ConsoleOutput;
use crate::handle::VmmHandle;

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
    Vcpus(#[from] crate::vcpu::SaveError),
    /// KVM could not give the VM's state.
    #[error("cannot save the VM's interrupt controllers, PIT or clock")]
    Vm(#[from] kvm_state::StateError),
    /// A device cannot be saved.
    #[error("cannot save the device in virtio-mmio slot {0}: {1}")]
    Device(usize, &'static str),
    /// A file could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Why a VM could not be made from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A snapshot file could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The description was refused.
    #[error("{0} is not a usable snapshot description")]
    Format(PathBuf, #[source] FormatError),
    /// The memory file does not belong with the description.
    #[error("the memory file {0} does not match the snapshot: {1}")]
    Memory(PathBuf, String),
    /// The snapshot needs something this host's KVM lacks.
    #[error("this host cannot run the snapshot: {0}")]
    Host(String),
    /// Building or starting the VM failed (nothing was left running).
    #[error("cannot restore the VM")]
    Start(#[from] StartError),
}

/// How to restore: what a restored VM gets that is not in the snapshot.
#[derive(Debug)]
pub struct RestoreConfig {
    /// Where the serial console writes.
    pub console: ConsoleOutput,
    /// The vsock device's host socket, instead of the saved one (each
    /// clone of a template needs its own).
    pub vsock_uds: Option<PathBuf>,
    /// Install the seccomp filters (as `MachineConfig::seccomp`).
    pub seccomp: bool,
    /// Leave the vCPUs paused; `VmmAction::Resume` starts them.
    pub paused: bool,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        Self { console: ConsoleOutput::Stdout, vsock_uds: None, seccomp: true, paused: false }
    }
}

/// A snapshot loaded to restore VMs from, once or many times.
#[derive(Debug)]
pub struct Template {
    description: Description,
    memory: File,
    memory_path: PathBuf,
}

impl Template {
    /// Reads and checks the snapshot in `dir`: the description whole (its
    /// header, checksum and every value), and of the memory file only its
    /// size and trailer.
    pub fn load(dir: &Path) -> Result<Self, RestoreError> {
        let description_path = dir.join(DESCRIPTION_FILE);
        let bytes = read_bounded(&description_path)?;
        let description = Description::decode(&bytes).map_err(|e| RestoreError::Format(description_path.clone(), e))?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(|e| RestoreError::Read(memory_path.clone(), e))?;
        check_memory(&memory, &description).map_err(|why| RestoreError::Memory(memory_path.clone(), why))?;
        Ok(Self { description, memory, memory_path })
    }

    /// Guest RAM of every VM made from this snapshot, in bytes.
    pub fn mem_size(&self) -> u64 {
        self.description.mem_size
    }

    /// vCPUs of every VM made from this snapshot.
    pub fn vcpus(&self) -> usize {
        self.description.vcpus.len()
    }

    /// The memory file clones map.
    pub fn memory_path(&self) -> &Path {
        &self.memory_path
    }

    /// A new VM in the snapshot's state, running (or paused, as `config`
    /// says). Returns once its vCPU threads have started.
    pub fn restore(&self, config: RestoreConfig) -> Result<VmmHandle, RestoreError> {
        builder::restore_and_start(&self.description, &self.memory, config, Instant::now())
    }
}

/// Loads the snapshot in `dir` and restores one VM from it.
pub fn restore(dir: &Path, config: RestoreConfig) -> Result<VmmHandle, RestoreError> {
    Template::load(dir)?.restore(config)
}

/// Reads a description file, refusing one larger than any description.
fn read_bounded(path: &Path) -> Result<Vec<u8>, RestoreError> {
    let read = |e| RestoreError::Read(path.to_path_buf(), e);
    let file = File::open(path).map_err(read)?;
    let len = file.metadata().map_err(read)?.len();
    if len > format::MAX_DESCRIPTION + 64 {
        let e = std::io::Error::other(format!("{len} bytes is larger than any snapshot description"));
        return Err(read(e));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&file, len + 1), &mut bytes).map_err(read)?;
    Ok(bytes)
}

/// Checks the memory file is this snapshot's: RAM size plus trailer, and
/// the trailer's ID is the description's.
fn check_memory(memory: &File, description: &Description) -> Result<(), String> {
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
    std::fs::create_dir_all(dir).map_err(fail(dir))?;
    let memory_tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let description_tmp = dir.join(format!(".{DESCRIPTION_FILE}.tmp"));
    let memory = File::create(&memory_tmp).map_err(fail(&memory_tmp))?;
    let mem_size = captured.description.mem_size;
    memory.set_len(mem_size + TRAILER_LEN).map_err(fail(&memory_tmp))?;
    crate::memory::write_contents(&captured.mem, &memory).map_err(fail(&memory_tmp))?;
    let mut trailer = MEMORY_MAGIC.to_vec();
    trailer.extend_from_slice(&captured.description.id.to_le_bytes());
    memory.write_all_at(&trailer, mem_size).map_err(fail(&memory_tmp))?;
    memory.sync_all().map_err(fail(&memory_tmp))?;
    let mut description = File::create(&description_tmp).map_err(fail(&description_tmp))?;
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

#[cfg(test)]
pub(crate) mod tests {
    /// An error and its causes, as one line.
    pub(crate) fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    }
}
