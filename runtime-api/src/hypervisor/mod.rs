//! The `Hypervisor` trait: what the sandbox logic asks of a VM, and the
//! two VMs that answer it. The sandbox never branches on which it holds.
//!
//! - [`builtin::Builtin`]: vessel's own VMM, in this process; every
//!   operation is a direct call on its `VmmHandle`.
//! - [`qemu_tcg::QemuTcg`]: QEMU microvm with TCG, our device backends
//!   served to it over vhost-user: the fallback for hosts without usable
//!   hardware virtualization.

pub mod attached;
pub mod builtin;
pub mod qemu_tcg;

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The guest's vsock context ID (each sandbox is its own VM, so one is
/// enough).
pub const GUEST_CID: u64 = 3;

/// Which hypervisor runs a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    /// vessel's own VMM, in process.
    Builtin,
    /// QEMU microvm with TCG and our backends over vhost-user.
    QemuTcg,
}

impl HypervisorKind {
    /// Its name on the command line and in the state file.
    pub fn name(self) -> &'static str {
        match self {
            HypervisorKind::Builtin => "builtin",
            HypervisorKind::QemuTcg => "qemu-tcg",
        }
    }

    /// `builtin` where hardware virtualization is usable (`vmx` or `svm`
    /// in /proc/cpuinfo, and /dev/kvm opens), else `qemu-tcg`; the choice
    /// and its reason are logged once per process.
    pub fn detect() -> HypervisorKind {
        let (kind, why) = match hardware_virtualization_unusable() {
            None => (HypervisorKind::Builtin, "hardware virtualization is usable".to_string()),
            Some(why) => (HypervisorKind::QemuTcg, why),
        };
        static LOGGED: Once = Once::new();
        LOGGED.call_once(|| tracing::info!(hypervisor = kind.name(), reason = %why, "hypervisor chosen"));
        kind
    }
}

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "builtin" => Ok(HypervisorKind::Builtin),
            "qemu-tcg" => Ok(HypervisorKind::QemuTcg),
            other => Err(format!("unknown hypervisor {other:?}: use builtin or qemu-tcg")),
        }
    }
}

/// Why the builtin hypervisor cannot run a Linux guest here, or None.
/// A nested software KVM (our CI's "PVM") opens /dev/kvm but has no
/// `vmx`/`svm`: Linux crawls there, so it counts as unusable.
pub fn hardware_virtualization_unusable() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or_default();
    if !flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        return Some("the CPU shows no vmx or svm flag (no hardware virtualization, or a nested software KVM)".into());
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// A disk for the guest: a file, and the virtio serial the agent finds it
/// by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// Attach it read-only.
    pub read_only: bool,
    /// Its virtio-blk serial (at most 20 bytes).
    pub serial: String,
}

/// A NIC for the guest on a TAP device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// The network namespace the TAP is in (the hypervisor opens it
    /// there); `None`: this process's.
    pub netns: Option<PathBuf>,
    /// The TAP's name.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// The VM to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Where the hypervisor keeps its sockets and the console log (the
    /// sandbox's directory).
    pub dir: PathBuf,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs (the agent as /init).
    pub initrd: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Disks attached at boot.
    pub disks: Vec<Disk>,
    /// NICs attached at boot.
    pub nics: Vec<Nic>,
    /// Devices reserved for hotplug: empty virtio-mmio slots (builtin) or
    /// placeholder disks (qemu-tcg).
    pub hotplug_slots: u8,
    /// A virtio-fs device served by the vhost-user daemon (virtiofsd)
    /// listening on this socket, with tag [`crate::shared_fs::SHARED_TAG`].
    pub shared_fs: Option<PathBuf>,
}

impl VmSpec {
    /// The hybrid vsock socket: the agent's link. Guest-initiated
    /// connections to port P arrive on `<this>_P`.
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// A VM template: a snapshot of a booted, paused sandbox VM (written by
/// [`Hypervisor::snapshot`]), loaded once, that VMs are restored from
/// ([`Hypervisor::restore_from`]).
pub struct Template {
    dir: PathBuf,
    loaded: Option<vmm::snapshot::Template>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template").field("dir", &self.dir).field("loaded", &self.loaded.is_some()).finish()
    }
}

impl Template {
    /// Reads and checks the snapshot in `dir` (its description whole, of
    /// its memory file the size and trailer).
    pub fn load(dir: &Path) -> Result<Template, vmm::snapshot::RestoreError> {
        Ok(Template { dir: dir.to_path_buf(), loaded: Some(vmm::snapshot::Template::load(dir)?) })
    }

    /// The template in `dir`, its snapshot not read: for a hypervisor that
    /// reads its own files (a test double). The builtin hypervisor refuses
    /// to restore from it.
    pub fn unloaded(dir: &Path) -> Template {
        Template { dir: dir.to_path_buf(), loaded: None }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded snapshot, if [`Template::load`] made it.
    pub(crate) fn snapshot(&self) -> Option<&vmm::snapshot::Template> {
        self.loaded.as_ref()
    }
}

/// Why a hypervisor other than the builtin one makes no template.
pub const NO_SNAPSHOTS: &str = "only the builtin hypervisor snapshots VMs (QEMU 7.2 refuses to migrate a VM with \
                                vhost-user-vsock: \"non-migratable device\")";

/// What a hot-plugged device got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plugged {
    /// The virtio-mmio window the guest must bind to probe the device (an
    /// empty slot that was given one); `None` when the guest has the
    /// device already (a placeholder disk that was given a medium).
    pub bind_address: Option<u64>,
}

/// What a hot-plugged NIC got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PluggedNic {
    /// As for a disk: the window the guest must bind, if any.
    pub bind_address: Option<u64>,
    /// What [`Hypervisor::remove_nic`] takes.
    pub handle: usize,
    /// The MAC the guest's NIC has (a placeholder's own, fixed at boot).
    pub mac: [u8; 6],
}

/// The VM's figures, as far as the hypervisor can tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmFigures {
    /// Since the VM started.
    pub uptime: Duration,
    /// Guest memory configured, bytes.
    pub memory_bytes: u64,
    /// Guest memory resident on the host, bytes, when known.
    pub memory_resident_bytes: Option<u64>,
    /// VM exits, all vCPUs together, when the hypervisor counts them.
    pub vcpu_exits: Option<u64>,
    /// Per device: its name and its counters.
    pub devices: Vec<(String, Vec<(String, u64)>)>,
}

/// Why a hypervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The VM could not be started.
    #[error("cannot start the {0} VM")]
    Start(HypervisorKind, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// An operation on the running VM failed.
    #[error("the {kind} VM refused {op}")]
    Op {
        /// The hypervisor.
        kind: HypervisorKind,
        /// What was asked.
        op: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VM has ended.
    #[error("the VM is not running ({0})")]
    NotRunning(String),
    /// Only the process that owns the VM can do this.
    #[error("cannot {op} from here: {why} (process {owner_pid})")]
    Owned {
        /// What was asked.
        op: &'static str,
        /// The owner.
        owner_pid: u32,
        /// Why only the owner can.
        why: &'static str,
    },
    /// This hypervisor cannot do it (yet): the message says what instead.
    #[error("the {kind} hypervisor cannot {op}: {why}")]
    Unsupported {
        /// The hypervisor.
        kind: HypervisorKind,
        /// What was asked.
        op: &'static str,
        /// Why not, and what to do instead.
        why: &'static str,
    },
}

/// What the sandbox asks of a VM.
pub trait Hypervisor: Send {
    /// Which hypervisor this is.
    fn kind(&self) -> HypervisorKind;
    /// Boots the VM; returns once it runs (the agent announces itself on
    /// the vsock socket later).
    fn start(&mut self, spec: &VmSpec) -> Result<(), HypervisorError>;
    /// Why the VM has ended, if it has (checked while waiting on the guest).
    fn exited(&mut self) -> Option<String>;
    /// Stops every vCPU where it is.
    fn pause(&mut self) -> Result<(), HypervisorError>;
    /// Lets paused vCPUs run again.
    fn resume(&mut self) -> Result<(), HypervisorError>;
    /// Ends the VM and waits for it to be gone. Stopping a VM that has
    /// ended is not an error.
    fn stop(&mut self) -> Result<(), HypervisorError>;
    /// The VM's figures.
    fn figures(&mut self) -> Result<VmFigures, HypervisorError>;
    /// Puts `disk` in an empty hotplug slot.
    fn add_disk(&mut self, disk: &Disk) -> Result<Plugged, HypervisorError>;
    /// Puts a NIC on `nic`'s TAP in an empty hotplug slot.
    fn add_nic(&mut self, nic: &Nic) -> Result<PluggedNic, HypervisorError>;
    /// Takes out the NIC [`Hypervisor::add_nic`] gave `handle` (a guest
    /// that bound it must have unbound it first).
    fn remove_nic(&mut self, handle: usize) -> Result<(), HypervisorError>;
    /// The last `lines` of the guest's console, for error reports.
    fn console_tail(&self, lines: usize) -> String;
    /// The host process that runs the guest, when it is not this one
    /// (QEMU's), so that a sandbox fetched elsewhere can reach it.
    fn process_id(&self) -> Option<u32> {
        None
    }
    /// Writes the paused VM's snapshot into `dir` (a VM template).
    fn snapshot(&mut self, _dir: &Path) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported { kind: self.kind(), op: "snapshot a VM", why: NO_SNAPSHOTS })
    }
    /// Instead of [`Hypervisor::start`]: makes the VM from `template`, with
    /// `spec`'s directory for its vsock socket and console log, and runs
    /// it. The guest's vsock connections are reset: its agent announces
    /// itself again on `spec`'s socket.
    fn restore_from(&mut self, _template: &Template, _spec: &VmSpec) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported { kind: self.kind(), op: "restore a VM from a template", why: NO_SNAPSHOTS })
    }
    /// Whether this handle owns the VM (made it, and ends it when dropped).
    fn owned(&self) -> bool {
        true
    }
}

/// A new, unstarted hypervisor of `kind`.
pub fn new_hypervisor(kind: HypervisorKind) -> Box<dyn Hypervisor> {
    match kind {
        HypervisorKind::Builtin => Box::new(builtin::Builtin::default()),
        HypervisorKind::QemuTcg => Box::new(qemu_tcg::QemuTcg::default()),
    }
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub(crate) fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_names_round_trip_and_unknown_ones_are_named() {
        for kind in [HypervisorKind::Builtin, HypervisorKind::QemuTcg] {
            assert_eq!(kind.name().parse::<HypervisorKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.name()));
        }
        let err = "kvm".parse::<HypervisorKind>().unwrap_err();
        assert!(err.contains("\"kvm\"") && err.contains("builtin or qemu-tcg"), "{err}");
    }
}
