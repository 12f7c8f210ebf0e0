//! [`Vmm`]: a VM before boot. It takes [`PrebootAction`]s and `start`
//! turns it into a [`VmmHandle`], which takes `VmmAction`s. Pre-boot and
//! runtime actions are different types: asking a running VM to change its
//! kernel does not compile.

use std::time::Instant;

use crate::api::{PrebootAction, VmmActionError, VmmData};
use crate::builder::{self, StartError};
use crate::config::{ConfigError, VmResources};
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
                resources.machine = machine;
            }
            PrebootAction::ConfigureConsole(console) => resources.console = Some(console),
            PrebootAction::AddDevice(device) => {
                if boot::layout::virtio_mmio_slot(resources.devices.len()).is_none() {
                    return Err(ConfigError::TooManyDevices(resources.devices.len() + 1).into());
                }
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
