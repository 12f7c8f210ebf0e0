//! The PIO bus as a vCPU drives it: the 8250 serial port, the i8042 and
//! the boot timer at their ports, plus devices placed and removed at
//! arbitrary ranges. Every access is checked against a model of the
//! ranges: it reaches a device exactly when one range holds all of it,
//! and a read nothing claims is all ones.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::legacy::{BootTimer, EventFdTrigger, SerialConsole, I8042};
use devices::{Bus, BusDevice, BusError};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// A device that remembers what was written to it.
struct Scratch([u8; 16]);

impl BusDevice for Scratch {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.0[(offset as usize + i) % 16];
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.0[(offset as usize + i) % 16] = *b;
        }
    }
}

/// A device on the bus at (base, length).
type Placed = (Arc<Mutex<dyn BusDevice>>, u64, u64);

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bus = Bus::new();
    let mut model: Vec<(u64, u64)> = Vec::new();
    // With a batch notification, as the VMM has it.
    let (serial, _, _) = SerialConsole::new(
        EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
        Box::new(std::io::sink()),
        Some(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
    );
    let i8042 = I8042::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let (timer, _) = BootTimer::new(std::time::Instant::now());
    let legacy: [Placed; 3] = [
        (Arc::new(Mutex::new(serial)), 0x3f8, 8),
        (Arc::new(Mutex::new(i8042)), 0x60, 5),
        (Arc::new(Mutex::new(timer)), 0x440, 1),
    ];
    for (device, base, len) in legacy {
        bus.insert(device, base, len).expect("legacy devices");
        model.push((base, len));
    }
    let mut input = Input(data);
    let mut last_base = 0u64;
    while let Some([op]) = input.bytes::<1>() {
        let size = 1usize << ((op >> 2) & 3);
        match op & 3 {
            // A read or write at a port, or near the last range placed.
            0 | 1 => {
                let Some(at) = input.bytes::<2>() else { break };
                let at = u64::from(u16::from_le_bytes(at));
                let addr = if op & 0x10 != 0 { last_base.wrapping_add(at & 0x1f) } else { at };
                let claimed =
                    model.iter().any(|&(b, l)| addr >= b && addr.checked_add(size as u64).is_some_and(|e| e <= b + l));
                let mut buf = [0u8; 8];
                if op & 3 == 0 {
                    let hit = bus.read(addr, &mut buf[..size]);
                    assert_eq!(hit, claimed, "read of {size} at {addr:#x}");
                    if !hit {
                        assert!(buf[..size].iter().all(|b| *b == 0xff));
                    }
                } else {
                    let Some(value) = input.bytes::<8>() else { break };
                    assert_eq!(bus.write(addr, &value[..size]), claimed, "write of {size} at {addr:#x}");
                }
            }
            // A device placed anywhere.
            2 => {
                let (Some(base), Some(len)) = (input.bytes::<8>(), input.bytes::<8>()) else { break };
                let (base, len) = (u64::from_le_bytes(base), u64::from_le_bytes(len) >> (op >> 4));
                let result = bus.insert(Arc::new(Mutex::new(Scratch([0; 16]))), base, len);
                let expected = match base.checked_add(len).filter(|_| len > 0) {
                    None => Err(BusError::InvalidRange { base, len }),
                    Some(end) if model.iter().any(|&(b, l)| base < b + l && b < end) => {
                        Err(BusError::Overlap { base, len })
                    }
                    Some(_) => Ok(()),
                };
                assert_eq!(result, expected);
                if result.is_ok() {
                    model.push((base, len));
                    last_base = base;
                }
            }
            // A device removed by its base.
            _ => {
                let base = if op & 0x10 != 0 {
                    last_base
                } else {
                    let Some(at) = input.bytes::<2>() else { break };
                    u64::from(u16::from_le_bytes(at))
                };
                let known = model.iter().position(|&(b, _)| b == base);
                assert_eq!(bus.remove(base), known.is_some());
                if let Some(i) = known {
                    model.remove(i);
                }
            }
        }
    }
});
