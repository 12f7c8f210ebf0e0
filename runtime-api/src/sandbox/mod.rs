//! The sandbox API: a [`Sandbox`] is one microVM, its agent and its
//! containers, held by the embedder; every operation of Kata's
//! virtcontainers API on sandboxes and containers is a method here.
//!
//! Each operation takes the sandbox's lock (exclusive for mutations,
//! shared for reads), does its work, and writes the state file before it
//! returns.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agent_proto::agent::{
    ContainerRequest, Empty, GuestDetails, Routes, StatsContainerResponse, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use agent_proto::link;
use agent_proto::spec::SpecOptions;
use tracing::{debug, info, info_span, warn};

use crate::agent::{Agent, AgentError, HostSide, PendingStream};
use crate::config::{
    validate_id, validate_serial, ContainerConfig, DiskMount, NetworkConfig, ProcessConfig, Resources, SandboxConfig,
};
use crate::hypervisor::{attached, new_hypervisor, Disk, Hypervisor, HypervisorKind, Nic, VmFigures, VmSpec};
use crate::network;
use crate::shared_fs::{self, SharedDir};
use crate::state::{
    now_unix_ms, ContainerPhase, ContainerRecord, DeviceRecord, LockKind, NicRecord, SandboxLock, SandboxPhase,
    SandboxState, StateError, Store, STATE_VERSION,
};

mod containers;
mod error;
mod from_cache;
mod from_template;
mod interfaces;

pub use error::{CreateStep, SandboxError};

/// How long a stopped container's process may take to exit after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to dial a process's stdio streams.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

pub use crate::factory::Factory;

/// A process's exit statuses, filled by a waiter thread per process.
#[derive(Default)]
struct Exits {
    done: Mutex<HashMap<(String, String), i32>>,
    watched: Mutex<std::collections::HashSet<(String, String)>>,
    changed: Condvar,
}

impl Exits {
    /// Records that a waiter for the process runs; false if one did.
    fn watch(&self, id: &str, exec_id: &str) -> bool {
        self.watched.lock().unwrap_or_else(|p| p.into_inner()).insert((id.to_string(), exec_id.to_string()))
    }

    fn watched(&self, id: &str, exec_id: &str) -> bool {
        self.watched.lock().unwrap_or_else(|p| p.into_inner()).contains(&(id.to_string(), exec_id.to_string()))
    }

    fn get(&self, id: &str, exec_id: &str) -> Option<i32> {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).get(&(id.to_string(), exec_id.to_string())).copied()
    }

    fn wait(&self, id: &str, exec_id: &str, timeout: Option<Duration>) -> Option<i32> {
        let key = (id.to_string(), exec_id.to_string());
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(status) = done.get(&key) {
                return Some(*status);
            }
            done = match deadline {
                None => self.changed.wait(done).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.changed.wait_timeout(done, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }
}

/// A process's stdio: streams the agent dials once the process is set up.
/// Accept each (in its own thread, if the process needs its stdin fed
/// while its output is read).
#[derive(Debug)]
pub struct ProcessIo {
    /// Its stdin, when asked for.
    pub stdin: Option<PendingStream>,
    /// Its stdout (with a terminal: all its output).
    pub stdout: PendingStream,
    /// Its stderr, without a terminal.
    pub stderr: Option<PendingStream>,
}

/// A container's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerStatus {
    /// Its ID.
    pub id: String,
    /// Where it is.
    pub phase: ContainerPhase,
    /// When its first process started (ms since the epoch).
    pub started_unix_ms: Option<u64>,
    /// How its first process ended.
    pub exit_code: Option<i32>,
    /// Its first process's PID in the guest.
    pub pid: Option<i32>,
    /// Its root image.
    pub rootfs: std::path::PathBuf,
}

/// A sandbox's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxStatus {
    /// Its ID.
    pub id: String,
    /// Where it is.
    pub phase: SandboxPhase,
    /// What runs it.
    pub hypervisor: HypervisorKind,
    /// When it was created (ms since the epoch).
    pub created_unix_ms: u64,
    /// Its containers.
    pub containers: Vec<ContainerStatus>,
}

/// A sandbox as `list` finds it on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSummary {
    /// Its status as last written.
    pub status: SandboxStatus,
    /// Whether the process that owns its VM still lives (a sandbox whose
    /// owner died is dead, whatever its state file says).
    pub owner_alive: bool,
}

/// A sandbox's figures: its VM's and each running container's.
#[derive(Clone, Debug)]
pub struct SandboxStats {
    /// The VM's.
    pub vm: VmFigures,
    /// Each running container's cgroup figures, by ID.
    pub containers: Vec<(String, StatsContainerResponse)>,
}

/// A running sandbox; see the module docs.
pub struct Sandbox {
    store: Store,
    state: SandboxState,
    vm: Box<dyn Hypervisor>,
    agent: Agent,
    host: HostSide,
    exits: Arc<Exits>,
    details: GuestDetails,
    io: HashMap<String, ProcessIo>,
    /// virtiofsd, serving the shared directory (the owner's handle only).
    fs_daemon: Option<std::process::Child>,
    /// The agent's link (the connection it announced itself on), held by
    /// the owner's handle for as long as it holds the VM: the agent dials
    /// again whenever it ends.
    _link: Option<std::os::unix::net::UnixStream>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id()).field("phase", &self.state.phase).finish_non_exhaustive()
    }
}

/// A container's root disk serial: its index among the sandbox's disks.
fn disk_serial(index: usize) -> String {
    format!("ctr-{index}")
}

/// A container ID request.
fn container_request(id: &str) -> ContainerRequest {
    ContainerRequest { container_id: id.into(), ..Default::default() }
}

fn spec_options(
    process: &ProcessConfig,
    hostname: Option<&str>,
    resources: &Resources,
    disks: &[DiskMount],
) -> SpecOptions {
    SpecOptions {
        shared: Vec::new(),
        disks: disks
            .iter()
            .map(|d| agent_proto::spec::DiskMount {
                serial: d.serial.clone(),
                destination: d.destination.clone(),
                fstype: d.fstype.clone(),
                read_only: d.read_only,
            })
            .collect(),
        hostname: hostname.map(str::to_string),
        uid: process.uid,
        gid: process.gid,
        terminal: process.terminal,
        resources: resources.oci_json(),
        env: process.env.clone(),
        console_size: process.console_size,
    }
}

impl Sandbox {
    /// Creates a sandbox: its VM boots, its agent is reached, and its
    /// containers are created (not started). Uses the hypervisor the
    /// config names, or the one [`HypervisorKind::detect`] chooses.
    ///
    /// With a template's `factory`, the VM is restored from its snapshot,
    /// its agent reached again on the sandbox's own socket, and it goes on
    /// as a cached VM does. With a cache, the VM is one it booted ahead of
    /// time, if one is ready: resumed, given its identity, its containers' roots and disks
    /// hot-plugged (see [`crate::factory`]). A config the factory's VMs do
    /// not match is refused with the reason ([`SandboxError::FactoryMismatch`]);
    /// with no VM ready, the sandbox boots its own, and the log says so.
    pub fn create(store: &Store, config: SandboxConfig, factory: Option<&Factory>) -> Result<Sandbox, SandboxError> {
        if let Some(factory) = factory {
            validate(&config)?;
            // Refused before a VM is spent on it.
            if store.dir(&config.id)?.exists() && !store.abandoned(&config.id) {
                return Err(StateError::Exists(config.id.clone()).into());
            }
            if let Some(source) = factory.restore_source(&config) {
                let (template, vm) =
                    source.map_err(|why| SandboxError::FactoryMismatch { id: config.id.clone(), why })?;
                return Self::create_from_template(store, config, &template, factory.config(), vm);
            }
            loop {
                let taken = factory
                    .take(&config)
                    .map_err(|why| SandboxError::FactoryMismatch { id: config.id.clone(), why })?;
                let Some(vm) = taken else {
                    info!(id = %config.id, "the factory has no VM ready; booting one cold");
                    break;
                };
                match Self::create_from(store, config.clone(), vm) {
                    // A VM that died after it was looked at, or would not
                    // run again: rolled back, and the next one is tried.
                    Err(SandboxError::Create {
                        step: step @ (CreateStep::Directory | CreateStep::Vm), source, ..
                    }) if !matches!(*source, SandboxError::State(StateError::Exists(_))) => {
                        let error = crate::error_chain(&*source);
                        warn!(id = %config.id, %step, %error, "a cached VM could not be taken; trying another");
                    }
                    other => return other,
                }
            }
        }
        let kind = config.hypervisor.unwrap_or_else(HypervisorKind::detect);
        Self::create_with(store, config, new_hypervisor(kind))
    }

    /// [`Sandbox::create`] then [`Sandbox::start`] (Kata's RunSandbox).
    pub fn run(store: &Store, config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let mut sandbox = Self::create(store, config, None)?;
        sandbox.start()?;
        Ok(sandbox)
    }

    /// [`Sandbox::create`] on a hypervisor of the caller's (an embedder's
    /// own, or a test double).
    pub fn create_with(
        store: &Store,
        config: SandboxConfig,
        mut vm: Box<dyn Hypervisor>,
    ) -> Result<Sandbox, SandboxError> {
        let id = config.id.clone();
        let _span = info_span!("create_sandbox", id = %id, hypervisor = %vm.kind()).entered();
        let began = Instant::now();
        let (kernel, initrd) = validate(&config)?;

        // Directory and lock. Undo: remove the directory.
        let (dir, lock) = make_directory(store, &id)?;
        let undo_dir = || {
            if let Err(e) = store.remove(&id) {
                warn!(error = %e, "rollback: cannot remove the sandbox directory");
            }
        };
        step_done(CreateStep::Directory, began);

        // The network. Undo: remove the TAP and the redirects.
        let plan = match config.network.as_ref().map(|n| network::setup(n, &network::tap_name(0))).transpose() {
            Ok(plan) => plan,
            Err(e) => {
                undo_dir();
                return Err(SandboxError::at(CreateStep::Network, &id)(e.into()));
            }
        };
        let undo_network = || {
            if let Some(network) = &config.network {
                network::teardown(network, &network::tap_name(0));
            }
        };
        step_done(CreateStep::Network, began);

        // The shared directory: the containers' directories bind-mounted,
        // virtiofsd serving it. Undo: stop the daemon, unmount.
        // Whether each root is a directory, asked once: the answer decides
        // disk or share everywhere below, so it must not change midway.
        let dir_roots: Vec<bool> = config.containers.iter().map(ContainerConfig::root_is_directory).collect();
        let needs_fs =
            config.shared_fs || dir_roots.iter().any(|d| *d) || config.containers.iter().any(|c| !c.volumes.is_empty());
        let shared = SharedDir::of(&dir);
        let undo_shared = |daemon: Option<std::process::Child>| {
            if let Some(mut daemon) = daemon {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
            if let Err(e) = shared.tear_down() {
                warn!(error = %e, "rollback: cannot unmount the shared directory");
            }
        };
        let mut fs_daemon = None;
        if needs_fs {
            let shared_up = shared
                .create()
                .and_then(|()| {
                    config.containers.iter().zip(&dir_roots).try_for_each(|(c, d)| share_container(&shared, c, *d))
                })
                .and_then(|()| {
                    shared_fs::spawn_daemon(&shared, &dir.join(shared_fs::SOCKET), &dir.join("virtiofsd.log"))
                });
            match shared_up {
                Ok(daemon) => fs_daemon = Some(daemon),
                Err(e) => {
                    undo_shared(None);
                    undo_network();
                    undo_dir();
                    return Err(SandboxError::at(CreateStep::SharedFs, &id)(e.into()));
                }
            }
        }
        step_done(CreateStep::SharedFs, began);

        // The VM. Undo: stop it.
        let spec = VmSpec {
            dir: dir.clone(),
            kernel,
            initrd,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            disks: config
                .containers
                .iter()
                .enumerate()
                .filter(|(i, _)| !dir_roots[*i])
                .map(|(i, c)| Disk { path: c.rootfs.clone(), read_only: false, serial: disk_serial(i) })
                .chain(config.disks.iter().map(|d| Disk {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                }))
                .collect(),
            nics: plan.iter().map(|p| Nic { netns: Some(p.netns.clone()), tap: p.tap.clone(), mac: p.mac }).collect(),
            hotplug_slots: config.hotplug_slots,
            shared_fs: needs_fs.then(|| dir.join(shared_fs::SOCKET)),
        };
        let host = HostSide::new(spec.vsock_socket());
        let booted = host.listen(link::DEFAULT_PORT).map_err(SandboxError::from).and_then(|ready| {
            vm.start(&spec)?;
            Ok(ready)
        });
        let ready = match booted {
            Ok(ready) => ready,
            Err(e) => {
                let _ = vm.stop();
                undo_shared(fs_daemon.take());
                undo_network();
                undo_dir();
                return Err(SandboxError::at(CreateStep::Vm, &id)(e));
            }
        };
        step_done(CreateStep::Vm, began);

        // The agent.
        let timeout = Duration::from_secs(config.boot_timeout_s);
        let reached =
            reach_agent(&host, &ready, timeout, &spec, &config, vm.as_mut()).and_then(|(agent, details, link)| {
                if let Some(plan) = &plan {
                    configure_guest_network(&agent, plan)?;
                }
                Ok((agent, details, link))
            });
        drop(ready);
        let (agent, details, link) = match reached {
            Ok(reached) => reached,
            Err(e) => {
                let _ = vm.stop();
                undo_shared(fs_daemon.take());
                undo_network();
                undo_dir();
                return Err(SandboxError::at(CreateStep::Agent, &id)(e.into()));
            }
        };
        step_done(CreateStep::Agent, began);
        info!(kernel = %details.kernel_release, cpus = details.online_cpus, "guest ready");

        let state = SandboxState {
            version: STATE_VERSION,
            hypervisor: vm.kind(),
            phase: SandboxPhase::Ready,
            owner_pid: std::process::id(),
            vm_pid: vm.process_id(),
            created_unix_ms: now_unix_ms(),
            containers: Vec::new(),
            devices: spec
                .disks
                .iter()
                .map(|d| DeviceRecord {
                    path: d.path.clone(),
                    serial: d.serial.clone(),
                    read_only: d.read_only,
                    mmio_address: None,
                })
                .collect(),
            nics: plan
                .iter()
                .map(|p| NicRecord {
                    network: NetworkConfig { netns: p.netns.clone(), interface: p.interface.clone() },
                    tap: p.tap.clone(),
                    name: p.interface.clone(),
                    mac: network::format_mac(&p.mac),
                    handle: None,
                    bind_address: None,
                })
                .collect(),
            config: SandboxConfig { containers: Vec::new(), shared_fs: needs_fs, ..config.clone() },
            booted_in: None,
        };
        let mut sandbox = Sandbox {
            store: store.clone(),
            state,
            vm,
            agent,
            host,
            exits: Arc::default(),
            details,
            io: HashMap::new(),
            fs_daemon: None,
            _link: Some(link),
        };

        // The containers, then the state. Undo: remove them, stop the VM.
        let made = config.containers.iter().enumerate().try_for_each(|(i, c)| {
            let root = if dir_roots[i] { RootOn::Shared } else { RootOn::Disk(disk_serial(i)) };
            sandbox.create_on(c, root)
        });
        let outcome = made.map_err(SandboxError::at(CreateStep::Containers, &id)).and_then(|()| {
            step_done(CreateStep::Containers, began);
            sandbox.store.save(&sandbox.state).map_err(|e| SandboxError::at(CreateStep::State, &id)(e.into()))
        });
        if let Err(e) = outcome {
            sandbox.remove_containers_on_rollback();
            let _ = sandbox.vm.stop();
            undo_shared(fs_daemon.take());
            undo_network();
            drop(lock);
            undo_dir();
            return Err(e);
        }
        sandbox.fs_daemon = fs_daemon;
        step_done(CreateStep::State, began);
        info!(ms = began.elapsed().as_millis() as u64, "sandbox created");
        Ok(sandbox)
    }

    /// A handle on sandbox `id` rebuilt from its state, with the agent
    /// reached anew (Kata's FetchSandbox): every container operation works
    /// through it; VM operations that only the owning process can do (see
    /// [`attached::Attached`]) say so. The sandbox must be live: stopped,
    /// or with its owner gone, it can only be deleted
    /// ([`Sandbox::delete_by_id`]).
    pub fn fetch(store: &Store, id: &str) -> Result<Sandbox, SandboxError> {
        let _span = info_span!("fetch_sandbox", id).entered();
        let _lock = store.lock(id, LockKind::Exclusive)?;
        let state = store.load(id)?;
        if state.phase == SandboxPhase::Stopped {
            return Err(SandboxError::SandboxState {
                id: id.into(),
                phase: state.phase,
                op: "fetch",
                needs: "not stopped",
            });
        }
        if !attached::process_alive(state.owner_pid) {
            return Err(SandboxError::OwnerGone { id: id.into(), owner_pid: state.owner_pid });
        }
        let dir = store.dir(id)?;
        let vm = attached::Attached::new(
            state.hypervisor,
            dir.clone(),
            state.owner_pid,
            state.vm_pid,
            state.created_unix_ms,
            state.config.memory_mib,
        );
        let agent = Agent::connect_hybrid(&dir.join("vsock.sock"))?;
        let details = agent.call("GetGuestDetails", |c, ctx| c.get_guest_details(ctx, &Empty::new()))?;
        Ok(Sandbox {
            store: store.clone(),
            host: HostSide::new(dir.join("vsock.sock")),
            state,
            vm: Box::new(vm),
            agent,
            exits: Arc::default(),
            details,
            io: HashMap::new(),
            fs_daemon: None,
            _link: None,
        })
    }

    /// Deletes sandbox `id` without a live handle: a stopped one, or with
    /// `force` one whose owner process is gone (its QEMU ended, its TAPs,
    /// state and sockets removed). A live sandbox is refused: stop it
    /// through its handle first.
    pub fn delete_by_id(store: &Store, id: &str, force: bool) -> Result<(), SandboxError> {
        let _span = info_span!("delete_sandbox", id, force).entered();
        if store.abandoned(id) {
            // A create that died before writing its state: nothing but the
            // directory (its QEMU died with it).
            return Ok(store.remove(id)?);
        }
        let lock = store.lock(id, LockKind::Exclusive)?;
        let state = match store.load(id) {
            Ok(state) => state,
            Err(e @ (StateError::Corrupt { .. } | StateError::Version { .. })) if force => {
                // No state to say what runs: end what is tied to the
                // directory, then remove it. A TAP in a CNI namespace is
                // left to the namespace's owner.
                let dir = store.dir(id)?;
                let mut ended = attached::processes_using(&dir);
                // A VM taken from the factory names its old directory,
                // now a link here.
                for link in crate::factory::links_to(store, &dir) {
                    ended.extend(attached::processes_using(&link));
                }
                // The link resolves to the directory: the same processes.
                ended.sort_unstable();
                ended.dedup();
                for &pid in &ended {
                    warn!(pid, error = %e, "ending a process of a sandbox whose state is unreadable");
                    if let Ok(pid) = libc::pid_t::try_from(pid) {
                        // SAFETY: kill sends a signal; no memory is touched.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                // Gone before their directory goes (a few seconds at most).
                let deadline = Instant::now() + Duration::from_secs(5);
                while ended.iter().any(|p| attached::process_alive(*p)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(lock);
                return Ok(store.remove(id)?);
            }
            Err(e) => return Err(e.into()),
        };
        let owner_alive = attached::process_alive(state.owner_pid);
        let dead = !owner_alive && force;
        if state.phase != SandboxPhase::Stopped && !dead {
            if !owner_alive {
                return Err(SandboxError::OwnerGone { id: id.into(), owner_pid: state.owner_pid });
            }
            let phase = state.phase;
            return Err(SandboxError::SandboxState { id: id.into(), phase, op: "delete", needs: "stopped" });
        }
        let dir = store.dir(id)?;
        // A VM taken from the factory names its old directory, now a link
        // here: found on disk, not taken from the state file's word.
        let links = crate::factory::links_to(store, &dir);
        let runs_for = |pid: u32| attached::runs_for(pid, &dir) || links.iter().any(|l| attached::runs_for(pid, l));
        if let Some(pid) = state.vm_pid.filter(|pid| attached::process_alive(*pid) && runs_for(*pid)) {
            let mut vm = attached::Attached::new(state.hypervisor, store.dir(id)?, state.owner_pid, Some(pid), 0, 0);
            vm.stop()?;
        }
        for nic in &state.nics {
            network::teardown(&nic.network, &nic.tap);
        }
        drop(lock);
        Ok(store.remove(id)?)
    }

    /// Its ID.
    pub fn id(&self) -> &str {
        self.state.id()
    }

    /// The state as last written.
    pub fn state(&self) -> &SandboxState {
        &self.state
    }

    /// What the guest said of itself when the sandbox was created.
    pub fn guest_details(&self) -> &GuestDetails {
        &self.details
    }

    /// The last `lines` of the guest's console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.vm.console_tail(lines)
    }

    /// Takes the sandbox's lock and rereads its state: another handle (a
    /// fetched one, in another process) may have changed it since.
    fn lock(&mut self, kind: LockKind) -> Result<SandboxLock, SandboxError> {
        let lock = self.store.lock(self.id(), kind)?;
        self.state = self.store.load(self.id())?;
        Ok(lock)
    }

    fn save(&self) -> Result<(), SandboxError> {
        Ok(self.store.save(&self.state)?)
    }

    fn require_vm(&self, op: &'static str) -> Result<(), SandboxError> {
        match self.state.phase {
            SandboxPhase::Ready | SandboxPhase::Running => Ok(()),
            phase => Err(SandboxError::SandboxState { id: self.id().into(), phase, op, needs: "ready or running" }),
        }
    }

    fn record(&self, id: &str) -> Result<&ContainerRecord, SandboxError> {
        self.state
            .container(id)
            .ok_or_else(|| SandboxError::NoSuchContainer { sandbox: self.id().into(), id: id.into() })
    }

    fn record_mut(&mut self, id: &str) -> Result<&mut ContainerRecord, SandboxError> {
        let sandbox = self.id().to_string();
        self.state.container_mut(id).ok_or(SandboxError::NoSuchContainer { sandbox, id: id.into() })
    }

    fn require_phase(
        &self,
        id: &str,
        op: &'static str,
        allowed: &[ContainerPhase],
        needs: &'static str,
    ) -> Result<(), SandboxError> {
        let phase = self.record(id)?.phase;
        if allowed.contains(&phase) {
            Ok(())
        } else {
            Err(SandboxError::ContainerState { id: id.into(), phase, op, needs })
        }
    }

    /// Notices first processes that have exited since the last look.
    /// A first process this handle does not wait for (it was started by
    /// another handle) is asked about through the agent's ContainerStatus.
    fn refresh(&mut self) -> bool {
        let mut changed = self.learn_pids();
        for c in &mut self.state.containers {
            if !matches!(c.phase, ContainerPhase::Running | ContainerPhase::Paused) {
                continue;
            }
            let id = c.config.id.as_str();
            let exit = match self.exits.get(id, "") {
                Some(status) => Some(status),
                None if self.exits.watched(id, "") => None,
                None => {
                    let request = container_request(id);
                    match self.agent.call("ContainerStatus", |cl, ctx| cl.container_status(ctx, &request)) {
                        Ok(status) => status.exited.then_some(status.exit_code),
                        Err(e) => {
                            debug!(container = %id, error = %e, "no status from the agent");
                            None
                        }
                    }
                }
            };
            if let Some(status) = exit {
                c.phase = ContainerPhase::Stopped;
                c.exit_code = Some(status);
                changed = true;
            }
        }
        changed
    }

    /// Asks the agent the first process's PID of each live container whose
    /// record has none yet (a status shows it); whether one was learnt.
    fn learn_pids(&mut self) -> bool {
        let mut learnt = false;
        for c in &mut self.state.containers {
            if c.pid.is_some() || c.phase == ContainerPhase::Stopped {
                continue;
            }
            let request = container_request(&c.config.id);
            if let Ok(status) = self.agent.call("ContainerStatus", |cl, ctx| cl.container_status(ctx, &request)) {
                c.pid = Some(status.pid).filter(|pid| *pid > 0);
                learnt |= c.pid.is_some();
            }
        }
        learnt
    }

    /// Starts every container not started yet (Kata's StartSandbox).
    pub fn start(&mut self) -> Result<(), SandboxError> {
        let _span = info_span!("start_sandbox", id = %self.id()).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("start")?;
        let ready: Vec<String> = self
            .state
            .containers
            .iter()
            .filter(|c| c.phase == ContainerPhase::Ready)
            .map(|c| c.config.id.clone())
            .collect();
        for id in ready {
            self.start_locked(&id)?;
        }
        self.state.phase = SandboxPhase::Running;
        self.save()
    }

    /// Stops every container, then the VM (Kata's StopSandbox). With
    /// `force`, a container that will not stop does not keep the VM up.
    pub fn stop(&mut self, force: bool) -> Result<(), SandboxError> {
        let _span = info_span!("stop_sandbox", id = %self.id(), force).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        if self.state.phase == SandboxPhase::Stopped {
            return Ok(());
        }
        if self.state.phase == SandboxPhase::Paused {
            self.vm.resume()?;
            self.state.phase = SandboxPhase::Running;
        }
        let live: Vec<String> = self
            .state
            .containers
            .iter()
            .filter(|c| matches!(c.phase, ContainerPhase::Running | ContainerPhase::Paused))
            .map(|c| c.config.id.clone())
            .collect();
        for id in live {
            match self.stop_locked(&id) {
                Ok(()) => {}
                Err(e) if force => warn!(container = %id, error = %e, "stop --force: going on"),
                Err(e) => return Err(e),
            }
        }
        // The agent removes what is left of the containers and reports what
        // it could not; the host then stops the VM.
        if let Err(e) = self.agent.call("DestroySandbox", |c, ctx| c.destroy_sandbox(ctx, &Empty::new())) {
            if !force {
                return Err(e.into());
            }
            warn!(error = %e, "stop --force: the agent's cleanup failed; going on");
        }
        let vm_stop = Instant::now();
        self.vm.stop()?;
        debug!(ms = vm_stop.elapsed().as_secs_f64() * 1000.0, "VM stopped");
        for nic in &self.state.nics {
            network::teardown(&nic.network, &nic.tap);
        }
        self.stop_shared_fs()?;
        for c in &mut self.state.containers {
            c.phase = ContainerPhase::Stopped;
        }
        self.state.phase = SandboxPhase::Stopped;
        self.save()
    }

    /// Deletes a stopped sandbox: its state and directory (Kata's
    /// DeleteSandbox).
    pub fn delete(mut self) -> Result<(), SandboxError> {
        let _span = info_span!("delete_sandbox", id = %self.id()).entered();
        let lock = self.lock(LockKind::Exclusive)?;
        if self.state.phase != SandboxPhase::Stopped {
            let phase = self.state.phase;
            return Err(SandboxError::SandboxState { id: self.id().into(), phase, op: "delete", needs: "stopped" });
        }
        self.vm.stop()?;
        self.io.clear();
        drop(lock);
        Ok(self.store.remove(self.id())?)
    }

    /// Pauses every vCPU (Kata's PauseSandbox).
    pub fn pause(&mut self) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("pause")?;
        self.vm.pause()?;
        self.state.phase = SandboxPhase::Paused;
        self.save()
    }

    /// Lets a paused sandbox run again (Kata's ResumeSandbox).
    pub fn resume(&mut self) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        if self.state.phase != SandboxPhase::Paused {
            let phase = self.state.phase;
            return Err(SandboxError::SandboxState { id: self.id().into(), phase, op: "resume", needs: "paused" });
        }
        self.vm.resume()?;
        self.state.phase = SandboxPhase::Running;
        self.save()
    }

    /// The sandbox's and each container's status; a container whose first
    /// process has exited is recorded as stopped.
    pub fn status(&mut self) -> Result<SandboxStatus, SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        if self.refresh() {
            self.save()?;
        }
        Ok(status_of(&self.state))
    }

    /// The VM's figures and every running container's.
    pub fn stats(&mut self) -> Result<SandboxStats, SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        let vm = self.vm.figures()?;
        let mut containers = Vec::new();
        for c in self.state.containers.iter().filter(|c| c.phase == ContainerPhase::Running) {
            let id = &c.config.id;
            let stats = self.agent.call("StatsContainer", |cl, ctx| cl.stats_container(ctx, &container_request(id)))?;
            containers.push((id.clone(), stats));
        }
        Ok(SandboxStats { vm, containers })
    }

    /// Sandbox `id` as its state file says, with whether its owner lives:
    /// the status of a stopped or dead sandbox, which cannot be fetched.
    pub fn summary(store: &Store, id: &str) -> Result<SandboxSummary, SandboxError> {
        let _lock = store.lock(id, LockKind::Shared)?;
        let state = store.load(id)?;
        Ok(SandboxSummary { status: status_of(&state), owner_alive: attached::process_alive(state.owner_pid) })
    }

    /// The sandboxes in `store`, as their state files say, with whether
    /// each one's owner lives. A store whose root is missing holds none. A
    /// sandbox whose state cannot be read is left out with a warning (ask
    /// [`Sandbox::summary`] for its error); it hides none of the others.
    pub fn list(store: &Store) -> Result<Vec<SandboxSummary>, SandboxError> {
        let mut all = Vec::new();
        for id in store.ids()? {
            match Self::summary(store, &id) {
                Ok(summary) => all.push(summary),
                // Being created, or deleted, as we look.
                Err(SandboxError::State(StateError::NotFound(_))) => {}
                Err(e) => warn!(id, error = %e, "a sandbox whose state cannot be read"),
            }
        }
        Ok(all)
    }
}

impl Sandbox {
    /// Ends virtiofsd (it ends by itself once its VM is gone; this one may
    /// be another process's) and unmounts the shared directory.
    fn stop_shared_fs(&mut self) -> Result<(), SandboxError> {
        if let Some(mut daemon) = self.fs_daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if self.state.config.shared_fs {
            SharedDir::of(&self.store.dir(self.id())?).tear_down()?;
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    /// The owner's handle dropped without stop leaves no VM behind, and no
    /// mounts; its state says where it was, and `list` shows its owner
    /// gone. A fetched handle leaves the sandbox as it is.
    fn drop(&mut self) {
        if self.vm.owned() {
            let _ = self.vm.stop();
            let _ = self.stop_shared_fs();
        }
    }
}

/// Checks what create is given before anything is made: the IDs, the
/// disk serials and mounts, the guest's hostname, the guest image's files
/// (returned: kernel, initrd).
fn validate(config: &SandboxConfig) -> Result<(std::path::PathBuf, std::path::PathBuf), SandboxError> {
    let id = config.id.clone();
    validate_id(&id)?;
    let mut seen = std::collections::HashSet::new();
    for c in &config.containers {
        validate_id(&c.id)?;
        if !seen.insert(c.id.as_str()) {
            return Err(SandboxError::ContainerExists { sandbox: id, id: c.id.clone() });
        }
    }
    let mut serials = std::collections::HashSet::new();
    for d in &config.disks {
        validate_serial(&d.serial)?;
        if !serials.insert(d.serial.as_str()) {
            return Err(SandboxError::DiskExists { sandbox: id, serial: d.serial.clone() });
        }
    }
    for m in config.containers.iter().flat_map(|c| &c.disks) {
        if !serials.contains(m.serial.as_str()) {
            return Err(SandboxError::NoSuchDisk { sandbox: id, serial: m.serial.clone() });
        }
    }
    agent_proto::identity::check_hostname(config.guest_hostname())?;
    let kernel = config.guest_image.join(resources::guest_image::KERNEL_FILE);
    let initrd = config.guest_image.join(resources::guest_image::INITRD_FILE);
    for file in [&kernel, &initrd] {
        if !file.is_file() {
            return Err(SandboxError::GuestImage(file.clone()));
        }
    }
    Ok((kernel, initrd))
}

/// Bind-mounts container `c`'s root (when `dir_root`, as the caller found
/// it) and volumes into the shared directory.
fn share_container(shared: &SharedDir, c: &ContainerConfig, dir_root: bool) -> Result<(), shared_fs::SharedFsError> {
    let made = (|| {
        if dir_root {
            shared.add_root(&c.id, &c.rootfs)?;
        }
        for (n, v) in c.volumes.iter().enumerate() {
            shared.add_volume(&c.id, n, &v.source, v.read_only)?;
        }
        Ok(())
    })();
    if made.is_err() {
        let _ = shared.remove_container(&c.id);
    }
    made
}

/// Where a container's root comes from.
pub(super) enum RootOn {
    /// A disk with this serial.
    Disk(String),
    /// Its directory in the shared directory.
    Shared,
}

/// Gives the guest the veth's identity: its NIC (found by MAC) gets the
/// veth's name, addresses and MTU, then the veth's routes.
fn configure_guest_network(agent: &Agent, plan: &network::Plan) -> Result<(), AgentError> {
    let request = UpdateInterfaceRequest { interface: Some(plan.guest_interface.clone()).into(), ..Default::default() };
    agent.call("UpdateInterface", |c, ctx| c.update_interface(ctx, &request))?;
    if !plan.guest_routes.is_empty() {
        let routes = Routes { routes: plan.guest_routes.clone(), ..Default::default() };
        let request = UpdateRoutesRequest { routes: Some(routes).into(), ..Default::default() };
        agent.call("UpdateRoutes", |c, ctx| c.update_routes(ctx, &request))?;
    }
    Ok(())
}

/// Makes sandbox `id`'s directory and takes its lock. A directory left by
/// a create that died before writing its state is taken over.
fn make_directory(store: &Store, id: &str) -> Result<(std::path::PathBuf, crate::state::SandboxLock), SandboxError> {
    let made = match store.create_locked(id) {
        Err(StateError::Exists(_)) if store.abandoned(id) => {
            warn!("taking over the directory of a create that died");
            store.remove(id).and_then(|()| store.create_locked(id))
        }
        other => other,
    };
    made.map_err(|e| SandboxError::at(CreateStep::Directory, id)(e.into()))
}

/// Waits up to `timeout` for the guest's agent to announce itself on
/// `ready` (giving up when `vm` ends), connects to it through `spec`'s
/// hybrid vsock socket and gives the guest its identity. On failure, the
/// end of the guest's console goes to the log.
fn reach_agent(
    host: &HostSide,
    ready: &std::os::unix::net::UnixListener,
    timeout: Duration,
    spec: &VmSpec,
    config: &SandboxConfig,
    vm: &mut dyn Hypervisor,
) -> Result<(Agent, GuestDetails, std::os::unix::net::UnixStream), AgentError> {
    let reached = host
        .wait_link(ready, timeout, || vm.exited())
        .and_then(|(version, link)| {
            debug!(agent = %version, "the agent announced itself");
            Ok((Agent::connect_hybrid(&spec.vsock_socket())?, link))
        })
        .and_then(|(agent, link)| {
            let details = agent.set_identity(config.guest_hostname())?;
            Ok((agent, details, link))
        });
    if reached.is_err() {
        let console = vm.console_tail(20);
        if !console.is_empty() {
            warn!("the guest's console ended with:\n{console}");
        }
    }
    reached
}

impl Sandbox {
    /// Removes the containers created so far, last first, for a create
    /// that is being undone; what cannot be removed is logged.
    fn remove_containers_on_rollback(&self) {
        for c in self.state.containers.iter().rev() {
            let id = &c.config.id;
            let removed =
                self.agent.call("RemoveContainer", |cl, ctx| cl.remove_container(ctx, &container_request(id)));
            if let Err(e) = removed {
                warn!(container = %id, error = %e, "rollback: cannot remove a container");
            }
        }
    }
}

fn step_done(step: CreateStep, began: Instant) {
    debug!(step = %step, ms = began.elapsed().as_secs_f64() * 1000.0, "create step done");
}

fn container_status_of(c: &ContainerRecord) -> ContainerStatus {
    ContainerStatus {
        id: c.config.id.clone(),
        phase: c.phase,
        started_unix_ms: c.started_unix_ms,
        exit_code: c.exit_code,
        pid: c.pid,
        rootfs: c.config.rootfs.clone(),
    }
}

fn status_of(state: &SandboxState) -> SandboxStatus {
    SandboxStatus {
        id: state.id().into(),
        phase: state.phase,
        hypervisor: state.hypervisor,
        created_unix_ms: state.created_unix_ms,
        containers: state.containers.iter().map(container_status_of).collect(),
    }
}
