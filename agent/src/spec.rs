//! From an OCI runtime spec to what the launch helper runs: everything the
//! host sent is checked here, and a bad value is refused with an error
//! that names it.
//!
//! What a spec grants is all a container gets: `process.capabilities`
//! (a set left out is empty), `linux.seccomp` (compiled here, so a
//! profile that cannot be applied is refused before anything runs) and
//! `linux.resources.devices` (a cgroup device program). Not applied yet,
//! and accepted so that ordinary specs still run: `linux.sysctl`, hooks.
//! User namespaces are refused.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Process, Spec};

use crate::caps::{CapSets, CapsError};
use crate::devices::{DeviceRule, DevicesError};
use crate::launch::{is_clean_absolute, InitConfig, MountConfig, Namespace, ProcessConfig};
use crate::seccomp::SeccompError;

/// What is wrong with a spec or a process (the reply says it).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec is not valid OCI runtime spec JSON.
    #[error("invalid OCI spec")]
    Spec(#[source] serde_json::Error),
    /// The process is not a valid OCI process object.
    #[error("invalid OCI process")]
    Process(#[source] serde_json::Error),
    /// The spec has no process.
    #[error("the OCI spec has no process")]
    NoProcess,
    /// A namespace kind the agent does not handle.
    #[error("namespace {0} is not supported")]
    UnsupportedNamespace(String),
    /// Joining another mount namespace (the root would be pivoted there).
    #[error("joining an existing mount namespace is not supported")]
    JoinMountNamespace,
    /// A hostname with the agent's own UTS namespace.
    #[error("the spec sets a hostname without a new uts namespace")]
    HostnameWithoutUts,
    /// uidMappings.
    #[error("user namespaces (uidMappings) are not supported")]
    UserNamespaces,
    /// A path that must be absolute and free of `..` is not.
    #[error("{what} {path:?} is not an absolute path without \"..\"")]
    BadPath {
        /// What the path is ("the process cwd", "maskedPaths entry").
        what: &'static str,
        /// The path.
        path: String,
    },
    /// No args.
    #[error("the process has no args")]
    NoArgs,
    /// An environment entry without `=`.
    #[error("environment entry {0:?} is not KEY=value")]
    BadEnv(String),
    /// A soft rlimit above its hard one.
    #[error("rlimit {name}: soft {soft} is above hard {hard}")]
    Rlimit {
        /// RLIMIT_*.
        name: String,
        /// Soft limit.
        soft: u64,
        /// Hard limit.
        hard: u64,
    },
    /// An rlimit name the agent does not know.
    #[error("unknown rlimit {0:?}")]
    UnknownRlimit(String),
    /// A bind mount's source is relative.
    #[error("bind mount source {from:?} for {destination:?} is not an absolute path")]
    RelativeBindSource {
        /// The source.
        from: PathBuf,
        /// The mount's destination.
        destination: PathBuf,
    },
    /// A bind mount's source does not exist.
    #[error("bind mount source {} for {destination:?} does not exist", from.display())]
    MissingBindSource {
        /// The source.
        from: PathBuf,
        /// The mount's destination.
        destination: PathBuf,
    },
    /// A limit that is neither positive nor -1.
    #[error("{what} {value} is neither positive nor -1 (unlimited)")]
    BadLimit {
        /// Which limit.
        what: &'static str,
        /// Its value.
        value: i64,
    },
    /// A CPU quota with a zero period.
    #[error("cpu quota {0} with a period of 0")]
    ZeroCpuPeriod(u64),
    /// A weight or cpuset the cgroup would not take.
    #[error(transparent)]
    Limit(#[from] LimitsError),
    /// Capability sets that cannot hold together.
    #[error(transparent)]
    Caps(#[from] CapsError),
    /// A seccomp profile that cannot be applied.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A device rule that cannot be applied.
    #[error(transparent)]
    Devices(#[from] DevicesError),
}

pub use crate::limits::Limits;
use crate::limits::{check_cpuset, shares_to_weight, Limit, LimitsError};

/// A spec, checked.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The first process's filesystem and namespaces (`rootfs` filled in by
    /// the caller).
    pub init: InitConfig,
    /// The first process.
    pub process: ProcessConfig,
    /// cgroup limits.
    pub limits: Limits,
    /// The spec's device rules (`linux.resources.devices`); None when it
    /// has none, which allows only the default devices all the same.
    pub devices: Option<Vec<DeviceRule>>,
}

/// Parses and checks a spec (config.json bytes).
pub fn parse_spec(json: &[u8], rootfs: &Path) -> Result<Checked, SpecError> {
    let spec: Spec = serde_json::from_slice(json).map_err(SpecError::Spec)?;
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    let mut process = check_process(process)?;
    let linux = spec.linux().as_ref();
    process.seccomp = linux.and_then(|l| l.seccomp().as_ref()).map(crate::seccomp::compile).transpose()?;
    let devices = linux
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .map(|d| crate::devices::check(d))
        .transpose()?;

    let mut new_namespaces = Vec::new();
    let mut join_namespaces = Vec::new();
    for ns in linux.and_then(|l| l.namespaces().as_ref()).into_iter().flatten() {
        let kind = match ns.typ() {
            LinuxNamespaceType::Mount => Namespace::Mount,
            LinuxNamespaceType::Pid => Namespace::Pid,
            LinuxNamespaceType::Uts => Namespace::Uts,
            LinuxNamespaceType::Ipc => Namespace::Ipc,
            LinuxNamespaceType::Network => Namespace::Net,
            LinuxNamespaceType::Cgroup => Namespace::Cgroup,
            other => return Err(SpecError::UnsupportedNamespace(format!("{other:?}"))),
        };
        match ns.path() {
            Some(path) => join_namespaces.push((kind, path.clone())),
            None => new_namespaces.push(kind),
        }
    }
    // The agent always gives a container its own mount namespace: the
    // root is pivoted, and that must not happen to the agent.
    if !new_namespaces.contains(&Namespace::Mount) {
        if join_namespaces.iter().any(|(ns, _)| *ns == Namespace::Mount) {
            return Err(SpecError::JoinMountNamespace);
        }
        new_namespaces.push(Namespace::Mount);
    }
    if spec.hostname().is_some() && !new_namespaces.contains(&Namespace::Uts) {
        return Err(SpecError::HostnameWithoutUts);
    }
    if linux.is_some_and(|l| l.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())) {
        return Err(SpecError::UserNamespaces);
    }

    let mut mounts = Vec::new();
    let mut default_devices = false;
    for m in spec.mounts().as_ref().into_iter().flatten() {
        let config = check_mount(m)?;
        if config.destination == Path::new("/dev") && config.fstype == "tmpfs" {
            default_devices = true;
        }
        mounts.push(config);
    }
    let paths = |list: Option<&Vec<String>>, what: &'static str| -> Result<Vec<String>, SpecError> {
        let list = list.cloned().unwrap_or_default();
        match list.iter().find(|p| !is_clean_absolute(Path::new(p))) {
            Some(bad) => Err(SpecError::BadPath { what, path: bad.clone() }),
            None => Ok(list),
        }
    };
    let masked_paths = paths(linux.and_then(|l| l.masked_paths().as_ref()), "maskedPaths entry")?;
    let readonly_paths = paths(linux.and_then(|l| l.readonly_paths().as_ref()), "readonlyPaths entry")?;
    let limits = linux.and_then(|l| l.resources().as_ref()).map(check_resources).transpose()?.unwrap_or_default();

    Ok(Checked {
        init: InitConfig {
            rootfs: rootfs.to_path_buf(),
            new_namespaces,
            join_namespaces,
            mounts,
            default_devices,
            hostname: spec.hostname().clone(),
            masked_paths,
            readonly_paths,
            root_readonly: spec.root().as_ref().is_some_and(|r| r.readonly().unwrap_or(false)),
        },
        process,
        limits,
        devices,
    })
}

/// Parses and checks an OCI `process` object (for an exec).
pub fn parse_process(json: &[u8]) -> Result<ProcessConfig, SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(SpecError::Process)?;
    check_process(&process)
}

fn check_process(p: &Process) -> Result<ProcessConfig, SpecError> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::NoArgs);
    }
    if !is_clean_absolute(p.cwd()) {
        return Err(SpecError::BadPath { what: "the process cwd", path: p.cwd().display().to_string() });
    }
    let env = p.env().clone().unwrap_or_default();
    if let Some(bad) = env.iter().find(|e| !e.contains('=') || e.starts_with('=')) {
        return Err(SpecError::BadEnv(bad.clone()));
    }
    let mut rlimits = Vec::new();
    for r in p.rlimits().as_ref().into_iter().flatten() {
        if r.soft() > r.hard() {
            return Err(SpecError::Rlimit { name: r.typ().to_string(), soft: r.soft(), hard: r.hard() });
        }
        rlimits.push((rlimit_number(&r.typ().to_string())?, r.soft(), r.hard()));
    }
    let user = p.user();
    Ok(ProcessConfig {
        args,
        env,
        cwd: p.cwd().clone(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        rlimits,
        terminal: p.terminal().unwrap_or(false),
        // A size that does not fit a terminal's is left for a resize.
        console_size: p.console_size().as_ref().and_then(|b| {
            let (rows, columns) = (u16::try_from(b.height()).ok()?, u16::try_from(b.width()).ok()?);
            (rows > 0 && columns > 0).then_some((rows, columns))
        }),
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        caps: CapSets::from_spec(p.capabilities().as_ref())?,
        // The container's, for an exec.
        seccomp: None,
    })
}

fn rlimit_number(name: &str) -> Result<u32, SpecError> {
    let n = match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        other => return Err(SpecError::UnknownRlimit(other.into())),
    };
    Ok(n)
}

/// Mount options: flags they set, flags they clear, or data for the
/// filesystem.
fn mount_option(option: &str) -> Option<(u64, bool)> {
    let (flag, clear) = match option {
        "ro" => (libc::MS_RDONLY, false),
        "rw" => (libc::MS_RDONLY, true),
        "nosuid" => (libc::MS_NOSUID, false),
        "suid" => (libc::MS_NOSUID, true),
        "nodev" => (libc::MS_NODEV, false),
        "dev" => (libc::MS_NODEV, true),
        "noexec" => (libc::MS_NOEXEC, false),
        "exec" => (libc::MS_NOEXEC, true),
        "sync" => (libc::MS_SYNCHRONOUS, false),
        "async" => (libc::MS_SYNCHRONOUS, true),
        "noatime" => (libc::MS_NOATIME, false),
        "nodiratime" => (libc::MS_NODIRATIME, false),
        "relatime" => (libc::MS_RELATIME, false),
        "strictatime" => (libc::MS_STRICTATIME, false),
        "bind" => (libc::MS_BIND, false),
        "rbind" => (libc::MS_BIND | libc::MS_REC, false),
        "private" => (libc::MS_PRIVATE, false),
        "rprivate" => (libc::MS_PRIVATE | libc::MS_REC, false),
        "slave" => (libc::MS_SLAVE, false),
        "rslave" => (libc::MS_SLAVE | libc::MS_REC, false),
        "shared" => (libc::MS_SHARED, false),
        "rshared" => (libc::MS_SHARED | libc::MS_REC, false),
        "unbindable" => (libc::MS_UNBINDABLE, false),
        "runbindable" => (libc::MS_UNBINDABLE | libc::MS_REC, false),
        _ => return None,
    };
    Some((flag, clear))
}

fn check_mount(m: &Mount) -> Result<MountConfig, SpecError> {
    let destination = m.destination();
    if !is_clean_absolute(destination) || destination == Path::new("/") {
        return Err(SpecError::BadPath {
            what: "mount destination (below /)",
            path: destination.display().to_string(),
        });
    }
    let mut flags = 0;
    let mut data = Vec::new();
    for option in m.options().as_ref().into_iter().flatten() {
        match mount_option(option) {
            Some((flag, false)) => flags |= flag,
            Some((flag, true)) => flags &= !flag,
            None => data.push(option.as_str()),
        }
    }
    let fstype = m.typ().clone().unwrap_or_default();
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(if fstype.is_empty() { "none" } else { &fstype }));
    if fstype == "bind" || fstype.is_empty() {
        flags |= libc::MS_BIND;
    }
    // A directory of the shared filesystem is resolved when the container
    // is made (see container.rs), once the share is mounted.
    let shared = source.to_str().is_some_and(|s| s.starts_with(agent_proto::spec::SHARED_SOURCE_PREFIX));
    if flags & libc::MS_BIND != 0 && !shared {
        if !source.is_absolute() {
            return Err(SpecError::RelativeBindSource { from: source, destination: destination.clone() });
        }
        if !source.exists() {
            return Err(SpecError::MissingBindSource { from: source, destination: destination.clone() });
        }
    }
    Ok(MountConfig {
        destination: destination.clone(),
        fstype: if flags & libc::MS_BIND != 0 { String::new() } else { fstype },
        source,
        flags,
        data: data.join(","),
    })
}

fn check_resources(r: &oci_spec::runtime::LinuxResources) -> Result<Limits, SpecError> {
    let positive = |what: &'static str, v: i64| -> Result<Option<u64>, SpecError> {
        match v {
            v if v > 0 => Ok(Some(v as u64)),
            // -1 is the spec's "unlimited".
            -1 => Ok(None),
            value => Err(SpecError::BadLimit { what, value }),
        }
    };
    let memory = match r.memory().as_ref().and_then(|m| m.limit()) {
        Some(v) => positive("memory limit", v)?.map(Limit::To),
        None => None,
    };
    let pids = match r.pids().as_ref().map(|p| p.limit()) {
        Some(v) => positive("pids limit", v)?.map(Limit::To),
        None => None,
    };
    let cpu = match r.cpu().as_ref().and_then(|c| c.quota().map(|q| (q, c.period().unwrap_or(100_000)))) {
        Some((quota, period)) => match positive("cpu quota", quota)? {
            Some(quota) if period == 0 => return Err(SpecError::ZeroCpuPeriod(quota)),
            Some(quota) => Some(Limit::To((quota, period))),
            None => None,
        },
        None => None,
    };
    let cpu_spec = r.cpu().as_ref();
    let cpu_weight = cpu_spec.and_then(|c| c.shares()).filter(|s| *s != 0).map(shares_to_weight);
    let cpuset = |what, v: Option<&String>| v.filter(|v| !v.is_empty()).map(|v| check_cpuset(what, v)).transpose();
    let cpuset_cpus = cpuset("cpuset.cpus", cpu_spec.and_then(|c| c.cpus().as_ref()))?;
    let cpuset_mems = cpuset("cpuset.mems", cpu_spec.and_then(|c| c.mems().as_ref()))?;
    Ok(Limits { memory, cpu, pids, cpu_weight, cpuset_cpus, cpuset_mems })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(process: &str, extra: &str) -> Vec<u8> {
        format!(r#"{{"ociVersion":"1.0.2","process":{process},"root":{{"path":"rootfs"}}{extra}}}"#).into_bytes()
    }

    const ECHO: &str = r#"{"args":["echo","hi"],"cwd":"/","user":{"uid":0,"gid":0},"env":["PATH=/bin"]}"#;

    #[test]
    fn a_minimal_spec_gets_its_own_mount_namespace() {
        let checked = parse_spec(&spec(ECHO, ""), Path::new("/r")).unwrap();
        assert_eq!(checked.init.new_namespaces, vec![Namespace::Mount]);
        assert_eq!(checked.process.args, ["echo", "hi"]);
        assert!(!checked.limits.any());
    }

    #[test]
    fn namespaces_mounts_and_limits_are_translated() {
        let extra = r#","hostname":"box","mounts":[{"destination":"/proc","type":"proc","source":"proc"},
            {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]}],
            "linux":{"namespaces":[{"type":"pid"},{"type":"uts"},{"type":"mount"}],
            "resources":{"memory":{"limit":67108864},"pids":{"limit":32},"cpu":{"quota":50000,"period":100000,"shares":1024,"cpus":"0-1","mems":"0"}},
            "maskedPaths":["/proc/kcore"],"readonlyPaths":["/proc/sys"]}"#;
        let checked = parse_spec(&spec(ECHO, extra), Path::new("/r")).unwrap();
        assert_eq!(checked.init.new_namespaces, vec![Namespace::Pid, Namespace::Uts, Namespace::Mount]);
        assert_eq!(checked.init.hostname.as_deref(), Some("box"));
        let dev = &checked.init.mounts[1];
        assert_eq!(dev.fstype, "tmpfs");
        assert_eq!(dev.data, "mode=755,size=65536k");
        assert_eq!(dev.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert!(checked.init.default_devices);
        let want = Limits {
            memory: Some(Limit::To(64 << 20)),
            cpu: Some(Limit::To((50_000, 100_000))),
            pids: Some(Limit::To(32)),
            cpu_weight: Some(39),
            cpuset_cpus: Some("0-1".into()),
            cpuset_mems: Some("0".into()),
        };
        assert_eq!(checked.limits, want);
    }

    #[test]
    fn bad_specs_are_refused_by_name() {
        let cases = [
            (spec(r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#, ""), "no args"),
            (spec(r#"{"args":["x"],"cwd":"rel","user":{"uid":0,"gid":0}}"#, ""), "cwd"),
            (spec(r#"{"args":["x"],"cwd":"/","env":["NOEQUALS"],"user":{"uid":0,"gid":0}}"#, ""), "NOEQUALS"),
            (spec(ECHO, r#","mounts":[{"destination":"/a/../../etc","type":"tmpfs"}]"#), "/a/../../etc"),
            (spec(ECHO, r#","mounts":[{"destination":"/x","type":"bind","source":"/no/such/dir"}]"#), "/no/such/dir"),
            (spec(ECHO, r#","hostname":"h""#), "uts"),
            (spec(ECHO, r#","linux":{"namespaces":[{"type":"user"}]}"#), "User"),
            (spec(ECHO, r#","linux":{"resources":{"memory":{"limit":-5}}}"#), "memory limit -5"),
            (spec(ECHO, r#","linux":{"maskedPaths":["relative"]}"#), "maskedPaths"),
            (spec(ECHO, r#","linux":{"resources":{"cpu":{"cpus":"0;reboot"}}}"#), "cpuset.cpus"),
            (b"{not json".to_vec(), "invalid OCI spec"),
            (br#"{"ociVersion":"1.0.2"}"#.to_vec(), "no process"),
        ];
        for (json, want) in cases {
            let err = crate::container::error_chain(&parse_spec(&json, Path::new("/r")).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
