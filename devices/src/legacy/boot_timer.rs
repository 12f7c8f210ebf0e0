//! The boot timer: a port the guest writes once, when it reaches the point
//! that counts as "booted" (a test guest at its end, Linux's init), so boot
//! time is measured from inside the guest against the VMM's start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bus::BusDevice;

/// The I/O port (one byte).
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// The value that marks "booted"; other writes are ignored.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// What `elapsed_ns` holds until the guest writes.
const NOT_YET: u64 = u64::MAX;

/// Records the time from `start` to the first magic write.
pub struct BootTimer {
    start: Instant,
    elapsed_ns: Arc<AtomicU64>,
}

impl BootTimer {
    /// A timer counting from `start`; the returned cell is read by stats.
    pub fn new(start: Instant) -> (Self, Arc<AtomicU64>) {
        let elapsed_ns = Arc::new(AtomicU64::new(NOT_YET));
        (Self { start, elapsed_ns: elapsed_ns.clone() }, elapsed_ns)
    }

    /// The recorded boot time in nanoseconds, if the guest wrote.
    pub fn read(cell: &AtomicU64) -> Option<u64> {
        Some(cell.load(Ordering::Acquire)).filter(|v| *v != NOT_YET)
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_TIMER_MAGIC] {
            let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(NOT_YET - 1);
            // Only the first write counts.
            let _ = self.elapsed_ns.compare_exchange(NOT_YET, ns, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_magic_write_is_recorded_once() {
        let (mut timer, cell) = BootTimer::new(Instant::now());
        timer.write(0, &[7]);
        assert_eq!(BootTimer::read(&cell), None);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = BootTimer::read(&cell).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(BootTimer::read(&cell), Some(first));
    }
}
