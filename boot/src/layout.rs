//! Where vessel puts things in guest-physical memory on x86_64.
//!
//! The low megabyte holds the boot structures; the kernel is loaded at 1 MiB;
//! RAM stops below the 32-bit MMIO gap and continues above 4 GiB. Device MMIO
//! windows, the IOAPIC and the local APIC live in that gap.

/// Global descriptor table written for the guest's first instructions.
pub const GDT_ADDR: u64 = 0x500;
/// An empty interrupt descriptor table (limit 0) right after the GDT.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, handed to a PVH entry point in EBX.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd is module 0).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux `boot_params`, the "zero page", handed to a 64-bit entry in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
// The boot stack grows down from between the zero page and the page tables.
const _: () = assert!(BOOT_STACK_TOP < PML4_ADDR && BOOT_STACK_TOP > ZERO_PAGE_ADDR + 0x1000);

/// Identity page tables: one PML4, one PDPT, one PD of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB = the first GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept, terminator included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area: low RAM ends here in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables start here, RSDP first; Linux also scans 0xE0000-0xFFFFF for it.
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI window (exclusive).
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel is loaded (bzImage protected-mode code, ELF as linked).
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO gap: RAM below 4 GiB ends here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtio-mmio device windows are allocated from here.
pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
/// First IOAPIC pin (GSI) given to virtio-mmio devices; 0-4 are the legacy
/// PC's (timer, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin: KVM's in-kernel IOAPIC has 24.
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// virtio-mmio window of each device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// The MMIO window and interrupt line of virtio-mmio slot `index`, if there
/// is a free interrupt line for it.
pub fn virtio_mmio_slot(index: usize) -> Option<(u64, u32)> {
    let irq = VIRTIO_IRQ_BASE.checked_add(u32::try_from(index).ok()?)?;
    (irq <= VIRTIO_IRQ_LAST).then(|| (DEVICE_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, irq))
}

/// IOAPIC register window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC register window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// KVM needs three pages for the TSS, in the gap, away from RAM and devices.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation, right below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The smallest guest we can lay out: boot structures and a kernel at 1 MiB.
pub const MIN_MEM_SIZE: u64 = 2 << 20;

/// Guest RAM regions, as (start, length), for `mem_size` bytes of RAM: below
/// the MMIO gap first, the rest from 4 GiB up.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

/// End (exclusive) of RAM below 4 GiB.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// One entry of the guest's memory map (e820 / PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type: 1 = RAM, 2 = reserved.
    pub kind: u32,
}

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// The memory map the guest is told about: low RAM up to the EBDA, then RAM
/// from 1 MiB to the gap and from 4 GiB on. The ACPI tables at 0xE0000 lie in
/// the hole between, which Linux never uses as RAM.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![MemoryMapEntry { addr: 0, size: EBDA_START, kind: E820_RAM }];
    for (start, len) in ram_regions(mem_size) {
        let start_above_1m = start.max(HIMEM_START);
        let end = start + len;
        if end > start_above_1m {
            map.push(MemoryMapEntry { addr: start_above_1m, size: end - start_above_1m, kind: E820_RAM });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_two_map_entries() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            memory_map(128 << 20),
            vec![
                MemoryMapEntry { addr: 0, size: 0x9fc00, kind: 1 },
                MemoryMapEntry { addr: 0x100000, size: (128 << 20) - 0x100000, kind: 1 },
            ]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let mem = 5u64 << 30;
        assert_eq!(ram_regions(mem), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        let map = memory_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1], MemoryMapEntry { addr: 0x100000, size: (3 << 30) - 0x100000, kind: 1 });
        assert_eq!(map[2], MemoryMapEntry { addr: 4 << 30, size: 2 << 30, kind: 1 });
        assert_eq!(low_ram_end(mem), 3 << 30);
    }

    #[test]
    fn virtio_slots_get_a_window_and_a_line_each() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(virtio_mmio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, 0x40),
            (PVH_MODLIST_ADDR, 0x20),
            (PVH_MEMMAP_ADDR, 0x100),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }
}
