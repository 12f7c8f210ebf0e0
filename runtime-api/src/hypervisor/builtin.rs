//! vessel's own VMM, in this process: start, pause, resume, stop, stats
//! and hotplug are direct calls on its `VmmHandle`. The agent's link is the
//! in-process vsock device's hybrid Unix socket; disks are in-process
//! virtio-blk devices, and hot-plugged ones go to the empty virtio-mmio
//! slots reserved at boot.

use std::time::Instant;

use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vhost_user_frontend::{VhostUserConfig, VhostUserDevice};
use devices::virtio::vsock::VsockConfig;
use vmm::{
    BootSourceConfig, ConsoleOutput, DeviceConfig, ExitReason, MachineConfig, PrebootAction, Vmm, VmmAction, VmmData,
    VmmHandle,
};

use super::{
    file_tail, Disk, Hypervisor, HypervisorError, HypervisorKind, Nic, Plugged, PluggedNic, Template, VmFigures,
    VmSpec, GUEST_CID,
};

const KIND: HypervisorKind = HypervisorKind::Builtin;

/// The kernel command line a sandbox guest gets (the virtio-mmio windows
/// are added by the VMM, from its device manager).
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";

/// The in-process VMM; see the module docs.
#[derive(Default)]
pub struct Builtin {
    vm: Option<VmmHandle>,
    ended: Option<String>,
    console: std::path::PathBuf,
    started: Option<Instant>,
    /// The network namespace the VMM's threads live in (None: ours).
    netns: Option<std::path::PathBuf>,
    /// The kernel command line; [`CMDLINE`] unless a caller set another.
    pub cmdline: Option<String>,
}

impl Builtin {
    fn op<T>(op: &'static str, result: Result<T, vmm::VmmActionError>) -> Result<T, HypervisorError> {
        result.map_err(|e| match e {
            vmm::VmmActionError::NotRunning => HypervisorError::NotRunning("the VM has exited".into()),
            other => HypervisorError::Op { kind: KIND, op, source: Box::new(other) },
        })
    }

    fn handle(&self) -> Result<&VmmHandle, HypervisorError> {
        self.vm.as_ref().ok_or_else(|| HypervisorError::NotRunning(self.ended.clone().unwrap_or("not started".into())))
    }
}

impl Hypervisor for Builtin {
    fn kind(&self) -> HypervisorKind {
        KIND
    }

    fn start(&mut self, spec: &VmSpec) -> Result<(), HypervisorError> {
        let fail = |e: vmm::VmmActionError| HypervisorError::Start(KIND, Box::new(e));
        let mut vm = Vmm::new();
        let cmdline = self.cmdline.clone().unwrap_or_else(|| CMDLINE.to_string());
        vm.handle(PrebootAction::ConfigureBootSource(BootSourceConfig {
            kernel: spec.kernel.clone(),
            initrd: Some(spec.initrd.clone()),
            cmdline,
        }))
        .map_err(fail)?;
        vm.handle(PrebootAction::ConfigureMachine(MachineConfig {
            vcpus: spec.vcpus,
            mem_mib: spec.memory_mib,
            seccomp: true,
            hotplug_slots: spec.hotplug_slots,
        }))
        .map_err(fail)?;
        self.console = spec.console_log();
        // The serial port writes into a pipe; a copier thread writes the
        // capped log. Rotating the log takes a rename and a create, which
        // the vCPU thread that emulates the serial port may not make.
        let to_log =
            crate::console::guest_console(&self.console).map_err(|e| HypervisorError::Start(KIND, Box::new(e)))?;
        vm.handle(PrebootAction::ConfigureConsole(ConsoleOutput::Writer(Box::new(to_log)))).map_err(fail)?;
        let vsock = VsockConfig { guest_cid: GUEST_CID, uds_path: spec.vsock_socket() };
        vm.handle(PrebootAction::AddDevice(DeviceConfig::Vsock(vsock))).map_err(fail)?;
        vm.handle(PrebootAction::AddDevice(DeviceConfig::Rng)).map_err(fail)?;
        for disk in &spec.disks {
            let config = BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
                id: Some(disk.serial.clone()),
                direct: false,
            };
            vm.handle(PrebootAction::AddDevice(DeviceConfig::Block(config))).map_err(fail)?;
        }
        for nic in &spec.nics {
            let config = NetConfig { tap: nic.tap.clone(), mac: nic.mac };
            vm.handle(PrebootAction::AddDevice(DeviceConfig::Net(config))).map_err(fail)?;
        }
        // The shared directory: virtiofsd's queues, our vhost-user frontend.
        if let Some(socket) = &spec.shared_fs {
            let device =
                VhostUserDevice::Fs { tag: crate::shared_fs::SHARED_TAG.into(), request_queues: 1, queue_size: 1024 };
            let fs = VhostUserConfig { socket: socket.clone(), device };
            vm.handle(PrebootAction::AddDevice(DeviceConfig::VhostUser(fs))).map_err(fail)?;
        }
        // A sandbox in a network namespace runs its VMM there, as Kata
        // runs QEMU there: the TAPs open in it, and every VMM thread is
        // started from a thread that entered it.
        let netns = spec.nics.iter().find_map(|n| n.netns.clone());
        self.netns = netns.clone();
        let started = match netns {
            Some(netns) => crate::network::within(&netns, move || vm.start())
                .map_err(|e| HypervisorError::Start(KIND, Box::new(e)))?,
            None => vm.start(),
        };
        self.vm = Some(started.map_err(|e| HypervisorError::Start(KIND, Box::new(e)))?);
        self.started = Some(Instant::now());
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        if self.ended.is_none() {
            if let Some(reason) = self.vm.as_mut().and_then(VmmHandle::try_wait) {
                self.ended = Some(match reason {
                    ExitReason::Reset => "the guest reset the machine".into(),
                    ExitReason::Shutdown => "the guest shut down".into(),
                    ExitReason::Stopped => "the VM was stopped".into(),
                    ExitReason::Error(e) => format!("the VM failed: {}", crate::error_chain(&e)),
                });
                self.vm = None;
            }
        }
        self.ended.clone()
    }

    fn pause(&mut self) -> Result<(), HypervisorError> {
        Self::op("pause", self.handle()?.request(VmmAction::Pause)).map(drop)
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
        Self::op("resume", self.handle()?.request(VmmAction::Resume)).map(drop)
    }

    fn stop(&mut self) -> Result<(), HypervisorError> {
        if let Some(vm) = self.vm.take() {
            // Dropping the handle stops the VM and joins its threads.
            drop(vm);
            self.ended = Some("stopped".into());
        }
        Ok(())
    }

    fn figures(&mut self) -> Result<VmFigures, HypervisorError> {
        let stats = self.handle()?.stats();
        let exits = stats
            .vcpus
            .iter()
            .map(|v| v.io_in + v.io_out + v.mmio_read + v.mmio_write + v.hlt + v.shutdown + v.interrupted + v.other)
            .sum();
        Ok(VmFigures {
            uptime: stats.uptime,
            memory_bytes: stats.mem_size,
            memory_resident_bytes: Some(stats.mem_resident),
            vcpu_exits: Some(exits),
            devices: stats
                .devices
                .into_iter()
                .map(|d| (d.name, d.counters.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
                .collect(),
        })
    }

    fn add_disk(&mut self, disk: &Disk) -> Result<Plugged, HypervisorError> {
        let config = BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            id: Some(disk.serial.clone()),
            direct: false,
        };
        match Self::op("hot-plug a disk", self.handle()?.request(VmmAction::AttachDevice(DeviceConfig::Block(config))))?
        {
            VmmData::Attached { addr, .. } => Ok(Plugged { bind_address: Some(addr) }),
            other => Err(HypervisorError::Op {
                kind: KIND,
                op: "hot-plug a disk",
                source: format!("the VMM answered {other:?}, not where the device went").into(),
            }),
        }
    }

    fn add_nic(&mut self, nic: &Nic) -> Result<PluggedNic, HypervisorError> {
        const OP: &str = "hot-plug a NIC";
        // The VMM opens the TAP on its event-loop thread, in the namespace
        // its threads were started in.
        if nic.netns != self.netns {
            return Err(HypervisorError::Unsupported {
                kind: KIND,
                op: OP,
                why: "the VMM's threads live in the network namespace the sandbox was created in; \
                      a NIC can only come from that one",
            });
        }
        let config = NetConfig { tap: nic.tap.clone(), mac: nic.mac };
        match Self::op(OP, self.handle()?.request(VmmAction::AttachDevice(DeviceConfig::Net(config))))? {
            VmmData::Attached { slot, addr, .. } => {
                Ok(PluggedNic { bind_address: Some(addr), handle: slot, mac: nic.mac })
            }
            other => Err(HypervisorError::Op {
                kind: KIND,
                op: OP,
                source: format!("the VMM answered {other:?}, not where the device went").into(),
            }),
        }
    }

    fn remove_nic(&mut self, handle: usize) -> Result<(), HypervisorError> {
        Self::op("remove a NIC", self.handle()?.request(VmmAction::DetachDevice(handle))).map(drop)
    }

    fn console_tail(&self, lines: usize) -> String {
        file_tail(&self.console, lines)
    }

    fn snapshot(&mut self, dir: &std::path::Path) -> Result<(), HypervisorError> {
        Self::op("snapshot the VM", self.handle()?.request(VmmAction::Snapshot(dir.to_path_buf()))).map(drop)
    }

    fn restore_from(&mut self, template: &Template, spec: &VmSpec) -> Result<(), HypervisorError> {
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| HypervisorError::Start(KIND, e);
        let snapshot = template.snapshot().ok_or_else(|| {
            fail(format!("the template in {} was not loaded (Template::load)", template.dir().display()).into())
        })?;
        self.console = spec.console_log();
        let to_log = crate::console::guest_console(&self.console).map_err(|e| fail(Box::new(e)))?;
        let config = vmm::snapshot::RestoreConfig {
            console: ConsoleOutput::Writer(Box::new(to_log)),
            vsock_uds: Some(spec.vsock_socket()),
            seccomp: true,
            paused: false,
        };
        self.vm = Some(snapshot.restore(config).map_err(|e| fail(Box::new(e)))?);
        self.started = Some(Instant::now());
        Ok(())
    }
}
