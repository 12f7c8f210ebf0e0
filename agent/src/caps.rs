//! Linux capabilities: the five sets an OCI process is granted, as bit
//! masks, and setting them in the launched process.
//!
//! A set the spec leaves out is empty: a container gets what its spec
//! grants and no more (root without `process.capabilities` has none).

use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};
use serde::{Deserialize, Serialize};

/// The five sets, bit `n` for capability number `n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    /// What the process and its children can ever have.
    pub bounding: u64,
    /// In use.
    pub effective: u64,
    /// May be made effective.
    pub permitted: u64,
    /// Kept across execve for programs with file capabilities.
    pub inheritable: u64,
    /// Kept across execve of any program (non-root).
    pub ambient: u64,
}

/// Sets that cannot hold together.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// A set with a capability another set must have first.
    #[error("capabilities: {what} {names} are not in the {of} set")]
    NotSubset {
        /// The set ("effective").
        what: &'static str,
        /// The set it must be part of ("permitted").
        of: &'static str,
        /// What is missing from `of`.
        names: String,
    },
}

/// The capability's number (linux/capability.h).
pub fn number(cap: Capability) -> u32 {
    match cap {
        Capability::Chown => 0,
        Capability::DacOverride => 1,
        Capability::DacReadSearch => 2,
        Capability::Fowner => 3,
        Capability::Fsetid => 4,
        Capability::Kill => 5,
        Capability::Setgid => 6,
        Capability::Setuid => 7,
        Capability::Setpcap => 8,
        Capability::LinuxImmutable => 9,
        Capability::NetBindService => 10,
        Capability::NetBroadcast => 11,
        Capability::NetAdmin => 12,
        Capability::NetRaw => 13,
        Capability::IpcLock => 14,
        Capability::IpcOwner => 15,
        Capability::SysModule => 16,
        Capability::SysRawio => 17,
        Capability::SysChroot => 18,
        Capability::SysPtrace => 19,
        Capability::SysPacct => 20,
        Capability::SysAdmin => 21,
        Capability::SysBoot => 22,
        Capability::SysNice => 23,
        Capability::SysResource => 24,
        Capability::SysTime => 25,
        Capability::SysTtyConfig => 26,
        Capability::Mknod => 27,
        Capability::Lease => 28,
        Capability::AuditWrite => 29,
        Capability::AuditControl => 30,
        Capability::Setfcap => 31,
        Capability::MacOverride => 32,
        Capability::MacAdmin => 33,
        Capability::Syslog => 34,
        Capability::WakeAlarm => 35,
        Capability::BlockSuspend => 36,
        Capability::AuditRead => 37,
        Capability::Perfmon => 38,
        Capability::Bpf => 39,
        Capability::CheckpointRestore => 40,
    }
}

fn mask(set: Option<&Capabilities>) -> u64 {
    set.into_iter().flatten().fold(0, |m, c| m | 1 << number(*c))
}

fn names(bits: u64) -> String {
    let n: Vec<String> = (0..64).filter(|b| bits & (1 << b) != 0).map(|b| format!("#{b}")).collect();
    n.join(", ")
}

impl CapSets {
    /// The spec's sets, checked: effective within permitted, ambient
    /// within permitted and inheritable (the kernel would refuse them).
    pub fn from_spec(caps: Option<&LinuxCapabilities>) -> Result<Self, CapsError> {
        let Some(c) = caps else { return Ok(CapSets::default()) };
        let sets = CapSets {
            bounding: mask(c.bounding().as_ref()),
            effective: mask(c.effective().as_ref()),
            permitted: mask(c.permitted().as_ref()),
            inheritable: mask(c.inheritable().as_ref()),
            ambient: mask(c.ambient().as_ref()),
        };
        let within = |what, bits: u64, of, set: u64| match bits & !set {
            0 => Ok(()),
            extra => Err(CapsError::NotSubset { what, of, names: names(extra) }),
        };
        within("effective", sets.effective, "permitted", sets.permitted)?;
        within("ambient", sets.ambient, "permitted", sets.permitted)?;
        within("ambient", sets.ambient, "inheritable", sets.inheritable)?;
        Ok(sets)
    }

    /// Every set cut down to `bounding` (an exec gets no more than its
    /// container's bounding set).
    pub fn within(self, bounding: u64) -> Self {
        CapSets {
            bounding: self.bounding & bounding,
            effective: self.effective & bounding,
            permitted: self.permitted & bounding,
            inheritable: self.inheritable & bounding,
            ambient: self.ambient & bounding,
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn errno(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Drops what is not in `bounding` from this process's bounding set
/// (needs CAP_SETPCAP: before the user changes).
pub fn drop_bounding(bounding: u64) -> Result<(), String> {
    for cap in 0..64u32 {
        if bounding & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            // Past the kernel's last capability.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(errno(format_args!("dropping capability {cap} from the bounding set")));
        }
    }
    Ok(())
}

/// Keeps the permitted set across a change of user (PR_SET_KEEPCAPS).
pub fn keep_across_setuid() -> Result<(), String> {
    // SAFETY: prctl with integer arguments.
    match unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(errno("PR_SET_KEEPCAPS")),
    }
}

fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), String> {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [
        CapData { effective: effective as u32, permitted: permitted as u32, inheritable: inheritable as u32 },
        CapData {
            effective: (effective >> 32) as u32,
            permitted: (permitted >> 32) as u32,
            inheritable: (inheritable >> 32) as u32,
        },
    ];
    // SAFETY: a version-3 header and the two data words it describes.
    match unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) } {
        0 => Ok(()),
        _ => Err(errno("capset")),
    }
}

fn capget() -> Result<(u64, u64, u64), String> {
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and room for the two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) } != 0 {
        return Err(errno("capget"));
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
    ))
}

/// Makes the whole permitted set effective again (a change of user
/// clears the effective set; the setup still needs it).
pub fn raise_permitted() -> Result<(), String> {
    let (_, permitted, inheritable) = capget()?;
    capset(permitted, permitted, inheritable)
}

/// Sets effective, permitted, inheritable and then ambient to `sets`.
pub fn set(sets: &CapSets) -> Result<(), String> {
    capset(sets.effective, sets.permitted, sets.inheritable)?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) } != 0 {
        return Err(errno("clearing the ambient set"));
    }
    for cap in (0..64u32).filter(|c| sets.ambient & (1 << c) != 0) {
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap as libc::c_ulong, 0, 0) };
        if r != 0 {
            return Err(errno(format_args!("raising ambient capability {cap}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_masks_and_must_nest() {
        let caps: LinuxCapabilities = serde_json::from_str(
            r#"{"bounding":["CAP_CHOWN","CAP_MKNOD","CAP_CHECKPOINT_RESTORE"],"effective":["CAP_MKNOD"],
                "permitted":["CAP_MKNOD","CAP_CHOWN"],"inheritable":["CAP_CHOWN"],"ambient":["CAP_CHOWN"]}"#,
        )
        .unwrap();
        let sets = CapSets::from_spec(Some(&caps)).unwrap();
        assert_eq!(sets.bounding, 1 | 1 << 27 | 1 << 40);
        assert_eq!((sets.effective, sets.permitted, sets.inheritable, sets.ambient), (1 << 27, 1 | 1 << 27, 1, 1));
        assert_eq!(sets.within(1 << 27).permitted, 1 << 27);
        assert_eq!(CapSets::from_spec(None).unwrap(), CapSets::default());

        let bad: LinuxCapabilities =
            serde_json::from_str(r#"{"effective":["CAP_SYS_ADMIN"],"permitted":["CAP_CHOWN"]}"#).unwrap();
        let err = CapSets::from_spec(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("effective #21 are not in the permitted set"), "{err}");
        assert!(serde_json::from_str::<LinuxCapabilities>(r#"{"bounding":["CAP_NO_SUCH"]}"#).is_err());
    }
}
