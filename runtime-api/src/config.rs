//! What a sandbox and its containers are made of, as the embedder gives
//! it. Every type here is serde, because the state file keeps it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hypervisor::HypervisorKind;

/// The longest sandbox or container ID.
pub const MAX_ID_LEN: usize = 64;

/// Why an ID was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid ID {id:?}: {why}")]
pub struct InvalidId {
    /// The ID as given.
    pub id: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Checks a sandbox or container ID: 1 to 64 of `[A-Za-z0-9_.-]`, starting
/// with a letter or digit. IDs name directories and sockets, so nothing
/// else (no `/`, no `..`) is allowed.
pub fn validate_id(id: &str) -> Result<(), InvalidId> {
    let refuse = |why| Err(InvalidId { id: id.to_string(), why });
    if id.is_empty() {
        return refuse("it is empty");
    }
    if id.len() > MAX_ID_LEN {
        return refuse("it is longer than 64 characters");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return refuse("it must start with a letter or a digit");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return refuse("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// A sandbox: one microVM and the containers it starts with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// Its ID (see [`validate_id`]).
    pub id: String,
    /// Which hypervisor runs it; `None` chooses (see
    /// [`HypervisorKind::detect`]).
    pub hypervisor: Option<HypervisorKind>,
    /// The guest image directory (`vessel image build --out DIR`): the
    /// kernel and the initramfs holding the agent.
    pub guest_image: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// How long the guest may take to boot to its agent, in seconds
    /// (TCG guests take seconds; hardware KVM a fraction of one).
    pub boot_timeout_s: u64,
    /// The containers created with the sandbox (Kata's sandbox config
    /// holds them too); their root disks are attached at boot.
    pub containers: Vec<ContainerConfig>,
    /// Devices reserved for hotplug (disks for containers created later,
    /// and [`crate::Sandbox::add_disk`]).
    pub hotplug_slots: u8,
    /// The network namespace to join, if any (see [`NetworkConfig`]).
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Disks attached at boot, besides the containers' roots; containers
    /// mount them by serial ([`ContainerConfig::disks`]).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Give the sandbox its shared directory (virtio-fs) even if no
    /// container it starts with needs it, for containers created later
    /// with a directory root or volumes. It has one anyway when one does.
    #[serde(default)]
    pub shared_fs: bool,
    /// Free-form annotations for the caller (Kata's), kept in the state.
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The guest's own hostname (its containers have theirs); `None`: the
    /// sandbox's ID. Set through the agent before any container exists.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// A network namespace holding a veth, as a CNI plugin leaves it: the
/// guest gets the veth's MAC, addresses and routes, and its frames go
/// through a TAP redirected to and from the veth (Kata's tcfilter model).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The namespace's file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The veth inside it (`eth0`).
    pub interface: String,
}

impl SandboxConfig {
    /// The guest's hostname: [`SandboxConfig::hostname`] or the ID.
    pub fn guest_hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.id)
    }

    /// A sandbox `id` with one vCPU, 256 MiB, no containers yet, two
    /// hotplug slots, the hypervisor chosen for this host, and 120 s to
    /// boot.
    pub fn new(id: impl Into<String>, guest_image: impl Into<PathBuf>) -> Self {
        SandboxConfig {
            id: id.into(),
            hypervisor: None,
            guest_image: guest_image.into(),
            vcpus: 1,
            memory_mib: 256,
            boot_timeout_s: 120,
            containers: Vec::new(),
            hotplug_slots: 2,
            network: None,
            disks: Vec::new(),
            shared_fs: false,
            annotations: Default::default(),
            hostname: None,
        }
    }
}

/// A container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// Its ID, unique in the sandbox (see [`validate_id`]).
    pub id: String,
    /// Its root filesystem: an ext4 image (`vessel image rootfs`), which
    /// the container writes to, attached as a disk; or a directory, shared
    /// live through the sandbox's shared directory (virtio-fs), not copied.
    pub rootfs: PathBuf,
    /// The first process.
    pub process: ProcessConfig,
    /// The hostname (a UTS namespace of its own either way).
    pub hostname: Option<String>,
    /// cgroup v2 limits.
    pub resources: Resources,
    /// Disks of the sandbox (attached at boot or hot-plugged with
    /// `add_disk`) mounted in the container.
    #[serde(default)]
    pub disks: Vec<DiskMount>,
    /// Host directories shared live into the container (through the
    /// sandbox's shared directory).
    #[serde(default)]
    pub volumes: Vec<VolumeConfig>,
}

/// A host directory bind-mounted into a container through the sandbox's
/// shared directory: what either side writes, the other sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// The host directory: absolute, its real path (no symlink, no `..`).
    pub source: PathBuf,
    /// An absolute path in the container, without `..`.
    pub destination: String,
    /// Read-only, on the host and in the guest.
    pub read_only: bool,
}

impl ContainerConfig {
    /// Whether its root is a directory (shared) rather than a disk image.
    pub fn root_is_directory(&self) -> bool {
        self.rootfs.is_dir()
    }
}

/// A block device file given to the sandbox's VM as a virtio disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image file (or block device) on the host.
    pub path: PathBuf,
    /// The virtio serial the guest finds it by (see [`validate_serial`]).
    pub serial: String,
    /// Attached read-only: the guest cannot write to it at all.
    pub read_only: bool,
}

/// The longest virtio-blk serial (the device's ID field).
pub const MAX_SERIAL_LEN: usize = 20;

/// The prefix of the serials vessel gives container root disks; callers'
/// disks may not use it.
pub const ROOT_SERIAL_PREFIX: &str = "ctr-";

/// Why a disk serial was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid disk serial {serial:?}: {why}")]
pub struct InvalidSerial {
    /// The serial as given.
    pub serial: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Checks a caller's disk serial: 1 to 20 of `[A-Za-z0-9_.-]`, not starting
/// with [`ROOT_SERIAL_PREFIX`]. The guest compares serials byte for byte,
/// and virtio-blk has room for 20.
pub fn validate_serial(serial: &str) -> Result<(), InvalidSerial> {
    let refuse = |why| Err(InvalidSerial { serial: serial.to_string(), why });
    if serial.is_empty() {
        return refuse("it is empty");
    }
    if serial.len() > MAX_SERIAL_LEN {
        return refuse("it is longer than 20 bytes");
    }
    if !serial.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return refuse("only letters, digits, '_', '.' and '-' are allowed");
    }
    if serial.starts_with(ROOT_SERIAL_PREFIX) {
        return refuse("serials starting with \"ctr-\" are vessel's own, for container roots");
    }
    Ok(())
}

/// A sandbox disk, named by its virtio serial, mounted in a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMount {
    /// The disk's serial (as given to `add_disk`).
    pub serial: String,
    /// Where it is mounted in the container.
    pub destination: String,
    /// Its filesystem (`ext4`).
    pub fstype: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl ContainerConfig {
    /// A container `id` on `rootfs` running `args`, output captured.
    pub fn new(id: impl Into<String>, rootfs: impl Into<PathBuf>, args: &[&str]) -> Self {
        ContainerConfig {
            id: id.into(),
            rootfs: rootfs.into(),
            process: ProcessConfig::new(args),
            hostname: None,
            resources: Resources::default(),
            disks: Vec::new(),
            volumes: Vec::new(),
        }
    }
}

/// A process: a container's first one, or one entered into it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    /// The program and its arguments.
    pub args: Vec<String>,
    /// Environment entries (`NAME=value`) beyond PATH.
    pub env: Vec<String>,
    /// User and group IDs.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
    /// A terminal: stdout and stderr are one stream.
    pub terminal: bool,
    /// Give the process a stdin stream (without it, its stdin is /dev/null).
    pub stdin: bool,
    /// With a terminal, its size at start: rows, columns.
    #[serde(default)]
    pub console_size: Option<(u32, u32)>,
}

impl ProcessConfig {
    /// `args` as root, no terminal, no stdin.
    pub fn new(args: &[&str]) -> Self {
        ProcessConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            uid: 0,
            gid: 0,
            terminal: false,
            stdin: false,
            console_size: None,
        }
    }
}

/// A limit: a value, or lifted back to unlimited (the kernel's `max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Limit<T> {
    /// No limit.
    Max,
    /// This limit.
    Value(T),
}

/// cgroup v2 limits; `None` leaves one as it is (unlimited at creation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// memory.max in bytes.
    pub memory_bytes: Option<Limit<u64>>,
    /// cpu.max: quota and period in microseconds.
    pub cpu_quota_us: Option<Limit<(u64, u64)>>,
    /// pids.max.
    pub pids: Option<Limit<u64>>,
    /// cpu.weight (1-10000).
    pub cpu_weight: Option<u64>,
    /// cpuset.cpus, in the kernel's list format ("0-1,3").
    pub cpuset_cpus: Option<String>,
    /// cpuset.mems, in the same format.
    pub cpuset_mems: Option<String>,
}

impl Resources {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }

    /// `linux.resources` as OCI JSON, for the spec at create (where an
    /// unset limit and `Max` are the same: no limit). OCI has no weight,
    /// only shares: the weight is given as the shares that map to it.
    pub(crate) fn oci_json(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(Limit::Value(limit)) = self.memory_bytes {
            parts.push(format!(r#""memory":{{"limit":{limit}}}"#));
        }
        let mut cpu = Vec::new();
        if let Some(Limit::Value((quota, period))) = self.cpu_quota_us {
            cpu.push(format!(r#""quota":{quota},"period":{period}"#));
        }
        if let Some(weight) = self.cpu_weight {
            cpu.push(format!(r#""shares":{}"#, shares_for_weight(weight)));
        }
        if let Some(cpus) = &self.cpuset_cpus {
            cpu.push(format!(r#""cpus":{}"#, agent_proto::spec::json_string(cpus)));
        }
        if let Some(mems) = &self.cpuset_mems {
            cpu.push(format!(r#""mems":{}"#, agent_proto::spec::json_string(mems)));
        }
        if !cpu.is_empty() {
            parts.push(format!(r#""cpu":{{{}}}"#, cpu.join(",")));
        }
        if let Some(Limit::Value(limit)) = self.pids {
            parts.push(format!(r#""pids":{{"limit":{limit}}}"#));
        }
        (!parts.is_empty()).then(|| format!("{{{}}}", parts.join(",")))
    }

    /// These limits over `older`: what is set here wins.
    pub fn over(&self, older: &Resources) -> Resources {
        Resources {
            memory_bytes: self.memory_bytes.or(older.memory_bytes),
            cpu_quota_us: self.cpu_quota_us.or(older.cpu_quota_us),
            pids: self.pids.or(older.pids),
            cpu_weight: self.cpu_weight.or(older.cpu_weight),
            cpuset_cpus: self.cpuset_cpus.clone().or_else(|| older.cpuset_cpus.clone()),
            cpuset_mems: self.cpuset_mems.clone().or_else(|| older.cpuset_mems.clone()),
        }
    }
}

/// The OCI cpu shares that the agent (like runc) maps to `weight`:
/// weight = 1 + ((shares - 2) * 9999) / 262142, inverted, rounded up so
/// that the mapping gives `weight` back.
fn shares_for_weight(weight: u64) -> u64 {
    let weight = weight.clamp(1, 10_000);
    2 + ((weight - 1) * 262_142).div_ceil(9_999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_name_another_path_are_refused() {
        for good in ["a", "box-1", "A.b_c", &"x".repeat(64)] {
            assert_eq!(validate_id(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("..", "start with"),
            ("-x", "start with"),
            ("a/b", "only letters"),
            ("a b", "only letters"),
            (&"x".repeat(65), "longer"),
        ] {
            let err = validate_id(bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn resources_become_oci_json_only_when_set() {
        assert_eq!(Resources::default().oci_json(), None);
        let r = Resources {
            memory_bytes: Some(Limit::Value(1 << 20)),
            cpu_quota_us: Some(Limit::Value((5000, 10000))),
            pids: Some(Limit::Value(8)),
            cpuset_cpus: Some("0".into()),
            ..Default::default()
        };
        assert_eq!(
            r.oci_json().as_deref(),
            Some(r#"{"memory":{"limit":1048576},"cpu":{"quota":5000,"period":10000,"cpus":"0"},"pids":{"limit":8}}"#)
        );
        let lifted = Resources { memory_bytes: Some(Limit::Max), ..Default::default() };
        assert_eq!(lifted.oci_json(), None, "no limit at create is no limit");
    }

    #[test]
    fn a_weight_is_given_as_the_shares_that_map_back_to_it() {
        for weight in [1, 39, 100, 5000, 10_000] {
            let shares = shares_for_weight(weight);
            assert_eq!(1 + ((shares - 2) * 9999) / 262_142, weight, "weight {weight} -> shares {shares}");
        }
    }
}
