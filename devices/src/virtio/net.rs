//! virtio-net backed by a TAP device (`/dev/net/tun`, IFF_VNET_HDR). No
//! offloads are negotiated (no checksum or segmentation offload on either
//! side), so every frame is a plain Ethernet frame behind a zeroed virtio
//! header; the TAP's vnet header carries the same 12 bytes.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::chain::ChainReader;
use super::{
    device_type, read_config_bytes, VirtioBackend, Wakeup, PASS_BUDGET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// VIRTIO_NET_F_MAC: the config space holds the MAC address.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS: the config space holds the link status.
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame we move: a 64 KiB packet plus Ethernet and vnet headers.
const MAX_FRAME: usize = 65_562 + NET_HDR_LEN;
const TAP_TOKEN: u64 = 1;

/// How to make a network device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// TAP interface name (created if missing, up to 15 bytes).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Why a network device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The name does not fit an interface name.
    #[error("TAP name {0:?} is empty or longer than 15 bytes")]
    TapName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// A TUN ioctl failed.
    #[error("cannot set up TAP device {0}: {1} failed")]
    Ioctl(String, &'static str, #[source] std::io::Error),
    /// epoll failed.
    #[error("cannot set up the network event queue")]
    Epoll(#[source] std::io::Error),
    /// A placeholder's slot holds a TAP already.
    #[error("this network slot holds a TAP already")]
    SlotUsed,
}

/// Counters a stats call reads.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames the guest sent.
    pub tx_packets: AtomicU64,
    /// Bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames dropped (malformed, too large for the buffer, TAP errors).
    pub dropped: AtomicU64,
}

super::counter_set!(NetCounters { tx_packets, tx_bytes, rx_packets, rx_bytes, dropped });

/// The network device.
pub struct Net {
    /// The TAP; none in a placeholder that has not been given one.
    tap: Option<File>,
    epoll: Arc<Epoll>,
    mac: [u8; 6],
    /// A placeholder's TAP changes, from its [`TapSlot`].
    inbox: Option<Arc<Mutex<TapChange>>>,
    /// The TAP may hold frames (edge-triggered: true until EAGAIN).
    tap_readable: bool,
    frame: Vec<u8>,
    counters: Arc<NetCounters>,
}

/// What a placeholder's [`TapSlot`] asked for last, not yet taken in.
#[derive(Default)]
struct TapChange {
    /// A TAP to take in (already watched by the device's epoll).
    insert: Option<File>,
    /// Whether the link is up once the change is taken in.
    link_up: bool,
    /// Drop the current TAP.
    remove: bool,
}

/// Where a placeholder network device gets its TAP, and loses it again
/// (see [`Net::placeholder`]). The link is up while a TAP is in.
#[derive(Clone)]
pub struct TapSlot {
    change: Arc<Mutex<TapChange>>,
    epoll: Arc<Epoll>,
}

impl TapSlot {
    /// Opens the TAP `name` (in the calling thread's network namespace)
    /// for the device, which takes it in before it next moves a frame; the
    /// config space shows the link up from now on (tell the driver with a
    /// config change).
    pub fn insert(&self, name: &str) -> Result<(), NetError> {
        self.insert_file(open_tap(name)?)
    }

    /// [`TapSlot::insert`] with a TAP opened already (non-blocking, with
    /// 12-byte virtio-net headers, as [`open_tap`] opens one). Anything
    /// that reads and writes whole frames stands in for one: the fuzz
    /// target gives a `SOCK_SEQPACKET` socket.
    pub fn insert_file(&self, tap: File) -> Result<(), NetError> {
        let mut change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        if change.link_up {
            return Err(NetError::SlotUsed);
        }
        self.epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP_TOKEN),
            )
            .map_err(NetError::Epoll)?;
        *change = TapChange { insert: Some(tap), link_up: true, remove: false };
        Ok(())
    }

    /// Takes the TAP out again: the link goes down (tell the driver with a
    /// config change) and the TAP is closed.
    pub fn remove(&self) {
        let mut change = self.change.lock().unwrap_or_else(|p| p.into_inner());
        *change = TapChange { insert: None, link_up: false, remove: true };
    }

    /// Whether a TAP is in (or on its way in).
    pub fn is_used(&self) -> bool {
        self.change.lock().unwrap_or_else(|p| p.into_inner()).link_up
    }
}

/// Opens (creating if needed) the TAP `name` with virtio-net headers and
/// no offloads, non-blocking.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::TapName(name.into()));
    }
    let tap = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;
    let ioctl_err = |what| move |e| NetError::Ioctl(name.into(), what, e);
    // struct ifreq: the name, then the flags as a short.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is
    // big enough to hold (40 bytes).
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc < 0 {
        return Err(ioctl_err("TUNSETIFF")(std::io::Error::last_os_error()));
    }
    let hdr_len = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
    if rc < 0 {
        return Err(ioctl_err("TUNSETVNETHDRSZ")(std::io::Error::last_os_error()));
    }
    // No offloads: the kernel hands us whole, checksummed frames.
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
    if rc < 0 {
        return Err(ioctl_err("TUNSETOFFLOAD")(std::io::Error::last_os_error()));
    }
    Ok(tap)
}

impl Net {
    /// Opens the TAP `config` names.
    pub fn new(config: &NetConfig) -> Result<(Self, Arc<NetCounters>), NetError> {
        let tap = open_tap(&config.tap)?;
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP_TOKEN),
            )
            .map_err(NetError::Epoll)?;
        let counters = Arc::new(NetCounters::default());
        let net = Net {
            tap: Some(tap),
            epoll: Arc::new(epoll),
            mac: config.mac,
            inbox: None,
            tap_readable: true,
            frame: vec![0u8; MAX_FRAME],
            counters: counters.clone(),
        };
        Ok((net, counters))
    }

    /// A network device with MAC `mac` and no TAP yet (its link down), for
    /// frontends that cannot add a device after boot (QEMU microvm): it is
    /// attached at boot, and a TAP given through the returned slot later
    /// brings its link up once the driver rereads the config.
    pub fn placeholder(mac: [u8; 6]) -> Result<(Self, Arc<NetCounters>, TapSlot), NetError> {
        let epoll = Arc::new(Epoll::new().map_err(NetError::Epoll)?);
        let change = Arc::new(Mutex::new(TapChange::default()));
        let counters = Arc::new(NetCounters::default());
        let net = Net {
            tap: None,
            epoll: epoll.clone(),
            mac,
            inbox: Some(change.clone()),
            tap_readable: false,
            frame: vec![0u8; MAX_FRAME],
            counters: counters.clone(),
        };
        Ok((net, counters, TapSlot { change, epoll }))
    }

    /// Takes in what the placeholder's slot asked for since the last pass.
    fn take_tap_change(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        let mut change = inbox.lock().unwrap_or_else(|p| p.into_inner());
        if change.remove {
            change.remove = false;
            if let Some(old) = self.tap.take() {
                let _ = self.epoll.ctl(ControlOperation::Delete, old.as_raw_fd(), EpollEvent::default());
            }
            self.tap_readable = false;
        }
        if let Some(tap) = change.insert.take() {
            self.tap = Some(tap);
            self.tap_readable = true;
        }
    }

    /// Whether the link is up: a TAP is in, or on its way in.
    fn link_up(&self) -> bool {
        match &self.inbox {
            Some(inbox) => inbox.lock().unwrap_or_else(|p| p.into_inner()).link_up,
            None => self.tap.is_some(),
        }
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut reader = ChainReader::new(queue, mem);
        let mut used = false;
        // At most a budget of frames a pass: the rest wait for the next.
        for _ in 0..PASS_BUDGET {
            let Some(chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let sent = reader.split(chain).ok().and_then(|b| {
                let len = b.readable_len() as usize;
                if !(NET_HDR_LEN..=MAX_FRAME).contains(&len) {
                    return None;
                }
                b.read_at(0, &mut self.frame[..len]).ok()?;
                // Nothing was negotiated that the header could ask for:
                // pass it on zeroed, the frame as is. With no TAP (a
                // placeholder whose link is down) the frame is dropped.
                self.frame[..NET_HDR_LEN].fill(0);
                self.tap.as_mut()?.write(&self.frame[..len]).ok().filter(|n| *n == len)
            });
            match sent {
                Some(n) => {
                    self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.counters.tx_bytes.fetch_add((n - NET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                None => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = queue.add_used(mem, head, 0);
            used = true;
        }
        used
    }

    /// Moves frames from the TAP into receive buffers while both last.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut reader = ChainReader::new(queue, mem);
        let mut used = false;
        // A frame is read from the TAP only once a buffer waits for it, so
        // nothing is held here while the guest has no buffers.
        for _ in 0..PASS_BUDGET {
            if !self.tap_readable {
                break;
            }
            let Some(tap) = self.tap.as_mut() else { return used };
            let Some(chain) = queue.pop_descriptor_chain(mem) else { return used };
            let head = chain.head_index();
            let n = match tap.read(&mut self.frame) {
                Ok(n) => n,
                Err(e) => {
                    // EAGAIN: drained until the next edge. The buffer stays
                    // available for the next frame.
                    self.tap_readable = e.kind() == ErrorKind::Interrupted;
                    queue.go_to_previous_position();
                    continue;
                }
            };
            let frame = &mut self.frame[..n];
            let written = (n >= NET_HDR_LEN)
                .then_some(())
                .and_then(|()| reader.split(chain).ok())
                .filter(|b| b.writable_len() >= n as u64)
                .and_then(|b| {
                    // num_buffers = 1; everything else as the TAP gave it (zero).
                    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    b.write_at(0, frame).ok()
                });
            match written {
                Some(()) => {
                    self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                    self.counters.rx_bytes.fetch_add((n - NET_HDR_LEN) as u64, Ordering::Relaxed);
                    let _ = queue.add_used(mem, head, n as u32);
                }
                None => {
                    // Runt frame, bad chain or a buffer too small: dropped.
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = queue.add_used(mem, head, 0);
                }
            }
            used = true;
        }
        used
    }
}

impl VirtioBackend for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status u16.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() { VIRTIO_NET_S_LINK_UP } else { 0 };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn process(&mut self, wakeup: Wakeup, queues: &mut [&mut Queue], mem: &GuestMemoryMmap) -> u64 {
        self.take_tap_change();
        // Taken in even with no queues (no driver yet, or after a reset),
        // so that our epoll fd does not stay readable and spin the loop.
        if wakeup == Wakeup::Backend {
            let mut events = [EpollEvent::default(); 4];
            if self.epoll.wait(0, &mut events).is_ok_and(|n| n > 0) {
                self.tap_readable = true;
            }
        }
        if queues.len() < 2 {
            return 0;
        }
        let mut used = 0;
        if wakeup == Wakeup::Queue(TX as u16) && queues[TX].ready() && self.process_tx(queues[TX], mem) {
            used |= 1 << TX;
        }
        if queues[RX].ready() && self.process_rx(queues[RX], mem) {
            used |= 1 << RX;
        }
        used
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }
}
