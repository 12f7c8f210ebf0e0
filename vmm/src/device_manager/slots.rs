//! virtio-mmio slots as bookkeeping, without KVM: the windows and interrupt
//! lines handed out in order, what the guest is told about each (a
//! command-line entry and a DSDT device), and which of the slots reserved
//! for hotplug hold a device.

use boot::acpi::VirtioMmioDevice;
use boot::layout::{virtio_mmio_slot, VIRTIO_MMIO_SIZE};

/// One virtio-mmio register window and its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical address of the register window.
    pub addr: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel command-line entry announcing this slot
    /// (`virtio_mmio.device=4K@0xd0000000:5`), for kernels built with
    /// command-line virtio-mmio devices.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device={}K@{:#x}:{}", VIRTIO_MMIO_SIZE >> 10, self.addr, self.irq)
    }

    /// The DSDT device announcing this slot, for the other kernels.
    pub fn acpi_device(&self) -> VirtioMmioDevice {
        VirtioMmioDevice { addr: self.addr, len: VIRTIO_MMIO_SIZE, irq: self.irq }
    }
}

/// A slot that cannot be had.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    /// Every window of the layout is taken.
    #[error("no virtio-mmio window left: all {0} are taken by devices and hotplug slots")]
    NoWindowLeft(usize),
    /// Every hotplug slot holds a device (or none were reserved).
    #[error("no free hotplug slot (reserve more with MachineConfig::hotplug_slots)")]
    NoFreeSlot,
    /// No device in that hotplug slot.
    #[error("hotplug slot {0} holds no device")]
    NoSuchSlot(usize),
}

/// Hands out the layout's windows and interrupt lines in order, and
/// remembers them all: each is announced to the guest at boot.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    announced: Vec<MmioSlot>,
}

impl SlotAllocator {
    /// The next window and its IRQ.
    pub fn allocate(&mut self) -> Result<MmioSlot, SlotError> {
        let taken = self.announced.len();
        let (addr, irq) = virtio_mmio_slot(taken).ok_or(SlotError::NoWindowLeft(taken))?;
        let slot = MmioSlot { addr, irq };
        self.announced.push(slot);
        Ok(slot)
    }

    /// The command-line entries of every slot handed out, space-separated.
    pub fn cmdline(&self) -> String {
        self.announced.iter().map(MmioSlot::cmdline_entry).collect::<Vec<_>>().join(" ")
    }

    /// The DSDT devices of every slot handed out, in order.
    pub fn acpi_devices(&self) -> Vec<VirtioMmioDevice> {
        self.announced.iter().map(MmioSlot::acpi_device).collect()
    }
}

/// The slots reserved for hotplug, each empty or holding a `T`.
#[derive(Debug)]
pub struct HotplugTable<T> {
    entries: Vec<(MmioSlot, Option<T>)>,
}

impl<T> Default for HotplugTable<T> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<T> HotplugTable<T> {
    /// Adds an empty slot; its index is the number of slots before it.
    pub fn reserve(&mut self, slot: MmioSlot) {
        self.entries.push((slot, None));
    }

    /// The first empty slot.
    pub fn first_free(&self) -> Result<(usize, MmioSlot), SlotError> {
        self.entries
            .iter()
            .enumerate()
            .find(|(_, (_, occupant))| occupant.is_none())
            .map(|(index, (slot, _))| (index, *slot))
            .ok_or(SlotError::NoFreeSlot)
    }

    /// Puts `occupant` in empty slot `index`; false if there is no such
    /// empty slot.
    pub fn fill(&mut self, index: usize, occupant: T) -> bool {
        match self.entries.get_mut(index) {
            Some((_, place @ None)) => {
                *place = Some(occupant);
                true
            }
            _ => false,
        }
    }

    /// Empties slot `index`: its window, and what it held.
    pub fn empty(&mut self, index: usize) -> Result<(MmioSlot, T), SlotError> {
        let (slot, place) = self.entries.get_mut(index).ok_or(SlotError::NoSuchSlot(index))?;
        let occupant = place.take().ok_or(SlotError::NoSuchSlot(index))?;
        Ok((*slot, occupant))
    }

    /// What slot `index` holds, if anything.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.entries.get(index).and_then(|(_, occupant)| occupant.as_ref())
    }

    /// The window and IRQ of slot `index`.
    pub fn slot(&self, index: usize) -> Option<MmioSlot> {
        self.entries.get(index).map(|(slot, _)| *slot)
    }

    /// The occupant of slot `index`, to change.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.entries.get_mut(index).and_then(|(_, occupant)| occupant.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot::layout::{VIRTIO_IRQ_BASE, VIRTIO_IRQ_LAST};

    #[test]
    fn the_allocator_hands_out_windows_and_irqs_in_order() {
        let mut slots = SlotAllocator::default();
        let first = slots.allocate().unwrap();
        let second = slots.allocate().unwrap();
        assert_eq!(first, MmioSlot { addr: 0xd000_0000, irq: VIRTIO_IRQ_BASE });
        assert_eq!(second, MmioSlot { addr: 0xd000_0000 + VIRTIO_MMIO_SIZE, irq: VIRTIO_IRQ_BASE + 1 });
    }

    #[test]
    fn the_allocator_refuses_past_the_last_irq_with_a_typed_error() {
        let mut slots = SlotAllocator::default();
        let count = (VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1) as usize;
        for _ in 0..count {
            slots.allocate().unwrap();
        }
        assert_eq!(slots.allocate(), Err(SlotError::NoWindowLeft(count)));
        assert_eq!(slots.acpi_devices().len(), count, "a refusal announces nothing");
    }

    #[test]
    fn every_slot_handed_out_is_announced_on_the_command_line_and_in_the_dsdt() {
        let mut slots = SlotAllocator::default();
        assert_eq!(slots.cmdline(), "");
        slots.allocate().unwrap();
        slots.allocate().unwrap();
        assert_eq!(slots.cmdline(), "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6");
        assert_eq!(
            slots.acpi_devices(),
            vec![
                VirtioMmioDevice { addr: 0xd000_0000, len: 0x1000, irq: 5 },
                VirtioMmioDevice { addr: 0xd000_1000, len: 0x1000, irq: 6 },
            ]
        );
    }

    #[test]
    fn hotplug_slots_fill_in_order_and_a_full_table_says_so() {
        let mut table = HotplugTable::default();
        let a = MmioSlot { addr: 0x1000, irq: 5 };
        let b = MmioSlot { addr: 0x2000, irq: 6 };
        table.reserve(a);
        table.reserve(b);
        assert_eq!(table.first_free(), Ok((0, a)));
        assert!(table.fill(0, "rng"));
        assert_eq!(table.first_free(), Ok((1, b)));
        assert!(table.fill(1, "blk"));
        assert_eq!(table.first_free(), Err(SlotError::NoFreeSlot));
        assert!(!table.fill(1, "net"), "a full slot took a second device");
        assert_eq!(table.get(1), Some(&"blk"));
    }

    #[test]
    fn a_detached_slot_is_free_for_the_next_device() {
        let mut table = HotplugTable::default();
        let a = MmioSlot { addr: 0x1000, irq: 5 };
        table.reserve(a);
        table.reserve(MmioSlot { addr: 0x2000, irq: 6 });
        table.fill(0, "rng");
        table.fill(1, "blk");
        assert_eq!(table.empty(0), Ok((a, "rng")));
        assert_eq!(table.empty(0), Err(SlotError::NoSuchSlot(0)), "emptied twice");
        assert_eq!(table.first_free(), Ok((0, a)));
        assert_eq!(table.empty(7), Err(SlotError::NoSuchSlot(7)));
    }

    #[test]
    fn a_table_with_no_reserved_slots_has_no_free_slot() {
        let table = HotplugTable::<()>::default();
        assert_eq!(table.first_free(), Err(SlotError::NoFreeSlot));
    }
}
