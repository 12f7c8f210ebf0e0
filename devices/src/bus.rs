//! An address space of devices (the PIO bus or the MMIO bus): vCPU exits are
//! dispatched here by address. Accesses that hit no device read as all ones
//! and drop writes, as on real hardware with nothing decoding the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes in its address range.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around.
    #[error("invalid bus range: {len:#x} bytes at {base:#x}")]
    InvalidRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Two devices would decode the same address.
    #[error("bus range {len:#x} bytes at {base:#x} overlaps a device already there")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices by base address.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::InvalidRange { base, len })?;
        let clashes_below = self.ranges.range(..=base).next_back().is_some_and(|(b, r)| b + r.len > base);
        let clashes_above = self.ranges.range(base..end).next().is_some();
        if clashes_below || clashes_above {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// Removes the device whose range starts at `base`, if any.
    pub fn remove(&mut self, base: u64) -> bool {
        self.ranges.remove(&base).is_some()
    }

    /// The device decoding `addr`, with `addr`'s offset into its range.
    /// The whole access must fall inside the range.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&Arc<Mutex<dyn BusDevice>>, u64)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= range.len).then_some((&range.device, offset))
    }

    /// Reads from `addr`; returns false (and all ones) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device's lock, even if a thread panicked holding it: device state is
/// plain registers, never left half-updated across a panic point that
/// matters more than keeping the VM alive.
fn lock(device: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        bytes: [u8; 8],
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.bytes[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.bytes[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn scratch() -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Scratch::default()))
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = Bus::new();
        bus.insert(scratch(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[1, 2]));
        let mut out = [0u8; 2];
        assert!(bus.read(0x3fa, &mut out));
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn unclaimed_addresses_read_all_ones() {
        let mut bus = Bus::new();
        bus.insert(scratch(), 0x100, 8).unwrap();
        let mut out = [0u8; 4];
        assert!(!bus.read(0x200, &mut out));
        assert_eq!(out, [0xff; 4]);
        assert!(!bus.write(0xff, &[0]));
        // An access running off the end of a device is not the device's.
        assert!(!bus.read(0x106, &mut out));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(scratch(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(scratch(), 0x108, 0x10), Err(BusError::Overlap { base: 0x108, len: 0x10 }));
        assert_eq!(bus.insert(scratch(), 0xf8, 0x10), Err(BusError::Overlap { base: 0xf8, len: 0x10 }));
        assert_eq!(bus.insert(scratch(), 0x100, 1), Err(BusError::Overlap { base: 0x100, len: 1 }));
        assert!(matches!(bus.insert(scratch(), 0x200, 0), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(scratch(), u64::MAX, 2), Err(BusError::InvalidRange { .. })));
        bus.insert(scratch(), 0x110, 0x10).unwrap();
        bus.insert(scratch(), 0xf0, 0x10).unwrap();
        assert!(bus.remove(0x100));
        bus.insert(scratch(), 0x100, 0x10).unwrap();
    }
}
