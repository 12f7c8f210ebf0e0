//! A VM that another process owns, as a fetched sandbox sees it.
//!
//! The process that created a sandbox owns its VM: the builtin VMM's
//! threads, or QEMU's device backends. A handle rebuilt from the state
//! (`Sandbox::fetch`) reaches the agent through the vsock socket all the
//! same, and for qemu-tcg drives QEMU itself: pause and resume through its
//! QMP socket, stop by ending the QEMU process. What only the owner can do
//! (hotplug, or any VM operation on builtin) is refused with the owner's
//! PID.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::qemu_tcg::Qmp;
use super::{
    file_tail, Disk, Hypervisor, HypervisorError, HypervisorKind, Nic, Plugged, PluggedNic, VmFigures, VmSpec,
};

/// Whether process `pid` is a program a sandbox runs and names the
/// sandbox directory `dir` on its command line, as its QEMU does: a PID
/// recorded in a state file is only ours to end if it still does (a dead
/// owner's QEMU died with it, and its PID may since belong to anyone,
/// an admin's `tail -f <dir>/console.log` among them).
pub(crate) fn runs_for(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let prefixes = dir_prefixes(dir);
    is_sandbox_program(pid) && prefixes.iter().any(|p| cmdline.windows(p.len()).any(|w| w == p.as_slice()))
}

/// `dir/` as given and canonical: how a command line or a socket path
/// names something inside it.
fn dir_prefixes(dir: &Path) -> Vec<Vec<u8>> {
    let real = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    [dir, real.as_path()]
        .iter()
        .map(|d| {
            let mut p = d.as_os_str().as_bytes().to_vec();
            p.push(b'/');
            p
        })
        .collect()
}

/// Whether process `pid` runs what a sandbox runs: an owner (this
/// program), QEMU, virtiofsd.
fn is_sandbox_program(pid: u32) -> bool {
    let ours = std::env::current_exe().ok().and_then(|e| e.file_name().map(|n| n.to_owned()));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let name = exe.as_ref().and_then(|e| e.file_name());
    name.is_some_and(|n| Some(n) == ours.as_deref() || n == crate::qemu::QEMU || n == "virtiofsd")
}

/// Whether process `pid` exists (signal 0 probes without sending).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 sends nothing; it only checks that the
    // process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The processes tied to directory `dir` when no state file says which:
/// those holding a Unix socket bound inside it (an owner's vsock and
/// backend sockets; as this network namespace's `/proc/net/unix` lists
/// them) and those naming it on their command line (QEMU). This process
/// is never among them.
pub(crate) fn processes_using(dir: &Path) -> Vec<u32> {
    let prefixes = dir_prefixes(dir);
    let contains = |hay: &[u8]| prefixes.iter().any(|p| hay.windows(p.len()).any(|w| w == p.as_slice()));
    // "Num RefCount Protocol Flags Type St Inode Path", a socket a line.
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let inodes: std::collections::HashSet<String> = unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (fields.get(6)?, fields.get(7)?);
            prefixes.iter().any(|p| path.as_bytes().starts_with(p)).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let named = std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| contains(&c));
        let holds =
            || {
                std::fs::read_dir(entry.path().join("fd")).into_iter().flatten().flatten().any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref()))
                })
            };
        // Only what a sandbox runs; never an admin's `tail` or editor
        // that names the directory.
        if (named || (!inodes.is_empty() && holds())) && is_sandbox_program(pid) {
            found.push(pid);
        }
    }
    found
}

/// A VM owned by another process; see the module docs.
pub struct Attached {
    kind: HypervisorKind,
    dir: PathBuf,
    owner_pid: u32,
    vm_pid: Option<u32>,
    created: std::time::SystemTime,
    memory_bytes: u64,
    qmp: Option<Qmp>,
}

impl Attached {
    /// The VM of a sandbox whose directory is `dir`, run by `kind`, owned
    /// by process `owner_pid`; `vm_pid` is QEMU's process for qemu-tcg.
    pub fn new(
        kind: HypervisorKind,
        dir: PathBuf,
        owner_pid: u32,
        vm_pid: Option<u32>,
        created_unix_ms: u64,
        memory_mib: u64,
    ) -> Self {
        let created = std::time::UNIX_EPOCH + Duration::from_millis(created_unix_ms);
        Attached { kind, dir, owner_pid, vm_pid, created, memory_bytes: memory_mib << 20, qmp: None }
    }

    fn owners_only(&self, op: &'static str) -> HypervisorError {
        let why = match self.kind {
            HypervisorKind::Builtin => "the builtin VM runs inside the process that created the sandbox",
            HypervisorKind::QemuTcg => {
                "the devices of a qemu-tcg VM are served by the process that created the sandbox"
            }
        };
        HypervisorError::Owned { op, owner_pid: self.owner_pid, why }
    }

    /// QEMU's process, for what only QEMU itself answers.
    fn qemu(&self, op: &'static str) -> Result<u32, HypervisorError> {
        match (self.kind, self.vm_pid) {
            (HypervisorKind::QemuTcg, Some(pid)) => Ok(pid),
            _ => Err(self.owners_only(op)),
        }
    }

    fn qmp(&mut self, command: &'static str) -> Result<(), HypervisorError> {
        self.qemu(command)?;
        if let Some(why) = self.exited() {
            return Err(HypervisorError::NotRunning(why));
        }
        let op = |e| HypervisorError::Op { kind: HypervisorKind::QemuTcg, op: command, source: Box::new(e) };
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.dir.join("qmp.sock"), || None).map_err(op)?);
        }
        let qmp = self.qmp.as_mut().ok_or_else(|| HypervisorError::NotRunning("no QMP connection".into()))?;
        qmp.execute(command).map_err(op)
    }
}

impl Hypervisor for Attached {
    fn kind(&self) -> HypervisorKind {
        self.kind
    }

    fn start(&mut self, _: &VmSpec) -> Result<(), HypervisorError> {
        Err(self.owners_only("start the VM"))
    }

    fn exited(&mut self) -> Option<String> {
        if !process_alive(self.owner_pid) {
            return Some(format!("the sandbox's owner process {} is gone", self.owner_pid));
        }
        match self.vm_pid {
            Some(pid) if !process_alive(pid) => Some(format!("QEMU (process {pid}) is gone")),
            _ => None,
        }
    }

    fn pause(&mut self) -> Result<(), HypervisorError> {
        self.qmp("stop")
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
        self.qmp("cont")
    }

    fn stop(&mut self) -> Result<(), HypervisorError> {
        let pid = self.qemu("stop the VM")?;
        self.qmp = None;
        if !process_alive(pid) {
            return Ok(());
        }
        let Ok(raw) = libc::pid_t::try_from(pid) else { return Ok(()) };
        // SAFETY: kill sends a signal to a process; it touches no memory.
        // QEMU is not our child, so it cannot be reaped here: its owner
        // reaps it.
        let rc = unsafe { libc::kill(raw, libc::SIGKILL) };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            return Err(HypervisorError::Op { kind: self.kind, op: "stop the VM", source: Box::new(source) });
        }
        // Gone once its owner has reaped it; a zombie cannot run a guest.
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(pid) && !is_zombie(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn figures(&mut self) -> Result<VmFigures, HypervisorError> {
        let pid = self.qemu("read the VM's figures")?;
        if let Some(why) = self.exited() {
            return Err(HypervisorError::NotRunning(why));
        }
        let resident = std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * 4096);
        Ok(VmFigures {
            uptime: self.created.elapsed().unwrap_or_default(),
            memory_bytes: self.memory_bytes,
            memory_resident_bytes: resident,
            vcpu_exits: None,
            devices: Vec::new(),
        })
    }

    fn add_disk(&mut self, _: &Disk) -> Result<Plugged, HypervisorError> {
        Err(self.owners_only("hot-plug a disk"))
    }

    fn add_nic(&mut self, _: &Nic) -> Result<PluggedNic, HypervisorError> {
        Err(self.owners_only("hot-plug a NIC"))
    }

    fn remove_nic(&mut self, _: usize) -> Result<(), HypervisorError> {
        Err(self.owners_only("remove a NIC"))
    }

    fn console_tail(&self, lines: usize) -> String {
        file_tail(&self.dir.join("console.log"), lines)
    }

    fn owned(&self) -> bool {
        false
    }
}

/// Whether process `pid` has exited and waits to be reaped.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}
