//! Building and starting a microVM, top to bottom: KVM, VM, memory, kernel,
//! devices, vCPUs, threads.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

use boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use devices::legacy::{
    BootTimer, EventFdTrigger, SerialConsole, SerialRegisters, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT, I8042,
    I8042_PORT_DATA,
};
use devices::Bus;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use tracing::info_span;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::RestoreConfig;
use crate::config::{ConfigError, ConsoleOutput, VmResources};
use crate::device_manager::{BootDevices, DeviceManager, DeviceManagerError};
use crate::event_loop::{self, Runtime};
use crate::handle::VmmHandle;
use crate::snapshot::format::Description;
use crate::snapshot::kvm_state::StateError;
use crate::stats::{VcpuCounters, VmCounters};
use crate::vcpu::{self, ConsoleFlush, VcpuSet, VcpuThreadConfig};

/// Why a VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The kernel file could not be opened.
    #[error("cannot open the kernel image {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The initrd file could not be opened.
    #[error("cannot open the initrd {0}")]
    OpenInitrd(PathBuf, #[source] std::io::Error),
    /// The console file could not be created.
    #[error("cannot create the console output file {0}")]
    OpenConsole(PathBuf, #[source] std::io::Error),
    /// Standard output could not be duplicated for the console.
    #[error("cannot use standard output for the console")]
    Console(#[source] std::io::Error),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs requested; KVM on this host allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM (KVM_CREATE_VM)")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A VM-wide setup ioctl failed.
    #[error("cannot set up the VM: {0} failed")]
    VmSetup(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be made.
    #[error("cannot create guest memory")]
    Memory(#[from] crate::memory::MemoryError),
    /// The kernel, initrd or boot structures could not be loaded.
    #[error("cannot prepare the guest for boot")]
    Boot(#[from] boot::BootError),
    /// An EventFd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A virtio device or hotplug slot could not be set up.
    #[error("cannot set up the virtio devices")]
    Devices(#[from] DeviceManagerError),
    /// Legacy devices collide on the port I/O bus.
    #[error("cannot place a legacy device")]
    Bus(#[from] devices::BusError),
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// A vCPU could not be configured or started.
    #[error("cannot set up the vCPUs")]
    Vcpu(#[from] crate::vcpu::VcpuError),
    /// The event loop thread could not be spawned.
    #[error("cannot spawn the event loop thread")]
    Thread(#[source] std::io::Error),
    /// A snapshot's devices could not be put back.
    #[error("cannot restore the virtio devices")]
    RestoreDevices(#[source] crate::device_manager::RestoreDevicesError),
    /// A snapshot's vCPU state was refused by KVM.
    #[error("cannot restore vCPU {0}")]
    RestoreVcpu(u8, #[source] StateError),
    /// A snapshot's interrupt controllers, PIT or clock were refused.
    #[error("cannot restore the VM's interrupt controllers, PIT or clock")]
    RestoreVm(#[source] StateError),
    /// A snapshot's serial registers could not be put back.
    #[error("cannot restore the serial console")]
    Serial(#[source] devices::legacy::SerialStateError),
    /// A snapshot needs something this host's KVM lacks.
    #[error("this host cannot run the snapshot: {0}")]
    HostLacks(String),
}

/// Boots the VM `resources` describe. `started` is the moment the caller
/// asked, which the boot timer measures from.
pub(crate) fn build_and_start(resources: VmResources, started: Instant) -> Result<VmmHandle, StartError> {
    let _span = info_span!("start_vm").entered();
    let VmResources { machine, boot_source, console, devices } = resources;
    machine.validate()?;
    let boot_source = boot_source.ok_or(ConfigError::NoBootSource)?;
    let mut kernel = open(&boot_source.kernel, StartError::OpenKernel)?;
    let mut initrd = match &boot_source.initrd {
        Some(path) => Some(open(path, StartError::OpenInitrd)?),
        None => None,
    };
    let console = open_console(console.unwrap_or(ConsoleOutput::Stdout))?;
    let kvm = Kvm::new().map_err(StartError::Kvm)?;
    let vm = create_vm(&kvm, machine.vcpus)?;

    // Guest memory first: once the VM has an in-kernel irqchip, every
    // memory-slot change waits for an SRCU grace period (measured at 5-7 ms
    // on a nested host, against 0.1 ms before it).
    let mem_size = machine.mem_bytes();
    let mem = crate::memory::create_guest_memory(mem_size)?;
    set_up_vm(&vm, &mem)?;

    // virtio devices, then the empty hotplug slots, each in a virtio-mmio
    // slot that the command line and the DSDT announce.
    let (device_manager, boot_devices) = DeviceManager::for_boot(&vm, &mem, &devices, machine.hotplug_slots)?;
    let cmdline = format!("{} {}", boot_source.cmdline, boot_devices.cmdline);

    // The software that goes in memory.
    let prepared = boot::prepare(
        &mem,
        mem_size,
        machine.vcpus,
        boot::BootSource {
            kernel: &mut kernel,
            initrd: initrd.as_mut(),
            cmdline: cmdline.trim(),
            virtio: &boot_devices.acpi,
        },
    )?;
    let legacy = Legacy::new(&vm, console, None, started)?;

    // vCPUs.
    let supported = supported_cpuid(&kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(machine.vcpus));
    for index in 0..machine.vcpus {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| StartError::CreateVcpu(index, e))?;
        vcpu::configure(&fd, index, machine.vcpus, supported, prepared.entry)?;
        vcpus.push(fd);
    }
    let machine_parts = Parts { vm, mem, mem_size, vcpus, legacy, device_manager, boot_devices };
    launch(machine_parts, msr_indices(&kvm)?, machine.seccomp, false, started)
}

/// Makes a VM in the state `description` saved, its memory a private
/// mapping of `memory`, and starts it (paused if `config` says so). No
/// vCPU runs until every part of the state is back; on any failure the
/// half-made VM is dropped.
pub(crate) fn restore_and_start(
    description: &Description,
    memory: &File,
    config: RestoreConfig,
    started: Instant,
) -> Result<VmmHandle, StartError> {
    let _span = info_span!("restore_vm").entered();
    let console = open_console(config.console)?;
    let kvm = Kvm::new().map_err(StartError::Kvm)?;
    let supported = supported_cpuid(&kvm)?;
    check_host(&kvm)?;
    let count = description.vcpus.len() as u8;
    let vm = create_vm(&kvm, count)?;
    let mem_size = description.mem_size;
    let mem = crate::memory::map_private(memory, mem_size)?;
    set_up_vm(&vm, &mem)?;
    let (device_manager, boot_devices) = DeviceManager::for_restore(
        &vm,
        &mem,
        &description.slots,
        description.hotplug_slots,
        config.vsock_uds.as_deref(),
    )
    .map_err(StartError::RestoreDevices)?;
    let legacy = Legacy::new(&vm, console, Some(&description.serial), started)?;
    let mut vcpus = Vec::with_capacity(description.vcpus.len());
    for (index, state) in description.vcpus.iter().enumerate() {
        let index = index as u8;
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| StartError::CreateVcpu(index, e))?;
        check_cpuid(&fd, supported, index, count, state)?;
        state.apply(&fd).map_err(|e| StartError::RestoreVcpu(index, e))?;
        vcpus.push(fd);
    }
    // The interrupt controllers after the vCPUs: their local APICs exist
    // now, and the IOAPIC's routes point at them.
    description.vm.apply(&vm).map_err(StartError::RestoreVm)?;
    device_manager.resume_restored();
    let parts = Parts { vm, mem, mem_size, vcpus, legacy, device_manager, boot_devices };
    launch(parts, msr_indices(&kvm)?, config.seccomp, config.paused, started)
}

/// Refuses a snapshot on a KVM without the capabilities a restore uses
/// (the CPU features are checked per vCPU, see [`check_cpuid`]).
fn check_host(kvm: &Kvm) -> Result<(), StartError> {
    use kvm_ioctls::Cap;
    let caps = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::MpState, "KVM_CAP_MP_STATE"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    ];
    if let Some((_, name)) = caps.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
        return Err(StartError::HostLacks(format!("KVM here lacks {name}")));
    }
    Ok(())
}

/// Refuses to put vCPU `index`'s saved `state` into `fd` when the saved
/// CPU had features a vCPU made here lacks. "Made here" is the table
/// vessel builds from KVM's supported CPUID; where that falls short (a
/// nested KVM that reports less than its vCPUs get), the table KVM gives
/// a vCPU set up with it, read back from `fd` before the saved state
/// replaces it.
fn check_cpuid(
    fd: &VcpuFd,
    supported: &[kvm_cpuid_entry2],
    index: u8,
    count: u8,
    state: &crate::snapshot::kvm_state::VcpuState,
) -> Result<(), StartError> {
    let saved = state.cpuid_entries().map_err(|e| StartError::HostLacks(e.to_string()))?;
    let here = boot::cpuid::vcpu_cpuid(supported, index, count);
    if boot::cpuid::missing_features(&saved, &here).is_none() {
        return Ok(());
    }
    let probe = |e| StartError::VmSetup("reading a new vCPU's CPUID", e);
    let table = CpuId::from_entries(&here).map_err(|_| probe(kvm_ioctls::Error::new(libc::E2BIG)))?;
    fd.set_cpuid2(&table).map_err(probe)?;
    let effective = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(probe)?;
    match boot::cpuid::missing_features(&saved, effective.as_slice()) {
        None => Ok(()),
        Some(missing) => Err(StartError::HostLacks(format!(
            "vCPU {index} was given {missing}, which this host's KVM does not offer"
        ))),
    }
}

fn create_vm(kvm: &Kvm, vcpus: u8) -> Result<VmFd, StartError> {
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(vcpus) > max_vcpus {
        return Err(StartError::TooManyVcpus { requested: vcpus, max: max_vcpus });
    }
    kvm.create_vm().map_err(StartError::CreateVm)
}

/// Registers `mem` with the VM and makes its in-kernel devices: the
/// interrupt controllers and the PIT.
fn set_up_vm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), StartError> {
    let setup = |what| move |e| StartError::VmSetup(what, e);
    register_memory(vm, mem)?;
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(setup("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// The legacy devices on the PIO bus: COM1, the i8042's reset line and the
/// boot timer.
struct Legacy {
    pio: Bus,
    console: ConsoleFlush,
    console_evt: EventFd,
    reset_evt: EventFd,
    serial_counters: Arc<devices::legacy::SerialCounters>,
    boot_time_ns: Arc<std::sync::atomic::AtomicU64>,
}

impl Legacy {
    /// The devices, COM1 with `serial`'s registers when restoring.
    fn new(
        vm: &VmFd,
        console: Box<dyn Write + Send>,
        serial: Option<&SerialRegisters>,
        started: Instant,
    ) -> Result<Self, StartError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| StartError::VmSetup("KVM_IRQFD (serial)", e))?;
        // Console output goes out in batches; the event loop writes out a
        // partial line that no vCPU exit has (see event_loop::CONSOLE_DELAY).
        let console_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
        let notify = Some(console_evt.try_clone().map_err(StartError::EventFd)?);
        let irq = EventFdTrigger(serial_irq);
        let (uart, serial_counters, pending) = match serial {
            None => SerialConsole::new(irq, console, notify),
            Some(saved) => SerialConsole::from_state(saved, irq, console, notify).map_err(StartError::Serial)?,
        };
        let uart = Arc::new(Mutex::new(uart));
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
        let i8042 = I8042::new(reset_evt.try_clone().map_err(StartError::EventFd)?);
        let (boot_timer, boot_time_ns) = BootTimer::new(started);
        let mut pio = Bus::new();
        pio.insert(uart.clone(), COM1_PORT, 8)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT_DATA, 5)?;
        pio.insert(Arc::new(Mutex::new(boot_timer)), BOOT_TIMER_PORT, 1)?;
        let console = ConsoleFlush { device: uart, pending };
        Ok(Self { pio, console, console_evt, reset_evt, serial_counters, boot_time_ns })
    }
}

/// A VM made and in its starting state, its threads not yet started.
struct Parts {
    vm: VmFd,
    mem: GuestMemoryMmap,
    mem_size: u64,
    vcpus: Vec<VcpuFd>,
    legacy: Legacy,
    device_manager: DeviceManager,
    boot_devices: BootDevices,
}

/// Starts the vCPU threads (the guest runs from here, unless `paused`),
/// then the event loop.
fn launch(
    parts: Parts,
    msr_indices: Arc<[u32]>,
    seccomp: bool,
    paused: bool,
    started: Instant,
) -> Result<VmmHandle, StartError> {
    let Parts { vm, mem, mem_size, vcpus, legacy, mut device_manager, boot_devices } = parts;
    let vcpus: Vec<_> = vcpus.into_iter().map(|fd| (fd, Arc::new(VcpuCounters::default()))).collect();
    let mut device_counters = boot_devices.counters;
    device_counters.extend(device_manager.take_restored_counters());
    let counters = Arc::new(VmCounters {
        vcpus: vcpus.iter().map(|(_, c)| c.clone()).collect(),
        serial: legacy.serial_counters,
        boot_time_ns: legacy.boot_time_ns,
        started,
        mem,
        mem_size,
        devices: Mutex::new(device_counters),
    });
    let vcpu_exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    let thread_config = VcpuThreadConfig {
        seccomp,
        pio: Arc::new(legacy.pio),
        mmio: Arc::new(boot_devices.mmio_bus),
        console: Some(legacy.console.clone()),
        msr_indices,
        paused,
    };
    let vcpus = VcpuSet::start(vcpus, &thread_config, vcpu_exit_evt.try_clone().map_err(StartError::EventFd)?)?;
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    let (requests_tx, requests) = mpsc::channel();
    let runtime = Runtime {
        wake: wake.try_clone().map_err(StartError::EventFd)?,
        requests,
        reset_evt: legacy.reset_evt,
        vcpu_exit_evt,
        vcpus,
        counters: counters.clone(),
        exit: None,
        devices: device_manager,
        console_evt: legacy.console_evt,
        console: legacy.console,
        console_deadline: None,
        vm,
    };
    let device_events = boot_devices.events;
    let event_loop = std::thread::Builder::new()
        .name("vmm-events".into())
        .spawn(move || event_loop::run(runtime, device_events, seccomp))
        .map_err(StartError::Thread)?;
    Ok(VmmHandle::new(requests_tx, wake, counters, event_loop))
}

/// The MSRs a snapshot saves, asked of KVM once per process.
fn msr_indices(kvm: &Kvm) -> Result<Arc<[u32]>, StartError> {
    static INDICES: OnceLock<Arc<[u32]>> = OnceLock::new();
    if let Some(list) = INDICES.get() {
        return Ok(list.clone());
    }
    let list = kvm.get_msr_index_list().map_err(|e| StartError::VmSetup("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(INDICES.get_or_init(|| list.as_slice().into()).clone())
}

/// What KVM supports of CPUID, asked once per process: it does not change
/// while the process runs, and asking costs a few hundred microseconds.
/// (Asking on a separate thread while the VM is built measured no faster on
/// a 2-core host: the query contends with the memory-slot update.)
fn supported_cpuid(kvm: &Kvm) -> Result<&'static [kvm_cpuid_entry2], StartError> {
    static SUPPORTED: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();
    if let Some(entries) = SUPPORTED.get() {
        return Ok(entries);
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| StartError::VmSetup("KVM_GET_SUPPORTED_CPUID", e))?;
    Ok(SUPPORTED.get_or_init(|| cpuid.as_slice().to_vec()))
}

fn open(path: &Path, err: fn(PathBuf, std::io::Error) -> StartError) -> Result<File, StartError> {
    File::open(path).map_err(|e| err(path.to_path_buf(), e))
}

fn open_console(console: ConsoleOutput) -> Result<Box<dyn Write + Send>, StartError> {
    Ok(match console {
        // Unbuffered: each byte the guest sends is visible at once.
        ConsoleOutput::Stdout => Box::new(std::io::stdout().lock().as_fd_file().map_err(StartError::Console)?),
        ConsoleOutput::File(path) => Box::new(File::create(&path).map_err(|e| StartError::OpenConsole(path, e))?),
        ConsoleOutput::Writer(w) => w,
        ConsoleOutput::Discard => Box::new(std::io::sink()),
    })
}

/// A `File` writing to the same open file as a standard stream, unbuffered.
trait AsFdFile {
    fn as_fd_file(&self) -> std::io::Result<File>;
}

impl<T: std::os::fd::AsFd> AsFdFile for T {
    fn as_fd_file(&self) -> std::io::Result<File> {
        Ok(File::from(self.as_fd().try_clone_to_owned()?))
    }
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), StartError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| StartError::VmSetup("KVM_SET_USER_MEMORY_REGION", kvm_ioctls::Error::new(libc::EFAULT)))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region describes a live mapping owned by `mem`. The VM's
        // counters keep that mapping alive while vCPUs run; KVM reaches it
        // only through user-access checks, so even a late access after unmap
        // faults in KVM rather than touching freed host memory.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| StartError::VmSetup("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}
