//! The 8250 UART on COM1 (vm-superio's model), its output going wherever the
//! VMM's caller said: a file, a pipe, stdout.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's I/O ports start here (8 registers).
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises an interrupt by writing an EventFd registered as a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Counters the stats call reads without taking the device lock.
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Bytes the guest transmitted.
    pub tx_bytes: AtomicU64,
    /// Bytes that could not be written to the output.
    pub tx_lost_bytes: AtomicU64,
}

struct Events(Arc<SerialCounters>);

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.tx_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// COM1 on the PIO bus.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, Events, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART writing to `out` and interrupting through `irq`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> (Self, Arc<SerialCounters>) {
        let counters = Arc::new(SerialCounters::default());
        let uart = Serial::with_events(irq, Events(counters.clone()), out);
        (Self { uart }, counters)
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses read as ones.
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(reg)) => data[0] = self.uart.read(reg),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(reg)) = (data.len(), u8::try_from(offset)) {
            // A failed write to the output is counted as a lost byte by
            // the events; the guest carries on either way.
            let _ = self.uart.write(reg, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output_and_are_counted() {
        let sink = Sink::default();
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (mut com1, counters) = SerialConsole::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            com1.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(counters.tx_bytes.load(Ordering::Relaxed), 3);
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        com1.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
        // A 2-byte access is not a UART access.
        let mut wide = [0u8; 2];
        com1.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
