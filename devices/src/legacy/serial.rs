//! The 8250 UART on COM1 (vm-superio's model), its output going wherever the
//! VMM's caller said: a file, a pipe, stdout.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
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
    /// When the guest transmitted its first byte.
    pub first_tx: std::sync::OnceLock<std::time::Instant>,
}

struct Events(Arc<SerialCounters>);

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        if self.0.first_tx.get().is_none() {
            let _ = self.0.first_tx.set(std::time::Instant::now());
        }
        self.0.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.tx_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// How much output is held before it is written out regardless.
pub const CONSOLE_BATCH: usize = 4096;

/// Whether the console holds output not written out yet, for the threads
/// that flush it (a vCPU at its next other exit, the event loop after a
/// short delay); `notify` is written once per batch, when it starts.
#[derive(Debug)]
pub struct ConsolePending {
    held: AtomicBool,
    notify: Option<EventFd>,
}

impl ConsolePending {
    /// Whether output is held.
    pub fn is_set(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

/// The UART's output, written out a batch at a time: at a newline, when
/// [`CONSOLE_BATCH`] bytes are held, or when [`SerialConsole::flush_output`]
/// is called. The guest writes a byte per exit, and a host `write` per byte
/// cost more than the exit itself.
struct Batched {
    out: Box<dyn Write + Send>,
    held: Vec<u8>,
    pending: Arc<ConsolePending>,
    counters: Arc<SerialCounters>,
}

impl Batched {
    fn new(out: Box<dyn Write + Send>, notify: Option<EventFd>) -> (Self, Arc<SerialCounters>, Arc<ConsolePending>) {
        let counters = Arc::new(SerialCounters::default());
        let pending = Arc::new(ConsolePending { held: AtomicBool::new(false), notify });
        let batched = Batched {
            out,
            held: Vec::with_capacity(CONSOLE_BATCH),
            pending: pending.clone(),
            counters: counters.clone(),
        };
        (batched, counters, pending)
    }

    /// Writes out what is held. What cannot be written is counted lost.
    fn drain(&mut self) {
        if !self.held.is_empty() {
            if self.out.write_all(&self.held).and_then(|()| self.out.flush()).is_err() {
                self.counters.tx_lost_bytes.fetch_add(self.held.len() as u64, Ordering::Relaxed);
            }
            self.held.clear();
        }
        self.pending.held.store(false, Ordering::Release);
    }
}

impl Write for Batched {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.held.extend_from_slice(bytes);
        if bytes.contains(&b'\n') || self.held.len() >= CONSOLE_BATCH {
            self.drain();
        } else if !self.pending.held.swap(true, Ordering::AcqRel) {
            if let Some(notify) = &self.pending.notify {
                // The event loop writes it out if no vCPU exit does first.
                let _ = notify.write(1);
            }
        }
        Ok(bytes.len())
    }

    /// vm-superio flushes after every byte; batching is the point, so this
    /// does nothing (see [`Batched::drain`]).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART's registers as a snapshot keeps them (vm-superio's
/// `SerialState`, which has no serde support of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRegisters {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification.
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status.
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegisters {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialRegisters> for SerialState {
    fn from(s: SerialRegisters) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor[0],
            baud_divisor_high: s.baud_divisor[1],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// Why saved UART registers could not be put back.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// More received bytes than the UART's FIFO holds.
    #[error("the saved serial input holds {0} bytes, more than the UART's FIFO")]
    FullFifo(usize),
    /// The interrupt the registers call for could not be raised.
    #[error("cannot raise the serial interrupt")]
    Interrupt(#[source] std::io::Error),
}

/// COM1 on the PIO bus.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, Events, Batched>,
}

impl SerialConsole {
    /// A UART writing to `out` in batches and interrupting through `irq`;
    /// `notify` is written when a batch starts (see [`ConsolePending`]).
    pub fn new(
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
        notify: Option<EventFd>,
    ) -> (Self, Arc<SerialCounters>, Arc<ConsolePending>) {
        let (out, counters, pending) = Batched::new(out, notify);
        let uart = Serial::with_events(irq, Events(counters.clone()), out);
        (Self { uart }, counters, pending)
    }

    /// As [`SerialConsole::new`], with the registers a snapshot saved.
    pub fn from_state(
        state: &SerialRegisters,
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
        notify: Option<EventFd>,
    ) -> Result<(Self, Arc<SerialCounters>, Arc<ConsolePending>), SerialStateError> {
        let (out, counters, pending) = Batched::new(out, notify);
        let uart =
            Serial::from_state(&state.clone().into(), irq, Events(counters.clone()), out).map_err(|e| match e {
                vm_superio::serial::Error::FullFifo => SerialStateError::FullFifo(state.in_buffer.len()),
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    SerialStateError::Interrupt(e)
                }
            })?;
        Ok((Self { uart }, counters, pending))
    }

    /// The UART's registers, for a snapshot.
    pub fn state(&self) -> SerialRegisters {
        self.uart.state().into()
    }

    /// Writes out the output held so far.
    pub fn flush_output(&mut self) {
        self.uart.writer_mut().drain();
    }
}

impl Drop for SerialConsole {
    fn drop(&mut self) {
        self.flush_output();
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
    fn output_goes_out_at_newlines_when_full_or_flushed() {
        let sink = Sink::default();
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut com1, _, pending) = SerialConsole::new(irq, Box::new(sink.clone()), Some(notify.try_clone().unwrap()));
        for b in b"prompt> " {
            com1.write(0, &[*b]);
        }
        assert!(sink.0.lock().unwrap().is_empty(), "a partial line went out at once");
        assert!(pending.is_set());
        assert_eq!(notify.read().unwrap(), 1, "one notification for the whole batch");
        com1.flush_output();
        assert_eq!(&*sink.0.lock().unwrap(), b"prompt> ");
        assert!(!pending.is_set());
        for b in b"a line\nand more" {
            com1.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"prompt> a line\n");
        sink.0.lock().unwrap().clear();
        for _ in 0..CONSOLE_BATCH {
            com1.write(0, b"x");
        }
        assert_eq!(sink.0.lock().unwrap().len(), CONSOLE_BATCH, "a full batch is written without a newline");
        drop(com1);
        assert_eq!(sink.0.lock().unwrap().len(), CONSOLE_BATCH + "and more".len(), "dropping the UART lost output");
    }

    #[test]
    fn transmitted_bytes_reach_the_output_and_are_counted() {
        let sink = Sink::default();
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (mut com1, counters, _) = SerialConsole::new(irq, Box::new(sink.clone()), None);
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
