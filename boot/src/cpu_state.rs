//! Initial vCPU state for the two entry protocols, as plain values the VMM
//! hands to KVM: the GDT and its segments, control registers, and the
//! identity page tables a 64-bit entry needs.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR};
use crate::BootError;

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = boot_params.
    Linux64(u64),
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh(u64),
}

impl EntryPoint {
    /// The guest-physical address execution starts at.
    pub fn addr(self) -> u64 {
        match self {
            EntryPoint::Linux64(a) | EntryPoint::Pvh(a) => a,
        }
    }
}

// GDT slots. Linux's early code expects code at 0x10 and data at 0x18
// (__BOOT_CS/__BOOT_DS); the TSS follows.
const GDT_NULL: usize = 0;
const GDT_CODE32: usize = 1;
const GDT_CODE64: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;

/// A GDT entry from its parts, as the processor reads it.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, flat 32-bit code, 64-bit code, flat data, TSS.
pub const GDT: [u64; 5] = {
    let mut gdt = [0u64; 5];
    gdt[GDT_NULL] = 0;
    gdt[GDT_CODE32] = gdt_entry(0xc09b, 0, 0xfffff);
    gdt[GDT_CODE64] = gdt_entry(0xa09b, 0, 0xfffff);
    gdt[GDT_DATA] = gdt_entry(0xc093, 0, 0xfffff);
    gdt[GDT_TSS] = gdt_entry(0x808b, 0, 0xfffff);
    gdt
};

/// The KVM segment register a GDT slot describes.
pub fn segment(index: usize) -> kvm_segment {
    let entry = GDT[index];
    let flag = |shift: u64, bits: u64| ((entry >> shift) & bits) as u8;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = flag(55, 1);
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: granular,
        avl: flag(52, 1),
        unusable: u8::from(flag(47, 1) == 0),
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Present | writable | 2 MiB page.
const PDE_LARGE_PAGE: u64 = 0x83;

/// Writes the GDT and an empty IDT the entry state refers to.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|_| BootError::WriteBootStructure("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(|_| BootError::WriteBootStructure("IDT"))
}

/// Writes identity page tables mapping the first GiB with 2 MiB pages,
/// enough for a kernel to run until it installs its own.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |_| BootError::WriteBootStructure("page tables");
    mem.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR)).map_err(err)?;
    mem.write_obj(PD_ADDR | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR)).map_err(err)?;
    let mut pd = [0u8; 4096];
    for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
        entry.copy_from_slice(&(((i as u64) << 21) | PDE_LARGE_PAGE).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR)).map_err(err)
}

/// General registers at the entry point. Only the boot vCPU gets them: the
/// others wait for INIT/SIPI from the guest.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, rip: entry.addr(), ..Default::default() };
    match entry {
        EntryPoint::Linux64(_) => {
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        EntryPoint::Pvh(_) => regs.rbx = PVH_INFO_ADDR,
    }
    regs
}

/// Segment and control registers at the entry point, set over the vCPU's
/// current `sregs` (which keep KVM's APIC base and interrupt bitmap).
pub fn boot_sregs(entry: EntryPoint, sregs: &mut kvm_sregs) {
    let data = segment(GDT_DATA);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT_TSS);
    match entry {
        EntryPoint::Linux64(_) => {
            sregs.cs = segment(GDT_CODE64);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cs = segment(GDT_CODE32);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        // The same descriptors Linux's own boot GDT uses.
        assert_eq!(GDT[GDT_CODE32], 0x00cf_9b00_0000_ffff);
        assert_eq!(GDT[GDT_CODE64], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[GDT_DATA], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[GDT_TSS], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_their_descriptors() {
        let cs = segment(GDT_CODE64);
        assert_eq!((cs.selector, cs.type_, cs.l, cs.db, cs.present, cs.s), (0x10, 0xb, 1, 0, 1, 1));
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment(GDT_DATA);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x18, 0x3, 1, 0));
        let tss = segment(GDT_TSS);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x20, 0xb, 0, 1));
        assert_eq!(segment(GDT_NULL).unusable, 1);
    }

    #[test]
    fn linux64_entry_is_long_mode_with_boot_params_in_rsi() {
        let e = EntryPoint::Linux64(0x100200);
        let regs = boot_regs(e);
        assert_eq!((regs.rip, regs.rsi, regs.rsp, regs.rflags), (0x100200, 0x7000, 0x8ff0, 2));
        let mut s = kvm_sregs::default();
        boot_sregs(e, &mut s);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!((s.cr3, s.cr4 & X86_CR4_PAE, s.efer), (0x9000, X86_CR4_PAE, EFER_LME | EFER_LMA));
        assert_eq!((s.cs.selector, s.cs.l), (0x10, 1));
    }

    #[test]
    fn pvh_entry_is_flat_protected_mode_with_start_info_in_rbx() {
        let e = EntryPoint::Pvh(0x100000);
        let regs = boot_regs(e);
        assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100000, 0x6000, 2));
        let mut s = kvm_sregs { cr4: X86_CR4_PAE, efer: EFER_LME, ..Default::default() };
        boot_sregs(e, &mut s);
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (X86_CR0_PE | X86_CR0_ET, 0, 0, 0));
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x08, 1, 0));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(), 0xa003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDPT_ADDR)).unwrap(), 0xb003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PD_ADDR)).unwrap(), 0x83);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PD_ADDR + 8 * 511)).unwrap(), (511 << 21) | 0x83);
    }
}
