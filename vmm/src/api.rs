//! The control API's types: what an embedder asks ([`PrebootAction`]
//! before boot, [`VmmAction`] while the VM runs) and what it gets back
//! ([`VmmData`], [`VmmActionError`]). The modules that answer (`control`,
//! `event_loop`) and the one that asks (`handle`) meet here instead of
//! importing each other; this module imports only the types it carries.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use crate::config::{BootSourceConfig, ConfigError, ConsoleOutput, DeviceConfig, MachineConfig};
use crate::device_manager::{DeviceManagerError, PreparedDevice};
use crate::snapshot::file::{Captured, SnapshotError};
use crate::stats::VmStats;
use crate::vcpu::PauseError;

/// Actions on a VM that has not started.
#[derive(Debug)]
pub enum PrebootAction {
    /// Set the kernel, initrd and command line.
    ConfigureBootSource(BootSourceConfig),
    /// Set vCPUs, memory and sandboxing.
    ConfigureMachine(MachineConfig),
    /// Set where the serial console writes.
    ConfigureConsole(ConsoleOutput),
    /// Add a virtio device (virtio-mmio, in the order added).
    AddDevice(DeviceConfig),
}

/// Actions on a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAction {
    /// Stop all vCPUs where they are.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// End the VM.
    Stop,
    /// Read the VM's counters.
    GetStats,
    /// Put a device in the first empty hotplug slot (see
    /// `MachineConfig::hotplug_slots`); the guest then rebinds the slot.
    AttachDevice(DeviceConfig),
    /// Take the device out of a hotplug slot (the guest unbound it first).
    DetachDevice(usize),
    /// Write a snapshot of the paused VM to this directory (created if
    /// missing); see [`crate::snapshot`]. The VM stays paused.
    Snapshot(PathBuf),
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmData {
    /// Done, nothing to return.
    Empty,
    /// The counters.
    Stats(VmStats),
    /// Where a hot-plugged device went.
    Attached {
        /// Hotplug slot index.
        slot: usize,
        /// Its virtio-mmio window.
        addr: u64,
        /// Its interrupt line.
        irq: u32,
    },
}

/// A refused or failed action.
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The VM has ended; it takes no more actions.
    #[error("the VM is not running (it has exited)")]
    NotRunning,
    /// Pause did not complete.
    #[error("cannot pause the VM")]
    Pause(#[from] PauseError),
    /// The device could not be hot-plugged.
    #[error("cannot attach the device")]
    Attach(#[source] DeviceManagerError),
    /// The hotplug slot could not be emptied.
    #[error("cannot detach the device")]
    Detach(#[source] DeviceManagerError),
    /// The snapshot could not be taken.
    #[error("cannot snapshot the VM")]
    Snapshot(#[source] SnapshotError),
}

/// A request as the event loop receives it.
pub(crate) struct Request {
    pub(crate) action: VmmAction,
    /// For `AttachDevice`: its backend, made by the requesting thread (which
    /// opens the disk or TAP and binds the vsock socket), so that the
    /// event loop, which serves the guest's queues, never opens a file or
    /// binds a socket itself (see seccomp/rules.rs).
    pub(crate) prepared: Option<PreparedDevice>,
    pub(crate) reply: Sender<Reply>,
}

/// The event loop's answer to a [`Request`].
pub(crate) struct Reply {
    pub(crate) result: Result<VmmData, VmmActionError>,
    /// For `Snapshot`: the state read, for the requesting thread to write
    /// (the event loop writes no file).
    pub(crate) captured: Option<Box<Captured>>,
}

impl From<Result<VmmData, VmmActionError>> for Reply {
    fn from(result: Result<VmmData, VmmActionError>) -> Self {
        Self { result, captured: None }
    }
}
