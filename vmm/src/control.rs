//! [`Vmm`]: a VM before boot. It takes [`PrebootAction`]s and `start`
//! turns it into a [`VmmHandle`], which takes `VmmAction`s. Pre-boot and
//! runtime actions are different types: asking a running VM to change its
//! kernel does not compile.

use std::time::Instant;

use crate::api::{PrebootAction, VmmActionError, VmmData};
use crate::builder::{self, StartError};
use crate::config::VmResources;
use crate::handle::VmmHandle;

/// A VM being configured.
#[derive(Debug, Default)]
pub struct Vmm {
    resources: VmResources,
}

impl Vmm {
    /// A VM with the default machine (1 vCPU, 128 MiB, seccomp on), no
    /// kernel yet, console on stdout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one pre-boot action.
    pub fn handle(&mut self, action: PrebootAction) -> Result<VmmData, VmmActionError> {
        let resources = &mut self.resources;
        match action {
            PrebootAction::ConfigureBootSource(boot) => resources.boot_source = Some(boot),
            PrebootAction::ConfigureMachine(machine) => {
                machine.validate()?;
                VmResources::check_slots(resources.devices.len(), machine.hotplug_slots)?;
                resources.machine = machine;
            }
            PrebootAction::ConfigureConsole(console) => resources.console = Some(console),
            PrebootAction::AddDevice(device) => {
                VmResources::check_slots(resources.devices.len() + 1, resources.machine.hotplug_slots)?;
                resources.devices.push(device);
            }
        }
        Ok(VmmData::Empty)
    }

    /// Boots the VM; returns once the boot vCPU is running.
    pub fn start(self) -> Result<VmmHandle, StartError> {
        builder::build_and_start(self.resources, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, DeviceConfig, MachineConfig, MAX_VIRTIO_SLOTS};

    fn refusal(result: Result<VmmData, VmmActionError>) -> Option<ConfigError> {
        match result {
            Err(VmmActionError::Config(e)) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn devices_past_the_last_virtio_slot_are_refused_before_boot() {
        let mut vmm = Vmm::new();
        for _ in 0..MAX_VIRTIO_SLOTS {
            assert!(vmm.handle(PrebootAction::AddDevice(DeviceConfig::Rng)).is_ok());
        }
        let refused = refusal(vmm.handle(PrebootAction::AddDevice(DeviceConfig::Rng)));
        assert_eq!(refused, Some(ConfigError::TooManyDevices(MAX_VIRTIO_SLOTS + 1)));
    }

    #[test]
    fn hotplug_slots_count_against_the_same_windows_as_devices() {
        let mut vmm = Vmm::new();
        vmm.handle(PrebootAction::AddDevice(DeviceConfig::Rng)).unwrap();
        let slots = MAX_VIRTIO_SLOTS as u8;
        let machine = MachineConfig { hotplug_slots: slots, ..MachineConfig::default() };
        let refused = refusal(vmm.handle(PrebootAction::ConfigureMachine(machine)));
        assert_eq!(refused, Some(ConfigError::TooManyDevices(MAX_VIRTIO_SLOTS + 1)));
        let machine = MachineConfig { hotplug_slots: slots - 1, ..MachineConfig::default() };
        assert!(vmm.handle(PrebootAction::ConfigureMachine(machine)).is_ok());
        let refused = refusal(vmm.handle(PrebootAction::AddDevice(DeviceConfig::Rng)));
        assert_eq!(refused, Some(ConfigError::TooManyDevices(MAX_VIRTIO_SLOTS + 1)));
    }
}
