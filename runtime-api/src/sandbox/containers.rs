//! Container operations on a running sandbox (Kata's container API:
//! create, start, stop, delete, cleanup, exec, kill, ps, update, stats,
//! pause, resume, status, waits), and the disks they use.

use std::time::{Duration, Instant};

use agent_proto::agent::{
    CreateContainerRequest, Empty, ExecProcessRequest, MountDiskRequest, ProcessInfo, RemoveProcessRequest,
    ResizeTerminalRequest, Resources as AgentResources, Rootfs, SignalProcessRequest, StatsContainerResponse, Stdio,
    UpdateContainerRequest, VirtioSlotRequest, WaitProcessRequest,
};
use agent_proto::spec::{process_json, spec_json};
use tracing::{debug, info_span, warn};

use super::{
    container_request, container_status_of, disk_serial, share_container, spec_options, ContainerStatus, ProcessIo,
    RootOn, Sandbox, SandboxError, STOP_TIMEOUT,
};
use crate::agent::AgentError;
use crate::config::{
    validate_id, validate_serial, ContainerConfig, DiskConfig, DiskMount, Limit, ProcessConfig, Resources,
    ROOT_SERIAL_PREFIX,
};
use crate::hypervisor::Disk;
use crate::shared_fs::SharedDir;
use crate::state::{now_unix_ms, ContainerPhase, ContainerRecord, DeviceRecord, LockKind, SandboxPhase};

/// How long a waiter refused as one too many waits before it asks again.
const WAIT_RETRY: Duration = Duration::from_millis(250);

impl Sandbox {
    /// Stdio streams for `process`, and the ports to name in its request.
    pub(super) fn process_io(&self, process: &ProcessConfig) -> Result<(ProcessIo, Stdio), SandboxError> {
        let stdout = self.host.stream()?;
        let stderr = if process.terminal { None } else { Some(self.host.stream()?) };
        let stdin = if process.stdin { Some(self.host.stream()?) } else { None };
        let ports = Stdio {
            stdin_port: stdin.as_ref().map_or(0, |s| s.port),
            stdout_port: stdout.port,
            stderr_port: stderr.as_ref().map_or(0, |s| s.port),
            ..Default::default()
        };
        Ok((ProcessIo { stdin, stdout, stderr }, ports))
    }

    /// Records process (`id`, `exec_id`)'s exit when it comes.
    pub(super) fn watch(&self, id: &str, exec_id: &str) {
        if !self.exits.watch(id, exec_id) {
            return;
        }
        let (agent, exits) = (self.agent.clone(), self.exits.clone());
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        std::thread::spawn(move || {
            let request =
                WaitProcessRequest { container_id: id.clone(), exec_id: exec_id.clone(), ..Default::default() };
            // No timeout: a process runs as long as it runs. An agent with
            // too many waits blocked already refuses (RESOURCE_EXHAUSTED):
            // ask again a little later rather than never learn the exit.
            let waited = loop {
                match agent.call_within("WaitProcess", Duration::ZERO, |c, ctx| c.wait_process(ctx, &request)) {
                    Err(AgentError::Rpc { message, .. }) if message.starts_with("RESOURCE_EXHAUSTED") => {
                        debug!(container = %id, exec = %exec_id, "the agent has too many waits; asking again");
                        std::thread::sleep(WAIT_RETRY);
                    }
                    other => break other,
                }
            };
            match waited {
                Ok(reply) => {
                    // An exec'd process is forgotten by the agent once its
                    // status is here, so the agent keeps nothing per exec.
                    if !exec_id.is_empty() {
                        let forget = RemoveProcessRequest {
                            container_id: id.clone(),
                            exec_id: exec_id.clone(),
                            ..Default::default()
                        };
                        if let Err(e) = agent.call("RemoveProcess", |c, ctx| c.remove_process(ctx, &forget)) {
                            debug!(container = %id, exec = %exec_id, error = %e, "the agent kept an exited process");
                        }
                    }
                    exits.done.lock().unwrap_or_else(|p| p.into_inner()).insert((id, exec_id), reply.status);
                    exits.changed.notify_all();
                }
                Err(e) => debug!(container = %id, exec = %exec_id, error = %e, "no exit status"),
            }
        });
    }

    /// Has the agent create container `config` on `root` (a disk already
    /// attached, or its directory already in the shared directory).
    pub(super) fn create_on(&mut self, config: &ContainerConfig, root_on: RootOn) -> Result<(), SandboxError> {
        let _span = info_span!("create_container", id = %config.id).entered();
        let began = Instant::now();
        let args: Vec<&str> = config.process.args.iter().map(String::as_str).collect();
        let mut options = spec_options(&config.process, config.hostname.as_deref(), &config.resources, &config.disks);
        options.shared = config
            .volumes
            .iter()
            .enumerate()
            .map(|(n, v)| agent_proto::spec::SharedMount {
                path: format!("{}/volumes/{n}", config.id),
                destination: v.destination.clone(),
                read_only: v.read_only,
            })
            .collect();
        let (io, stdio) = self.process_io(&config.process)?;
        let mut root = Rootfs::new();
        let serial = match root_on {
            RootOn::Disk(serial) => {
                root.set_disk_serial(serial.clone());
                serial
            }
            RootOn::Shared => {
                root.set_shared_path(format!("{}/rootfs", config.id));
                String::new()
            }
        };
        let request = CreateContainerRequest {
            container_id: config.id.clone(),
            oci_spec_json: spec_json(&args, &options),
            rootfs: Some(root).into(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.agent.call("CreateContainer", |c, ctx| c.create_container(ctx, &request))?;
        debug!(container = %config.id, ms = began.elapsed().as_secs_f64() * 1000.0, "container created");
        self.io.insert(config.id.clone(), io);
        self.state.containers.push(ContainerRecord {
            config: config.clone(),
            phase: ContainerPhase::Ready,
            started_unix_ms: None,
            exit_code: None,
            disk_serial: serial,
            // Asked of the agent when a status needs it, not on the way
            // to starting the container.
            pid: None,
        });
        Ok(())
    }

    /// Creates a container in a running sandbox; its root disk is
    /// hot-plugged (Kata's CreateContainer).
    pub fn create_container(&mut self, config: ContainerConfig) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("create a container")?;
        validate_id(&config.id)?;
        if self.state.container(&config.id).is_some() {
            return Err(SandboxError::ContainerExists { sandbox: self.id().into(), id: config.id });
        }
        for m in &config.disks {
            self.require_disk(&m.serial)?;
        }
        let dir_root = config.root_is_directory();
        if dir_root || !config.volumes.is_empty() {
            if !self.state.config.shared_fs {
                return Err(SandboxError::NoSharedFs { sandbox: self.id().into(), id: config.id });
            }
            let shared = SharedDir::of(&self.store.dir(self.id())?);
            share_container(&shared, &config, dir_root)?;
            let created = match dir_root {
                true => self.create_on(&config, RootOn::Shared),
                false => self.plug_root(&config),
            };
            if let Err(e) = created {
                let _ = shared.remove_container(&config.id);
                return Err(e);
            }
        } else {
            self.plug_root(&config)?;
        }
        self.save()
    }

    /// Hot-plugs container `config`'s root disk and creates it on it.
    pub(super) fn plug_root(&mut self, config: &ContainerConfig) -> Result<(), SandboxError> {
        let serial = self.fresh_root_serial();
        let disk = Disk { path: config.rootfs.clone(), read_only: false, serial: serial.clone() };
        self.plug(&disk)?;
        self.create_on(config, RootOn::Disk(serial))
    }

    /// Hot-plugs `disk` and has the guest probe it; records it.
    pub(super) fn plug(&mut self, disk: &Disk) -> Result<(), SandboxError> {
        let plugged = self.vm.add_disk(disk)?;
        if let Some(address) = plugged.bind_address {
            let bind = VirtioSlotRequest { address, bind: true, ..Default::default() };
            self.agent.call("UpdateVirtioSlot", |c, ctx| c.update_virtio_slot(ctx, &bind))?;
        }
        self.state.devices.push(DeviceRecord {
            path: disk.path.clone(),
            serial: disk.serial.clone(),
            read_only: disk.read_only,
            mmio_address: plugged.bind_address,
        });
        Ok(())
    }

    /// A serial for a container's root disk that no disk of this sandbox
    /// has had: `ctr-N`, one past the highest N in use (disks stay attached
    /// when their container goes, so a count would repeat one).
    fn fresh_root_serial(&self) -> String {
        let index = |serial: &str| serial.strip_prefix(ROOT_SERIAL_PREFIX).and_then(|n| n.parse::<usize>().ok());
        let used = self.state.devices.iter().map(|d| d.serial.as_str());
        let used = used.chain(self.state.containers.iter().map(|c| c.disk_serial.as_str()));
        disk_serial(used.filter_map(index).max().map_or(0, |n| n + 1))
    }

    /// Fails unless the sandbox has a disk with `serial`.
    fn require_disk(&self, serial: &str) -> Result<(), SandboxError> {
        if self.state.devices.iter().any(|d| d.serial == serial) {
            return Ok(());
        }
        Err(SandboxError::NoSuchDisk { sandbox: self.id().into(), serial: serial.into() })
    }

    /// Hot-plugs a block device file into the running sandbox (Kata's
    /// AddDevice); the guest sees it as a virtio disk with `disk.serial`,
    /// which no other disk of the sandbox may have.
    pub fn add_disk(&mut self, disk: &DiskConfig) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("add a device")?;
        validate_serial(&disk.serial)?;
        if self.state.devices.iter().any(|d| d.serial == disk.serial) {
            return Err(SandboxError::DiskExists { sandbox: self.id().into(), serial: disk.serial.clone() });
        }
        self.plug(&Disk { path: disk.path.clone(), read_only: disk.read_only, serial: disk.serial.clone() })?;
        self.save()
    }

    /// Mounts a disk of the sandbox into container `id`, which exists and
    /// has not stopped: its processes, and those entered later, see it at
    /// `mount.destination`. The mount is kept in the container's config.
    pub fn mount_disk(&mut self, id: &str, mount: &DiskMount) -> Result<(), SandboxError> {
        let _span = info_span!("mount_disk", id, serial = %mount.serial).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("mount a disk")?;
        self.require_phase(
            id,
            "mount a disk",
            &[ContainerPhase::Ready, ContainerPhase::Running],
            "created or running",
        )?;
        self.require_disk(&mount.serial)?;
        let request = MountDiskRequest {
            container_id: id.into(),
            serial: mount.serial.clone(),
            destination: mount.destination.clone(),
            fstype: mount.fstype.clone(),
            read_only: mount.read_only,
            ..Default::default()
        };
        self.agent.call("MountDisk", |c, ctx| c.mount_disk(ctx, &request))?;
        self.record_mut(id)?.config.disks.push(mount.clone());
        self.save()
    }

    /// The stdio streams of container `id`'s first process, once: accept
    /// them before or after starting it.
    pub fn take_io(&mut self, id: &str) -> Result<ProcessIo, SandboxError> {
        self.record(id)?;
        self.io.remove(id).ok_or_else(|| SandboxError::ContainerState {
            id: id.into(),
            phase: self.state.container(id).map_or(ContainerPhase::Stopped, |c| c.phase),
            op: "take its stdio",
            needs: "not to have given it out already",
        })
    }

    pub(super) fn start_locked(&mut self, id: &str) -> Result<(), SandboxError> {
        self.require_phase(id, "start", &[ContainerPhase::Ready], "ready (created, not started)")?;
        let began = Instant::now();
        self.agent.call("StartContainer", |c, ctx| c.start_container(ctx, &container_request(id)))?;
        debug!(container = %id, ms = began.elapsed().as_secs_f64() * 1000.0, "container started");
        self.watch(id, "");
        let record = self.record_mut(id)?;
        record.phase = ContainerPhase::Running;
        record.started_unix_ms = Some(now_unix_ms());
        Ok(())
    }

    /// Starts container `id`'s first process.
    pub fn start_container(&mut self, id: &str) -> Result<(), SandboxError> {
        let _span = info_span!("start_container", id).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_vm("start a container")?;
        self.start_locked(id)?;
        self.save()
    }

    pub(super) fn stop_locked(&mut self, id: &str) -> Result<(), SandboxError> {
        let phase = self.record(id)?.phase;
        if phase == ContainerPhase::Paused {
            self.agent.call("ResumeContainer", |c, ctx| c.resume_container(ctx, &container_request(id)))?;
        }
        if matches!(phase, ContainerPhase::Running | ContainerPhase::Paused) {
            // Started by another handle: wait for it here too.
            self.watch(id, "");
        }
        if matches!(phase, ContainerPhase::Running | ContainerPhase::Paused) && self.exits.get(id, "").is_none() {
            let kill = SignalProcessRequest {
                container_id: id.into(),
                signal: libc::SIGKILL as u32,
                all: true,
                ..Default::default()
            };
            self.agent.call("SignalProcess", |c, ctx| c.signal_process(ctx, &kill))?;
        }
        let exit_code = match phase {
            ContainerPhase::Ready | ContainerPhase::Stopped => self.record(id)?.exit_code,
            ContainerPhase::Running | ContainerPhase::Paused => {
                Some(self.exits.wait(id, "", Some(STOP_TIMEOUT)).ok_or_else(|| SandboxError::WaitTimeout {
                    id: id.into(),
                    exec_id: String::new(),
                    timeout: STOP_TIMEOUT,
                })?)
            }
        };
        let record = self.record_mut(id)?;
        record.phase = ContainerPhase::Stopped;
        record.exit_code = exit_code;
        Ok(())
    }

    /// Kills every process of container `id` and waits for its first
    /// process to end (Kata's StopContainer).
    pub fn stop_container(&mut self, id: &str) -> Result<(), SandboxError> {
        let _span = info_span!("stop_container", id).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.stop_locked(id)?;
        self.save()
    }

    /// Deletes a container that is not running (Kata's DeleteContainer).
    pub fn delete_container(&mut self, id: &str) -> Result<(), SandboxError> {
        let _span = info_span!("delete_container", id).entered();
        let _lock = self.lock(LockKind::Exclusive)?;
        self.refresh();
        self.require_phase(id, "delete", &[ContainerPhase::Ready, ContainerPhase::Stopped], "stopped")?;
        self.delete_locked(id)?;
        self.save()
    }

    pub(super) fn delete_locked(&mut self, id: &str) -> Result<(), SandboxError> {
        if self.state.phase != SandboxPhase::Stopped {
            self.agent.call("RemoveContainer", |c, ctx| c.remove_container(ctx, &container_request(id)))?;
        }
        let shared = self.state.container(id).is_some_and(ContainerRecord::uses_shared_fs);
        self.state.containers.retain(|c| c.config.id != id);
        self.io.remove(id);
        if shared {
            SharedDir::of(&self.store.dir(self.id())?).remove_container(id)?;
        }
        Ok(())
    }

    /// Stops and deletes container `id` (with `force`, errors in between
    /// are logged and passed over). Deleting the last container stops and
    /// deletes the sandbox too; returns whether it did.
    pub fn cleanup_container(&mut self, id: &str, force: bool) -> Result<bool, SandboxError> {
        let _span = info_span!("cleanup_container", id, force).entered();
        {
            let _lock = self.lock(LockKind::Exclusive)?;
            self.record(id)?;
            if let Err(e) = self.stop_locked(id) {
                if !force {
                    return Err(e);
                }
                warn!(container = %id, error = %e, "cleanup --force: stopping failed; going on");
                self.record_mut(id)?.phase = ContainerPhase::Stopped;
            }
            if let Err(e) = self.delete_locked(id) {
                if !force {
                    return Err(e);
                }
                warn!(container = %id, error = %e, "cleanup --force: removing failed; going on");
                self.state.containers.retain(|c| c.config.id != id);
            }
            self.save()?;
        }
        if !self.state.containers.is_empty() {
            return Ok(false);
        }
        self.stop(force)?;
        let lock = self.lock(LockKind::Exclusive)?;
        drop(lock);
        self.store.remove(self.id())?;
        Ok(true)
    }

    /// Container `id`'s status; an unknown ID is an error naming it.
    pub fn container_status(&mut self, id: &str) -> Result<ContainerStatus, SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        if self.refresh() {
            self.save()?;
        }
        Ok(container_status_of(self.record(id)?))
    }

    /// Waits for process `exec_id` ("" for the first) of container `id` to
    /// exit, for at most `timeout` (None: for ever); returns its status.
    pub fn wait_process(&mut self, id: &str, exec_id: &str, timeout: Option<Duration>) -> Result<i32, SandboxError> {
        {
            // Not held while waiting: the process may run for ever.
            let _lock = self.lock(LockKind::Shared)?;
            self.record(id)?;
        }
        // A process another handle started has no waiter here yet.
        self.watch(id, exec_id);
        let status = self.exits.wait(id, exec_id, timeout).ok_or_else(|| SandboxError::WaitTimeout {
            id: id.into(),
            exec_id: exec_id.into(),
            timeout: timeout.unwrap_or_default(),
        })?;
        if exec_id.is_empty() {
            let _lock = self.lock(LockKind::Exclusive)?;
            if self.refresh() {
                self.save()?;
            }
        }
        Ok(status)
    }

    /// Sends `signal` to container `id`'s first process, or with `all` to
    /// every process in it (Kata's KillContainer).
    pub fn kill_container(&mut self, id: &str, signal: u32, all: bool) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_phase(id, "kill", &[ContainerPhase::Running, ContainerPhase::Paused], "running")?;
        let request = SignalProcessRequest { container_id: id.into(), signal, all, ..Default::default() };
        self.agent.call("SignalProcess", |c, ctx| c.signal_process(ctx, &request))?;
        Ok(())
    }

    /// Sends `signal` to process `exec_id` ("" for the first) of
    /// container `id`.
    pub fn signal_process(&mut self, id: &str, exec_id: &str, signal: u32) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        self.require_phase(id, "signal", &[ContainerPhase::Running, ContainerPhase::Paused], "running")?;
        let request =
            SignalProcessRequest { container_id: id.into(), exec_id: exec_id.into(), signal, ..Default::default() };
        self.agent.call("SignalProcess", |c, ctx| c.signal_process(ctx, &request))?;
        Ok(())
    }

    /// Runs `process` in running container `id` (Kata's EnterContainer);
    /// returns its exec ID and its stdio.
    pub fn enter_container(&mut self, id: &str, process: &ProcessConfig) -> Result<(String, ProcessIo), SandboxError> {
        let _span = info_span!("enter_container", id).entered();
        let _lock = self.lock(LockKind::Shared)?;
        self.require_phase(id, "exec", &[ContainerPhase::Running], "running")?;
        // Unique across handles: this process's, and a counter they share.
        static NEXT_EXEC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT_EXEC.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let exec_id = format!("exec-{}-{n}", std::process::id());
        let args: Vec<&str> = process.args.iter().map(String::as_str).collect();
        let options = spec_options(process, None, &Resources::default(), &[]);
        let (io, stdio) = self.process_io(process)?;
        let request = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.clone(),
            oci_process_json: process_json(&args, &options).into_bytes(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.agent.call("ExecProcess", |c, ctx| c.exec_process(ctx, &request))?;
        self.watch(id, &exec_id);
        Ok((exec_id, io))
    }

    /// Sets the terminal size of process `exec_id` ("" for the first) of
    /// container `id`, which must have a terminal.
    pub fn resize_terminal(&mut self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        self.require_phase(id, "resize a terminal", &[ContainerPhase::Running, ContainerPhase::Paused], "running")?;
        let request = ResizeTerminalRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            columns,
            ..Default::default()
        };
        Ok(self.agent.call("ResizeTerminal", |c, ctx| c.resize_terminal(ctx, &request)).map(drop)?)
    }

    /// Waits up to `timeout` for a container to be OOM-killed (Kata's
    /// GetOOMEvent); returns its ID, or None when none was.
    pub fn oom_event(&self, timeout: Duration) -> Result<Option<String>, SandboxError> {
        match self.agent.call_within("GetOOMEvent", timeout, |c, ctx| c.get_oom_event(ctx, &Empty::new())) {
            Ok(event) => Ok(Some(event.container_id)),
            Err(AgentError::Rpc { message, .. }) if message.starts_with("DEADLINE_EXCEEDED") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The processes in container `id` (Kata's ProcessListContainer).
    pub fn process_list(&mut self, id: &str) -> Result<Vec<ProcessInfo>, SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        self.record(id)?;
        let reply = self.agent.call("ListProcesses", |c, ctx| c.list_processes(ctx, &container_request(id)))?;
        Ok(reply.processes)
    }

    /// Changes container `id`'s limits (Kata's UpdateContainer).
    pub fn update_container(&mut self, id: &str, resources: Resources) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_phase(
            id,
            "update",
            &[ContainerPhase::Ready, ContainerPhase::Running, ContainerPhase::Paused],
            "not stopped",
        )?;
        let value = |limit: Option<Limit<u64>>| match limit {
            Some(Limit::Value(v)) => v,
            _ => 0,
        };
        let (cpu_quota, cpu_period) = match resources.cpu_quota_us {
            Some(Limit::Value(pair)) => pair,
            _ => (0, 0),
        };
        let request = UpdateContainerRequest {
            container_id: id.into(),
            resources: Some(AgentResources {
                memory_limit: value(resources.memory_bytes),
                memory_unlimited: resources.memory_bytes == Some(Limit::Max),
                cpu_quota,
                cpu_period,
                cpu_unlimited: resources.cpu_quota_us == Some(Limit::Max),
                pids_limit: value(resources.pids),
                pids_unlimited: resources.pids == Some(Limit::Max),
                cpu_weight: resources.cpu_weight.unwrap_or(0),
                cpuset_cpus: resources.cpuset_cpus.clone().unwrap_or_default(),
                cpuset_mems: resources.cpuset_mems.clone().unwrap_or_default(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.agent.call("UpdateContainer", |c, ctx| c.update_container(ctx, &request))?;
        let record = self.record_mut(id)?;
        record.config.resources = resources.over(&record.config.resources);
        self.save()
    }

    /// Container `id`'s cgroup figures (Kata's StatsContainer).
    pub fn container_stats(&mut self, id: &str) -> Result<StatsContainerResponse, SandboxError> {
        let _lock = self.lock(LockKind::Shared)?;
        self.record(id)?;
        Ok(self.agent.call("StatsContainer", |c, ctx| c.stats_container(ctx, &container_request(id)))?)
    }

    /// Freezes container `id` (Kata's PauseContainer).
    pub fn pause_container(&mut self, id: &str) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_phase(id, "pause", &[ContainerPhase::Running], "running")?;
        self.agent.call("PauseContainer", |c, ctx| c.pause_container(ctx, &container_request(id)))?;
        self.record_mut(id)?.phase = ContainerPhase::Paused;
        self.save()
    }

    /// Thaws container `id` (Kata's ResumeContainer).
    pub fn resume_container(&mut self, id: &str) -> Result<(), SandboxError> {
        let _lock = self.lock(LockKind::Exclusive)?;
        self.require_phase(id, "resume", &[ContainerPhase::Paused], "paused")?;
        self.agent.call("ResumeContainer", |c, ctx| c.resume_container(ctx, &container_request(id)))?;
        self.record_mut(id)?.phase = ContainerPhase::Running;
        self.save()
    }
}
