//! Putting the guest's software into memory: the kernel (ELF, with or
//! without a PVH note, or bzImage), the initrd and the command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cpu_state::EntryPoint;
use crate::layout::{low_ram_end, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START};
use crate::BootError;

/// Offset of the setup header in a bzImage (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Bytes of setup header we copy: up to and including `kernel_info_offset`
/// (boot protocol 2.15). Newer fields are zero, as for an older loader.
pub const SETUP_HEADER_LEN: usize = 0x268 - SETUP_HEADER_OFFSET;
/// Offset of the 64-bit entry point from the bzImage load address.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags`, where XLF_KERNEL_64 says the
/// 64-bit entry point exists.
const PROTOCOL_XLOADFLAGS: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const PAGE_SIZE: u64 = 4096;

/// What loading the kernel produced.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// Where and how to enter it.
    pub entry: EntryPoint,
    /// First byte after the kernel image in guest memory.
    pub end: u64,
    /// For a bzImage, its setup header bytes (from 0x1f1), to be copied
    /// into `boot_params` as the boot protocol asks.
    pub setup_header: Option<Vec<u8>>,
}

impl LoadedKernel {
    /// Reads a little-endian setup header field at its `boot_params` offset.
    fn header_field(&self, offset: usize, len: usize) -> Option<u64> {
        let header = self.setup_header.as_ref()?;
        let start = offset.checked_sub(SETUP_HEADER_OFFSET)?;
        let bytes = header.get(start..start + len)?;
        Some(bytes.iter().rev().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// The highest address the kernel accepts for the initrd's last byte.
    pub fn initrd_addr_max(&self) -> u64 {
        // Kernels before protocol 2.03 left this out and meant 0x37ffffff.
        self.header_field(0x22c, 4).filter(|v| *v != 0).unwrap_or(0x37ff_ffff)
    }

    /// The longest command line the kernel accepts, terminator included.
    pub fn cmdline_max(&self) -> usize {
        let from_header = self.header_field(0x238, 4).filter(|v| *v != 0);
        from_header.map_or(CMDLINE_MAX_SIZE, |v| (v as usize + 1).min(CMDLINE_MAX_SIZE))
    }
}

/// Loads an x86_64 kernel. An ELF with a PVH note is entered through PVH;
/// any other ELF and a bzImage through the Linux 64-bit entry.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let mut head = [0u8; 64];
    let len = read_at_most(kernel, 0, &mut head)?;
    if len < head.len() {
        return Err(BootError::KernelTooShort(len));
    }
    if head[0..4] == ELF_MAGIC {
        load_elf(mem, kernel, &head)
    } else {
        load_bzimage(mem, kernel)
    }
}

fn load_elf(mem: &GuestMemoryMmap, kernel: &mut File, head: &[u8; 64]) -> Result<LoadedKernel, BootError> {
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if head[4] != ELFCLASS64 || machine != EM_X86_64 {
        return Err(BootError::KernelNotX86_64(format!(
            "ELF class {} machine {machine} (want class 2, machine 62)",
            head[4]
        )));
    }
    let result = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(BootError::LoadKernel)?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.0),
        _ => EntryPoint::Linux64(result.kernel_load.0),
    };
    Ok(LoadedKernel { entry, end: result.kernel_end, setup_header: None })
}

fn load_bzimage(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let mut header = vec![0u8; SETUP_HEADER_LEN];
    let len = read_at_most(kernel, SETUP_HEADER_OFFSET as u64, &mut header)?;
    let field =
        |off: usize| u16::from_le_bytes([header[off - SETUP_HEADER_OFFSET], header[off + 1 - SETUP_HEADER_OFFSET]]);
    if len < SETUP_HEADER_LEN || header[0x202 - SETUP_HEADER_OFFSET..][..4] != *b"HdrS" {
        return Err(BootError::KernelFormat);
    }
    let version = field(0x206);
    if version < PROTOCOL_XLOADFLAGS || field(0x236) & XLF_KERNEL_64 == 0 {
        return Err(BootError::KernelNotX86_64(format!(
            "bzImage (boot protocol {}.{:02}) has no 64-bit entry point",
            version >> 8,
            version & 0xff
        )));
    }
    // Keep only the header this kernel has: byte 0x201 is the distance from
    // 0x202 to the header's end (it is the operand of the jump at 0x200).
    let header_end = 0x202 + usize::from(header[0x201 - SETUP_HEADER_OFFSET]);
    header.truncate(header_end.clamp(0x238, 0x268) - SETUP_HEADER_OFFSET);
    let result = BzImage::load(mem, Some(GuestAddress(HIMEM_START)), kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::LoadKernel)?;
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64(result.kernel_load.0 + BZIMAGE_ENTRY_64),
        end: result.kernel_end,
        setup_header: Some(header),
    })
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many there were.
fn read_at_most(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<usize, BootError> {
    file.seek(SeekFrom::Start(offset)).map_err(BootError::ReadKernel)?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BootError::ReadKernel(e)),
        }
    }
    Ok(filled)
}

/// Loads the initrd as high in low RAM as it may go (below the kernel's
/// limit and the MMIO gap), page aligned, above the kernel. Returns
/// (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: &mut File,
) -> Result<(u64, u64), BootError> {
    let size = initrd.metadata().map_err(BootError::ReadInitrd)?.len();
    let limit = low_ram_end(mem_size).min(kernel.initrd_addr_max().saturating_add(1));
    let lowest = kernel.end.next_multiple_of(PAGE_SIZE);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= lowest)
        .ok_or(BootError::InitrdDoesNotFit { size, room: limit.saturating_sub(lowest) })?;
    initrd.seek(SeekFrom::Start(0)).map_err(BootError::ReadInitrd)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdDoesNotFit { size, room: 0 })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|e| BootError::ReadInitrd(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at `CMDLINE_ADDR`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineHasNul);
    }
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: max - 1 });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR)).map_err(|_| BootError::WriteBootStructure("command line"))
}
