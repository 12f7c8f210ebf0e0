//! The VMM's event loop thread: control requests from the embedder, the
//! guest's reset line, and vCPUs ending the VM, each an EventFd with a
//! named token.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::Wakeup;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::config::DeviceConfig;
use crate::control::{Request, VmmAction, VmmActionError, VmmData};
use crate::stats::VmCounters;
use crate::vcpu::{ExitReason, VcpuSet};

/// A control request is queued.
const TOKEN_CONTROL: u32 = 1;
/// The i8042 pulsed the reset line.
const TOKEN_RESET: u32 = 2;
/// A vCPU ended the VM (shutdown, reset event, error).
const TOKEN_VCPU_EXIT: u32 = 3;
/// Tokens of hot-plugged devices start here: slot * 64 + queue, and
/// slot * 64 + 63 for the backend's own fd.
const TOKEN_HOTPLUG_BASE: u32 = 1 << 16;
const TOKENS_PER_SLOT: u32 = 64;
const BACKEND_TOKEN_OFFSET: u32 = TOKENS_PER_SLOT - 1;

/// A virtio-mmio slot reserved at boot for devices attached later.
pub(crate) struct HotplugSlot {
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    pub(crate) addr: u64,
    pub(crate) irq: u32,
    /// The queue eventfds of the device attached now, if any.
    pub(crate) queue_evts: Vec<EventFd>,
    pub(crate) backend_fd: Option<std::os::fd::RawFd>,
}

/// Everything the running VM owns. Dropping it stops the vCPUs, then
/// closes the VM.
pub(crate) struct Runtime {
    pub(crate) wake: EventFd,
    pub(crate) requests: Receiver<Request>,
    pub(crate) reset_evt: EventFd,
    pub(crate) vcpu_exit_evt: EventFd,
    pub(crate) vcpus: VcpuSet,
    pub(crate) counters: Arc<VmCounters>,
    pub(crate) exit: Option<ExitReason>,
    pub(crate) hotplug: Vec<HotplugSlot>,
    /// Declared last: dropped after the vCPU threads have stopped.
    pub(crate) vm: VmFd,
}

impl Runtime {
    fn end(&mut self, reason: ExitReason) {
        if self.exit.is_none() {
            info!(?reason, "VM ending");
            self.vcpus.stop();
            self.exit = Some(reason);
        }
    }

    fn handle(&mut self, action: VmmAction, ops: &mut EventOps) -> Result<VmmData, VmmActionError> {
        if self.exit.is_some() {
            return Err(VmmActionError::NotRunning);
        }
        match action {
            VmmAction::Pause => self.vcpus.pause().map_err(VmmActionError::Pause)?,
            VmmAction::Resume => self.vcpus.resume(),
            VmmAction::Stop => self.end(ExitReason::Stopped),
            VmmAction::GetStats => return Ok(VmmData::Stats(self.counters.snapshot())),
            VmmAction::AttachDevice(config) => return self.attach(&config, ops),
            VmmAction::DetachDevice(slot) => self.detach(slot, ops)?,
        }
        Ok(VmmData::Empty)
    }

    /// Puts a new device in the first empty hotplug slot: its queues'
    /// ioeventfds go to KVM, its events to this loop. The guest then binds
    /// the slot's platform device again to probe it.
    fn attach(&mut self, config: &DeviceConfig, ops: &mut EventOps) -> Result<VmmData, VmmActionError> {
        let index = self
            .hotplug
            .iter()
            .position(|s| s.queue_evts.is_empty() && lock_transport(&s.transport).device_id() == 0)
            .ok_or(VmmActionError::NoFreeSlot)?;
        let (backend, counters) =
            crate::builder::create_backend(config).map_err(|e| VmmActionError::Attach(error_chain(&e)))?;
        let slot = &mut self.hotplug[index];
        let evts =
            lock_transport(&slot.transport).attach(backend).map_err(|e| VmmActionError::Attach(e.to_string()))?;
        let notify = IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET);
        let base = TOKEN_HOTPLUG_BASE + index as u32 * TOKENS_PER_SLOT;
        for (queue, evt) in evts.iter().enumerate() {
            let registered =
                self.vm.register_ioevent(evt, &notify, queue as u32).map_err(|e| e.to_string()).and_then(|()| {
                    ops.add(Events::with_data(evt, base + queue as u32, EventSet::IN)).map_err(|e| format!("{e:?}"))
                });
            if let Err(e) = registered {
                lock_transport(&slot.transport).detach();
                return Err(VmmActionError::Attach(format!("cannot watch queue {queue}: {e}")));
            }
        }
        slot.backend_fd = lock_transport(&slot.transport).backend_fd();
        if let Some(fd) = slot.backend_fd {
            let _ = ops.add(Events::with_data_raw(fd, base + BACKEND_TOKEN_OFFSET, EventSet::IN));
        }
        slot.queue_evts = evts;
        self.counters.devices.lock().unwrap_or_else(|p| p.into_inner()).push(counters);
        Ok(VmmData::Attached { slot: index, addr: slot.addr, irq: slot.irq })
    }

    /// Takes the device out of hotplug slot `index` (the guest must have
    /// unbound it first).
    fn detach(&mut self, index: usize, ops: &mut EventOps) -> Result<(), VmmActionError> {
        let slot = self.hotplug.get_mut(index).ok_or(VmmActionError::NoSuchSlot(index))?;
        if slot.queue_evts.is_empty() {
            return Err(VmmActionError::NoSuchSlot(index));
        }
        let notify = IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET);
        for (queue, evt) in slot.queue_evts.drain(..).enumerate() {
            let _ = ops.remove(Events::empty(&evt));
            let _ = self.vm.unregister_ioevent(&evt, &notify, queue as u32);
        }
        if let Some(fd) = slot.backend_fd.take() {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        lock_transport(&slot.transport).detach();
        Ok(())
    }

    fn process_hotplug(&mut self, token: u32) {
        let index = ((token - TOKEN_HOTPLUG_BASE) / TOKENS_PER_SLOT) as usize;
        let offset = (token - TOKEN_HOTPLUG_BASE) % TOKENS_PER_SLOT;
        let Some(slot) = self.hotplug.get(index) else { return };
        let wakeup = if offset == BACKEND_TOKEN_OFFSET {
            Wakeup::Backend
        } else {
            match slot.queue_evts.get(offset as usize) {
                Some(evt) => {
                    let _ = evt.read();
                    Wakeup::Queue(offset as u16)
                }
                None => return,
            }
        };
        lock_transport(&slot.transport).process(wakeup);
    }
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

fn lock_transport(t: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl MutEventSubscriber for Runtime {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_CONTROL => {
                // Drain the counter; the channel says how many requests.
                let _ = self.wake.read();
                while let Ok(request) = self.requests.try_recv() {
                    let answer = self.handle(request.action, ops);
                    // The requester may have given up waiting; that is fine.
                    let _ = request.reply.send(answer);
                }
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                self.end(ExitReason::Reset);
            }
            TOKEN_VCPU_EXIT => {
                let _ = self.vcpu_exit_evt.read();
                let reason = self
                    .vcpus
                    .exit_reason()
                    .unwrap_or_else(|| ExitReason::Error("a vCPU stopped without a reason".into()));
                self.end(reason);
            }
            token if token >= TOKEN_HOTPLUG_BASE => self.process_hotplug(token),
            other => warn!(token = other, "event with an unknown token"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            Events::with_data(&self.wake, TOKEN_CONTROL, EventSet::IN),
            Events::with_data(&self.reset_evt, TOKEN_RESET, EventSet::IN),
            Events::with_data(&self.vcpu_exit_evt, TOKEN_VCPU_EXIT, EventSet::IN),
        ];
        for event in events {
            if let Err(e) = ops.add(event) {
                // Without its events the VM could never be stopped: end now.
                let token = event.data();
                self.end(ExitReason::Error(format!("cannot watch VMM event {token}: {e:?}")));
            }
        }
    }
}

fn lock(runtime: &Mutex<Runtime>) -> std::sync::MutexGuard<'_, Runtime> {
    runtime.lock().unwrap_or_else(|p| p.into_inner())
}

/// A subscriber the event loop serves besides the runtime (device queues).
pub(crate) type DeviceEvents = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs the loop until the VM ends; returns why it ended.
pub(crate) fn run(runtime: Runtime, devices: Vec<DeviceEvents>, seccomp: bool) -> ExitReason {
    let mut manager = match EventManager::<DeviceEvents>::new() {
        Ok(m) => m,
        Err(e) => return ExitReason::Error(format!("cannot create the event loop: {e:?}")),
    };
    let runtime = Arc::new(Mutex::new(runtime));
    manager.add_subscriber(runtime.clone());
    for device in devices {
        manager.add_subscriber(device);
    }
    if seccomp {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::EventLoop) {
            lock(&runtime).end(ExitReason::Error(e.to_string()));
        }
    }
    loop {
        if let Some(reason) = lock(&runtime).exit.clone() {
            return reason;
        }
        if let Err(e) = manager.run() {
            lock(&runtime).end(ExitReason::Error(format!("event loop failed: {e:?}")));
        }
    }
}
