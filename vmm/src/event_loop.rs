//! The VMM's event loop thread: control requests from the embedder, the
//! guest's reset line, and vCPUs ending the VM, each an EventFd with a
//! named token.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{Reply, Request, VmmAction, VmmActionError, VmmData};
use crate::config::DeviceConfig;
use crate::device_manager::{DeviceEvents, DeviceManager, DeviceManagerError, PreparedDevice, HOTPLUG_TOKEN_BASE};
use crate::exit::{ExitReason, SharedError, VmError};
use crate::snapshot::file::{new_id, Captured, SnapshotError};
use crate::snapshot::format::Description;
use crate::snapshot::kvm_state::VmState;
use crate::stats::VmCounters;
use crate::vcpu::{ConsoleFlush, VcpuSet};

/// A control request is queued.
const TOKEN_CONTROL: u32 = 1;
/// The i8042 pulsed the reset line.
const TOKEN_RESET: u32 = 2;
/// A vCPU ended the VM (shutdown, reset event, error).
const TOKEN_VCPU_EXIT: u32 = 3;
/// The console started holding output.
const TOKEN_CONSOLE: u32 = 4;

/// How long console output may be held when no vCPU exit writes it out (a
/// prompt without a newline, the guest then idle in the kernel's HLT).
pub(crate) const CONSOLE_DELAY: std::time::Duration = std::time::Duration::from_millis(5);
// Tokens from HOTPLUG_TOKEN_BASE up belong to hot-plugged devices.

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
    /// The hotplug slots and what they hold.
    pub(crate) devices: DeviceManager,
    /// Written when the console starts holding output.
    pub(crate) console_evt: EventFd,
    /// The console, to write out what it holds.
    pub(crate) console: ConsoleFlush,
    /// When held console output is to be written out at the latest.
    pub(crate) console_deadline: Option<std::time::Instant>,
    /// Declared last: dropped after the vCPU threads have stopped.
    pub(crate) vm: VmFd,
}

impl Runtime {
    fn end(&mut self, reason: ExitReason) {
        if self.exit.is_none() {
            info!(?reason, "VM ending");
            self.vcpus.stop();
            self.console.flush();
            self.exit = Some(reason);
        }
    }

    /// Milliseconds until held console output is due (-1: none held).
    fn console_timeout(&self) -> i32 {
        match self.console_deadline {
            // Rounded up: a timeout of 0 ms short of the deadline would spin.
            Some(due) => {
                due.saturating_duration_since(std::time::Instant::now()).as_micros().div_ceil(1000).min(1000) as i32
            }
            None => -1,
        }
    }

    /// Writes out held console output that is due.
    fn console_due(&mut self) {
        if self.console_deadline.is_some_and(|due| due <= std::time::Instant::now()) {
            self.console_deadline = None;
            self.console.flush();
        }
    }

    /// Reads the paused VM's whole state for a snapshot.
    fn capture(&self) -> Result<Captured, SnapshotError> {
        let vcpus = self.vcpus.save()?;
        let vm = VmState::capture(&self.vm)?;
        let serial = self.console.device.lock().unwrap_or_else(|p| p.into_inner()).state();
        let slots = self.devices.capture();
        let hotplug_slots = self.devices.hotplug_slots();
        if let Some(index) = slots.iter().position(|s| matches!(s.device, Some(DeviceConfig::VhostUser(_)))) {
            return Err(SnapshotError::Device(index, "a vhost-user device's state is its daemon's"));
        }
        let description =
            Description { id: new_id(), mem_size: self.counters.mem_size, vcpus, vm, serial, slots, hotplug_slots };
        Ok(Captured { description, mem: self.counters.mem.clone() })
    }

    fn handle(&mut self, action: VmmAction, prepared: Option<PreparedDevice>, ops: &mut EventOps) -> Reply {
        if self.exit.is_some() {
            return Err(VmmActionError::NotRunning).into();
        }
        if matches!(action, VmmAction::Snapshot(_)) {
            return match self.capture() {
                Ok(captured) => Reply { result: Ok(VmmData::Empty), captured: Some(Box::new(captured)) },
                Err(e) => Err(VmmActionError::Snapshot(e)).into(),
            };
        }
        self.handle_other(action, prepared, ops).into()
    }

    fn handle_other(
        &mut self,
        action: VmmAction,
        prepared: Option<PreparedDevice>,
        ops: &mut EventOps,
    ) -> Result<VmmData, VmmActionError> {
        match action {
            VmmAction::Pause => self.vcpus.pause().map_err(VmmActionError::Pause)?,
            VmmAction::Resume => self.vcpus.resume(),
            VmmAction::Stop => self.end(ExitReason::Stopped),
            VmmAction::GetStats => return Ok(VmmData::Stats(self.counters.snapshot())),
            VmmAction::AttachDevice(_) => {
                // The handle made the backend on its own thread (see `Request`).
                let prepared = prepared.ok_or(VmmActionError::Attach(DeviceManagerError::NotPrepared))?;
                let plugged = self.devices.attach(&self.vm, prepared, ops).map_err(VmmActionError::Attach)?;
                self.counters.devices.lock().unwrap_or_else(|p| p.into_inner()).push(plugged.counters);
                let (addr, irq) = (plugged.slot.addr, plugged.slot.irq);
                return Ok(VmmData::Attached { slot: plugged.index, addr, irq });
            }
            VmmAction::DetachDevice(slot) => {
                self.devices.detach(&self.vm, slot, ops).map_err(VmmActionError::Detach)?
            }
            // Answered by `handle`.
            VmmAction::Snapshot(_) => {}
        }
        Ok(VmmData::Empty)
    }
}

impl MutEventSubscriber for Runtime {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_CONTROL => {
                // Drain the counter; the channel says how many requests.
                let _ = self.wake.read();
                while let Ok(request) = self.requests.try_recv() {
                    let answer = self.handle(request.action, request.prepared, ops);
                    // The requester may have given up waiting; that is fine.
                    let _ = request.reply.send(answer);
                }
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                self.end(ExitReason::Reset);
            }
            TOKEN_CONSOLE => {
                let _ = self.console_evt.read();
                if self.console_deadline.is_none() {
                    self.console_deadline = Some(std::time::Instant::now() + CONSOLE_DELAY);
                }
            }
            TOKEN_VCPU_EXIT => {
                let _ = self.vcpu_exit_evt.read();
                let reason = self.vcpus.exit_reason().unwrap_or(ExitReason::Error(VmError::NoReason));
                self.end(reason);
            }
            token if token >= HOTPLUG_TOKEN_BASE => self.devices.process(token),
            other => warn!(token = other, "event with an unknown token"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            Events::with_data(&self.wake, TOKEN_CONTROL, EventSet::IN),
            Events::with_data(&self.reset_evt, TOKEN_RESET, EventSet::IN),
            Events::with_data(&self.vcpu_exit_evt, TOKEN_VCPU_EXIT, EventSet::IN),
            Events::with_data(&self.console_evt, TOKEN_CONSOLE, EventSet::IN),
        ];
        for event in events {
            if let Err(e) = ops.add(event) {
                // Without its events the VM could never be stopped: end now.
                let token = event.data();
                self.end(ExitReason::Error(VmError::Watch(token, Arc::new(e))));
            }
        }
        // A restored VM's devices in hotplug slots.
        if let Err(e) = self.devices.watch_restored(ops) {
            self.end(ExitReason::Error(VmError::RestoredDevice(SharedError::new(e))));
        }
    }
}

fn lock(runtime: &Mutex<Runtime>) -> std::sync::MutexGuard<'_, Runtime> {
    runtime.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the loop until the VM ends; returns why it ended.
pub(crate) fn run(runtime: Runtime, devices: Vec<DeviceEvents>, seccomp: bool) -> ExitReason {
    let mut manager = match EventManager::<DeviceEvents>::new() {
        Ok(m) => m,
        Err(e) => return ExitReason::Error(VmError::EventLoopCreate(Arc::new(e))),
    };
    let runtime = Arc::new(Mutex::new(runtime));
    manager.add_subscriber(runtime.clone());
    for device in devices {
        manager.add_subscriber(device);
    }
    if seccomp {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::EventLoop) {
            lock(&runtime).end(ExitReason::Error(VmError::EventLoopSeccomp(e.into())));
        }
    }
    loop {
        let timeout = {
            let mut runtime = lock(&runtime);
            if let Some(reason) = runtime.exit.clone() {
                return reason;
            }
            runtime.console_due();
            runtime.console_timeout()
        };
        if let Err(e) = manager.run_with_timeout(timeout) {
            lock(&runtime).end(ExitReason::Error(VmError::EventLoop(Arc::new(e))));
        }
    }
}
