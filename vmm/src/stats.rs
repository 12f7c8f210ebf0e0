//! Counters the VM keeps as it runs, lock-free, and the snapshot a stats
//! call returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::legacy::{BootTimer, SerialCounters};
use devices::virtio::CounterSet;
use vm_memory::GuestMemoryMmap;

/// Why a vCPU left KVM_RUN, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT reached user space.
    Hlt,
    /// Triple fault or a system event (reset, shutdown).
    Shutdown,
    /// Interrupted by a signal (pause, stop).
    Interrupted,
    /// Anything else.
    Other,
}

const EXIT_KINDS: usize = 8;

/// One vCPU's exit counters.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    exits: [AtomicU64; EXIT_KINDS],
}

impl VcpuCounters {
    /// Counts one exit.
    pub fn count(&self, kind: ExitKind) {
        self.exits[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, kind: ExitKind) -> u64 {
        self.exits[kind as usize].load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> VcpuExitStats {
        VcpuExitStats {
            io_in: self.get(ExitKind::IoIn),
            io_out: self.get(ExitKind::IoOut),
            mmio_read: self.get(ExitKind::MmioRead),
            mmio_write: self.get(ExitKind::MmioWrite),
            hlt: self.get(ExitKind::Hlt),
            shutdown: self.get(ExitKind::Shutdown),
            interrupted: self.get(ExitKind::Interrupted),
            other: self.get(ExitKind::Other),
        }
    }
}

/// One vCPU's exits by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuExitStats {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Shutdown / system events.
    pub shutdown: u64,
    /// Signal interruptions.
    pub interrupted: u64,
    /// Other exits.
    pub other: u64,
}

/// A point-in-time view of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStats {
    /// Exits per vCPU, by index.
    pub vcpus: Vec<VcpuExitStats>,
    /// Bytes the guest wrote to the serial console.
    pub serial_tx_bytes: u64,
    /// Time since the VM started.
    pub uptime: Duration,
    /// Time from start to the guest's boot-timer write, if it wrote.
    pub boot_time: Option<Duration>,
    /// Time from start (or restore) to the guest's first serial byte.
    pub first_output: Option<Duration>,
    /// Configured RAM.
    pub mem_size: u64,
    /// RAM resident in host memory.
    pub mem_resident: u64,
    /// Each virtio device's counters, in slot order (hot-plugged ones last).
    pub devices: Vec<DeviceStats>,
}

/// One device's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// What the device is ("blk /path/disk.img", "vsock cid 3", ...).
    pub name: String,
    /// (counter, value).
    pub counters: Vec<(&'static str, u64)>,
}

/// The live counters of a running VM, shared with its threads.
pub struct VmCounters {
    pub(crate) vcpus: Vec<Arc<VcpuCounters>>,
    pub(crate) serial: Arc<SerialCounters>,
    pub(crate) boot_time_ns: Arc<AtomicU64>,
    pub(crate) started: Instant,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) mem_size: u64,
    /// Device counters by name; hotplug appends.
    pub(crate) devices: std::sync::Mutex<Vec<(String, Arc<dyn CounterSet>)>>,
}

impl VmCounters {
    /// Reads every counter now. Costs one mincore per memory region.
    pub fn snapshot(&self) -> VmStats {
        VmStats {
            vcpus: self.vcpus.iter().map(|c| c.snapshot()).collect(),
            serial_tx_bytes: self.serial.tx_bytes.load(Ordering::Relaxed),
            uptime: self.started.elapsed(),
            boot_time: BootTimer::read(&self.boot_time_ns).map(Duration::from_nanos),
            first_output: self.first_output(),
            mem_size: self.mem_size,
            mem_resident: crate::memory::resident_bytes(&self.mem),
            devices: self
                .devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(name, c)| DeviceStats { name: name.clone(), counters: c.snapshot() })
                .collect(),
        }
    }

    /// Time from start to the guest's boot-timer write, if it wrote.
    pub fn boot_time(&self) -> Option<Duration> {
        BootTimer::read(&self.boot_time_ns).map(Duration::from_nanos)
    }

    /// Time from start (or restore) to the guest's first serial byte.
    pub fn first_output(&self) -> Option<Duration> {
        self.serial.first_tx.get().map(|t| t.saturating_duration_since(self.started))
    }
}
