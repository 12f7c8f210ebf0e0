//! What a VM is made of, as the caller describes it before boot.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default RAM size.
pub const DEFAULT_MEM_MIB: u64 = 128;
/// APIC IDs and the MADT's processor IDs are 8 bits, and 0xff is broadcast.
pub const MAX_VCPUS: u8 = 254;
/// virtio-mmio slots (devices and hotplug slots together): one per
/// interrupt line the layout gives virtio.
pub const MAX_VIRTIO_SLOTS: usize = (boot::layout::VIRTIO_IRQ_LAST - boot::layout::VIRTIO_IRQ_BASE + 1) as usize;

/// The machine: vCPUs, memory, sandboxing. Fields left out of a stored
/// configuration take their defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to `MAX_VCPUS` (and KVM's own limit).
    pub vcpus: u8,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Install the per-thread seccomp filters (turn off only to debug).
    pub seccomp: bool,
    /// Empty virtio-mmio slots reserved for devices attached while the VM
    /// runs (announced at boot, device ID 0 until filled).
    pub hotplug_slots: u8,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self { vcpus: 1, mem_mib: DEFAULT_MEM_MIB, seccomp: true, hotplug_slots: 0 }
    }
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSourceConfig {
    /// Kernel image: ELF (PVH note or not) or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// A virtio device to give the guest; stored as `{"kind": "block", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// Entropy from the host's getrandom.
    Rng,
    /// A file-backed disk.
    Block(devices::virtio::block::BlockConfig),
    /// A vsock device with a Unix-socket host side.
    Vsock(devices::virtio::vsock::VsockConfig),
    /// A network card on a TAP device.
    Net(devices::virtio::net::NetConfig),
    /// A device whose queues a vhost-user daemon serves (virtio-fs by
    /// virtiofsd): the VMM is its vhost-user frontend.
    VhostUser(devices::virtio::vhost_user_frontend::VhostUserConfig),
}

/// Everything a VM is built from, as the pre-boot actions left it.
#[derive(Debug, Default)]
pub(crate) struct VmResources {
    /// vCPUs, memory, sandboxing, hotplug slots.
    pub(crate) machine: MachineConfig,
    /// What to boot; required before start.
    pub(crate) boot_source: Option<BootSourceConfig>,
    /// Where the console writes; standard output if None.
    pub(crate) console: Option<ConsoleOutput>,
    /// The boot-time virtio devices, in slot order.
    pub(crate) devices: Vec<DeviceConfig>,
}

impl VmResources {
    /// Checks that `devices` boot-time devices and `hotplug_slots` empty
    /// slots fit the layout's virtio-mmio windows together.
    pub(crate) fn check_slots(devices: usize, hotplug_slots: u8) -> Result<(), ConfigError> {
        let wanted = devices + usize::from(hotplug_slots);
        if wanted > MAX_VIRTIO_SLOTS {
            return Err(ConfigError::TooManyDevices(wanted));
        }
        Ok(())
    }
}

/// Where the serial console's output goes.
pub enum ConsoleOutput {
    /// The VMM process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Any writer: a pipe, a socket, a buffer in a test.
    Writer(Box<dyn Write + Send>),
    /// Nowhere (bytes are still counted).
    Discard,
}

impl fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleOutput::Stdout => f.write_str("Stdout"),
            ConsoleOutput::File(p) => f.debug_tuple("File").field(p).finish(),
            ConsoleOutput::Writer(_) => f.write_str("Writer(..)"),
            ConsoleOutput::Discard => f.write_str("Discard"),
        }
    }
}

/// A configuration the VMM refuses, with what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Zero vCPUs.
    #[error("the vCPU count must be at least 1")]
    NoVcpus,
    /// More than APIC IDs allow.
    #[error("{0} vCPUs requested; vessel supports at most {MAX_VCPUS}")]
    TooManyVcpus(u8),
    /// Zero memory.
    #[error("the memory size must be at least 2 MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    /// More memory than the host has.
    #[error("{requested} MiB of guest memory requested, but the host has only {host} MiB")]
    MemoryLargerThanHost {
        /// Requested MiB.
        requested: u64,
        /// Host RAM in MiB.
        host: u64,
    },
    /// More devices and hotplug slots than interrupt lines.
    #[error("{0} virtio devices and hotplug slots requested; at most {MAX_VIRTIO_SLOTS} fit")]
    TooManyDevices(usize),
    /// No boot source before start.
    #[error("no kernel configured: configure a boot source before starting the VM")]
    NoBootSource,
}

impl MachineConfig {
    /// Checks what can be checked without KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus(self.vcpus));
        }
        if self.mem_mib < boot::layout::MIN_MEM_SIZE >> 20 {
            return Err(ConfigError::MemoryTooSmall(self.mem_mib));
        }
        let host = host_memory_mib();
        if self.mem_mib > host {
            return Err(ConfigError::MemoryLargerThanHost { requested: self.mem_mib, host });
        }
        Ok(())
    }

    /// RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// Host physical memory in MiB (sysinfo), or u64::MAX if unknown.
fn host_memory_mib() -> u64 {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
    // SAFETY: sysinfo fills the struct it is given and nothing else.
    let rc = unsafe { libc::sysinfo(info.as_mut_ptr()) };
    if rc != 0 {
        return u64::MAX;
    }
    // SAFETY: sysinfo returned 0, so it initialised the struct.
    let info = unsafe { info.assume_init() };
    info.totalram.saturating_mul(u64::from(info.mem_unit)) >> 20
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_machine_configs_say_what_is_wrong() {
        let ok = MachineConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(MachineConfig { vcpus: 0, ..ok.clone() }.validate(), Err(ConfigError::NoVcpus));
        assert_eq!(MachineConfig { vcpus: 255, ..ok.clone() }.validate(), Err(ConfigError::TooManyVcpus(255)));
        assert_eq!(MachineConfig { mem_mib: 0, ..ok.clone() }.validate(), Err(ConfigError::MemoryTooSmall(0)));
        let huge = MachineConfig { mem_mib: 1 << 40, ..ok };
        assert!(matches!(huge.validate(), Err(ConfigError::MemoryLargerThanHost { .. })));
        assert!(huge.validate().unwrap_err().to_string().contains("the host has only"));
    }

    #[test]
    fn configurations_survive_a_round_trip_through_json() {
        use devices::virtio::vhost_user_frontend::{VhostUserConfig, VhostUserDevice};
        use devices::virtio::{block::BlockConfig, net::NetConfig, vsock::VsockConfig};
        let machine = MachineConfig { vcpus: 2, mem_mib: 256, seccomp: false, hotplug_slots: 3 };
        let boot = BootSourceConfig {
            kernel: "/boot/vmlinux".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: "console=ttyS0 quiet".into(),
        };
        let devices = vec![
            DeviceConfig::Rng,
            DeviceConfig::Block(BlockConfig {
                path: "/var/disk.img".into(),
                read_only: true,
                id: Some("ctr-0".into()),
                direct: false,
            }),
            DeviceConfig::Vsock(VsockConfig { guest_cid: 3, uds_path: "/run/vessel/vsock.sock".into() }),
            DeviceConfig::Net(NetConfig { tap: "tap0".into(), mac: [0x02, 0, 0, 0, 0, 1] }),
            DeviceConfig::VhostUser(VhostUserConfig {
                socket: "/run/vessel/fs.sock".into(),
                device: VhostUserDevice::Fs { tag: "shared".into(), request_queues: 1, queue_size: 512 },
            }),
        ];
        let json = serde_json::to_string(&(&machine, &boot, &devices)).unwrap();
        let back: (MachineConfig, BootSourceConfig, Vec<DeviceConfig>) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (machine, boot, devices));
    }

    #[test]
    fn a_stored_machine_config_may_leave_out_fields_that_have_defaults() {
        let machine: MachineConfig = serde_json::from_str(r#"{"vcpus": 4}"#).unwrap();
        assert_eq!(machine, MachineConfig { vcpus: 4, ..MachineConfig::default() });
        let device: DeviceConfig = serde_json::from_str(r#"{"kind": "rng"}"#).unwrap();
        assert_eq!(device, DeviceConfig::Rng);
    }
}
