//! The typed control API. Before boot a [`Vmm`] takes [`PrebootAction`]s
//! and `start` turns it into a [`VmmHandle`]; a running VM takes
//! [`VmmAction`]s through that handle, answered over a channel by the event
//! loop (woken by an EventFd). Pre-boot and runtime actions are different
//! types: asking a running VM to change its kernel does not compile.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::config::{BootSourceConfig, ConfigError, ConsoleOutput, DeviceConfig, MachineConfig};
use crate::stats::{VmCounters, VmStats};
use crate::vcpu::ExitReason;
use crate::StartError;

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
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmmActionError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The VM has ended; it takes no more actions.
    #[error("the VM is not running (it has exited)")]
    NotRunning,
    /// Pause did not complete.
    #[error("cannot pause the VM: {0}")]
    Pause(String),
    /// Every hotplug slot holds a device (or none were reserved).
    #[error("no free hotplug slot (reserve more with MachineConfig::hotplug_slots)")]
    NoFreeSlot,
    /// No device in that slot.
    #[error("hotplug slot {0} holds no device")]
    NoSuchSlot(usize),
    /// The device could not be attached.
    #[error("cannot attach the device: {0}")]
    Attach(String),
}

/// A request as the event loop receives it.
pub(crate) struct Request {
    pub(crate) action: VmmAction,
    pub(crate) reply: Sender<Result<VmmData, VmmActionError>>,
}

/// A VM being configured.
#[derive(Debug, Default)]
pub struct Vmm {
    pub(crate) machine: MachineConfig,
    pub(crate) boot: Option<BootSourceConfig>,
    pub(crate) console: Option<ConsoleOutput>,
    pub(crate) devices: Vec<DeviceConfig>,
}

impl Vmm {
    /// A VM with the default machine (1 vCPU, 128 MiB, seccomp on), no
    /// kernel yet, console on stdout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one pre-boot action.
    pub fn handle(&mut self, action: PrebootAction) -> Result<VmmData, VmmActionError> {
        match action {
            PrebootAction::ConfigureBootSource(boot) => self.boot = Some(boot),
            PrebootAction::ConfigureMachine(machine) => {
                machine.validate()?;
                self.machine = machine;
            }
            PrebootAction::ConfigureConsole(console) => self.console = Some(console),
            PrebootAction::AddDevice(device) => {
                if boot::layout::virtio_mmio_slot(self.devices.len()).is_none() {
                    return Err(ConfigError::TooManyDevices(self.devices.len() + 1).into());
                }
                self.devices.push(device);
            }
        }
        Ok(VmmData::Empty)
    }

    /// Boots the VM; returns once the boot vCPU is running.
    pub fn start(self) -> Result<VmmHandle, StartError> {
        crate::builder::build_and_start(self, Instant::now())
    }
}

/// A running VM, held by its embedder. Dropping it stops the VM.
pub struct VmmHandle {
    pub(crate) requests: Sender<Request>,
    pub(crate) wake: EventFd,
    pub(crate) counters: Arc<VmCounters>,
    pub(crate) event_loop: Option<JoinHandle<ExitReason>>,
}

impl VmmHandle {
    /// Sends `action` to the VM and waits for the answer.
    pub fn request(&self, action: VmmAction) -> Result<VmmData, VmmActionError> {
        let (reply, answer): (_, Receiver<_>) = mpsc::channel();
        self.requests.send(Request { action, reply }).map_err(|_| VmmActionError::NotRunning)?;
        self.wake.write(1).map_err(|_| VmmActionError::NotRunning)?;
        answer.recv().map_err(|_| VmmActionError::NotRunning)?
    }

    /// Reads the counters directly, without a round trip to the event loop.
    pub fn stats(&self) -> VmStats {
        self.counters.snapshot()
    }

    /// The VM's live counters, readable after the VM has ended too.
    pub fn counters(&self) -> Arc<VmCounters> {
        self.counters.clone()
    }

    /// Time from `start` to the guest's boot-timer write, if it wrote.
    pub fn boot_time(&self) -> Option<std::time::Duration> {
        self.counters.boot_time()
    }

    /// Waits for the VM to end and says how it ended.
    pub fn wait(mut self) -> ExitReason {
        self.join()
    }

    /// Says how the VM ended if it has, without blocking.
    pub fn try_wait(&mut self) -> Option<ExitReason> {
        if self.event_loop.as_ref().is_some_and(|t| t.is_finished()) {
            Some(self.join())
        } else {
            None
        }
    }

    /// Waits at most `timeout` for the VM to end; on timeout stops it and
    /// returns None.
    pub fn wait_timeout(mut self, timeout: std::time::Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(reason) = self.try_wait() {
                return Some(reason);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.try_wait()
    }

    fn join(&mut self) -> ExitReason {
        match self.event_loop.take() {
            Some(thread) => thread.join().unwrap_or_else(|_| ExitReason::Error("the VMM event loop panicked".into())),
            None => ExitReason::Stopped,
        }
    }
}

impl Drop for VmmHandle {
    fn drop(&mut self) {
        if self.event_loop.is_some() {
            // The loop may have ended already; then the request just fails.
            let _ = self.request(VmmAction::Stop);
            self.join();
        }
    }
}
