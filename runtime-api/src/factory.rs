//! The sandbox factory's cache (Kata's VM cache): sandbox VMs booted ahead
//! of time with the sandbox guest image, each paused once its agent has
//! announced itself and before any container exists. A create given a
//! [`Factory`] takes one, resumes it, gives the guest its own identity
//! (hostname, clock, entropy) and goes on as usual; a replacement boots in
//! the background.
//!
//! On disk, under the store's root, `.factory/` holds:
//! - `<name>/`, a cached VM's directory: what its hypervisor keeps there
//!   (sockets, console log), `vm.json` (its [`CachedRecord`], written once
//!   it is paused), `claim` (a flock held by whoever uses the VM: its owner
//!   while it boots, a create while it takes it) and `lock` (which becomes
//!   the sandbox's lock);
//! - once taken, `<name>` is a symbolic link to the sandbox's directory:
//!   the VM's directory was renamed to `<root>/<id>`, and the link keeps
//!   the paths the VM's devices hold (its vsock socket and the `<uds>_<port>`
//!   names the guest's connections go to, its console log, QMP) resolving.
//!   Deleting the sandbox removes the link.
//!
//! A VM template ([`Factory::template`], builtin hypervisor only) is a
//! snapshot of such a VM, made once by [`make_template`] in a directory of
//! its own, with [`TEMPLATE_RECORD`] saying how it was booted. Each create
//! restores a VM from it (its memory a private copy-on-write mapping of the
//! snapshot's), with the sandbox's own vsock socket and console; the
//! guest's agent announces itself again, and the create goes on as for a
//! cached VM (see `sandbox/from_template.rs`).
//!
//! A VM belongs to the process that booted it (the builtin VMM's threads,
//! or QEMU and our device backends for qemu-tcg), so it is taken in that
//! process: an embedder's [`Factory::cache`] holds its VMs in its own
//! process; the CLI runs one owner process per cached VM
//! ([`Factory::holding`]), which becomes the sandbox's owner when a create
//! takes its VM. [`list`] reads every cached VM's state from disk, for
//! any process.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use agent_proto::link;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::agent::HostSide;
use crate::config::SandboxConfig;
use crate::hypervisor::{attached, new_hypervisor, Hypervisor, HypervisorError, HypervisorKind, Template, VmSpec};
use crate::state::{lock_path, now_unix_ms, LockKind, StateError, Store};

/// The factory's directory under the store's root (not a valid sandbox ID,
/// so `list` never mistakes it for a sandbox).
pub const FACTORY_DIR: &str = ".factory";
/// A cached VM's record, in its directory.
pub const RECORD_FILE: &str = "vm.json";
/// The flock held by whoever uses a cached VM (its booting owner, or the
/// create taking it).
pub const CLAIM_FILE: &str = "claim";
/// The record format this code writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// The most VMs one cache keeps.
pub const MAX_CACHE: usize = 64;
/// How often an in-process cache looks for VMs that died.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Why the factory failed.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// A cache size of 0, or too large.
    #[error("a cache of {0} VMs: give between 1 and {MAX_CACHE}")]
    Size(usize),
    /// The guest image lacks a file.
    #[error("the guest image has no {0}: build it with `vessel image build --out DIR`")]
    GuestImage(PathBuf),
    /// A VM template on a hypervisor that cannot snapshot VMs.
    #[error(
        "VM templates need the builtin hypervisor's snapshots; {0} cannot make them (QEMU 7.2 refuses to migrate \
         a VM with vhost-user-vsock: \"non-migratable device\"); use a cache (`--cache N`)"
    )]
    TemplateHypervisor(HypervisorKind),
    /// A template is made in a directory of its own, made for it.
    #[error("{0} exists already: a VM template is made in a new directory")]
    TemplateExists(PathBuf),
    /// The template's snapshot could not be loaded.
    #[error("cannot load the VM template in {0}")]
    TemplateLoad(PathBuf, #[source] vmm::snapshot::RestoreError),
    /// A directory or record could not be made or read.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM would not boot or pause.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The agent never announced itself.
    #[error("the cached VM's agent never announced itself")]
    Agent(#[source] crate::agent::AgentError),
    /// Its record is not valid.
    #[error("the cached VM record {path} is not valid")]
    Record {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// Another process is using the cached VM (booting or taking it).
    #[error("the cached VM {0} is being used by another process")]
    Busy(String),
    /// The cached VM died, or was taken already.
    #[error("the cached VM {name} cannot be taken: {why}")]
    Gone {
        /// The VM.
        name: String,
        /// What happened to it.
        why: String,
    },
    /// Booting took longer than allowed, or a boot failed.
    #[error("the cache did not fill: {0}")]
    NotFilled(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FactoryError {
    let path = path.to_path_buf();
    move |source| FactoryError::State(StateError::Io { what, path, source })
}

/// What a cache's VMs are booted with. A create's config must agree, or
/// it cannot take one (see [`CacheConfig::mismatch`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// The hypervisor.
    pub hypervisor: HypervisorKind,
    /// The guest image directory.
    pub guest_image: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Hotplug slots: a create from the cache hot-plugs its containers'
    /// root disks and its disks into them, so a VM needs one for each of
    /// those plus the slots the create asks to keep for later.
    pub hotplug_slots: u8,
    /// How long a boot may take to the agent, in seconds.
    pub boot_timeout_s: u64,
}

impl CacheConfig {
    /// VMs as a sandbox with `config`'s image, hypervisor, vCPUs and
    /// memory is made, with room to hot-plug its disks and keep its slots.
    pub fn for_sandbox(config: &SandboxConfig) -> Self {
        let disks = config.containers.len() + config.disks.len();
        CacheConfig {
            hypervisor: config.hypervisor.unwrap_or_else(HypervisorKind::detect),
            guest_image: config.guest_image.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            hotplug_slots: u8::try_from(disks).unwrap_or(u8::MAX).saturating_add(config.hotplug_slots),
            boot_timeout_s: config.boot_timeout_s,
        }
    }

    /// Why a sandbox made with `config` cannot be one of these VMs, or
    /// None. The VM is fixed at boot: its hypervisor, image, vCPUs and
    /// memory; no NIC and no shared directory (virtio-fs), which only a
    /// cold boot attaches; and its containers' roots and disks are
    /// hot-plugged.
    pub fn mismatch(&self, config: &SandboxConfig) -> Option<String> {
        self.mismatch_of(config, "the cached VMs", "the cached VMs'")
    }

    /// [`CacheConfig::mismatch`], the VMs called `what` (`whose`).
    pub(crate) fn mismatch_of(&self, config: &SandboxConfig, what: &str, whose: &str) -> Option<String> {
        let kind = config.hypervisor.unwrap_or_else(HypervisorKind::detect);
        if kind != self.hypervisor {
            return Some(format!("the sandbox runs on {kind}, {what} on {}", self.hypervisor));
        }
        let same_image = match (config.guest_image.canonicalize(), self.guest_image.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => config.guest_image == self.guest_image,
        };
        if !same_image {
            return Some(format!(
                "the sandbox's guest image is {}, {whose} {}",
                config.guest_image.display(),
                self.guest_image.display()
            ));
        }
        if config.vcpus != self.vcpus {
            return Some(format!("the sandbox has {} vCPUs, {what} {}", config.vcpus, self.vcpus));
        }
        if config.memory_mib != self.memory_mib {
            return Some(format!(
                "the sandbox has {} MiB of memory, {what} {} MiB",
                config.memory_mib, self.memory_mib
            ));
        }
        if config.network.is_some() {
            return Some("the sandbox joins a network namespace, whose NIC only a cold boot attaches".into());
        }
        let shared =
            config.shared_fs || config.containers.iter().any(|c| c.root_is_directory() || !c.volumes.is_empty());
        if shared {
            return Some(
                "the sandbox needs a shared directory (a directory root or volume), which only a cold boot attaches"
                    .into(),
            );
        }
        let needed = config.containers.len() + config.disks.len() + usize::from(config.hotplug_slots);
        if needed > usize::from(self.hotplug_slots) {
            return Some(format!(
                "the sandbox needs {needed} hotplug slots ({} containers, {} disks, {} kept free), {what} have {}",
                config.containers.len(),
                config.disks.len(),
                config.hotplug_slots,
                self.hotplug_slots
            ));
        }
        None
    }

    /// The VM to boot in `dir`.
    pub(crate) fn spec(&self, dir: &Path) -> VmSpec {
        VmSpec {
            dir: dir.to_path_buf(),
            kernel: self.guest_image.join(resources::guest_image::KERNEL_FILE),
            initrd: self.guest_image.join(resources::guest_image::INITRD_FILE),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disks: Vec::new(),
            nics: Vec::new(),
            hotplug_slots: self.hotplug_slots,
            shared_fs: None,
        }
    }
}

/// A cached VM's record (`vm.json`), written once it is paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Its name (its directory's).
    pub name: String,
    /// How it was booted.
    pub config: CacheConfig,
    /// The process that owns it.
    pub owner_pid: u32,
    /// The process that runs the guest, when not the owner (QEMU).
    pub vm_pid: Option<u32>,
    /// When its boot began (ms since the epoch).
    pub created_unix_ms: u64,
    /// When it was paused, its agent ready.
    pub paused_unix_ms: u64,
}

/// The factory's directory under `store`.
pub fn factory_dir(store: &Store) -> PathBuf {
    store.root().join(FACTORY_DIR)
}

/// A fresh name for a cached VM: short, since its socket paths are
/// bounded (108 bytes).
fn fresh_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("vm-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One booted, paused sandbox VM; see the module docs. Dropping it stops
/// the VM and removes its directory.
pub struct CachedVm {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) vm: Option<Box<dyn Hypervisor>>,
    pub(crate) link: Option<UnixStream>,
    pub(crate) record: CachedRecord,
}

impl std::fmt::Debug for CachedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedVm").field("name", &self.name).finish_non_exhaustive()
    }
}

impl CachedVm {
    /// Boots one with `config` in a fresh directory under `store`'s
    /// factory directory, waits for its agent's announcement, pauses it and
    /// writes its record.
    pub fn boot(store: &Store, config: &CacheConfig) -> Result<CachedVm, FactoryError> {
        Self::boot_with(store, config, new_hypervisor(config.hypervisor))
    }

    /// [`CachedVm::boot`] on a hypervisor of the caller's.
    pub fn boot_with(
        store: &Store,
        config: &CacheConfig,
        mut vm: Box<dyn Hypervisor>,
    ) -> Result<CachedVm, FactoryError> {
        check_image(&config.guest_image)?;
        let began = Instant::now();
        let created_unix_ms = now_unix_ms();
        let parent = factory_dir(store);
        make_private_dir(store.root())?;
        store.check_root()?;
        make_private_dir(&parent)?;
        let name = fresh_name();
        let dir = parent.join(&name);
        // Made under a name `list` skips, and given its own only once its
        // claim is held: a directory with neither a record nor a held claim
        // is the remains of a dead boot, which `sweep` removes.
        let hidden = parent.join(format!(".boot-{name}"));
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&hidden)
            .map_err(io("create the cached VM's directory", &hidden))?;
        // Held while it boots: nobody takes a VM that is not paused yet.
        let claim = lock_path(&hidden.join(CLAIM_FILE), LockKind::Exclusive, true)
            .map_err(FactoryError::from)
            .and_then(|claim| {
                std::fs::rename(&hidden, &dir).map_err(io("name the cached VM's directory", &dir))?;
                Ok(claim)
            });
        if claim.is_err() {
            let _ = std::fs::remove_dir_all(&hidden);
        }
        let booted = claim.and_then(|_claim| {
            let spec = config.spec(&dir);
            let host = HostSide::new(spec.vsock_socket());
            let ready = host.listen(link::DEFAULT_PORT).map_err(FactoryError::Agent)?;
            vm.start(&spec)?;
            let timeout = Duration::from_secs(config.boot_timeout_s);
            let (version, link) = host.wait_link(&ready, timeout, || vm.exited()).map_err(FactoryError::Agent)?;
            drop(ready);
            vm.pause()?;
            let record = CachedRecord {
                version: RECORD_VERSION,
                name: name.clone(),
                config: config.clone(),
                owner_pid: std::process::id(),
                vm_pid: vm.process_id(),
                created_unix_ms,
                paused_unix_ms: now_unix_ms(),
            };
            write_record(&dir, &record)?;
            debug!(vm = %name, agent = %version, ms = began.elapsed().as_millis() as u64, "a cached VM is paused");
            Ok((link, record))
        });
        match booted {
            Ok((link, record)) => Ok(CachedVm { name, dir, vm: Some(vm), link: Some(link), record }),
            Err(e) => {
                let console = vm.console_tail(20);
                if !console.is_empty() {
                    warn!(vm = %name, "a cached VM's boot failed; its console ended with:\n{console}");
                }
                let _ = vm.stop();
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its record.
    pub fn record(&self) -> &CachedRecord {
        &self.record
    }

    /// Why it cannot be handed out, or None: its VM has ended.
    pub fn dead(&mut self) -> Option<String> {
        match self.vm.as_mut() {
            None => Some("it was taken".into()),
            Some(vm) => vm.exited(),
        }
    }
}

impl Drop for CachedVm {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            let _ = vm.stop();
            // Still its own directory (a taken VM's is the sandbox's).
            if std::fs::symlink_metadata(&self.dir).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}

fn check_image(image: &Path) -> Result<(), FactoryError> {
    for file in [resources::guest_image::KERNEL_FILE, resources::guest_image::INITRD_FILE] {
        let path = image.join(file);
        if !path.is_file() {
            return Err(FactoryError::GuestImage(path));
        }
    }
    Ok(())
}

fn make_private_dir(dir: &Path) -> Result<(), FactoryError> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .map_err(io("create", dir))
}

fn write_record(dir: &Path, record: &CachedRecord) -> Result<(), FactoryError> {
    let path = dir.join(RECORD_FILE);
    let mut json =
        serde_json::to_vec_pretty(record).map_err(|source| FactoryError::Record { path: path.clone(), source })?;
    json.push(b'\n');
    resources::cache::write_atomic(&path, &json).map_err(|e| io("write", &path)(std::io::Error::other(e)))
}

/// Reads the record in `dir`.
pub fn read_record(dir: &Path) -> Result<CachedRecord, FactoryError> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    serde_json::from_slice(&bytes).map_err(|source| FactoryError::Record { path, source })
}

/// Where a cached VM is in its life, as [`list`] finds it on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CachedState {
    /// Its owner is booting it.
    Booting,
    /// Paused, ready to be taken.
    Paused,
    /// Being taken by a create right now.
    Claiming,
    /// Taken: it is sandbox `0`'s VM now.
    Taken(String),
    /// Its owner or its VM is gone: it will never be handed out.
    Dead(String),
}

impl std::fmt::Display for CachedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CachedState::Booting => f.write_str("booting"),
            CachedState::Paused => f.write_str("paused"),
            CachedState::Claiming => f.write_str("claiming"),
            CachedState::Taken(id) => write!(f, "taken by {id}"),
            CachedState::Dead(why) => write!(f, "dead ({why})"),
        }
    }
}

/// A cached VM as [`list`] finds it.
#[derive(Clone, Debug)]
pub struct CachedStatus {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub state: CachedState,
    /// Its record, once it has one.
    pub record: Option<CachedRecord>,
}

/// Every cached VM under `store`, by name, as the disk says: a live owner
/// and VM process make a paused one; a VM whose owner or QEMU is gone is
/// dead. A store without a factory has none.
pub fn list(store: &Store) -> Result<Vec<CachedStatus>, FactoryError> {
    let parent = factory_dir(store);
    let entries = match std::fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", &parent)(e)),
    };
    let mut all = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.starts_with('.') || name == "cache.json" {
            continue;
        }
        let dir = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&dir) else { continue };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&dir).ok();
            let id = target.as_ref().and_then(|t| t.file_name()).map(|n| n.to_string_lossy().into_owned());
            match id.filter(|_| dir.is_dir()) {
                Some(id) => {
                    all.push(CachedStatus { name, state: CachedState::Taken(id), record: read_record(&dir).ok() })
                }
                // Its sandbox is gone.
                None => {
                    let _ = std::fs::remove_file(&dir);
                }
            }
            continue;
        }
        if !meta.is_dir() {
            continue;
        }
        let claimed = lock_path(&dir.join(CLAIM_FILE), LockKind::Exclusive, false).is_err();
        let state = match read_record(&dir) {
            Err(_) if claimed => (CachedState::Booting, None),
            Err(_) => (CachedState::Dead("its boot ended before it was paused".into()), None),
            Ok(record) => {
                let state = if !attached::process_alive(record.owner_pid) {
                    CachedState::Dead(format!("its owner process {} is gone", record.owner_pid))
                } else if let Some(pid) = record.vm_pid.filter(|pid| !attached::process_alive(*pid)) {
                    CachedState::Dead(format!("its VM process {pid} is gone"))
                } else if claimed {
                    CachedState::Claiming
                } else {
                    CachedState::Paused
                };
                (state, Some(record))
            }
        };
        all.push(CachedStatus { name, state: state.0, record: state.1 });
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// Removes what dead cached VMs left (their directories; their QEMU died
/// with their owner) and links to sandboxes that are gone. Returns the
/// names removed.
pub fn sweep(store: &Store) -> Result<Vec<String>, FactoryError> {
    let mut removed = Vec::new();
    for vm in list(store)? {
        if let CachedState::Dead(why) = &vm.state {
            let dir = factory_dir(store).join(&vm.name);
            // Taken while we looked: it is not ours to remove.
            let Ok(_claim) = lock_path(&dir.join(CLAIM_FILE), LockKind::Exclusive, false) else { continue };
            end_vm_process(&vm, &dir);
            info!(vm = %vm.name, why = %why, "removing a dead cached VM");
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
            removed.push(vm.name);
        }
    }
    Ok(removed)
}

/// Ends a cached VM's QEMU if it outlived its owner and still runs for
/// `dir` (it dies with its owner; this is for the case it did not).
fn end_vm_process(vm: &CachedStatus, dir: &Path) {
    if let Some(pid) = vm.record.as_ref().and_then(|r| r.vm_pid) {
        if attached::process_alive(pid) && attached::runs_for(pid, dir) {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill sends a signal; no memory is touched.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Ends every cached VM under `store` that is not taken (their owners,
/// which must run this program or be this process's own, get SIGKILL)
/// and removes the factory's directory but for the links of taken ones.
/// A VM being taken right now is waited for (up to `patience`). Returns
/// the names ended.
pub fn destroy(store: &Store, patience: Duration) -> Result<Vec<String>, FactoryError> {
    let mut ended = Vec::new();
    let parent = factory_dir(store);
    // One wait for the whole call: VMs that boot hold their claims for as
    // long as their boot takes, and are ended without it when it runs out.
    let deadline = Instant::now() + patience;
    for vm in list(store)? {
        if matches!(vm.state, CachedState::Taken(_)) {
            continue;
        }
        let dir = parent.join(&vm.name);
        let claim = loop {
            match lock_path(&dir.join(CLAIM_FILE), LockKind::Exclusive, false) {
                Ok(claim) => break Some(claim),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break None,
            }
        };
        // Taken while we waited: the sandbox's now.
        if std::fs::symlink_metadata(&dir).map_or(true, |m| !m.is_dir()) {
            continue;
        }
        let owner = vm.record.as_ref().map(|r| r.owner_pid).or_else(|| booting_owner(&dir));
        // A recorded owner that died may have had its PID reused: only a
        // process still tied to this VM's directory (holding a socket in
        // it) is ended.
        let tied = |pid: &u32| attached::processes_using(&dir).contains(pid);
        if let Some(pid) = owner.filter(|pid| *pid != std::process::id() && attached::process_alive(*pid) && tied(pid))
        {
            if let Ok(raw) = libc::pid_t::try_from(pid) {
                // SAFETY: kill sends a signal; no memory is touched.
                unsafe { libc::kill(raw, libc::SIGKILL) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while attached::process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        end_vm_process(&vm, &dir);
        drop(claim);
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        ended.push(vm.name);
    }
    let _ = std::fs::remove_file(parent.join(CACHE_FILE));
    // Empty unless links to taken VMs' sandboxes are left.
    let _ = std::fs::remove_dir(&parent);
    Ok(ended)
}

/// A booting VM's owner: the processes holding sockets in its directory.
fn booting_owner(dir: &Path) -> Option<u32> {
    attached::processes_using(dir).into_iter().find(|pid| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .zip(std::env::current_exe().ok())
            .is_some_and(|(a, b)| a.file_name() == b.file_name())
    })
}

/// A VM template's record, in its directory: how its VM was booted.
pub const TEMPLATE_RECORD: &str = "template.json";
/// Where a template's VM boots, inside the template's directory (its
/// sockets and console log; removed once the snapshot is written).
const TEMPLATE_BOOT_DIR: &str = "boot";

/// A VM template's record ([`TEMPLATE_RECORD`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// How its VM was booted; a create must match it.
    pub config: CacheConfig,
    /// When the snapshot was written (ms since the epoch).
    pub made_unix_ms: u64,
}

/// Makes a VM template in `dir`, which must not exist: boots a sandbox VM
/// with `config` (builtin only), waits for its agent's announcement,
/// pauses it, writes its snapshot and [`TEMPLATE_RECORD`] there, and
/// stops it. On failure nothing is left.
pub fn make_template(dir: &Path, config: &CacheConfig) -> Result<TemplateRecord, FactoryError> {
    make_template_with(dir, config, new_hypervisor(config.hypervisor))
}

/// [`make_template`] on a hypervisor of the caller's.
pub fn make_template_with(
    dir: &Path,
    config: &CacheConfig,
    mut vm: Box<dyn Hypervisor>,
) -> Result<TemplateRecord, FactoryError> {
    for kind in [config.hypervisor, vm.kind()] {
        if kind != HypervisorKind::Builtin {
            return Err(FactoryError::TemplateHypervisor(kind));
        }
    }
    check_image(&config.guest_image)?;
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(FactoryError::TemplateExists(dir.to_path_buf()));
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        make_private_dir(parent)?;
    }
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(dir).map_err(|e| match e
        .kind()
    {
        std::io::ErrorKind::AlreadyExists => FactoryError::TemplateExists(dir.to_path_buf()),
        _ => io("create the template's directory", dir)(e),
    })?;
    let began = Instant::now();
    let boot = dir.join(TEMPLATE_BOOT_DIR);
    let made = make_private_dir(&boot).and_then(|()| {
        let spec = config.spec(&boot);
        let host = HostSide::new(spec.vsock_socket());
        let ready = host.listen(link::DEFAULT_PORT).map_err(FactoryError::Agent)?;
        vm.start(&spec)?;
        let timeout = Duration::from_secs(config.boot_timeout_s);
        let (version, link) = host.wait_link(&ready, timeout, || vm.exited()).map_err(FactoryError::Agent)?;
        drop(ready);
        vm.pause()?;
        vm.snapshot(dir)?;
        vm.stop()?;
        // The guest's end of this link is reset in every clone.
        drop(link);
        std::fs::remove_dir_all(&boot).map_err(io("remove", &boot))?;
        let record = TemplateRecord { version: RECORD_VERSION, config: config.clone(), made_unix_ms: now_unix_ms() };
        let path = dir.join(TEMPLATE_RECORD);
        let json =
            serde_json::to_vec_pretty(&record).map_err(|source| FactoryError::Record { path: path.clone(), source })?;
        resources::cache::write_atomic(&path, &json).map_err(|e| io("write", &path)(std::io::Error::other(e)))?;
        info!(dir = %dir.display(), agent = %version, ms = began.elapsed().as_millis() as u64, "VM template made");
        Ok(record)
    });
    if made.is_err() {
        let console = vm.console_tail(20);
        if !console.is_empty() {
            warn!("the template's VM failed; its console ended with:\n{console}");
        }
        let _ = vm.stop();
        let _ = std::fs::remove_dir_all(dir);
    }
    made
}

/// Reads the record of the VM template in `dir`.
pub fn read_template(dir: &Path) -> Result<TemplateRecord, FactoryError> {
    let path = dir.join(TEMPLATE_RECORD);
    let bytes = std::fs::read(&path).map_err(io("read the VM template's record", &path))?;
    serde_json::from_slice(&bytes).map_err(|source| FactoryError::Record { path, source })
}

/// The CLI's record of the template it uses (`.factory/template-dir.json`):
/// what `vessel factory init --template` was given.
pub const TEMPLATE_FILE: &str = "template-dir.json";

/// A template kept for the CLI's creates, as `template-dir.json` says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateFile {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The template's directory.
    pub dir: PathBuf,
}

/// Writes `template-dir.json` atomically.
pub fn write_template_file(store: &Store, file: &TemplateFile) -> Result<(), FactoryError> {
    write_cli_record(store, TEMPLATE_FILE, file)
}

/// Reads `template-dir.json`; None when no template is kept.
pub fn read_template_file(store: &Store) -> Result<Option<TemplateFile>, FactoryError> {
    read_cli_record(store, TEMPLATE_FILE)
}

/// Writes the CLI's record `name` in the factory's directory, atomically.
fn write_cli_record(store: &Store, name: &str, record: &impl Serialize) -> Result<(), FactoryError> {
    make_private_dir(store.root())?;
    store.check_root()?;
    make_private_dir(&factory_dir(store))?;
    let path = factory_dir(store).join(name);
    let json =
        serde_json::to_vec_pretty(record).map_err(|source| FactoryError::Record { path: path.clone(), source })?;
    resources::cache::write_atomic(&path, &json).map_err(|e| io("write", &path)(std::io::Error::other(e)))
}

/// Reads the CLI's record `name` in the factory's directory; None when
/// there is none.
fn read_cli_record<T: serde::de::DeserializeOwned>(store: &Store, name: &str) -> Result<Option<T>, FactoryError> {
    let path = factory_dir(store).join(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| FactoryError::Record { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &path)(e)),
    }
}

/// The CLI's record of the cache it keeps (`.factory/cache.json`): what
/// `vessel factory init` was given.
pub const CACHE_FILE: &str = "cache.json";

/// A cache kept by separate owner processes (the CLI's), as `cache.json`
/// says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFile {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// How its VMs are booted.
    pub config: CacheConfig,
    /// How many it keeps.
    pub size: usize,
}

/// Writes `cache.json` atomically.
pub fn write_cache_file(store: &Store, file: &CacheFile) -> Result<(), FactoryError> {
    write_cli_record(store, CACHE_FILE, file)
}

/// Reads `cache.json`; None when no cache is kept.
pub fn read_cache_file(store: &Store) -> Result<Option<CacheFile>, FactoryError> {
    read_cli_record(store, CACHE_FILE)
}

/// What a create restores a VM from, and the hypervisor it restores it on.
pub(crate) type Restore = (Arc<Template>, Box<dyn Hypervisor>);

/// Makes a hypervisor for each VM an in-process cache boots.
pub type MakeHypervisor = Arc<dyn Fn() -> Box<dyn Hypervisor> + Send + Sync>;

/// A source of booted, paused VMs for [`crate::Sandbox::create`].
///
/// - [`Factory::cache`]: N VMs kept in this process, refilled in the
///   background as creates take them or as they die.
/// - [`Factory::holding`]: one VM this process booted, not refilled (the
///   CLI's owner processes, one VM each).
/// - [`Factory::template`]: a VM template (builtin only), loaded once;
///   each create restores a VM of its own from it.
///
/// A create whose config does not match the VMs ([`CacheConfig::mismatch`])
/// is refused with the reason; one that finds no VM ready boots its own,
/// cold, and logs why. Dropping the factory (its last clone) stops the
/// VMs it holds before it returns; one still booting is stopped when its
/// boot ends.
#[derive(Clone)]
pub struct Factory {
    handle: Arc<Handle>,
}

/// The embedder's hold on a pool; the pool's own threads hold it weakly
/// or for a moment, so the embedder's drop is what closes it.
struct Handle {
    pool: Arc<Pool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.pool.closed.store(true, Ordering::SeqCst);
        let ready = std::mem::take(&mut self.pool.lock().ready);
        drop(ready);
    }
}

impl std::fmt::Debug for Factory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Factory").field("size", &self.handle.pool.size).field("ready", &self.ready()).finish()
    }
}

struct Pool {
    store: Store,
    config: CacheConfig,
    /// How many it keeps (0: it holds what it was given, no more).
    size: usize,
    make: Option<MakeHypervisor>,
    /// A template's factory: what each create restores from.
    template: Option<Arc<Template>>,
    inner: Mutex<PoolInner>,
    changed: Condvar,
    closed: AtomicBool,
}

#[derive(Default)]
struct PoolInner {
    ready: Vec<CachedVm>,
    booting: usize,
    /// The last boot's failure, until a boot succeeds.
    failure: Option<String>,
    taken: u64,
    died: u64,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Boots what `pool` lacks, each in its own thread.
fn refill(pool: &Arc<Pool>) {
    let Some(make) = pool.make.clone() else { return };
    let mut inner = pool.lock();
    while inner.ready.len() + inner.booting < pool.size && !pool.closed.load(Ordering::SeqCst) {
        inner.booting += 1;
        let weak = Arc::downgrade(pool);
        let (store, config, make) = (pool.store.clone(), pool.config.clone(), make.clone());
        let spawned = std::thread::Builder::new().name("vessel-factory".into()).spawn(move || {
            let booted = CachedVm::boot_with(&store, &config, make());
            let Some(pool) = weak.upgrade() else { return };
            let mut inner = pool.lock();
            inner.booting -= 1;
            match booted {
                Ok(vm) if !pool.closed.load(Ordering::SeqCst) => {
                    inner.failure = None;
                    inner.ready.push(vm);
                }
                Ok(_) => {}
                Err(e) => {
                    let why = crate::error_chain(&e);
                    warn!(error = %why, "a cached VM did not boot");
                    inner.failure = Some(why);
                }
            }
            pool.changed.notify_all();
        });
        if spawned.is_err() {
            inner.booting -= 1;
            inner.failure = Some("cannot start a thread to boot a VM".into());
            break;
        }
    }
}

/// Every [`WATCH_EVERY`], drops VMs that died and boots their
/// replacements, for as long as the pool lives.
fn watch(pool: Weak<Pool>) {
    let _ = std::thread::Builder::new().name("vessel-factory-watch".into()).spawn(move || loop {
        std::thread::sleep(WATCH_EVERY);
        let Some(pool) = pool.upgrade() else { return };
        if pool.closed.load(Ordering::SeqCst) {
            return;
        }
        let dead: Vec<CachedVm> = {
            let mut inner = pool.lock();
            let mut dead = Vec::new();
            let mut i = 0;
            while i < inner.ready.len() {
                if let Some(why) = inner.ready[i].dead() {
                    warn!(vm = %inner.ready[i].name, why = %why, "a cached VM died; replacing it");
                    dead.push(inner.ready.swap_remove(i));
                    inner.died += 1;
                } else {
                    i += 1;
                }
            }
            dead
        };
        drop(dead);
        refill(&pool);
    });
}

impl Factory {
    /// A cache of `size` VMs booted with `config`, kept in this process
    /// under `store`'s factory directory. They boot in the background:
    /// [`Factory::wait_filled`] waits for them.
    pub fn cache(store: &Store, config: CacheConfig, size: usize) -> Result<Factory, FactoryError> {
        let kind = config.hypervisor;
        Self::cache_with(store, config, size, Arc::new(move || new_hypervisor(kind)))
    }

    /// [`Factory::cache`] on hypervisors of the caller's.
    pub fn cache_with(
        store: &Store,
        config: CacheConfig,
        size: usize,
        make: MakeHypervisor,
    ) -> Result<Factory, FactoryError> {
        if !(1..=MAX_CACHE).contains(&size) {
            return Err(FactoryError::Size(size));
        }
        check_image(&config.guest_image)?;
        let pool = Arc::new(Pool {
            store: store.clone(),
            config,
            size,
            make: Some(make),
            template: None,
            inner: Mutex::new(PoolInner::default()),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        refill(&pool);
        watch(Arc::downgrade(&pool));
        Ok(Factory { handle: Arc::new(Handle { pool }) })
    }

    /// A factory holding `vm` alone, refilling nothing.
    pub fn holding(store: &Store, vm: CachedVm) -> Factory {
        let config = vm.record.config.clone();
        let inner = PoolInner { ready: vec![vm], ..Default::default() };
        let pool = Arc::new(Pool {
            store: store.clone(),
            config,
            size: 0,
            make: None,
            template: None,
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        Factory { handle: Arc::new(Handle { pool }) }
    }

    /// The VM template in `dir` (Kata's template factory), made by
    /// [`make_template`]: its record read and its snapshot loaded once;
    /// each create restores a builtin VM from it.
    pub fn template(dir: &Path) -> Result<Factory, FactoryError> {
        let record = read_template(dir)?;
        if record.config.hypervisor != HypervisorKind::Builtin {
            return Err(FactoryError::TemplateHypervisor(record.config.hypervisor));
        }
        let template = Template::load(dir).map_err(|e| FactoryError::TemplateLoad(dir.to_path_buf(), e))?;
        Ok(Self::template_with(record, template, Arc::new(|| new_hypervisor(HypervisorKind::Builtin))))
    }

    /// [`Factory::template`] from a template of the caller's, restored by
    /// hypervisors of the caller's.
    pub fn template_with(record: TemplateRecord, template: Template, make: MakeHypervisor) -> Factory {
        // A template's factory boots nothing (its size is 0): the store is
        // never used.
        let store = Store::new(template.dir().join(TEMPLATE_BOOT_DIR));
        let pool = Arc::new(Pool {
            store,
            config: record.config,
            size: 0,
            make: Some(make),
            template: Some(Arc::new(template)),
            inner: Mutex::new(PoolInner::default()),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        Factory { handle: Arc::new(Handle { pool }) }
    }

    /// A template's factory: the template and a hypervisor to restore a
    /// VM from it for a sandbox with `config`; refused when `config`
    /// does not match. None for a cache.
    pub(crate) fn restore_source(&self, config: &SandboxConfig) -> Option<Result<Restore, String>> {
        let pool = &self.handle.pool;
        let template = pool.template.clone()?;
        let make = pool.make.clone()?;
        if let Some(why) = pool.config.mismatch_of(config, "the template's VM", "the template's") {
            return Some(Err(why));
        }
        pool.lock().taken += 1;
        Some(Ok((template, make())))
    }

    /// The template's directory, for a template's factory.
    pub fn template_dir(&self) -> Option<&Path> {
        self.handle.pool.template.as_deref().map(Template::dir)
    }

    /// How its VMs are booted.
    pub fn config(&self) -> &CacheConfig {
        &self.handle.pool.config
    }

    /// How many VMs it keeps.
    pub fn size(&self) -> usize {
        self.handle.pool.size
    }

    /// VMs paused and ready now.
    pub fn ready(&self) -> usize {
        self.handle.pool.lock().ready.len()
    }

    /// VMs booting now.
    pub fn booting(&self) -> usize {
        self.handle.pool.lock().booting
    }

    /// (taken, died): VMs handed out, and VMs that died while cached.
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.handle.pool.lock();
        (inner.taken, inner.died)
    }

    /// Waits until `size` VMs are ready; gives up after `timeout`, or
    /// when a boot fails with none left booting.
    pub fn wait_filled(&self, timeout: Duration) -> Result<(), FactoryError> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.handle.pool.lock();
        loop {
            if inner.ready.len() >= self.handle.pool.size {
                return Ok(());
            }
            if let Some(why) = inner.failure.clone().filter(|_| inner.booting == 0) {
                return Err(FactoryError::NotFilled(why));
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(FactoryError::NotFilled(format!(
                    "{} of {} VMs ready after {timeout:?}",
                    inner.ready.len(),
                    self.handle.pool.size
                )));
            };
            inner = self.handle.pool.changed.wait_timeout(inner, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// A live VM for a sandbox with `config`, or None when none is ready;
    /// refused when `config` does not match. Dead VMs met on the way are
    /// dropped; what was taken or dropped is booted again.
    pub(crate) fn take(&self, config: &SandboxConfig) -> Result<Option<CachedVm>, String> {
        if let Some(why) = self.handle.pool.config.mismatch(config) {
            return Err(why);
        }
        let mut dead = Vec::new();
        let found = {
            let mut inner = self.handle.pool.lock();
            let mut found = None;
            while let Some(mut vm) = inner.ready.pop() {
                match vm.dead() {
                    None => {
                        found = Some(vm);
                        inner.taken += 1;
                        break;
                    }
                    Some(why) => {
                        warn!(vm = %vm.name, why = %why, "a cached VM died; not handing it out");
                        inner.died += 1;
                        dead.push(vm);
                    }
                }
            }
            found
        };
        drop(dead);
        refill(&self.handle.pool);
        Ok(found)
    }
}

/// The factory's links to `dir`: where the VM of the sandbox in `dir` was
/// booted, if it came from the factory.
pub fn links_to(store: &Store, dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(factory_dir(store)) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == dir))
        .map(|e| e.path())
        .collect()
}
