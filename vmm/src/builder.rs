//! Building and starting a microVM, top to bottom: KVM, VM, memory, kernel,
//! devices, vCPUs, threads.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

use boot::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use devices::legacy::{
    BootTimer, EventFdTrigger, SerialConsole, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT, I8042, I8042_PORT_DATA,
};
use devices::Bus;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use tracing::info_span;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConfigError, ConsoleOutput, VmResources};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::event_loop::{self, Runtime};
use crate::handle::VmmHandle;
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

    // KVM and the VM.
    let kvm = Kvm::new().map_err(StartError::Kvm)?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(machine.vcpus) > max_vcpus {
        return Err(StartError::TooManyVcpus { requested: machine.vcpus, max: max_vcpus });
    }
    let vm = kvm.create_vm().map_err(StartError::CreateVm)?;
    let setup = |what| move |e| StartError::VmSetup(what, e);

    // Guest memory first: once the VM has an in-kernel irqchip, every
    // memory-slot change waits for an SRCU grace period (measured at 5-7 ms
    // on a nested host, against 0.1 ms before it).
    let mem_size = machine.mem_bytes();
    let mem = crate::memory::create_guest_memory(mem_size)?;
    register_memory(&vm, &mem)?;
    vm.set_tss_address(KVM_TSS_ADDR as usize).map_err(setup("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR).map_err(setup("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;

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

    // Legacy devices on the PIO bus.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(setup("KVM_IRQFD (serial)"))?;
    // Console output goes out in batches; the event loop writes out a
    // partial line that no vCPU exit has (see event_loop::CONSOLE_DELAY).
    let console_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    let notify = console_evt.try_clone().map_err(StartError::EventFd)?;
    let (serial, serial_counters, pending) = SerialConsole::new(EventFdTrigger(serial_irq), console, Some(notify));
    let serial = Arc::new(Mutex::new(serial));
    let console_flush = ConsoleFlush { device: serial.clone(), pending };
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    let i8042 = I8042::new(reset_evt.try_clone().map_err(StartError::EventFd)?);
    let (boot_timer, boot_time_ns) = BootTimer::new(started);
    let mut pio = Bus::new();
    pio.insert(serial, COM1_PORT, 8)?;
    pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT_DATA, 5)?;
    pio.insert(Arc::new(Mutex::new(boot_timer)), BOOT_TIMER_PORT, 1)?;

    // vCPUs.
    let supported = supported_cpuid(&kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(machine.vcpus));
    for index in 0..machine.vcpus {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|e| StartError::CreateVcpu(index, e))?;
        vcpu::configure(&fd, index, machine.vcpus, supported, prepared.entry)?;
        vcpus.push((fd, Arc::new(VcpuCounters::default())));
    }
    let counters = Arc::new(VmCounters {
        vcpus: vcpus.iter().map(|(_, c)| c.clone()).collect(),
        serial: serial_counters,
        boot_time_ns,
        started,
        mem,
        mem_size,
        devices: Mutex::new(boot_devices.counters),
    });

    // Go: vCPU threads first (the guest starts here), then the event loop.
    let vcpu_exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    let thread_config = VcpuThreadConfig {
        seccomp: machine.seccomp,
        pio: Arc::new(pio),
        mmio: Arc::new(boot_devices.mmio_bus),
        console: Some(console_flush.clone()),
    };
    let vcpus = VcpuSet::start(vcpus, &thread_config, vcpu_exit_evt.try_clone().map_err(StartError::EventFd)?)?;
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(StartError::EventFd)?;
    let (requests_tx, requests) = mpsc::channel();
    let runtime = Runtime {
        wake: wake.try_clone().map_err(StartError::EventFd)?,
        requests,
        reset_evt,
        vcpu_exit_evt,
        vcpus,
        counters: counters.clone(),
        exit: None,
        devices: device_manager,
        console_evt,
        console: console_flush,
        console_deadline: None,
        vm,
    };
    let seccomp = machine.seccomp;
    let device_events = boot_devices.events;
    let event_loop = std::thread::Builder::new()
        .name("vmm-events".into())
        .spawn(move || event_loop::run(runtime, device_events, seccomp))
        .map_err(StartError::Thread)?;
    Ok(VmmHandle::new(requests_tx, wake, counters, event_loop))
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
