//! The QEMU TCG fallback: QEMU microvm with the TCG accelerator, for hosts
//! without usable hardware virtualization. Our vsock (the agent's link)
//! and blk backends serve it over vhost-user from threads of this process;
//! pause and resume go through QMP (`stop`, `cont`).
//!
//! microvm cannot add devices after boot, so hotplug slots are placeholder
//! disks attached at boot with no medium (capacity 0); hot-plugging a disk
//! inserts its file into a free one and tells QEMU of the config change
//! through the vhost-user backend channel, which interrupts the guest's
//! driver to reread the capacity. The guest's kernel and agent need no
//! change: the disk grows from nothing to its size, with its serial.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::block::{Block, BlockConfig, BlockCounters, MediumSlot};
use devices::virtio::net::{Net, NetConfig, NetCounters, TapSlot};
use devices::virtio::vhost_user::{self, VhostUserError};
use devices::virtio::vsock::{Vsock, VsockConfig, VsockCounters};
use devices::virtio::CounterSet;

use super::{
    file_tail, Disk, Hypervisor, HypervisorError, HypervisorKind, Nic, Plugged, PluggedNic, VmFigures, VmSpec,
    GUEST_CID,
};
use crate::qemu::{vhost_user_device_args, vhost_user_net_args, Qemu, TcgMachine, QEMU};

const KIND: HypervisorKind = HypervisorKind::QemuTcg;
/// How long QEMU may take to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why QMP failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// QEMU answered with an error, or something that is not QMP.
    #[error("QMP {command}: {answer}")]
    Refused {
        /// The command sent.
        command: String,
        /// What came back.
        answer: String,
    },
}

/// A QMP connection: one JSON object per line each way.
pub(crate) struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until QEMU has made the socket) and leaves the
    /// capabilities negotiation done.
    pub(crate) fn connect(path: &Path, mut exited: impl FnMut() -> Option<String>) -> Result<Self, QmpError> {
        let io = |e| QmpError::Io(path.to_path_buf(), e);
        let deadline = Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(io(e)),
                Err(e) => {
                    if let Some(why) = exited() {
                        return Err(io(std::io::Error::other(format!("{e}; {why}"))));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp { path: path.to_path_buf(), reader: BufReader::new(stream), writer };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Refused { command: "(greeting)".into(), answer: greeting.to_string() });
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, QmpError> {
        let mut line = String::new();
        // A line is one answer or event; QEMU's are short, but bound it.
        let n =
            (&mut self.reader).take(1 << 20).read_line(&mut line).map_err(|e| QmpError::Io(self.path.clone(), e))?;
        if n == 0 {
            return Err(QmpError::Io(self.path.clone(), std::io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Refused { command: "(read)".into(), answer: format!("{e}: {line}") })
    }

    /// Runs `command` and waits for its answer (events in between are
    /// skipped).
    pub(crate) fn execute(&mut self, command: &str) -> Result<(), QmpError> {
        let request = serde_json::json!({ "execute": command });
        writeln!(self.writer, "{request}").map_err(|e| QmpError::Io(self.path.clone(), e))?;
        loop {
            let answer = self.read()?;
            if answer.get("return").is_some() {
                return Ok(());
            }
            if answer.get("event").is_none() {
                return Err(QmpError::Refused { command: command.into(), answer: answer.to_string() });
            }
        }
    }
}

/// A device backend served to QEMU, with what stats read.
struct Served {
    socket: PathBuf,
    thread: JoinHandle<Result<(), VhostUserError>>,
    name: String,
    counters: Arc<dyn CounterSet + Send + Sync>,
}

/// A placeholder disk: where its medium goes, and how QEMU is told.
struct Placeholder {
    slot: MediumSlot,
    channel: vhost_user::BackendChannel,
}

/// A placeholder NIC: where its TAP goes, how QEMU is told, its MAC.
struct NicPlaceholder {
    slot: TapSlot,
    channel: vhost_user::BackendChannel,
    mac: [u8; 6],
}

/// QEMU microvm with TCG; see the module docs.
#[derive(Default)]
pub struct QemuTcg {
    placeholders: Vec<Placeholder>,
    nic_placeholders: Vec<NicPlaceholder>,
    qemu: Option<Qemu>,
    qmp: Option<Qmp>,
    qmp_path: PathBuf,
    served: Vec<Served>,
    console: PathBuf,
    started: Option<Instant>,
    memory_bytes: u64,
    backend_errors: Vec<String>,
}

impl QemuTcg {
    fn op_error(op: &'static str) -> impl FnOnce(QmpError) -> HypervisorError {
        move |e| HypervisorError::Op { kind: KIND, op, source: Box::new(e) }
    }

    fn qmp(&mut self, command: &'static str) -> Result<(), HypervisorError> {
        if self.qemu.is_none() {
            return Err(HypervisorError::NotRunning("QEMU was never started".into()));
        }
        if let Some(why) = self.exited() {
            return Err(HypervisorError::NotRunning(why));
        }
        if self.qmp.is_none() {
            let qemu = &mut self.qemu;
            let exited = || exit_reason(qemu);
            self.qmp = Some(Qmp::connect(&self.qmp_path, exited).map_err(Self::op_error(command))?);
        }
        let qmp = self.qmp.as_mut().ok_or_else(|| HypervisorError::NotRunning("no QMP connection".into()))?;
        qmp.execute(command).map_err(Self::op_error(command))
    }

    /// Serves `backend` over vhost-user on a fresh socket in the sandbox's
    /// directory; returns the socket and the channel that tells QEMU of a
    /// config change.
    fn serve(
        &mut self,
        spec: &VmSpec,
        name: String,
        backend: Box<dyn devices::virtio::VirtioBackend>,
        counters: Arc<dyn CounterSet + Send + Sync>,
    ) -> Result<(PathBuf, vhost_user::BackendChannel), HypervisorError> {
        let socket = spec.dir.join(format!("vhost-{}.sock", self.served.len()));
        // The serving thread parses the guest's queues: it runs under the
        // vhost-user seccomp filter, as do the threads it starts.
        let (thread, channel) =
            vhost_user::spawn_with_channel("sandbox", backend, &socket, vmm::seccomp::confine_vhost_user)
                .map_err(|e| HypervisorError::Start(KIND, Box::new(e)))?;
        self.served.push(Served { socket: socket.clone(), thread, name, counters });
        Ok((socket, channel))
    }

    /// Ends every backend thread: QEMU's going ends the ones it connected
    /// to; one still waiting for a frontend is woken by a connection that
    /// closes at once.
    fn end_backends(&mut self) {
        for served in self.served.drain(..) {
            if !served.thread.is_finished() {
                let _ = UnixStream::connect(&served.socket);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while !served.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if served.thread.is_finished() {
                match served.thread.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(device = %served.name, error = %e, "a device backend ended with an error");
                        self.backend_errors.push(format!("{}: {e}", served.name));
                    }
                    Err(_) => self.backend_errors.push(format!("{}: its thread panicked", served.name)),
                }
            } else {
                tracing::warn!(device = %served.name, "a device backend did not end; leaving its thread");
                self.backend_errors.push(format!("{}: did not end", served.name));
            }
            let _ = devices::host_socket::remove_socket(&served.socket);
        }
    }
}

/// A placeholder NIC's MAC: locally administered, unicast, different per
/// sandbox (from its directory) and per slot.
fn placeholder_mac(dir: &Path, index: u8) -> [u8; 6] {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    let h = hasher.finish().to_le_bytes();
    [0x02, h[0], h[1], h[2], h[3], index]
}

impl QemuTcg {
    /// How the device backends that have ended did, when they did not end
    /// cleanly (a frontend that went away is clean).
    pub fn backend_errors(&self) -> &[String] {
        &self.backend_errors
    }
}

fn exit_reason(qemu: &mut Option<Qemu>) -> Option<String> {
    match qemu.as_mut().map(|q| q.0.try_wait()) {
        Some(Ok(Some(status))) => Some(format!("QEMU exited ({status})")),
        Some(Err(e)) => Some(format!("QEMU cannot be waited for ({e})")),
        Some(Ok(None)) | None => None,
    }
}

impl Hypervisor for QemuTcg {
    fn kind(&self) -> HypervisorKind {
        KIND
    }

    fn start(&mut self, spec: &VmSpec) -> Result<(), HypervisorError> {
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| HypervisorError::Start(KIND, e);
        let (vsock, counters) = Vsock::new(&VsockConfig { guest_cid: GUEST_CID, uds_path: spec.vsock_socket() })
            .map_err(|e| fail(e.into()))?;
        let counters: Arc<VsockCounters> = counters;
        let (vsock_socket, _) = self.serve(spec, format!("vsock cid {GUEST_CID}"), Box::new(vsock), counters)?;
        let mut extra_args = vhost_user_device_args(&vsock_socket, "vhost-user-vsock-device");
        for disk in &spec.disks {
            let config = BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
                id: Some(disk.serial.clone()),
                direct: false,
            };
            let (blk, counters) = Block::open(&config).map_err(|e| fail(e.into()))?;
            let counters: Arc<BlockCounters> = counters;
            let (socket, _) = self.serve(spec, format!("blk {}", disk.path.display()), Box::new(blk), counters)?;
            extra_args.extend(vhost_user_device_args(&socket, "vhost-user-blk"));
        }
        for nic in &spec.nics {
            let config = NetConfig { tap: nic.tap.clone(), mac: nic.mac };
            // The TAP is opened in its namespace; the backend then serves
            // it from any thread.
            let opened = match &nic.netns {
                Some(netns) => crate::network::within(netns, move || Net::new(&config)).map_err(|e| fail(e.into()))?,
                None => Net::new(&config),
            };
            let (net, counters) = opened.map_err(|e| fail(e.into()))?;
            let counters: Arc<NetCounters> = counters;
            let (socket, _) = self.serve(spec, format!("net {}", nic.tap), Box::new(net), counters)?;
            extra_args.extend(vhost_user_net_args(&socket, &crate::network::format_mac(&nic.mac)));
        }
        for index in 0..spec.hotplug_slots {
            let (blk, counters, slot) = Block::placeholder().map_err(|e| fail(e.into()))?;
            let counters: Arc<BlockCounters> = counters;
            let (socket, channel) = self.serve(spec, format!("blk hotplug slot {index}"), Box::new(blk), counters)?;
            self.placeholders.push(Placeholder { slot, channel });
            extra_args.extend(vhost_user_device_args(&socket, "vhost-user-blk"));
        }
        for index in 0..spec.hotplug_slots {
            let mac = placeholder_mac(&spec.dir, index);
            let (net, counters, slot) = Net::placeholder(mac).map_err(|e| fail(e.into()))?;
            let counters: Arc<NetCounters> = counters;
            let (socket, channel) = self.serve(spec, format!("net hotplug slot {index}"), Box::new(net), counters)?;
            self.nic_placeholders.push(NicPlaceholder { slot, channel, mac });
            extra_args.extend(vhost_user_net_args(&socket, &crate::network::format_mac(&mac)));
        }
        if let Some(socket) = &spec.shared_fs {
            extra_args.extend(crate::qemu::vhost_user_fs_args(socket, crate::shared_fs::SHARED_TAG));
        }
        // Entropy from the first boot: QEMU's own virtio-rng.
        extra_args.extend(["-device".into(), "virtio-rng-device".into()]);
        self.qmp_path = spec.dir.join("qmp.sock");
        extra_args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", crate::qemu::opt_value(&self.qmp_path.display().to_string())),
        ]);
        let machine = TcgMachine {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            vcpus: spec.vcpus,
            mem_mib: spec.memory_mib,
            cmdline: "quiet".into(),
            vhost_user: true,
            extra_args,
        };
        self.console = spec.console_log();
        // QEMU's output (the guest's serial console, and its own errors)
        // goes through a pipe into a capped log.
        let mut command = Command::new(QEMU);
        command.args(machine.args()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // QEMU dies with this process, however it ends.
        // TCG needs no privilege: QEMU gets no capability, root or not.
        crate::children::without_privileges(&mut command);
        let mut child = crate::children::spawn_tied(command)
            .map_err(|e| fail(format!("cannot run {QEMU} (install qemu-system-x86): {e}").into()))?;
        let mut outputs: Vec<Box<dyn std::io::Read + Send>> = Vec::new();
        outputs.extend(child.stdout.take().map(|o| Box::new(o) as Box<dyn std::io::Read + Send>));
        outputs.extend(child.stderr.take().map(|e| Box::new(e) as Box<dyn std::io::Read + Send>));
        // Held before the log can fail, so that a failure kills QEMU.
        self.qemu = Some(Qemu(child));
        crate::console::copy_capped(outputs, &self.console).map_err(|e| fail(e.into()))?;
        self.started = Some(Instant::now());
        self.memory_bytes = spec.memory_mib << 20;
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        exit_reason(&mut self.qemu)
    }

    fn pause(&mut self) -> Result<(), HypervisorError> {
        self.qmp("stop")
    }

    fn resume(&mut self) -> Result<(), HypervisorError> {
        self.qmp("cont")
    }

    fn stop(&mut self) -> Result<(), HypervisorError> {
        self.qmp = None;
        // Dropping kills and reaps QEMU.
        self.qemu = None;
        self.end_backends();
        let _ = devices::host_socket::remove_socket(&self.qmp_path);
        Ok(())
    }

    fn figures(&mut self) -> Result<VmFigures, HypervisorError> {
        let Some(started) = self.started else {
            return Err(HypervisorError::NotRunning("QEMU was never started".into()));
        };
        if let Some(why) = self.exited() {
            return Err(HypervisorError::NotRunning(why));
        }
        // QEMU's whole resident set: guest RAM the guest touched, plus
        // QEMU itself.
        let resident = self.qemu.as_ref().and_then(|q| {
            let statm = std::fs::read_to_string(format!("/proc/{}/statm", q.0.id())).ok()?;
            let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * 4096)
        });
        let devices = self
            .served
            .iter()
            .map(|s| (s.name.clone(), s.counters.snapshot().into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
            .collect();
        Ok(VmFigures {
            uptime: started.elapsed(),
            memory_bytes: self.memory_bytes,
            memory_resident_bytes: resident,
            vcpu_exits: None,
            devices,
        })
    }

    fn add_disk(&mut self, disk: &Disk) -> Result<Plugged, HypervisorError> {
        const OP: &str = "hot-plug a disk";
        if let Some(why) = self.exited() {
            return Err(HypervisorError::NotRunning(why));
        }
        let placeholder = self.placeholders.iter().find(|p| !p.slot.is_used()).ok_or(HypervisorError::Unsupported {
            kind: KIND,
            op: OP,
            why: "every placeholder disk holds a medium; reserve more hotplug slots at create",
        })?;
        let config = BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            id: Some(disk.serial.clone()),
            direct: false,
        };
        placeholder.slot.insert(&config).map_err(|e| HypervisorError::Op {
            kind: KIND,
            op: OP,
            source: Box::new(e),
        })?;
        placeholder.channel.config_changed().map_err(|e| HypervisorError::Op {
            kind: KIND,
            op: OP,
            source: Box::new(e),
        })?;
        Ok(Plugged { bind_address: None })
    }

    fn add_nic(&mut self, nic: &Nic) -> Result<PluggedNic, HypervisorError> {
        const OP: &str = "hot-plug a NIC";
        if let Some(why) = self.exited() {
            return Err(HypervisorError::NotRunning(why));
        }
        let op = |e: Box<dyn std::error::Error + Send + Sync>| HypervisorError::Op { kind: KIND, op: OP, source: e };
        let (handle, placeholder) = self.nic_placeholders.iter().enumerate().find(|(_, p)| !p.slot.is_used()).ok_or(
            HypervisorError::Unsupported {
                kind: KIND,
                op: OP,
                why: "every placeholder NIC holds a TAP; reserve more hotplug slots at create",
            },
        )?;
        // The TAP is opened in its namespace; the backend serves it from
        // its own thread.
        let (slot, tap) = (placeholder.slot.clone(), nic.tap.clone());
        match &nic.netns {
            Some(netns) => crate::network::within(netns, move || slot.insert(&tap)).map_err(|e| op(e.into()))?,
            None => slot.insert(&tap),
        }
        .map_err(|e| op(e.into()))?;
        if let Err(e) = placeholder.channel.config_changed() {
            placeholder.slot.remove();
            return Err(op(e.into()));
        }
        Ok(PluggedNic { bind_address: None, handle, mac: placeholder.mac })
    }

    fn remove_nic(&mut self, handle: usize) -> Result<(), HypervisorError> {
        let placeholder =
            self.nic_placeholders.get(handle).filter(|p| p.slot.is_used()).ok_or(HypervisorError::Unsupported {
                kind: KIND,
                op: "remove a NIC",
                why: "no hot-plugged NIC has that handle",
            })?;
        placeholder.slot.remove();
        placeholder.channel.config_changed().map_err(|e| HypervisorError::Op {
            kind: KIND,
            op: "remove a NIC",
            source: Box::new(e),
        })
    }

    fn console_tail(&self, lines: usize) -> String {
        file_tail(&self.console, lines)
    }

    fn process_id(&self) -> Option<u32> {
        self.qemu.as_ref().map(|q| q.0.id())
    }
}

impl Drop for QemuTcg {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
