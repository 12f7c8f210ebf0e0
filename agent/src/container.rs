//! The containers: create, start, exec, signal, wait, list processes,
//! cgroup limits, stats, pause/resume and remove.
//!
//! Each process is started by the launch helper (see [`crate::launch`]);
//! the agent keeps the helper's exit (the process's status) and the
//! process's own PID (for signals and `ps`).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use agent_proto::agent::rootfs::Source;
use agent_proto::agent::{Rootfs, Stdio as StdioPorts};

use crate::cgroup::{self, CgroupRoot, Stats};
use crate::launch::{self, Kind, Launch};
use crate::link::HostLink;
use crate::reaper::{Exit, Reaper};
use crate::spec::{self, Limits};

/// Why a request failed, with the kind of reply it gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// The request is wrong (bad spec, duplicate ID, wrong state).
    Invalid(String),
    /// An ID names nothing.
    NotFound(String),
    /// The agent could not do what was asked.
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Invalid(m) | Error::NotFound(m) | Error::Failed(m) => f.write_str(m),
        }
    }
}

type Result<T> = std::result::Result<T, Error>;

/// An error and its sources as one line (`cannot read X: No such file`):
/// the text a reply carries to the host.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl Error {
    /// A failure of something the agent tried, with its causes.
    pub fn failed(err: impl std::error::Error) -> Self {
        Error::Failed(error_chain(&err))
    }
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Set up, waiting for StartContainer.
    Created,
    /// Its first process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its first process exited.
    Stopped,
}

/// One process of a container.
struct Process {
    /// The process as the agent sees it.
    pid: i32,
    /// Its exit status, from the helper.
    exit: Arc<Exit>,
    /// The sync socket, until the process is let go.
    sync: Mutex<Option<UnixStream>>,
    /// Its terminal's master side, when it has one (for resizing).
    terminal: Option<OwnedFd>,
    /// A pidfd of a container's first process, which execs join: the
    /// process itself, never whoever has its PID later.
    pidfd: Option<OwnedFd>,
}

struct Container {
    state: State,
    /// The first process; its exec ID is "".
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    cgroup: Option<PathBuf>,
    /// A disk the agent mounted for the root (unmounted on remove).
    mounted_root: Option<PathBuf>,
    /// When StartContainer let the first process run (Unix ms; 0 before).
    started_at_ms: u64,
    /// The cgroup's OOM kills already reported by an OOM event.
    oom_kills_reported: u64,
    /// The spec's seccomp filter, which its execs get too.
    seccomp: Option<crate::seccomp::Filter>,
    /// The first process's bounding set: no exec gets more.
    bounding: u64,
}

/// How to find a container's processes (see [`Membership::pids`]).
struct Membership {
    init_pid: i32,
    init_exited: bool,
    cgroup: Option<PathBuf>,
    /// The processes the agent started for it that are still running.
    started: Vec<i32>,
}

impl Membership {
    /// The container's processes: the members of its cgroup; without one,
    /// those in its own PID namespace while its first process runs; and
    /// when it shares the agent's PID namespace, only the processes the
    /// agent started for it (their children cannot be told from the
    /// agent's own, and "all" must never reach those).
    fn pids(&self) -> Vec<i32> {
        if let Some(cg) = &self.cgroup {
            if let Ok(pids) = cgroup::procs(cg) {
                return pids;
            }
        }
        if self.init_exited {
            return Vec::new();
        }
        let pid_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        let Some(ns) = pid_ns(&self.init_pid.to_string()) else { return Vec::new() };
        if Some(&ns) == pid_ns("self").as_ref() {
            return self.started.clone();
        }
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|pid| pid_ns(&pid.to_string()).as_ref() == Some(&ns))
            .collect()
    }
}

impl Container {
    fn membership(&self) -> Membership {
        let started = std::iter::once(&self.init)
            .chain(self.execs.values())
            .filter(|p| p.exit.get().is_none())
            .map(|p| p.pid)
            .collect();
        Membership {
            init_pid: self.init.pid,
            init_exited: self.init.exit.get().is_some(),
            cgroup: self.cgroup.clone(),
            started,
        }
    }

    fn state(&mut self) -> State {
        self.status().state
    }

    /// The state and the first process's exit, read once so that they
    /// agree.
    fn status(&mut self) -> Status {
        let exit_code = self.init.exit.get();
        // A process killed before it was started stops its container too.
        if exit_code.is_some() {
            self.state = State::Stopped;
        }
        Status { state: self.state, pid: self.init.pid, started_at_ms: self.started_at_ms, exit_code }
    }

    fn process(&self, exec_id: &str, container_id: &str) -> Result<Arc<Process>> {
        match exec_id {
            "" => Ok(self.init.clone()),
            id => self.execs.get(id).cloned().ok_or_else(|| {
                Error::NotFound(format!("container {container_id:?} has no process with exec ID {id:?}"))
            }),
        }
    }
}

/// A container's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Where it is in its life.
    pub state: State,
    /// Its first process, as the agent sees it.
    pub pid: i32,
    /// When it was started (Unix ms; 0 before).
    pub started_at_ms: u64,
    /// The first process's status once it has exited.
    pub exit_code: Option<i32>,
}

/// How a reply names a process.
fn describe(id: &str, exec_id: &str) -> String {
    match exec_id {
        "" => format!("the first process of container {id:?}"),
        exec => format!("process {exec:?} of container {id:?}"),
    }
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// One row of `ps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessRow {
    /// PID as the agent sees it.
    pub pid: i32,
    /// PID inside the container.
    pub ns_pid: i32,
    /// Real UID.
    pub uid: u32,
    /// User name from the container's /etc/passwd, else the UID.
    pub user: String,
    /// Command line.
    pub command: String,
}

/// Where the agent keeps its things, and how it reaches the host.
pub struct Config {
    /// The host link for stdio streams.
    pub link: HostLink,
    /// The cgroup v2 parent of container cgroups, if there is one.
    pub cgroups: Option<CgroupRoot>,
    /// Where disk roots are mounted (`<run_dir>/<id>/rootfs`).
    pub run_dir: PathBuf,
    /// The agent binary, re-executed as the launch helper.
    pub self_exe: PathBuf,
}

/// Every container.
pub struct Containers {
    config: Config,
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Container>>,
    /// The IDs a create or an exec is making (`id`, or `id/exec_id`), not
    /// yet in the map: a second call for the same one is refused at once
    /// instead of racing the first for the name, its cgroup and its mount.
    pending: Mutex<HashSet<String>>,
}

/// An ID reserved in [`Containers::pending`] until dropped.
struct Pending<'a> {
    pending: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// An ID the agent accepts for a container or process: what fits in a
/// path component and a cgroup name.
fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !id.starts_with('.');
    match ok {
        true => Ok(()),
        false => Err(Error::Invalid(format!(
            "{what} {id:?} is not 1-128 characters of letters, digits, '-', '_' or '.' (not starting with '.')"
        ))),
    }
}

impl Containers {
    /// An empty set of containers.
    pub fn new(config: Config, reaper: Arc<Reaper>) -> Self {
        Containers { config, reaper, containers: Mutex::new(HashMap::new()), pending: Mutex::default() }
    }

    /// Reserves `key` (see [`Containers::pending`]) if `check`, run on the
    /// containers under the same lock, allows it; returns what `check`
    /// found and the reservation.
    fn reserve<T>(
        &self,
        key: String,
        check: impl FnOnce(&mut HashMap<String, Container>) -> Result<T>,
    ) -> Result<(T, Pending<'_>)> {
        let mut containers = self.lock();
        let found = check(&mut containers)?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.insert(key.clone()) {
            return Err(Error::Invalid(format!("{key:?} is already being created")));
        }
        Ok((found, Pending { pending: &self.pending, key }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> Result<T>) -> Result<T> {
        let mut containers = self.lock();
        let c = containers.get_mut(id).ok_or_else(|| Error::NotFound(format!("no container with ID {id:?}")))?;
        f(c)
    }

    /// Creates a container: its root, cgroup and first process, stopped
    /// just before `exec`.
    pub fn create(&self, id: &str, spec_json: &[u8], rootfs: &Rootfs, stdio: &StdioPorts) -> Result<()> {
        check_id("container ID", id)?;
        let ((), _pending) = self.reserve(id.to_string(), |containers| match containers.contains_key(id) {
            true => Err(Error::Invalid(format!("a container with ID {id:?} already exists"))),
            false => Ok(()),
        })?;
        let (root, mounted_root) = self.prepare_root(id, rootfs)?;
        let undo_root = |mounted: &Option<PathBuf>| {
            if let Some(dir) = mounted {
                unmount(dir);
            }
        };
        let mut checked = match spec::parse_spec(spec_json, &root) {
            Ok(c) => c,
            Err(e) => {
                undo_root(&mounted_root);
                return Err(Error::Invalid(error_chain(&e)));
            }
        };
        if let Err(e) = resolve_disk_sources(&mut checked.init.mounts) {
            undo_root(&mounted_root);
            return Err(e);
        }
        if self.config.cgroups.is_none() && checked.devices.as_ref().is_some_and(|d| !d.is_empty()) {
            undo_root(&mounted_root);
            return Err(Error::Invalid("the spec sets device rules, but this agent has no cgroup v2 hierarchy".into()));
        }
        let cgroup = match self.make_cgroup(id, &checked.limits) {
            Ok(c) => c,
            Err(e) => {
                undo_root(&mounted_root);
                return Err(e);
            }
        };
        let (seccomp, bounding) = (checked.process.seccomp.clone(), checked.process.caps.bounding);
        let launch = Launch { kind: Kind::Init(checked.init), process: checked.process };
        let devices = checked.devices.unwrap_or_default();
        // The device program goes on once the process has set up its root
        // (mounting a disk opens a block device), before it may exec.
        let launched = self.launch(&launch, stdio, cgroup.as_deref(), None).and_then(|p| match &cgroup {
            Some(cg) => match crate::devices::apply(cg, &devices) {
                Ok(()) => Ok(p),
                Err(e) => {
                    drop(p.sync.lock().unwrap_or_else(|e| e.into_inner()).take());
                    kill(p.pid, libc::SIGKILL);
                    p.exit.wait();
                    Err(Error::failed(e))
                }
            },
            None => Ok(p),
        });
        let process = match launched {
            Ok(p) => p,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cgroup::remove(cg);
                }
                undo_root(&mounted_root);
                return Err(e);
            }
        };
        self.lock().insert(
            id.to_string(),
            Container {
                state: State::Created,
                init: process,
                execs: HashMap::new(),
                cgroup,
                mounted_root,
                started_at_ms: 0,
                oom_kills_reported: 0,
                seccomp,
                bounding,
            },
        );
        Ok(())
    }

    fn prepare_root(&self, id: &str, rootfs: &Rootfs) -> Result<(PathBuf, Option<PathBuf>)> {
        match &rootfs.source {
            Some(Source::Path(path)) => {
                let path = PathBuf::from(path);
                if !path.is_absolute() || !path.is_dir() {
                    return Err(Error::Invalid(format!("rootfs path {} is not an existing directory", path.display())));
                }
                Ok((path, None))
            }
            Some(Source::SharedPath(path)) => Ok((crate::shared::directory(path).map_err(Error::Invalid)?, None)),
            Some(Source::DiskSerial(serial)) => {
                let device = find_disk(serial)?;
                let dir = self.config.run_dir.join(id).join("rootfs");
                std::fs::create_dir_all(&dir).map_err(|e| Error::Failed(format!("creating {}: {e}", dir.display())))?;
                let fstype = if rootfs.fstype.is_empty() { "ext4" } else { rootfs.fstype.as_str() };
                let flags = if rootfs.read_only { libc::MS_RDONLY } else { 0 };
                mount_disk(&device, &dir, fstype, flags).map_err(Error::Failed)?;
                Ok((dir.clone(), Some(dir)))
            }
            // Unknown to this agent: a field from a newer protocol.
            Some(_) | None => Err(Error::Invalid("the request names no rootfs (disk_serial or path)".into())),
        }
    }

    fn make_cgroup(&self, id: &str, limits: &Limits) -> Result<Option<PathBuf>> {
        match &self.config.cgroups {
            Some(root) => root.create(id, limits).map(Some).map_err(Error::failed),
            None if limits.any() => {
                Err(Error::Invalid("the spec sets cgroup limits, but this agent has no cgroup v2 hierarchy".into()))
            }
            None => Ok(None),
        }
    }

    /// Runs the helper and waits until the process is set up.
    fn launch(
        &self,
        launch: &Launch,
        ports: &StdioPorts,
        cgroup: Option<&Path>,
        join: Option<&OwnedFd>,
    ) -> Result<Arc<Process>> {
        let ([stdin, stdout, stderr], copier) =
            crate::stdio::plumb(&self.config.link, ports, launch.process.terminal, launch.process.console_size)
                .map_err(Error::failed)?;
        let json = serde_json::to_vec(launch).map_err(|e| Error::Failed(format!("encoding the launch: {e}")))?;
        let (config_read, config_write) = launch::pipe().map_err(|e| Error::Failed(format!("pipe: {e}")))?;
        let (sync_agent, sync_helper) = UnixStream::pair().map_err(|e| Error::Failed(format!("socketpair: {e}")))?;
        // Above the helper's fds, so that moving them there (dup2 below)
        // never finds one already in place, or overwrites the other.
        let config_read = above_helper_fds(config_read)?;
        let sync_helper = above_helper_fds(OwnedFd::from(sync_helper))?;
        let join = join.map(|fd| fd.try_clone().map_err(|e| Error::Failed(format!("dup: {e}")))).transpose()?;
        let join = join.map(above_helper_fds).transpose()?;
        let join_fd = join.as_ref().map(|fd| fd.as_raw_fd());
        let mut command = Command::new(&self.config.self_exe);
        command.arg(launch::LAUNCH_ARG).env_clear().stdin(stdin).stdout(stdout).stderr(stderr);
        let (config_fd, sync_fd) = (config_read.as_raw_fd(), sync_helper.as_raw_fd());
        let move_fds = move || {
            let pidfd = join_fd.map(|fd| (fd, launch::PIDFD_FD));
            for (from, to) in [(config_fd, launch::CONFIG_FD), (sync_fd, launch::SYNC_FD)].into_iter().chain(pidfd) {
                // SAFETY: dup2 takes integers and is async-signal-safe; onto
                // fds 3 and 4 (never `from`, see above) it also clears their
                // close-on-exec flag.
                if unsafe { libc::dup2(from, to) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the hook only calls dup2 (see above), which is safe
        // between fork and exec.
        unsafe { command.pre_exec(move_fds) };
        let (helper, exit) = {
            let mut registry = self.reaper.lock();
            let child = command
                .spawn()
                .map_err(|e| Error::Failed(format!("starting {}: {e}", self.config.self_exe.display())))?;
            let pid = child.id() as i32;
            (pid, registry.watch(pid))
        };
        drop(command);
        drop((config_read, sync_helper, join));
        let failed = |e: Error| {
            kill(helper, libc::SIGKILL);
            e
        };
        // The helper waits for its config: it joins the container's cgroup
        // first, so that the cgroup namespace it makes is rooted there and
        // the process it forks is born inside, with nothing to move after.
        let home = self.config.cgroups.as_ref().map(|r| r.home().to_path_buf());
        if let Some(cg) = cgroup {
            cgroup::add(cg, helper).map_err(|e| failed(Error::failed(e)))?;
        }
        let mut config_write = std::fs::File::from(config_write);
        let written = config_write.write_all(&json);
        drop(config_write);
        let mut reader = BufReader::new(&sync_agent);
        if let Err(e) = written {
            return Err(failed(Error::Failed(format!("sending the launch config: {e}"))));
        }
        let pid = match read_line(&mut reader).map_err(failed)?.strip_prefix("pid ").map(str::parse::<i32>) {
            Some(Ok(pid)) if pid > 0 => pid,
            _ => return Err(failed(Error::Failed("the launch helper sent no pid".into()))),
        };
        // The helper itself is not the container's: back to the agent's.
        if let (Some(_), Some(home)) = (cgroup, &home) {
            cgroup::add(home, helper).map_err(|e| failed(Error::failed(e)))?;
        }
        match read_line(&mut reader).map_err(failed)?.as_str() {
            "ready" => {}
            other => return Err(failed(Error::Failed(format!("the helper said {other:?}")))),
        }
        // Set up and waiting for the go: alive, and its PID not free.
        let pidfd = match launch.kind {
            Kind::Init(_) => Some(pidfd_open(pid).map_err(failed)?),
            Kind::Exec { .. } => None,
        };
        let terminal = copier.terminal().map_err(|e| failed(Error::failed(e)))?;
        copier.start();
        Ok(Arc::new(Process { pid, exit, sync: Mutex::new(Some(sync_agent)), terminal, pidfd }))
    }

    /// Lets the container's first process `exec`.
    pub fn start(&self, id: &str) -> Result<()> {
        let init = self.with(id, |c| match c.state() {
            State::Created => Ok(c.init.clone()),
            other => Err(Error::Invalid(format!("container {id:?} is {other:?}, not Created"))),
        })?;
        release(&init)?;
        self.with(id, |c| {
            c.state = State::Running;
            c.started_at_ms = now_ms();
            Ok(())
        })
    }

    /// Starts another process in a running container.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], stdio: &StdioPorts) -> Result<()> {
        check_id("exec ID", exec_id)?;
        let mut process = spec::parse_process(process_json).map_err(|e| Error::Invalid(error_chain(&e)))?;
        let ((init, cgroup, seccomp, bounding), _pending) = self.reserve(format!("{id}/{exec_id}"), |containers| {
            let c = containers.get_mut(id).ok_or_else(|| Error::NotFound(format!("no container with ID {id:?}")))?;
            match c.state() {
                State::Running if c.execs.contains_key(exec_id) => {
                    Err(Error::Invalid(format!("container {id:?} already has a process with exec ID {exec_id:?}")))
                }
                State::Running => Ok((c.init.clone(), c.cgroup.clone(), c.seccomp.clone(), c.bounding)),
                other => Err(Error::Invalid(format!("container {id:?} is {other:?}, not Running"))),
            }
        })?;
        process.seccomp = seccomp;
        process.caps = process.caps.within(bounding);
        let launch = Launch { kind: Kind::Exec { init_pid: init.pid }, process };
        let pidfd = init.pidfd.as_ref().ok_or_else(|| Error::Failed(format!("container {id:?} has no pidfd")))?;
        let started = self.launch(&launch, stdio, cgroup.as_deref(), Some(pidfd))?;
        release(&started)?;
        let pid = started.pid;
        self.with(id, |c| {
            c.execs.insert(exec_id.to_string(), started);
            Ok(())
        })
        .inspect_err(|_| {
            // Removed meanwhile: its process goes with it.
            kill(pid, libc::SIGKILL);
        })
    }

    /// Sends a signal to one process, or to every process of the container.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Error::Invalid(format!("signal {signal} is not between 1 and 64")))?;
        let (process, members) = self.with(id, |c| Ok((c.process(exec_id, id)?, c.membership())))?;
        if !all {
            if process.exit.get().is_none() {
                kill(process.pid, signal);
            }
            return Ok(());
        }
        match &members.cgroup {
            Some(cg) if signal == libc::SIGKILL => cgroup::kill_all(cg).map_err(Error::failed),
            _ => {
                for pid in members.pids() {
                    kill(pid, signal);
                }
                Ok(())
            }
        }
    }

    /// Waits for a process to exit and returns its status; between looks
    /// (each at most `slice` long) `go_on` says whether to keep waiting
    /// (`Ok(None)` when it says no).
    pub fn wait(
        &self,
        id: &str,
        exec_id: &str,
        slice: std::time::Duration,
        mut go_on: impl FnMut() -> bool,
    ) -> Result<Option<i32>> {
        let process = self.with(id, |c| c.process(exec_id, id))?;
        loop {
            if let Some(status) = process.exit.wait_timeout(slice) {
                return Ok(Some(status));
            }
            if !go_on() {
                return Ok(None);
            }
        }
    }

    /// The container's state and its first process's PID, start and exit.
    pub fn status(&self, id: &str) -> Result<Status> {
        self.with(id, |c| Ok(c.status()))
    }

    /// Mounts the disk with `serial` at `destination` in container `id`,
    /// which must exist and not have stopped.
    pub fn mount_disk(&self, id: &str, serial: &str, destination: &Path, fstype: &str, read_only: bool) -> Result<()> {
        crate::hotmount::check_destination(destination).map_err(Error::Invalid)?;
        let fstype = crate::hotmount::check_disk(serial, fstype).map_err(Error::Invalid)?;
        let init = self.with(id, |c| match c.state() {
            State::Created | State::Running | State::Paused => Ok(c.init.clone()),
            other => Err(Error::Invalid(format!("container {id:?} is {other:?}; a disk is mounted into a live one"))),
        })?;
        let pidfd = init.pidfd.as_ref().ok_or_else(|| Error::Failed(format!("container {id:?} has no pidfd")))?;
        let device = find_disk(serial)?;
        let mount = crate::hotmount::HotMount { device: &device, fstype, read_only, destination };
        crate::hotmount::mount_into(init.pid, pidfd, &mount).map_err(Error::Failed)
    }

    /// Sets the size of a process's terminal.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<()> {
        let size = |what: &str, n: u32| {
            u16::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Error::Invalid(format!("a terminal of {n} {what} is not 1-65535")))
        };
        let (rows, columns) = (size("rows", rows)?, size("columns", columns)?);
        let process = self.with(id, |c| c.process(exec_id, id))?;
        let Some(master) = &process.terminal else {
            return Err(Error::Invalid(format!("{} has no terminal", describe(id, exec_id))));
        };
        crate::stdio::resize(master, rows, columns)
            .map_err(|e| Error::Failed(format!("resizing the terminal of {}: {e}", describe(id, exec_id))))
    }

    /// Forgets an exec'd process that has exited, freeing its exec ID.
    pub fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::Invalid(format!(
                "the first process of container {id:?} goes with the container (RemoveContainer)"
            )));
        }
        self.with(id, |c| {
            let process = c.process(exec_id, id)?;
            if process.exit.get().is_none() {
                return Err(Error::Invalid(format!(
                    "{} still runs: signal it and wait for it first",
                    describe(id, exec_id)
                )));
            }
            c.execs.remove(exec_id);
            Ok(())
        })
    }

    /// Waits for a container's cgroup to record an OOM kill that no event
    /// has reported yet, and returns the container's ID. Between looks it
    /// calls `pause`, which sleeps a while and says whether to go on (the
    /// call's deadline passed or its connection went: `Ok(None)`).
    pub fn oom_event(&self, mut pause: impl FnMut() -> bool) -> Result<Option<String>> {
        if self.config.cgroups.is_none() {
            return Err(Error::Failed("OOM kills are not seen: this agent has no cgroup v2 hierarchy".into()));
        }
        loop {
            let watched: Vec<(String, PathBuf, u64)> = self
                .lock()
                .iter()
                .filter_map(|(id, c)| Some((id.clone(), c.cgroup.clone()?, c.oom_kills_reported)))
                .collect();
            for (id, cg, reported) in watched {
                // A cgroup removed meanwhile has nothing to tell.
                let Ok(kills) = cgroup::oom_kills(&cg) else { continue };
                if kills <= reported {
                    continue;
                }
                // Reported once: another caller may have taken it, or the
                // container been replaced by one of the same ID.
                let taken = self.with(&id, |c| {
                    let ours = c.cgroup.as_ref() == Some(&cg) && c.oom_kills_reported < kills;
                    if ours {
                        c.oom_kills_reported = kills;
                    }
                    Ok(ours)
                });
                if taken == Ok(true) {
                    return Ok(Some(id));
                }
            }
            if !pause() {
                return Ok(None);
            }
        }
    }

    /// The container's processes.
    pub fn ps(&self, id: &str) -> Result<Vec<ProcessRow>> {
        let members = self.with(id, |c| Ok(c.membership()))?;
        let users = read_passwd(Path::new(&format!("/proc/{}/root", members.init_pid)));
        let mut rows = Vec::new();
        for pid in members.pids() {
            let dir = PathBuf::from(format!("/proc/{pid}"));
            let Ok(status) = std::fs::read_to_string(dir.join("status")) else { continue };
            let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("").trim().to_string();
            let ns_pid = field("NSpid:").split_whitespace().last().and_then(|p| p.parse().ok()).unwrap_or(0);
            let uid: u32 = field("Uid:").split_whitespace().next().and_then(|u| u.parse().ok()).unwrap_or(0);
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let command = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            let command = if command.is_empty() { format!("[{}]", field("Name:")) } else { command };
            let user = users.get(&uid).cloned().unwrap_or_else(|| uid.to_string());
            rows.push(ProcessRow { pid, ns_pid, uid, user, command });
        }
        rows.sort_by_key(|r| r.ns_pid);
        Ok(rows)
    }

    fn cgroup_of(&self, id: &str) -> Result<PathBuf> {
        self.with(id, |c| {
            c.cgroup.clone().ok_or_else(|| {
                Error::Failed(format!("container {id:?} has no cgroup: this agent has no cgroup v2 hierarchy"))
            })
        })
    }

    /// Changes the container's limits.
    pub fn update(&self, id: &str, limits: &Limits) -> Result<()> {
        let cg = self.cgroup_of(id)?;
        if let Some(root) = &self.config.cgroups {
            root.check(limits).map_err(Error::failed)?;
        }
        cgroup::apply(&cg, limits).map_err(Error::failed)
    }

    /// The container's cgroup statistics.
    pub fn stats(&self, id: &str) -> Result<Stats> {
        let cg = self.cgroup_of(id)?;
        cgroup::stats(&cg).map_err(Error::failed)
    }

    /// Freezes (pause) or thaws (resume) the container.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let cg = self.cgroup_of(id)?;
        let (from, to) = if frozen { (State::Running, State::Paused) } else { (State::Paused, State::Running) };
        self.with(id, |c| match c.state() {
            s if s == from => Ok(()),
            other => Err(Error::Invalid(format!("container {id:?} is {other:?}, not {from:?}"))),
        })?;
        cgroup::freeze(&cg, frozen).map_err(Error::failed)?;
        self.with(id, |c| {
            c.state = to;
            Ok(())
        })
    }

    /// Removes a container, killing what still runs in it. Everything in
    /// its cgroup is killed (`cgroup.kill`), so a process that left its
    /// first process's PID namespace, or shares the agent's, goes too. If
    /// the cgroup cannot be removed, the container stays (with its root
    /// mounted) and the error is reported: a later Remove tries again.
    pub fn remove(&self, id: &str) -> Result<()> {
        let container =
            self.lock().remove(id).ok_or_else(|| Error::NotFound(format!("no container with ID {id:?}")))?;
        if let Some(cg) = &container.cgroup {
            // Frozen processes cannot die.
            let _ = cgroup::freeze(cg, false);
            if cgroup::kill_all(cg).is_err() {
                // No cgroup.kill (before Linux 5.14): what is there now.
                for pid in cgroup::procs(cg).unwrap_or_default() {
                    kill(pid, libc::SIGKILL);
                }
            }
        }
        // Closing the sync socket of a created, never started container
        // makes its process exit; a running one is killed.
        drop(container.init.sync.lock().unwrap_or_else(|e| e.into_inner()).take());
        if container.init.exit.get().is_none() {
            kill(container.init.pid, libc::SIGKILL);
        }
        container.init.exit.wait();
        for exec in container.execs.values() {
            if exec.exit.get().is_none() {
                kill(exec.pid, libc::SIGKILL);
            }
        }
        if let Some(cg) = &container.cgroup {
            if let Err(e) = cgroup::remove(cg) {
                let why = format!("container {id:?} is kept: {}", error_chain(&e));
                // Unless a new container took the ID meanwhile.
                self.lock().entry(id.to_string()).or_insert(container);
                return Err(Error::Failed(why));
            }
        }
        if let Some(dir) = &container.mounted_root {
            unmount(dir);
        }
        Ok(())
    }

    /// Kills and removes every container (sandbox teardown); every one is
    /// tried, and the failures are reported together.
    pub fn remove_all(&self) -> Result<()> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        let errors: Vec<String> = ids
            .iter()
            .filter_map(|id| match self.remove(id) {
                // Removed meanwhile by a RemoveContainer.
                Ok(()) | Err(Error::NotFound(_)) => None,
                Err(e) => Some(format!("removing container {id:?}: {e}")),
            })
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(Error::Failed(errors.join("; "))),
        }
    }
}

/// Lets a set-up process `exec` and reports whether the exec worked.
fn release(process: &Process) -> Result<()> {
    let sync = process.sync.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(mut sync) = sync else {
        return Err(Error::Invalid("the process was already started".into()));
    };
    sync.write_all(b"S").map_err(|e| Error::Failed(format!("starting the process: {e}")))?;
    // End-of-file (the sync socket closes on exec): started. A line: the
    // exec failed, and says why.
    let mut reply = String::new();
    BufReader::new(&mut sync)
        .take(4096)
        .read_line(&mut reply)
        .map_err(|e| Error::Failed(format!("hearing whether the process started: {e}")))?;
    match reply.strip_prefix("error ") {
        Some(why) => Err(Error::Failed(why.trim_end().to_string())),
        None => Ok(()),
    }
}

fn read_line(reader: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    reader
        .take(4096)
        .read_line(&mut line)
        .map_err(|e| Error::Failed(format!("reading from the launch helper: {e}")))?;
    match line.strip_suffix('\n') {
        Some(l) => match l.strip_prefix("error ") {
            Some(why) => Err(Error::Failed(why.to_string())),
            None => Ok(l.to_string()),
        },
        None => Err(Error::Failed("the launch helper exited without a word".into())),
    }
}

/// Reads at most `limit` bytes of the regular file `path`, resolved inside
/// `root` as if `root` were `/` (openat2 RESOLVE_IN_ROOT).
fn read_in_root(root: &Path, path: &str, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let root = std::fs::File::open(root)?;
    let path = std::ffi::CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid directory fd, NUL-terminated path and open_how of the
    // size given.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, root.as_raw_fd(), path.as_ptr(), &how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A pidfd of `pid` (pidfd_open, Linux 5.3).
fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Error::Failed(format!("pidfd_open {pid}: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: a new descriptor that nothing else owns; pidfds are
    // close-on-exec.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `fd` moved to a number above the launch helper's fixed ones.
fn above_helper_fds(fd: OwnedFd) -> Result<OwnedFd> {
    let floor = launch::CONFIG_FD.max(launch::SYNC_FD).max(launch::PIDFD_FD) + 1;
    // SAFETY: F_DUPFD_CLOEXEC on our own descriptor makes a new one.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    if moved < 0 {
        return Err(Error::Failed(format!("dup: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: kill takes integers.
    unsafe { libc::kill(pid, signal) };
}

/// User names by uid from the container's /etc/passwd, `root` being its
/// root directory (as /proc/PID/root). The file is the container's: it is
/// resolved inside that root (a symlink to /dev/zero or to the agent's own
/// files stays inside it), must be a regular file, and is read up to 1 MiB.
fn read_passwd(root: &Path) -> HashMap<u32, String> {
    let text =
        read_in_root(root, "etc/passwd", 1 << 20).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

/// Turns each mount source `vessel-disk:SERIAL` into the guest's block
/// device with that serial, and each `vessel-shared:PATH` into that
/// directory of the shared filesystem.
fn resolve_disk_sources(mounts: &mut [crate::launch::MountConfig]) -> Result<()> {
    for m in mounts.iter_mut() {
        let Some(path) = m.source.to_str().and_then(|s| s.strip_prefix(agent_proto::spec::SHARED_SOURCE_PREFIX)) else {
            continue;
        };
        m.source = crate::shared::directory(path).map_err(Error::Invalid)?;
    }
    for m in mounts {
        let Some(serial) = m.source.to_str().and_then(|s| s.strip_prefix(agent_proto::spec::DISK_SOURCE_PREFIX)) else {
            continue;
        };
        if m.fstype.is_empty() {
            return Err(Error::Invalid(format!(
                "disk {serial:?} is mounted at {} without a filesystem type",
                m.destination.display()
            )));
        }
        m.source = find_disk(serial)?;
    }
    Ok(())
}

/// How long a disk the host has just hot-plugged may take to show up with
/// its size (a placeholder disk grows when the driver handles the config
/// change, in a kernel work item).
const DISK_APPEAR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The block device whose virtio serial is `serial` and whose size is not
/// zero, waiting up to [`DISK_APPEAR_TIMEOUT`] for it.
fn find_disk(serial: &str) -> Result<PathBuf> {
    let deadline = std::time::Instant::now() + DISK_APPEAR_TIMEOUT;
    loop {
        let mut seen = Vec::new();
        for entry in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(s) = std::fs::read_to_string(entry.path().join("serial")) else { continue };
            let size = std::fs::read_to_string(entry.path().join("size")).unwrap_or_default();
            let empty = size.trim() == "0";
            if s.trim() == serial && !empty {
                return Ok(PathBuf::from("/dev").join(name));
            }
            seen.push(format!("{name}={:?}{}", s.trim(), if empty { " (empty)" } else { "" }));
        }
        if std::time::Instant::now() >= deadline {
            let waited = DISK_APPEAR_TIMEOUT.as_secs();
            return Err(Error::Invalid(format!(
                "no disk has serial {serial:?} after {waited} s (disks: {})",
                seen.join(", ")
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn mount_disk(device: &Path, dir: &Path, fstype: &str, flags: libc::c_ulong) -> std::result::Result<(), String> {
    let c = |p: &std::ffi::OsStr| {
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p)).map_err(|_| "NUL in path".to_string())
    };
    let (dev, target, fs) = (c(device.as_os_str())?, c(dir.as_os_str())?, c(std::ffi::OsStr::new(fstype))?);
    // SAFETY: valid NUL-terminated strings; no data.
    if unsafe { libc::mount(dev.as_ptr(), target.as_ptr(), fs.as_ptr(), flags, std::ptr::null()) } != 0 {
        return Err(format!(
            "mounting {} ({fstype}) on {}: {}",
            device.display(),
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn unmount(dir: &Path) {
    if let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str())) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_containers_passwd_is_read_inside_its_root_only() {
        let root = std::env::temp_dir().join(format!("vessel-passwd-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("users"), "app:x:1000:1000::/:/bin/sh\n").unwrap();
        let passwd = root.join("etc/passwd");
        // A link climbing out lands on the root's own file.
        std::os::unix::fs::symlink("../../../../../../users", &passwd).unwrap();
        assert_eq!(read_passwd(&root).get(&1000).map(String::as_str), Some("app"));
        // An absolute link resolves inside the root too: there is no
        // /dev/zero there to read for ever.
        std::fs::remove_file(&passwd).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &passwd).unwrap();
        assert!(read_in_root(&root, "etc/passwd", 1 << 20).is_err());
        // A directory is not read.
        std::fs::remove_file(&passwd).unwrap();
        std::fs::create_dir(&passwd).unwrap();
        assert!(read_in_root(&root, "etc/passwd", 1 << 20).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A stopped container whose cgroup is `cgroup`.
    fn stopped(cgroup: PathBuf) -> Container {
        let exit = Arc::new(Exit::default());
        exit.set(0);
        Container {
            state: State::Stopped,
            init: Arc::new(Process { pid: i32::MAX, exit, sync: Mutex::new(None), terminal: None, pidfd: None }),
            execs: HashMap::new(),
            cgroup: Some(cgroup),
            mounted_root: None,
            started_at_ms: 1,
            oom_kills_reported: 0,
            seccomp: None,
            bounding: 0,
        }
    }

    #[test]
    fn a_container_whose_cgroup_cannot_be_removed_is_kept_and_the_error_reported() {
        let dir = std::env::temp_dir().join(format!("vessel-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cg = dir.join("cg");
        std::fs::create_dir_all(cg.join("busy")).unwrap();
        let config = Config {
            link: HostLink::Unix { prefix: dir.join("host") },
            cgroups: None,
            run_dir: dir.join("run"),
            self_exe: PathBuf::from("/nonexistent"),
        };
        let containers = Containers::new(config, Arc::new(Reaper::default()));
        containers.lock().insert("web".into(), stopped(cg.clone()));
        // A directory that is not empty: rmdir fails at once.
        let err = containers.remove("web").unwrap_err().to_string();
        assert!(err.contains("\"web\" is kept") && err.contains("cannot remove cgroup"), "{err}");
        assert_eq!(containers.status("web").unwrap().state, State::Stopped);
        // Once it can go, a second Remove takes it.
        std::fs::remove_dir_all(&cg).unwrap();
        containers.remove("web").unwrap();
        assert!(matches!(containers.status("web"), Err(Error::NotFound(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_must_fit_a_path_component() {
        assert!(check_id("container ID", "web-1.a_b").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            let err = check_id("container ID", bad).unwrap_err().to_string();
            assert!(err.contains("container ID"), "{err}");
        }
    }

    #[test]
    fn passwd_names_users() {
        let dir = std::env::temp_dir().join(format!("vessel-passwd-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let path = dir.join("etc/passwd");
        std::fs::write(&path, "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\nbroken\n").unwrap();
        let users = read_passwd(&dir);
        assert_eq!(users.get(&0).map(String::as_str), Some("root"));
        assert_eq!(users.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(users.len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
