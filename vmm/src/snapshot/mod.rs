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
//! The directory and its files are made owner-only (0700, 0600): the
//! memory is the guest's, secrets included. A description names host files
//! (disks, a TAP, the vsock socket) as a boot configuration does: the checks
//! refuse a damaged or foreign snapshot, not a hostile author, so a
//! snapshot is trusted as far as the configuration it names.
//!
//! A [`Template`] is a snapshot loaded once (description parsed and
//! checked, memory file open) to restore many VMs from: each clone maps
//! the same file, so the pages none of them wrote are shared.

pub(crate) mod file;
pub mod format;
pub mod kvm_state;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use self::file::{SnapshotError, DESCRIPTION_FILE, MEMORY_FILE};
use self::format::{Description, FormatError};
use crate::builder::{self, StartError};
pub use crate::config::RestoreConfig;
use crate::handle::VmmHandle;

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
    /// Building or starting the VM failed (nothing was left running).
    #[error("cannot restore the VM")]
    Start(#[from] StartError),
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
        let bytes =
            file::read_bounded(&description_path).map_err(|e| RestoreError::Read(description_path.clone(), e))?;
        let description = Description::decode(&bytes).map_err(|e| RestoreError::Format(description_path.clone(), e))?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(|e| RestoreError::Read(memory_path.clone(), e))?;
        file::check_memory(&memory, &description).map_err(|why| RestoreError::Memory(memory_path.clone(), why))?;
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
        Ok(builder::restore_and_start(&self.description, &self.memory, config, Instant::now())?)
    }
}

/// Loads the snapshot in `dir` and restores one VM from it.
pub fn restore(dir: &Path, config: RestoreConfig) -> Result<VmmHandle, RestoreError> {
    Template::load(dir)?.restore(config)
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
