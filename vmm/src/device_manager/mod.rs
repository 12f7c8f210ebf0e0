//! The device manager: every virtio device the guest sees goes through
//! here, at boot and while the VM runs. It hands out virtio-mmio slots
//! (`slots.rs`), makes backends (`backend.rs`), connects each transport's
//! interrupt (an irqfd) and queue notifications (one ioeventfd per queue)
//! to KVM, puts the transport on the MMIO bus, and says what the command
//! line and the DSDT announce.
//!
//! Boot: [`DeviceManager::for_boot`] places the configured devices, then
//! the empty hotplug slots, and hands back what the boot path needs
//! ([`BootDevices`]). Running: [`DeviceManager::attach`] and
//! [`DeviceManager::detach`] fill and empty hotplug slots from the event
//! loop, whose hotplug events [`DeviceManager::process`] serves.

mod backend;
mod slots;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use boot::acpi::VirtioMmioDevice;
use boot::layout::VIRTIO_MMIO_SIZE;
use devices::virtio::mmio::{
    MmioError, MmioInterrupt, MmioQueueEvents, MmioTransport, TransportStateError, QUEUE_NOTIFY_OFFSET,
};
use devices::virtio::{VirtioBackend, Wakeup};
use devices::{Bus, BusError};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use backend::BackendError;
pub(crate) use backend::NamedCounters;
pub use slots::{HotplugTable, MmioSlot, SlotAllocator, SlotError};

use crate::config::DeviceConfig;
use crate::snapshot::format::SlotState;

/// Event tokens of hot-plugged devices start here: base + slot * 64 +
/// queue, and base + slot * 64 + 63 for the backend's own fd. The event
/// loop's own tokens are all below.
pub(crate) const HOTPLUG_TOKEN_BASE: u32 = 1 << 16;
const TOKENS_PER_SLOT: u32 = 64;
const BACKEND_TOKEN_OFFSET: u32 = TOKENS_PER_SLOT - 1;

/// A subscriber the event loop serves for a boot-time device's queues.
pub(crate) type DeviceEvents = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Why a device could not be placed, attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No slot for it.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// Its backend could not be made.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The interrupt's eventfd could not be made.
    #[error("cannot create the eventfd for IRQ {0}")]
    EventFd(u32, #[source] std::io::Error),
    /// KVM refused the interrupt's irqfd.
    #[error("cannot connect IRQ {0} to KVM (KVM_IRQFD)")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// The transport could not take the backend.
    #[error("cannot set up the device's virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// KVM refused a queue's ioeventfd.
    #[error("cannot connect queue {queue} of the device at {addr:#x} to KVM (KVM_IOEVENTFD)")]
    Ioeventfd {
        /// The queue.
        queue: usize,
        /// The device's window.
        addr: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The event loop could not watch the device.
    #[error("cannot watch the events of the device at {0:#x}")]
    Watch(u64, #[source] event_manager::Error),
    /// A hot-plug request reached the event loop without its backend (the
    /// requesting thread makes it, see `api::Request`).
    #[error("the device's backend was not made before the request")]
    NotPrepared,
    /// The window collides on the MMIO bus.
    #[error("cannot place the virtio-mmio window at {0:#x} on the bus")]
    Bus(u64, #[source] BusError),
}

/// What the boot path takes from the device manager.
pub(crate) struct BootDevices {
    /// The MMIO bus with every virtio-mmio window on it, for the vCPUs.
    pub(crate) mmio_bus: Bus,
    /// The command-line entries of every window, space-separated.
    pub(crate) cmdline: String,
    /// The DSDT entries of every window.
    pub(crate) acpi: Vec<VirtioMmioDevice>,
    /// The boot-time devices' queue events, for the event loop.
    pub(crate) events: Vec<DeviceEvents>,
    /// The boot-time devices' counters.
    pub(crate) counters: Vec<NamedCounters>,
}

/// A device to hot-plug, its backend made by the thread that asks for it
/// (see [`prepare`]).
pub(crate) struct PreparedDevice {
    config: DeviceConfig,
    backend: Box<dyn VirtioBackend>,
    counters: NamedCounters,
}

/// Makes the backend `config` describes for [`DeviceManager::attach`]: on
/// the thread that asks, so that the event loop opens no file and binds
/// no socket (its seccomp filter allows neither).
pub(crate) fn prepare(config: &DeviceConfig) -> Result<PreparedDevice, DeviceManagerError> {
    let (backend, counters) = backend::create(config)?;
    Ok(PreparedDevice { config: config.clone(), backend, counters })
}

/// Where a hot-plugged device went, and its counters.
pub(crate) struct Plugged {
    /// Hotplug slot index.
    pub(crate) index: usize,
    /// Its window and IRQ.
    pub(crate) slot: MmioSlot,
    /// The device's counters.
    pub(crate) counters: NamedCounters,
}

/// A device in a hotplug slot: the events the loop watches for it.
struct PluggedDevice {
    /// What it is, for a snapshot.
    config: DeviceConfig,
    /// Whether the loop watches its events yet (a restored VM's devices
    /// are watched when the loop starts).
    watched: bool,
    queue_evts: Vec<EventFd>,
    /// The queue eventfds are a vhost-user daemon's to read, not the loop's.
    queues_elsewhere: bool,
    backend_fd: Option<RawFd>,
}

/// The devices of a running VM; see the module docs.
pub(crate) struct DeviceManager {
    /// The devices placed at boot, in slot order, for a snapshot (the
    /// event loop serves them through their `MmioQueueEvents`).
    boot: Vec<(DeviceConfig, Arc<Mutex<MmioTransport>>)>,
    /// One transport per hotplug slot, on the MMIO bus from boot.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    plugged: HotplugTable<PluggedDevice>,
    /// Counters of devices a restore put in hotplug slots, until the VM's
    /// counters take them.
    restored_counters: Vec<NamedCounters>,
}

/// Why saved devices could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreDevicesError {
    /// Making or placing a device failed.
    #[error(transparent)]
    Device(#[from] DeviceManagerError),
    /// A device's saved registers disagree with it.
    #[error("the saved state of the device in virtio-mmio slot {0} does not fit it")]
    Transport(usize, #[source] TransportStateError),
    /// More hotplug slots than windows.
    #[error("the snapshot has more hotplug slots than the layout has windows")]
    Slots,
}

impl DeviceManager {
    /// Places `configs` in the first slots, in order, then `hotplug_slots`
    /// empty ones; each gets its irqfd, and each device its ioeventfds.
    pub(crate) fn for_boot(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        configs: &[DeviceConfig],
        hotplug_slots: u8,
    ) -> Result<(Self, BootDevices), DeviceManagerError> {
        let mut slots = SlotAllocator::default();
        let mut mmio_bus = Bus::new();
        let mut events: Vec<DeviceEvents> = Vec::with_capacity(configs.len());
        let mut counters = Vec::with_capacity(configs.len());
        let mut transports = Vec::with_capacity(configs.len());
        for config in configs {
            let slot = slots.allocate()?;
            let (backend, named) = backend::create(config)?;
            let transport = new_transport(vm, mem, slot, &mut mmio_bus)?;
            let queue_evts = connect(vm, &transport, slot, backend)?;
            transports.push(transport.clone());
            events.push(Arc::new(Mutex::new(MmioQueueEvents::new(transport, queue_evts))));
            counters.push(named);
        }
        let mut manager = DeviceManager {
            boot: Vec::new(),
            transports: Vec::new(),
            plugged: HotplugTable::default(),
            restored_counters: Vec::new(),
        };
        for (config, transport) in configs.iter().zip(transports) {
            manager.boot.push((config.clone(), transport));
        }
        for _ in 0..hotplug_slots {
            let slot = slots.allocate()?;
            manager.transports.push(new_transport(vm, mem, slot, &mut mmio_bus)?);
            manager.plugged.reserve(slot);
        }
        let boot = BootDevices { mmio_bus, cmdline: slots.cmdline(), acpi: slots.acpi_devices(), events, counters };
        Ok((manager, boot))
    }

    /// Puts the `prepared` device in the first empty hotplug slot: its
    /// queues' ioeventfds go to KVM, its events to the loop behind `ops`.
    /// The guest then binds the slot's platform device again.
    pub(crate) fn attach(
        &mut self,
        vm: &VmFd,
        prepared: PreparedDevice,
        ops: &mut EventOps,
    ) -> Result<Plugged, DeviceManagerError> {
        let (index, slot) = self.plugged.first_free()?;
        let PreparedDevice { config, backend, counters } = prepared;
        let transport = &self.transports[index];
        let queue_evts = connect(vm, transport, slot, backend)?;
        let (queues_elsewhere, backend_fd) = {
            let t = lock(transport);
            (t.queues_served_elsewhere(), t.backend_fd())
        };
        let device = PluggedDevice { config, watched: true, queue_evts, queues_elsewhere, backend_fd };
        if let Err(e) = watch(ops, &device, hotplug_token(index, 0)) {
            disconnect(vm, transport, slot, &device.queue_evts);
            return Err(DeviceManagerError::Watch(slot.addr, e));
        }
        // Always fills: `first_free` found slot `index` empty, and only
        // this call fills slots.
        self.plugged.fill(index, device);
        Ok(Plugged { index, slot, counters })
    }

    /// Takes the device out of hotplug slot `index` (the guest unbound it
    /// first), leaving the slot empty for the next one.
    pub(crate) fn detach(&mut self, vm: &VmFd, index: usize, ops: &mut EventOps) -> Result<(), DeviceManagerError> {
        let (slot, device) = self.plugged.empty(index)?;
        unwatch(ops, &device);
        disconnect(vm, &self.transports[index], slot, &device.queue_evts);
        Ok(())
    }

    /// Serves an event with a hotplug token (at or above
    /// [`HOTPLUG_TOKEN_BASE`]); unknown tokens are ignored.
    pub(crate) fn process(&mut self, token: u32) {
        let Some(relative) = token.checked_sub(HOTPLUG_TOKEN_BASE) else { return };
        let index = (relative / TOKENS_PER_SLOT) as usize;
        let offset = relative % TOKENS_PER_SLOT;
        let (Some(device), Some(transport)) = (self.plugged.get(index), self.transports.get(index)) else { return };
        let wakeup = if offset == BACKEND_TOKEN_OFFSET {
            Wakeup::Backend
        } else {
            let Some(evt) = device.queue_evts.get(offset as usize) else { return };
            // Drain the counter; one pass serves every pending buffer.
            let _ = evt.read();
            Wakeup::Queue(offset as u16)
        };
        lock(transport).process(wakeup);
    }
}

impl DeviceManager {
    /// The devices of a snapshot's `slots` put back, in the same windows:
    /// the boot devices, then the hotplug slots (empty, or holding the
    /// device they held). Each backend is made anew from its saved
    /// configuration (`vsock_uds` replaces the vsock device's socket), and
    /// each transport gets its saved registers, checked against the device
    /// and `mem`. Nothing runs until [`DeviceManager::resume_restored`].
    pub(crate) fn for_restore(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        slots: &[SlotState],
        hotplug_slots: u8,
        vsock_uds: Option<&std::path::Path>,
    ) -> Result<(Self, BootDevices), RestoreDevicesError> {
        let boot_count = slots.len().checked_sub(usize::from(hotplug_slots)).ok_or(RestoreDevicesError::Slots)?;
        let config = |slot: &SlotState| {
            slot.device.clone().map(|mut device| {
                if let (DeviceConfig::Vsock(vsock), Some(path)) = (&mut device, vsock_uds) {
                    vsock.uds_path = path.to_path_buf();
                }
                device
            })
        };
        let boot_configs: Vec<DeviceConfig> = slots[..boot_count].iter().filter_map(config).collect();
        let (mut manager, boot) = Self::for_boot(vm, mem, &boot_configs, hotplug_slots)?;
        for (index, (saved, (_, transport))) in slots.iter().zip(&manager.boot).enumerate() {
            lock(transport).restore(&saved.transport).map_err(|e| RestoreDevicesError::Transport(index, e))?;
        }
        for (index, saved) in slots[boot_count..].iter().enumerate() {
            let Some(device) = config(saved) else { continue };
            let (_, slot) = manager.plugged.first_free().map_err(DeviceManagerError::from)?;
            let (backend, counters) = backend::create(&device).map_err(DeviceManagerError::from)?;
            let transport = &manager.transports[index];
            let queue_evts = connect(vm, transport, slot, backend)?;
            let (queues_elsewhere, backend_fd) = {
                let mut t = lock(transport);
                t.restore(&saved.transport).map_err(|e| RestoreDevicesError::Transport(boot_count + index, e))?;
                (t.queues_served_elsewhere(), t.backend_fd())
            };
            let plugged = PluggedDevice { config: device, watched: false, queue_evts, queues_elsewhere, backend_fd };
            manager.plugged.fill(index, plugged);
            manager.restored_counters.push(counters);
        }
        Ok((manager, boot))
    }

    /// How many hotplug slots the VM has.
    pub(crate) fn hotplug_slots(&self) -> u8 {
        self.transports.len() as u8
    }

    /// Every slot's device and registers, in slot order, for a snapshot.
    pub(crate) fn capture(&self) -> Vec<SlotState> {
        let boot = self.boot.iter().map(|(config, t)| (Some(config.clone()), t));
        let hotplug =
            self.transports.iter().enumerate().map(|(i, t)| (self.plugged.get(i).map(|d| d.config.clone()), t));
        boot.chain(hotplug).map(|(device, t)| SlotState { device, transport: lock(t).state() }).collect()
    }

    /// Lets every restored device go on (see `MmioTransport::resume_restored`).
    pub(crate) fn resume_restored(&self) {
        for transport in self.boot.iter().map(|(_, t)| t).chain(&self.transports) {
            lock(transport).resume_restored();
        }
    }

    /// Watches the events of the restored devices in hotplug slots, once
    /// the loop that serves them runs.
    pub(crate) fn watch_restored(&mut self, ops: &mut EventOps) -> Result<(), DeviceManagerError> {
        for index in 0..self.transports.len() {
            let Some(device) = self.plugged.get_mut(index) else { continue };
            if device.watched {
                continue;
            }
            if let Err(e) = watch(ops, device, hotplug_token(index, 0)) {
                let addr = self.plugged.slot(index).map_or(0, |s| s.addr);
                return Err(DeviceManagerError::Watch(addr, e));
            }
            device.watched = true;
        }
        Ok(())
    }

    /// The counters of restored hot-plugged devices, for the VM's stats.
    pub(crate) fn take_restored_counters(&mut self) -> Vec<NamedCounters> {
        std::mem::take(&mut self.restored_counters)
    }
}

fn hotplug_token(index: usize, offset: u32) -> u32 {
    HOTPLUG_TOKEN_BASE + index as u32 * TOKENS_PER_SLOT + offset
}

/// An empty transport in `slot`: its interrupt connected to KVM, its
/// window on the bus.
fn new_transport(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    slot: MmioSlot,
    bus: &mut Bus,
) -> Result<Arc<Mutex<MmioTransport>>, DeviceManagerError> {
    let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceManagerError::EventFd(slot.irq, e))?;
    vm.register_irqfd(&irq_evt, slot.irq).map_err(|e| DeviceManagerError::Irqfd(slot.irq, e))?;
    let transport = Arc::new(Mutex::new(MmioTransport::empty(mem.clone(), Arc::new(MmioInterrupt::new(irq_evt)))));
    bus.insert(transport.clone(), slot.addr, VIRTIO_MMIO_SIZE).map_err(|e| DeviceManagerError::Bus(slot.addr, e))?;
    Ok(transport)
}

/// Puts `backend` in `transport` and registers one ioeventfd per queue on
/// the notify register; on failure leaves the transport empty again.
fn connect(
    vm: &VmFd,
    transport: &Mutex<MmioTransport>,
    slot: MmioSlot,
    backend: Box<dyn VirtioBackend>,
) -> Result<Vec<EventFd>, DeviceManagerError> {
    let queue_evts = lock(transport).attach(backend).map_err(DeviceManagerError::Transport)?;
    let notify = IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET);
    for (queue, evt) in queue_evts.iter().enumerate() {
        if let Err(source) = vm.register_ioevent(evt, &notify, queue as u32) {
            disconnect(vm, transport, slot, &queue_evts[..queue]);
            return Err(DeviceManagerError::Ioeventfd { queue, addr: slot.addr, source });
        }
    }
    Ok(queue_evts)
}

/// Undoes [`connect`] for the queues in `queue_evts`.
fn disconnect(vm: &VmFd, transport: &Mutex<MmioTransport>, slot: MmioSlot, queue_evts: &[EventFd]) {
    let notify = IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET);
    for (queue, evt) in queue_evts.iter().enumerate() {
        // Nothing more to undo if KVM no longer has it.
        let _ = vm.unregister_ioevent(evt, &notify, queue as u32);
    }
    lock(transport).detach();
}

/// Adds a hot-plugged device's queue events and backend fd to the loop,
/// tokens from `base`; on failure removes what it added.
fn watch(ops: &mut EventOps, device: &PluggedDevice, base: u32) -> Result<(), event_manager::Error> {
    let watched = if device.queues_elsewhere { &device.queue_evts[..0] } else { &device.queue_evts[..] };
    let queues = watched.iter().enumerate();
    let mut events: Vec<Events> =
        queues.map(|(queue, evt)| Events::with_data(evt, base + queue as u32, EventSet::IN)).collect();
    if let Some(fd) = device.backend_fd {
        events.push(Events::with_data_raw(fd, base + BACKEND_TOKEN_OFFSET, EventSet::IN));
    }
    for (added, event) in events.iter().enumerate() {
        if let Err(e) = ops.add(*event) {
            for done in &events[..added] {
                let _ = ops.remove(*done);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Removes a hot-plugged device's events from the loop.
fn unwatch(ops: &mut EventOps, device: &PluggedDevice) {
    for evt in &device.queue_evts {
        // An event the loop does not hold needs no removal.
        let _ = ops.remove(Events::empty(evt));
    }
    if let Some(fd) = device.backend_fd {
        let _ = ops.remove(Events::empty_raw(fd));
    }
}

fn lock(transport: &Mutex<MmioTransport>) -> MutexGuard<'_, MmioTransport> {
    transport.lock().unwrap_or_else(|p| p.into_inner())
}
