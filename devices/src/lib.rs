//! Device models: the legacy devices a microVM needs (serial console,
//! i8042 reset line, boot timer) and the bus they sit on. Devices never see
//! KVM: interrupts leave through `vm_superio::Trigger` implementations,
//! and the VMM routes vCPU exits to them through a [`bus::Bus`].

pub mod bus;
pub mod host_socket;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
