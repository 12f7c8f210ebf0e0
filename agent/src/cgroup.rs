//! cgroup v2: one cgroup per container under the agent's root (in a guest,
//! `/sys/fs/cgroup/vessel`), its limits, statistics and freezer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::limits::{Limit, Limits};

/// The controllers the agent enables for containers.
const CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];

/// A controller enabled too where the kernel has it: a container that
/// asks for a cpuset is refused without it.
const CPUSET: &str = "cpuset";

/// How long pause waits for the kernel to report the cgroup frozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// The parent of every container's cgroup.
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    dir: PathBuf,
    /// The agent's own cgroup, where the processes it spawns start.
    home: PathBuf,
    /// Whether the cpuset controller is enabled for containers.
    cpuset: bool,
}

/// Statistics read from a container's cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// cpu.stat usage_usec, user_usec, system_usec.
    pub cpu_usage_usec: u64,
    /// User time.
    pub cpu_user_usec: u64,
    /// System time.
    pub cpu_system_usec: u64,
    /// memory.current.
    pub memory_usage: u64,
    /// memory.max (None: unlimited).
    pub memory_limit: Option<u64>,
    /// pids.current.
    pub pids_current: u64,
    /// pids.max (None: unlimited).
    pub pids_limit: Option<u64>,
    /// cpu.max (None: unlimited).
    pub cpu_limit: Option<(u64, u64)>,
    /// io.stat rbytes over every device.
    pub io_read_bytes: u64,
    /// io.stat wbytes over every device.
    pub io_write_bytes: u64,
    /// cpu.weight.
    pub cpu_weight: u64,
    /// cpuset.cpus and cpuset.mems as set for the cgroup ("" when not set,
    /// or without the cpuset controller).
    pub cpuset_cpus: String,
    /// See `cpuset_cpus`.
    pub cpuset_mems: String,
}

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// A value could not be written to a cgroup file.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup {0}")]
    Create(PathBuf, #[source] std::io::Error),
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {0}")]
    Remove(PathBuf, #[source] std::io::Error),
    /// The parent directory is not a cgroup v2 one.
    #[error("{0} is not in a cgroup v2 filesystem")]
    NotCgroup2(PathBuf, #[source] std::io::Error),
    /// The cgroup v2 hierarchy lacks controllers the agent needs.
    #[error("cgroup v2 at {path} lacks the controllers {missing}")]
    MissingControllers {
        /// The parent cgroup.
        path: PathBuf,
        /// The controllers missing, comma separated.
        missing: String,
    },
    /// A cgroup file held something other than a number or "max".
    #[error("{0:?} is neither a number nor \"max\"")]
    NotANumber(String),
    /// A cpuset was asked for and the kernel has no cpuset controller.
    #[error("the cgroup v2 hierarchy has no cpuset controller")]
    NoCpuset,
    /// The kernel did not report the freezer state in time.
    #[error("{path} did not report {want:?} within {timeout:?}")]
    FreezeTimeout {
        /// The cgroup.
        path: PathBuf,
        /// The `cgroup.events` line waited for.
        want: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|e| CgroupError::Read(path.into(), e))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write { path: path.into(), value: value.into(), source })
}

/// "max" or a number.
fn parse_max(text: &str) -> Result<Option<u64>, CgroupError> {
    match text.trim() {
        "max" => Ok(None),
        n => n.parse().map(Some).map_err(|_| CgroupError::NotANumber(n.into())),
    }
}

impl CgroupRoot {
    /// Sets up `dir` (created if missing) below a cgroup v2 mount, with the
    /// container controllers enabled for the cgroups under it. `dir`'s
    /// parent must be in a cgroup2 filesystem that has those controllers.
    pub fn new(dir: &Path) -> Result<Self, CgroupError> {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        let available = std::fs::read_to_string(parent.join("cgroup.controllers"))
            .map_err(|e| CgroupError::NotCgroup2(parent.into(), e))?;
        let missing: Vec<&str> =
            CONTROLLERS.iter().copied().filter(|c| !available.split_whitespace().any(|a| a == *c)).collect();
        if !missing.is_empty() {
            return Err(CgroupError::MissingControllers { path: parent.into(), missing: missing.join(", ") });
        }
        let cpuset = available.split_whitespace().any(|a| a == CPUSET);
        let enabled = CONTROLLERS.iter().copied().chain(cpuset.then_some(CPUSET));
        let enable: String = enabled.map(|c| format!("+{c} ")).collect();
        write(&parent.join("cgroup.subtree_control"), enable.trim_end())?;
        std::fs::create_dir_all(dir).map_err(|e| CgroupError::Create(dir.into(), e))?;
        write(&dir.join("cgroup.subtree_control"), enable.trim_end())?;
        Ok(CgroupRoot { dir: dir.to_path_buf(), home: own_cgroup()?, cpuset })
    }

    /// The agent's own cgroup: where a launch helper goes back to once it
    /// has forked the container's process inside the container's cgroup.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Creates a container's cgroup with its limits.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<PathBuf, CgroupError> {
        self.check(limits)?;
        let path = self.dir.join(id);
        std::fs::create_dir(&path).map_err(|e| CgroupError::Create(path.clone(), e))?;
        if let Err(e) = apply(&path, limits) {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Refuses limits this hierarchy cannot apply.
    pub fn check(&self, limits: &Limits) -> Result<(), CgroupError> {
        match limits.need_cpuset() && !self.cpuset {
            true => Err(CgroupError::NoCpuset),
            false => Ok(()),
        }
    }
}

/// The directory of this process's cgroup: the cgroup2 mount point (from
/// /proc/self/mountinfo) joined with its path in /proc/self/cgroup.
fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    // "... <mount point> <options> - cgroup2 <source> <super options>"
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right.starts_with("cgroup2 ").then(|| left.split(' ').nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| CgroupError::NotCgroup2("/proc/self/mountinfo".into(), std::io::ErrorKind::NotFound.into()))?;
    let own = read(Path::new("/proc/self/cgroup"))?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
    Ok(mount.join(path.trim_start_matches('/')))
}

/// Writes the limits that are set.
pub fn apply(cgroup: &Path, limits: &Limits) -> Result<(), CgroupError> {
    let max = |limit: &Limit<u64>| match limit {
        Limit::To(n) => n.to_string(),
        Limit::Unlimited => "max".into(),
    };
    // The cpuset first: the others never depend on it, and a cpuset the
    // kernel refuses leaves the rest unchanged.
    if let Some(cpus) = &limits.cpuset_cpus {
        write(&cgroup.join("cpuset.cpus"), cpus)?;
    }
    if let Some(mems) = &limits.cpuset_mems {
        write(&cgroup.join("cpuset.mems"), mems)?;
    }
    if let Some(memory) = &limits.memory {
        write(&cgroup.join("memory.max"), &max(memory))?;
    }
    match limits.cpu {
        Some(Limit::To((quota, period))) => write(&cgroup.join("cpu.max"), &format!("{quota} {period}"))?,
        // The period stays.
        Some(Limit::Unlimited) => write(&cgroup.join("cpu.max"), "max")?,
        None => {}
    }
    if let Some(weight) = limits.cpu_weight {
        write(&cgroup.join("cpu.weight"), &weight.to_string())?;
    }
    if let Some(pids) = &limits.pids {
        write(&cgroup.join("pids.max"), &max(pids))?;
    }
    Ok(())
}

/// The number of OOM kills memory.events has recorded for the cgroup.
pub fn oom_kills(cgroup: &Path) -> Result<u64, CgroupError> {
    let events = read(&cgroup.join("memory.events"))?;
    let count = events.lines().find_map(|l| l.strip_prefix("oom_kill ")).unwrap_or("0").trim();
    count.parse().map_err(|_| CgroupError::NotANumber(count.into()))
}

/// Moves a process into the cgroup.
pub fn add(cgroup: &Path, pid: i32) -> Result<(), CgroupError> {
    write(&cgroup.join("cgroup.procs"), &pid.to_string())
}

/// The processes in the cgroup, by their PIDs in the agent's namespace.
pub fn procs(cgroup: &Path) -> Result<Vec<i32>, CgroupError> {
    Ok(read(&cgroup.join("cgroup.procs"))?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Reads the container's statistics.
pub fn stats(cgroup: &Path) -> Result<Stats, CgroupError> {
    let mut stats = Stats::default();
    for line in read(&cgroup.join("cpu.stat"))?.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next().and_then(|v| v.parse().ok())) else { continue };
        match key {
            "usage_usec" => stats.cpu_usage_usec = value,
            "user_usec" => stats.cpu_user_usec = value,
            "system_usec" => stats.cpu_system_usec = value,
            _ => {}
        }
    }
    let number = |name: &str| -> Result<u64, CgroupError> {
        let text = read(&cgroup.join(name))?;
        text.trim().parse().map_err(|_| CgroupError::NotANumber(text.trim().into()))
    };
    stats.memory_usage = number("memory.current")?;
    stats.memory_limit = parse_max(&read(&cgroup.join("memory.max"))?)?;
    stats.pids_current = number("pids.current")?;
    stats.pids_limit = parse_max(&read(&cgroup.join("pids.max"))?)?;
    let cpu_max = read(&cgroup.join("cpu.max"))?;
    let mut cpu = cpu_max.split_whitespace();
    if let (Some(quota), Some(period)) = (cpu.next(), cpu.next()) {
        let period = period.parse().map_err(|_| CgroupError::NotANumber(cpu_max.trim().into()))?;
        stats.cpu_limit = parse_max(quota)?.map(|q| (q, period));
    }
    stats.cpu_weight = number("cpu.weight")?;
    // Absent without the cpuset controller.
    let optional = |name: &str| std::fs::read_to_string(cgroup.join(name)).map(|s| s.trim().to_string());
    stats.cpuset_cpus = optional("cpuset.cpus").unwrap_or_default();
    stats.cpuset_mems = optional("cpuset.mems").unwrap_or_default();
    for line in read(&cgroup.join("io.stat"))?.lines() {
        for field in line.split_whitespace().skip(1) {
            let Some((key, value)) = field.split_once('=') else { continue };
            let value: u64 = value.parse().unwrap_or(0);
            match key {
                "rbytes" => stats.io_read_bytes += value,
                "wbytes" => stats.io_write_bytes += value,
                _ => {}
            }
        }
    }
    Ok(stats)
}

/// Freezes (true) or thaws the cgroup, waiting until the kernel says it
/// is done.
pub fn freeze(cgroup: &Path, frozen: bool) -> Result<(), CgroupError> {
    write(&cgroup.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    let start = Instant::now();
    loop {
        if read(&cgroup.join("cgroup.events"))?.lines().any(|l| l == want) {
            return Ok(());
        }
        if start.elapsed() > FREEZE_TIMEOUT {
            // Undone, so the cgroup is left as the caller's state says it
            // is (a pause that failed leaves it running).
            let _ = write(&cgroup.join("cgroup.freeze"), if frozen { "0" } else { "1" });
            return Err(CgroupError::FreezeTimeout { path: cgroup.into(), want, timeout: FREEZE_TIMEOUT });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills every process in the cgroup (`cgroup.kill`, Linux 5.14+).
pub fn kill_all(cgroup: &Path) -> Result<(), CgroupError> {
    write(&cgroup.join("cgroup.kill"), "1")
}

/// Removes the cgroup once its processes are gone (they may take a moment
/// to leave after being killed).
pub fn remove(cgroup: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY: processes still leaving; anything else is final.
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) || start.elapsed() > Duration::from_secs(5) => {
                return Err(CgroupError::Remove(cgroup.into(), e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_values_parse() {
        assert_eq!(parse_max("max\n").ok(), Some(None));
        assert_eq!(parse_max("1048576\n").ok(), Some(Some(1 << 20)));
        assert!(parse_max("lots").unwrap_err().to_string().contains("lots"));
    }

    #[test]
    fn limits_are_written_to_their_files_and_lifted_to_max() {
        let dir = std::env::temp_dir().join(format!("vessel-cgroup-apply-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Limits {
            memory: Some(Limit::To(1 << 20)),
            cpu: Some(Limit::To((50_000, 100_000))),
            pids: Some(Limit::Unlimited),
            cpu_weight: Some(39),
            cpuset_cpus: Some("0-1".into()),
            cpuset_mems: Some("0".into()),
        };
        apply(&dir, &limits).unwrap();
        let file = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(file("memory.max"), "1048576");
        assert_eq!(file("cpu.max"), "50000 100000");
        assert_eq!(file("pids.max"), "max");
        assert_eq!(file("cpu.weight"), "39");
        assert_eq!((file("cpuset.cpus"), file("cpuset.mems")), ("0-1".into(), "0".into()));
        let lifted = Limits { memory: Some(Limit::Unlimited), cpu: Some(Limit::Unlimited), ..Default::default() };
        apply(&dir, &lifted).unwrap();
        assert_eq!(
            (file("memory.max"), file("cpu.max"), file("cpu.weight")),
            ("max".into(), "max".into(), "39".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        let dir = std::env::temp_dir().join(format!("vessel-cgroup-oom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n")
            .unwrap();
        assert_eq!(oom_kills(&dir).unwrap(), 2);
        std::fs::write(dir.join("memory.events"), "oom_kill lots\n").unwrap();
        assert!(oom_kills(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
