//! A virtio device whose queues another process serves: the VMM is a
//! vhost-user *frontend*. The guest sees an ordinary virtio-mmio device;
//! the transport keeps its registers, and this backend hands the driver's
//! rings, the guest's memory (the memfd regions) and the queue eventfds
//! to the daemon behind a vhost-user socket. virtio-fs served by
//! `virtiofsd` is the case we ship; any vhost-user device (vessel's own
//! `device serve` backends included) attaches the same way.
//!
//! Threads. The transport calls `set_acked_features`, `read_config`,
//! `activate` and `reset` on a vCPU thread, whose seccomp filter allows no
//! socket I/O: they only record what the driver did and write the wake
//! eventfd. The event loop, which watches that eventfd as the backend's
//! fd, then talks to the daemon in `process`. The same eventfd is every
//! ring's call fd: the daemon writes it when it used buffers, and a wakeup
//! that finds no setup or teardown waiting is such a call, which the
//! transport turns into the used-buffer interrupt.
//!
//! Connecting (socket, features, protocol features, queue count, config
//! space) happens when the device is made, on the thread that makes it
//! (the boot path, or the event loop for a hot-plugged device). A daemon
//! that errs or stalls (every reply waits at most [`DAEMON_TIMEOUT`]) fails
//! that step with an error, never a panic: while connecting, the boot or
//! the attach fails; after DRIVER_OK, the device asks the driver for a
//! reset (DEVICE_NEEDS_RESET). The VMM runs on either way.
//!
//! Dropping the device (hot-unplug, the VM's end) closes the connection,
//! which is how vhost-user tells a daemon to let go: no message is sent
//! then, because the last owner may be a vCPU thread.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend as _, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{counter_set, device_type, read_config_bytes, VirtioBackend, Wakeup, VIRTIO_F_VERSION_1};

/// The longest a daemon may take to answer one message.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);

/// virtio-fs's tag field: at most 36 bytes of UTF-8 (virtio spec 5.11.4).
pub const FS_TAG_LEN: usize = 36;

/// Transport-independent features passed from the daemon to the driver:
/// the device-specific bits (0-23), indirect descriptors, event indexes
/// and VERSION_1. Anything else (packed rings, platform access, the
/// vhost-user bits 26 and 30) the driver never sees.
const PASSED_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | VIRTIO_F_VERSION_1;

/// The protocol features we use when the daemon offers them: the queue
/// count, an acknowledgement for every message, the config space.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG
}

/// A device served by a vhost-user daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserConfig {
    /// The daemon's socket (it listens; we connect).
    pub socket: PathBuf,
    /// What the daemon serves.
    pub device: VhostUserDevice,
}

/// The device a daemon serves: what the transport shows the driver, and
/// the config space when the daemon does not give one
/// (VHOST_USER_PROTOCOL_F_CONFIG).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VhostUserDevice {
    /// virtio-fs (device ID 26): a shared directory the guest mounts by
    /// its tag. Queue 0 is the high-priority queue, then `request_queues`
    /// request queues, each of `queue_size` entries. No DAX window.
    Fs {
        /// The mount tag, 1 to 36 bytes.
        tag: String,
        /// Request queues (the daemon must serve as many).
        #[serde(default = "default_request_queues")]
        request_queues: u16,
        /// Entries per queue, a power of two.
        #[serde(default = "default_queue_size")]
        queue_size: u16,
    },
    /// Any other device: its ID, its queues' sizes, its config space.
    Generic {
        /// virtio device ID.
        device_type: u32,
        /// The maximum size of each queue; the length is the queue count.
        queue_sizes: Vec<u16>,
        /// The config space (may be empty).
        #[serde(default)]
        config: Vec<u8>,
    },
}

fn default_request_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    1024
}

impl VhostUserDevice {
    /// Checks what can be checked without the daemon.
    pub fn validate(&self) -> Result<(), FrontendError> {
        let bad = |why: String| Err(FrontendError::Config(why));
        match self {
            VhostUserDevice::Fs { tag, request_queues, queue_size } => {
                if tag.is_empty() || tag.len() > FS_TAG_LEN {
                    return bad(format!("the virtio-fs tag must be 1 to {FS_TAG_LEN} bytes, got {}", tag.len()));
                }
                if *request_queues == 0 || *request_queues > 63 {
                    return bad(format!("virtio-fs needs 1 to 63 request queues, got {request_queues}"));
                }
                if !queue_size.is_power_of_two() {
                    return bad(format!("the queue size must be a power of two, got {queue_size}"));
                }
            }
            VhostUserDevice::Generic { device_type, queue_sizes, .. } => {
                if *device_type == 0 {
                    return bad("device ID 0 is an empty slot, not a device".into());
                }
                if queue_sizes.is_empty() || queue_sizes.len() > 63 {
                    return bad(format!("a device needs 1 to 63 queues, got {}", queue_sizes.len()));
                }
                if let Some(size) = queue_sizes.iter().find(|s| !s.is_power_of_two()) {
                    return bad(format!("the queue size must be a power of two, got {size}"));
                }
            }
        }
        Ok(())
    }

    fn device_type(&self) -> u32 {
        match self {
            VhostUserDevice::Fs { .. } => device_type::FS,
            VhostUserDevice::Generic { device_type, .. } => *device_type,
        }
    }

    fn queue_sizes(&self) -> Vec<u16> {
        match self {
            VhostUserDevice::Fs { request_queues, queue_size, .. } => {
                vec![*queue_size; usize::from(*request_queues) + 1]
            }
            VhostUserDevice::Generic { queue_sizes, .. } => queue_sizes.clone(),
        }
    }

    /// The config space we show when the daemon does not give one.
    fn config_space(&self) -> Vec<u8> {
        match self {
            VhostUserDevice::Fs { tag, request_queues, .. } => {
                // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
                let mut config = vec![0u8; FS_TAG_LEN + 4];
                config[..tag.len()].copy_from_slice(tag.as_bytes());
                config[FS_TAG_LEN..].copy_from_slice(&u32::from(*request_queues).to_le_bytes());
                config
            }
            VhostUserDevice::Generic { config, .. } => config.clone(),
        }
    }
}

/// Why a vhost-user device could not be made or run.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The configuration is unusable.
    #[error("invalid vhost-user device: {0}")]
    Config(String),
    /// Nothing answers on the socket.
    #[error("cannot connect to the vhost-user daemon at {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// The socket's timeouts could not be set.
    #[error("cannot set the timeouts of the vhost-user socket")]
    Timeout(#[source] std::io::Error),
    /// The daemon refused a message, answered wrongly, or went away.
    #[error("the vhost-user daemon failed {0}")]
    Daemon(&'static str, #[source] vhost::Error),
    /// The daemon's connection failed before: it is not asked again.
    #[error("the connection to the vhost-user daemon failed earlier; it is not asked again")]
    Dead,
    /// The daemon is no virtio 1 device.
    #[error("the vhost-user daemon does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    /// The daemon serves fewer queues than the device has.
    #[error("the vhost-user daemon serves {daemon} queues, the device needs {wanted}")]
    TooFewQueues {
        /// The daemon's GET_QUEUE_NUM.
        daemon: u64,
        /// The device's queue count.
        wanted: usize,
    },
    /// The daemon's config space is not the size we asked for.
    #[error("the vhost-user daemon's config space is {got} bytes, expected {wanted}")]
    ConfigSize {
        /// What came back.
        got: usize,
        /// What we asked for.
        wanted: usize,
    },
    /// Guest memory cannot be shared.
    #[error("guest memory at {0:#x} is not file-backed, so it cannot be shared with the daemon")]
    MemoryNotShared(u64),
    /// A ring the driver set up lies outside guest memory.
    #[error("queue {0}'s rings lie outside guest memory")]
    RingOutsideMemory(u16),
    /// The wake eventfd could not be made or cloned.
    #[error("cannot create the eventfds of the vhost-user device")]
    EventFd(#[source] std::io::Error),
}

/// What the frontend did, for stats and tests: the outcome of each
/// negotiation step with the daemon, and the traffic since.
#[derive(Debug, Default)]
pub struct FrontendCounters {
    /// The daemon's virtio features (GET_FEATURES).
    pub daemon_features: AtomicU64,
    /// The protocol features both sides use (SET_PROTOCOL_FEATURES).
    pub protocol_features: AtomicU64,
    /// The features last sent with SET_FEATURES.
    pub acked_features: AtomicU64,
    /// Guest memory regions in the last SET_MEM_TABLE.
    pub mem_regions: AtomicU64,
    /// Rings handed to the daemon and enabled, over all activations.
    pub rings_started: AtomicU64,
    /// Rings taken back (GET_VRING_BASE).
    pub rings_stopped: AtomicU64,
    /// Times the driver's setup reached the daemon in full.
    pub activations: AtomicU64,
    /// The daemon's used-buffer notifications that became interrupts.
    pub calls: AtomicU64,
    /// Messages the daemon failed.
    pub errors: AtomicU64,
}

counter_set!(FrontendCounters {
    daemon_features,
    protocol_features,
    acked_features,
    mem_regions,
    rings_started,
    rings_stopped,
    activations,
    calls,
    errors
});

/// One ring as the driver set it up (guest-physical addresses).
#[derive(Clone, Copy, Debug)]
struct Ring {
    index: u16,
    size: u16,
    max_size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

/// A virtio device whose queues a vhost-user daemon serves; see the
/// module docs.
pub struct VhostUserFrontend {
    frontend: Frontend,
    device_type: u32,
    queue_sizes: Vec<u16>,
    /// What the driver may accept.
    offered: u64,
    /// VHOST_USER_F_PROTOCOL_FEATURES, if the daemon offers it (always
    /// acked then: rings start disabled and are enabled one by one).
    protocol_bit: u64,
    config: Vec<u8>,
    /// Every ring's call fd, and the vCPU side's request for the event loop.
    wake: EventFd,
    /// The driver's queue notifications (the VMM's ioeventfds): the kick fds.
    kicks: Vec<EventFd>,
    acked: u64,
    /// A driver setup the daemon has not had yet.
    pending: Option<Vec<Ring>>,
    /// The driver reset the device while rings ran.
    stop_pending: bool,
    /// Rings the daemon runs now.
    running: Vec<u16>,
    /// A step with the daemon failed since the last reset.
    failed: bool,
    /// The daemon's connection failed (a timeout, a closed or garbled
    /// socket): nothing more is sent, so that a stalled daemon costs the
    /// event loop one timeout, not one per message.
    dead: bool,
    counters: Arc<FrontendCounters>,
}

impl VhostUserFrontend {
    /// Connects to the daemon at `config.socket` and negotiates what can be
    /// before a driver comes: SET_OWNER, features, protocol features, the
    /// queue count, the config space.
    pub fn connect(config: &VhostUserConfig) -> Result<(Self, Arc<FrontendCounters>), FrontendError> {
        config.device.validate()?;
        let socket =
            UnixStream::connect(&config.socket).map_err(|e| FrontendError::Connect(config.socket.clone(), e))?;
        socket.set_read_timeout(Some(DAEMON_TIMEOUT)).map_err(FrontendError::Timeout)?;
        socket.set_write_timeout(Some(DAEMON_TIMEOUT)).map_err(FrontendError::Timeout)?;
        let queue_sizes = config.device.queue_sizes();
        let mut frontend = Frontend::from_stream(socket, queue_sizes.len() as u64);
        let counters = Arc::new(FrontendCounters::default());

        frontend.set_owner().map_err(|e| FrontendError::Daemon("SET_OWNER", e))?;
        let features = frontend.get_features().map_err(|e| FrontendError::Daemon("GET_FEATURES", e))?;
        counters.daemon_features.store(features, Ordering::Relaxed);
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FrontendError::NoVersion1(features));
        }
        let protocol_bit = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut protocol = VhostUserProtocolFeatures::empty();
        if protocol_bit != 0 {
            let offered =
                frontend.get_protocol_features().map_err(|e| FrontendError::Daemon("GET_PROTOCOL_FEATURES", e))?;
            protocol = offered & wanted_protocol_features();
            frontend.set_protocol_features(protocol).map_err(|e| FrontendError::Daemon("SET_PROTOCOL_FEATURES", e))?;
            counters.protocol_features.store(protocol.bits(), Ordering::Relaxed);
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every message without a reply of its own is acknowledged,
                // so a refusal fails the step that caused it.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let daemon = frontend.get_queue_num().map_err(|e| FrontendError::Daemon("GET_QUEUE_NUM", e))?;
            if daemon < queue_sizes.len() as u64 {
                return Err(FrontendError::TooFewQueues { daemon, wanted: queue_sizes.len() });
            }
        }
        let mut config_space = config.device.config_space();
        if protocol.contains(VhostUserProtocolFeatures::CONFIG) && !config_space.is_empty() {
            let wanted = config_space.len();
            let (_, payload) = frontend
                .get_config(0, wanted as u32, VhostUserConfigFlags::empty(), &config_space)
                .map_err(|e| FrontendError::Daemon("GET_CONFIG", e))?;
            if payload.len() != wanted {
                return Err(FrontendError::ConfigSize { got: payload.len(), wanted });
            }
            config_space = payload.to_vec();
        }
        debug!(
            socket = %config.socket.display(),
            features = format_args!("{features:#x}"),
            protocol = format_args!("{:#x}", protocol.bits()),
            "vhost-user daemon connected"
        );
        let device = VhostUserFrontend {
            frontend,
            device_type: config.device.device_type(),
            queue_sizes,
            offered: features & PASSED_FEATURES,
            protocol_bit,
            config: config_space,
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            kicks: Vec::new(),
            acked: 0,
            pending: None,
            stop_pending: false,
            running: Vec::new(),
            failed: false,
            dead: false,
            counters: counters.clone(),
        };
        Ok((device, counters))
    }

    /// Hands the daemon the driver's setup: features, memory table, then
    /// each ring (size, addresses, base, call, kick, enable).
    fn start(&mut self, rings: &[Ring], mem: &GuestMemoryMmap) -> Result<(), FrontendError> {
        if self.dead {
            return Err(FrontendError::Dead);
        }
        let acked = self.acked | self.protocol_bit;
        self.frontend.set_features(acked).map_err(|e| FrontendError::Daemon("SET_FEATURES", e))?;
        self.counters.acked_features.store(acked, Ordering::Relaxed);
        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| FrontendError::MemoryNotShared(r.start_addr().0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions).map_err(|e| FrontendError::Daemon("SET_MEM_TABLE", e))?;
        self.counters.mem_regions.store(regions.len() as u64, Ordering::Relaxed);
        for ring in rings {
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| FrontendError::RingOutsideMemory(ring.index))
            };
            let addrs = VringConfigData {
                queue_max_size: ring.max_size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host(ring.desc)?,
                used_ring_addr: host(ring.used)?,
                avail_ring_addr: host(ring.avail)?,
                log_addr: None,
            };
            let i = usize::from(ring.index);
            let kick = self.kicks.get(i).ok_or(FrontendError::RingOutsideMemory(ring.index))?;
            let step = |what: &'static str| move |e| FrontendError::Daemon(what, e);
            self.frontend.set_vring_num(i, ring.size).map_err(step("SET_VRING_NUM"))?;
            self.frontend.set_vring_addr(i, &addrs).map_err(step("SET_VRING_ADDR"))?;
            self.frontend.set_vring_base(i, 0).map_err(step("SET_VRING_BASE"))?;
            self.frontend.set_vring_call(i, &self.wake).map_err(step("SET_VRING_CALL"))?;
            self.frontend.set_vring_kick(i, kick).map_err(step("SET_VRING_KICK"))?;
            // The ring counts as running from its kick on: a failure past
            // here still takes it back.
            self.running.push(ring.index);
            if self.protocol_bit != 0 {
                self.frontend.set_vring_enable(i, true).map_err(step("SET_VRING_ENABLE"))?;
            }
            self.counters.rings_started.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.activations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes every running ring back (GET_VRING_BASE stops it); a failure
    /// is logged and counted, and a lost connection is asked nothing more.
    fn stop(&mut self) {
        for index in std::mem::take(&mut self.running) {
            if self.dead {
                break;
            }
            match self.frontend.get_vring_base(usize::from(index)) {
                Ok(_) => {
                    self.counters.rings_stopped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    self.dead |= connection_lost(&e);
                    warn!("the vhost-user daemon failed GET_VRING_BASE for queue {index}: {e}");
                }
            }
        }
    }

    fn wake_event_loop(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the event loop for a vhost-user device: {e}");
        }
    }
}

/// Whether `e` means the connection to the daemon is gone or no longer
/// speaks the protocol (a timeout included), rather than a refusal.
fn connection_lost(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    matches!(
        e,
        vhost::Error::VhostUserProtocol(
            E::Disconnected
                | E::PartialMessage
                | E::InvalidMessage
                | E::OversizedMsg
                | E::IncorrectFds
                | E::SocketError(_)
                | E::SocketBroken(_)
                | E::SocketRetry(_)
        )
    )
}

impl VirtioBackend for VhostUserFrontend {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn queues_served_elsewhere(&self) -> bool {
        true
    }

    fn set_kick_events(&mut self, kicks: Vec<EventFd>) {
        self.kicks = kicks;
    }

    fn activate(&mut self, queues: &[Queue]) {
        let rings = queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(index, q)| Ring {
                index: index as u16,
                size: q.size(),
                max_size: q.max_size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
            })
            .collect();
        self.pending = Some(rings);
        self.wake_event_loop();
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }

    fn process(&mut self, wakeup: Wakeup, _queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> u64 {
        if wakeup != Wakeup::Backend {
            return 0;
        }
        // Drain the counter: activation requests and calls alike.
        let _ = self.wake.read();
        let mut control = false;
        if self.stop_pending {
            self.stop_pending = false;
            control = true;
            self.stop();
        }
        if let Some(rings) = self.pending.take() {
            control = true;
            if let Err(e) = self.start(&rings, mem) {
                warn!("vhost-user device {}: {e}", self.device_type);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.failed = true;
                // A daemon whose connection failed (a timeout, a broken or
                // garbled socket) gets no more messages: its rings are
                // dropped unasked rather than each waiting a timeout. One
                // that refused a request (a ring size the driver chose,
                // say) is asked again after the driver's reset.
                self.dead |= matches!(&e, FrontendError::Daemon(_, err) if connection_lost(err));
                self.stop();
            }
        }
        // A wakeup that brought setup or teardown is not a call: the rings
        // of this setup were not the daemon's before it, and those of the
        // last one belong to a driver that reset the device.
        if control || self.running.is_empty() {
            return 0;
        }
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        1
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.wake.as_raw_fd())
    }

    fn reset(&mut self) {
        self.pending = None;
        self.failed = false;
        self.acked = 0;
        if !self.running.is_empty() && !self.stop_pending {
            self.stop_pending = true;
            self.wake_event_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::{desc, WRITE};
    use crate::virtio::mmio::{MmioInterrupt, MmioTransport};
    use crate::virtio::rng::Rng;
    use std::time::Instant;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, FileOffset};

    // virtio-mmio registers (virtio spec 4.2.2).
    use crate::virtio::mmio::tests::{read, write};
    use crate::virtio::mmio::{
        REG_DEVICE_FEATURES as DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL as DEVICE_FEATURES_SEL,
        REG_DEVICE_ID as DEVICE_ID, REG_DRIVER_FEATURES as DRIVER_FEATURES,
        REG_DRIVER_FEATURES_SEL as DRIVER_FEATURES_SEL, REG_INTERRUPT_STATUS as INTERRUPT_STATUS,
        REG_QUEUE_DESC_LOW as QUEUE_DESC, REG_QUEUE_DEVICE_LOW as QUEUE_DEVICE, REG_QUEUE_DRIVER_LOW as QUEUE_DRIVER,
        REG_QUEUE_NUM as QUEUE_NUM, REG_QUEUE_READY as QUEUE_READY, REG_STATUS as STATUS,
    };

    /// 2 MiB of guest RAM in a memfd, as the VMM makes it: shareable.
    fn shared_memory() -> GuestMemoryMmap {
        // SAFETY: a constant NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vessel-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(0x20_0000).unwrap();
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), 0x20_0000, Some(FileOffset::new(file, 0)))]).unwrap()
    }

    fn socket(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vessel-vu-front-{name}-{}", std::process::id()))
    }

    /// Our own rng backend served over vhost-user on `sock`, in a thread.
    fn serve_rng(
        sock: &std::path::Path,
    ) -> std::thread::JoinHandle<Result<(), crate::virtio::vhost_user::VhostUserError>> {
        crate::virtio::vhost_user::spawn("rng", Box::new(Rng::new().0), sock, crate::virtio::vhost_user::unconfined)
            .unwrap()
    }

    fn rng_device(socket: PathBuf) -> VhostUserConfig {
        VhostUserConfig {
            socket,
            device: VhostUserDevice::Generic { device_type: device_type::RNG, queue_sizes: vec![256], config: vec![] },
        }
    }

    /// Our own rng backend, served over vhost-user in a thread, reached
    /// through the frontend behind the virtio-mmio transport: the driver's
    /// setup reaches the daemon, which fills the driver's buffer in the
    /// shared memory and calls; the call becomes the transport's
    /// interrupt; a reset takes the ring back.
    #[test]
    fn a_driver_is_served_by_a_vhost_user_daemon_through_the_transport() {
        let sock = socket("rng");
        let _daemon = serve_rng(&sock);
        let (frontend, counters) = VhostUserFrontend::connect(&rng_device(sock.clone())).unwrap();
        let mem = shared_memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())));
        let kicks = t.attach(Box::new(frontend)).unwrap();
        assert!(t.queues_served_elsewhere());
        assert_eq!(read(&mut t, DEVICE_ID), device_type::RNG);
        write(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
        write(&mut t, DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, DEVICE_FEATURES) & (1 << 30), 0, "the vhost-user bit is not the driver's");

        let vq = MockSplitQueue::new(&mem, 16);
        write(&mut t, STATUS, 1);
        write(&mut t, STATUS, 3);
        write(&mut t, DRIVER_FEATURES_SEL, 1);
        write(&mut t, DRIVER_FEATURES, 1);
        write(&mut t, STATUS, 0xb);
        write(&mut t, QUEUE_NUM, 16);
        write(&mut t, QUEUE_DESC, vq.desc_table_addr().0 as u32);
        write(&mut t, QUEUE_DRIVER, vq.avail_addr().0 as u32);
        write(&mut t, QUEUE_DEVICE, vq.used_addr().0 as u32);
        write(&mut t, QUEUE_READY, 1);
        write(&mut t, STATUS, 0xf);
        assert_eq!(read(&mut t, STATUS), 0xf);
        // The event loop's turn: the setup goes to the daemon.
        t.process(Wakeup::Backend);
        assert_eq!(irq.read().ok(), None, "setting up is no interrupt");
        assert_eq!(counters.activations.load(Ordering::Relaxed), 1);
        assert_eq!(counters.rings_started.load(Ordering::Relaxed), 1);
        assert_eq!(counters.mem_regions.load(Ordering::Relaxed), 1);
        assert_eq!(counters.acked_features.load(Ordering::Relaxed), VIRTIO_F_VERSION_1 | (1 << 30));

        mem.write_slice(&[0u8; 64], GuestAddress(0x10_0000)).unwrap();
        vq.add_desc_chains(&[desc(0x10_0000, 64, WRITE)], 0).unwrap();
        kicks[0].write(1).unwrap();
        let start = Instant::now();
        while vq.used().idx().load() == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "the daemon never used the buffer");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 64);
        let mut data = [0u8; 64];
        mem.read_slice(&mut data, GuestAddress(0x10_0000)).unwrap();
        assert_ne!(data, [0u8; 64], "no entropy in the buffer");
        // The daemon's call: the event loop sees the wake fd readable.
        let start = Instant::now();
        loop {
            t.process(Wakeup::Backend);
            if counters.calls.load(Ordering::Relaxed) > 0 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "the daemon never called");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut t, INTERRUPT_STATUS), 1, "a used-buffer interrupt");

        write(&mut t, STATUS, 0);
        t.process(Wakeup::Backend);
        assert_eq!(counters.rings_stopped.load(Ordering::Relaxed), 1);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_file(&sock);
    }

    /// A lost or stalled connection stops all further messages; a refusal
    /// of one request leaves the daemon to be asked again.
    #[test]
    fn only_a_lost_connection_marks_the_daemon_dead() {
        use vhost::vhost_user::Error as E;
        let lost = |e: E| connection_lost(&vhost::Error::VhostUserProtocol(e));
        let timeout = || std::io::Error::from(std::io::ErrorKind::WouldBlock);
        assert!(lost(E::SocketRetry(timeout())));
        assert!(lost(E::SocketBroken(std::io::Error::from(std::io::ErrorKind::BrokenPipe))));
        assert!(lost(E::Disconnected));
        assert!(lost(E::PartialMessage));
        assert!(!lost(E::BackendInternalError), "a refusal is not a lost connection");
        assert!(!lost(E::InvalidParam));
    }

    /// A setup the daemon cannot take (here: guest memory that is not
    /// file-backed, so there is nothing to share) fails on the event loop,
    /// and the driver is told to reset the device; a reset clears it.
    #[test]
    fn a_setup_that_fails_asks_the_driver_for_a_reset() {
        let sock = socket("fail");
        let _daemon = serve_rng(&sock);
        let (frontend, counters) = VhostUserFrontend::connect(&rng_device(sock.clone())).unwrap();
        let mem = crate::virtio::chain::tests::memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())));
        t.attach(Box::new(frontend)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        write(&mut t, STATUS, 3);
        write(&mut t, DRIVER_FEATURES_SEL, 1);
        write(&mut t, DRIVER_FEATURES, 1);
        write(&mut t, STATUS, 0xb);
        write(&mut t, QUEUE_NUM, 16);
        write(&mut t, QUEUE_DESC, vq.desc_table_addr().0 as u32);
        write(&mut t, QUEUE_DRIVER, vq.avail_addr().0 as u32);
        write(&mut t, QUEUE_DEVICE, vq.used_addr().0 as u32);
        write(&mut t, QUEUE_READY, 1);
        write(&mut t, STATUS, 0xf);
        t.process(Wakeup::Backend);
        assert_eq!(read(&mut t, STATUS), 0x4f, "DEVICE_NEEDS_RESET");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut t, INTERRUPT_STATUS), 2, "a configuration-change interrupt");
        assert_eq!(counters.errors.load(Ordering::Relaxed), 1);
        assert_eq!(counters.activations.load(Ordering::Relaxed), 0);
        write(&mut t, STATUS, 0);
        t.process(Wakeup::Backend);
        assert_eq!(read(&mut t, STATUS), 0);
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn a_daemon_with_fewer_queues_than_the_device_is_refused() {
        let sock = socket("mq");
        let _daemon = serve_rng(&sock);
        let mut config = rng_device(sock.clone());
        config.device = VhostUserDevice::Generic { device_type: 4, queue_sizes: vec![16, 16], config: vec![] };
        match VhostUserFrontend::connect(&config) {
            Err(FrontendError::TooFewQueues { daemon: 1, wanted: 2 }) => {}
            other => panic!("connected with {:?}", other.map(|_| ())),
        }
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn no_daemon_is_an_error_that_names_the_socket() {
        let sock = socket("missing");
        let err = VhostUserFrontend::connect(&rng_device(sock.clone())).map(|_| ()).unwrap_err();
        assert!(matches!(&err, FrontendError::Connect(path, _) if *path == sock), "{err:?}");
        assert!(err.to_string().contains("vessel-vu-front-missing"));
    }

    #[test]
    fn a_virtio_fs_config_space_holds_the_tag_and_the_request_queues() {
        let fs = VhostUserDevice::Fs { tag: "shared".into(), request_queues: 2, queue_size: 128 };
        fs.validate().unwrap();
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_sizes(), vec![128; 3], "hiprio and two request queues");
        let config = fs.config_space();
        assert_eq!(config.len(), 40);
        assert_eq!(&config[..6], b"shared");
        assert!(config[6..36].iter().all(|b| *b == 0));
        assert_eq!(config[36..], 2u32.to_le_bytes());
        let mut data = [0u8; 4];
        read_config_bytes(&config, 36, &mut data);
        assert_eq!(u32::from_le_bytes(data), 2);
    }

    #[test]
    fn unusable_configs_say_what_is_wrong() {
        let fs =
            |tag: &str, request_queues, queue_size| VhostUserDevice::Fs { tag: tag.into(), request_queues, queue_size };
        let err = |d: VhostUserDevice| d.validate().unwrap_err().to_string();
        assert!(err(fs("", 1, 128)).contains("tag must be 1 to 36 bytes, got 0"));
        assert!(err(fs(&"x".repeat(37), 1, 128)).contains("got 37"));
        assert!(err(fs("t", 0, 128)).contains("1 to 63 request queues"));
        assert!(err(fs("t", 1, 100)).contains("power of two, got 100"));
        let generic = VhostUserDevice::Generic { device_type: 0, queue_sizes: vec![8], config: vec![] };
        assert!(err(generic).contains("device ID 0"));
        let json = r#"{"socket": "/run/fs.sock", "device": {"type": "fs", "tag": "root"}}"#;
        let config: VhostUserConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.device, fs("root", 1, 1024), "defaults fill what a stored config leaves out");
    }
}
