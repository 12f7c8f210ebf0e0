//! x86_64 direct kernel boot, as pure functions over guest memory.
//!
//! Given guest RAM, a kernel, an optional initrd and a command line, this
//! crate writes everything a kernel expects to find when its first
//! instruction runs (boot_params or PVH start info, e820 map, ACPI tables,
//! GDT, identity page tables) and describes the register state to enter it
//! with. It never calls KVM: the `vmm` crate applies the state.

pub mod acpi;
pub mod cpu_state;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod msr;
pub mod params;

use std::fs::File;

use vm_memory::GuestMemoryMmap;

pub use cpu_state::EntryPoint;
pub use params::BootInfo;

/// Why a guest could not be prepared for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    /// Too short to be any kernel.
    #[error("the kernel image is truncated: {0} bytes is too short for any kernel format")]
    KernelTooShort(usize),
    /// Neither ELF nor bzImage.
    #[error("the kernel image is neither an ELF file nor a bzImage (no ELF magic, no \"HdrS\" setup header)")]
    KernelFormat,
    /// A kernel for another architecture or without a 64-bit entry.
    #[error("the kernel is not an x86_64 kernel: {0}")]
    KernelNotX86_64(String),
    /// The loader refused it (truncated, does not fit in memory, bad headers).
    #[error("cannot load the kernel image (truncated, corrupt, or larger than guest memory)")]
    LoadKernel(#[source] linux_loader::loader::Error),
    /// The initrd file could not be read.
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    /// No room between the kernel and the top of low memory.
    #[error("the initrd ({size} bytes) does not fit in guest memory: {room} bytes free between the kernel and the end of usable low memory")]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// Bytes available.
        room: u64,
    },
    /// Command line longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A NUL byte would cut the command line short.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// Guest memory too small for the boot structures.
    #[error("cannot write the {0} into guest memory (guest memory too small?)")]
    WriteBootStructure(&'static str),
    /// The ACPI tables outgrew their window.
    #[error("the ACPI tables do not fit between 0xE0000 and 1 MiB")]
    AcpiTablesTooLarge,
}

/// What the caller loads into the guest.
pub struct BootSource<'a> {
    /// The kernel image.
    pub kernel: &'a mut File,
    /// The initial ramdisk, if any.
    pub initrd: Option<&'a mut File>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// virtio-mmio windows to describe in the DSDT.
    pub virtio: &'a [acpi::VirtioMmioDevice],
}

/// The result of preparing memory: where to enter, and what was told.
#[derive(Clone, Debug)]
pub struct PreparedBoot {
    /// Entry point and protocol.
    pub entry: EntryPoint,
    /// What the boot structures describe.
    pub info: BootInfo,
}

/// Prepares guest memory for boot: kernel, initrd, command line, ACPI
/// tables, the protocol's boot structure, GDT and page tables.
pub fn prepare(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    vcpus: u8,
    source: BootSource<'_>,
) -> Result<PreparedBoot, BootError> {
    let kernel = loader::load_kernel(mem, source.kernel)?;
    let initrd = match source.initrd {
        Some(file) => Some(loader::load_initrd(mem, mem_size, &kernel, file)?),
        None => None,
    };
    loader::write_cmdline(mem, source.cmdline, kernel.cmdline_max())?;
    let rsdp = acpi::write_acpi_tables(mem, vcpus, source.virtio)?;
    let info = BootInfo { mem_size, initrd, rsdp };
    match kernel.entry {
        EntryPoint::Linux64(_) => {
            params::write_zero_page(mem, kernel.setup_header.as_deref(), &info)?;
            cpu_state::write_page_tables(mem)?;
        }
        EntryPoint::Pvh(_) => params::write_pvh_start_info(mem, &info)?,
    }
    cpu_state::write_gdt(mem)?;
    Ok(PreparedBoot { entry: kernel.entry, info })
}
