//! The virtio-mmio transport (virtio 1.x, register layout version 2), in
//! process: the guest's driver programs it through MMIO exits on vCPU
//! threads; queue notifications arrive as EventFds (ioeventfds registered by
//! the VMM, or written here when a notify write reaches us) and are served
//! on the VMM's event loop; interrupts leave through an irqfd.
//!
//! A transport with no backend is an empty hotplug slot: it reads as device
//! ID 0, which Linux's driver skips, until a backend is attached.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use tracing::warn;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{serve, VirtioBackend, Wakeup, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Our vendor ID: "VSSL".
const VENDOR_ID: u32 = 0x4c53_5356;

// Register offsets (virtio spec 4.2.2).
pub(crate) const REG_MAGIC: u64 = 0x000;
pub(crate) const REG_VERSION: u64 = 0x004;
pub(crate) const REG_DEVICE_ID: u64 = 0x008;
pub(crate) const REG_VENDOR_ID: u64 = 0x00c;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const REG_QUEUE_SEL: u64 = 0x030;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const REG_QUEUE_NUM: u64 = 0x038;
pub(crate) const REG_QUEUE_READY: u64 = 0x044;
pub(crate) const REG_QUEUE_NOTIFY: u64 = 0x050;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x060;
pub(crate) const REG_INTERRUPT_ACK: u64 = 0x064;
pub(crate) const REG_STATUS: u64 = 0x070;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub(crate) const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(crate) const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(crate) const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub(crate) const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub(crate) const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub(crate) const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub(crate) const REG_CONFIG: u64 = 0x100;

/// Offset of the notify register, where the VMM puts the ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;

// Device status bits (2.1).
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;

/// InterruptStatus bits.
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The interrupt line of one transport: the status bits the driver reads
/// and acknowledges, and the irqfd that raises the line.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// An interrupt raised by writing `irq` (registered as an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irq }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            warn!("cannot raise a virtio interrupt: {e}");
        }
    }
}

/// One virtio-mmio device (or empty slot).
pub struct MmioTransport {
    backend: Option<Box<dyn VirtioBackend>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
}

/// Why a backend could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The slot holds a device already.
    #[error("the virtio-mmio slot already holds a device")]
    SlotInUse,
    /// A queue could not be made.
    #[error("invalid queue size {0}")]
    Queue(u16),
    /// An EventFd could not be made.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// One queue's registers and ring positions, as a snapshot keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRegisters {
    /// QueueNumMax the device offered.
    pub max_size: u16,
    /// QueueNum the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc_table: u64,
    /// The available ring's.
    pub avail_ring: u64,
    /// The used ring's.
    pub used_ring: u64,
    /// The next available entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device fills.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in use.
    pub event_idx: bool,
}

/// A transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus: raised, not yet acknowledged.
    pub interrupt_status: u32,
    /// Each queue, in order.
    pub queues: Vec<QueueRegisters>,
}

/// Why saved transport registers could not be put back: each names what
/// in the snapshot disagrees with the device or the guest's memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportStateError {
    /// Registers saved for an empty slot, or none for a device.
    #[error("the saved registers are for {saved} queues; the device has {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues the device has.
        device: usize,
    },
    /// A queue's maximum size differs from the device's.
    #[error("queue {queue}: saved maximum size {saved}, the device offers {device}")]
    QueueMaxSize {
        /// The queue.
        queue: usize,
        /// In the snapshot.
        saved: u16,
        /// The device's.
        device: u16,
    },
    /// A queue's size is not one the device allows.
    #[error("queue {queue}: size {size} is not a power of two up to {max}")]
    QueueSize {
        /// The queue.
        queue: usize,
        /// Its saved size.
        size: u16,
        /// The maximum.
        max: u16,
    },
    /// A live queue's rings are not in guest memory.
    #[error("queue {0}: its rings are not in guest memory")]
    QueueOutsideMemory(usize),
    /// Accepted features the device never offered.
    #[error("the saved driver features {driver:#x} include some the device does not offer ({offered:#x})")]
    Features {
        /// Saved.
        driver: u64,
        /// Offered.
        offered: u64,
    },
    /// A device another process serves (vhost-user) has state there.
    #[error("a device served by another process (vhost-user) cannot be restored")]
    ServedElsewhere,
}

impl MmioTransport {
    /// An empty slot interrupting through `interrupt`.
    pub fn empty(mem: GuestMemoryMmap, interrupt: Arc<MmioInterrupt>) -> Self {
        Self {
            backend: None,
            mem,
            interrupt,
            queues: Vec::new(),
            queue_evts: Vec::new(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
        }
    }

    /// Puts `backend` in this slot. Returns the queue EventFds (in queue
    /// order) for the VMM to register as ioeventfds and watch.
    pub fn attach(&mut self, backend: Box<dyn VirtioBackend>) -> Result<Vec<EventFd>, MmioError> {
        if self.backend.is_some() {
            return Err(MmioError::SlotInUse);
        }
        let sizes = backend.queue_max_sizes().to_vec();
        let queues =
            sizes.iter().map(|s| Queue::new(*s).map_err(|_| MmioError::Queue(*s))).collect::<Result<Vec<_>, _>>()?;
        let evts = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let clone_all =
            || evts.iter().map(|e| e.try_clone().map_err(MmioError::EventFd)).collect::<Result<Vec<_>, _>>();
        let clones = clone_all()?;
        let mut backend = backend;
        if backend.queues_served_elsewhere() {
            // The same notifications, for the process that serves the rings.
            backend.set_kick_events(clone_all()?);
        }
        self.reset();
        self.queues = queues;
        self.queue_evts = evts;
        self.backend = Some(backend);
        Ok(clones)
    }

    /// Removes the backend, leaving an empty slot.
    pub fn detach(&mut self) -> Option<Box<dyn VirtioBackend>> {
        self.reset();
        self.queues.clear();
        self.queue_evts.clear();
        self.backend.take()
    }

    /// The device ID the slot shows (0 when empty).
    pub fn device_id(&self) -> u32 {
        self.backend.as_ref().map_or(0, |b| b.device_type())
    }

    /// Whether the driver has set DRIVER_OK and the queues are live.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Whether another process serves the backend's rings (see
    /// [`VirtioBackend::queues_served_elsewhere`]): the queue eventfds are
    /// then that process's to read, and the event loop must not watch them.
    pub fn queues_served_elsewhere(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.queues_served_elsewhere())
    }

    /// The registers and queues, for a snapshot (taken between event loop
    /// passes, so no request is half served).
    pub fn state(&self) -> TransportState {
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let s = q.state();
                QueueRegisters {
                    max_size: s.max_size,
                    size: s.size,
                    ready: s.ready,
                    desc_table: s.desc_table,
                    avail_ring: s.avail_ring,
                    used_ring: s.used_ring,
                    next_avail: s.next_avail,
                    next_used: s.next_used,
                    event_idx: s.event_idx_enabled,
                }
            })
            .collect();
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            queues,
        }
    }

    /// Puts saved registers back into a transport just given its backend
    /// ([`MmioTransport::attach`]). Everything is checked against the
    /// device and the guest's memory before anything changes. The device
    /// goes on only at [`MmioTransport::resume_restored`].
    pub fn restore(&mut self, state: &TransportState) -> Result<(), TransportStateError> {
        let device = self.queues.len();
        if state.queues.len() != device {
            return Err(TransportStateError::QueueCount { saved: state.queues.len(), device });
        }
        let Some(backend) = self.backend.as_ref() else { return Ok(()) };
        if backend.queues_served_elsewhere() && state.status != 0 {
            return Err(TransportStateError::ServedElsewhere);
        }
        let offered = backend.features();
        let features_ok = state.status & STATUS_FEATURES_OK != 0;
        if features_ok && state.driver_features & !offered != 0 {
            return Err(TransportStateError::Features { driver: state.driver_features, offered });
        }
        let active = state.status & STATUS_DRIVER_OK != 0;
        let mut queues = Vec::with_capacity(device);
        for (queue, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                let device = current.max_size();
                return Err(TransportStateError::QueueMaxSize { queue, saved: saved.max_size, device });
            }
            let q = Queue::try_from(QueueState {
                max_size: saved.max_size,
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: saved.event_idx,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            })
            .map_err(|_| TransportStateError::QueueSize {
                queue,
                size: saved.size,
                max: saved.max_size,
            })?;
            if active && q.ready() && !q.is_valid(&self.mem) {
                return Err(TransportStateError::QueueOutsideMemory(queue));
            }
            queues.push(q);
        }
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.active = active;
        self.interrupt.status.store(state.interrupt_status, Ordering::SeqCst);
        if features_ok {
            if let Some(backend) = self.backend.as_mut() {
                backend.set_acked_features(state.driver_features);
            }
        }
        Ok(())
    }

    /// Lets a restored device go on, once the VM's interrupt controllers
    /// hold their saved state: the backend learns its host side is new
    /// ([`VirtioBackend::restored`]), and every live queue is served once,
    /// for buffers the driver added before the snapshot whose notification
    /// was not served yet.
    pub fn resume_restored(&mut self) {
        if !self.active {
            return;
        }
        let Some(backend) = self.backend.as_mut() else { return };
        let mut queues: smallvec::SmallVec<[&mut Queue; 4]> = self.queues.iter_mut().collect();
        let used = backend.restored(&mut queues, &self.mem);
        drop(queues);
        if used != 0 {
            self.interrupt.raise(INT_USED_RING);
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if self.queues.get(i).is_some_and(|q| q.ready()) {
                if let Err(e) = evt.write(1) {
                    warn!("cannot wake restored virtio queue {i}: {e}");
                }
            }
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        if let Some(b) = self.backend.as_mut() {
            b.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.active = false;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    /// Serves what woke the device: a queue notification or backend work.
    pub fn process(&mut self, wakeup: Wakeup) {
        if self.queues_served_elsewhere() {
            self.process_elsewhere(wakeup);
            return;
        }
        if !self.active {
            // No driver (not yet, or reset): host-side work is taken in
            // with no queues, so the backend's fd does not stay readable
            // and spin the event loop until a driver comes.
            if let (Wakeup::Backend, Some(backend)) = (wakeup, self.backend.as_mut()) {
                backend.process(wakeup, &mut [], &self.mem);
            }
            return;
        }
        let Some(backend) = self.backend.as_mut() else { return };
        if let Wakeup::Queue(index) = wakeup {
            if !self.queues.get(usize::from(index)).is_some_and(|q| q.ready()) {
                return;
            }
        }
        // No allocation per notification: devices have a few queues.
        let mut queues: smallvec::SmallVec<[&mut Queue; 4]> = self.queues.iter_mut().collect();
        let served = serve(backend.as_mut(), wakeup, &mut queues, &self.mem);
        if served.notify != 0 {
            self.interrupt.raise(INT_USED_RING);
        }
        // Queues whose budget ran out: their own eventfd brings them back
        // after the event loop's other work.
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if served.pending & (1 << i) != 0 {
                if let Err(e) = evt.write(1) {
                    warn!("cannot wake virtio queue {i} again: {e}");
                }
            }
        }
    }

    /// A wakeup of a device whose rings another process serves: its backend
    /// talks to that process and says whether buffers were used.
    fn process_elsewhere(&mut self, wakeup: Wakeup) {
        let Some(backend) = self.backend.as_mut() else { return };
        if wakeup != Wakeup::Backend {
            return;
        }
        let used = backend.process(wakeup, &mut [], &self.mem);
        if backend.needs_reset() {
            if self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.raise(INT_CONFIG);
            }
        } else if used != 0 && self.active {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// The backend's host-side file descriptor, if it has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.backend.as_ref().and_then(|b| b.backend_fd())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.active {
            // Queue registers are frozen once the device is live.
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_id(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.backend.as_ref().map_or(0, |b| b.features());
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            // No shared memory regions: length -1.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Features are written between DRIVER and FEATURES_OK only.
            REG_DRIVER_FEATURES if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    q.set_size(size);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Reached only without an ioeventfd for this queue: pass the
                // notification to the event loop the same way.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            REG_QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            REG_QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let Some(backend) = self.backend.as_mut() else { return };
        // The driver only ever adds bits; anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        let mut status = value;
        if added & STATUS_FEATURES_OK != 0 {
            let offered = backend.features();
            let acceptable = self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if acceptable {
                backend.set_acked_features(self.driver_features);
            } else {
                status &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 {
            if status & STATUS_FEATURES_OK == 0 {
                status &= !STATUS_DRIVER_OK;
            } else if self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem)) {
                let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
                self.active = true;
                if backend.queues_served_elsewhere() {
                    backend.activate(&self.queues);
                }
            } else {
                // A ready queue outside guest memory: the device cannot run.
                status |= STATUS_DEVICE_NEEDS_RESET;
                status &= !STATUS_DRIVER_OK;
                self.status = status;
                self.interrupt.raise(INT_CONFIG);
                return;
            }
        }
        self.status = status;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            match self.backend.as_ref() {
                Some(b) => b.read_config(offset - REG_CONFIG, data),
                None => data.fill(0),
            }
            return;
        }
        // Registers are 32 bits wide and 32-bit aligned; other accesses
        // read as zero.
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if let Some(b) = self.backend.as_mut() {
                b.write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        if let (4, 0) = (data.len(), offset % 4) {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_register(offset, value);
        }
    }
}

/// Serves a transport's queue notifications on the VMM's event loop; the
/// event token is the queue index.
pub struct MmioQueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    evts: Vec<EventFd>,
}

impl MmioQueueEvents {
    /// Watches `evts` (from [`MmioTransport::attach`]) for `transport`.
    pub fn new(transport: Arc<Mutex<MmioTransport>>, evts: Vec<EventFd>) -> Self {
        Self { transport, evts }
    }
}

impl MmioQueueEvents {
    /// The token of the backend's own fd: one past the last queue.
    fn backend_token(&self) -> u32 {
        self.evts.len() as u32
    }
}

impl MutEventSubscriber for MmioQueueEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let token = events.data();
        let wakeup = if token == self.backend_token() {
            Wakeup::Backend
        } else if let Some(evt) = self.evts.get(token as usize) {
            // Drain the counter; one pass serves every pending buffer.
            let _ = evt.read();
            Wakeup::Queue(token as u16)
        } else {
            return;
        };
        self.transport.lock().unwrap_or_else(|p| p.into_inner()).process(wakeup);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let elsewhere = self.transport.lock().unwrap_or_else(|p| p.into_inner()).queues_served_elsewhere();
        // The queue eventfds of a device served elsewhere are its daemon's.
        let queues = if elsewhere { &self.evts[..0] } else { &self.evts[..] };
        for (index, evt) in queues.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                warn!("cannot watch virtio queue {index}: {e:?}");
            }
        }
        let backend_fd = self.transport.lock().unwrap_or_else(|p| p.into_inner()).backend_fd();
        if let Some(fd) = backend_fd {
            if let Err(e) = ops.add(Events::with_data_raw(fd, self.backend_token(), EventSet::IN)) {
                warn!("cannot watch the virtio backend: {e:?}");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::chain::tests::{desc, memory, WRITE};
    use crate::virtio::rng::Rng;
    use crate::virtio::tests::Endless;
    use virtio_queue::mock::MockSplitQueue;

    const STATUS_ACKNOWLEDGE: u32 = 1;

    /// A 32-bit register read, as a driver makes it.
    pub(crate) fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A 32-bit register write, as a driver makes it.
    pub(crate) fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn rng_slot(mem: &GuestMemoryMmap) -> (MmioTransport, Vec<EventFd>, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())));
        let evts = t.attach(Box::new(Rng::new().0)).unwrap();
        (t, evts, irq)
    }

    /// The driver's initialisation sequence up to DRIVER_OK (3.1.1).
    fn init(t: &mut MmioTransport, vq: &MockSplitQueue<GuestMemoryMmap>, driver_features: u64) -> u32 {
        write(t, REG_STATUS, 0);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, driver_features as u32);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, (driver_features >> 32) as u32);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if read(t, REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return read(t, REG_STATUS);
        }
        write(t, REG_QUEUE_SEL, 0);
        write(t, REG_QUEUE_NUM, 16);
        write(t, REG_QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32);
        write(t, REG_QUEUE_DRIVER_LOW, vq.avail_addr().0 as u32);
        write(t, REG_QUEUE_DEVICE_LOW, vq.used_addr().0 as u32);
        write(t, REG_QUEUE_READY, 1);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        read(t, REG_STATUS)
    }

    #[test]
    fn identifies_itself_and_its_features() {
        let mem = memory();
        let (mut t, _, _) = rng_slot(&mem);
        assert_eq!(read(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 4);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 256);
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0, "no second queue");
        // Unaligned and narrow register accesses read as zero.
        let mut b = [0u8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn a_driver_gets_its_request_served_and_an_interrupt() {
        let mem = memory();
        let (mut t, evts, irq) = rng_slot(&mem);
        let vq = MockSplitQueue::new(&mem, 16);
        assert_eq!(init(&mut t, &vq, VIRTIO_F_VERSION_1), 0xf);
        assert!(t.is_active());
        vq.build_desc_chain(&[desc(0x10_0000, 64, WRITE)]).unwrap();
        write(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(evts[0].read().unwrap(), 1, "notify reaches the queue eventfd");
        t.process(Wakeup::Queue(0));
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 64);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        write(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 0);
        // Queue registers are frozen while the device runs.
        write(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(t.queues[0].size(), 16);
        // Reset brings it all back.
        write(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn features_the_device_never_offered_are_refused() {
        let mem = memory();
        let (mut t, _, _) = rng_slot(&mem);
        let vq = MockSplitQueue::new(&mem, 16);
        let status = init(&mut t, &vq, VIRTIO_F_VERSION_1 | (1 << 20));
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        // A legacy driver (no VERSION_1) is refused too.
        let status = init(&mut t, &vq, 0);
        assert_eq!(status & STATUS_FEATURES_OK, 0);
        assert!(!t.is_active());
    }

    #[test]
    fn a_queue_outside_memory_needs_reset_instead_of_running() {
        let mem = memory();
        let (mut t, _, irq) = rng_slot(&mem);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, 1);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        write(&mut t, REG_QUEUE_NUM, 16);
        write(&mut t, REG_QUEUE_DESC_LOW, 0xffff_0000);
        write(&mut t, REG_QUEUE_DRIVER_LOW, 0x1000);
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0x2000);
        write(&mut t, REG_QUEUE_READY, 1);
        write(&mut t, REG_STATUS, 0xf);
        assert!(!t.is_active());
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
        // Notifications to a device that is not running do nothing.
        t.process(Wakeup::Queue(0));
    }

    #[test]
    fn an_empty_slot_reads_as_device_zero_until_attached() {
        let mem = memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq)));
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 0);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(read(&mut t, REG_STATUS), 0, "an empty slot takes no status");
        t.attach(Box::new(Rng::new().0)).unwrap();
        assert_eq!(read(&mut t, REG_DEVICE_ID), 4);
        assert!(matches!(t.attach(Box::new(Rng::new().0)), Err(MmioError::SlotInUse)));
        assert!(t.detach().is_some());
        assert_eq!(read(&mut t, REG_DEVICE_ID), 0);
    }

    #[test]
    fn a_queue_left_with_buffers_wakes_itself_for_the_next_pass() {
        let mem = memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq)));
        let vq = MockSplitQueue::new(&mem, 16);
        let evts = t.attach(Box::new(Endless { avail: vq.avail_addr(), answered: 0 })).unwrap();
        assert_eq!(init(&mut t, &vq, VIRTIO_F_VERSION_1), 0xf);
        vq.add_desc_chains(&[desc(0x10_0000, 64, WRITE)], 0).unwrap();
        t.process(Wakeup::Queue(0));
        // The pass ended with buffers waiting and no kick to come: the
        // transport wrote the queue's eventfd itself.
        assert_eq!(evts[0].read().unwrap(), 1, "the queue was not woken again");
    }

    #[test]
    fn host_work_for_a_device_without_a_driver_is_taken_in_instead_of_spinning() {
        use crate::virtio::vsock::{Vsock, VsockConfig};
        use std::io::Write;
        let mem = memory();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq)));
        let uds = std::env::temp_dir().join(format!("vessel-mmio-idle-{}", std::process::id()));
        let (vsock, _) = Vsock::new(&VsockConfig { guest_cid: 3, uds_path: uds.clone() }).unwrap();
        t.attach(Box::new(vsock)).unwrap();
        let fd = t.backend_fd().unwrap();
        let readable = || {
            let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: poll on one valid pollfd, without waiting.
            unsafe { libc::poll(&mut poll, 1, 0) == 1 }
        };
        // A host connects while no driver runs the device.
        let mut host = std::os::unix::net::UnixStream::connect(&uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        assert!(readable());
        // As the event loop would, a few wakeups (the connection, its line,
        // the new stream's first edge); then there is nothing left to do.
        for _ in 0..5 {
            if !readable() {
                break;
            }
            t.process(Wakeup::Backend);
        }
        assert!(!readable(), "the backend fd stays readable: the event loop would spin");
        let _ = std::fs::remove_file(&uds);
    }
}
