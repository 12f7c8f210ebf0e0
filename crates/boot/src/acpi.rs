//! ACPI tables: RSDP, XSDT, FADT, DSDT and a MADT listing every vCPU and the
//! IOAPIC. Distribution kernels are built without MP-table parsing, so the
//! MADT is how they learn how many CPUs exist.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::BootError;

const OEM_ID: [u8; 6] = *b"VESSEL";
const OEM_TABLE_ID: [u8; 8] = *b"VESSELVM";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flag: an i8042 keyboard controller exists
/// (Linux uses it to reset the machine).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT for `vcpus` CPUs (APIC IDs 0..vcpus) and one IOAPIC (ID = vcpus,
/// so no ID is shared, GSI base 0).
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR as u32, 0));
    to_bytes(&madt)
}

/// Writes the tables from `ACPI_START` up and returns the RSDP's address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, BootError> {
    // An empty DSDT: no AML devices yet (virtio-mmio devices are announced on
    // the command line). HW-reduced ACPI means no PM timer or SCI blocks.
    let dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let dsdt = dsdt.as_slice().to_vec();
    let madt = madt(vcpus);

    // Layout: RSDP, then each table, 16-byte aligned.
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    let fadt = to_bytes(&fadt.finalize());
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    if xsdt_addr + xsdt.len() as u64 > ACPI_END {
        return Err(BootError::AcpiTablesTooLarge);
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| BootError::WriteBootStructure("ACPI tables"))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len = u32::from_le_bytes(read(mem, addr + 4, 4).try_into().unwrap());
        read(mem, addr, len as usize)
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let madt = madt(4);
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(sum(&madt), 0, "checksum");
        assert_eq!(u32::from_le_bytes(madt[36..40].try_into().unwrap()), 0xfee0_0000);
        // Header (44 bytes), 4 local APICs of 8 bytes, one IOAPIC of 12.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        for id in 0..4u8 {
            let e = &madt[44 + 8 * id as usize..][..8];
            assert_eq!(e, [0, 8, id, id, 1, 0, 0, 0]);
        }
        let io = &madt[44 + 32..];
        assert_eq!(io, [1, 12, 4, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp_addr = write_acpi_tables(&mem, 2).unwrap();
        assert_eq!(rsdp_addr, 0xe0000);
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!((&xsdt[0..4], sum(&xsdt)), (&b"XSDT"[..], 0));
        let entries: Vec<u64> = xsdt[36..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries.iter().map(|a| table(&mem, *a)[0..4].to_vec()).collect();
        assert_eq!(sigs, [b"FACP".to_vec(), b"APIC".to_vec()]);
        let fadt = table(&mem, entries[0]);
        assert_eq!(sum(&fadt), 0);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW-reduced ACPI");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table(&mem, x_dsdt);
        assert_eq!((&dsdt[0..4], sum(&dsdt)), (&b"DSDT"[..], 0));
        let madt = table(&mem, entries[1]);
        assert_eq!(sum(&madt), 0);
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
    }
}
