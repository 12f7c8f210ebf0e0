//! vCPUs: their boot-time configuration, the thread that runs each one, and
//! how the VMM pauses, resumes and stops them.
//!
//! Each vCPU thread loops on KVM_RUN and handles PIO/MMIO exits itself,
//! through the shared buses. To get a thread out of KVM_RUN, the VMM sends
//! it a signal whose handler sets `immediate_exit` in that vCPU's `kvm_run`
//! page, so a signal that arrives just before KVM_RUN is not lost.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{fence, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use boot::EntryPoint;
use devices::legacy::{ConsolePending, SerialConsole, COM1_PORT};
use devices::Bus;
use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitReason, VmError};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::kvm_state::{StateError, VcpuState};
use crate::stats::{ExitKind, VcpuCounters};

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// An ioctl configuring the vCPU failed.
    #[error("cannot configure vCPU {index}: {what} failed")]
    Configure {
        /// vCPU index.
        index: u8,
        /// What was being set.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("cannot configure vCPU {index}: KVM accepted {accepted} of {total} boot MSRs (refused MSR {refused:#x})")]
    MsrsRefused {
        /// vCPU index.
        index: u8,
        /// How many were set.
        accepted: usize,
        /// How many were given.
        total: usize,
        /// The first one refused.
        refused: u32,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the thread for vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
}

/// Why the vCPUs' state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The vCPUs are running: a snapshot needs them paused.
    #[error("the VM is not paused: pause it before a snapshot")]
    NotPaused,
    /// A vCPU did not answer in time.
    #[error("vCPU {0} did not give its state within {secs} s", secs = PAUSE_TIMEOUT.as_secs())]
    Timeout(usize),
    /// KVM could not give a vCPU's state.
    #[error("cannot read the state of vCPU {0}")]
    State(usize, #[source] StateError),
}

/// Why the vCPUs could not all be paused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    /// Some vCPUs did not park in time.
    #[error("only {paused} of {total} vCPUs paused within {} s", PAUSE_TIMEOUT.as_secs())]
    Timeout {
        /// How many parked.
        paused: usize,
        /// How many are running.
        total: usize,
    },
}

/// How long a pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Configures vCPU `index` of `count` for boot: CPUID, MSRs, local APIC
/// interrupt pins, and for the boot vCPU the entry register state.
pub fn configure(
    fd: &VcpuFd,
    index: u8,
    count: u8,
    supported_cpuid: &[kvm_cpuid_entry2],
    entry: EntryPoint,
) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Configure { index, what, source };
    let table = boot::cpuid::vcpu_cpuid(supported_cpuid, index, count);
    let cpuid = CpuId::from_entries(&table).map_err(|_| VcpuError::Configure {
        index,
        what: "building the CPUID table",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = boot::msr::BOOT_MSRS
        .iter()
        .map(|(index, data)| kvm_msr_entry { index: *index, data: *data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Configure {
        index,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let accepted = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if accepted != entries.len() {
        return Err(VcpuError::MsrsRefused { index, accepted, total: entries.len(), refused: entries[accepted].index });
    }

    // LINT0 delivers the legacy PIC's interrupts, LINT1 NMIs, as firmware
    // leaves them on a PC.
    let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: Vec<u8> = reg.iter().map(|b| *b as u8).collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

    // The FPU needs nothing: KVM creates vCPUs with the x87 control word and
    // MXCSR of a reset processor (0x37f, 0x1f80).

    if index == 0 {
        fd.set_regs(&boot::cpu_state::boot_regs(entry)).map_err(err("KVM_SET_REGS"))?;
        let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        boot::cpu_state::boot_sregs(entry, &mut sregs);
        fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
    }
    Ok(())
}

/// What the VMM wants the vCPU threads to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Desired {
    Run = 0,
    Pause = 1,
    Exit = 2,
}

/// What the vCPU threads report to the VMM, under one lock.
#[derive(Default)]
struct Counts {
    /// Threads parked.
    parked: usize,
    /// Threads still alive.
    alive: usize,
    /// Bumped to ask every parked thread for its vCPU's state.
    save_round: u64,
    /// Each vCPU's answer to the current round, by index.
    saved: Vec<Option<Result<VcpuState, StateError>>>,
}

/// Shared between the VMM and its vCPU threads.
struct Control {
    desired: AtomicU8,
    counts: Mutex<Counts>,
    changed: Condvar,
    /// The first reason a vCPU gave for the VM to end.
    exit: Mutex<Option<ExitReason>>,
    /// Written when a vCPU ends the VM, to wake the event loop.
    exit_evt: EventFd,
}

impl Control {
    fn desired(&self) -> Desired {
        match self.desired.load(Ordering::Acquire) {
            0 => Desired::Run,
            1 => Desired::Pause,
            _ => Desired::Exit,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks the calling vCPU thread (vCPU `index`) while the VMM wants it
    /// paused, answering each request for its state with `save`.
    fn park(&self, index: usize, save: &mut dyn FnMut() -> Result<VcpuState, StateError>) {
        let mut counts = self.counts();
        counts.parked += 1;
        let mut answered = counts.save_round;
        self.changed.notify_all();
        while self.desired() == Desired::Pause {
            if counts.save_round != answered {
                answered = counts.save_round;
                drop(counts);
                let state = save();
                counts = self.counts();
                if let Some(slot) = counts.saved.get_mut(index) {
                    *slot = Some(state);
                }
                self.changed.notify_all();
                continue;
            }
            counts = self.changed.wait(counts).unwrap_or_else(|p| p.into_inner());
        }
        counts.parked -= 1;
        self.changed.notify_all();
    }

    /// Records why the VM ends (first reason wins) and wakes the event loop.
    fn end_vm(&self, reason: ExitReason) {
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if exit.is_none() {
            *exit = Some(reason);
        }
        drop(exit);
        // If this fails the event loop is gone and the VM is ending anyway.
        let _ = self.exit_evt.write(1);
    }
}

/// The running vCPU threads.
pub struct VcpuSet {
    threads: Vec<JoinHandle<()>>,
    control: Arc<Control>,
}

thread_local! {
    /// This thread's vCPU `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_num: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while
        // its VcpuFd is alive and cleared before it is dropped; the signal
        // runs on this same thread, so the mapping is live.
        unsafe { (*run).immediate_exit = 1 };
    }
    fence(Ordering::Release);
}

fn kick_signal() -> c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::KickHandler);
    });
    result
}

/// Everything a vCPU thread needs.
pub struct VcpuThreadConfig {
    /// Install the vCPU seccomp filter first.
    pub seccomp: bool,
    /// The port I/O bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// The serial console, whose held output a vCPU writes out at its next
    /// exit that is not the console's own.
    pub console: Option<ConsoleFlush>,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Arc<[u32]>,
    /// Start the vCPUs paused (a restored VM the caller resumes).
    pub paused: bool,
}

/// The serial console's held output (see `devices::legacy::ConsolePending`)
/// and the device that holds it.
#[derive(Clone)]
pub struct ConsoleFlush {
    /// The UART.
    pub device: Arc<Mutex<SerialConsole>>,
    /// Whether it holds output.
    pub pending: Arc<ConsolePending>,
}

impl ConsoleFlush {
    /// Writes out what the console holds, if anything.
    pub fn flush(&self) {
        if self.pending.is_set() {
            self.device.lock().unwrap_or_else(|p| p.into_inner()).flush_output();
        }
    }
}

/// COM1's eight registers: the exits that make console output, which do
/// not flush it.
fn is_console_port(port: u16) -> bool {
    (COM1_PORT..COM1_PORT + 8).contains(&u64::from(port))
}

impl VcpuSet {
    /// Starts one thread per vCPU, in index order (the boot vCPU first).
    pub fn start(
        vcpus: Vec<(VcpuFd, Arc<VcpuCounters>)>,
        config: &VcpuThreadConfig,
        exit_evt: EventFd,
    ) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let desired = if config.paused { Desired::Pause } else { Desired::Run };
        let control = Arc::new(Control {
            desired: AtomicU8::new(desired as u8),
            counts: Mutex::new(Counts { alive: vcpus.len(), ..Counts::default() }),
            changed: Condvar::new(),
            exit: Mutex::new(None),
            exit_evt,
        });
        let total = vcpus.len();
        let mut set = VcpuSet { threads: Vec::with_capacity(total), control };
        for (index, (fd, counters)) in vcpus.into_iter().enumerate() {
            let index = index as u8;
            let control = set.control.clone();
            let pio = config.pio.clone();
            let mmio = config.mmio.clone();
            let console = config.console.clone();
            let msr_indices = config.msr_indices.clone();
            let seccomp = config.seccomp;
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let control2 = control.clone();
                    let mut vcpu = Vcpu { fd, index, counters, pio, mmio, console, control: control2, msr_indices };
                    vcpu.run(seccomp);
                    let mut counts = control.counts();
                    counts.alive -= 1;
                    control.changed.notify_all();
                })
                .map_err(|e| VcpuError::Spawn(index, e));
            match thread {
                Ok(t) => set.threads.push(t),
                Err(e) => {
                    // The threads never started will not count themselves
                    // out; stop the ones running before reporting.
                    set.control.counts().alive -= total - usize::from(index);
                    set.stop();
                    return Err(e);
                }
            }
        }
        Ok(set)
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // A thread that already ended cannot be kicked and needs no kick.
            let _ = t.kill(kick_signal());
        }
    }

    /// Pauses every vCPU: returns once each is out of KVM_RUN and parked.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.control.desired.store(Desired::Pause as u8, Ordering::Release);
        self.kick_all();
        let mut counts = self.control.counts();
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        while counts.parked < counts.alive {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(PauseError::Timeout { paused: counts.parked, total: counts.alive });
            }
            counts = self.control.changed.wait_timeout(counts, left).unwrap_or_else(|p| p.into_inner()).0;
            // A kick can land between the check and KVM_RUN; kick again.
            drop(counts);
            self.kick_all();
            counts = self.control.counts();
        }
        Ok(())
    }

    /// Every vCPU's state, in index order. The vCPUs must be paused (see
    /// [`VcpuSet::pause`]); each parked thread reads its own vCPU.
    pub fn save(&self) -> Result<Vec<VcpuState>, SaveError> {
        let total = self.threads.len();
        let mut counts = self.control.counts();
        if self.control.desired() != Desired::Pause || counts.parked < total || counts.alive < total {
            return Err(SaveError::NotPaused);
        }
        counts.saved = (0..total).map(|_| None).collect();
        counts.save_round += 1;
        self.control.changed.notify_all();
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        while let Some(missing) = counts.saved.iter().position(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(SaveError::Timeout(missing));
            }
            counts = self.control.changed.wait_timeout(counts, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        let saved = std::mem::take(&mut counts.saved);
        saved
            .into_iter()
            .enumerate()
            .map(|(index, state)| match state {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(SaveError::State(index, e)),
                None => Err(SaveError::Timeout(index)),
            })
            .collect()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let _counts = self.control.counts();
        self.control.desired.store(Desired::Run as u8, Ordering::Release);
        self.control.changed.notify_all();
    }

    /// Stops every vCPU thread and waits for them.
    pub fn stop(&mut self) {
        {
            let _counts = self.control.counts();
            self.control.desired.store(Desired::Exit as u8, Ordering::Release);
            self.control.changed.notify_all();
        }
        self.kick_all();
        for t in self.threads.drain(..) {
            // A vCPU thread that panicked has nothing more to clean up.
            let _ = t.join();
        }
    }

    /// Why a vCPU ended the VM, if one did.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.control.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

struct Vcpu {
    fd: VcpuFd,
    index: u8,
    counters: Arc<VcpuCounters>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    console: Option<ConsoleFlush>,
    control: Arc<Control>,
    msr_indices: Arc<[u32]>,
}

impl Vcpu {
    fn run(&mut self, seccomp: bool) {
        if seccomp {
            if let Err(e) = seccomp::install(ThreadKind::Vcpu) {
                self.control.end_vm(ExitReason::Error(VmError::VcpuSeccomp(self.index, e.into())));
                return;
            }
        }
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run()));
        let flush = |console: &Option<ConsoleFlush>| console.iter().for_each(ConsoleFlush::flush);
        loop {
            match self.control.desired() {
                Desired::Run => {}
                Desired::Pause => {
                    flush(&self.console);
                    let control = self.control.clone();
                    control.park(usize::from(self.index), &mut || self.capture());
                    continue;
                }
                Desired::Exit => break,
            }
            let (reason, console_exit) = self.run_once();
            if !console_exit {
                flush(&self.console);
            }
            if let Some(reason) = reason {
                self.control.end_vm(reason);
                break;
            }
        }
        flush(&self.console);
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// This vCPU's state, for a snapshot. KVM finishes an instruction
    /// that exited to us (a port read's value goes into RAX) only at the
    /// next KVM_RUN; one with `immediate_exit` set does just that and
    /// returns, so the state read after it is whole.
    fn capture(&mut self) -> Result<VcpuState, StateError> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Ok(()) => {}
            Err(e) => return Err(StateError::Kvm("KVM_RUN (completing the last exit)", e)),
        }
        VcpuState::capture(&self.fd, &self.msr_indices)
    }

    /// Runs the guest until one exit and handles it: Some(reason) when the
    /// exit ends the VM, and whether it was the console's own.
    fn run_once(&mut self) -> (Option<ExitReason>, bool) {
        let count = |kind| self.counters.count(kind);
        let ends = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count(ExitKind::IoIn);
                self.pio.read(u64::from(port), data);
                return (None, is_console_port(port));
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count(ExitKind::IoOut);
                self.pio.write(u64::from(port), data);
                return (None, is_console_port(port));
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(ExitKind::MmioRead);
                self.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(ExitKind::MmioWrite);
                self.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip KVM handles HLT itself; one that
                // reaches us means the guest can never be woken.
                count(ExitKind::Hlt);
                Some(ExitReason::Shutdown)
            }
            Ok(VcpuExit::Shutdown) => {
                count(ExitKind::Shutdown);
                Some(ExitReason::Shutdown)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                count(ExitKind::Shutdown);
                Some(if kind == KVM_SYSTEM_EVENT_RESET { ExitReason::Reset } else { ExitReason::Shutdown })
            }
            Ok(VcpuExit::Intr) => {
                count(ExitKind::Interrupted);
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                count(ExitKind::Other);
                Some(ExitReason::Error(VmError::FailEntry { vcpu: self.index, reason, cpu }))
            }
            Ok(VcpuExit::InternalError) => {
                count(ExitKind::Other);
                Some(ExitReason::Error(VmError::Internal(self.index)))
            }
            Ok(other) => {
                count(ExitKind::Other);
                Some(ExitReason::Error(VmError::UnexpectedExit { vcpu: self.index, exit: format!("{other:?}") }))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(ExitKind::Interrupted);
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(ExitReason::Error(VmError::Run(self.index, e))),
        };
        (ends, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_timeout_says_how_many_vcpus_parked() {
        let e = PauseError::Timeout { paused: 1, total: 2 };
        assert_eq!(e.to_string(), "only 1 of 2 vCPUs paused within 5 s");
    }
}
