//! The structures that tell the kernel about its machine: Linux's
//! `boot_params` (the "zero page") for the 64-bit entry, `hvm_start_info`
//! for PVH. Written field by field at the offsets the protocols fix.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    memory_map, MemoryMapEntry, CMDLINE_ADDR, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};
use crate::loader::SETUP_HEADER_OFFSET;
use crate::BootError;

/// What the guest is told, whichever structure carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// RAM size in bytes.
    pub mem_size: u64,
    /// (address, size) of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// Guest-physical address of the ACPI RSDP.
    pub rsdp: u64,
}

// boot_params offsets (Documentation/arch/x86/zero-page.rst, boot.rst).
const BP_ACPI_RSDP_ADDR: usize = 0x070;
const BP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const BP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_BOOT_FLAG: usize = 0x1fe;
const BP_HEADER: usize = 0x202;
const BP_TYPE_OF_LOADER: usize = 0x210;
const BP_LOADFLAGS: usize = 0x211;
const BP_RAMDISK_IMAGE: usize = 0x218;
const BP_RAMDISK_SIZE: usize = 0x21c;
const BP_HEAP_END_PTR: usize = 0x224;
const BP_CMD_LINE_PTR: usize = 0x228;
const BP_KERNEL_ALIGNMENT: usize = 0x230;
const BP_E820_TABLE: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const E820_ENTRY_SIZE: usize = 20;

/// "Undefined" boot loader ID: vessel has none assigned.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// loadflags: the heap_end_ptr field is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// heap_end_ptr the kernel's real-mode code may use (0xe000 - 0x200).
const HEAP_END: u16 = 0xfe00;

/// Builds Linux's 4 KiB `boot_params` page. `setup_header` is the bzImage's
/// own header (from offset 0x1f1), or None for an ELF kernel, which gets the
/// minimal header the 64-bit entry reads.
pub fn zero_page(setup_header: Option<&[u8]>, info: &BootInfo) -> Result<[u8; 4096], BootError> {
    let mut page = [0u8; 4096];
    let mut put = |offset: usize, bytes: &[u8]| page[offset..offset + bytes.len()].copy_from_slice(bytes);
    match setup_header {
        Some(header) => put(SETUP_HEADER_OFFSET, header),
        None => {
            put(BP_BOOT_FLAG, &0xaa55u16.to_le_bytes());
            put(BP_HEADER, b"HdrS");
            put(BP_KERNEL_ALIGNMENT, &0x0100_0000u32.to_le_bytes());
        }
    }
    put(BP_TYPE_OF_LOADER, &[LOADER_TYPE_UNDEFINED]);
    put(BP_HEAP_END_PTR, &HEAP_END.to_le_bytes());
    put(BP_CMD_LINE_PTR, &(CMDLINE_ADDR as u32).to_le_bytes());
    put(BP_EXT_CMD_LINE_PTR, &((CMDLINE_ADDR >> 32) as u32).to_le_bytes());
    if let Some((addr, size)) = info.initrd {
        put(BP_RAMDISK_IMAGE, &(addr as u32).to_le_bytes());
        put(BP_RAMDISK_SIZE, &(size as u32).to_le_bytes());
        put(BP_EXT_RAMDISK_IMAGE, &((addr >> 32) as u32).to_le_bytes());
        put(BP_EXT_RAMDISK_SIZE, &((size >> 32) as u32).to_le_bytes());
    }
    put(BP_ACPI_RSDP_ADDR, &info.rsdp.to_le_bytes());
    let map = memory_map(info.mem_size);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::WriteBootStructure("e820 map"));
    }
    put(BP_E820_ENTRIES, &[map.len() as u8]);
    for (i, e) in map.iter().enumerate() {
        put(BP_E820_TABLE + i * E820_ENTRY_SIZE, &e820_bytes(e));
    }
    page[BP_LOADFLAGS] |= CAN_USE_HEAP;
    Ok(page)
}

fn e820_bytes(e: &MemoryMapEntry) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&e.addr.to_le_bytes());
    b[8..16].copy_from_slice(&e.size.to_le_bytes());
    b[16..20].copy_from_slice(&e.kind.to_le_bytes());
    b
}

/// Writes `boot_params` at `ZERO_PAGE_ADDR`.
pub fn write_zero_page(mem: &GuestMemoryMmap, setup_header: Option<&[u8]>, info: &BootInfo) -> Result<(), BootError> {
    let page = zero_page(setup_header, info)?;
    mem.write_slice(&page, GuestAddress(ZERO_PAGE_ADDR)).map_err(|_| BootError::WriteBootStructure("boot_params"))
}

/// `hvm_start_info` magic ("xEn3" with the high bit of the last byte clear).
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Version 1: has the memory map fields.
const PVH_VERSION: u32 = 1;

/// Writes `hvm_start_info`, its module list (the initrd) and memory map.
pub fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let err = |_| BootError::WriteBootStructure("PVH start info");
    let map = memory_map(info.mem_size);
    let nr_modules = u32::from(info.initrd.is_some());

    // struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h).
    let mut start = [0u8; 56];
    start[0..4].copy_from_slice(&PVH_MAGIC.to_le_bytes());
    start[4..8].copy_from_slice(&PVH_VERSION.to_le_bytes());
    start[12..16].copy_from_slice(&nr_modules.to_le_bytes());
    start[16..24].copy_from_slice(&PVH_MODLIST_ADDR.to_le_bytes());
    start[24..32].copy_from_slice(&CMDLINE_ADDR.to_le_bytes());
    start[32..40].copy_from_slice(&info.rsdp.to_le_bytes());
    start[40..48].copy_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    start[48..52].copy_from_slice(&(map.len() as u32).to_le_bytes());
    mem.write_slice(&start, GuestAddress(PVH_INFO_ADDR)).map_err(err)?;

    if let Some((addr, size)) = info.initrd {
        // struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
        let mut module = [0u8; 32];
        module[0..8].copy_from_slice(&addr.to_le_bytes());
        module[8..16].copy_from_slice(&size.to_le_bytes());
        mem.write_slice(&module, GuestAddress(PVH_MODLIST_ADDR)).map_err(err)?;
    }
    // struct hvm_memmap_table_entry: addr, size, type, reserved.
    for (i, e) in map.iter().enumerate() {
        let mut entry = [0u8; 24];
        entry[..20].copy_from_slice(&e820_bytes(e));
        mem.write_slice(&entry, GuestAddress(PVH_MEMMAP_ADDR + 24 * i as u64)).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn info() -> BootInfo {
        BootInfo { mem_size: 256 << 20, initrd: Some((0x0fff_0000, 0x1234)), rsdp: 0xe0000 }
    }

    #[test]
    fn zero_page_for_elf_kernel_has_minimal_header_and_fields() {
        let p = zero_page(None, &info()).unwrap();
        assert_eq!(u32_at(&p, 0x202), 0x5372_6448, "HdrS");
        assert_eq!(&p[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(p[0x210], 0xff);
        assert_eq!(p[0x211] & 0x80, 0x80);
        assert_eq!(u32_at(&p, 0x228), 0x20000);
        assert_eq!((u32_at(&p, 0x218), u32_at(&p, 0x21c)), (0x0fff_0000, 0x1234));
        assert_eq!((u32_at(&p, 0xc0), u32_at(&p, 0xc4)), (0, 0));
        assert_eq!(u64_at(&p, 0x70), 0xe0000);
        assert_eq!(p[0x1e8], 2);
        assert_eq!((u64_at(&p, 0x2d0), u64_at(&p, 0x2d8), u32_at(&p, 0x2e0)), (0, 0x9fc00, 1));
        assert_eq!((u64_at(&p, 0x2e4), u64_at(&p, 0x2ec), u32_at(&p, 0x2f4)), (0x100000, (256 << 20) - 0x100000, 1));
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let mut header = vec![0u8; 0x238 - 0x1f1];
        header[0] = 4; // setup_sects
        header[0x202 - 0x1f1..0x206 - 0x1f1].copy_from_slice(b"HdrS");
        header[0x211 - 0x1f1] = 0x01; // LOADED_HIGH
        let p = zero_page(Some(&header), &BootInfo { initrd: None, ..info() }).unwrap();
        assert_eq!(p[0x1f1], 4);
        assert_eq!(p[0x211], 0x81, "LOADED_HIGH kept, CAN_USE_HEAP added");
        assert_eq!((u32_at(&p, 0x218), u32_at(&p, 0x21c)), (0, 0));
        assert_eq!(u32_at(&p, 0x230), 0, "the kernel's own alignment, not ours");
    }

    #[test]
    fn pvh_start_info_points_at_modules_cmdline_and_memmap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_pvh_start_info(&mem, &info()).unwrap();
        let mut s = [0u8; 56];
        mem.read_slice(&mut s, GuestAddress(0x6000)).unwrap();
        assert_eq!((u32_at(&s, 0), u32_at(&s, 4), u32_at(&s, 12)), (PVH_MAGIC, 1, 1));
        assert_eq!((u64_at(&s, 16), u64_at(&s, 24), u64_at(&s, 32)), (0x6040, 0x20000, 0xe0000));
        assert_eq!((u64_at(&s, 40), u32_at(&s, 48)), (0x6100, 2));
        let mut m = [0u8; 32];
        mem.read_slice(&mut m, GuestAddress(0x6040)).unwrap();
        assert_eq!((u64_at(&m, 0), u64_at(&m, 8)), (0x0fff_0000, 0x1234));
        let mut e = [0u8; 48];
        mem.read_slice(&mut e, GuestAddress(0x6100)).unwrap();
        assert_eq!((u64_at(&e, 24), u64_at(&e, 32), u32_at(&e, 40)), (0x100000, (256 << 20) - 0x100000, 1));
    }
}
