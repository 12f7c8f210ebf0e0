//! The virtual machine monitor: the only crate that talks to KVM.
//!
//! A [`Vmm`] is configured with [`PrebootAction`]s and started; the running
//! VM is driven through a [`VmmHandle`] with [`VmmAction`]s. Inside: one
//! thread per vCPU (which also emulates the PIO/MMIO devices it exits into),
//! one event-loop thread, guest memory backed by a memfd, legacy devices
//! from the `devices` crate, boot structures from the `boot` crate, and a
//! seccomp filter per thread kind.

mod builder;
pub mod config;
mod control;
mod event_loop;
pub mod memory;
pub mod seccomp;
pub mod stats;
pub mod vcpu;

use std::path::PathBuf;

pub use config::{BootSourceConfig, ConfigError, ConsoleOutput, DeviceConfig, MachineConfig};
pub use control::{PrebootAction, Vmm, VmmAction, VmmActionError, VmmData, VmmHandle};
pub use stats::{DeviceStats, VcpuExitStats, VmCounters, VmStats};
pub use vcpu::ExitReason;

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The kernel file could not be opened.
    #[error("cannot open the kernel image {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The initrd file could not be opened.
    #[error("cannot open the initrd {0}")]
    OpenInitrd(PathBuf, #[source] std::io::Error),
    /// The console file could not be created.
    #[error("cannot create the console output file {0}")]
    OpenConsole(PathBuf, #[source] std::io::Error),
    /// Standard output could not be duplicated for the console.
    #[error("cannot use standard output for the console")]
    Console(#[source] std::io::Error),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs requested; KVM on this host allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM (KVM_CREATE_VM)")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A VM-wide setup ioctl failed.
    #[error("cannot set up the VM: {0} failed")]
    VmSetup(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be made.
    #[error("cannot create guest memory")]
    Memory(#[from] memory::MemoryError),
    /// The kernel, initrd or boot structures could not be loaded.
    #[error("cannot prepare the guest for boot")]
    Boot(#[from] boot::BootError),
    /// An EventFd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A device could not be made.
    #[error("cannot create the {0} device")]
    Device(&'static str, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// Devices collide on a bus.
    #[error("cannot place a device")]
    Bus(#[from] devices::BusError),
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// A vCPU could not be configured or started.
    #[error("cannot set up the vCPUs")]
    Vcpu(#[from] vcpu::VcpuError),
    /// The event loop thread could not be spawned.
    #[error("cannot spawn the event loop thread")]
    Thread(#[source] std::io::Error),
}
