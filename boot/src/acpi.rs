//! ACPI tables: RSDP, XSDT, FADT, DSDT and a MADT listing every vCPU and the
//! IOAPIC. Distribution kernels are built without MP-table parsing, so the
//! MADT is how they learn how many CPUs exist.

use acpi_tables::aml::{Device, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope};
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
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR as u32));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR as u32, 0));
    to_bytes(&madt)
}

/// A virtio-mmio device (or empty slot) to describe in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Register window.
    pub addr: u64,
    /// Window length.
    pub len: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

/// ACPI hardware ID Linux's virtio_mmio driver matches.
const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// The DSDT: one `LNRO0005` device per virtio-mmio window, with its memory
/// and (edge-triggered, active-high) interrupt. Kernels built without
/// `virtio_mmio.device=` support (Debian's cloud kernel) find devices only
/// this way. HW-reduced ACPI means no PM timer or SCI blocks.
pub fn dsdt(devices: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    if devices.is_empty() {
        return sdt.as_slice().to_vec();
    }
    let names: Vec<String> = (0..devices.len()).map(|i| format!("VR{i:02X}")).collect();
    let hid = Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uids: Vec<Name> = (0..devices.len()).map(|i| Name::new("_UID".into(), &(i as u32))).collect();
    let resources: Vec<(Memory32Fixed, Interrupt)> = devices
        .iter()
        .map(|d| {
            (Memory32Fixed::new(true, d.addr as u32, d.len as u32), Interrupt::new(true, true, false, false, d.irq))
        })
        .collect();
    let templates: Vec<ResourceTemplate> =
        resources.iter().map(|(m, i)| ResourceTemplate::new(vec![m as &dyn Aml, i as &dyn Aml])).collect();
    let crs: Vec<Name> = templates.iter().map(|t| Name::new("_CRS".into(), t)).collect();
    let aml_devices: Vec<Device> =
        names.iter().enumerate().map(|(i, n)| Device::new(Path::new(n), vec![&hid, &uids[i], &crs[i]])).collect();
    let children: Vec<&dyn Aml> = aml_devices.iter().map(|d| d as &dyn Aml).collect();
    let mut body = Vec::new();
    Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Writes the tables from `ACPI_START` up and returns the RSDP's address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, vcpus: u8, virtio: &[VirtioMmioDevice]) -> Result<u64, BootError> {
    let dsdt = dsdt(virtio);
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

    for (addr, bytes) in
        [(rsdp_addr, &rsdp), (dsdt_addr, &dsdt), (fadt_addr, &fadt), (madt_addr, &madt), (xsdt_addr, &xsdt)]
    {
        mem.write_slice(bytes, GuestAddress(addr)).map_err(|_| BootError::WriteBootStructure("ACPI tables"))?;
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
    fn dsdt_describes_each_virtio_mmio_window() {
        let devices = [
            VirtioMmioDevice { addr: 0xd000_0000, len: 0x1000, irq: 5 },
            VirtioMmioDevice { addr: 0xd000_1000, len: 0x1000, irq: 6 },
        ];
        let table = dsdt(&devices);
        assert_eq!(&table[0..4], b"DSDT");
        assert_eq!(u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize, table.len());
        assert_eq!(sum(&table), 0, "checksum");
        let body = &table[36..];
        let find = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(find(b"LNRO0005\0"), 2);
        assert_eq!(find(b"VR00") + find(b"VR01"), 2);
        // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
        let mut mem0 = vec![0x86, 9, 0, 1];
        mem0.extend_from_slice(&0xd000_0000u32.to_le_bytes());
        mem0.extend_from_slice(&0x1000u32.to_le_bytes());
        assert_eq!(find(&mem0), 1);
        // Extended interrupt: tag 0x89, length 6, consumer|edge, one, GSI 6.
        assert_eq!(find(&[0x89, 6, 0, 0b0011, 1, 6, 0, 0, 0]), 1);
        assert_eq!(dsdt(&[]).len(), 36);
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp_addr = write_acpi_tables(&mem, 2, &[]).unwrap();
        assert_eq!(rsdp_addr, 0xe0000);
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_addr);
        assert_eq!((&xsdt[0..4], sum(&xsdt)), (&b"XSDT"[..], 0));
        let entries: Vec<u64> = xsdt[36..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
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
