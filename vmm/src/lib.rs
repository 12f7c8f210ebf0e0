//! The virtual machine monitor: the only crate that talks to KVM.
//!
//! A [`Vmm`] is configured with [`PrebootAction`]s and started; the running
//! VM is driven through a [`VmmHandle`] with [`VmmAction`]s. Inside: one
//! thread per vCPU (which also emulates the PIO/MMIO devices it exits into),
//! one event-loop thread, guest memory backed by a memfd, legacy devices
//! from the `devices` crate, boot structures from the `boot` crate, and a
//! seccomp filter per thread kind.

mod api;
mod builder;
pub mod config;
mod control;
pub mod device_manager;
mod event_loop;
mod exit;
mod handle;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
pub mod vcpu;

pub use api::{PrebootAction, VmmAction, VmmActionError, VmmData};
pub use builder::StartError;
pub use config::{BootSourceConfig, ConfigError, ConsoleOutput, DeviceConfig, MachineConfig};
pub use control::Vmm;
pub use device_manager::{BackendError, DeviceManagerError, SlotError};
pub use exit::{ExitReason, SharedError, VmError};
pub use handle::VmmHandle;
pub use stats::{DeviceStats, VcpuExitStats, VmCounters, VmStats};
pub use vcpu::{PauseError, SaveError};
